"""One callback or session used for several runs, several callbacks on one trainer, and runs sharing a folder (a
notebook, a sweep): each run's numbers stay its own, and a finished callback keeps its results, not the model."""

import gc
import json
import re
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from test_callback import DOMAINS, make_callback, make_trainer
from test_session import session_for, train_steps
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSInputError
from sts_callback.core.data import load_corpus, load_domains
from sts_callback.core.run_store import RunStore
from sts_callback.integrations.callback import STSCallback


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def sts_eval_keys(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "_loss_delta" in k}


def test_evaluating_a_trainer_after_the_callback_watched_another_gives_none_of_the_other_runs_numbers(
        tmp_path, tokenizer):
    callback = make_callback(protected=["food"])
    evals = domain_texts("law", 8, seed=4)
    first = make_trainer(tmp_path / "a", tokenizer, callback, max_steps=2, save_steps=2, eval_texts=evals)
    first.train()
    own = sts_eval_keys(first.evaluate())
    assert own["eval_sts_loss_delta_food"] == pytest.approx(callback.history[-1]["loss_delta"]["food"])
    second = make_trainer(tmp_path / "b", tokenizer, callback, max_steps=2, save_steps=2, eval_texts=evals,
                          learning_rate=5e-2)
    second.train()
    assert sts_eval_keys(first.evaluate()) == {}  # the callback now holds the second run's measurements
    assert sts_eval_keys(second.evaluate())["eval_sts_loss_delta_food"] == pytest.approx(
        callback.history[-1]["loss_delta"]["food"])


def test_two_callbacks_log_under_their_own_names_and_the_protected_key_is_the_worst_of_both(tmp_path, tokenizer):
    food = make_callback(protected=["food"])
    law = make_callback(protected=["law"], output_subdir="sts_law")
    trainer = make_trainer(tmp_path, tokenizer, food, extra_callbacks=[law], max_steps=2, save_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4))
    trainer.train()
    metrics = trainer.evaluate()
    measured_food = food.history[-1]["loss_delta"]["food"]
    measured_law = law.history[-1]["loss_delta"]["law"]
    assert metrics["eval_sts_loss_delta_food"] == pytest.approx(measured_food)
    assert metrics["eval_sts_law_loss_delta_law"] == pytest.approx(measured_law)
    assert metrics["eval_sts_law_protected_loss_delta"] == pytest.approx(measured_law)
    assert metrics["eval_sts_protected_loss_delta"] == pytest.approx(max(measured_food, measured_law))
    keys = ("sts/forecast/food", "sts_law/forecast/food")
    forecast_logs = [e for e in trainer.state.log_history if any(k in e for k in keys)]
    assert [sum(k in e for k in keys) for e in forecast_logs] == [1, 1]  # one entry each, neither overwritten
    assert {k for e in forecast_logs for k in keys if k in e} == set(keys)


def train_a_trial(folder: Path, tokenizer) -> tuple[STSCallback, weakref.ref]:
    # in a function of its own: Python 3.11 keeps a snapshot of a frame's locals that the callback's search for
    # its trainer takes, so the model must not be a local of the test itself
    callback, model = make_callback(), make_model("llama")
    make_trainer(folder, tokenizer, callback, model=model, max_steps=2, save_steps=2).train()
    return callback, weakref.ref(model)


def test_a_kept_callback_does_not_keep_the_trainer_or_its_model_alive(tmp_path, tokenizer):
    trials = [train_a_trial(tmp_path / str(trial), tokenizer) for trial in range(2)]  # a sweep keeps the results
    gc.collect()
    assert all(model() is None for _, model in trials)
    assert all([r["step"] for r in callback.history] == [2] for callback, _ in trials)


def test_a_session_started_again_does_not_carry_the_earlier_runs_forecast_or_seconds(tmp_path, tokenizer):
    session = session_for(tmp_path)
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    texts = domain_texts("law", 40)
    first = make_model("llama")
    session.prepare(first, tokenizer, load_corpus(texts), domains)
    assert session.start(first, load_corpus(texts), domains) is not None
    train_steps(first, tokenizer, texts, 2)
    time.sleep(0.5)
    session.recheck(first, 2, max_steps=2)
    second = make_model("llama", seed=1)
    prompts = load_corpus([{"prompt": t} for t in domain_texts("chem", 20)])  # no answers: no forecast
    session.prepare(second, tokenizer, prompts, domains)
    assert session.start(second, prompts, domains) is None
    assert session.forecast is None and session.predicted == {}
    assert not (tmp_path / "sts" / "forecast.json").exists()
    record, _ = session.recheck(second, 1, max_steps=1)
    assert record["overhead"]["train_seconds"] < 0.5  # the first run's half second is not this run's
    assert record.get("overlap_with_forecast") is None


def test_runs_started_within_one_second_archive_their_files_apart(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "sts")
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261205-120000")
    for run in range(3):
        store.root.mkdir(parents=True, exist_ok=True)
        store.path("history.jsonl").write_text(json.dumps({"step": run}) + "\n")
        store.path("forecast.json").write_text(json.dumps({"run": run}))
        store.archive_previous_run()
    archived = sorted(store.root.glob("history.*.jsonl"))
    assert sorted(json.loads(p.read_text())["step"] for p in archived) == [0, 1, 2]
    # a run's history and forecast keep one stamp between them
    assert [p.name.replace("history", "forecast").replace("jsonl", "json") for p in archived] == sorted(
        p.name for p in store.root.glob("forecast.*.json"))


WORKER = Path(__file__).resolve()


def two_callbacks(order: str) -> list[STSCallback]:
    a = make_callback(protected=["law"], output_subdir="sts_a")
    b = make_callback(protected=["food"], output_subdir="sts_b",
                      sae=TinySAE(32, 64, hook_name="blocks.0.hook_resid_post"))
    return [a, b] if order == "ab" else [b, a]


def resume_worker(out: Path, phase: str) -> None:
    """Phase 1 trains with callbacks a, b; phase 2 resumes (callback states restored) with them listed b, a."""
    tokenizer = make_tokenizer()
    first, *rest = two_callbacks("ab" if phase == "1" else "ba")
    trainer = make_trainer(out, tokenizer, first, extra_callbacks=rest, max_steps=2 if phase == "1" else 4,
                           save_steps=2, restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(out / "run" / "checkpoint-2") if phase == "2" else None)
    hooks = {cb.output_subdir: cb.sae.hook_name for cb in trainer.callback_handler.callbacks  # the ones that ran
             if isinstance(cb, STSCallback)}
    (out / f"hooks{phase}.json").write_text(json.dumps(hooks))


def test_resumed_callbacks_listed_in_another_order_keep_their_own_saes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for phase in ("1", "2"):  # the Trainer restores callback states in a fresh process, as a real resume does
        done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), phase], env=env, capture_output=True,
                              text=True, cwd=WORKER.parent)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "hooks2.json").read_text()) == {"sts_a": "blocks.1.hook_resid_post",
                                                                 "sts_b": "blocks.0.hook_resid_post"}
    for folder, hook in (("sts_a", "blocks.1.hook_resid_post"), ("sts_b", "blocks.0.hook_resid_post")):
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / folder / "history.jsonl").open()]
        assert steps == [2, 4]
        forecast = json.loads((tmp_path / "run" / folder / "forecast.json").read_text())
        assert forecast["settings"]["sae"]["hook_name"] == hook


def test_resuming_from_a_checkpoint_another_run_left_in_the_folder_is_refused(tmp_path, tokenizer):
    make_trainer(tmp_path, tokenizer, make_callback(), max_steps=4, save_steps=2).train()  # checkpoints 2, 4
    later = make_callback()  # a later, shorter run in the same folder rewrites checkpoint-2 only
    make_trainer(tmp_path, tokenizer, later, model=make_model("llama", seed=7), max_steps=2, save_steps=2).train()
    history = (tmp_path / "run" / "sts" / "history.jsonl").read_text()
    resumed = make_trainer(tmp_path, tokenizer, make_callback(), max_steps=6, save_steps=2)
    own_checkpoint = re.escape(repr(str(tmp_path / "run" / "checkpoint-2")))  # the message names it
    with pytest.raises(STSInputError, match=f"checkpoint-4 .*belongs to another run.*own checkpoint .*{own_checkpoint}"):
        resumed.train(resume_from_checkpoint=True)  # the Trainer picks checkpoint-4: the first run's
    assert (tmp_path / "run" / "sts" / "history.jsonl").read_text() == history  # nothing rewritten
    own = make_trainer(tmp_path, tokenizer, make_callback(), max_steps=4, save_steps=2)
    own.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "sts" / "history.jsonl").open()] == [2, 4]


if __name__ == "__main__":
    resume_worker(Path(sys.argv[1]), sys.argv[2])
