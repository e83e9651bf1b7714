"""Forecast, re-checks and the report as tables in the experiment trackers the Trainer already reports to
(W&B, TensorBoard, MLflow); a re-check also as the scalar ``sts/...`` metrics the callback logs through
``trainer.log`` (:func:`recheck_metrics`).

Each function is a no-op for a tracker whose callback is not among the trainer's (added by ``args.report_to``
or by hand).
W&B rows are logged with ``train/global_step``, as the Trainer's ``WandbCallback`` logs (its step metric), and
never with ``step=``: W&B's own step counts log calls and refuses a smaller one. TensorBoard gets Markdown text
through the ``TensorBoardCallback``'s own writer, so it lands in the run's event file. MLflow gets them as text
artifacts of the ``MLflowCallback``'s run (``<namespace>/forecast.md``, ``<namespace>/rechecks/step-*.md``) and the
report as its files (``<namespace>/report.html``, ``report.md``).
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..core.config import SCORE_VARIANTS
from ..pipelines.forecast import SCORE_LABELS
from ..scoring.agreement import noise_ceiling_by_domain
from ..scoring.signed import SIGNED_VARIANTS

VARIANT_ORDER = SCORE_VARIANTS + SIGNED_VARIANTS


# How trackers rewrite a metric's name (their callbacks in transformers, or their own logging): names that differ
# only where a tracker rewrites them land in one series there (MLflow), or make a folder of another's value, which
# fails the tracker's log (DVCLive, on the eval_sts_* keys the Trainer logs itself too).
_TRACKER_NAMES = {
    "mlflow": lambda name: re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", name),  # transformers' MLflowCallback
    "dvclive": lambda name: name.replace("eval_", "eval/").replace("train_", "train/"),  # DVCLive's split
}
TRACKERS_THAT_FAIL = ("dvclive",)


class NameClash(NamedTuple):
    """Domain names a tracker would log as one series, or one inside another's path."""

    tracker: str
    sentence: str
    fails: bool  # the tracker's log would fail (not merge): refused at train start


# The integration callback class of each tracker whose names clashing_names checks.
TRACKER_CALLBACKS = {"mlflow": "MLflowCallback", "dvclive": "DVCLiveCallback"}


def trackers_in_use(trainer: Any, report_to: Any) -> list[str]:
    """``report_to`` and the trackers whose callbacks were added to the trainer by hand."""
    named = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [*named, *(t for t, cls in TRACKER_CALLBACKS.items() if t not in named and _integration(trainer, cls))]


def clashing_names(report_to: Any, names: list[str]) -> list[NameClash]:
    """One :class:`NameClash` for each tracker in ``report_to`` that rewrites metric names and each group of domain
    ``names`` it would log as one series, or one inside another's path. MLflow's file store keeps a metric as a
    file: one inside another's path fails there (every metric of that log call lost), where a database store
    takes it."""
    trackers = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in trackers:  # the Trainer reports to the installed ones only
        from transformers.integrations import get_available_reporting_integrations

        trackers = [*trackers, *get_available_reporting_integrations()]
    out = []
    for tracker, rewrite in _TRACKER_NAMES.items():
        if tracker not in trackers:
            continue
        written = {name: rewrite(name) for name in names}
        for name in names:
            clash = [other for other in names if other != name and (written[other] == written[name] or
                     written[other].startswith(written[name] + "/"))]
            if clash and name < min(clash):  # each group said once
                shown = sorted({written[n] for n in [name, *clash]})
                nested = any(written[other] != written[name] for other in clash)
                fails = tracker in TRACKERS_THAT_FAIL or (tracker == "mlflow" and nested and _mlflow_file_store())
                store = " (MLflow's file store keeps each metric as a file)" if tracker == "mlflow" and fails else ""
                out.append(NameClash(tracker, f"{tracker} logs the domains {[name, *clash]} as {shown} "
                                              f"(sts/<quantity>/<domain>){store}, so their series merge or fail "
                                              "there", fails))
    return out


def _mlflow_file_store() -> bool:
    """MLflow logs to a folder (a ``file:`` URI, a plain path, a Windows drive path), not a database or server
    (``sqlite:``, ``http(s):``, ``databricks``)."""
    try:
        import mlflow
    except ImportError:
        return False
    from urllib.parse import urlparse

    uri = str(mlflow.get_tracking_uri() or "")
    if re.match(r"^[A-Za-z]:[\\/]", uri):  # C:\mlruns: urlparse reads the drive as a scheme
        return True
    return uri != "databricks" and urlparse(uri).scheme in ("", "file")


def export_forecast(trainer: Any, forecast: Any, namespace: str = "sts") -> None:
    """The step-0 forecast as a table (one row per domain), under ``<namespace>/`` (the callback's)."""
    wandb_run, mlflow = _wandb_run(trainer), _mlflow(trainer)
    with _tensorboard(trainer) as writer:
        if wandb_run is None and writer is None and mlflow is None:
            return
        variants = _variants(d.scores for d in forecast.domains.values())
        columns = ["rank", "domain", *variants, "texts", "tokens"]
        rows = [[rank, name, *(forecast.domains[name].scores.get(v) for v in variants), forecast.domains[name].texts,
                 forecast.domains[name].tokens] for rank, (name, _) in enumerate(forecast.ranked(), 1)]
        step = _global_step(trainer)
        if wandb_run is not None:
            _log_wandb(wandb_run, f"{namespace}/forecast_table", _wandb_table(columns, rows), step)
        caption = (f"STS forecast: {len(rows)} target domains, ranked by "
                   f"{SCORE_LABELS.get(forecast.ranking, forecast.ranking)} (N={len(forecast.shifted_latents)} "
                   f"shifted latents from {forecast.shift_source})")
        if writer is not None:
            writer.add_text(f"{namespace}/forecast", caption + "\n\n" + _markdown(columns, rows), step)
        if mlflow is not None:
            mlflow.log_text(caption + "\n\n" + _markdown(columns, rows) + "\n", f"{namespace}/forecast.md")


def export_recheck(trainer: Any, record: dict[str, Any], namespace: str = "sts") -> None:
    """One re-check as a table (one row per domain: loss change, scores)."""
    wandb_run, mlflow = _wandb_run(trainer), _mlflow(trainer)
    with _tensorboard(trainer) as writer:
        if wandb_run is None and writer is None and mlflow is None:
            return
        scores = record.get("scores", {})
        domains = list(dict.fromkeys([*scores, *record.get("loss", {}), *record.get("loss_delta", {})]))
        variants = _variants(scores.values())
        # Every {domain: number} entry (loss, loss_delta, early_forecast, and those later features add) is a column.
        per_domain = [key for key, value in record.items() if key != "scores" and _is_per_domain(value, domains)]
        # each {domain: [low, high]} interval (loss_delta_ci, early_forecast_ci) as two columns beside its value
        bounds = [key for key, value in record.items() if _is_per_domain_interval(value, domains)]
        columns = ["step", "domain", *per_domain, *(f"{key}_{end}" for key in bounds for end in ("low", "high")),
                   *variants]
        step = record.get("step", _global_step(trainer))
        rows = [[step, name, *(record[key].get(name) for key in per_domain),
                 *((record[key].get(name) or [None, None])[i] for key in bounds for i in (0, 1)),
                 *(scores.get(name, {}).get(v) for v in variants)] for name in domains]
        events = [*(("violation", v) for v in record.get("violations") or ()),
                  *(("projected warning", v) for v in record.get("projected_warnings") or ()),
                  *((("early stop", record["early_stop"]),) if record.get("early_stop") else ())]
        if wandb_run is not None:
            _log_wandb(wandb_run, f"{namespace}/recheck_table", _wandb_table(columns, rows), step)
            if events:  # what the re-check found, in words, beside its numbers (sts/recheck_stats/violations, ...)
                _log_wandb(wandb_run, f"{namespace}/events",
                           _wandb_table(["step", "kind", "message"], [[step, *e] for e in events]), step)
        if writer is None and mlflow is None:
            return
        lines = [f"STS re-check at step {step}"]
        if record.get("overlap_with_forecast") is not None:
            shifted = len(record.get("shifted_latents", ()))
            lines[0] += f": {record['overlap_with_forecast']} of the {shifted} most shifted latents were forecast"
        lines += [f"- {kind}: {message}" if kind != "early stop" else f"- {message}" for kind, message in events]
        text = "\n".join(lines) + "\n\n" + _markdown(columns, rows)
        if writer is not None:
            writer.add_text(f"{namespace}/recheck", text, step)
        if mlflow is not None:  # one file a re-check, in step order
            mlflow.log_text(text + "\n", f"{namespace}/rechecks/step-{int(step):08d}.md")


def export_report(trainer: Any, html_path: Path, namespace: str = "sts") -> None:
    """``report.html``: a W&B artifact (and ``wandb.Html``), TensorBoard text, MLflow artifacts (with ``report.md``)."""
    html_path = Path(html_path)
    wandb_run, mlflow = _wandb_run(trainer), _mlflow(trainer)
    if mlflow is not None:  # the run's artifacts: MLflow's UI shows both files
        for path in (html_path, html_path.with_suffix(".md")):
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path=namespace)
    with _tensorboard(trainer) as writer:
        step = _global_step(trainer)
        if wandb_run is not None:
            import wandb

            artifact = wandb.Artifact(name=f"{namespace}-report-{wandb_run.id}", type="sts-report",
                                      description="STS forecast and re-checks of this training run")
            artifact.add_file(str(html_path), name=html_path.name)
            wandb_run.log_artifact(artifact)
            # inject=False: the report brings its own styles
            _log_wandb(wandb_run, f"{namespace}/report",
                       wandb.Html(html_path.read_text(encoding="utf-8"), inject=False), step)
        if writer is not None:  # TensorBoard cannot show HTML: say where the report is
            writer.add_text(f"{namespace}/report", f"STS report: `{html_path}` (open it in a browser; a Markdown "
                            f"summary beside it: `{html_path.with_suffix('.md').name}`)", step)


# ---------------------------------------------------------------------------- trackers


def recheck_metrics(record: dict[str, Any], variant: str) -> dict[str, float]:
    """A re-check's history record as tracker metrics (``sts/...`` keys): per domain ``sts/<quantity>/<domain>``,
    the re-check's own numbers under ``sts/recheck_stats/`` (a prefix no domain's key can take), among them the
    count of rules broken (``violations``), of projected violations, and ``early_stop`` (1 at the stop). A domain
    without ``variant`` (STS_icl of a one-text domain) is left out, not charted with another score's scale."""
    # a projection held at -100% (its fall, extrapolated, passes a loss of zero) projects no end value: not charted
    metrics = {f"sts/early_forecast/{name}": value for name, value in record.get("early_forecast", {}).items()
               if value is not None and value > -1.0}
    metrics.update({f"sts/recheck/{name}": scores[variant] for name, scores in record["scores"].items()
                    if scores.get(variant) is not None})
    metrics.update({f"sts/loss_delta/{name}": delta for name, delta in record["loss_delta"].items() if delta is not None})
    ses = record.get("loss_delta_se") or {}
    metrics.update({f"sts/loss_delta_se/{name}": se for name, se in ses.items() if se is not None})
    ceiling = noise_ceiling_by_domain(record["loss_delta"], ses)
    if ceiling is not None:  # how well these measurements could order the domains at all
        metrics["sts/recheck_stats/noise_ceiling"] = ceiling
    metrics.update({f"sts/accuracy/{name}": value for name, value in record.get("accuracy", {}).items()})
    metrics.update({f"sts/accuracy_delta/{name}": value for name, value in record.get("accuracy_delta", {}).items()
                    if value is not None})
    if record["overlap_with_forecast"] is not None:
        metrics["sts/recheck_stats/overlap_with_forecast"] = record["overlap_with_forecast"]
    metrics["sts/recheck_stats/seconds"] = record["seconds"]
    # numbers an alert can watch (a W&B / MLflow alert on a metric): rules broken, projected to be, a stop
    metrics["sts/recheck_stats/violations"] = float(len(record.get("violations") or []))
    metrics["sts/recheck_stats/projected_violations"] = float(len(record.get("projected_warnings") or []))
    metrics["sts/recheck_stats/early_stop"] = float(bool(record.get("early_stop")))
    if (record.get("overhead") or {}).get("share") is not None:
        metrics["sts/recheck_stats/overhead"] = record["overhead"]["share"]
    if record.get("fresh_probe", {}).get("mean_reward") is not None:
        metrics["sts/recheck_stats/rollout_reward"] = record["fresh_probe"]["mean_reward"]
    if record.get("sae_fit"):
        metrics["sts/sae_fit/fvu"], metrics["sts/sae_fit/l0"] = record["sae_fit"]["fvu"], record["sae_fit"]["l0"]
    return metrics


def _integration(trainer: Any, class_name: str) -> Any:
    """The trainer's integration callback of that class (or a subclass), found by name: no import of the tracker.
    Whether ``report_to`` added it or the user did (``report_to="none"`` and a customised ``WandbCallback`` of their
    own), it is the one logging the run."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", ()):
        if any(cls.__name__ == class_name for cls in type(callback).__mro__):
            return callback
    return None


def _wandb_run(trainer: Any) -> Any:
    """The active W&B run when the trainer reports to W&B through a ``WandbCallback``; else None."""
    if _integration(trainer, "WandbCallback") is None:
        return None
    import wandb

    return wandb.run


@contextmanager
def _tensorboard(trainer: Any) -> Iterator[Any]:
    """The ``TensorBoardCallback``'s own writer, or None. At train end that callback has already closed it (its
    ``on_train_end`` runs before ours): reopened on the same log directory, as its ``on_log`` does, then closed."""
    callback = _integration(trainer, "TensorBoardCallback")
    reopen = callback is not None and getattr(callback, "tb_writer", None) is None
    if reopen and (getattr(callback, "logging_dir", None) is None or getattr(callback, "_SummaryWriter", None) is None):
        callback = None  # training never started: no log directory to write into
    if callback is None:
        yield None
        return
    if reopen:
        callback.tb_writer = callback._SummaryWriter(log_dir=callback.logging_dir)
    writer = callback.tb_writer
    try:
        yield writer
    finally:
        writer.flush()
        if reopen:
            writer.close()
            callback.tb_writer = None


@contextmanager
def after_their_train_end(trainer: Any) -> Iterator[None]:
    """For the callback's logs after the trackers' own ``on_train_end`` (theirs run first: the train-end re-check,
    the report). TensorBoard: its callback's ``on_log`` reopens the writer it closed, which would stay open after
    ``train()`` (a file handle and a thread): closed again after the block. MLflow: its callback ended the run it
    started, and its ``on_log`` would log those to a new run MLflow starts for them (or to the parent of a nested
    run): the run it logged to is resumed for the block and ended again, so they land in the run they belong to."""
    callback = _integration(trainer, "TensorBoardCallback") if trainer is not None else None
    closed = callback is not None and getattr(callback, "tb_writer", None) is None
    resumed = _guarded(_mlflow_resumed, trainer, "resume the MLflow run for the train-end logs")
    try:
        yield
    finally:
        if closed and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.close()
            callback.tb_writer = None
        if resumed is not None:  # back to the run active before (a parent run stays the user's)
            _guarded(lambda mlflow: mlflow.active_run() is not None and mlflow.end_run(), resumed,
                     "end the resumed MLflow run")


def _guarded(function: Any, argument: Any, what: str) -> Any:
    """``function(argument)``, or None with a warning: a tracker's failure must never end a training run."""
    try:
        return function(argument)
    except Exception as err:  # noqa: BLE001 - the tracker's own errors, whatever they are
        warnings.warn(f"STS could not {what} ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=3)
        return None


# MLflowCallback -> the id of the run it logs this training to, read at train start (it keeps no such id itself)
_MLFLOW_RUN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_runs(trainer: Any) -> None:
    """At train start, after the trackers' callbacks have set up: the MLflow run the trainer logs to, which its
    callback ends before the callback's train-end logs (see :func:`after_their_train_end`)."""
    callback = _mlflow_callback(trainer)
    mlflow = getattr(callback, "_ml_flow", None)
    active = _guarded(lambda m: m.active_run(), mlflow, "read the active MLflow run") if mlflow is not None else None
    if active is not None:
        _MLFLOW_RUN_IDS[callback] = active.info.run_id


def _mlflow_callback(trainer: Any) -> Any:
    return _integration(trainer, "MLflowCallback") if trainer is not None else None


def _mlflow_resumed(trainer: Any) -> Any:
    """The ``mlflow`` module, with the run the trainer logged to active again (nested under the run active now, if
    any: a parent run of ``MLFLOW_NESTED_RUN``); None where that run is still the active one (a run of the user's
    own) or none was seen at train start (no MLflow, another process)."""
    callback = _mlflow_callback(trainer)
    mlflow, run_id = getattr(callback, "_ml_flow", None), _MLFLOW_RUN_IDS.get(callback) if callback else None
    if mlflow is None or run_id is None or not getattr(getattr(trainer, "state", None), "is_world_process_zero", True):
        return None
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return None
    mlflow.start_run(run_id=run_id, nested=active is not None)
    return mlflow


def _mlflow(trainer: Any) -> Any:
    """The ``mlflow`` module while the trainer's ``MLflowCallback`` has its run active (our exports land there);
    else None."""
    mlflow = getattr(_mlflow_callback(trainer), "_ml_flow", None)
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def _log_wandb(run: Any, key: str, value: Any, step: int) -> None:
    run.log({key: value, "train/global_step": step})


def _wandb_table(columns: list[str], rows: list[list[Any]]) -> Any:
    import wandb

    return wandb.Table(columns=columns, data=rows)


# ---------------------------------------------------------------------------- rows


def _global_step(trainer: Any) -> int:
    return int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)


def _variants(score_dicts) -> list[str]:
    """The score variants computed for at least one domain, in the library's order (unknown ones last)."""
    present: set[str] = set()
    for scores in score_dicts:
        present.update(v for v, value in scores.items() if value is not None)
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def _is_per_domain(value: Any, domains: list[str]) -> bool:
    return (isinstance(value, dict) and bool(value) and set(value) <= set(domains)
            and all(v is None or isinstance(v, (int, float)) for v in value.values()))


def _is_per_domain_interval(value: Any, domains: list[str]) -> bool:
    """A {domain: [low, high]} entry (a dict of Nones alone is no interval: it reads as a per-domain value too)."""
    return (isinstance(value, dict) and set(value) <= set(domains)
            and any(isinstance(v, (list, tuple)) for v in value.values())
            and all(v is None or isinstance(v, (list, tuple)) and len(v) == 2 for v in value.values()))


def _markdown(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-style table, as TensorBoard's text plugin renders it (numbers right-aligned)."""
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return str(value).replace("|", "\\|")

    numeric = [any(isinstance(row[i], (int, float)) for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["export_forecast", "export_recheck", "export_report", "recheck_metrics"]
