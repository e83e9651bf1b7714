"""STSCallback on real TRL trainers (SFT, DPO, GRPO, distillation) with tiny models."""

import json

import pytest
import torch
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSDataWarning
from sts_callback.integrations.callback import STSCallback

DOMAINS = ("law", "food")
FAST = dict(n_shifted=8, shift_tokens=120, domain_tokens=80, n_domain_demonstrations=2)
COMMON = dict(max_steps=4, save_steps=2, logging_steps=1, use_cpu=True, report_to=[], per_device_train_batch_size=4,
              learning_rate=1e-2, save_strategy="steps")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def callback(**overrides):
    values = dict(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                  target_domains={d: domain_texts(d, 20) for d in DOMAINS}, config=FAST,
                  recheck_tokens=100, loss_tokens=80)
    values.update(overrides)
    return STSCallback(**values)


def check_run(trainer, cb, out, forecast=True):
    assert (out / "sts" / "forecast.json").exists() == forecast
    if forecast:
        assert any("sts/forecast/law" in e for e in trainer.state.log_history)
    steps = [json.loads(line)["step"] for line in (out / "sts" / "history.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert all("error" not in r for r in cb.history), cb.history
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]


def sft_on_chats(tmp_path, model, processing_class) -> None:
    """An SFT run on chat data with the callback: checked, and its forecast made from the chats."""
    from trl import SFTConfig, SFTTrainer

    texts = domain_texts("law", 40)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                                           for a, b in zip(texts, texts[1:])]})
    cb = callback()
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
                         train_dataset=data, processing_class=processing_class, callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path)
    assert cb.forecast.shift_queries > 0


def test_sft_trainer_with_chat_data(tmp_path, tokenizer):
    sft_on_chats(tmp_path, make_model("llama"), tokenizer)


def test_sft_trainer_with_lora_prompt_completion(tmp_path, tokenizer):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    texts = domain_texts("law", 40)
    data = Dataset.from_dict({"prompt": texts, "completion": texts[1:] + texts[:1]})
    cb = callback()
    trainer = SFTTrainer(model=make_model("llama"), args=SFTConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
                         train_dataset=data, processing_class=tokenizer, callbacks=[cb],
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    check_run(trainer, cb, tmp_path)
    # only the adapters train: their disabled-adapter residuals are kept from train start (one forward a re-check)
    assert cb.monitor.base_residuals is not None and cb.history[-1]["shift_total"] > 0


def dpo_run(tmp_path, tokenizer, training=None, stream=False, **overrides):
    from trl import DPOConfig, DPOTrainer

    texts = domain_texts("law", 40)
    data = Dataset.from_dict({"prompt": texts, "chosen": texts[1:] + texts[:1], "rejected": domain_texts("food", 40)})
    data = data.to_iterable_dataset() if stream else data
    cb = callback(**overrides)
    trainer = DPOTrainer(model=make_model("llama"), ref_model=make_model("llama"),
                         args=DPOConfig(output_dir=str(tmp_path), max_length=64, **{**COMMON, **(training or {})}),
                         train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path)
    return cb


def test_dpo_trainer_forecasts_chosen_minus_rejected(tmp_path, tokenizer):
    cb = dpo_run(tmp_path, tokenizer)
    assert cb.forecast.settings["shift"] == "chosen_vs_rejected" and cb.forecast.settings["preference_pairs"] > 0
    saved = json.loads((tmp_path / "sts" / "forecast.json").read_text())
    assert saved["settings"]["shift"] == "chosen_vs_rejected"


def test_dpo_on_a_streamed_train_set_forecasts_chosen_minus_rejected(tmp_path, tokenizer):
    """TRL's mapped stream lists no column names: its pairs were read as SFT data (the in-context shift, silently),
    and shift="chosen_vs_rejected" was refused as lacking the columns every record has."""
    streamed = dpo_run(tmp_path / "stream", tokenizer, stream=True, shift="chosen_vs_rejected")
    assert dpo_run(tmp_path / "auto", tokenizer, stream=True).forecast.settings["shift"] == "chosen_vs_rejected"
    mapped = dpo_run(tmp_path / "map", tokenizer)
    assert streamed.forecast.shifted_latents == mapped.forecast.shifted_latents
    assert dict(streamed.forecast.ranked()) == pytest.approx(dict(mapped.forecast.ranked()), rel=1e-6)


def test_run_level_term_refuses_a_preference_trainer_at_train_start(tmp_path, tokenizer):
    from sts_callback import STSConfigError

    with pytest.raises(STSConfigError, match="preference and RL losses are not supported"):
        dpo_run(tmp_path, tokenizer, run_level="lookahead")


def test_a_calibration_reading_the_in_context_change_is_refused_for_a_dpo_run_before_its_forecast(tmp_path,
                                                                                                   tokenizer):
    import numpy as np

    from sts_callback import STSConfigError
    from sts_callback.scoring.calibration import Calibration

    runs = [(np.array([[0.1 * k], [0.3], [-0.2]]), [0.01 * k, 0.02, 0.05], [], ["law", "food", "chem"])
            for k in range(5)]
    calibration = Calibration.fit_level_pattern(runs, ["icl_loss_change"], [], domain_prior=True)
    with pytest.raises(STSConfigError, match="a chosen_vs_rejected forecast does not have"):
        dpo_run(tmp_path, tokenizer, calibration=calibration)
    assert not (tmp_path / "sts" / "forecast.json").exists()


def test_dpo_trainer_sft_style_shift_on_request(tmp_path, tokenizer):
    cb = dpo_run(tmp_path, tokenizer, shift="in_context")  # the chosen completions as demonstrations
    assert cb.forecast.settings["shift"] == "in_context" and cb.forecast.shift_queries > 0


def test_sts_calibrate_on_dpo_runs_applies_to_the_next_dpo_run(tmp_path, tokenizer):
    # A team's DPO runs with the callback, at learning rates that move the domains by different amounts, calibrate
    # the next DPO run's forecast: the pattern over each run's spread, the level the runs' mean change.
    import numpy as np

    from sts_callback.scoring.calibration import Calibration
    from sts_callback.tools.cli import main

    runs = [tmp_path / f"dpo-lr{lr}" for lr in (2e-3, 1e-2, 3e-2)]
    gaps = []
    for run, lr in zip(runs, (2e-3, 1e-2, 3e-2)):
        cb = dpo_run(run, tokenizer, training={"learning_rate": lr})
        gaps.append(cb.history[-1]["loss_delta"]["law"] - cb.history[-1]["loss_delta"]["food"])
    out = tmp_path / "dpo-calibration.json"
    assert main(["calibrate", "--runs", *map(str, runs), "--prior-only", "--pattern-scale", "run",
                 "--out", str(out)]) == 0
    calibration = Calibration.load(out)
    assert calibration.pattern_scale == "run" and calibration.fitted_on["runs"] == 3
    applied = dpo_run(tmp_path / "applied", tokenizer, calibration=str(out))
    predicted = {d: applied.predicted[d]["mean"] for d in DOMAINS}
    assert np.mean(list(predicted.values())) == pytest.approx(calibration.intercept, abs=1e-9)  # the runs' level
    gap = predicted["law"] - predicted["food"]
    assert np.sign(gap) == np.sign(np.median(gaps))  # law's usual departure over the runs
    assert abs(gap) <= max(abs(g) for g in gaps)  # in the runs' units: no larger than the largest run's


def grpo_trainer(tmp_path, tokenizer, cb, reward=None):
    from trl import GRPOConfig, GRPOTrainer

    def reward_law(completions, **kwargs):  # a verifiable reward: how often the completion says a law word
        return [float(sum(word in c for word in ("court", "statute", "contract"))) for c in completions]

    data = Dataset.from_dict({"prompt": domain_texts("law", 16)})
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, max_completion_length=8, temperature=1.5,
                      **{**COMMON, "per_device_train_batch_size": 4})
    return GRPOTrainer(model=make_model("llama"), reward_funcs=reward or reward_length, args=args, train_dataset=data,
                       processing_class=tokenizer, callbacks=[cb])


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("shift", ["auto", "reward_filtered"])
def test_grpo_forecasts_from_the_policys_scored_rollouts(tmp_path, tokenizer, shift):
    cb = callback(shift=shift, config={**FAST, "rollout_prompts": 4, "rollout_generations": 4, "rollout_max_tokens": 8})
    trainer = grpo_trainer(tmp_path, tokenizer, cb)
    with pytest.warns(STSDataWarning, match="full fine-tune without a reference model"):
        trainer.train()  # beta=0, no PEFT: nothing gives new completions' base residuals
    check_run(trainer, cb, tmp_path)
    assert all("fresh_probe" not in r for r in cb.history)
    expected = "reward_weighted" if shift == "auto" else "reward_filtered"  # auto's choice under RL: weighted
    settings = cb.forecast.settings
    assert settings["shift"] == expected
    rollouts = settings["rollouts"]
    assert rollouts["reward_funcs"] == ["reward_length"] and rollouts["prompts"] == 4
    assert rollouts["num_generations"] == 4
    # the re-check probe is what the policy wrote: completions after their prompts, completion tokens counted
    prompt_texts = set(domain_texts("law", 16))
    assert cb.monitor.probe and all(sum(flags) < len(ids) for ids, flags in cb.monitor.probe)
    assert all(tokenizer.decode(ids, skip_special_tokens=True) not in prompt_texts for ids, _ in cb.monitor.probe)


@pytest.mark.parametrize("base", ["adapters", "ref_model"])
def test_grpo_rechecks_probe_the_current_policys_completions_of_fresh_prompts(tmp_path, tokenizer, base):
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from sts_callback.pipelines.rollouts import draw_prompts

    cb = callback(config={**FAST, "rollout_prompts": 4, "rollout_generations": 4, "rollout_max_tokens": 8},
                  recheck_tokens=24)
    model, extra = make_model("llama"), {}
    if base == "adapters":
        extra["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    else:  # a full fine-tune with beta > 0: GRPO loads a frozen reference copy from the policy's path
        model.save_pretrained(tmp_path / "policy")
        model = str(tmp_path / "policy")
    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, max_completion_length=8, temperature=1.5,
                      beta=0.0 if base == "adapters" else 0.1, **{**COMMON, "per_device_train_batch_size": 4})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_length, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": domain_texts("law", 16)}), callbacks=[cb],
                          **extra)
    assert (trainer.ref_model is not None) == (base == "ref_model")
    trainer.train()
    check_run(trainer, cb, tmp_path / "run")
    probes = [r["fresh_probe"] for r in cb.history]
    forecast_prompts = set(draw_prompts(16, cb.session.config))
    assert all(p["completions"] > 0 and p["tokens"] > 0 and p["mean_reward"] is not None for p in probes)
    assert all(p["sampled"] >= p["completions"] for p in probes)  # the reward is over every sampled completion
    assert all(not set(p["prompts"]) & forecast_prompts for p in probes)  # fresh: not the forecast's prompts
    assert probes[0]["prompts"] != probes[1]["prompts"]  # a new draw at each re-check
    assert all(r["timings"]["fresh_probe"] > 0 and r["shift_total"] > 0 for r in cb.history)
    assert any("sts/recheck_stats/rollout_reward" in e for e in trainer.state.log_history)
    # the last re-check's probe is the policy's completions after their prompts, kept for a resume
    prompts = [tokenizer(domain_texts("law", 16)[i])["input_ids"] for i in probes[-1]["prompts"]]
    assert all(sum(flags) < len(ids) for ids, flags in cb.monitor.probe)
    assert all(any(ids[:len(p)] == p or ids[1:len(p) + 1] == p[1:] for p in prompts) for ids, _ in cb.monitor.probe)


def grpo_lora_run(tmp_path, tokenizer, reward, prompts: int, max_steps: int):
    """A GRPO LoRA run (groups of 4 completions, the probe's of 2) with the callback re-checking every 2 steps."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    cb = callback(config={**FAST, "rollout_prompts": 4, "rollout_generations": 4, "rollout_max_tokens": 8},
                  recheck_tokens=24)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, max_completion_length=8, temperature=1.5,
                      **{**COMMON, "max_steps": max_steps})
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": domain_texts("law", prompts)}), callbacks=[cb],
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return cb, trainer


def test_grpo_rechecks_keep_their_measurement_when_a_group_reading_reward_cannot_score_the_probe(tmp_path,
                                                                                                  tokenizer):
    """The probe samples 2 completions a prompt; a reward that reads whole groups of num_generations raised there,
    and every re-check lost its loss changes for a reward that only feeds the probe's mean_reward."""
    def rank_in_group(completions, **kwargs):
        return torch.tensor([float(len(c)) for c in completions]).view(-1, 4).argsort(dim=1).flatten().tolist()

    cb, trainer = grpo_lora_run(tmp_path, tokenizer, rank_in_group, prompts=16, max_steps=4)
    with pytest.warns(STSDataWarning, match="probe's rewards at step 2 are left out.*rollout_generations=4"):
        trainer.train()
    assert [r["step"] for r in cb.history] == [2, 4]
    assert all("error" not in r and r["loss_delta"] and r["fresh_probe"]["mean_reward"] is None for r in cb.history)
    assert all("rollout_generations=4" in r["fresh_probe"]["reward_error"] for r in cb.history)


@pytest.mark.parametrize("fails_at", [{2}, {2, 4, 6}])
def test_a_reward_failing_at_a_recheck_is_left_out_of_that_recheck_and_tried_again_until_it_fails_three_in_a_row(
        tmp_path, tokenizer, fails_at):
    """A reward API timing out once at a re-check turned the probe's mean_reward off for the rest of the run."""
    failed, calls = set(), []

    def reward_api(completions, trainer_state=None, **kwargs):  # STS's re-check calls it first at its step
        calls.append(trainer_state.global_step)
        if trainer_state.global_step in fails_at - failed:
            failed.add(trainer_state.global_step)
            raise ConnectionError("reward API timed out")
        return [float(len(c)) for c in completions]

    cb, trainer = grpo_lora_run(tmp_path, tokenizer, reward_api, prompts=32, max_steps=8)
    with pytest.warns(STSDataWarning) as caught:
        trainer.train()
    said = [str(w.message) for w in caught if "probe's rewards" in str(w.message)]
    probes = {r["step"]: r["fresh_probe"] for r in cb.history}
    assert list(probes) == [2, 4, 6, 8] and all("error" not in r and r["loss_delta"] for r in cb.history)
    assert [step for step, p in probes.items() if p["mean_reward"] is None] == sorted(fails_at | ({8} if len(fails_at)
                                                                                                    == 3 else set()))
    assert all("ConnectionError: reward API timed out" in probes[step]["reward_error"] for step in fails_at)
    assert "step 2 are left out (mean_reward None); the next re-check scores them again" in said[0]
    if len(fails_at) == 3:  # a reward failing every time: given up, said once more, not called at step 8's re-check
        assert len(said) == 2 and "failed 3 re-checks in a row and are left out for the rest of the run" in said[1]
        assert "reward_error" not in probes[8]
    else:
        assert len(said) == 1


def grpo_peft_run(model, tokenizer, tmp_path, max_steps, resume, warning, **training):
    """A short GRPO run of a PEFT ``model`` with the callback (re-checks and checkpoints every 2 steps); a new run
    must warn ``warning`` (a resumed one has it among its warnings given)."""
    from trl import GRPOConfig, GRPOTrainer

    cb = callback(config={**FAST, "rollout_prompts": 4, "rollout_generations": 2, "rollout_max_tokens": 6},
                  recheck_tokens=24)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=2, max_completion_length=6,
                      **{**COMMON, "per_device_train_batch_size": 2, "max_steps": max_steps, "save_steps": 2,
                         **training})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_length, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": domain_texts("law", 16)}), callbacks=[cb])
    if resume:
        trainer.train(resume_from_checkpoint=True)
    else:
        with pytest.warns(STSDataWarning, match=warning):
            trainer.train()
    return cb


def test_grpo_on_an_adapter_that_starts_non_zero_measures_this_runs_shift_not_the_adapters(tmp_path, tokenizer):
    """A LoRA trained before (continued under GRPO) or initialised non-zero: the fresh probe took its base residuals
    from the adapters-disabled model, so a run whose weights did not move reported the whole adapter as its shift
    (shift_total 22 at a learning rate of 1e-12). The re-checks keep the train-start probe; a resume knows it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=32))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))

    def run(max_steps, resume=False):
        return grpo_peft_run(model, tokenizer, tmp_path, max_steps, resume, "adapters do not start at zero",
                             learning_rate=1e-12)

    cb = run(2)
    assert cb.session.adapters_start_at_the_base is False
    assert [r["step"] for r in cb.history] == [2] and "fresh_probe" not in cb.history[0]
    assert cb.history[0]["shift_total"] == pytest.approx(0.0, abs=1e-6)
    resumed = run(4, resume=True)  # the decision is read back, not remade on the trained adapter
    assert [r["step"] for r in resumed.history] == [2, 4] and "fresh_probe" not in resumed.history[-1]
    assert resumed.history[-1]["shift_total"] == pytest.approx(0.0, abs=1e-6)


def test_grpo_with_base_weights_trained_beside_the_adapters_keeps_the_train_start_probe(tmp_path, tokenizer):
    """Norms unfrozen beside LoRA (or bias="all"): disable_adapter() keeps them as trained, so the fresh probe's
    base already held their training and the run's shift read 0 (shift_total 0.0 where the residuals moved 9.8%)."""
    from peft import LoraConfig, get_peft_model

    from sts_callback.pipelines.monitor import base_parameters_trained

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, weight in model.named_parameters():
        if "layernorm" in name:
            weight.requires_grad_(True)
    assert base_parameters_trained(model) and all("lora_" not in n for n in base_parameters_trained(model))

    def run(max_steps, resume=False):
        return grpo_peft_run(model, tokenizer, tmp_path, max_steps, resume,
                             "trains base weights beside its PEFT adapters .*layernorm")

    cb = run(2)
    assert cb.session.adapters_start_at_the_base is False
    assert [r["step"] for r in cb.history] == [2] and "fresh_probe" not in cb.history[0]
    # a checkpoint written before the check (it said the adapters start at the base): the resume checks again
    for state in (tmp_path / "run").rglob("*.json"):
        state.write_text(state.read_text().replace('"adapters_start_at_the_base": false',
                                                   '"adapters_start_at_the_base": true'))
    resumed = run(4, resume=True)
    assert resumed.session.adapters_start_at_the_base is False and "fresh_probe" not in resumed.history[-1]


def test_grpo_with_a_reference_synced_to_the_policy_is_no_base_for_the_probe(tmp_path, tokenizer):
    """sync_ref_model moves GRPO's ref_model toward the policy: the probe measured the shift against it as if it
    were the train-start weights (shift_total fell as training went on)."""
    from trl import GRPOConfig, GRPOTrainer

    model = make_model("llama")
    model.save_pretrained(tmp_path / "policy")
    cb = callback(config={**FAST, "rollout_prompts": 4, "rollout_generations": 4, "rollout_max_tokens": 8},
                  recheck_tokens=24)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, max_completion_length=8, temperature=1.5,
                      beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, **COMMON)
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=reward_length, args=args,
                          processing_class=tokenizer, callbacks=[cb],
                          train_dataset=Dataset.from_dict({"prompt": domain_texts("law", 16)}))
    with pytest.warns(STSDataWarning, match="without a reference model .sync_ref_model=True moves"):
        trainer.train()
    assert [r["step"] for r in cb.history] == [2, 4] and all("fresh_probe" not in r for r in cb.history)
    assert all(r["loss_delta"] for r in cb.history)


def test_grpo_in_context_shift_of_prompt_only_data_skips_the_forecast_but_rechecks(tmp_path, tokenizer, capsys):
    cb = callback(shift="in_context")
    grpo_trainer(tmp_path, tokenizer, cb).train()
    assert "STS forecast skipped" in capsys.readouterr().out
    assert not (tmp_path / "sts" / "forecast.json").exists() and [r["step"] for r in cb.history] == [2, 4]


def test_grpo_reward_without_signal_skips_the_forecast_and_trains_on(tmp_path, tokenizer):
    from sts_callback import STSDataWarning

    cb = callback(config={**FAST, "rollout_prompts": 2, "rollout_generations": 2, "rollout_max_tokens": 4})
    trainer = grpo_trainer(tmp_path, tokenizer, cb, reward=lambda completions, **k: [1.0] * len(completions))
    with pytest.warns(STSDataWarning, match="STS forecast skipped: The rewards carry no signal"):
        trainer.train()  # a sparse reward the base policy never earns must not stop the run
    check_run(trainer, cb, tmp_path, forecast=False)
    # the report gives that reason, not the in-context one (answers to use as demonstrations)
    report = (tmp_path / "sts" / "report.md").read_text()
    assert "No forecast in this run: The rewards carry no signal" in report and "demonstrations" in report
    assert "in-context demonstrations" not in report


def test_shift_that_the_trainer_cannot_serve_is_an_error(tmp_path, tokenizer):
    from sts_callback import STSConfigError

    with pytest.raises(STSConfigError, match="shift='sideways'"):
        callback(shift="sideways")
    cb = callback(shift="reward_weighted")
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({"text": domain_texts("law", 8)}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                                  remove_columns=["text"])
    trainer = Trainer(model=make_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
                      train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    with pytest.raises(STSConfigError,
                       match=r"needs reward functions \(an RL trainer's reward_funcs.*this is a Trainer"):
        trainer.train()
    trainer = Trainer(model=make_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
                      train_dataset=data, processing_class=tokenizer, callbacks=[callback(shift="teacher_vs_student")])
    with pytest.raises(STSConfigError,
                       match=r"needs a teacher model \(a distillation trainer's teacher_model.*this is a Trainer"):
        trainer.train()


def test_grpo_with_explicit_demonstrations_forecasts(tmp_path, tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    texts = domain_texts("law", 16)
    data = Dataset.from_dict({"prompt": texts})
    demos = [{"prompt": a, "completion": b} for a, b in zip(texts, texts[1:])]
    cb = callback(demonstrations=demos)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=6,
                      **{**COMMON, "per_device_train_batch_size": 2})
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=lambda completions, **k: [1.0] * len(completions),
                          args=args, train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path)


@pytest.mark.parametrize("conversational", [False, True])
def test_grpo_with_a_reward_model_forecasts_from_rollouts_it_scores_as_the_trainer_does(tmp_path, tokenizer,
                                                                                        conversational):
    # TRL loads a model id in reward_funcs into a sequence-classification model: the callback refused the run at
    # train start unless given demonstrations=, and its re-checks had no mean reward
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from sts_callback.integrations.trainer_shift import trainer_reward_funcs

    reward_model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    reward_model.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    texts = domain_texts("law", 16)
    prompts = [[{"role": "user", "content": t}] for t in texts] if conversational else texts
    cb = callback(config={**FAST, "rollout_prompts": 4, "rollout_max_tokens": 8}, recheck_tokens=24)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, max_completion_length=8, temperature=1.5,
                      reward_weights=[1.0, 0.3], **COMMON)
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=[reward_length, str(tmp_path / "reward")],
                          args=args, processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path / "run")
    rollouts = cb.forecast.settings["rollouts"]
    assert rollouts["reward_funcs"] == ["reward_length", "reward"] and rollouts["reward_weights"] == [1.0, 0.3]
    probes = [r["fresh_probe"] for r in cb.history]
    assert all(p["completions"] > 0 and p["mean_reward"] is not None for p in probes)
    # the reward model's scores are the trainer's own for the same prompts and completions
    completions = ([[{"role": "assistant", "content": c}] for c in ("court order", "a recipe")] if conversational
                   else ["court order", "a recipe"])
    ours = trainer_reward_funcs(trainer)[1](prompts=prompts[:2], completions=completions)
    theirs = trainer._calculate_rewards([{"prompt": p} for p in prompts[:2]], prompts[:2], completions, [[1], [1]])
    assert ours == pytest.approx(theirs[:, 1].tolist(), rel=1e-5)


def test_grpo_rollouts_come_from_the_trainers_prompts_when_train_probe_is_plain_text(tmp_path, tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    def correct(prompts, completions, answer, **kwargs):  # reads the dataset's answer column, as TRL passes it
        return [float(a in c) + len(c) / 100 for c, a in zip(completions, answer)]

    texts = domain_texts("law", 16)
    cb = callback(train_probe=domain_texts("law", 12, seed=7),
                  config={**FAST, "rollout_prompts": 4, "rollout_generations": 4, "rollout_max_tokens": 8})
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, max_completion_length=8, temperature=1.5,
                      **COMMON)
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=correct, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": texts, "answer": ["court"] * 16}),
                          callbacks=[cb])
    with pytest.warns(STSDataWarning, match="full fine-tune without a reference model"):
        trainer.train()
    check_run(trainer, cb, tmp_path)
    assert cb.forecast.settings["rollouts"]["reward_funcs"] == ["correct"]


class Counter:
    """A TRL environment: GRPO lets the policy call its tools between turns and takes its reward."""

    def reset(self, **kwargs):
        self.count = 0

    def increment(self, step: int) -> int:
        """Add to the counter.

        Args:
            step: how much to add.
        """
        self.count += step
        return self.count

    def get_reward(self):
        return float(self.count)


@pytest.mark.parametrize("shift", ["auto", "reward_filtered"])
def test_grpo_with_an_environment_skips_the_rollout_forecast_it_cannot_reproduce(tmp_path, shift):
    import importlib.resources

    from trl import GRPOConfig, GRPOTrainer

    from sts_callback import STSConfigError

    tokenizer = make_tokenizer()
    tokenizer.chat_template = (importlib.resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text()
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in domain_texts("law", 16)]})
    cb = callback(shift=shift)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, max_completion_length=8, **COMMON)
    trainer = GRPOTrainer(model=make_model("llama"), args=args, processing_class=tokenizer, train_dataset=data,
                          environment_factory=Counter, callbacks=[cb])
    if shift == "reward_filtered":
        with pytest.raises(STSConfigError, match="generates with tools and environment_factory.*demonstrations="):
            trainer.train()
        return
    with pytest.warns(STSDataWarning, match="rollouts do not reproduce, so no forecast is made"):
        trainer.train()
    check_run(trainer, cb, tmp_path, forecast=False)
    assert all("fresh_probe" not in r for r in cb.history)


def test_sft_trainer_with_a_vlm_processor_that_holds_the_chat_template_the_tokenizer_lacks(tmp_path):
    """Many VLM checkpoints ship the chat template on the processor only: TRL renders chats with it, so STS does."""
    from tiny import CHAT_TEMPLATE, make_processor

    tokenizer = make_tokenizer(chat_template=False)
    processor = make_processor(tokenizer, CHAT_TEMPLATE)
    sft_on_chats(tmp_path, make_model("llava"), processor)
    assert tokenizer.chat_template is None and processor.tokenizer is tokenizer  # the caller's objects as they were


ROLLOUTS = {**FAST, "rollout_prompts": 4, "rollout_max_tokens": 8}


def distillation_trainer(out, tokenizer, cb, **extra):
    from trl import DistillationConfig, DistillationTrainer

    # bf16=False: the callback's forwards follow the trainer's autocast, the offline forecast's run in float32
    args = DistillationConfig(output_dir=str(out), max_completion_length=8, temperature=1.5, bf16=False, **COMMON)
    return DistillationTrainer(model=make_model("llama"), teacher_model=make_model("llama", seed=1), args=args,
                               train_dataset=Dataset.from_dict({"prompt": domain_texts("law", 16)}),
                               processing_class=tokenizer, callbacks=[cb], **extra)


@pytest.mark.parametrize("shift", ["auto", "teacher_vs_student"])
def test_distillation_forecasts_from_the_teachers_completions(tmp_path, tokenizer, shift):
    from sts_callback.pipelines.distillation import distillation_forecast

    cb = callback(shift=shift, config=ROLLOUTS)
    trainer = distillation_trainer(tmp_path, tokenizer, cb)
    with pytest.warns(STSDataWarning, match="distillation is a full fine-tune without a reference model"):
        trainer.train()  # the prompts have no answers: before, the forecast was skipped
    check_run(trainer, cb, tmp_path)
    settings = cb.forecast.settings
    expected = "teacher_completions" if shift == "auto" else shift
    assert settings["shift"] == expected
    sampled = settings["distillation"]
    assert sampled["prompts"] == 4 and sampled["teacher"]["completions"] == sampled["student"]["completions"] == 8
    assert sampled["temperature"] == 1.5 and sampled["max_completion_length"] == 8  # the trainer's settings
    # the offline forecast of the same student, teacher and settings gives the callback's numbers
    offline = distillation_forecast(make_model("llama"), make_model("llama", seed=1), tokenizer, cb.sae,
                                    domain_texts("law", 16), {d: domain_texts(d, 20) for d in DOMAINS},
                                    cb.session.config, settings=trainer.args, shift=expected)
    assert dict(offline.ranked()) == pytest.approx(dict(cb.forecast.ranked()), rel=1e-5)
    # the re-check probe is what the student writes: completions after the prompts
    assert cb.monitor.probe and all(0 < sum(flags) < len(ids) for ids, flags in cb.monitor.probe)


def test_distillation_with_lora_rechecks_the_students_completions_of_fresh_prompts(tmp_path, tokenizer):
    from peft import LoraConfig

    cb = callback(config=ROLLOUTS, recheck_tokens=24)
    trainer = distillation_trainer(tmp_path, tokenizer, cb,
                                   peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    check_run(trainer, cb, tmp_path)
    probes = [r["fresh_probe"] for r in cb.history]
    assert all(p["completions"] > 0 and p["tokens"] > 0 and p["mean_reward"] is None for p in probes)
    assert probes[0]["prompts"] != probes[1]["prompts"]


def test_distillation_forecast_needs_a_teacher_that_writes_otherwise(tokenizer):
    from sts_callback import STSError
    from sts_callback.pipelines.distillation import distillation_forecast

    student = make_model("llama")
    args = (tokenizer, TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), domain_texts("law", 16),
            {d: domain_texts(d, 20) for d in DOMAINS}, ROLLOUTS)
    with pytest.raises(STSError, match="teacher model other than the student"):
        distillation_forecast(student, student, *args)
    with pytest.raises(STSError, match="differ in no SAE latent"):  # the same weights sample the same completions
        distillation_forecast(student, make_model("llama"), *args, shift="teacher_vs_student")


def test_gkd_on_chats_forecasts_from_the_teachers_answers_to_the_chats_prompts(tmp_path, tokenizer):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    questions, answers = domain_texts("law", 40), domain_texts("food", 40, seed=3)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(questions, answers)]
    cb = callback(config=ROLLOUTS)
    args = GKDConfig(output_dir=str(tmp_path), max_new_tokens=8, max_length=64, bf16=False, **COMMON)
    trainer = GKDTrainer(model=make_model("llama"), teacher_model=make_model("llama", seed=1), args=args,
                         train_dataset=Dataset.from_dict({"messages": chats}), processing_class=tokenizer,
                         callbacks=[cb])
    with pytest.warns(STSDataWarning, match="distillation is a full fine-tune"):
        trainer.train()
    check_run(trainer, cb, tmp_path)
    assert cb.forecast.settings["shift"] == "teacher_completions"  # the teacher's answers, not the data's
    assert cb.forecast.settings["distillation"]["max_completion_length"] == 8  # GKDConfig.max_new_tokens
    # the student's completions follow the chats' prompts (the user turn), not their answers
    probe = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in cb.monitor.probe]
    assert probe and all(any(q in text for q in questions) for text in probe)
    assert not any(a in text for text in probe for a in answers)


def test_distillation_samples_two_completions_a_prompt_where_the_trainer_samples_one():
    from trl.experimental.gold import GOLDConfig

    from sts_callback.pipelines.distillation import distillation_settings

    # GOLD and IW-OPD default to num_generations=1: no group to compare, and no reason to refuse the run
    assert distillation_settings(GOLDConfig(output_dir="unused", use_cpu=True, num_generations=1)).num_generations == 2
    assert distillation_settings(GOLDConfig(output_dir="unused", use_cpu=True, num_generations=4)).num_generations == 4
    assert distillation_settings({"num_generations": 1, "temperature": 0.7}).temperature == 0.7


def test_self_distillation_with_privileged_context_skips_the_forecast_it_cannot_reproduce(tmp_path, tokenizer):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    make_model("llama").save_pretrained(tmp_path / "policy")  # SDFT's teacher: a copy of the base, loaded by path
    tokenizer.save_pretrained(tmp_path / "policy")
    data = Dataset.from_dict({"prompt": domain_texts("law", 16), "privileged_context": domain_texts("food", 16)})
    cb = callback(config=ROLLOUTS)
    args = SDFTConfig(output_dir=str(tmp_path / "run"), max_completion_length=8, num_generations=2, bf16=False,
                      **COMMON)
    trainer = SDFTTrainer(model=str(tmp_path / "policy"), args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[cb])
    with pytest.warns(STSDataWarning, match="teacher_prompt_template.*no forecast is made"):
        trainer.train()  # before: the teacher, the base on the plain prompt, wrote what the student writes
    check_run(trainer, cb, tmp_path / "run", forecast=False)


def test_a_preference_loss_with_a_likelihood_term_says_what_the_forecast_leaves_out(tmp_path, tokenizer):
    from types import SimpleNamespace

    from trl import DPOConfig
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    from sts_callback.integrations.trainer_shift import likelihood_term

    texts = domain_texts("law", 16)
    data = Dataset.from_dict({"prompt": texts, "chosen": texts[1:] + texts[:1], "rejected": domain_texts("food", 16),
                              "reference": domain_texts("chem", 16)})
    cb = callback()
    trainer = TPOTrainer(model=make_model("llama"), args=TPOConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
                         train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    with pytest.warns(STSDataWarning, match="reference answers.*covers the preference only"):
        trainer.train()
    check_run(trainer, cb, tmp_path)
    assert cb.forecast.settings["shift"] == "chosen_vs_rejected"
    assert "reference answers (tpo_alpha=1)" in cb.forecast.settings["left_out"]
    mpo = SimpleNamespace(args=DPOConfig(output_dir="unused", use_cpu=True, loss_type=["sigmoid", "sft"]))
    assert "loss_type 'sft'" in likelihood_term(mpo)
    assert likelihood_term(SimpleNamespace(args=DPOConfig(output_dir="unused", use_cpu=True))) is None
    unweighted = DPOConfig(output_dir="unused", use_cpu=True, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0])
    assert likelihood_term(SimpleNamespace(args=unweighted)) is None  # the sft term weighs nothing
    apo = SimpleNamespace(args=DPOConfig(output_dir="unused", use_cpu=True, loss_type="apo_zero"))
    assert "own likelihood" in likelihood_term(apo) and "'apo_zero'" in likelihood_term(apo)
    ipo = SimpleNamespace(args=DPOConfig(output_dir="unused", use_cpu=True, loss_type=["ipo", "sigmoid"]))
    assert likelihood_term(ipo) is None  # margins only

    from trl.experimental.orpo import ORPOTrainer

    class MyTrainer(ORPOTrainer):  # a user's subclass keeps ORPO's loss
        def __init__(self):
            self.args = None
    assert "ORPO" in likelihood_term(MyTrainer())


def test_teachers_that_sts_cannot_sample_as_the_trainer_does_are_named():
    from types import SimpleNamespace

    from sts_callback.integrations.trainer_shift import unreproduced_generation

    student = object()
    own_tokenizer = SimpleNamespace(model=student, teacher_model=object(), args=SimpleNamespace(use_uld_loss=True))
    itself = SimpleNamespace(model=student, teacher_model=student, args=SimpleNamespace())
    assert any("its own tokenizer" in what for what in unreproduced_generation(own_tokenizer))
    assert any("self-distillation" in what for what in unreproduced_generation(itself))
    assert unreproduced_generation(SimpleNamespace(model=student, teacher_model=object(), args=None)) == []
