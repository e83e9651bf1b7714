"""Defects that broke, blinded or misled a user's run (issue 15): resume, non-finite losses, write failures,
evaluation keys with EarlyStoppingCallback, streaming and tokenized datasets. Real Trainer, tiny models."""

import json
import subprocess
import sys
import math
import re
import warnings
from pathlib import Path

import pytest
from datasets import Dataset, IterableDataset
from test_callback import DOMAINS, make_callback, make_trainer, pretrained_tiny_model, tokenized
from tiny import TinySAE, domain_texts, make_model, make_tokenizer
from transformers import (DataCollatorForLanguageModeling, EarlyStoppingCallback, Trainer, TrainerCallback,
                          TrainingArguments)

from sts_callback import STSConfigError, STSDataWarning, STSInputError
from sts_callback.core.atomic import append_json_line, atomic_write, read_json_lines
from sts_callback.integrations.callback import STSCallback, STSNegativeTransferWarning
from sts_callback.core.run_store import RunStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def history_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- 1. resume
def test_resume_without_restored_callback_state_keeps_history_and_base_losses(tmp_path, tokenizer):
    run = dict(texts=domain_texts("law", 64, seed=8), learning_rate=3e-2, save_steps=2)
    first = make_callback()
    make_trainer(tmp_path, tokenizer, first, model=pretrained_tiny_model(tokenizer), max_steps=4, **run).train()
    out = tmp_path / "run" / "sts"
    assert history_steps(out / "history.jsonl") == [2, 4]
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "run" / "gone")  # resume from step 2

    second = make_callback(protected=["food"], tolerance=0.02)  # the rules must still work after the resume
    trainer = make_trainer(tmp_path, tokenizer, second, max_steps=6, **run)  # the default: no state restored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert second.base_losses == first.base_losses  # read back, not re-measured at step 2
    assert [r["step"] for r in second.history] == [2, 4, 6]
    assert history_steps(out / "history.jsonl") == [2, 4, 6]  # the record of step 2 survived
    superseded = [json.loads(line) for line in (out / "history.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == [4]  # the first run's step 4 is kept, not deleted
    for record in second.history[1:]:
        assert all(v is not None for v in record["loss_delta"].values())
        assert record["violations"]
    assert any(issubclass(w.category, STSNegativeTransferWarning) for w in caught)


def test_resume_without_any_saved_base_losses_fails_at_train_start(tmp_path, tokenizer):
    make_trainer(tmp_path, tokenizer, make_callback(), max_steps=2, save_steps=2).train()
    (tmp_path / "run" / "checkpoint-2" / "sts" / "callback_state.json").unlink()
    (tmp_path / "run" / "sts" / "callback_state.json").unlink()
    trainer_state = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"  # the Trainer's copy of the counters
    trainer_state.write_text(json.dumps({**json.loads(trainer_state.read_text()), "stateful_callbacks": {}}))
    trainer = make_trainer(tmp_path, tokenizer, make_callback(), max_steps=4, save_steps=2)
    with pytest.raises(Exception, match="train-start held-out losses"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


# ------------------------------------------------------------------------------------------- 2. non-finite
class PoisonLosses(TrainerCallback):
    """From step 3 on, the protected domain's held-out loss comes back non-finite (a diverged model)."""

    def __init__(self, callback, value):
        self.callback, self.value = callback, value

    def on_step_begin(self, args, state, control, **kwargs):
        monitor = self.callback.monitor
        if state.global_step >= 3 and not getattr(monitor, "_poisoned", False):
            measure = monitor.measure_changes

            def poisoned(*a, **k):
                changes = measure(*a, **k)
                changes["food"].delta = self.value
                return changes

            monitor.measure_changes = poisoned
            monitor._poisoned = True


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_of_a_protected_domain_is_a_violation(tmp_path, tokenizer, value):
    callback = make_callback(protected=["food"], tolerance=0.5, early_stop=True)
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[PoisonLosses(callback, value)])
    with pytest.warns(STSNegativeTransferWarning, match="'food' is not finite"):
        trainer.train()
    assert not callback.history[0]["violations"]
    assert "not finite" in callback.history[1]["violations"][0]
    assert trainer.state.global_step == 4 and "early stop at step 4" in callback.stop_reason


def test_a_model_that_really_diverges_is_a_violation_and_stops(tmp_path, tokenizer):
    # lr 1e4 without clipping: NaN weights after a few steps. The probe's residuals are NaN before any held-out loss
    # is measured; the re-check must still measure the losses so that the guard sees the divergence.
    callback = make_callback(protected=["food"], early_stop=True, patience=1, recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=8, save_steps=100, learning_rate=1e4,
                           max_grad_norm=0.0)
    with pytest.warns(RuntimeWarning, match="probe could not be read") as caught:
        trainer.train()
    said = [str(w.message) for w in caught]
    # the divergence is named; no early-forecast failure blaming calibration data, no empty figure's legend warning
    assert not [m for m in said if "Calibration data" in m or "legend" in m], said
    diverged = next(r for r in callback.history if r.get("violations"))
    assert "error" not in diverged and "NaN" in diverged["probe_error"]
    assert not math.isfinite(diverged["loss_delta"]["food"]) and diverged["scores"] == {}
    assert "not finite" in diverged["violations"][0] and callback.stop_reason
    assert trainer.state.global_step == diverged["step"] < 8


# ------------------------------------------------------------------------------------------- 3. writes
def test_atomic_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "forecast.json"
    target.write_text("old")

    def half_then_full_disk(tmp):
        tmp.write_text("half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_full_disk)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.json"]


def test_failed_append_is_cut_back_to_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "history.jsonl"
    append_json_line(path, {"step": 1})
    import os

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        append_json_line(path, {"step": 2, "big": "x" * 10000})
    monkeypatch.setattr(os, "fsync", real_fsync)
    records, bad = read_json_lines(path)
    assert records == [{"step": 1}] and bad == 0


@pytest.mark.skipif(sys.platform == "win32", reason="a file-size limit (RLIMIT_FSIZE) is POSIX")
def test_a_disk_that_fills_mid_line_leaves_whole_lines(tmp_path):
    """A real short write: the file-size limit stops the record part-way (as a full disk does); the buffered
    file's truncate flushed the rest again, failed, and left the cut line."""
    path = tmp_path / "history.jsonl"
    append_json_line(path, {"step": 1})
    script = (
        "import resource, signal, sys\n"
        "from sts_callback.core.atomic import append_json_line\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({path.stat().st_size + 50}, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    append_json_line({str(path)!r}, {{'step': 2, 'big': 'x' * 200}})\n"
        "except OSError as err:\n"
        "    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    records, bad = read_json_lines(path)
    assert records == [{"step": 1}] and bad == 0


def test_write_failure_during_training_warns_and_training_goes_on(tmp_path, tokenizer, monkeypatch):
    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunStore, "append_history", full_disk)
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback)
    with pytest.warns(RuntimeWarning, match="could not write the re-check of step 2"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert [r["step"] for r in callback.history] == [2, 4, 6]  # nothing lost in memory
    assert [e["step"] for e in callback.write_errors] == [2, 4, 6]
    assert "No space left" in callback.write_errors[0]["error"]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_write_failure_in_strict_mode_stops(tmp_path, tokenizer, monkeypatch):
    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunStore, "append_history", full_disk)
    trainer = make_trainer(tmp_path, tokenizer, make_callback(strict=True))
    with pytest.raises(OSError, match="No space"):
        trainer.train()


@pytest.mark.parametrize("blocked", ["read_only", "file_in_the_way"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_the_forecast(tmp_path, tokenizer, monkeypatch,
                                                                             blocked):
    import tempfile

    if blocked == "read_only":  # as a read-only mount answers (root passes a chmod)
        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    else:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "sts").write_text("not a folder")
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, save_strategy="no")
    with pytest.raises(STSInputError, match="Cannot write STS's forecast, history and report.*writable output_dir"):
        trainer.train()
    assert callback.forecast is None and trainer.state.global_step == 0  # nothing computed, then lost


def sts_warnings(caught, text):
    return [str(w.message) for w in caught if "STS" in str(w.message) and text in str(w.message)]


def test_a_lasting_violation_and_a_failing_recheck_are_warned_about_once(tmp_path, tokenizer, monkeypatch):
    # re-checking every few steps of a long run must not repeat the same warning (and traceback) hundreds of times
    from sts_callback.pipelines.monitor import Monitor

    callback = make_callback(protected=["food"], max_sts=1e-12, recheck_steps=1)  # every re-check violates
    trainer = make_trainer(tmp_path, tokenizer, callback, save_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert all(r["violations"] for r in callback.history) and len(callback.history) == 6
    assert len(sts_warnings(caught, "re-checked STS of protected domain 'food'")) == 1

    real = Monitor.recheck
    calls = []

    def fails_after_the_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Monitor, "recheck", fails_after_the_first)
    callback = make_callback(recheck_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "failing", tokenizer, callback, save_strategy="no").train()
    assert [bool(r.get("error")) for r in callback.history] == [False] + [True] * 5
    assert all("Traceback" in r["traceback"] for r in callback.history[1:])  # each kept in the history
    said = sts_warnings(caught, "failed and was skipped")
    assert len(said) == 1 and "recorded in the history" in said[0]
    assert not sts_warnings(caught, "not being checked")  # nothing protected: nothing left unwatched
    # with a protected domain, three failures in a row leave it unwatched: said once (a stop cannot come)
    calls.clear()
    callback = make_callback(recheck_steps=1, protected=["food"], early_stop=True, tolerance=math.inf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "unwatched", tokenizer, callback, save_strategy="no").train()
    said = sts_warnings(caught, "not being checked")
    assert len(said) == 1 and "the last 3 re-checks (to step 4) all failed" in said[0] and "'food'" in said[0]


def test_progress_bars_and_info_lines_follow_the_trainers_settings(tmp_path, tokenizer, capsys):
    import transformers

    make_trainer(tmp_path / "default", tokenizer, make_callback(), save_strategy="no", disable_tqdm=False,
                 log_level="passive").train()  # explicit: disable_tqdm's default follows transformers' verbosity
    out, err = capsys.readouterr()
    assert "STS forecast:" in err and "STS forecast:" in out  # the bar, the table
    # each re-check in a line a person reads (the trainer's log holds only its sts/... numbers)
    assert re.search(r"STS re-check at step 6/6: held-out loss \w+ [+-]\d+\.\d+±\d+\.\d+%", out)
    verbosity = transformers.logging.get_verbosity()  # log_level sets transformers' own, for the process
    try:
        make_trainer(tmp_path / "quiet", tokenizer, make_callback(), save_strategy="no", disable_tqdm=True,
                     log_level="error").train()
    finally:
        transformers.logging.set_verbosity(verbosity)
    out, err = capsys.readouterr()
    assert "STS forecast" not in err and "STS forecast" not in out  # no bar, no table
    assert "STS re-check at step" not in out
    verbosity = transformers.logging.get_verbosity()
    try:  # an early stop is a warning (as its violations are), whatever the log level
        with pytest.warns(STSNegativeTransferWarning, match="STS: early stop at step 2"):
            make_trainer(tmp_path / "stops", tokenizer, make_callback(protected=["food"], max_sts=1e-12,
                                                                      early_stop=True, patience=2, recheck_steps=1),
                         save_strategy="no", disable_tqdm=True, log_level="error").train()
    finally:
        transformers.logging.set_verbosity(verbosity)
    capsys.readouterr()
    with warnings.catch_warnings():  # warnings filtered away (a notebook's, a cluster's): the stop is still said
        warnings.simplefilter("ignore")
        make_trainer(tmp_path / "ignored", tokenizer, make_callback(protected=["food"], max_sts=1e-12,
                                                                    early_stop=True, patience=2, recheck_steps=1),
                     save_strategy="no", disable_tqdm=True).train()
    assert "STS: early stop at step 2" in capsys.readouterr().out


def test_warnings_reach_a_log_file_once_in_order_and_not_twice_on_the_console(tmp_path, tokenizer):
    import logging

    from sts_callback.integrations import session

    logger = logging.getLogger("sts_callback")  # as the root logger of a script (pytest holds the real root's)
    console, log_file = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "run.log")
    logger.addHandler(console)
    logger.propagate = False
    try:
        assert not session._logs_beyond_the_console()  # basicConfig's handler: the warning is on the console already
        logger.addHandler(log_file)
        assert session._logs_beyond_the_console()
        callback = make_callback(protected=["food"], max_sts=1e-12, early_stop=True, patience=1, recheck_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(tmp_path, tokenizer, callback, save_strategy="no").train()
    finally:
        logger.removeHandler(console)
        logger.removeHandler(log_file)
        logger.propagate = True
        log_file.close()
    lines = (tmp_path / "run.log").read_text().splitlines()
    violation = next(i for i, line in enumerate(lines) if "re-checked STS of protected domain" in line)
    stop = next(i for i, line in enumerate(lines) if line.startswith("STS: early stop at step"))
    assert violation < stop  # the stop after the warning that caused it


def test_train_start_warnings_come_from_the_main_process_only(tmp_path):
    from transformers import TrainerState, TrainingArguments

    from sts_callback.integrations.callback import _warn_about_the_schedule

    args = TrainingArguments(output_dir=str(tmp_path), save_strategy="no", report_to=[])
    for is_main, expected in ((False, 0), (True, 1)):
        callback = make_callback()
        callback.session.is_main = is_main
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _warn_about_the_schedule(callback.session, args, TrainerState(max_steps=6))
        assert len(sts_warnings(caught, "save_strategy='no'")) == expected


@pytest.mark.parametrize("evaluations, eval_steps, epochs, warned", [
    ("steps", 2, 1, False), ("steps", 6, 1, True), ("epoch", None, 3, False), ("epoch", None, 1, True),
    ("no", None, 3, True)])
def test_a_run_that_evaluates_during_training_is_not_told_it_is_rechecked_only_at_its_end(
        tmp_path, evaluations, eval_steps, epochs, warned):
    """Every evaluation re-checks (the eval_sts_* keys): save_strategy='no' with evaluations every 2 of 6 steps was
    warned "re-checked only at its end, no warning or early stop can come", then re-checked and stopped at step 4."""
    from transformers import TrainerState, TrainingArguments

    from sts_callback.integrations.callback import _warn_about_the_schedule

    args = TrainingArguments(output_dir=str(tmp_path), save_strategy="no", eval_strategy=evaluations,
                             eval_steps=eval_steps, report_to=[])
    state = TrainerState(max_steps=6, eval_steps=eval_steps, num_train_epochs=epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_about_the_schedule(make_callback().session, args, state)
    assert bool(sts_warnings(caught, "re-checked only at its end")) == warned


# ------------------------------------------------------------------------------------------- 6. evaluation
class LoggedKeys(TrainerCallback):
    """What trackers (W&B, TensorBoard) receive: the logs handed to on_log."""

    def __init__(self):
        self.evaluations = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            self.evaluations.append(dict(logs))


@pytest.mark.parametrize("early_stopping_first", [False, True])
def test_eval_keys_exist_at_every_evaluation_in_any_callback_order(tmp_path, tokenizer, early_stopping_first):
    model = pretrained_tiny_model(tokenizer)
    callback = make_callback(protected=["food"])
    logged = LoggedKeys()
    stopper = EarlyStoppingCallback(early_stopping_patience=1)
    args = dict(output_dir=str(tmp_path / "run"), max_steps=12, save_steps=4, eval_steps=3, eval_strategy="steps",
                logging_steps=1, use_cpu=True, report_to=[], per_device_train_batch_size=4, learning_rate=3e-2,
                metric_for_best_model="eval_sts_protected_loss_delta", greater_is_better=False,
                save_strategy="steps")
    callbacks = [stopper, callback, logged] if early_stopping_first else [callback, stopper, logged]
    trainer = Trainer(model=model, args=TrainingArguments(**args),
                      train_dataset=tokenized(tokenizer, domain_texts("law", 64, seed=8)),
                      eval_dataset=tokenized(tokenizer, domain_texts("law", 8, seed=4)),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                      callbacks=callbacks)
    trainer.train()  # KeyError at the first evaluation before the fix (eval at 3, first re-check at 4)
    assert logged.evaluations
    for logs in logged.evaluations:  # the keys reach the trackers
        assert {f"eval_sts_loss_delta_{d}" for d in DOMAINS} | {"eval_sts_protected_loss_delta"} <= set(logs)
    # the protected domain gets worse at every evaluation: early stopping must act, in either order
    assert trainer.state.global_step < 12
    assert stopper.early_stopping_patience_counter >= 1


def test_eval_keys_per_eval_set_when_there_are_several(tmp_path, tokenizer):
    callback = make_callback(protected=["food"])
    logged = LoggedKeys()
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[logged], eval_strategy="steps",
                           eval_steps=3, metric_for_best_model="eval_sts_protected_loss_delta",
                           greater_is_better=False, eval_texts=domain_texts("law", 4))
    trainer.eval_dataset = {"a": tokenized(tokenizer, domain_texts("law", 4)),
                            "b": tokenized(tokenizer, domain_texts("food", 4))}
    trainer.train()
    keys = set().union(*[set(e) for e in trainer.state.log_history if "eval_a_loss" in e or "eval_b_loss" in e])
    assert {"eval_a_sts_protected_loss_delta", "eval_b_sts_protected_loss_delta"} <= keys
    assert [r["step"] for r in callback.history] == [2, 3, 4, 6]  # one re-check per step, shared by both sets


# ------------------------------------------------------------------------------------------- 7. datasets
def test_streaming_train_dataset_is_forecast(tmp_path, tokenizer):
    texts = domain_texts("law", 64)

    def rows():
        for text in texts:
            yield dict(tokenizer(text))

    stream = IterableDataset.from_generator(rows)
    callback = make_callback()
    trainer = Trainer(model=make_model("llama"),
                      args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                                             use_cpu=True, report_to=[], per_device_train_batch_size=4,
                                             learning_rate=1e-2),
                      train_dataset=stream, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert callback.forecast is not None and set(callback.forecast.domains) == set(DOMAINS)
    assert [r["step"] for r in callback.history] == [2, 4]


def test_trainer_eval_datasets_as_target_domains(tmp_path, tokenizer):
    callback = make_callback(target_domains="eval_dataset", protected=["food"])
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=2)
    trainer.eval_dataset = {d: tokenized(tokenizer, domain_texts(d, 30)) for d in ("food", "chem")}
    trainer.train()
    assert set(callback.forecast.domains) == {"food", "chem"}
    assert set(callback.history[-1]["loss_delta"]) == {"food", "chem"}


def test_tokenized_dataset_as_a_target_domain(tmp_path, tokenizer):
    domains = {"law": domain_texts("law", 30), "food": tokenized(tokenizer, domain_texts("food", 30)),
               "chem": Dataset.from_dict({"text": domain_texts("chem", 30)})}
    callback = make_callback(target_domains=domains)
    make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=2).train()
    assert set(callback.history[-1]["loss_delta"]) == {"law", "food", "chem"}
    assert callback.forecast.domains["food"].tokens > 0


def test_eval_dataset_target_errors_are_early_and_named(tmp_path, tokenizer):
    with pytest.raises(STSConfigError, match="'eval_dataset' for the trainer's eval"):
        STSCallback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), target_domains="law.jsonl")
    trainer = make_trainer(tmp_path, tokenizer, make_callback(target_domains="eval_dataset"), max_steps=2)
    with pytest.raises(STSConfigError, match="trainer has no eval_dataset"):
        trainer.train()
    assert trainer.state.global_step == 0
    trainer = make_trainer(tmp_path, tokenizer, make_callback(target_domains="eval_dataset", protected=["law"]),
                           max_steps=2, eval_texts=domain_texts("food", 8))
    with pytest.raises(STSConfigError, match=r"protected=\['law'\] are not among the target domains \['eval'\]"):
        trainer.train()



# ------------------------------------------------------------------------------------------- SAE fit
def test_sae_fit_is_recorded_at_start_and_every_recheck(tmp_path, tokenizer):
    from tiny import ExactSAE

    callback = make_callback(sae=ExactSAE(32, hook_name="blocks.1.hook_resid_post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)  # a lossless SAE fits: no fit warning
        make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_steps=2).train()
    assert callback.base_fit["fvu"] < 1e-10 and callback.base_fit["tokens"] > 0
    assert callback.base_fit["l0"] > 0
    for record in callback.history:
        assert record["sae_fit"]["fvu"] < 1e-10 and record["sae_fit"]["tokens"] == callback.base_fit["tokens"]
    logged = [e for e in callback._trainer.state.log_history if "sts/sae_fit/fvu" in e]
    assert [e["step"] for e in logged] == [2, 4]


def test_an_sae_that_does_not_fit_the_model_is_warned_about_at_train_start(tmp_path, tokenizer):
    from tiny import ExactSAE

    callback = make_callback(sae=ExactSAE(32, hook_name="blocks.1.hook_resid_post", noise=1.0))
    with pytest.warns(STSDataWarning, match="reconstructs this model's residual stream poorly") as caught:
        make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=2).train()
    # once, on the training probe (the train-start forecast, which checks the fit on its own, leaves it to it)
    assert [str(w.message) for w in caught if "poorly" in str(w.message)] == [
        m for m in [str(w.message) for w in caught] if "on the training probe" in m]
    assert sum("poorly" in str(w.message) for w in caught) == 1
    assert callback.base_fit["fvu"] > 0.6
    # and the report says so (it said "No warnings." beside scores read through an SAE that reconstructs nothing)
    report = (tmp_path / "run" / "sts" / "report.md").read_text()
    assert "train start: The SAE reconstructs this model's residual stream poorly" in report
    assert "fit:start" in callback.warned


# ------------------------------------------------------------------------------------------- accuracy targets
def test_multiple_choice_domain_is_scored_and_its_drop_is_a_violation(tmp_path, tokenizer):
    import random

    rng = random.Random(0)
    words = {d: domain_texts(d, 40, seed=11) for d in ("food", "chem")}
    items = []  # "which domain does this text come from": the pretrained tiny model knows the vocabularies
    for i in range(40):
        domain = ("food", "chem")[i % 2]
        items.append({"question": words[domain][i], "choices": ["cook bake", "cell protein"],
                      "answer": 0 if domain == "food" else 1})
    rng.shuffle(items)
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    callback = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": str(path),
                                             "chem": domain_texts("chem", 30)},
                             protected=["quiz"], tolerance=10.0, accuracy_tolerance=0.0, accuracy_items=24)
    model = pretrained_tiny_model(tokenizer)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, texts=domain_texts("law", 64, seed=8),
                           learning_rate=3e-2, max_steps=4, save_steps=2)
    with pytest.warns(STSNegativeTransferWarning, match="accuracy of protected domain 'quiz' fell"):
        trainer.train()
    base = callback.base_accuracy["quiz"]
    assert 0.0 <= base <= 1.0 and set(callback.base_accuracy) == {"quiz"}
    assert sum(callback.base_answers["quiz"]) / 24 == base  # the items the start answered right, kept for resumes
    for record in callback.history:
        assert set(record["accuracy"]) == {"quiz"} and record["accuracy_items"] == {"quiz": 24}
        assert record["accuracy_delta"]["quiz"] == pytest.approx(record["accuracy"]["quiz"] - base)
        low, high = record["accuracy_delta_ci"]["quiz"]  # over the same 24 items: paired, never wider than +-1
        assert -1 <= low < record["accuracy_delta"]["quiz"] < high <= 1 and high - low > 2 / 24
        dropped = record["accuracy_delta"]["quiz"] < 0
        assert any("accuracy of protected domain 'quiz' fell" in v for v in record["violations"]) == dropped
        if dropped:
            [said] = [v for v in record["violations"] if "accuracy" in v]
            assert f"(95% interval {low * 100:+.1f} to {high * 100:+.1f} points over 24 items" in said
    assert "quiz" in callback.forecast.domains and "quiz" in callback.history[-1]["loss"]
    logged = [e for e in trainer.state.log_history if "sts/accuracy/quiz" in e]
    assert [e["step"] for e in logged] == [0, 2, 4]  # the chart starts from train start
    assert logged[0]["sts/accuracy/quiz"] == base
    assert [e["sts/accuracy_delta/quiz"] for e in logged[1:]] == [r["accuracy_delta"]["quiz"] for r in callback.history]
    # the pretrained model answers most items; training on law at a high rate costs it accuracy: a violation
    assert base > 0.7 and callback.history[-1]["accuracy_delta"]["quiz"] < 0
    sts = tmp_path / "run" / "sts"
    last = callback.history[-1]
    low, high = last["accuracy_delta_ci"]["quiz"]
    shown = (f"quiz {last['accuracy']['quiz']:.1%} ({last['accuracy_delta']['quiz'] * 100:+.1f} points "
             f"[{low * 100:+.1f}, {high * 100:+.1f}] of 24 items)")
    assert shown in (sts / "report.md").read_text() and shown in (sts / "report.html").read_text()
    assert json.loads((sts / "settings.json").read_text())["accuracy_tolerance"] == 0.0
    # 24 items against a 2-point tolerance: one item is 4.2 points, so a single flip breaks the rule: said at start
    coarse = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": str(path)}, protected=["quiz"],
                           accuracy_tolerance=0.02, accuracy_items=24)
    with pytest.warns(STSDataWarning, match=r"'quiz' is scored on 24 multiple-choice item\(s\), so one item flipping "
                                            r"moves its accuracy by 4.2 points, more than accuracy_tolerance \(2.0"):
        make_trainer(tmp_path / "coarse", tokenizer, coarse, model=model, max_steps=1, save_strategy="no").train()


@pytest.mark.parametrize("restore", [False, True])
def test_a_resumed_run_keeps_the_accuracy_changes_interval(tmp_path, tokenizer, restore):
    """The interval pairs each item's answer now with the train start's: a resume reads those answers back (with
    or without restore_callback_states_from_checkpoint), or its re-checks would have no interval."""
    quiz = [{"question": w, "choices": ["cook bake", "cell protein"], "answer": 0}
            for w in domain_texts("food", 16, seed=11)]
    settings = dict(target_domains={"law": domain_texts("law", 30), "quiz": quiz}, protected=["quiz"],
                    accuracy_tolerance=math.inf)
    make_trainer(tmp_path, tokenizer, make_callback(**settings), max_steps=4, save_steps=2).train()
    callback = make_callback(**settings)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_steps=2,
                           restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STSCallback))
    last = callback.history[-1]
    assert last["step"] == 4 and len(callback.base_answers["quiz"]) == 16
    low, high = last["accuracy_delta_ci"]["quiz"]
    assert low <= last["accuracy_delta"]["quiz"] <= high and last["accuracy_items"] == {"quiz": 16}


def test_a_multiple_choice_dataset_in_arcs_layout_is_a_scored_target(tmp_path, tokenizer):
    """An MMLU-like datasets.Dataset target (which the README lists) was refused when the callback was built: its
    columns had no 'text'; ARC's and HellaSwag's layouts too."""
    from datasets import Dataset

    words = domain_texts("food", 20, seed=11)
    quiz = Dataset.from_list([{"question": w, "choices": {"text": ["cook bake", "cell protein"], "label": ["A", "B"]},
                               "answerKey": "A"} for w in words])
    callback = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": quiz})
    make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=2).train()
    assert set(callback.base_accuracy) == {"quiz"} and set(callback.history[-1]["accuracy"]) == {"quiz"}


# ------------------------------------------------------------------------------------------- 7. run shapes
def test_epoch_checkpoints_are_rechecked_and_carry_the_history(tmp_path, tokenizer):
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=-1, num_train_epochs=3, save_strategy="epoch",
                           texts=domain_texts("law", 8))  # 2 steps an epoch
    trainer.train()
    assert [r["step"] for r in callback.history] == [2, 4, 6]
    for step in (2, 4, 6):  # each checkpoint's trainer_state.json holds the re-checks up to its step
        state = json.loads((tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        saved = state["stateful_callbacks"]["STSCallback"]["attributes"]["history"]
        assert [r["step"] for r in saved] == list(range(2, step + 1, 2))


@pytest.mark.parametrize("settings, message", [
    ({"save_strategy": "no"}, "re-checked only at its end"),
    ({"recheck_steps": 10}, "not shorter than this run's 6 steps"),
    ({"save_steps": 500}, "save_steps=500 is not shorter than this run's 6 steps"),  # transformers' default
    ({"save_steps": 6}, "save_steps=6 is not shorter"),
    ({"save_strategy": "epoch", "max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 16},
     "save_strategy='epoch' and this run has 1 epoch"),
])
def test_a_schedule_that_rechecks_only_at_the_end_is_warned_at_train_start(tmp_path, tokenizer, settings, message):
    callback = make_callback(**{k: v for k, v in settings.items() if k == "recheck_steps"})
    trainer = make_trainer(tmp_path, tokenizer, callback, **{k: v for k, v in settings.items() if k != "recheck_steps"})
    with pytest.warns(STSDataWarning, match=message):
        trainer.train()
    assert [r["step"] for r in callback.history] == [trainer.state.max_steps]


def test_a_run_without_any_recheck_is_not_told_it_is_rechecked_at_its_end(tmp_path, tokenizer):
    callback = make_callback(recheck_at_end=False)
    trainer = make_trainer(tmp_path, tokenizer, callback, save_strategy="no")
    with pytest.warns(STSDataWarning, match=r"never re-checked \(recheck_at_end=False\)") as caught:
        trainer.train()
    assert not sts_warnings(caught, "re-checked only at its end") and callback.history == []


def test_a_schedule_with_rechecks_before_the_end_is_not_warned_about(tmp_path, tokenizer):
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, save_strategy="epoch", max_steps=-1, num_train_epochs=2,
                           per_device_train_batch_size=16)  # 64 texts: 4 steps an epoch
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        trainer.train()
    assert [r["step"] for r in callback.history] == [4, 8]


def test_one_callback_reused_for_a_second_run_monitors_it_afresh(tmp_path, tokenizer):
    callback = make_callback(recheck_steps=2, protected=["food"])
    make_trainer(tmp_path / "a", tokenizer, callback, max_steps=4).train()
    first = callback.history
    make_trainer(tmp_path / "b", tokenizer, callback, max_steps=4).train()
    assert [r["step"] for r in callback.history] == [2, 4] and callback.history is not first
    assert history_steps(tmp_path / "b" / "run" / "sts" / "history.jsonl") == [2, 4]
    assert [r["step"] for r in first] == [2, 4]  # the first run's records are its own


def test_a_new_run_in_an_earlier_runs_folder_does_not_take_its_forecast(tmp_path, tokenizer):
    make_trainer(tmp_path, tokenizer, make_callback(), max_steps=2, save_steps=2).train()
    out = tmp_path / "run" / "sts"
    earlier = json.loads((out / "forecast.json").read_text())
    # the next run in the same output_dir has prompt-only data: its forecast is skipped; the earlier run's
    # forecast.json stayed and was reported (and read back on a resume) as this run's
    callback = make_callback(train_probe=[{"prompt": t} for t in domain_texts("food", 20)])
    make_trainer(tmp_path, tokenizer, callback, max_steps=2, save_steps=2).train()
    assert callback.forecast is None and not (out / "forecast.json").exists()
    archived = list(out.glob("forecast.*.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text()) == earlier
    assert len(list(out.glob("history.2*.jsonl"))) == 1 and history_steps(out / "history.jsonl") == [2]


def test_an_interrupted_runs_report_is_archived_with_every_re_check_its_history_holds(tmp_path, tokenizer):
    """A run stopped (Ctrl-C) after a re-check whose report the throttle had not yet written, then re-checked by
    an evaluation: the next run archived the earlier history (2 re-checks) beside a report of 1."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 3:
                raise KeyboardInterrupt

    callback, stop = make_callback(recheck_steps=2, protected=["food"]), CtrlC()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, extra_callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.evaluate(trainer.train_dataset)  # re-checks step 3 after the report was written
    out = tmp_path / "run" / "sts"
    assert history_steps(out / "history.jsonl") == [2, 3]
    stop.armed = False
    trainer.train()
    (report,) = out.glob("report.2*.md")
    (history,) = out.glob("history.2*.jsonl")
    assert history_steps(history) == [2, 3] and "step 3" in report.read_text()


def test_two_callbacks_in_one_folder_are_refused_and_in_their_own_folders_both_run(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, make_callback(), extra_callbacks=[make_callback()], max_steps=2)
    with pytest.raises(STSConfigError, match="2 STSCallbacks on this trainer write to the same folder.*output_subdir"):
        trainer.train()
    assert not (tmp_path / "run" / "sts").exists()  # refused before any work
    law = make_callback(protected=["law"])
    food = make_callback(output_subdir="sts_food", target_domains={"food": domain_texts("food", 30)})
    make_trainer(tmp_path, tokenizer, law, extra_callbacks=[food], max_steps=2, save_steps=2).train()
    assert set(law.history[-1]["loss"]) == set(DOMAINS) and set(food.history[-1]["loss"]) == {"food"}
    assert json.loads((tmp_path / "run" / "sts_food" / "settings.json").read_text())["protected"] == []
    assert json.loads((tmp_path / "run" / "sts" / "settings.json").read_text())["protected"] == ["law"]


def test_restored_callback_takes_the_objects_of_the_instance_it_replaces(tmp_path, tokenizer):
    make_trainer(tmp_path, tokenizer, make_callback(), max_steps=2, save_steps=2).train()
    mine = make_callback()
    other = make_callback(sae=TinySAE(32, 64, hook_name="blocks.2.hook_resid_post"))  # e.g. the next run's
    trainer = make_trainer(tmp_path, tokenizer, mine, max_steps=4, save_steps=2,
                           restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STSCallback))
    assert restored is not mine and restored.sae is mine.sae and restored.sae is not other.sae
    assert [r["step"] for r in mine.history] == [2, 4]  # the instance the user holds sees the resumed run


def test_resume_into_another_output_dir_takes_the_checkpoints_run(tmp_path, tokenizer):
    first = make_callback()
    make_trainer(tmp_path / "a", tokenizer, first, max_steps=4, save_steps=2).train()
    second = make_callback()
    trainer = make_trainer(tmp_path / "b", tokenizer, second, max_steps=4, save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-2"))
    assert second.base_losses == first.base_losses
    out = tmp_path / "b" / "run" / "sts"
    assert history_steps(out / "history.jsonl") == [2, 4] and (out / "forecast.json").exists()
    assert history_steps(tmp_path / "a" / "run" / "sts" / "history.jsonl") == [2, 4]  # the origin untouched


def test_a_failed_recheck_at_an_evaluation_gives_nan_not_an_earlier_value(tmp_path, tokenizer):
    from test_callback import Arm, FailingSAE

    sae = FailingSAE(32, 64, hook_name="blocks.1.hook_resid_post")
    callback = make_callback(sae=sae, protected=["food"], recheck_steps=2)
    logged = LoggedKeys()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_steps=100, eval_strategy="steps",
                           eval_steps=3, eval_texts=domain_texts("law", 8), extra_callbacks=[logged])

    class FailFromStep3(Arm):
        def on_step_begin(self, args, state, control, **kwargs):
            self.sae.fail = state.global_step >= 2  # steps 3 and 4 fail

    trainer.add_callback(FailFromStep3(sae))
    with pytest.warns(RuntimeWarning, match="failed and was skipped"):
        trainer.train()
    assert [("error" in r) for r in callback.history] == [False, True, True]
    assert len(logged.evaluations) == 2  # at steps 3 and 4 (the last)
    assert all(math.isnan(e["eval_sts_protected_loss_delta"]) for e in logged.evaluations)


@pytest.mark.parametrize("settings, message", [
    ({"protected": "food"}, r"got 'food' \(one domain: protected=\['food'\]\)"),
    ({"protected": ["food", "food"]}, r"protected names \['food'\] more than once"),
    ({"early_stop": True}, "with no protected domain would never stop the run"),
    ({"strict": "no"}, "strict must be True or False"),
    ({"output_subdir": None}, "output_subdir must name a folder inside the run's output_dir"),
    ({"output_subdir": "../elsewhere"}, "output_subdir must name a folder inside the run's output_dir"),
])
def test_callback_settings_of_the_wrong_kind_are_refused_at_construction(settings, message):
    with pytest.raises(STSConfigError, match=message):
        make_callback(**settings)


def test_numpy_numbers_are_numbers_to_the_callback():
    import numpy as np

    callback = make_callback(recheck_steps=np.arange(2, 9, 2), loss_tokens=np.int64(120), tolerance=np.float32(0.05),
                             protected=None)
    assert callback.session.settings.recheck_steps == (2, 4, 6, 8) and callback.protected == []
    assert make_callback(recheck_steps=np.int64(5)).session.settings.recheck_steps == 5
    json.dumps(callback.state())  # exported to trainer_state.json: plain numbers only


@pytest.mark.parametrize("settings, message", [
    ({"target_domains": {"law": "", "food": domain_texts("food", 30)}}, "An empty path or name for target 'law'"),
    ({"target_domains": {1: domain_texts("law", 30), "1": domain_texts("food", 30)}}, "two entries named '1'"),
    ({"train_probe": []}, "train_probe is empty; give it at least one text"),
])
def test_unusable_data_is_named_before_any_step(tmp_path, tokenizer, settings, message):
    with pytest.raises(STSInputError, match=message):  # at construction where no file must be read to tell
        make_trainer(tmp_path, tokenizer, make_callback(**settings), max_steps=2).train()


@pytest.mark.parametrize("settings, message", [
    ({"sae": "/nonexistent/sae"}, "is not a folder"),
    ({"sae": ""}, r"The SAE path is empty \(''"),  # os.environ.get("SAE_DIR", ""): Path("") is the current folder
    ({"target_domains": {"law": "evals/law.jsonl"}},
     r"does not exist \(a relative path is read from the working folder, .*\); check the path"),
    ({"target_domains": ["pythn_code"]}, "neither an existing file nor a registered domain"),
    ({"target_domains": {"law": 5}}, "Cannot use int"),
    ({"train_probe": "nope.jsonl"}, "does not exist"),
])
def test_a_missing_path_or_typo_is_refused_at_construction(settings, message):
    """Known without reading any file: said before the user builds the model and the Trainer."""
    with pytest.raises(STSInputError, match=message):
        make_callback(**settings)


# ------------------------------------------------------------------------------- faults (new-user hunt)
def test_relative_and_home_paths_are_read_from_where_the_callback_was_made(tmp_path, tokenizer, monkeypatch):
    from sts_callback.core.data import anchored

    data = tmp_path / "data"
    data.mkdir()
    for name in DOMAINS:
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts(name, 30)))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(data)
    first, *others = DOMAINS
    callback = make_callback(target_domains={first: f"{first}.jsonl",
                                             **{name: f"~/data/{name}.jsonl" for name in others}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a notebook's %cd, Hydra's run folder, a launcher
    make_trainer(tmp_path, tokenizer, callback, save_strategy="no").train()
    assert set(callback.base_losses) == set(DOMAINS)
    (elsewhere / "legal").mkdir()  # a folder named like a registered domain is not its data
    assert anchored("legal") == "legal" and anchored("no/such/file.jsonl") == "no/such/file.jsonl"
    (elsewhere / "tasks").mkdir()  # an lm-eval target's task folder too
    callback = make_callback(target_domains={"quiz": {"lm_eval": "quiz", "include_path": "tasks"}, "law": "legal"})
    assert callback.target_domains["quiz"]["include_path"] == str(elsewhere / "tasks")


def test_a_violation_in_progress_survives_the_trainers_own_restore_of_the_callback_state():
    callback = make_callback(protected=["food"])
    callback.violating = ["loss:food"]  # as the Trainer sets the exported attributes back on resume
    assert callback.session.guard.violating == ["loss:food"] and "violating" in callback.session.counters()


def crash_at_forward(model, number):
    """The model's ``number``-th training forward raises (a device error mid-run)."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        if module.training:
            calls["n"] += 1
            if calls["n"] == number:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


@pytest.mark.parametrize("lost", ["write failed", "file cut"])
def test_a_resume_whose_checkpoint_lacks_the_sts_state_keeps_its_early_stop_counters(tmp_path, tokenizer,
                                                                                      monkeypatch, lost):
    """The STS state of checkpoint-4 was not written (a full disk, warned) or was cut; the run crashed at step 5.
    The resume took the run folder's train-start counters: violations in a row restarted at 0 and early stop
    (patience 3: violations at 2, 4, 6) never fired. The Trainer's trainer_state.json holds them too."""
    settings = dict(protected=["law"], max_sts=1e-9, patience=3, early_stop=True)
    real = RunStore.write_state

    def write_state(self, state):
        if lost == "write failed" and "checkpoint-4" in str(self.root):
            raise OSError(28, "No space left on device")
        return real(self, state)

    monkeypatch.setattr(RunStore, "write_state", write_state)
    model = crash_at_forward(make_model("llama"), 5)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="illegal memory access"):
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, tokenizer, make_callback(**settings), model=model, max_steps=8).train()
    monkeypatch.setattr(RunStore, "write_state", real)
    state_file = tmp_path / "run" / "checkpoint-4" / "sts" / "callback_state.json"
    if lost == "file cut":
        state_file.write_text(state_file.read_text()[:40])
    callback = make_callback(**settings)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert trainer.state.global_step == 6 and "early stop at step 6" in callback.stop_reason


def test_a_resume_under_other_rules_counts_the_kept_violations_by_them_and_says_so(tmp_path, tokenizer):
    """Resumed with a rule the run did not have (max_sts), the kept re-checks at steps 2 and 4 break it too: with
    patience 3 the run stops at step 6. The checkpoint's count (0, under the old rules) stopped it two re-checks
    late, and nothing said the rules changed."""
    first = dict(protected=["law"], tolerance=math.inf, early_stop=True, patience=3)
    make_trainer(tmp_path, tokenizer, make_callback(**first), max_steps=8).train()
    callback = make_callback(**{**first, "max_sts": 1e-9})
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=8)
    with pytest.warns(STSDataWarning, match=r"resuming under other rules than the run's \(max_sts None -> 1e-09\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert trainer.state.global_step == 6 and "early stop at step 6 after 3 consecutive" in callback.stop_reason


def test_an_early_stop_names_the_checkpoint_saved_before_the_harm(tmp_path, tokenizer, monkeypatch):
    """Stopped at step 6 (not a save step: checkpoints every 4), the harmed weights were only in memory and nothing
    said which checkpoint predates the harm; a save_model() then saved the harmed model as the result."""
    from sts_callback.pipelines.monitor import Monitor

    callback = make_callback(protected=["food"], tolerance=0.3, early_stop=True, recheck_steps=2)
    trainer = make_trainer(tmp_path / "a", tokenizer, callback, max_steps=8, save_steps=4)
    real = Monitor.recheck

    def harmed_from_step_5(self, *args, **kwargs):  # food's loss rises by half from step 5 on
        result = real(self, *args, **kwargs)
        if trainer.state.global_step >= 5:
            result.loss_delta["food"] = 0.5
        return result

    monkeypatch.setattr(Monitor, "recheck", harmed_from_step_5)
    with pytest.warns(STSNegativeTransferWarning) as caught:
        trainer.train()
    assert trainer.state.global_step == 6
    [said] = [str(w.message) for w in caught if "holds the harmed weights" in str(w.message)]
    assert "the last re-check that broke no rule was at step 4" in said
    assert str(tmp_path / "a" / "run" / "checkpoint-4") in said


@pytest.mark.parametrize("every, metric, harmed_from, said_here", [
    (2, None, 3, "loads its best checkpoint by metric_for_best_model='loss' at train end"),
    (2, "eval_sts_protected_loss_delta", 3, "chosen by a protected domain's change"),
    (4, None, 1, "holds the harmed weights"),  # stopped before any evaluation: no best checkpoint to load
])
def test_an_early_stop_under_load_best_model_at_end_says_which_weights_the_trainer_keeps(
        tmp_path, tokenizer, monkeypatch, every, metric, harmed_from, said_here):
    """With load_best_model_at_end the Trainer swaps in its best checkpoint at train end, if it has one: the stop
    said the model in memory holds the harmed weights, which was no longer so, and not whether the metric that
    chose the checkpoint saw the protected domain."""
    from sts_callback.pipelines.monitor import Monitor

    callback = make_callback(protected=["food"], tolerance=0.3, early_stop=True, recheck_steps=1 if every == 4 else 2)
    extra = {"metric_for_best_model": metric, "greater_is_better": False} if metric else {}
    trainer = make_trainer(tmp_path / "a", tokenizer, callback, max_steps=8, save_steps=every, eval_steps=every,
                           eval_strategy="steps", load_best_model_at_end=True, eval_texts=domain_texts("law", 8),
                           **extra)
    real = Monitor.recheck

    def harmed(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if trainer.state.global_step >= harmed_from:
            result.loss_delta["food"] = 0.5
        return result

    monkeypatch.setattr(Monitor, "recheck", harmed)
    with pytest.warns(STSNegativeTransferWarning) as caught:
        trainer.train()
    [said] = [str(w.message) for w in caught
              if "early stop at step" in str(w.message) and "checkpoint" in str(w.message)]
    assert said_here in said
    if every == 2:
        assert "holds the harmed weights" not in said and trainer.state.best_model_checkpoint is not None
        assert ("eval_sts_protected_loss_delta', with greater_is_better=False" in said) == (metric is None)
    else:
        assert trainer.state.global_step == 1 and trainer.state.best_model_checkpoint is None


def disk_full_once_at(monkeypatch, step: int) -> list[int]:
    """The history write of ``step``'s re-check fails once (a disk full for a moment); returns the failures seen."""
    real, failed = RunStore.append_history, []

    def full_once(self, record):
        if record.get("step") == step and not failed:
            failed.append(step)
            raise OSError(28, "No space left on device")
        return real(self, record)

    monkeypatch.setattr(RunStore, "append_history", full_once)
    return failed


def test_a_history_write_that_fails_once_is_written_with_the_next_record(tmp_path, tokenizer, monkeypatch):
    """A disk full for a moment at step 2: that re-check (maybe a violation) was missing from the file, the report
    and any resume for good. It is written with the next one, and read back in step order."""
    failed = disk_full_once_at(monkeypatch, 2)
    callback = make_callback(recheck_steps=1)
    with pytest.warns(RuntimeWarning, match="could not write the re-check of step 2"):
        make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_strategy="no").train()
    store = RunStore(tmp_path / "run" / "sts")
    assert failed and [r["step"] for r in store.read_history()] == [r["step"] for r in callback.history] == [1, 2, 3, 4]


def test_the_last_rechecks_record_reaches_the_file_and_the_report_when_its_write_failed(tmp_path, tokenizer,
                                                                                       monkeypatch):
    """The folder refused writes during the last re-check only: its record was retried only with a next re-check,
    which never came, so the history file and the report ended a re-check short."""
    failed = disk_full_once_at(monkeypatch, 6)
    callback = make_callback()
    with pytest.warns(RuntimeWarning, match="could not write the re-check of step 6"):
        make_trainer(tmp_path, tokenizer, callback).train()
    assert failed and history_steps(tmp_path / "run" / "sts" / "history.jsonl") == [2, 4, 6]
    assert "last at step 6" in (tmp_path / "run" / "sts" / "report.md").read_text()


def test_a_record_whose_write_failed_is_in_the_file_when_its_checkpoint_is_saved(tmp_path, tokenizer, monkeypatch):
    """A failed history write at step 4, the checkpoint saved, the run dead at step 5: a resume rebuilds the
    history from the file, which lacked step 4 (a violation there was lost, the early-stop count said otherwise)."""
    failed = disk_full_once_at(monkeypatch, 4)

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("the machine went away")

    with pytest.warns(RuntimeWarning, match="could not write the re-check of step 4"), \
            pytest.raises(RuntimeError, match="went away"):
        make_trainer(tmp_path, tokenizer, make_callback(), extra_callbacks=[Crash()]).train()
    assert failed and history_steps(tmp_path / "run" / "sts" / "history.jsonl") == [2, 4]
    resumed = make_callback()
    make_trainer(tmp_path, tokenizer, resumed).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert [r["step"] for r in resumed.history] == [2, 4, 6]


@pytest.mark.parametrize("raised", ["violation", "failed re-check"])
def test_a_warning_turned_into_an_error_keeps_the_record_that_raised_it(tmp_path, tokenizer, monkeypatch, raised):
    """filterwarnings("error", ...) (a user's "stop on harm", or python -W error): the re-check's record was lost
    because the warning came before it was kept and written."""
    if raised == "violation":
        callback, category = make_callback(protected=["law"], max_sts=1e-9, recheck_steps=2), STSNegativeTransferWarning
    else:
        callback, category = make_callback(recheck_steps=2), RuntimeWarning

        def out_of_memory(*args, **kwargs):
            raise MemoryError("out of memory on a probe batch")

    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_strategy="no")
    if raised == "failed re-check":
        original = callback.session.__class__._measure
        monkeypatch.setattr(callback.session.__class__, "_measure",
                            lambda self, model, step: out_of_memory() if step == 2 else original(self, model, step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", category=category, message="STS re-check at step 2")
        with pytest.raises(category, match="STS re-check at step 2"):
            trainer.train()
    written = RunStore(tmp_path / "run" / "sts").read_history()
    assert [r["step"] for r in written] == [2]
    assert written[0].get("violations") if raised == "violation" else "MemoryError" in written[0]["error"]


def test_a_bare_error_in_the_step0_forecast_says_where_it_came_from_and_what_to_lower(tmp_path, tokenizer):
    sae = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    encode = sae.encode

    def out_of_memory(x):  # a batch of the forecast's, not load_sae's one-row check of encode's output
        if x.shape[0] > 1:
            raise MemoryError("out of memory in encode")
        return encode(x)

    sae.encode = out_of_memory
    trainer = make_trainer(tmp_path, tokenizer, make_callback(sae=sae), max_steps=2)
    with pytest.raises(MemoryError) as raised:
        trainer.train()
    assert trainer.state.global_step == 0
    assert "step-0 forecast" in " ".join(getattr(raised.value, "__notes__", [])) and "shift_tokens=" in \
        raised.value.__notes__[0]


@pytest.mark.parametrize("cut", ["checkpoint state", "checkpoint monitor", "run folder state", "forecast"])
def test_a_resume_meets_a_cut_sts_file_and_goes_on_or_names_it(tmp_path, tokenizer, cut):
    """A node crash can leave a file empty or cut: a bare JSONDecodeError / SafetensorError named nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, tokenizer, make_callback(protected=["law"]), max_steps=4).train()
    run = tmp_path / "run"
    path = {"checkpoint state": run / "checkpoint-4/sts/callback_state.json",
            "checkpoint monitor": run / "checkpoint-4/sts/monitor.safetensors",
            "run folder state": run / "sts/callback_state.json", "forecast": run / "sts/forecast.json"}[cut]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    callback = make_callback(protected=["law"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, tokenizer, callback, max_steps=6).train(resume_from_checkpoint=str(run / "checkpoint-4"))
    assert [r["step"] for r in callback.history] == [2, 4, 6]
    if cut != "checkpoint monitor":  # that one has the run folder's copy to fall back on, silently
        assert any(str(path) in str(w.message) for w in caught)
    assert (callback.forecast is None) == (cut == "forecast")


def test_a_strict_recheck_that_raises_still_says_its_warnings(tmp_path, tokenizer, monkeypatch):
    """strict=True: the violation found before the history write failed was held, then dropped with the error, and,
    its key spent, never said."""
    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunStore, "append_history", full_disk)
    callback = make_callback(strict=True, protected=["law"], max_sts=1e-9, recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_strategy="no")
    with pytest.warns(STSNegativeTransferWarning, match="STS re-check at step 2"), pytest.raises(OSError):
        trainer.train()


class PathLikeTracker(TrainerCallback):
    """A tracker that fails on some of the callback's keys, as DVCLive does on a domain name it reads as a path
    (its 'eval_' inside 'retrieval_qa' makes a folder of a number it already holds)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(key.startswith("sts/") and "retrieval_qa" in key for key in logs or {}):
            raise AttributeError("'float' object has no attribute 'copy'")


def test_a_tracker_that_fails_on_the_callbacks_own_metrics_does_not_kill_the_run(tmp_path, tokenizer):
    callback = make_callback(target_domains={"retrieval": domain_texts("law", 30),
                                             "retrieval_qa": domain_texts("food", 30)})
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[PathLikeTracker()], max_steps=4)
    with pytest.warns(RuntimeWarning, match="could not log its metrics to a tracker.*AttributeError"):
        trainer.train()
    assert trainer.state.global_step == 4 and [r["step"] for r in callback.history] == [2, 4]
    assert callback.write_errors and all(e["what"] == "tracker log of the sts metrics" for e in callback.write_errors)
    strict = make_callback(target_domains={"retrieval_qa": domain_texts("food", 30)}, strict=True)
    with pytest.raises(AttributeError):
        make_trainer(tmp_path / "strict", tokenizer, strict, extra_callbacks=[PathLikeTracker()], max_steps=2).train()


def test_a_callback_removed_from_the_trainer_adds_nothing_to_its_later_runs(tmp_path, tokenizer):
    """A notebook: train with callback A, remove_callback(A), add_callback(B), train again. A's evaluation keys
    (its stale protected change) and its re-checks against its own base must not reach B's run."""
    first = make_callback(protected=["law"])
    trainer = make_trainer(tmp_path, tokenizer, first, max_steps=4, eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=5))
    trainer.train()
    trainer.remove_callback(first)
    second = make_callback(protected=["law"], tolerance=0.5)
    trainer.add_callback(second)
    trainer.args.max_steps = 6
    trainer.train()
    assert [r["step"] for r in first.history] == [2, 4]
    lines = (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]
    evals = [e for e in trainer.state.log_history if "eval_loss" in e][-3:]
    assert [e["eval_sts_protected_loss_delta"] for e in evals] == [e["eval_sts_loss_delta_law"] for e in evals]


# ------------------------------------------------------------------------------- auto_find_batch_size
def out_of_memory_once_at(trainer, step):
    """The trainer's training step runs out of memory once, at ``step``, as a too-large batch on a GPU would."""
    train_step, raised = trainer.training_step, []

    def training_step(*args, **kwargs):
        if not raised and trainer.state.global_step + 1 == step:
            raised.append(step)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(*args, **kwargs)
    trainer.training_step = training_step


def test_a_batch_size_retry_is_the_same_run(tmp_path, tokenizer, monkeypatch):
    """auto_find_batch_size runs the loop again from step 0 after an out-of-memory error: it was taken for a new
    run (forecast again, the first attempt archived as an earlier run, the base losses measured on weights the
    attempt had trained)."""
    from sts_callback.integrations.session import STSSession

    starts = []
    start = STSSession.start
    monkeypatch.setattr(STSSession, "start", lambda self, *a, **k: starts.append(1) or start(self, *a, **k))
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, auto_find_batch_size=True)
    out_of_memory_once_at(trainer, 3)  # after the step-2 re-check and checkpoint
    base = {}

    class BaseLosses(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            base.setdefault("losses", dict(callback.base_losses))  # at the first attempt's first step
    trainer.add_callback(BaseLosses())
    trainer.train()
    folder = tmp_path / "run" / "sts"
    assert trainer.state.train_batch_size == 3 and len(starts) == 1
    assert callback.base_losses == base["losses"]  # measured once, before any training step
    assert history_steps(folder / "history.jsonl") == [2, 4, 6]
    assert [r["step"] for r in read_json_lines(folder / "history.superseded.jsonl")[0]] == [2]  # the abandoned one
    assert not list(folder.glob("history.2*")) and not list(folder.glob("forecast.2*"))  # nothing archived


@pytest.mark.parametrize("auto_find_batch_size", [True, False])
def test_sts_running_out_of_memory_is_not_retried_as_training(tmp_path, tokenizer, auto_find_batch_size):
    """STS's own out-of-memory error (here in the train-start forecast) made the batch-size finder retry the
    whole start at ever smaller batches, ending in 'No executable batch size found' with the cause lost."""
    from sts_callback import STSOutOfMemoryError

    class FailingSAE(TinySAE):
        def encode(self, x):
            if x.reshape(-1, x.shape[-1]).shape[0] > 1:  # not the SAE's one-row check at construction
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().encode(x)

    callback = make_callback(sae=FailingSAE(32, 64, hook_name="blocks.1.hook_resid_post"))
    trainer = make_trainer(tmp_path, tokenizer, callback, auto_find_batch_size=auto_find_batch_size,
                           per_device_train_batch_size=8)
    expected = STSOutOfMemoryError if auto_find_batch_size else RuntimeError
    with pytest.raises(expected, match=r"out of memory") as caught:
        trainer.train()
    assert trainer._train_batch_size == 8  # tried once
    if auto_find_batch_size:
        assert "shift_tokens" in str(caught.value) and not isinstance(caught.value, RuntimeError)
    else:  # as before: the original error, with the note naming what to lower
        assert "shift_tokens" in " ".join(getattr(caught.value, "__notes__", []))


def run_in_a_spawned_process(callback_bytes, folder):
    """A launcher's worker (torch.multiprocessing.spawn, Ray): the callback built outside arrives pickled."""
    import pickle as pickle_
    import sys as sys_

    sys_.path.insert(0, str(Path(__file__).parent))
    from test_callback import make_trainer as make_trainer_
    from tiny import make_tokenizer as make_tokenizer_

    import warnings as warnings_

    callback = pickle_.loads(callback_bytes)
    with warnings_.catch_warnings():  # a new run, not the copied finished one resumed
        warnings_.filterwarnings("error", message=r".*prepare\(\) after start")
        make_trainer_(Path(folder), make_tokenizer_(), callback, max_steps=4).train()


@pytest.mark.parametrize("when", ["new", "after_a_run"])
def test_a_callback_pickles_for_a_launcher_and_runs_there(tmp_path, tokenizer, when):
    """A new callback held a lambda (pickle, hence torch.multiprocessing.spawn, refused it); one that had run held
    weak references to the trainer, its state and its accelerator's autocast (cloudpickle refused it too)."""
    import multiprocessing
    import pickle

    callback = make_callback(recheck_steps=2)
    if when == "after_a_run":  # a notebook's smoke test first, then the same object to the launcher
        make_trainer(tmp_path / "here", tokenizer, callback, max_steps=2).train()
    process = multiprocessing.get_context("spawn").Process(target=run_in_a_spawned_process,
                                                           args=(pickle.dumps(callback), str(tmp_path / "there")))
    process.start()
    process.join(600)
    assert process.exitcode == 0
    assert history_steps(tmp_path / "there" / "run" / "sts" / "history.jsonl") == [2, 4]
    if when == "after_a_run":
        assert history_steps(tmp_path / "here" / "run" / "sts" / "history.jsonl") == [2]  # its own files stand


def test_an_sae_on_the_meta_device_is_refused_at_construction():
    """It failed at train start with torch's advice to call to_empty(), which gives uninitialised weights."""
    with pytest.raises(STSInputError, match="meta device"):
        make_callback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post").to("meta"))


def test_two_callbacks_resume_from_trainer_state_when_the_checkpoints_sts_state_was_not_written(tmp_path):
    """Stopped between the Trainer's save and STS's: each callback's state is read back from trainer_state.json.
    With two STSCallbacks the Trainer keeps a list of their states that each save extends, the first ones from
    before the train-start measurement: that empty state was taken, and the resume failed, saying the train-start
    losses were nowhere although the run folder held them."""
    from sts_callback.core.run_store import STATE_FILE

    tokenizer = make_tokenizer()

    def callbacks():
        return [make_callback(), make_callback(output_subdir="sts_b")]

    first = callbacks()
    make_trainer(tmp_path, tokenizer, first[0], extra_callbacks=first[1:], max_steps=4, save_steps=2).train()
    for subdir in ("sts", "sts_b"):
        (tmp_path / "run" / "checkpoint-4" / subdir / STATE_FILE).unlink()
    second = callbacks()
    make_trainer(tmp_path, tokenizer, second[0], extra_callbacks=second[1:], max_steps=6,
                 save_steps=2).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for before, after in zip(first, second):
        assert [r["step"] for r in after.history] == [2, 4, 6] and after.base_losses == before.base_losses


def test_an_evaluation_after_a_run_without_its_end_recheck_measures_nothing_new(tmp_path):
    """With recheck_at_end=False, trainer.evaluate() after train() ran a re-check of the ended run: a record
    appended after the report, with no sign the run had ended there (projected on as if training went on)."""
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    tokenizer = make_tokenizer()
    callback = make_callback(recheck_at_end=False)
    trainer = make_trainer(tmp_path, tokenizer, callback, eval_texts=domain_texts("food", 8),
                           extra_callbacks=[StopAt3()])
    trainer.train()
    steps = [r["step"] for r in callback.history]
    with pytest.warns(RuntimeWarning, match="no re-check measured"):
        metrics = trainer.evaluate()
    assert [r["step"] for r in callback.history] == steps == [2]
    assert all(math.isnan(v) for k, v in metrics.items() if "_sts_" in k)
