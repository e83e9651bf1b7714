"""Forecast, re-checks and the report reach W&B, TensorBoard and MLflow (``report_to``) on real Trainer runs."""

import gc
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_callback import DOMAINS, make_callback, make_trainer, tokenizer  # noqa: F401 - tokenizer is a fixture
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback

from sts_callback.reporting import trackers
from sts_callback.core.config import SCORE_VARIANTS
from sts_callback.pipelines.forecast import DomainForecast, Forecast
from sts_callback.scoring.signed import SIGNED_VARIANTS

BLOCKED = ("wandb", "tensorboard", "tensorboardX", "torch.utils.tensorboard", "mlflow")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline with every folder it writes in tmp_path; what the run logs is recorded on its way in."""
    wandb = pytest.importorskip("wandb")
    for name, folder in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                         ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                        ("WANDB_DISABLE_GIT", "true"), ("WANDB_DISABLE_CODE", "true"), ("WANDB_PROJECT", "sts-test"),
                        ("WANDB_X_DISABLE_STATS", "true"), ("WANDB_X_DISABLE_MACHINE_INFO", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_LOG_MODEL", raising=False)
    run_class = wandb.sdk.wandb_run.Run
    logged = SimpleNamespace(logs=[], artifacts=[])
    log, log_artifact = run_class.log, run_class.log_artifact

    def spy_log(self, data, *args, **kwargs):
        logged.logs.append((dict(data), args, kwargs))
        return log(self, data, *args, **kwargs)

    def spy_log_artifact(self, artifact, *args, **kwargs):
        logged.artifacts.append(artifact)
        return log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(run_class, "log", spy_log)
    monkeypatch.setattr(run_class, "log_artifact", spy_log_artifact)
    yield logged
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # the wandb-core service this test started


def table_rows(table):
    return [dict(zip(table.columns, row)) for row in table.data]


def test_wandb_gets_forecast_and_recheck_tables_and_the_report(tmp_path, tokenizer, offline_wandb):  # noqa: F811
    import wandb

    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, report_to=["wandb"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed export only warns: make it fail the test
        trainer.train()
    run_dir = wandb.run.dir
    wandb.finish()
    assert callback.write_errors == []
    # W&B's own step counts log calls: ours follow the WandbCallback's step metric and never pass step=
    assert all(kwargs.get("step") is None and not args for _, args, kwargs in offline_wandb.logs)
    trainer_steps = [data["train/global_step"] for data, _, _ in offline_wandb.logs]
    assert trainer_steps == sorted(trainer_steps)

    forecast_table = [(data["sts/forecast_table"], data["train/global_step"]) for data, _, _ in offline_wandb.logs
                      if "sts/forecast_table" in data]
    assert len(forecast_table) == 1 and forecast_table[0][1] == 0
    table = forecast_table[0][0]
    assert isinstance(table, wandb.Table)
    forecast = callback.forecast
    computed = [v for v in SCORE_VARIANTS + SIGNED_VARIANTS
                if any(d.scores.get(v) is not None for d in forecast.domains.values())]
    assert table.columns == ["rank", "domain", *computed, "texts", "tokens"]
    rows = table_rows(table)
    assert [(r["rank"], r["domain"]) for r in rows] == [(i, name) for i, (name, _) in enumerate(forecast.ranked(), 1)]
    for row in rows:
        domain = forecast.domains[row["domain"]]
        assert row["tokens"] == domain.tokens and all(row[v] == domain.scores[v] for v in computed)

    rechecks = [(data["sts/recheck_table"], data["train/global_step"]) for data, _, _ in offline_wandb.logs
                if "sts/recheck_table" in data]
    assert [step for _, step in rechecks] == [r["step"] for r in callback.history] == [2, 4]
    for (table, step), record in zip(rechecks, callback.history):
        per_domain = ["loss", "loss_delta", "loss_tokens", "loss_seconds", "loss_delta_se"] + (
            ["early_forecast"] if record.get("early_forecast") else [])
        variants = [v for v in computed if any(v in scores for scores in record["scores"].values())]
        # each interval as two columns beside the values (the report shows them; the table had none)
        bounds = ["loss_delta_ci"] + (["early_forecast_ci"] if record.get("early_forecast_ci") else [])
        ends = [f"{key}_{end}" for key in bounds for end in ("low", "high")]
        assert table.columns == ["step", "domain", *per_domain, *ends, *variants] and "sts_act" in variants
        rows = table_rows(table)
        assert sorted(r["domain"] for r in rows) == sorted(DOMAINS)
        for row in rows:
            name = row["domain"]
            assert row["step"] == step and all(row[key] == record[key][name] for key in per_domain)
            assert [row["loss_delta_ci_low"], row["loss_delta_ci_high"]] == list(record["loss_delta_ci"][name])
            assert all(row[v] == record["scores"][name][v] for v in variants)

    html_path = tmp_path / "run" / "sts" / "report.html"
    [artifact] = [a for a in offline_wandb.artifacts if a.type != "run_table"]  # W&B stores each table as one
    assert artifact.type == "sts-report"
    assert set(artifact.manifest.entries) == {"report.html"}
    assert artifact.manifest.entries["report.html"].size == html_path.stat().st_size
    [(html, step)] = [(data["sts/report"], data["train/global_step"]) for data, _, _ in offline_wandb.logs
                      if "sts/report" in data]
    assert isinstance(html, wandb.Html) and step == 4 and html.html == html_path.read_text()

    # what the offline run wrote: the tables and the page as W&B media files
    media = {path.name: path for path in (tmp_path / "wandb").rglob("*") if path.is_file()}
    assert any(name.startswith("forecast_table_") for name in media)
    forecast_json = json.loads(next(p for n, p in media.items() if n.startswith("forecast_table_")).read_text())
    assert forecast_json["columns"][:2] == ["rank", "domain"] and len(forecast_json["data"]) == len(DOMAINS)
    assert sum(name.startswith("recheck_table_") for name in media) == 2
    assert any(name.startswith("report_") and name.endswith(".html") for name in media)
    assert run_dir.startswith(str(tmp_path))


def event_texts(logdir):
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={TENSORS: 0})
    accumulator.Reload()
    return {tag.removesuffix("/text_summary"): [(event.step, event.tensor_proto.string_val[0].decode())
                                                for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"] if tag.endswith("/text_summary")}


def test_tensorboard_gets_forecast_and_recheck_text_in_the_trainers_event_file(tmp_path, tokenizer,  # noqa: F811
                                                                               monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, report_to=["tensorboard"])
    [tb_callback] = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
    assert callback.write_errors == []
    [logdir] = (tmp_path / "run" / "runs").iterdir()  # the Trainer's own log directory, no second one
    assert tb_callback.tb_writer is None  # the writer reopened for the report was closed again
    texts = event_texts(logdir)
    assert "args" in texts  # the TensorBoardCallback's own text: same event files

    [(step, forecast)] = texts["sts/forecast"]
    assert step == 0 and forecast.startswith("STS forecast: 3 target domains, ranked by")
    header, rule, *rows = forecast.split("\n\n", 1)[1].splitlines()
    assert header.startswith("| rank | domain |") and header.endswith("| texts | tokens |")
    assert rule.startswith("|---:|---|")
    ranked = [name for name, _ in callback.forecast.ranked()]
    assert [row.split(" | ")[:2] for row in rows] == [[f"| {i}", name] for i, name in enumerate(ranked, 1)]

    assert [step for step, _ in texts["sts/recheck"]] == [r["step"] for r in callback.history] == [2, 4]
    for (step, text), record in zip(texts["sts/recheck"], callback.history):
        overlap = f"{record['overlap_with_forecast']} of the {len(record['shifted_latents'])} most shifted latents"
        assert text.startswith(f"STS re-check at step {step}: {overlap} were forecast")
        table = [line for line in text.splitlines() if line.startswith("|")]
        assert table[0].startswith("| step | domain | loss | loss_delta |") and len(table) == 2 + len(DOMAINS)
        for line in table[2:]:
            cells = line.strip("| ").split(" | ")
            name = cells[1]
            assert cells[0] == str(step) and cells[2] == f"{record['loss'][name]:.4g}"

    [(step, pointer)] = texts["sts/report"]
    assert step == 4 and str(tmp_path / "run" / "sts" / "report.html") in pointer


def test_no_tracker_in_report_to_imports_and_creates_nothing(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    for name in BLOCKED:  # an import of any of them would raise, and the export would warn
        monkeypatch.setitem(sys.modules, name, None)
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=2, report_to=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
    assert callback.write_errors == [] and callback.history
    assert not (tmp_path / "run" / "runs").exists()  # no TensorBoard writer was made
    # asked for, but the tracker's callback is gone: still nothing
    trainer.args.report_to = ["wandb", "tensorboard", "mlflow"]
    trainer.remove_callback(WandbCallback)
    trainer.remove_callback(TensorBoardCallback)
    trackers.export_forecast(trainer, callback.forecast)
    trackers.export_recheck(trainer, callback.history[-1])
    trackers.export_report(trainer, tmp_path / "run" / "sts" / "report.html")


def one_text_forecast():
    scores = {"law": {"sts_icl": 0.5, "sts_act": 0.25, "sts_sq": 0.1, "raw_act": 1.0},
              "chem|bio": {"sts_icl": None, "sts_act": 0.75, "sts_sq": 0.2, "raw_act": 2.0}}
    return Forecast(domains={name: DomainForecast(name=name, texts=1 if name == "chem|bio" else 9, tokens=40,
                                                  scores=dict(s)) for name, s in scores.items()},
                    shifted_latents=[3, 1], shift_values=[0.5, 0.2], shift_direction=[1.0, 1.0],
                    raw_shifted_dims=[], raw_shift_values=[], shift_tokens=200, shift_queries=4, ranking="sts_icl")


class Writer:
    def __init__(self):
        self.texts, self.flushed = [], 0

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        self.flushed += 1


def trainer_with(report_to, *callbacks, step=7):
    return SimpleNamespace(args=SimpleNamespace(report_to=report_to), state=SimpleNamespace(global_step=step),
                           callback_handler=SimpleNamespace(callbacks=list(callbacks)))


def test_domain_without_a_score_and_a_name_with_a_pipe():
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    tb_callback = TensorBoardCallback(tb_writer=Writer())
    trackers.export_forecast(trainer_with(["tensorboard"], tb_callback), one_text_forecast())
    [(tag, text, step)] = tb_callback.tb_writer.texts
    assert tag == "sts/forecast" and step == 7 and tb_callback.tb_writer.flushed
    rows = text.split("\n\n", 1)[1].splitlines()
    assert rows[0] == "| rank | domain | sts_icl | sts_act | sts_sq | raw_act | texts | tokens |"
    assert rows[2] == "| 1 | law | 0.5 | 0.25 | 0.1 | 1 | 9 | 40 |"
    assert rows[3] == "| 2 | chem\\|bio | n/a | 0.75 | 0.2 | 2 | 1 | 40 |"  # unscored ranks last


def test_recheck_text_names_violations_and_every_per_domain_entry():
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    tb_callback = TensorBoardCallback(tb_writer=Writer())
    record = {"step": 6, "shifted_latents": [1, 2, 3, 4], "overlap_with_forecast": 3,
              "scores": {"law": {"sts_act": 0.5, "sts_sq": 0.25}, "food": {"sts_act": 0.125, "sts_sq": 0.5}},
              "loss": {"law": float("nan"), "food": 2.0}, "loss_delta": {"law": None, "food": -0.01},
              "accuracy": {"law": 0.5, "food": 0.75}, "seconds": 1.5, "fit": {"fvu": 0.1},
              "violations": ["held-out loss of protected domain 'law' is not finite (nan)"]}
    trackers.export_recheck(trainer_with(["tensorboard"], tb_callback), record)
    [(tag, text, step)] = tb_callback.tb_writer.texts
    assert tag == "sts/recheck" and step == 6
    lines = text.splitlines()
    assert lines[0] == "STS re-check at step 6: 3 of the 4 most shifted latents were forecast"
    assert lines[1] == "- violation: held-out loss of protected domain 'law' is not finite (nan)"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| step | domain | loss | loss_delta | accuracy | sts_act | sts_sq |"  # not fit, not seconds
    assert table[2:] == ["| 6 | law | nan | n/a | 0.5 | 0.5 | 0.25 |", "| 6 | food | 2 | -0.01 | 0.75 | 0.125 | 0.5 |"]


def test_recheck_text_names_projected_warnings():
    """A warning projected by the early forecast (nothing measured past the tolerance yet) reaches TensorBoard as
    the report lists it."""
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    tb_callback = TensorBoardCallback(tb_writer=Writer())
    warning = "protected domain 'food' is on course to get worse by 12.0% by the end of training"
    record = {"step": 4, "shifted_latents": [1], "overlap_with_forecast": 1, "violations": [],
              "scores": {"food": {"sts_act": 0.5}}, "loss_delta": {"food": 0.04}, "early_forecast": {"food": 0.12},
              "projected_warnings": [warning], "early_stop": f"early stop at step 4: {warning}"}
    trackers.export_recheck(trainer_with(["tensorboard"], tb_callback), record)
    [(_, text, _)] = tb_callback.tb_writer.texts
    assert text.splitlines()[1:3] == [f"- projected warning: {warning}", f"- early stop at step 4: {warning}"]


def test_a_violation_and_a_stop_reach_wandb_as_numbers_and_words(monkeypatch):
    """W&B got only the re-check's numeric table: no count to set an alert on and no words for a violation, a
    projected one or the stop (TensorBoard and MLflow had the words). A projection held at -100% is not charted."""
    wandb = pytest.importorskip("wandb")
    warning = "protected domain 'food' is on course to get worse by 12.0% by the end of training"
    record = {"step": 4, "shifted_latents": [1], "overlap_with_forecast": 1, "seconds": 1.0,
              "violations": ["held-out loss of protected domain 'law' rose by 9.0%"],
              "scores": {"food": {"sts_act": 0.5}, "law": {"sts_act": 0.2}}, "loss_delta": {"food": 0.04, "law": 0.09},
              "early_forecast": {"food": 0.12, "law": -1.0}, "projected_warnings": [warning],
              "early_stop": "early stop at step 4 after 1 consecutive re-check(s) with negative transfer: ..."}
    metrics = trackers.recheck_metrics(record, "sts_act")
    assert metrics["sts/recheck_stats/violations"] == 1 and metrics["sts/recheck_stats/projected_violations"] == 1
    assert metrics["sts/recheck_stats/early_stop"] == 1 and "sts/early_forecast/law" not in metrics
    # a per-domain entry of Nones alone is no interval: no low / high columns for it
    assert not trackers._is_per_domain_interval({"food": None, "law": None}, ["food", "law"])
    assert trackers._is_per_domain_interval({"food": None, "law": [0.1, 0.2]}, ["food", "law"])
    quiet = trackers.recheck_metrics({**record, "violations": [], "projected_warnings": [], "early_stop": None},
                                     "sts_act")
    assert quiet["sts/recheck_stats/violations"] == quiet["sts/recheck_stats/early_stop"] == 0
    logged = []
    monkeypatch.setattr(wandb, "run", SimpleNamespace(log=logged.append))
    trackers.export_recheck(trainer_with(["wandb"], WandbCallback()), record)
    [events] = [entry["sts/events"] for entry in logged if "sts/events" in entry]
    assert [(row["kind"], row["step"]) for row in table_rows(events)] == [
        ("violation", 4), ("projected warning", 4), ("early stop", 4)]
    assert table_rows(events)[1]["message"] == warning


def test_a_tracker_callback_added_by_hand_gets_the_tables_too():
    """report_to="none" and a customised TensorBoardCallback / WandbCallback added by hand (the usual way to
    customise them): the scalars arrived through Trainer.log, the tables, texts and report did not, unsaid."""
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    record = {"step": 4, "shifted_latents": [1], "overlap_with_forecast": 1, "violations": [],
              "scores": {"food": {"sts_act": 0.5}}, "loss_delta": {"food": 0.04}}

    class MyTensorBoard(TensorBoardCallback):
        pass

    tb_callback = MyTensorBoard(tb_writer=Writer())
    trackers.export_recheck(trainer_with([], tb_callback), record)
    assert [tag for tag, _, _ in tb_callback.tb_writer.texts] == ["sts/recheck"]


def test_forecast_caption_names_the_shift_as_the_forecast_does():
    """The caption said "query tokens" whatever the shift; a preference run's forecast shifts on completions."""
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    captions = []
    for shift in (None, "chosen_vs_rejected"):
        forecast = one_text_forecast()
        if shift:
            forecast.settings["shift"] = shift
        tb_callback = TensorBoardCallback(tb_writer=Writer())
        trackers.export_forecast(trainer_with(["tensorboard"], tb_callback), forecast)
        captions.append(tb_callback.tb_writer.texts[0][1].split("\n\n")[0])
        assert captions[-1] == forecast.table(view="scores").splitlines()[0]
    assert captions[0].endswith("from 200 query tokens)")
    assert captions[1].endswith("from 200 completion tokens, chosen_vs_rejected shift)")


def test_wandb_without_a_run_is_a_noop(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "run", None)
    trainer = trainer_with(["wandb"], WandbCallback())
    trackers.export_forecast(trainer, one_text_forecast())  # no run: nothing to log to, no error
    logged = []
    monkeypatch.setattr(wandb, "run", SimpleNamespace(log=logged.append))
    trackers.export_forecast(trainer, one_text_forecast())
    [data] = logged
    assert data["train/global_step"] == 7
    assert table_rows(data["sts/forecast_table"])[1]["sts_icl"] is None


def test_a_domain_named_like_a_recheck_number_keeps_its_own_series(tmp_path, tokenizer):  # noqa: F811
    """The re-check's own numbers (seconds, overhead, ...) live under ``sts/recheck_stats/``: a domain called
    ``seconds`` keeps its score under ``sts/recheck/seconds``."""
    from tiny import domain_texts

    callback = make_callback(target_domains={"law": domain_texts("law", 30), "seconds": domain_texts("chem", 30)})
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4)
    trainer.train()
    for record in callback.history:
        [logged] = [e for e in trainer.state.log_history if e["step"] == record["step"] and "sts/recheck/law" in e]
        assert logged["sts/recheck/seconds"] == record["scores"]["seconds"]["sts_icl"]
        assert logged["sts/recheck_stats/seconds"] == record["seconds"]


def test_a_one_text_domain_is_not_charted_with_another_score():
    """A one-text domain has no STS_icl: its re-check series is left out, not filled with its STS_act (a scale
    ~1000x the others' in the same chart)."""
    record = {"step": 2, "seconds": 1.0, "overlap_with_forecast": None, "loss_delta": {"law": 0.01, "one": 0.02},
              "scores": {"law": {"sts_icl": 3e-4, "sts_act": 0.2}, "one": {"sts_icl": None, "sts_act": 0.4}}}
    metrics = trackers.recheck_metrics(record, "sts_icl")
    assert metrics["sts/recheck/law"] == 3e-4 and "sts/recheck/one" not in metrics
    assert metrics["sts/loss_delta/one"] == 0.02  # its measured change stands
    record["scores"]["one"].pop("sts_icl")  # a record that never had the key: the same
    assert "sts/recheck/one" not in trackers.recheck_metrics(record, "sts_icl")


def test_tensorboard_writer_is_closed_after_a_train_end_recheck(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    """The last re-check runs in ``on_train_end`` (no save at the last step): its log reopens the writer the
    TensorBoardCallback had closed, and it is closed again, not left open after ``train()``."""
    pytest.importorskip("tensorboard", reason="pip install -e '.[dev]'")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = make_callback(recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=5, save_strategy="no", report_to=["tensorboard"])
    [tb_callback] = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    trainer.train()
    assert [r["step"] for r in callback.history] == [2, 4, 5]
    assert tb_callback.tb_writer is None
    [logdir] = (tmp_path / "run" / "runs").iterdir()
    assert [step for step, _ in event_texts(logdir)["sts/recheck"]] == [2, 4, 5]  # the train-end one written


def test_domain_names_a_tracker_would_merge_or_nest_are_named_for_that_tracker_only(monkeypatch):
    from sts_callback.reporting.trackers import clashing_names

    names = ["法律", "化学", "c++", "c__", "law", "retrieval", "retrieval_qa"]
    mlflow = [text for _, text, _ in clashing_names(["mlflow"], names)]  # transformers writes '_' for the others
    assert len(mlflow) == 2 and any("'法律'" in m and "'化学'" in m for m in mlflow) and "['c++', 'c__']" in mlflow[1]
    dvclive = clashing_names("dvclive", names)  # DVCLive splits 'eval_' into a folder: retri/eval/qa
    assert len(dvclive) == 1 and dvclive[0][0] == "dvclive" and "['retrieval', 'retrieval_qa']" in dvclive[0][1]
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["mlflow"])
    assert len(clashing_names(["all"], names)) == 2  # "all": the installed trackers only (no DVCLive here)
    assert clashing_names(["wandb", "tensorboard"], names) == [] and clashing_names(["mlflow"], ["law", "math"]) == []
    # MLflow's file store keeps a metric as a file: 'law/contracts' inside 'law' fails there (every metric of that
    # log call lost, unsaid), a database store takes it; merged names fail nowhere
    nested = ["law", "law/contracts"]
    monkeypatch.setattr("mlflow.get_tracking_uri", lambda: "file:///tmp/mlruns")
    assert [c.fails for c in clashing_names(["mlflow"], nested)] == [True] and "file store" in clashing_names(
        ["mlflow"], nested)[0].sentence
    assert not any(c.fails for c in clashing_names(["mlflow"], names))
    for uri, file_store in (("sqlite:///mlflow.db", False), ("databricks", False), ("http://host:5000", False),
                            ("C:\\mlruns", True), ("C:/mlruns", True), ("./mlruns", True)):
        monkeypatch.setattr("mlflow.get_tracking_uri", lambda uri=uri: uri)
        assert [c.fails for c in clashing_names(["mlflow"], nested)] == [file_store], uri


def test_domain_names_dvclive_would_fail_on_are_refused_at_train_start(tmp_path, tokenizer):
    """The Trainer logs the eval_sts_* keys itself: a DVCLive failure there would stop the run, so such names are
    refused before any work (as MLflow's merged series are warned about)."""
    from sts_callback import STSConfigError

    callback = make_callback(target_domains={"retrieval": ["law court judge"] * 30,
                                             "retrieval_qa": ["cook bake egg"] * 30})
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=2)
    trainer.args.report_to = ["dvclive"]  # after the Trainer built its callbacks: DVCLive is not installed here
    with pytest.raises(STSConfigError, match="dvclive logs the domains.*stop the run; rename them"):
        trainer.train()


@pytest.fixture
def offline_mlflow(tmp_path, monkeypatch):
    """MLflow tracking into a folder of tmp_path (its file store, which MLflow 3 keeps behind an opt-in)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sts-test")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())  # the fluent API keeps the last test's store otherwise
    mlflow.set_experiment("sts-test")
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    # an MLflowCallback that started its run ends whatever run is active when it is collected (its __del__):
    # collected now, not in the middle of the next test's run
    gc.collect()


def mlflow_runs(mlflow):
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("sts-test")
    return client, client.search_runs([experiment.experiment_id])


def artifact_paths(client, run_id, folder=""):
    out = []
    for entry in client.list_artifacts(run_id, folder or None):
        out += artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(out)


def test_mlflow_gets_the_train_end_recheck_in_its_run_and_the_tables_and_report(tmp_path, tokenizer,  # noqa: F811
                                                                               offline_mlflow):
    """The re-check at the end comes after MLflowCallback ended its run: it lands in that run, not in a new one
    MLflow's fluent logging would start (and leave running)."""
    callback = make_callback(recheck_steps=4)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no", report_to=["mlflow"])
    trainer.train()
    assert offline_mlflow.active_run() is None
    client, runs = mlflow_runs(offline_mlflow)
    assert [run.info.status for run in runs] == ["FINISHED"]
    run_id = runs[0].info.run_id
    for domain in DOMAINS:
        assert [m.step for m in client.get_metric_history(run_id, f"sts/loss_delta/{domain}")] == [4, 6]
    assert artifact_paths(client, run_id) == ["sts/forecast.md", "sts/rechecks/step-00000004.md",
                                              "sts/rechecks/step-00000006.md", "sts/report.html", "sts/report.md"]
    folder = tmp_path / "downloaded"
    forecast = Path(client.download_artifacts(run_id, "sts/forecast.md", str(folder))).read_text()
    assert all(f"| {domain} |" in forecast for domain in DOMAINS)
    end = Path(client.download_artifacts(run_id, "sts/rechecks/step-00000006.md", str(folder))).read_text()
    assert end.startswith("STS re-check at step 6") and "loss_delta" in end
    assert callback.write_errors == []


def test_a_resumed_runs_new_mlflow_run_gets_the_forecast_its_rechecks_are_read_against(  # noqa: F811
        tmp_path, tokenizer, offline_mlflow):
    """Resumed in a new process, MLflowCallback starts a new run: it had the re-checks but not the forecast."""
    make_trainer(tmp_path, tokenizer, make_callback(recheck_steps=2), max_steps=4, save_steps=2,
                 report_to=["mlflow"]).train()
    gc.collect()
    callback = make_callback(recheck_steps=2)
    make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_steps=2, report_to=["mlflow"]).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    client, runs = mlflow_runs(offline_mlflow)
    assert len(runs) == 2
    for run in runs:  # the table and the scalars a chart of sts/forecast/<domain> reads
        assert "sts/forecast.md" in artifact_paths(client, run.info.run_id)
        assert {f"sts/forecast/{name}" for name in DOMAINS} <= set(client.get_run(run.info.run_id).data.metrics)
    assert not any(key.startswith("sts/accuracy/") for key in client.get_run(runs[-1].info.run_id).data.metrics)
    assert callback.write_errors == []


class StopAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = control.should_training_stop or state.global_step == self.step


def test_mlflow_gets_the_recheck_of_a_run_stopped_early_in_its_run(tmp_path, tokenizer, offline_mlflow):  # noqa: F811
    """Stopped by another callback after ours at step 5: its re-check comes at train end, after MLflow's."""
    callback = make_callback(recheck_steps=4)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no", report_to=["mlflow"],
                           extra_callbacks=[StopAtStep(5)])
    trainer.train()
    client, runs = mlflow_runs(offline_mlflow)
    assert [run.info.status for run in runs] == ["FINISHED"] and callback.history[-1]["step"] == 5
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, f"sts/loss_delta/{DOMAINS[0]}")] == [4, 5]


def test_mlflow_run_of_the_users_own_stays_theirs(tmp_path, tokenizer, offline_mlflow):  # noqa: F811
    callback = make_callback(recheck_steps=4)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no", report_to=["mlflow"])
    with offline_mlflow.start_run() as own:
        trainer.train()
        assert offline_mlflow.active_run().info.run_id == own.info.run_id  # still the user's to end
    client, runs = mlflow_runs(offline_mlflow)
    assert [run.info.run_id for run in runs] == [own.info.run_id]
    assert [m.step for m in client.get_metric_history(own.info.run_id, f"sts/loss_delta/{DOMAINS[0]}")] == [4, 6]
    assert "sts/report.html" in artifact_paths(client, own.info.run_id)


def test_mlflow_nested_run_gets_the_train_end_recheck_and_the_parent_stays_active(tmp_path, tokenizer,  # noqa: F811
                                                                                    offline_mlflow, monkeypatch):
    """MLFLOW_NESTED_RUN: MLflowCallback logs to a run nested under the user's and ends it at train end, which makes
    the parent the active run: the train-end logs would land in the parent."""
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "true")
    callback = make_callback(recheck_steps=4)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no", report_to=["mlflow"])
    with offline_mlflow.start_run() as parent:
        trainer.train()
        assert offline_mlflow.active_run().info.run_id == parent.info.run_id
    client, runs = mlflow_runs(offline_mlflow)
    child = next(run for run in runs if run.info.run_id != parent.info.run_id)
    assert len(runs) == 2 and child.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    assert [m.step for m in client.get_metric_history(child.info.run_id, f"sts/loss_delta/{DOMAINS[0]}")] == [4, 6]
    assert client.get_metric_history(parent.info.run_id, f"sts/loss_delta/{DOMAINS[0]}") == []
    assert "sts/report.html" in artifact_paths(client, child.info.run_id)
    assert client.get_run(child.info.run_id).info.status == "FINISHED"


class EndsItsRunAtTrainEnd(TrainerCallback):
    """A tracker as Trackio's and Neptune's callbacks are in transformers: its on_train_end ends the run, and a
    later log starts a new one."""

    def __init__(self):
        self.runs, self.ended = [[]], False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.ended:
            self.runs.append([])
            self.ended = False
        self.runs[-1].append((state.global_step, dict(logs or {})))

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = True


@pytest.mark.parametrize("arguments", [{"recheck_steps": 4}, {}], ids=["recheck_steps", "save_strategy_no"])
def test_the_last_steps_recheck_reaches_a_tracker_that_ends_its_run_at_train_end(tmp_path, tokenizer,  # noqa: F811
                                                                                  arguments):
    tracker = EndsItsRunAtTrainEnd()
    callback = make_callback(**arguments)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no")
    trainer.callback_handler.callbacks.insert(0, tracker)  # where the Trainer puts report_to's callbacks
    trainer.train()
    assert callback.history[-1]["step"] == 6
    assert len(tracker.runs) == 1
    logged = [step for step, logs in tracker.runs[0] if f"sts/loss_delta/{DOMAINS[0]}" in logs]
    assert logged == ([4, 6] if arguments else [6])


def test_an_mlflow_failure_at_train_end_warns_and_the_run_ends(tmp_path, tokenizer, offline_mlflow,  # noqa: F811
                                                               monkeypatch):
    callback = make_callback(recheck_steps=4)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_strategy="no", report_to=["mlflow"])

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    original = offline_mlflow.start_run
    monkeypatch.setattr(offline_mlflow, "start_run", lambda *a, **k: unreachable() if "run_id" in k
                        else original(*a, **k))
    with pytest.warns(RuntimeWarning, match="could not resume the MLflow run.*tracking server unreachable"):
        trainer.train()
    assert trainer.state.global_step == 6 and callback.history[-1]["step"] == 6
