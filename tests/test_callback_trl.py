"""STSCallback on real TRL trainers (SFT, DPO, GRPO) with tiny models."""

import json

import pytest
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

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


def test_sft_trainer_with_chat_data(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    texts = domain_texts("law", 40)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                                           for a, b in zip(texts, texts[1:])]})
    cb = callback()
    trainer = SFTTrainer(model=make_model("llama"), args=SFTConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
                         train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path)
    assert cb.forecast.shift_queries > 0


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


def test_dpo_trainer_uses_chosen_as_answer(tmp_path, tokenizer):
    from trl import DPOConfig, DPOTrainer

    texts = domain_texts("law", 40)
    data = Dataset.from_dict({"prompt": texts, "chosen": texts[1:] + texts[:1], "rejected": domain_texts("food", 40)})
    cb = callback()
    trainer = DPOTrainer(model=make_model("llama"), ref_model=make_model("llama"), args=DPOConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
                         train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    check_run(trainer, cb, tmp_path)


def test_grpo_prompts_without_answers_skip_forecast_but_recheck(tmp_path, tokenizer, capsys):
    from trl import GRPOConfig, GRPOTrainer

    def reward_length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    data = Dataset.from_dict({"prompt": domain_texts("law", 16)})
    cb = callback()
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=6,
                      **{**COMMON, "per_device_train_batch_size": 2})
    trainer = GRPOTrainer(model=make_model("llama"), reward_funcs=reward_length, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    assert "STS forecast skipped" in capsys.readouterr().out
    check_run(trainer, cb, tmp_path, forecast=False)


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
