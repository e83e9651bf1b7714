"""Run by tests/test_distributed.py: a few training steps with STSCallback, in one process or under
``torchrun --nproc_per_node 2`` (DDP / DeepSpeed ZeRO-2 / ZeRO-3 on CPU with gloo).

    python tests/distributed_worker.py MODE OUT      MODE: single | ddp | zero2 | zero3 | bad_inputs | forecast_disagree
                                                       | runlevel_single | runlevel_ddp | runlevel_zero2
                                                       | runlevel_zero3 | trl_dpo | trl_grpo | trl_distill
                                                       | callback_runlevel_single | callback_runlevel_ddp
                                                       | callback_runlevel_zero3 | onerank_failure
                                                       | onerank_failure_zero3 | runlevel_onerank_failure
                                                       | grpo_reward_fails_zero3 | first_batches_single
                                                       | first_batches_ddp

Each rank writes ``OUT/rank<r>.json``: the files it wrote under the STS folder (seen by an audit hook)
and, for ``bad_inputs``, the errors it raised.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import TinySAE, domain_texts, make_model, make_tokenizer, record_sts_writes  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments  # noqa: E402

from sts_callback.integrations.callback import STSCallback  # noqa: E402

MODE, OUT = sys.argv[1], Path(sys.argv[2])
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
written = record_sts_writes()

DOMAINS = {"law": domain_texts("law", 7), "food": domain_texts("food", 5), "chem": domain_texts("chem", 9),
           # fewer texts than processes: its shard on rank 1 is only a padded duplicate
           "sport": [" ".join(["goal match team player score season coach league win ball"] * 2)],
           # a multiple-choice domain: 5 items on 2 ranks, so one rank scores a padded duplicate it must not count
           "quiz": [{"question": t, "choices": ["cook bake", "court judge"], "answer": i % 2}
                    for i, t in enumerate(domain_texts("food", 5, seed=7))]}
PROBE = domain_texts("law", 11, seed=3)  # 11 texts: not divisible by 2
CONFIG = dict(n_shifted=8, shift_tokens=150, domain_tokens=60, n_domain_demonstrations=2, batch_size=3,
              icl_loss_tokens=40)  # the in-context NLL change too: every rank its share of the batches


def trainer_for(callback, output_dir: Path, deepspeed=None, model=None, max_steps: int = 4):
    tokenizer = make_tokenizer()
    # Identical training examples: the summed gradient of a batch does not depend on which rank holds
    # which example, so one process with batch 4 and two with batch 2 take the same steps.
    texts = ["the court judge law contract statute appeal ."] * 32
    data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    per_device = 4 // WORLD
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2, save_strategy="steps", logging_steps=1,
        per_device_train_batch_size=per_device, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        use_cpu=True, report_to=[], ddp_backend="gloo" if WORLD > 1 else None, deepspeed=deepspeed, seed=0,
        save_only_model=True,
    )
    return Trainer(model=model if model is not None else make_model("llama"), args=args, train_dataset=data,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                   callbacks=[callback])


def deepspeed_config(stage: int) -> dict:
    # No DeepSpeed optimizer: the Trainer's torch optimizer avoids compiling DeepSpeed's CPU Adam.
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True}


def callback(**overrides):
    values = dict(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), target_domains=DOMAINS,
                  train_probe=PROBE, config=CONFIG, recheck_tokens=90, loss_tokens=50, protected=["food"])
    values.update(overrides)
    return STSCallback(**values)


def onerank_failure(zero3: bool) -> dict:
    """Rank 1 alone raises inside a re-check's forward (as a CUDA OOM would), once in each collective pass: the
    probe (re-check 1), the held-out losses (2), the multiple-choice accuracy (3); re-check 4 runs clean. Then a
    strict run whose rank 1 fails in its first re-check's probe.

    ``zero3``: under ZeRO-3 (every forward a collective) the error comes right after a forward instead (the probe's
    rows, the loss, the choices' log-probabilities), no strict run; each rank's forwards per pass are counted."""
    from sts_callback.core.extract import Extractor
    from sts_callback.pipelines.monitor import Monitor

    state = {"recheck": 0, "in_recheck": False, "pass": None}
    fail_in = {1: "probe", 2: "losses", 3: "accuracy"}
    fired: list = []

    def tracked(method, name):
        def wrapper(self, *args, **kwargs):
            outer, state["pass"] = state["pass"], name
            try:
                return method(self, *args, **kwargs)
            finally:
                state["pass"] = outer
        return wrapper

    def counted(method):
        def wrapper(self, *args, **kwargs):
            state["recheck"] += 1
            state["in_recheck"] = True
            try:
                return method(self, *args, **kwargs)
            finally:
                state["in_recheck"] = False
        return wrapper

    Monitor.recheck = counted(Monitor.recheck)
    Monitor.probe_rows = tracked(Monitor.probe_rows, "probe")
    Monitor.measure_changes = tracked(Monitor.measure_changes, "losses")
    Monitor.measure_accuracy = tracked(Monitor.measure_accuracy, "accuracy")

    def fail_here(name: str) -> None:
        if RANK == 1 and state["in_recheck"] and fail_in.get(state["recheck"]) == name == state["pass"]:
            fired.append([state["recheck"], state["pass"]])
            raise RuntimeError(f"CUDA out of memory (simulated in the {state['pass']} pass)")

    forwards: dict = {}

    def hook(module, inputs):
        if state["in_recheck"]:
            key = f"{state['recheck']}:{state['pass']}"
            forwards[key] = forwards.get(key, 0) + 1
        if not zero3:
            fail_here(state["pass"])

    def after(function, name):
        def wrapper(*args, **kwargs):
            fail_here(name)
            return function(*args, **kwargs)
        return wrapper

    if zero3:  # local work after a forward: the probe's rows, the held-out loss, the choices' log-probabilities
        Extractor._rows = staticmethod(after(Extractor._rows, "probe"))
        torch.nn.functional.cross_entropy = after(torch.nn.functional.cross_entropy, "losses")
        torch.log_softmax = after(torch.log_softmax, "accuracy")

    out: dict = {}
    model = make_model("llama")
    model.model.layers[0].register_forward_pre_hook(hook)
    cb = callback()
    trainer = trainer_for(cb, OUT / "run", model=model, max_steps=8, deepspeed=deepspeed_config(3) if zero3 else None)
    trainer.train()
    out.update(history=cb.history, global_step=trainer.state.global_step, fired=fired, forwards=forwards)
    if zero3:
        return out

    state["recheck"], fail_in = 0, {1: "probe"}
    model = make_model("llama")
    model.model.layers[0].register_forward_pre_hook(hook)
    cb = callback(strict=True)
    try:
        trainer_for(cb, OUT / "strict", model=model).train()
        out["strict_error"] = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        out["strict_error"] = f"{type(err).__name__}: {err}"
    out["strict_history"] = cb.history
    return out


def runlevel(backend: str) -> dict:
    """The run-level term from a Trainer callback at on_train_begin (the Trainer's own optimizer: accelerate's
    wrapper, DeepSpeed's ZeRO optimizer): lookahead and first-order, and whether the lookahead put back the
    parameters and the optimizer state."""
    from transformers import TrainerCallback

    from sts_callback.core.distributed import fingerprint
    from sts_callback.pipelines.runlevel import RunLevelConfig, first_order, lookahead, training_batches

    tokenizer = make_tokenizer()
    targets = {}
    for name, texts in DOMAINS.items():
        if not all(isinstance(t, str) for t in texts):
            continue  # the multiple-choice domain: the run-level terms measure text domains
        ids = [list(tokenizer(t)["input_ids"]) for t in texts]
        targets[name] = [(i, [True] * (len(i) - 1)) for i in ids]
    data = Dataset.from_dict({"text": domain_texts("law", 12, seed=5) + domain_texts("code", 4, seed=5)}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    out: dict = {}

    class RunLevel(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            def state_of():
                inner = getattr(optimizer, "optimizer", optimizer)
                inner = getattr(inner, "optimizer", inner)  # DeepSpeed's base optimizer
                return fingerprint([p for p in model.parameters()], [list(s.items()) for s in inner.state.values()],
                                   [sorted((k, str(v)) for k, v in g.items() if k != "params")
                                    for g in inner.param_groups])

            batches = training_batches(data, collator, 4 // WORLD, 4, seed=0)
            settings = RunLevelConfig(steps=2, accumulation=2, max_grad_norm=1.0, batch_size=2)
            before = state_of()
            for name, fn in (("lookahead", lookahead), ("first_order", first_order)):
                try:
                    out[name] = fn(model, optimizer, batches, targets, settings).to_dict()
                except Exception as err:  # noqa: BLE001 - recorded for the test
                    out[name] = f"{type(err).__name__}: {err}"
            out["restored"] = state_of() == before
            out["optimizer"] = type(optimizer).__name__

    args = TrainingArguments(
        output_dir=str(OUT / "run"), max_steps=1, save_strategy="no", per_device_train_batch_size=4 // WORLD,
        learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, optim="adamw_torch", weight_decay=0.01,
        use_cpu=True, report_to=[], ddp_backend="gloo" if WORLD > 1 else None, seed=0,
        deepspeed=deepspeed_config(int(backend[-1])) if backend.startswith("zero") else None)
    Trainer(model=make_model("llama"), args=args, train_dataset=data, data_collator=collator,
            processing_class=tokenizer, callbacks=[RunLevel()]).train()
    return out


def trl_forecast(kind: str) -> tuple[dict | None, list[dict]]:
    """The train-start forecast of a TRL DPO, GRPO or distillation run (one step) with the callback's automatic
    shift, and the history (GRPO, distillation: LoRA, re-checked after its step on the policy's completions of fresh
    prompts)."""
    from peft import LoraConfig
    from trl import DistillationConfig, DistillationTrainer, DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    tokenizer = make_tokenizer()
    common = dict(output_dir=str(OUT / "run"), max_steps=1, save_strategy="no", logging_steps=1, use_cpu=True,
                  report_to=[], ddp_backend="gloo" if WORLD > 1 else None, seed=0, learning_rate=1e-3)
    cb = callback(train_probe=None, protected=[], recheck_at_end=kind != "dpo", recheck_tokens=24,
                  config={**CONFIG, "rollout_prompts": 5, "rollout_generations": 3, "rollout_max_tokens": 6})
    texts = domain_texts("law", 12, seed=5)
    if kind == "dpo":
        data = Dataset.from_dict({"prompt": texts, "chosen": texts[1:] + texts[:1],
                                  "rejected": domain_texts("food", 12, seed=5)})
        trainer = DPOTrainer(model=make_model("llama"), ref_model=make_model("llama"), train_dataset=data,
                             args=DPOConfig(max_length=48, per_device_train_batch_size=2, **common),
                             processing_class=tokenizer, callbacks=[cb])
    elif kind == "distill":
        trainer = DistillationTrainer(
            model=make_model("llama"), teacher_model=make_model("llama", seed=1),
            train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer, callbacks=[cb],
            args=DistillationConfig(max_completion_length=6, per_device_train_batch_size=2, **common),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    else:
        def reward_law(completions, **kwargs):
            return [float(sum(w in c for w in ("court", "judge", "law"))) + len(c) / 100 for c in completions]

        trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=reward_law, train_dataset=Dataset.from_dict(
            {"prompt": texts}), args=GRPOConfig(num_generations=2, max_completion_length=6, temperature=1.5,
                                                per_device_train_batch_size=2, **common),
                              processing_class=tokenizer, callbacks=[cb],
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    return (cb.forecast.to_dict() if cb.forecast else None), cb.history


def grpo_reward_fails_zero3() -> dict:
    """GRPO under ZeRO-3 whose reward function raises on rank 1 alone at STS's train-start rollouts: every generate
    is a collective there, and rank 0, still generating its next prompt, waited for ever for the rank that had
    left its loop (under DDP both raised at once). Both ranks must raise the reward's error, naming rank 1."""
    from trl import GRPOConfig, GRPOTrainer

    def reward_law(completions, **kwargs):
        if RANK == 1:
            raise ValueError("reward parser failed on rank 1")
        return [float(sum(w in c for w in ("court", "judge", "law"))) + len(c) / 100 for c in completions]

    cb = callback(train_probe=None, protected=[], recheck_tokens=24,
                  config={**CONFIG, "rollout_prompts": 6, "rollout_generations": 2, "rollout_max_tokens": 6})
    args = GRPOConfig(output_dir=str(OUT / "run"), max_steps=1, save_strategy="no", logging_steps=1, use_cpu=True,
                      report_to=[], ddp_backend="gloo", seed=0, learning_rate=1e-3, num_generations=2,
                      max_completion_length=6, per_device_train_batch_size=2, deepspeed=deepspeed_config(3),
                      optim="sgd")
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=reward_law, args=args, processing_class=make_tokenizer(),
                          train_dataset=Dataset.from_dict({"prompt": domain_texts("law", 12, seed=5)}), callbacks=[cb])
    try:
        trainer.train()
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - recorded for the test
        return {"error": f"{type(err).__name__}: {err}"}


def callback_runlevel(backend: str) -> dict:
    """STSCallback's run-level term at train start: a lookahead measuring every target domain (no calibration),
    one measuring only the training data's own change (a calibration whose level is ``lookahead_own``), and the
    first-order estimate. Under ZeRO-3 the lookahead falls back to first order, and the calibration that reads a
    lookahead is refused at train start."""
    import numpy as np

    from sts_callback.scoring.calibration import Calibration

    names = list(DOMAINS)
    runs = [(np.zeros((len(names), 0)), [0.01 * i - 0.5 * own for i in range(len(names))], [own], names)
            for own in (-0.3, -0.1, 0.0, -0.2)]
    own_level = Calibration.fit_level_pattern(runs, [], ["lookahead_own"], domain_prior=True)
    out = {}
    ds = deepspeed_config(3) if backend == "zero3" else None
    for name, overrides in (("every", {}), ("own_only", {"calibration": own_level}),
                            ("first_order", {"run_level": "first_order"})):
        cb = callback(**{"run_level": "lookahead", "run_level_steps": 2, **overrides})
        try:
            trainer_for(cb, OUT / name, deepspeed=ds).train()
        except Exception as err:  # noqa: BLE001 - recorded for the test
            out[name] = f"{type(err).__name__}: {err}"
            continue
        out[name] = {"run_level": cb.session.run_level, "predicted": cb.predicted}
    return out


def runlevel_onerank_failure() -> dict:
    """Rank 1 alone raises (as a CUDA OOM would) once in the run-level term: in its training gradient (a lookahead),
    then in its held-out pass (first order), then in a strict first-order run. Each run: the term skipped on every
    rank and training on (the other rank waited in the term's sum for ever before); strict: raised on both."""
    from sts_callback.pipelines import runlevel

    out, fired = {}, []

    def failing_once(function, where):
        def wrapper(*args, **kwargs):
            if RANK == 1 and where not in fired:
                fired.append(where)
                raise RuntimeError(f"CUDA out of memory (simulated in the {where})")
            return function(*args, **kwargs)
        return wrapper

    runlevel._train_nll = failing_once(runlevel._train_nll, "training gradient")
    runlevel._held_out_nll = failing_once(runlevel._held_out_nll, "held-out pass")
    for name, overrides in (("lookahead", {"run_level": "lookahead"}), ("first_order", {"run_level": "first_order"}),
                            ("strict", {"run_level": "first_order", "strict": True})):
        if name == "strict" and "held-out pass" in fired:  # rank 1 fails again, now under strict
            fired.remove("held-out pass")
        cb = callback(run_level_steps=1, **overrides)
        trainer = trainer_for(cb, OUT / name, max_steps=2)
        try:
            trainer.train()
        except Exception as err:  # noqa: BLE001 - recorded for the test
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        out[name] = {"run_level": cb.session.run_level, "global_step": trainer.state.global_step}
    return {"runs": out, "fired": fired}


result: dict = {"rank": RANK, "world": WORLD}
def first_batches() -> dict:
    """The run's first micro-batches as the run-level term reads them at train start (this rank's, every rank's)
    and the micro-batches this rank then trains on, on 12 distinct texts (3 batches of 4 an epoch: the 4 read run
    into the second epoch)."""
    from transformers import TrainerCallback

    from sts_callback.integrations.first_batches import run_first_batches

    read, trained = {}, []

    class Read(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            found = run_first_batches(train_dataloader, 4, WORLD)
            read.update(mine=[texts_of(b) for b in found[0]], every=[texts_of(b) for b in found[1]])

    class Recording(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            trained.append(texts_of(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    tokenizer = make_tokenizer()
    texts_of = lambda batch: tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)  # noqa: E731
    texts = domain_texts("law", 12, seed=11)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(OUT / "run"), max_steps=4, per_device_train_batch_size=4 // WORLD,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0,
                             ddp_backend="gloo" if WORLD > 1 else None)
    Recording(model=make_model("llama"), args=args, train_dataset=data,
              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
              callbacks=[Read()]).train()
    return {**read, "trained": trained}


if MODE.startswith("first_batches"):  # first_batches_single | first_batches_ddp
    result = {"first_batches": first_batches()}
elif MODE.startswith("callback_runlevel_"):
    result["callback_runlevel"] = callback_runlevel(MODE.rsplit("_", 1)[1])
elif MODE == "grpo_reward_fails_zero3":
    result.update(grpo_reward_fails_zero3())
elif MODE == "runlevel_onerank_failure":
    result.update(runlevel_onerank_failure())
elif MODE.startswith("onerank_failure"):  # onerank_failure | onerank_failure_zero3
    result.update(onerank_failure(MODE.endswith("zero3")))
elif MODE.startswith("runlevel_"):  # runlevel_single | runlevel_ddp | runlevel_zero2 | runlevel_zero3
    result["runlevel"] = runlevel(MODE.split("_", 1)[1])
elif MODE.startswith("trl_"):
    result["forecast"], result["history"] = trl_forecast(MODE.split("_", 1)[1])
elif MODE == "forecast_disagree":  # forecast() itself, no trainer: ranks given different data must not be merged
    from sts_callback import forecast

    torch.distributed.init_process_group("gloo")
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer, model = make_tokenizer(), make_model("llama")
    sae = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    errors = {}
    cases = {"train_disagrees": (domain_texts("law", 20, seed=RANK), DOMAINS),
             "domains_disagree": (PROBE, {k: v for k, v in DOMAINS.items() if RANK == 0 or k != "chem"}),
             "agree": (PROBE, DOMAINS)}
    for case, (train, targets) in cases.items():
        try:
            forecast(model, tokenizer, sae, train, targets, CONFIG)
            errors[case] = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            errors[case] = f"{type(err).__name__}: {err}"
    result["errors"] = errors
elif MODE == "budget":  # the ranks' budgets disagree (as their clocks may): rank 0's choice must hold on both
    cb = callback(overhead_budget=0.001 if RANK == 0 else 0.9)
    trainer_for(cb, OUT / "run").train()
    result["history"] = cb.history
elif MODE == "bad_inputs":
    errors = {}
    domains = dict(DOMAINS) if RANK == 0 else {k: v for k, v in DOMAINS.items() if k != "chem"}
    food = DOMAINS["food"] if RANK == 0 else domain_texts("food", 5, seed=7)  # one domain's texts differ
    for case, cb in (("domains_disagree", callback(target_domains=domains, protected=[])),
                     ("one_domain_differs", callback(target_domains={**DOMAINS, "food": food}, protected=[])),
                     ("sae_disagree", callback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post", seed=RANK))),
                     ("probe_smaller_than_world",
                      callback(train_probe=PROBE[:1], config={**CONFIG, "shift_tokens": 16}))):
        try:
            trainer_for(cb, OUT / case).train()
            errors[case] = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            errors[case] = f"{type(err).__name__}: {err}"
    result["errors"] = errors
else:  # single | single_own_dtype | ddp | zero2 | zero3
    ds = deepspeed_config(int(MODE[-1])) if MODE.startswith("zero") else None
    # ZeRO-3's sharded model runs its full forward in its own dtype ("auto" keeps it so, head and body) and its
    # whole head (no head samples): its reference is one process measuring so too
    cb = callback(loss_head_dtype=None, loss_body_dtype=None, loss_head_samples=None) \
        if MODE == "single_own_dtype" else callback()
    trainer = trainer_for(cb, OUT / "run", deepspeed=ds)
    trainer.train()
    result["history"] = cb.history
    result["forecast"] = cb.forecast.to_dict() if cb.forecast else None
    # the callback lets go of the model at train end: the trained one, as a re-check after it gets it
    result["truncated_forward"] = cb.monitor._extractor(trainer.model).capture.truncate
result["written"] = sorted(set(written))
(OUT / f"rank{RANK}.json").write_text(json.dumps(result))
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # no rank tears gloo down while the other still uses it (an abort at exit)
    torch.distributed.destroy_process_group()
# Leave without the interpreter's teardown: DeepSpeed's and gloo's native threads sometimes abort it
# ("terminate called without an active exception") after every result above is written and synchronised.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
