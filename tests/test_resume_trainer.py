"""Runs that stop and go on under a real Trainer: the schedule a resumed run really runs, target domains and guard
settings that change on resume, and a new run in a used output_dir."""

import json
import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from sts_callback import STSDataWarning, STSInputError
from sts_callback.integrations.callback import STSCallback

DOMAINS = ("law", "food", "chem")
FAST = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def callback(domains=DOMAINS, **overrides):
    values = dict(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                  target_domains={d: domain_texts(d, 30) for d in domains}, config=FAST, recheck_tokens=150,
                  loss_tokens=120, protected=["law"])
    values.update(overrides)
    return STSCallback(**values)


def trainer(out: Path, tokenizer, sts: STSCallback, **overrides) -> Trainer:
    args = dict(output_dir=str(out), max_steps=8, save_steps=2, logging_steps=1, use_cpu=True, report_to=[],
                per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps", disable_tqdm=True)
    args.update(overrides)
    data = Dataset.from_dict({"text": domain_texts("law", 64)}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                                    remove_columns=["text"])
    return Trainer(model=make_model("llama"), args=TrainingArguments(**args), train_dataset=data,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                   callbacks=[sts])


class CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def crashed_run(out: Path, tokenizer, sts: STSCallback, at: int = 5, **overrides) -> None:
    first = trainer(out, tokenizer, sts, **overrides)
    first.add_callback(CrashAt(at))
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()


def logged_rates(run: Trainer) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in run.state.log_history if "learning_rate" in e}


@pytest.mark.parametrize("case", ["longer", "save_only_model"])
def test_a_resumed_run_reads_the_rates_its_scheduler_really_gives(tmp_path, tokenizer, case):
    """Resumed with a larger max_steps, the restored scheduler goes on from the old plan's last rate (it was taken
    for a scheduler stepping on metrics, and the last logged rate held: lr-area share 1.0 at step 6 of 8); with
    save_only_model the scheduler starts again from its first step (the plan's rates were assumed)."""
    first = dict(max_steps=4) if case == "longer" else dict(save_only_model=True)
    if case == "longer":
        trainer(tmp_path, tokenizer, callback(), **first).train()
    else:
        crashed_run(tmp_path, tokenizer, callback(), **first)
    sts = callback()
    resumed = trainer(tmp_path, tokenizer, sts, **({"save_only_model": True} if case != "longer" else {}))
    resumed.train(resume_from_checkpoint=True)
    assert sts.schedule_source == "scheduler"
    ran = logged_rates(resumed)
    assert sts.session.learning_rates[4:] == pytest.approx([ran[s] for s in range(5, 9)])  # the steps after resume
    fractions = {r["step"]: r["lr_area_fraction"] for r in sts.history}
    assert fractions[6] < 1.0 and fractions[8] == pytest.approx(1.0)


def test_a_domain_added_on_resume_is_left_out_and_the_others_stay_measured(tmp_path, tokenizer):
    """Every re-check after the resume failed on the new domain (KeyError), the protected domain's too."""
    crashed_run(tmp_path, tokenizer, callback())
    sts = callback(DOMAINS + ("sport",))
    with pytest.warns(STSDataWarning, match=r"\['sport'\] were not measured at train start.*left out"):
        trainer(tmp_path, tokenizer, sts).train(resume_from_checkpoint=True)
    after = [r for r in sts.history if r["step"] > 4]
    assert after and all("error" not in r and set(r["loss_delta"]) == set(DOMAINS) for r in after)
    # a protected domain added on resume cannot be guarded: refused at train start
    with pytest.raises(STSInputError, match=r"protected domain\(s\) \['sport'\] were not target domains"):
        trainer(tmp_path, tokenizer, callback(DOMAINS + ("sport",), protected=["law", "sport"])).train(
            resume_from_checkpoint=True)


def test_a_resume_rewrites_the_guard_settings_the_rest_of_the_run_is_judged_by(tmp_path, tokenizer):
    crashed_run(tmp_path, tokenizer, callback(tolerance=0.5))
    trainer(tmp_path, tokenizer, callback(tolerance=0.05, protected=["law", "food"])).train(
        resume_from_checkpoint=True)
    settings = json.loads((tmp_path / "sts" / "settings.json").read_text())
    assert settings["tolerance"] == 0.05 and settings["protected"] == ["law", "food"]  # sts report reads these
    # a calibration first given on resume predicts nothing at train start (made before the first step): said
    with pytest.warns(STSDataWarning, match="resuming with a calibration but no train-start prediction"):
        trainer(tmp_path, tokenizer, callback(calibration="gemma3-270m-lora"), max_steps=10).train(
            resume_from_checkpoint=True)


def test_a_new_run_in_a_used_folder_moves_the_old_report_aside(tmp_path, tokenizer):
    """The earlier run's report stood beside the new run's forecast until the new run's first re-check; it is moved
    aside, and the new run's own report (written at train start) takes its place."""
    trainer(tmp_path, tokenizer, callback(), max_steps=2).train()
    assert "**Re-checks:**" in (tmp_path / "sts" / "report.md").read_text()

    class Look(TrainerCallback):
        seen = None
        report = None

        def on_step_begin(self, args, state, control, **kwargs):
            if Look.seen is None:
                Look.seen = sorted(p.name for p in (tmp_path / "sts").iterdir())
                Look.report = (tmp_path / "sts" / "report.md").read_text()

    again = trainer(tmp_path, tokenizer, callback(), max_steps=2)
    again.add_callback(Look())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.train()
    assert "**Re-checks:**" not in Look.report  # the new run's, before any re-check: not the earlier run's
    assert any(n.startswith("report.") and n.endswith(".md") and n != "report.md" for n in Look.seen)
