"""STSCallback on real Trainer runs with tiny models."""

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer, save_sae_lens_sae
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from sts_callback import STSConfig, STSConfigError, STSDataWarning, STSInputError
from sts_callback.integrations.callback import STSCallback, STSNegativeTransferWarning
from sts_callback.pipelines.forecast import Forecast

DOMAINS = ("law", "food", "chem")
FAST = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def tokenized(tokenizer, texts):
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def make_callback(**overrides):
    values = dict(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                  target_domains={d: domain_texts(d, 30) for d in DOMAINS}, config=FAST,
                  recheck_tokens=150, loss_tokens=120)
    values.update(overrides)
    return STSCallback(**values)


def make_trainer(tmp_path, tokenizer, callback, model=None, texts=None, extra_callbacks=(), eval_texts=None,
                 **arg_overrides):
    args = dict(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2, logging_steps=1, use_cpu=True,
                report_to=[], per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps")
    optimizers = arg_overrides.pop("optimizers", (None, None))
    args.update(arg_overrides)
    return Trainer(model=model if model is not None else make_model("llama"), args=TrainingArguments(**args),
                   optimizers=optimizers,
                   train_dataset=tokenized(tokenizer, texts or domain_texts("law", 64)),
                   eval_dataset=tokenized(tokenizer, eval_texts) if eval_texts else None,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                   callbacks=[callback, *extra_callbacks])


class Spy(TrainerCallback):
    """Records what exists when training steps happen."""

    def __init__(self, callback):
        self.callback = callback
        self.at_first_step = None
        self.step0 = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.callback.monitor is not None and state.global_step == 0:
            self.step0.append(self.callback.monitor.recheck(model, None))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at_first_step is None:
            self.at_first_step = {
                "forecast_file": (Path(args.output_dir) / "sts" / "forecast.json").exists(),
                "logged": [k for entry in state.log_history for k in entry if k.startswith("sts/forecast/")],
            }


def test_trainer_forecast_rechecks_and_own_loss_logging(tmp_path, tokenizer):
    callback = make_callback()
    spy = Spy(callback)
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[spy])
    trainer.train()
    out = tmp_path / "run"
    assert spy.at_first_step["forecast_file"]
    assert sorted(spy.at_first_step["logged"]) == sorted(f"sts/forecast/{d}" for d in DOMAINS)
    forecast = json.loads((out / "sts" / "forecast.json").read_text())
    assert set(forecast["domains"]) == set(DOMAINS)
    history = [json.loads(line) for line in (out / "sts" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4, 6]
    for record in history:
        assert set(record["loss_delta"]) == set(DOMAINS) and record["shift_total"] > 0
        assert 0 <= record["overlap_with_forecast"] <= 8
    losses = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert losses == [1, 2, 3, 4, 5, 6]  # the trainer's own loss log survives the re-check logs
    rechecks = [e["step"] for e in trainer.state.log_history if "sts/recheck/law" in e]
    assert rechecks == [2, 4, 6]
    assert any(k.startswith("sts/loss_delta/") for e in trainer.state.log_history for k in e)
    logged = next(e for e in trainer.state.log_history if "sts/recheck/law" in e and e["step"] == 6)
    for d in DOMAINS:  # each change with its standard error, and how well they could order the domains at all
        assert logged[f"sts/loss_delta_se/{d}"] == pytest.approx(history[-1]["loss_delta_se"][d])
    assert 0 <= logged["sts/recheck_stats/noise_ceiling"] <= 1
    spent = history[-1]["overhead"]  # what the re-checks cost, against the training between them
    assert spent["budget"] is None and spent["train_seconds"] > 0
    # the measurements, and the files and report written around the earlier ones
    assert spent["recheck_seconds"] > sum(r["seconds"] for r in history)
    assert spent["share"] == pytest.approx(spent["recheck_seconds"] / spent["train_seconds"])
    assert [e["step"] for e in trainer.state.log_history if "sts/recheck_stats/overhead" in e] == [2, 4, 6]
    for step in (2, 4, 6):
        saved = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        stored = saved["stateful_callbacks"]["STSCallback"]
        assert [r["step"] for r in stored["attributes"]["history"]] == [s for s in (2, 4, 6) if s <= step]
        assert (out / f"checkpoint-{step}" / "sts" / "monitor.safetensors").exists()
    # full fine-tune: base vs current is exactly zero at step 0
    assert spy.step0[0].shift_total == 0.0
    # the loss is measured in blocks other than train start's batches: equal up to float noise of other padding
    assert all(abs(d) < 1e-6 for d in spy.step0[0].loss_delta.values())


@pytest.mark.parametrize("kind", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_prompt_learning_peft_is_refused_at_train_start_before_any_step(tmp_path, tokenizer, kind):
    import peft

    config = getattr(peft, kind)(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = peft.get_peft_model(make_model("llama"), config)
    trainer = make_trainer(tmp_path, tokenizer, make_callback(), model=model)
    with pytest.raises(STSConfigError, match=f"cannot measure a {kind} model.*LoRA"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_activated_lora_is_refused_at_train_start_before_any_step(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    # its adapters switch on after invocation tokens inside the wrapper's forward: the held-out pass crashed
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        alora_invocation_tokens=tokenizer("law court")["input_ids"][1:])
    trainer = make_trainer(tmp_path, tokenizer, make_callback(), model=get_peft_model(make_model("llama"), config))
    with pytest.raises(STSConfigError, match="cannot measure an activated LoRA"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_peft_base_is_the_model_with_adapters_disabled(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    callback = make_callback()
    spy = Spy(callback)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, extra_callbacks=[spy], learning_rate=5e-2)
    trainer.train()
    # the train-start residuals are kept once, so a re-check runs one forward; a zero-initialised LoRA at train
    # start is the adapters-disabled model
    assert callback.monitor.base_residuals is not None
    assert callback.monitor.loss_head_samples is None and not callback.monitor.head_samples  # a small head: whole
    from peft import PeftModel

    with model.disable_adapter():
        expected = callback.monitor.probe_residuals(model)
    assert torch.equal(callback.monitor.base_residuals, expected)
    assert isinstance(model, PeftModel)
    assert spy.step0[0].shift_total == 0.0
    assert callback.history[-1]["shift_total"] > 0
    # after the re-checks, adapters are active again: the adapted model differs from the base
    ids = torch.tensor([[1, 20, 21, 22]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)


def pretrained_tiny_model(tokenizer, steps=150):
    """A tiny model trained on all domains, so that fine-tuning on one domain makes it forget the others."""
    model = make_model("llama", seed=3)
    texts = [t for d in ("law", "food", "chem", "code", "sport") for t in domain_texts(d, 40, seed=5)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(texts), (32,))
        loss = model(input_ids=batch["input_ids"][index], attention_mask=batch["attention_mask"][index],
                     labels=labels[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_degradation_of_protected_domain_warns_and_stops(tmp_path, tokenizer):
    model = pretrained_tiny_model(tokenizer)
    callback = make_callback(protected=["food"], tolerance=0.02, early_stop=True, patience=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, texts=domain_texts("law", 64, seed=8),
                           learning_rate=3e-2, max_steps=12, save_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    history = callback.history
    assert history[0]["loss_delta"]["food"] > 0.02  # the injected degradation is real
    assert any(issubclass(w.category, STSNegativeTransferWarning) and "'food'" in str(w.message) for w in caught)
    assert trainer.state.global_step == 4  # stopped at the second consecutive violation
    assert "early stop at step 4" in history[-1]["early_stop"] and "'food'" in history[-1]["early_stop"]
    assert callback.stop_reason == history[-1]["early_stop"]
    written = [json.loads(line) for line in (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()]
    assert written[-1]["early_stop"] == callback.stop_reason


def test_measured_metrics_reach_evaluate_for_early_stopping(tmp_path, tokenizer):
    from transformers import EarlyStoppingCallback

    callback = make_callback(protected=["food"])
    trainer = make_trainer(tmp_path, tokenizer, callback, eval_strategy="steps", eval_steps=2,
                           metric_for_best_model="eval_sts_protected_loss_delta", greater_is_better=False,
                           load_best_model_at_end=True, extra_callbacks=[EarlyStoppingCallback(3)],
                           eval_texts=domain_texts("law", 8, seed=4))
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evaluations
    assert trainer.state.best_metric is not None
    assert trainer.state.best_metric == pytest.approx(min(r["loss_delta"]["food"] for r in callback.history))


def test_resume_continues_history_without_recomputing(tmp_path, tokenizer, monkeypatch):
    first = make_callback()
    make_trainer(tmp_path, tokenizer, first, max_steps=4, save_steps=2).train()
    out = tmp_path / "run" / "sts"
    forecast_before = (out / "forecast.json").read_text()
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "run" / "gone")  # resume from step 2

    import sts_callback.integrations.session as session_module

    def no_forecast(*args, **kwargs):
        raise AssertionError("the forecast was recomputed on resume")

    monkeypatch.setattr(session_module, "run_forecast", no_forecast)
    second = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=6, save_steps=2,
                           restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STSCallback))
    assert [r["step"] for r in restored.history] == [2, 4, 6]
    written = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert written == [2, 4, 6]
    assert (out / "forecast.json").read_text() == forecast_before
    assert restored.forecast is not None and restored.base_losses == first.base_losses
    assert restored.sae is second.sae  # objects come back from the user's instance


def test_a_restoring_resume_keeps_the_recheck_made_while_its_checkpoint_was_saved(tmp_path, tokenizer):
    """A save another callback asks for after STS's step end is re-checked in on_save, after the Trainer wrote
    trainer_state.json: a restoring resume took the callback's history and counters from there, one re-check
    short (the early stop's count one short, the rotation one behind), though the checkpoint's own STS state
    and history.jsonl held it."""
    class SaveAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_save = True

    first = make_callback(protected=["food"], max_sts=0.0)  # every re-check a violation: counted
    make_trainer(tmp_path, tokenizer, first, max_steps=4, save_steps=100, extra_callbacks=[SaveAtStep3()]).train()
    assert [r["step"] for r in first.history] == [3, 4]
    second = make_callback(protected=["food"], max_sts=0.0)
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=5, save_steps=100,
                           restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert [r["step"] for r in second.history] == [3, 5]
    assert second.session.guard.violations_in_a_row == 2  # step 3's and step 5's


def test_a_restoring_resume_guards_with_the_settings_given_now_and_says_they_changed(tmp_path, tokenizer):
    """restore_callback_states_from_checkpoint=True rebuilt the callback from the checkpoint's arguments: a domain
    protected only in the resumed run's STSCallback was silently not guarded (its loss rose 30%, no warning, no
    stop), while the user's instance said it was protected."""
    first = make_callback()
    make_trainer(tmp_path, tokenizer, first, max_steps=2, save_steps=2, learning_rate=5e-2).train()
    second = make_callback(protected=["food"], tolerance=0.0, early_stop=True)  # food rises ~9% by step 6
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=8, save_steps=2, learning_rate=5e-2,
                           restore_callback_states_from_checkpoint=True)
    with pytest.warns(STSDataWarning, match=r"settings differ from the checkpoint's \(protected: \[\] -> \['food'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STSCallback))
    assert restored.session is second.session and second.protected == ["food"]
    # the first violation stopped the run (unguarded, it went on to step 8)
    assert second.stop_reason and second.history[-1]["violations"]
    assert trainer.state.global_step == second.history[-1]["step"] < 8
    settings = json.loads((tmp_path / "run" / "sts" / "settings.json").read_text())
    assert settings["protected"] == ["food"]


def test_a_restoring_resume_of_a_callback_given_only_paths_and_texts_keeps_the_users_instance(tmp_path, tokenizer):
    """With every argument JSON-able (an SAE folder, texts, a Path output_subdir), the Trainer rebuilt the callback
    from the checkpoint's arguments and the user's instance was not found: changed settings dropped unsaid, the
    instance the user holds left with no history. And a Path output_subdir made the first checkpoint save fail
    (trainer_state.json could not hold it)."""
    save_sae_lens_sae(tmp_path / "sae")
    first = make_callback(sae=str(tmp_path / "sae"), output_subdir=Path("sts_law"))
    assert first.state()["args"]["_objects_from"] is None
    make_trainer(tmp_path, tokenizer, first, max_steps=2, save_steps=2).train()
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["STSCallback"]["args"]["output_subdir"] == "sts_law"
    second = make_callback(sae=str(tmp_path / "sae"), output_subdir=Path("sts_law"), protected=["food"])
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=4, save_steps=2,
                           restore_callback_states_from_checkpoint=True)
    with pytest.warns(STSDataWarning, match=r"settings differ from the checkpoint's \(protected: \[\] -> \['food'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STSCallback))
    assert restored.session is second.session and restored.protected == ["food"]
    assert [r["step"] for r in second.history] == [2, 4]


def test_an_earlier_instance_named_callback_in_the_users_code_is_no_restore(tmp_path):
    """Only the Trainer's restore takes over another instance's settings and session."""
    callback = make_callback()
    again = make_callback(protected=["food"])
    assert again.session is not callback.session and callback.protected == [] and again.protected == ["food"]


def test_a_resume_with_other_sampling_settings_says_it_keeps_the_train_start_samples(tmp_path, tokenizer):
    """loss_tokens / recheck_tokens / loss_head_samples changed for a resume were shown as the callback's settings
    while every re-check measured the train-start samples (as it must: their base losses were measured there),
    unsaid."""
    first = make_callback(loss_tokens=80, recheck_tokens=100)
    make_trainer(tmp_path, tokenizer, first, max_steps=2, save_steps=2).train()
    second = make_callback(loss_tokens=400, recheck_tokens=400, loss_head_samples=None)
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=4, save_steps=2)
    with pytest.warns(STSDataWarning, match=r"other sampling settings than the run started with \(recheck_tokens: "
                                            r"100 -> 400; loss_tokens: 80 -> 400; loss_head_samples: 32 -> None\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    measured = [(r["loss_tokens"], r["probe_tokens"]) for r in second.history]
    assert measured[0] == measured[1]  # the resumed re-check measured what the first run's did


class FailingSAE(TinySAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail = False

    def encode(self, x):
        if self.fail:
            raise torch.OutOfMemoryError("injected: out of memory on a probe batch")
        return super().encode(x)


class Arm(TrainerCallback):
    def __init__(self, sae):
        self.sae = sae

    def on_step_begin(self, args, state, control, **kwargs):
        self.sae.fail = state.global_step >= 1


def test_failure_inside_recheck_does_not_stop_training(tmp_path, tokenizer):
    sae = FailingSAE(32, 64, hook_name="blocks.1.hook_resid_post")
    callback = make_callback(sae=sae)
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[Arm(sae)])
    with pytest.warns(RuntimeWarning, match="re-check at step 2 failed"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert [r["step"] for r in callback.history] == [2, 4, 6]
    assert all("OutOfMemoryError" in r["error"] and "Traceback" in r["traceback"] for r in callback.history)
    losses = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert losses == [1, 2, 3, 4, 5, 6]


def test_strict_mode_reraises(tmp_path, tokenizer):
    sae = FailingSAE(32, 64, hook_name="blocks.1.hook_resid_post")
    callback = make_callback(sae=sae, strict=True)
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[Arm(sae)])
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_model_returns_to_train_mode_after_recheck(tmp_path, tokenizer):
    class Mode(TrainerCallback):
        modes = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.modes.append(model.training)

    model = make_model("llama")
    model.train()
    model.gradient_checkpointing_enable()
    mode = Mode()
    make_trainer(tmp_path, tokenizer, make_callback(), model=model, extra_callbacks=[mode],
                 gradient_checkpointing=True).train()
    assert all(mode.modes) and model.is_gradient_checkpointing


def test_construction_errors():
    sae = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    with pytest.raises(STSConfigError, match=r"protected=\['math'\] are not among the target domains"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, protected=["math"])
    with pytest.raises(STSConfigError, match="needs target_domains"):
        STSCallback(sae=sae, target_domains={})
    with pytest.raises(STSConfigError, match="n_shifted must be"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, config={"n_shifted": 0})
    with pytest.raises(STSConfigError, match="tolerance"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, tolerance=-1)
    with pytest.raises(STSConfigError, match="recheck_steps"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, recheck_steps=0)
    with pytest.raises(STSConfigError, match="warn_confidence must be a probability"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, warn_confidence=90)
    with pytest.warns(STSDataWarning, match=r"warn_confidence=0.8 has no effect with no calibration"):
        STSCallback(sae=sae, target_domains={"law": ["x"]}, protected=["law"], warn_confidence=0.8)


def test_target_domains_of_the_wrong_shape_are_refused_at_construction():
    """Before the trainer and model are set up, with the fix: a new user's shapes that had failed only at train
    start, or named the wrong argument."""
    from datasets import Dataset

    sae = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    texts = ["the court held that the statute applies", "the judge ruled on appeal"]
    cases = [
        (Dataset.from_dict({"text": texts}), STSConfigError, r"target_domains is a Dataset: .*\{'law': data\}"),
        ((t for t in texts), STSConfigError, "target_domains is a generator"),
        ([texts, texts], STSInputError, r"target_domains\[0\] is a list of 2 texts without a name"),
        (texts, STSInputError, r"target_domains\[0\] \('the court held that the statute applies'\) looks like a "
                               r"text, not a domain name.*target_domains=\{'law': \[...\]\}"),
        ({"law": []}, STSInputError, "target 'law' is empty; give it at least one text"),
        ({"law": Dataset.from_dict({"content": texts})}, STSInputError,
         r"Cannot read the dataset of target 'law': its columns are \['content'\].*rename_column"),
    ]
    for target, error, words in cases:
        with pytest.raises(error, match=words):
            STSCallback(sae=sae, target_domains=target)


@pytest.mark.parametrize("schedule, expected", [
    ([1, 2, 5], [1, 2, 5, 6]),  # listed steps (dense early), then the end of training
    (0.5, [3, 6]),  # every half of the run, as TrainingArguments' fractional eval_steps
    ([0.2, 0.5], [2, 3, 6]),  # fractions of the run: ceil(6 x 0.2) = 2, ceil(6 x 0.5) = 3
])
def test_recheck_schedule_steps_fractions_and_lists_on_the_trainer(tmp_path, tokenizer, schedule, expected):
    callback = make_callback(recheck_steps=schedule)
    make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_steps=100).train()
    assert [r["step"] for r in callback.history] == expected


def test_recheck_schedule_beyond_the_run_is_warned_at_train_start(tmp_path, tokenizer):
    from sts_callback import STSDataWarning

    callback = make_callback(recheck_steps=[2, 40])
    with pytest.warns(STSDataWarning, match=r"step\(s\) \[40\] beyond this run's 3 steps"):
        make_trainer(tmp_path, tokenizer, callback, max_steps=3, save_steps=100).train()
    assert [r["step"] for r in callback.history] == [2, 3]


def test_sae_mismatch_fails_before_the_first_step(tmp_path, tokenizer):
    from sts_callback import STSInputError

    callback = make_callback(sae=TinySAE(48, 64, hook_name="blocks.1.hook_resid_post"))
    trainer = make_trainer(tmp_path, tokenizer, callback)
    with pytest.raises(STSInputError, match="d_in=48 does not match"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_exported_args_are_json_and_rebuild(tmp_path):
    (tmp_path / "sae").mkdir()  # a path is checked at construction (its contents when training starts)
    callback = STSCallback(sae=str(tmp_path / "sae"), target_domains=["legal", "math"], protected=["legal"],
                           config=FAST, recheck_steps=5)
    state = callback.state()
    rebuilt = STSCallback(**json.loads(json.dumps(state["args"])))
    assert rebuilt.state()["args"] == state["args"]
    assert state["args"]["_objects_from"] is None


def test_forecast_rank_and_max_sts_rules_warn(tmp_path, tokenizer):
    probe = make_callback()
    make_trainer(tmp_path / "probe", tokenizer, probe, max_steps=2, save_steps=2).train()
    top_domain = probe.forecast.ranked()[0][0]
    callback = make_callback(protected=[top_domain], forecast_top_k=1, max_sts=0.0, tolerance=10.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "run2", tokenizer, callback, max_steps=2, save_steps=2).train()
    messages = [str(w.message) for w in caught if issubclass(w.category, STSNegativeTransferWarning)]
    assert any(f"protected domain {top_domain!r} ranks 1 of 3" in m for m in messages)
    assert any("re-checked STS of protected domain" in m and "max_sts=0.0" in m for m in messages)
    assert callback.history[-1]["violations"] and "early_stop" not in callback.history[-1]


def test_a_calibration_fitted_on_runs_of_another_length_says_so(tmp_path, tokenizer):
    """A calibration's level is how far runs of its length moved the domains: applied to a run far longer or
    shorter, every prediction missed, with nothing said (its runs' lengths were recorded and never read)."""
    from sts_callback.scoring.calibration import Calibration

    calibration = Calibration.fit([[0.0], [1.0], [2.0], [3.0]], [0.09, 0.11, 0.09, 0.11], ["sts_act"],
                                  fitted_on={"steps": [40, 48, 40]})
    assert calibration.fitted_run_steps == [40, 48, 40]
    callback = make_callback(calibration=calibration)
    with pytest.warns(STSDataWarning, match="fitted on runs of 40-48 steps and this run takes 6"):
        make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_steps=6).train()
    near = Calibration.fit([[0.0], [1.0], [2.0], [3.0]], [0.09, 0.11, 0.09, 0.11], ["sts_act"],
                           fitted_on={"steps": [6, 8]})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fitted on runs of")
        make_trainer(tmp_path / "near", tokenizer, make_callback(calibration=near), max_steps=6, save_steps=6).train()
    from sts_callback.scoring.calibration import builtin_calibration

    assert builtin_calibration("gemma3-270m-lora").fitted_run_steps == [64]


def test_calibrated_and_early_forecasts_warn_and_are_recorded(tmp_path, tokenizer):
    from sts_callback.scoring.calibration import Calibration

    # A calibration predicting +10% for every domain whatever the score: protected 'food' is warned at start.
    calibration = Calibration.fit([[0.0], [1.0], [2.0], [3.0]], [0.09, 0.11, 0.09, 0.11], ["sts_act"])
    path = calibration.save(tmp_path / "calibration.json")
    callback = make_callback(protected=["food"], tolerance=0.05, calibration=str(path), recheck_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_steps=100, lr_scheduler_type="linear").train()
    messages = [str(w.message) for w in caught if issubclass(w.category, STSNegativeTransferWarning)]
    assert any("calibrated forecast: protected domain 'food' is predicted to get worse by" in m for m in messages)
    # and in the report a person reads (it had said "No warnings." beside them)
    report = (tmp_path / "run" / "sts" / "report.md").read_text()
    assert "- train start: STS calibrated forecast: protected domain 'food' is predicted to get worse" in report
    assert set(callback.predicted) == set(DOMAINS)
    assert all(p["low"] < p["mean"] < p["high"] for p in callback.predicted.values())
    history = callback.history
    assert [r["step"] for r in history] == [2, 4, 6]
    fractions = [r["lr_area_fraction"] for r in history]
    assert fractions[0] > 2 / 6 and fractions[-1] == pytest.approx(1.0)  # a linear decay spends its area early
    assert all(r["early_method"] == "trend" for r in history)
    for name, delta in history[0]["loss_delta"].items():  # one re-check: the line through the origin
        assert history[0]["early_forecast"][name] == pytest.approx(delta / fractions[0])
    for name, delta in history[1]["loss_delta"].items():  # two: the line through both, at the end
        slope = (delta - history[0]["loss_delta"][name]) / (fractions[1] - fractions[0])
        assert history[1]["early_forecast"][name] == pytest.approx(delta + slope * (1 - fractions[1]))
    for record in history:
        for name, (low, high) in record["early_forecast_ci"].items():
            assert low <= record["early_forecast"][name] <= high
        assert record["predicted"] == {n: p["mean"] for n, p in callback.predicted.items()}
    report = (tmp_path / "run" / "sts" / "report.html").read_text()
    assert "projected at the end of training" in report and "calibrated at start" in report
    with pytest.raises(STSConfigError, match="not forecast scores"):
        make_callback(calibration=Calibration.fit([0, 1, 2], [0, 1, 2], ["accuracy"]))
    with pytest.raises(STSConfigError, match="neither a file nor a built-in calibration"):
        make_callback(calibration=str(tmp_path / "missing.json"))


def test_early_forecast_blends_the_measured_trend_with_the_step0_prediction(tmp_path, tokenizer):
    from sts_callback.scoring.calibration import Calibration
    from sts_callback.pipelines.prediction import best_early_method
    from sts_callback.scoring.early import blend_coefficients

    calibration = Calibration.fit([[0.0], [1.0], [2.0], [3.0]], [0.09, 0.11, 0.09, 0.11], ["sts_act"])
    calibration.early_blend = {"trend": [[0.2, 0.01, 0.3, 0.6], [0.6, 0.0, 0.8, 0.2]]}
    callback = make_callback(calibration=Calibration.load(calibration.save(tmp_path / "c.json")), recheck_steps=2)
    make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_steps=100, lr_scheduler_type="linear").train()
    step0 = {n: p["mean"] for n, p in callback.predicted.items()}
    for record in callback.history[:-1]:
        c0, w_early, w_step0 = blend_coefficients(calibration.early_blend["trend"], record["lr_area_fraction"])
        assert record["early_blend"] == pytest.approx({"intercept": c0, "early": w_early, "step0": w_step0})
        for name, projected in record["early_projection"].items():
            assert record["early_forecast"][name] == pytest.approx(c0 + w_early * projected + w_step0 * step0[name])
            low, high = record["early_forecast_ci"][name]
            assert low <= record["early_forecast"][name] <= high
    assert callback.history[-1]["early_blend"] == pytest.approx({"intercept": 0.0, "early": 1.0, "step0": 0.0})
    # early_method=None takes the benchmark's best: the power rule where the calibration has its blend
    assert {r["early_method"] for r in callback.history} == {"trend"}
    calibration.early_blend["power"] = calibration.early_blend["trend"]
    assert best_early_method(calibration) == "power" and best_early_method(None) == "trend"
    # a blend fitted on LoRA runs is not applied to a full fine-tune (this one): the projection alone
    calibration.early_blend_recipe = "lora"
    assert best_early_method(calibration, "full") == "trend" and best_early_method(calibration, "lora") == "power"
    full = make_callback(calibration=calibration, recheck_steps=2)
    make_trainer(tmp_path / "full", tokenizer, full, max_steps=6, save_steps=100, lr_scheduler_type="linear").train()
    assert full.session.recipe == "full"
    assert all("early_blend" not in r and r["early_method"] == "trend" for r in full.history)


def test_with_peft_the_shift_is_measured_from_the_model_at_train_start(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    # an adapter that starts non-zero (init_lora_weights=False, or a trained one loaded to train on), at lr 0: the
    # model does not change, so neither does anything measured (the adapters-disabled base read its whole effect)
    started = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    callback = make_callback(recheck_steps=2)
    make_trainer(tmp_path / "still", tokenizer, callback, model=started, max_steps=4, save_steps=100,
                 learning_rate=0.0).train()
    assert [r["shift_total"] for r in callback.history] == [0.0, 0.0]
    assert all(r["shifted_latents"] == [] and r["overlap_with_forecast"] == 0 for r in callback.history)
    # a base weight trains beside the adapters: its change is part of the shift (was cancelled out)
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.model.norm.weight.requires_grad_(True)
    callback = make_callback()
    make_trainer(tmp_path / "norm", tokenizer, callback, model=model, max_steps=2, save_steps=2,
                 learning_rate=5e-2).train()
    assert callback.monitor.base_residuals is not None and callback.history[-1]["shift_total"] > 0


@pytest.mark.parametrize("method", ["lookahead", "first_order"])
def test_run_level_term_at_train_start_joins_the_forecast_and_leaves_the_run_unchanged(tmp_path, tokenizer, method):
    from sts_callback.scoring.calibration import Calibration

    plain = make_trainer(tmp_path / "plain", tokenizer, make_callback(), max_steps=4, save_steps=100)
    plain.train()
    # level + pattern: the level from the training data's own change, the pattern from the run-level feature
    # and the domain prior (chem usually departs upwards in these runs)
    runs = [([[-0.1], [0.0], [0.2 + own]], [0.01 - 0.5 * own, 0.02 - 0.5 * own, 0.05 - 0.4 * own], [own], DOMAINS)
            for own in (-0.3, -0.1, 0.0, -0.2)]
    calibration = Calibration.fit_level_pattern(runs, [method], [f"{method}_own"], domain_prior=True)
    assert calibration.features == [method, "domain_prior"] and calibration.domain_prior["chem"] > 0
    callback = make_callback(run_level=method, calibration=calibration)
    trainer = make_trainer(tmp_path / "level", tokenizer, callback, max_steps=4, save_steps=100)
    trainer.train()
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(trainer) == losses(plain)  # weights, optimizer state and RNG were put back exactly
    level = callback.session.run_level
    assert level["method"] == method and level["steps"] == 3 and set(level["change"]) == set(DOMAINS)
    assert level["change"]["law"] < 0  # a run on law texts: law's held-out loss falls first
    assert all(callback.forecast.domains[d].scores[method] == level["change"][d] for d in DOMAINS)
    saved = json.loads((tmp_path / "level" / "run" / "sts" / "forecast.json").read_text())
    assert saved["settings"]["run_level"]["change"] == level["change"]
    own = level["own_change"]
    assert own < 0  # the run's own texts improve first
    mean = sum(level["change"].values()) / len(DOMAINS)
    prior_mean = sum(calibration.domain_prior[d] for d in DOMAINS) / len(DOMAINS)
    for name in DOMAINS:  # the calibration applied: its level from own_change, its pattern from the centred terms
        expected = (calibration.intercept + calibration.source_coef[0] * own
                    + calibration.coef[0] * (level["change"][name] - mean) / calibration.scale[0]
                    + calibration.coef[1] * (calibration.domain_prior[name] - prior_mean) / calibration.scale[1])
        assert callback.predicted[name]["mean"] == pytest.approx(expected, rel=1e-9)
    assert {"lookahead": "lookahead", "first_order": "1st-order"}[method] in callback.forecast.table(view="scores")
    # in one log call at train start (a tracker that counts its own steps by calls keeps the trainer's)
    step0 = [e for e in trainer.state.log_history if any(k.startswith("sts/") for k in e) and e["step"] == 0]
    assert len(step0) == 1 and {"sts/run_level/law", "sts/forecast/law", "sts/predicted/law"} <= set(step0[0])


def test_a_compressed_run_at_train_start_takes_a_quarter_of_the_steps_holding_the_schedules_area(tmp_path,
                                                                                                   tokenizer):
    import torch
    from transformers import get_scheduler

    from sts_callback.scoring.calibration import Calibration

    schedule = dict(max_steps=8, save_steps=100, lr_scheduler_type="cosine", warmup_steps=2)
    plain = make_trainer(tmp_path / "plain", tokenizer, make_callback(), **schedule)
    plain.train()
    callback = make_callback(run_level="compressed")
    trainer = make_trainer(tmp_path / "compressed", tokenizer, callback, **schedule)
    trainer.train()
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(trainer) == losses(plain)  # the compressed steps were put back exactly
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=8)
    area = 0.0
    for _ in range(8):
        area += optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    level = callback.session.run_level
    assert level["method"] == "compressed" and level["steps"] == 2 and level["run_share"] == 0.25
    assert level["learning_rates"][0] == pytest.approx(area / 2)  # 2 steps hold the 8-step schedule's area
    assert all(callback.forecast.domains[d].scores["compressed"] == level["change"][d] for d in DOMAINS)
    assert "compressed" in callback.forecast.table(view="scores")
    # `sts calibrate --runs` on runs like it keeps their share of the steps as the feature's scale
    import shutil

    from sts_callback.core.atomic import read_json_lines

    runs = []
    for i, own in enumerate((-0.3, -0.1, 0.0, -0.2)):
        run = tmp_path / f"run{i}"
        shutil.copytree(tmp_path / "compressed" / "run", run)
        forecast = json.loads((run / "sts" / "forecast.json").read_text())
        forecast["settings"]["run_level"]["own_change"] = own
        forecast["settings"]["run_level"]["run_share"] = 0.25 + 0.01 * i
        (run / "sts" / "forecast.json").write_text(json.dumps(forecast))
        history, _ = read_json_lines(run / "sts" / "history.jsonl")
        history[-1]["loss_delta"] = {"law": 0.03 - 0.5 * own + 0.001 * i, "food": 0.01 - 0.5 * own,
                                     "chem": -0.01 - 0.5 * own - 0.001 * i}
        (run / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        runs.append(run)
    fitted = Calibration.from_runs(runs, features=["compressed"])
    assert fitted.source_features == ["compressed_own"] and fitted.fitted_run_level_share == pytest.approx(0.265)
    assert "run_level_steps" not in fitted.fitted_on["scope"]  # the steps differ with the run's length
    forecast["settings"]["run_level"]["run_share"] = 0.5
    (runs[-1] / "sts" / "forecast.json").write_text(json.dumps(forecast))
    with pytest.raises(STSInputError, match="different shares of their runs' steps"):
        Calibration.from_runs(runs, features=["compressed"])
    # a line from the compressed run's changes to the final ones, fitted on runs at a quarter of their steps
    calibration = Calibration.fit([[-0.2], [0.0], [0.1], [0.3]], [-0.05, 0.0, 0.02, 0.07], ["compressed"],
                                  fitted_on={"scope": {"run_level_share": 0.25}})
    assert calibration.fitted_run_level_share == 0.25
    applied = make_callback(run_level="compressed", calibration=calibration)
    make_trainer(tmp_path / "applied", tokenizer, applied, **schedule).train()
    change = applied.session.run_level["change"]
    for name in DOMAINS:
        expected = calibration.intercept + calibration.coef[0] * (change[name] - calibration.center[0]) / \
            calibration.scale[0]
        assert applied.predicted[name]["mean"] == pytest.approx(expected, rel=1e-9)
    # half of the run is not what the line was fitted on: refused at train start, with the fix
    with pytest.raises(STSConfigError, match="took 25% of their runs' steps; this one's 4 of 8 steps is 50%.*"
                                             "Leave run_level_steps unset"):
        make_trainer(tmp_path / "half", tokenizer, make_callback(run_level="compressed", run_level_steps=4,
                                                                 calibration=calibration), **schedule).train()
    with pytest.raises(STSConfigError, match="pass run_level='compressed'"):
        make_callback(run_level="lookahead", calibration=calibration)


class RecordingTrainer(Trainer):
    """Records the input ids of every micro-batch the run trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_on = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_on.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("arguments", [{}, {"gradient_accumulation_steps": 2},
                                       {"train_sampling_strategy": "sequential", "data_seed": 3}])
def test_a_compressed_run_trains_on_the_runs_own_first_batches(tmp_path, tokenizer, monkeypatch, arguments):
    """The compressed run stands for the run's first quarter: its micro-batches are the ones the run then trains
    on, in the same order (a 20-text set: 5 batches an epoch, so the quarter runs into the second epoch), and
    reading them changed nothing of the run."""
    import torch

    from sts_callback.integrations import trainer_run_level

    given = []
    real = trainer_run_level.estimate_run_level

    def spying(model, optimizer, batches, *args, **kwargs):
        given.extend(b["input_ids"].clone() for b in batches)
        return real(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(trainer_run_level, "estimate_run_level", spying)
    schedule = dict(max_steps=24 // arguments.get("gradient_accumulation_steps", 1), save_steps=100,
                    lr_scheduler_type="cosine", **arguments)
    texts = domain_texts("law", 20)

    def trainer(folder, callback):
        made = make_trainer(tmp_path / folder, tokenizer, callback, texts=texts, **schedule)
        return RecordingTrainer(model=made.model, args=made.args, train_dataset=made.train_dataset,
                                data_collator=made.data_collator, processing_class=tokenizer,
                                callbacks=[callback])

    plain = trainer("plain", make_callback())
    plain.train()
    callback = make_callback(run_level="compressed")
    run = trainer("compressed", callback)
    run.train()
    assert callback.session.run_level["batches"] == "run"
    assert len(given) == 6 and len(run.trained_on) >= 6
    for compressed, trained in zip(given, run.trained_on):
        assert torch.equal(compressed, trained)
    assert len(run.trained_on) == len(plain.trained_on)
    assert all(torch.equal(a, b) for a, b in zip(run.trained_on, plain.trained_on))


def test_a_run_whose_order_comes_from_the_process_rng_gets_a_seeded_draw_and_is_left_as_it_was(tmp_path, tokenizer):
    """``group_by_length``'s sampler draws from torch's global generator after the data loader has drawn its own
    seed: its order cannot be known beforehand, so the compressed run trains on a seeded draw, says so, and the
    run trains as it would have."""
    schedule = dict(max_steps=8, save_steps=100, train_sampling_strategy="group_by_length")
    plain = make_trainer(tmp_path / "plain", tokenizer, make_callback(), **schedule)
    plain.train()
    callback = make_callback(run_level="compressed")
    trainer = make_trainer(tmp_path / "compressed", tokenizer, callback, **schedule)
    trainer.train()
    assert callback.session.run_level["batches"] == "draw"
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(trainer) == losses(plain)


def test_a_compressed_run_holds_the_area_the_run_will_train_at_whatever_its_peak(tmp_path, tokenizer):
    """A schedule that never reaches the optimizer's base rate (a LambdaLR below 1, a warm-up longer than the run):
    the compressed steps hold the run's own area, not the base rate's."""
    def area_held(name, **overrides):
        callback = make_callback(run_level="compressed")
        trainer = make_trainer(tmp_path / name, tokenizer, callback, max_steps=8, save_steps=100, **overrides)
        trainer.train()
        rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
        level = callback.session.run_level
        return level["learning_rates"][0] * level["steps"], sum(rates)

    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    held, trained = area_held("lambda", model=model, optimizers=(
        optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)))
    assert trained == pytest.approx(8e-3) and held == pytest.approx(trained)
    held, trained = area_held("warmup", lr_scheduler_type="linear", warmup_steps=24)
    assert held == pytest.approx(trained)


def test_a_compressed_run_is_refused_with_the_reason_when_the_rates_are_set_by_metrics(tmp_path, tokenizer):
    callback = make_callback(run_level="compressed")
    trainer = make_trainer(tmp_path / "plateau", tokenizer, callback, max_steps=4, save_steps=100,
                           lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8))
    with pytest.raises(STSConfigError, match="sets them from metrics.*run_level='lookahead'"):
        trainer.train()


def test_run_level_steps_beyond_the_run_are_refused_for_a_compressed_run_and_warned_for_a_lookahead(tmp_path,
                                                                                                   tokenizer):
    """A compressed run as long as the run compresses nothing (and costs a second run): refused at train start,
    before any step, with the fix; a lookahead longer than the run trains with a warning."""
    callback = make_callback(run_level="compressed", run_level_steps=8)
    trainer = make_trainer(tmp_path / "compressed", tokenizer, callback, max_steps=8, save_steps=100)
    with pytest.raises(STSConfigError, match="run_level_steps=8 is not fewer than this run's 8 steps.*"
                                             "Leave run_level_steps unset \(a quarter of the run: 2\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    lookahead = make_callback(run_level="lookahead", run_level_steps=5)
    trainer = make_trainer(tmp_path / "lookahead", tokenizer, lookahead, max_steps=4, save_steps=100)
    with pytest.warns(STSDataWarning, match="run_level_steps=5 is more than this run's 4 steps"):
        trainer.train()
    assert lookahead.session.run_level["steps"] == 5 and trainer.state.global_step == 4


def test_a_run_too_short_for_the_calibrations_share_trains_with_a_warning(tmp_path, tokenizer):
    callback = make_callback(run_level="compressed", calibration="gemma3-270m-lora-compressed")
    trainer = make_trainer(tmp_path / "short", tokenizer, callback, max_steps=6, save_steps=100)
    with pytest.warns(STSDataWarning, match="cannot hold the calibration's share of compressed steps \\(25%\\).*"
                                         "takes 2 \\(33%\\)"):
        trainer.train()
    assert callback.session.run_level["steps"] == 2 and trainer.state.global_step == 6


def test_run_level_measures_only_the_own_change_when_the_calibration_needs_nothing_else(tmp_path, tokenizer):
    from sts_callback.scoring.calibration import Calibration

    every = make_callback(run_level="lookahead")  # no calibration: each domain's change is logged
    make_trainer(tmp_path / "every", tokenizer, every, max_steps=2, save_steps=100).train()
    # level from the training data's own change, pattern from the domain prior alone: no per-domain lookahead
    runs = [(np.zeros((3, 0)), [0.01 - 0.5 * own, 0.02 - 0.5 * own, 0.05 - 0.4 * own], [own], DOMAINS)
            for own in (-0.3, -0.1, 0.0, -0.2)]
    calibration = Calibration.fit_level_pattern(runs, [], ["lookahead_own"], domain_prior=True)
    own_only = make_callback(run_level="lookahead", calibration=calibration)
    trainer = make_trainer(tmp_path / "own", tokenizer, own_only, max_steps=2, save_steps=100)
    trainer.train()
    level, full = own_only.session.run_level, every.session.run_level
    assert set(full["change"]) == set(DOMAINS) and level["change"] == {}  # the target domains not measured
    assert level["own_change"] == pytest.approx(full["own_change"], abs=1e-6)  # the same steps, the same texts
    probe_tokens = sum(sum(flags) for _, flags in own_only.monitor.probe)
    assert level["own_tokens"] == full["own_tokens"] and 0 < level["own_tokens"] < probe_tokens  # loss_tokens' worth
    assert not any("sts/run_level/law" in e for e in trainer.state.log_history)
    prior_mean = sum(calibration.domain_prior[d] for d in DOMAINS) / len(DOMAINS)
    for name in DOMAINS:
        expected = (calibration.intercept + calibration.source_coef[0] * level["own_change"]
                    + calibration.coef[0] * (calibration.domain_prior[name] - prior_mean) / calibration.scale[0])
        assert own_only.predicted[name]["mean"] == pytest.approx(expected, rel=1e-9)


def test_sts_calibrate_runs_fits_level_pattern_and_prior_on_training_runs(tmp_path, tokenizer, capsys):
    import shutil

    from sts_callback.core.atomic import read_json_lines
    from sts_callback.scoring.calibration import Calibration
    from sts_callback.tools.cli import main

    # the in-context NLL change too (a budget set: computed without a calibration asking for it)
    callback = make_callback(run_level="lookahead", recheck_steps=2, config={**FAST, "icl_loss_tokens": 48})
    make_trainer(tmp_path / "real", tokenizer, callback, max_steps=4, save_steps=100).train()
    real = tmp_path / "real" / "run"
    # three more runs in the same format, their own change and final changes planted: level 0.01 - 0.5 * own,
    # law usually +2 points above the runs' mean
    runs = []
    for i, own in enumerate((-0.3, -0.1, 0.0, -0.2)):
        run = tmp_path / f"run{i}"
        shutil.copytree(real, run)
        forecast = json.loads((run / "sts" / "forecast.json").read_text())
        forecast["settings"]["run_level"]["own_change"] = own
        (run / "sts" / "forecast.json").write_text(json.dumps(forecast))
        history, _ = read_json_lines(run / "sts" / "history.jsonl")
        history[-1]["loss_delta"] = {"law": 0.01 - 0.5 * own + 0.02 + 0.001 * i, "food": 0.01 - 0.5 * own - 0.01,
                                     "chem": 0.01 - 0.5 * own - 0.01 - 0.001 * i}
        (run / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        runs.append(str(run))
    out = tmp_path / "calibration.json"
    forecast_file = Path(runs[0]) / "sts" / "forecast.json"
    for inside in (forecast_file, Path(runs[0]) / "sts" / "history.jsonl", Path(runs[1]) / "sts" / "new.json"):
        before = forecast_file.read_bytes()  # a run's files are the calibration's inputs: never written over
        assert main(["calibrate", "--runs", *runs, "--features", "lookahead", "--out", str(inside)]) == 2
        assert "the STS folder of the training run" in capsys.readouterr().err and forecast_file.read_bytes() == before
    assert main(["calibrate", "--runs", *runs, "--features", "lookahead", "--out", str(out)]) == 0
    assert "level from lookahead_own" in capsys.readouterr().out
    calibration = Calibration.load(out)
    assert calibration.source_features == ["lookahead_own"] and calibration.features == ["lookahead", "domain_prior"]
    assert calibration.source_coef[0] == pytest.approx(-0.5, abs=1e-6)
    assert calibration.domain_prior["law"] - calibration.domain_prior["food"] == pytest.approx(0.03, abs=0.002)
    # the level holds for the runs' lookahead steps (the default 3): recorded, and another number refused
    assert calibration.fitted_on["scope"]["run_level_steps"] == 3
    with pytest.raises(STSConfigError, match="after 3 lookahead step"):
        make_callback(run_level="lookahead", run_level_steps=2, calibration=str(out))
    # applied by the callback to a new run: the forecast predicts law above the others
    applied = make_callback(run_level="lookahead", calibration=str(out))
    make_trainer(tmp_path / "applied", tokenizer, applied, max_steps=2, save_steps=100).train()
    assert applied.predicted["law"]["mean"] > max(applied.predicted["food"]["mean"], applied.predicted["chem"]["mean"])
    # the domain prior alone (no forecast score in the pattern): the same level, law's usual departure
    prior_only = tmp_path / "prior_only.json"
    assert main(["calibrate", "--runs", *runs, "--prior-only", "--out", str(prior_only)]) == 0
    calibration = Calibration.load(prior_only)
    assert calibration.features == ["domain_prior"] and calibration.source_coef[0] == pytest.approx(-0.5, abs=1e-6)
    predicted = calibration.predict_all({d: {} for d in ("law", "food", "chem")}, {"lookahead_own": -0.2})
    assert predicted["law"].mean - predicted["food"].mean == pytest.approx(0.03, abs=0.003)
    applied = make_callback(run_level="lookahead", calibration=str(prior_only))
    make_trainer(tmp_path / "applied_prior", tokenizer, applied, max_steps=2, save_steps=100).train()
    assert applied.predicted["law"]["mean"] - applied.predicted["food"]["mean"] == pytest.approx(0.03, abs=0.003)
    # the in-context NLL change as a pattern feature: fitted from the runs, then computed by the run applying it,
    # at the budget the runs measured it with
    in_context = tmp_path / "in_context.json"
    assert main(["calibrate", "--runs", *runs, "--features", "icl_loss_change", "--out", str(in_context)]) == 0
    calibration = Calibration.load(in_context)
    assert calibration.features == ["icl_loss_change", "domain_prior"] and calibration.fitted_on["icl_loss"] == {
        "tokens": 48, "n_demonstrations": FAST.get("n_demonstrations", 2), "max_query_tokens": 256,
        "max_demonstration_tokens": 384}  # the runs' settings: a run applying it is warned if it measures otherwise
    applied = make_callback(run_level="lookahead", calibration=str(in_context))
    assert applied.config.icl_loss_tokens == 48
    make_trainer(tmp_path / "applied_icl", tokenizer, applied, max_steps=2, save_steps=100).train()
    assert all(applied.forecast.domains[d].scores["icl_loss_change"] is not None for d in DOMAINS)
    assert set(applied.predicted) == set(DOMAINS)
    assert main(["calibrate", "--runs", *runs, "--prior-only", "--features", "lookahead", "--out",
                 str(tmp_path / "both.json")]) == 2
    assert "--prior-only" in capsys.readouterr().err
    # the pattern over each run's spread (RL runs of very different scale): the same departures here, where the
    # runs' spreads are alike
    per_run = tmp_path / "per_run.json"
    assert main(["calibrate", "--runs", *runs, "--prior-only", "--pattern-scale", "run", "--out", str(per_run)]) == 0
    calibration = Calibration.load(per_run)
    assert calibration.pattern_scale == "run"
    predicted = calibration.predict_all({d: {} for d in ("law", "food", "chem")}, {"lookahead_own": -0.2})
    assert predicted["law"].mean - predicted["food"].mean == pytest.approx(0.03, abs=0.005)
    assert main(["calibrate", str(real), "--pattern-scale", "run", "--out", str(tmp_path / "v.json")]) == 2
    assert "use it with --runs" in capsys.readouterr().err
    # runs whose lookaheads took different numbers of steps have no one level
    other_steps = tmp_path / "other_steps"
    shutil.copytree(runs[0], other_steps)
    forecast = json.loads((other_steps / "sts" / "forecast.json").read_text())
    forecast["settings"]["run_level"]["steps"] = 2
    (other_steps / "sts" / "forecast.json").write_text(json.dumps(forecast))
    assert main(["calibrate", "--runs", *runs[1:], str(other_steps), "--out", str(tmp_path / "mixed.json")]) == 2
    assert "different numbers of steps ([2, 3])" in capsys.readouterr().err
    # a run without a run-level term among them: the level falls back to the runs' mean, and says so
    no_level = tmp_path / "no_level"
    shutil.copytree(runs[0], no_level)
    forecast["settings"]["run_level"] = None
    (no_level / "sts" / "forecast.json").write_text(json.dumps(forecast))
    with pytest.warns(STSDataWarning, match=f"{no_level}: no run-level term.*the runs' mean change"):
        mixed = Calibration.from_runs([*runs[1:], str(no_level)], features=[])
    assert mixed.source_features == []
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--runs", str(real), str(tmp_path / "empty"), "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: no forecast.json" in err and "trained with STSCallback" in err


def test_run_level_settings_are_checked_at_construction():
    from sts_callback.scoring.calibration import Calibration

    with pytest.raises(STSConfigError, match="run_level='sideways'"):
        make_callback(run_level="sideways")
    with pytest.raises(STSConfigError, match="run_level_steps must be an integer"):
        make_callback(run_level="lookahead", run_level_steps=0)
    with pytest.raises(STSConfigError, match="pass run_level='lookahead'"):
        make_callback(calibration=Calibration.fit([[0.0], [1.0], [2.0]], [0, 1, 2], ["lookahead"]))
    level_from_own = Calibration.fit_level_pattern(
        [([[0.0], [1.0]], [own, 2 * own], [own]) for own in (0.1, 0.2, 0.4)], ["sts_act"], ["first_order_own"])
    with pytest.raises(STSConfigError, match="pass run_level='first_order'"):
        make_callback(calibration=level_from_own)
    # a level fitted on a 2-step lookahead needs the same number of steps (the change grows with them): unset, the
    # callback takes the calibration's; another number is refused
    with pytest.raises(STSConfigError, match="after 2 lookahead step.*pass run_level_steps=2 or leave it unset"):
        make_callback(run_level="lookahead", run_level_steps=3, calibration="gemma3-270m-lora-lookahead")
    adopted = make_callback(run_level="lookahead", calibration="gemma3-270m-lora-lookahead")
    assert adopted.run_level_steps == 2 and adopted._export_args["run_level_steps"] == 2
    # the built-in compressed run's calibration: its run-level term named, its share of the run adopted
    with pytest.raises(STSConfigError, match="pass run_level='compressed'"):
        make_callback(run_level="lookahead", calibration="gemma3-270m-lora-compressed")
    compressed = make_callback(run_level="compressed", calibration="gemma3-270m-lora-compressed")
    assert compressed.run_level_share == 0.25 and compressed.run_level_steps is None  # a quarter, at train start
    assert make_callback(run_level="lookahead", run_level_steps=2, calibration="gemma3-270m-lora-lookahead")
    assert make_callback(run_level="lookahead").run_level_steps == 3  # no calibration: the default
    # the built-in that reads the in-context NLL change: the forecast computes it with the budget it was fitted on
    icl = make_callback(run_level="lookahead", calibration="gemma3-270m-lora-lookahead-icl")
    assert icl.run_level_steps == 1 and icl.config.icl_loss_tokens == 384
    with pytest.raises(STSConfigError, match="icl_loss_tokens=0"):
        make_callback(run_level="lookahead", calibration="gemma3-270m-lora-lookahead-icl",
                      config={**FAST, "icl_loss_tokens": 0})


def test_overhead_budget_keeps_the_protected_domain_and_defers_the_others(tmp_path, tokenizer):
    # a tiny model trains in milliseconds: 1% of that affords no unprotected domain, never the protected one
    class SlowLogging(TrainerCallback):  # work outside the steps (another callback's logging): not training time
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.3)

    class StepClock(TrainerCallback):  # first in line: each step alone, from its begin to its end
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            StepClock.seconds += time.perf_counter() - self.began

    callback = make_callback(protected=["food"], tolerance=10.0, overhead_budget=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[SlowLogging()])
        trainer.callback_handler.callbacks.insert(0, StepClock())
        trainer.train()
    # the budget's training time is the steps' own (up to the last re-check): not the other callback's 1.8 s
    assert 0 < callback.history[-1]["overhead"]["train_seconds"] <= StepClock.seconds + 0.05
    assert [r["step"] for r in callback.history] == [2, 4, 6]
    for record in callback.history:
        assert set(record["loss_delta"]) == {"food"}
        assert sorted(record["overhead"]["skipped"]) == ["chem", "law"] and record["overhead"]["budget"] == 0.01
    over = [w for w in caught if "above overhead_budget=0.01" in str(w.message)]
    assert len(over) == 1 and "raise recheck_steps" in str(over[0].message)
    report = (tmp_path / "run" / "sts" / "report.md").read_text()
    assert "Re-checks took" in report and "so far" not in report  # the run has ended
    # the warnings say what the budget left out of every re-check, not "No warnings."
    assert "law, chem: no re-check measured their held-out loss (the overhead budget kept them waiting" in report
    assert "No warnings." not in report


def test_a_run_stopped_before_max_steps_ends_there_without_a_projection(tmp_path, tokenizer):
    """Another callback stops training at step 3 of 8: the train-end re-check is the run's end result, so it
    projects nothing to a step 8 that never comes, and the report says the run ended early."""
    class StopAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    callback = make_callback(recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=8, extra_callbacks=[StopAtThree()])
    trainer.train()
    assert trainer.state.global_step == 3
    first, last = callback.history
    assert first["step"] == 2 and "early_forecast" in first and "ended_early" not in first
    assert last["step"] == 3 and last["ended_early"] == {"max_steps": 8}
    assert "early_forecast" not in last and not last.get("early_stop")
    [logged] = [e for e in trainer.state.log_history if e["step"] == 3 and "sts/recheck_stats/seconds" in e]
    assert not any(key.startswith("sts/early_forecast/") for key in logged)
    md = (tmp_path / "run" / "sts" / "report.md").read_text()
    page = (tmp_path / "run" / "sts" / "report.html").read_text()
    for text in (md, page):
        assert "Training ended at step 3, before max_steps=8" in text
    assert "Projected at the end of training" not in md


def test_not_predicted_leaves_a_domain_out_of_the_calibrated_prediction(tmp_path, tokenizer):
    """`sts forecast --not-predicted` and apply_calibration(exclude=) had no counterpart in the callback: the
    training data's own domain among the targets was predicted, and a centred calibration centred over it."""
    from sts_callback.scoring.calibration import builtin_calibration

    with pytest.raises(STSConfigError, match="not_predicted only applies with a calibration"):
        make_callback(not_predicted=["law"])
    with pytest.raises(STSConfigError, match="not_predicted must be a list"):
        make_callback(not_predicted="law", calibration="gemma3-270m-lora")
    callback = make_callback(not_predicted=["law"], calibration="gemma3-270m-lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model is outside the built-in calibration's scope
        make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=100).train()
    assert set(callback.predicted) == {"food", "chem"} and "law" not in callback.forecast.predictions
    expected = Forecast.from_dict(callback.forecast.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected.apply_calibration(builtin_calibration("gemma3-270m-lora"), exclude=["law"])
    assert {n: p["mean"] for n, p in expected.predictions.items()} == {
        n: p["mean"] for n, p in callback.predicted.items()}
    assert callback.state()["args"]["not_predicted"] == ["law"]  # restored with the callback on resume
    with pytest.raises(STSConfigError, match=r"not_predicted=\['lawn'\] are not among the target domains"):
        make_callback(not_predicted=["lawn"], calibration="gemma3-270m-lora")  # known when built: said then
    with pytest.warns(STSDataWarning, match=r"protected domain\(s\) \['food'\] are in not_predicted"):
        make_callback(not_predicted=["food"], protected=["food"], calibration="gemma3-270m-lora")
    with pytest.raises(STSConfigError, match="holds every target domain, so the calibration predicts none"):
        make_callback(not_predicted=list(DOMAINS), calibration="gemma3-270m-lora")  # the table fell back unsaid
    files = []  # targets as paths: the domains' names are known at train start, and refused there
    for name in DOMAINS:
        (tmp_path / f"{name}.txt").write_text("\n".join(domain_texts(name, 30)))
        files.append(str(tmp_path / f"{name}.txt"))
    callback = make_callback(target_domains=files, not_predicted=list(DOMAINS), calibration="gemma3-270m-lora")
    trainer = make_trainer(tmp_path / "paths", tokenizer, callback)
    with pytest.raises(STSConfigError, match="holds every target domain"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_negative_transfer_warning_is_importable_from_the_package_root():
    """The README tells users to turn it into an error with warnings.filterwarnings(..., category=...)."""
    import sts_callback

    assert sts_callback.STSNegativeTransferWarning is STSNegativeTransferWarning
    assert "STSNegativeTransferWarning" in sts_callback.__all__


def test_a_calibration_that_needs_two_run_level_terms_is_refused_at_construction(tmp_path):
    """A callback run computes one run-level term: the other would be missing at train start, after the first ran
    (the benchmark calibration reads both)."""
    calibration = Path(__file__).parents[1] / "benchmarks" / "transfer" / "calibration_gemma3_270m.json"
    with pytest.raises(STSConfigError, match="one run-level term"):
        make_callback(calibration=str(calibration), run_level="lookahead")


def test_a_calibration_needing_stsicl_with_compute_icl_off_is_refused_at_construction():
    with pytest.raises(STSConfigError, match=r"uses \['sts_icl'\], but STSConfig\(compute_icl=False\)"):
        make_callback(calibration="gemma3-270m-lora", config={**FAST, "compute_icl": False, "ranking": "sts_act"})


def test_a_one_text_domain_goes_unpredicted_under_a_calibration_and_the_run_goes_on(tmp_path, tokenizer):
    """Its STS_icl cannot be computed (no other text to show in context): the calibration predicts the others."""
    targets = {d: domain_texts(d, 30) for d in DOMAINS[:2]} | {"one": domain_texts(DOMAINS[2], 1, length=40)}
    callback = make_callback(target_domains=targets, calibration="gemma3-270m-lora")
    with pytest.warns(STSDataWarning, match="one text"):
        make_trainer(tmp_path, tokenizer, callback, max_steps=2).train()
    assert set(callback.predicted) == set(DOMAINS[:2])


def test_a_max_length_beyond_the_models_positions_is_refused_naming_both():
    from sts_callback.pipelines.forecast import prompt_builder

    with pytest.raises(STSConfigError, match="max_length=1024 exceeds the model's 512 positions"):
        prompt_builder(make_model("llama"), make_tokenizer(), STSConfig(max_length=1024))


def test_a_held_out_set_of_one_sequence_is_warned_about_and_its_interval_is_null(tmp_path, tokenizer):
    """loss_tokens too small for two sequences: the change had the interval (-inf, inf), written as bare
    -Infinity / Infinity (no strict JSON), with no word said."""
    import json
    import warnings

    from sts_callback import STSDataWarning

    callback = make_callback(loss_tokens=1, recheck_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, tokenizer, callback, max_steps=3).train()
    said = [str(w.message) for w in caught if issubclass(w.category, STSDataWarning)]
    assert any("measured on one sequence (loss_tokens=1)" in m and "Raise loss_tokens" in m for m in said)

    def strict(name):
        raise AssertionError(f"{name} in history.jsonl: not strict JSON")

    lines = (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert records and all(bounds == [None, None] for r in records for bounds in r["loss_delta_ci"].values())


@pytest.mark.parametrize("sae", [{"path": "/missing/sae"}, {"path": ""}, {"release": "gemma-scope"}])
def test_an_sae_mapping_that_names_nothing_loadable_is_refused_at_construction(sae):
    """A plain path was checked when the callback was built; the same given as {"path": ...} (or a release without
    its sae_id) failed only at train start."""
    from sts_callback import STSInputError

    with pytest.raises(STSInputError, match="not a folder|path is empty|needs 'release' and 'sae_id'"):
        make_callback(sae=sae)
