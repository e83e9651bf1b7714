"""``write_report()``: one self-contained HTML report (plots embedded) and a Markdown summary of a run.

Reads what the callback (or ``sts forecast``) wrote into an ``sts/`` folder: ``forecast.json``, ``history.jsonl``,
``settings.json`` (protected domains, tolerance) and, when present, ``gate.json`` and ``validation.json``.
Every piece of user text (domain names, probe contexts, gate reasons) is HTML-escaped; the page needs no
network access (no external CSS, JS or fonts; plots are PNG data URIs).

The plots need matplotlib, the optional extra ``report`` (``pip install "sts-callback[report]"``), imported
only when a plot is drawn. Without it the report is written all the same, without figures, and says so:
once per process as a warning (the report is written from inside a training run) and once in the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_write_text, check_format, read_json_lines
from ..core.config import recheck_variant
from ..core.data import repeated_names
from ..core.errors import STSDataWarning, STSInputError
from ..core.formatting import percent, signed_percent, signed_percents
from ..core.run_store import checkpoint_folders
from ..core.run_store import (FORECAST_FILE, FORECAST_FORMAT, HISTORY_FILE, REPORT_HTML_FILE, REPORT_MD_FILE,
                              SETTINGS_FILE, in_step_order)
from ..core.sae_fit import poor_fit_message
from ..scoring.agreement import NOISE_CEILING_GOAL, ceiling_text, correlation, noise_ceiling_by_domain

GATE_FILE = "gate.json"
VALIDATION_FILE = "validation.json"
HTML_FILE, MD_FILE = REPORT_HTML_FILE, REPORT_MD_FILE

NEURONPEDIA = "https://www.neuronpedia.org/{id}/{latent}"
MAX_LATENTS_WITH_CONTEXTS = 20
MAX_CONTEXTS_PER_SOURCE = 5
LABELS = {"sts_icl": "STS_icl", "sts_act": "STS_act", "sts_sq": "STS_sq",
          "raw_icl": "raw_icl", "raw_act": "raw_act", "raw_sq": "raw_sq"}
PROTECTED_COLOR = "#c0392b"
OTHER_COLOR = "#2c6fbb"
REPORT_EXTRA = 'pip install "sts-callback[report]"'
NO_MATPLOTLIB = f"matplotlib is not installed, so the report has no figures; {REPORT_EXTRA} to get them."


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes included: safe inside attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def md_esc(value: Any) -> str:
    """Text safe in a GitHub Markdown table cell: no raw HTML, no column breaks, no line breaks, and no
    formatting of its own (a name like *food*, [link](x) or `tick` stays a name)."""
    text = ("" if value is None else str(value)).replace("\\", "\\\\")  # first: a backslash typed shows as typed
    text = html.escape(text, quote=False)
    text = MARKDOWN_SYNTAX.sub(lambda found: "\\" + found.group(0), text)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def md_code(value: Any) -> str:
    """Text for inside a Markdown code span, where a backslash escape or an HTML entity shows as typed."""
    return " ".join(str(value).replace("`", "'").split())


# Characters that would start formatting: emphasis (every asterisk and tilde, an underscore not between two letters
# or digits: inside a word, as in loss_tokens, GitHub reads it as itself), code spans, and the closing bracket of a
# link or image ("](" or "][": an interval's "[-1.0, +2.0]" reads as itself and keeps no backslash)
MARKDOWN_SYNTAX = re.compile(r"[*~`]|(?<![^\W_])_|_(?![^\W_])|\](?=[(\[])")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None, apart_from: float | None = None) -> str:
    return signed_percent(value, apart_from=apart_from)


def _projections(record: dict[str, Any], tolerance: float | None) -> list[tuple[str, str]]:
    """(domain, projected end-of-training change with its 95% interval where the record has one) of a re-check."""
    intervals = record.get("early_forecast_ci") or {}
    out = []
    for name, value in (record.get("early_forecast") or {}).items():
        if value is None:
            continue
        bounds = intervals.get(name) or []
        if value <= -1.0:  # held at -100%: the extrapolated fall passes a loss of zero, which says no end value
            out.append((name, "-100% (held there: the recent fall, extrapolated, passes a loss of zero; no end "
                              "value projected)"))
        elif len(bounds) == 2 and None not in bounds:
            shown, low, high = signed_percents([value, *bounds], apart_from=tolerance)
            out.append((name, f"{shown} [{low}, {high}]"))
        else:
            out.append((name, _pct(value, tolerance)))
    return out


def _seconds(value: float) -> str:
    """Seconds with two significant digits below 10 s: a re-check of 0.15 s against 0.036 s of training must not
    read "0 s against 0 s" beside the share those numbers give."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _changes(record: dict[str, Any], protected: list[str] | None = None, tolerance: float | None = None) -> list[str]:
    """Each domain's held-out loss change of a re-check, with its 95% interval where the re-check measured one
    (a change past the tolerance never printed as the tolerance itself)."""
    intervals = record.get("loss_delta_ci") or {}
    out = []
    for name, value in (record.get("loss_delta") or {}).items():
        text = f"{name} {_pct(value, tolerance)}"
        ci = intervals.get(name)
        if value is not None and ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci):
            shown, low, high = signed_percents([value, *ci], apart_from=tolerance)  # the sign of a bound shows
            text = f"{name} {shown} [{low.removesuffix('%')}, {high.removesuffix('%')}]"
        out.append(text + (" (protected)" if protected and name in protected else ""))
    return out


# --------------------------------------------------------------------------- data
class ReportData:
    """Everything the report shows, read from an ``sts/`` folder."""

    def __init__(self, sts_dir: Path, protected: list[str] | None = None, gate_dir: Path | None = None):
        """``gate_dir``: where to read the gate decision when ``sts_dir`` has none (the folder a report was asked
        for, when its run is in a subfolder)."""
        self.sts_dir = sts_dir
        self.forecast_unreadable: str | None = None  # a cut forecast.json beside the run's re-checks: why
        try:
            self.forecast: dict[str, Any] | None = _read_json(sts_dir / FORECAST_FILE)
        except STSInputError as err:
            self.forecast, forecast_error = None, err
        else:
            forecast_error = None
        try:
            lines, self.unreadable = read_json_lines(sts_dir / HISTORY_FILE)  # unreadable: cut by a crash
        except (OSError, UnicodeDecodeError) as err:
            raise STSInputError(f"{sts_dir / HISTORY_FILE} cannot be read ({type(err).__name__}: {err}); move it out "
                                f"of {sts_dir}, or give the folder the callback wrote.") from err
        # in step order: a record whose first write failed (a disk full for a while) is written after later ones
        self.history: list[dict[str, Any]] = in_step_order([r for r in lines if is_recheck_record(r)])
        self.skipped = len(lines) - len(self.history)  # lines of another tool's log: not re-checks
        if self.skipped and not self.history:
            raise STSInputError(f"{sts_dir / HISTORY_FILE} was not written by STSCallback: none of its {len(lines)} "
                                f"line(s) is a re-check record ({RECHECK_RECORD}), e.g. {json.dumps(lines[0])[:120]}. "
                                f"Move it out of {sts_dir}, or give the folder the callback wrote.")
        self.run_settings: dict[str, Any] = _read_json(sts_dir / SETTINGS_FILE) or {}
        self.gate_file = next((folder / GATE_FILE for folder in (sts_dir, gate_dir)
                               if folder is not None and (folder / GATE_FILE).exists()), sts_dir / GATE_FILE)
        self.gate: Any = _read_json(self.gate_file)
        self.validation: Any = _read_json(sts_dir / VALIDATION_FILE)
        if forecast_error is not None:
            if not self.history:  # a forecast's folder: nothing else to show
                raise forecast_error
            # a run that goes on without its forecast (a crash cut the file) still has its re-checks to show
            self.forecast_unreadable = str(forecast_error)
            warnings.warn(f"{forecast_error}; the report shows the run's re-checks without the forecast.",
                          STSDataWarning, stacklevel=3)
        if self.skipped or self.unreadable:
            warnings.warn(self.skipped_note(), STSDataWarning, stacklevel=3)
        if self.forecast is None and not self.history and self.gate is None:
            raise STSInputError(f"{sts_dir} holds no {FORECAST_FILE}, {HISTORY_FILE} or {GATE_FILE}: "
                                "nothing to report.")
        if self.forecast is not None:  # a list or another tool's JSON: named, not a bare AttributeError later
            check_format(self.forecast, FORECAST_FORMAT, f"an STS forecast file ({sts_dir / FORECAST_FILE})",
                         "a forecast.json")
        for data, file in ((self.gate, self.gate_file), (self.validation, sts_dir / VALIDATION_FILE),
                           (self.run_settings, sts_dir / SETTINGS_FILE)):
            if data is not None and not isinstance(data, dict):
                raise STSInputError(f"{file} holds a {type(data).__name__}, not the object STS writes there.")
        if protected is not None:
            self._check_protected(list(protected))
        self.protected = list(protected if protected is not None else self.run_settings.get("protected") or [])
        self.tolerance = self.run_settings.get("tolerance")
        self.variant, self.ranking = self._ranking()

    def target_names(self) -> set[str]:
        """The target domains anything in the folder names (forecast, gate, re-checks)."""
        names: set[str] = set()
        if isinstance(self.forecast, dict) and isinstance(self.forecast.get("domains"), dict):
            names.update(self.forecast["domains"])
        if isinstance(self.gate, dict) and isinstance(self.gate.get("targets"), list):
            names.update(map(str, self.gate["targets"]))
        for record in self.history:
            for key in ("scores", "loss", "loss_delta"):
                if isinstance(record.get(key), dict):
                    names.update(record[key])
        return names

    def _check_protected(self, protected: list[str]) -> None:
        """Protected domains given for the report name target domains of the run, each once (as the callback and
        the gate require)."""
        repeated = repeated_names(protected)
        if repeated:
            raise STSInputError(f"Protected domains {repeated} are named more than once; name each once.")
        names = self.target_names()
        unknown = [p for p in protected if p not in names]
        if names and unknown:  # no domain recorded anywhere: nothing to check against
            raise STSInputError(f"Protected domain(s) {unknown} are not among the target domains of {self.sts_dir} "
                                f"{sorted(names)}; fix the protected names (or give none: the report then uses the "
                                "protected domains the run stored).")

    def _ranking(self) -> tuple[str | None, list[tuple[str, float]]]:
        if self.forecast is None:
            return None, []
        domains = self.forecast.get("domains", {})
        preferred = [self.forecast.get("ranking") or "sts_icl", "sts_icl", "sts_act", "sts_sq"]
        for variant in preferred:
            pairs = [(name, d.get("scores", {}).get(variant)) for name, d in domains.items()]
            if pairs and all(isinstance(v, (int, float)) for _, v in pairs):
                return variant, sorted(pairs, key=lambda item: (-item[1], item[0]))
        return None, []

    @property
    def settings(self) -> dict[str, Any]:
        """The forecast's settings (model, SAE, layer); in a gate-only folder those of the candidates' forecasts."""
        if self.forecast is not None:
            return self.forecast.get("settings") or {}
        forecasts = self.gate.get("forecasts") if isinstance(self.gate, dict) else None
        if isinstance(forecasts, dict):
            first = next((f for f in forecasts.values() if isinstance(f, dict)), {})
            return first.get("settings") or {}
        return {}

    @property
    def files(self) -> list[str]:
        """The files of the folder the report was written from (only those that exist)."""
        names = (FORECAST_FILE, HISTORY_FILE, SETTINGS_FILE, GATE_FILE, VALIDATION_FILE)
        beside = [f"../{GATE_FILE}"] if self.gate is not None and self.gate_file.parent != self.sts_dir else []
        return [name for name in names if (self.sts_dir / name).is_file()] + beside

    def contents_note(self) -> str | None:
        """What a folder without a forecast holds, as a sentence (plain text); ``None`` when there is a forecast."""
        if self.forecast is not None:
            return None
        if self.forecast_unreadable and self.rechecks:
            return f"The forecast cannot be read ({self.forecast_unreadable}); the re-checks are shown."
        reason = self.run_settings.get("no_forecast")
        if self.rechecks and isinstance(reason, str) and reason:
            return f"No forecast in this run: {reason.rstrip('.')}. The re-checks are shown."
        if self.rechecks:
            return ("No forecast in this folder (forecast.json is written when the forecast could be made: in-context "
                    "demonstrations, preference pairs, rollouts with a reward signal); the re-checks are shown.")
        if self.history:
            return (f"No forecast in this folder, and {HISTORY_FILE} holds only failed re-checks (listed below).")
        outcome = gate_outcome(self.gate)
        return (f"This folder holds a gate decision ({GATE_FILE}), no training run"
                + (f": {outcome}" if outcome else "") + ". The candidates' forecasts and the rules are under "
                "Gate decision below.")

    def skipped_note(self) -> str | None:
        """How many lines of history.jsonl are not re-check records and were left out (plain text)."""
        notes = []
        if self.skipped:
            notes.append(f"{self.skipped} line(s) of {self.sts_dir / HISTORY_FILE} skipped: not re-check records of "
                         f"STSCallback ({RECHECK_RECORD}).")
        if self.unreadable:
            notes.append(f"{self.unreadable} unreadable line(s) of {self.sts_dir / HISTORY_FILE} skipped (a write cut "
                         "by a crash): the re-checks they held are not in this report.")
        return " ".join(notes) or None

    @property
    def rechecks(self) -> list[dict[str, Any]]:
        return [r for r in self.history if "error" not in r and "scores" in r]

    def recheck_variant(self) -> str:
        """The score the re-checks are charted by: the forecast's, where any domain has it (a one-text domain has
        no STS_icl: it is left out of the chart, not the variant changed for all)."""
        wanted = recheck_variant(self.variant)  # a raw variant's SAE counterpart: re-checks score latents only
        for record in self.rechecks:
            present = {v for scores in record["scores"].values() if isinstance(scores, dict)
                       for v, value in scores.items() if value is not None}
            if wanted in present:
                return wanted
            return "sts_icl" if "sts_icl" in present else "sts_act"
        return wanted

    def ended_note(self) -> str | None:
        """Says so when training ended before its ``max_steps`` (stopped by another callback or the user)."""
        last = self.rechecks[-1] if self.rechecks else {}
        if not last.get("ended_early"):
            return None
        return (f"Training ended at step {last['step']}, before max_steps={last['ended_early']['max_steps']}: the "
                "last re-check's changes are the run's end result, not a point on the way.")

    @property
    def has_ended(self) -> bool:
        """The last re-check is at the run's end: the end of its learning-rate schedule, an early stop, a run
        stopped before max_steps or a checkpoint loaded at the end."""
        last = self.rechecks[-1] if self.rechecks else {}
        share = last.get("lr_area_fraction")
        return (not isinstance(share, (int, float)) or share >= 1 or bool(last.get("early_stop"))
                or self.ended_before_the_end)

    @property
    def start_warnings(self) -> list[str]:
        """The forecast's warnings at train start (a protected domain ranked most affected, or predicted above the
        tolerance), as the run recorded them in its settings."""
        if not self.run_settings and isinstance(self.forecast, dict):  # a forecast alone: what it warned of itself
            fit = (self.forecast.get("settings") or {}).get("sae_fit")
            message = poor_fit_message(fit, "the training data") if isinstance(fit, dict) else None
            return [message] if message else []
        found = self.run_settings.get("train_start_warnings")
        return [w for w in found if isinstance(w, str)] if isinstance(found, list) else []

    def recheck_count(self) -> str:
        """How many re-checks measured, and how many failed beside them."""
        failed = sum("error" in r for r in self.history)
        return f"{len(self.rechecks)}" + (f" (and {failed} failed)" if failed else "")

    def never_measured(self) -> list[str]:
        """Target domains the overhead budget kept waiting their turn at every re-check: no change measured."""
        waiting = (self.rechecks[-1].get("overhead") or {}).get("skipped") or [] if self.rechecks else []
        measured = {name for r in self.rechecks for name, v in (r.get("loss_delta") or {}).items() if v is not None}
        return [name for name in waiting if name not in measured]

    def never_measured_note(self) -> str | None:
        names = self.never_measured()
        if not names:
            return None
        return (f"{', '.join(names)}: no re-check measured {'its' if len(names) == 1 else 'their'} held-out loss (the "
                "overhead budget kept them waiting their turn); raise overhead_budget, or protect what must be "
                "measured at every re-check.")

    def unfinished_note(self) -> str | None:
        """Says so when the last re-check came before the end of the learning-rate schedule and nothing says the run
        ended there: a report written during training, or a run that stopped without its final re-check."""
        last = self.rechecks[-1] if self.rechecks else {}
        share = last.get("lr_area_fraction")
        if self.has_ended:
            return None
        failed_after = [r.get("step") for r in self.history if "error" in r and isinstance(r.get("step"), int)
                        and r["step"] > last.get("step", 0)]
        if failed_after:  # made and failed (listed under the warnings), not missing
            return (f"The last re-check that measured is at step {last['step']} ({share:.0%} of the learning-rate "
                    f"schedule): the re-check at step {max(failed_after)} failed (see the warnings), so the end of "
                    "training is not measured here.")
        raised = self.run_settings.get("loop_raised")
        if isinstance(raised, str):  # the loop left its `with session:` block by an exception
            return (f"The last re-check is at step {last['step']} ({share:.0%} of the learning-rate schedule): the "
                    f"training loop then raised {raised}, so the end of training is not measured here.")
        if self.run_settings.get("recheck_at_end") is False:
            return (f"The last re-check is at step {last['step']} ({share:.0%} of the learning-rate schedule): the run "
                    "does not re-check its end (recheck_at_end=False), so what the remaining steps did is not "
                    "measured here.")
        return (f"The last re-check is at step {last['step']} ({share:.0%} of the learning-rate schedule): the run had "
                "not ended when it was made (still training, or stopped without a final re-check; `sts report` "
                "redraws this report from the folder's files).")

    def violations_of(self, record: dict[str, Any]) -> list[str]:
        """A re-check's warnings: those the run recorded, and, for a domain this report protects that the run did
        not (``protected=`` / ``--protected``), a measured change above the run's tolerance."""
        out = list(record.get("violations") or [])
        guarded = set(self.run_settings.get("protected") or [])
        for name in [p for p in self.protected if p not in guarded] if self.tolerance is not None else []:
            change = (record.get("loss_delta") or {}).get(name)
            if isinstance(change, (int, float)) and change > self.tolerance:
                out.append(f"{name}: held-out loss {change:+.1%}, above the tolerance {self.tolerance:.1%} (judged "
                           "by this report; the run did not protect it)")
        return out

    def violations(self) -> list[tuple[int, str]]:
        """(step, warning) of every re-check (:meth:`violations_of`)."""
        return [(record["step"], v) for record in self.history for v in self.violations_of(record)]

    def warning_items(self) -> list[tuple[str, Any, str]]:
        """Everything the summary lists as a warning, in its order: (kind, step or None, text), kind one of "train
        start", "warning", "projected", "early stop", "failed", "not measured"; the one list both renderers draw."""
        # an offline forecast's folder (`sts forecast`: no training) has no train start: its warnings are the forecast's
        start = "train start" if self.history or self.run_settings else "forecast"
        items = [(start, None, w) for w in self.start_warnings]
        items += [("warning", step, v) for step, v in self.violations()]
        items += [("warning", r["step"], r[key]) for r in self.history for key in ("sae_fit_warning", "model_unchanged")
                  if r.get(key)]
        items += [("projected", r["step"], v) for r in self.history for v in r.get("projected_warnings") or []]
        items += [("early stop", r.get("step"), f"{r['early_stop']}. {self.after_the_stop(r)}") for r in self.history
                  if r.get("early_stop")]
        items += [("failed", r.get("step"), r["error"]) for r in self.history if "error" in r]
        # in the run's order: train start, then each step's (its warnings, projections, failure, and a stop last)
        order = {"train start": 0, "forecast": 0, "warning": 1, "projected": 2, "failed": 3, "early stop": 4}
        items.sort(key=lambda item: (item[0] not in ("train start", "forecast"), item[1] or 0, order[item[0]]))
        if unmeasured := self.never_measured_note():
            items.append(("not measured", None, unmeasured))
        return items

    def after_the_stop(self, stop: dict[str, Any]) -> str:
        """Where to go back to after an early stop: the last re-check before it that broke no rule, and the latest
        checkpoint beside the run folder saved at or before it (a stop on a step that is no save step leaves none
        of the harmed weights; one that is holds them)."""
        safe = 0  # the train start
        for record in reversed(self.history):
            step = record.get("step") or 0
            projected = record.get("projected_warnings") and self.run_settings.get("early_stop") == "projected"
            if 0 < step < (stop.get("step") or 0) and "error" not in record and not self.violations_of(record) \
                    and not projected:  # as the guard counted toward the stop
                safe = step
                break
        saved = [folder for step, folder in checkpoint_folders(self.sts_dir.parent) if step <= safe]
        where = (f"the latest checkpoint saved at or before it is {saved[-1].name}" if saved else
                 "no checkpoint was saved at or before it")
        return (f"The weights at the stop are the harmed ones (unless the trainer then loaded an earlier best "
                f"checkpoint); the last re-check that broke no rule was at "
                f"{'the train start' if safe == 0 else f'step {safe}'}, and {where}")

    def projects_the_end(self, record: dict[str, Any]) -> bool:
        """Whether ``record``'s projection to the end of training is still one: not once the run has ended with
        its weights (a checkpoint loaded at the end, training ended before max_steps)."""
        return (bool(record.get("early_forecast")) and (record.get("lr_area_fraction") or 1) < 1
                and not self.ended_before_the_end)

    @property
    def ended_before_the_end(self) -> bool:
        """The run ended with weights of before the end of its schedule: a checkpoint loaded at the end, or
        training ended before max_steps at the last re-check."""
        return self.loaded_best_step is not None or bool(self.rechecks and self.rechecks[-1].get("ended_early"))

    @property
    def loaded_best_step(self) -> int | None:
        """The step of the checkpoint the loop loaded at its end (the Trainer's ``load_best_model_at_end``)."""
        return self.history[-1].get("loaded_best_step") if self.history else None

    @property
    def end_rechecks(self) -> list[dict[str, Any]]:
        """The re-checks of the weights the run ended with and before: all of them, or up to the step of the
        checkpoint loaded at the end (later ones measured weights the run no longer has)."""
        loaded = self.loaded_best_step
        return [r for r in self.rechecks if loaded is None or r["step"] <= loaded]

    def loaded_note(self) -> str | None:
        """Says which weights the run ended with when the loop loaded an earlier checkpoint at its end."""
        loaded = self.loaded_best_step
        if loaded is None:
            return None
        record = next((r for r in self.rechecks if r["step"] == loaded), None)
        if record is None:
            return (f"At the end the Trainer loaded its best checkpoint (step {loaded}, load_best_model_at_end), "
                    "which no re-check measured: the changes of later steps are of weights the run no longer has.")
        later = len(self.rechecks) - len(self.end_rechecks)
        return (f"At the end the Trainer loaded its best checkpoint (step {loaded}, load_best_model_at_end): the run "
                f"ends with step {loaded}'s weights, whose changes these are; the {later} re-check(s) after step "
                f"{loaded} measured weights the run no longer has.")

    @property
    def end_record(self) -> dict[str, Any] | None:
        """The last re-check of the weights the run ended with (the loaded checkpoint's, else the last one)."""
        return (self.end_rechecks or self.rechecks or [None])[-1]

    def measured(self) -> tuple[str, dict[str, float]] | None:
        """Measured effect per domain: a validation file if any, else the |loss change| of the last re-check of the
        weights the run ended with."""
        validation = self.validation
        if isinstance(validation, dict):
            values = validation.get("measured", validation.get("delta", validation))
            if isinstance(values, dict):
                clean = {str(k): abs(float(v)) for k, v in values.items() if isinstance(v, (int, float))}
                if clean:
                    return "validation |Δ|", clean
        latest = self.latest_changes()
        if not latest:
            return None
        steps = sorted({step for step, _ in latest.values()})
        label = (f"|held-out loss change| at step {steps[0]}" if len(steps) == 1 else
                 f"|held-out loss change| at each domain's latest re-check (steps {steps[0]}-{steps[-1]})")
        return label, {name: abs(change) for name, (_, change) in latest.items()}

    def latest_changes(self) -> dict[str, tuple[int, float]]:
        """Each domain's latest measured change, (step, change), over the re-checks of the weights the run ended
        with: re-checks that took turns (``loss_domains``) measure some domains at each."""
        latest: dict[str, tuple[int, float]] = {}
        for record in self.end_rechecks:
            for name, value in (record.get("loss_delta") or {}).items():
                if isinstance(value, (int, float)):
                    latest[name] = (record["step"], value)
        return latest

    def earlier_changes_note(self) -> str | None:
        """The domains the last re-check did not measure (re-checks taking turns), with their latest change."""
        last = self.end_record or {}
        earlier = {name: (step, change) for name, (step, change) in self.latest_changes().items()
                   if name not in (last.get("loss_delta") or {})}
        if not earlier:
            return None
        return ("Measured at earlier re-checks (the re-checks took turns): " + ", ".join(
            f"{name} {_pct(change, self.tolerance)} at step {step}" for name, (step, change) in earlier.items()) + ".")

    def probe_error_note(self) -> str | None:
        """The re-checks whose probe could not be read (their held-out losses stand)."""
        failed = [r for r in self.rechecks if r.get("probe_error")]
        if not failed:
            return None
        return (f"The probe could not be read at step(s) {', '.join(str(r['step']) for r in failed)} "
                f"({failed[-1]['probe_error']}): those re-checks measured the held-out losses only.")

    def recheck_noise_ceiling(self) -> tuple[int, float] | None:
        """(step, noise ceiling) of the last re-check whose changes carry standard errors: the Pearson r with which
        even the true changes could order the domains as these noisy measurements do
        (:func:`~sts_callback.scoring.agreement.noise_ceiling`)."""
        for record in reversed(self.rechecks):
            ceiling = noise_ceiling_by_domain(record.get("loss_delta") or {}, record.get("loss_delta_se") or {})
            if ceiling is not None:
                return record["step"], ceiling
        return None

    def precision_note(self) -> str | None:
        """A sentence when the last re-check's changes are too noisy to order the domains (plain text)."""
        at = self.recheck_noise_ceiling()
        if at is None or at[1] >= NOISE_CEILING_GOAL:
            return None
        return (f"At step {at[0]} the held-out changes are measured with intervals as wide as their spread across "
                f"domains: even the true changes would order the domains as these measurements do at only about "
                f"r {ceiling_text(at[1])} (noise ceiling), so differences between domains inside their intervals are "
                "noise. Raise loss_tokens" + ("" if self.validation else " (or tighten loss_precision)")
                + " to measure them more precisely.")

    def describe_sae(self) -> str:
        sae = self.settings.get("sae") or {}
        if sae.get("release"):
            name = f"{sae['release']} / {sae.get('sae_id', '')}"
        else:
            name = sae.get("path") or sae.get("name") or sae.get("kind") or sae.get("type") or "SAE"
        width = f", {sae['d_sae']} latents" if sae.get("d_sae") else ""
        hook = f", {sae['hook_name']}" if sae.get("hook_name") else ""
        return f"{name}{width}{hook}"

    @property
    def calibration(self) -> dict[str, Any]:
        """What the forecast records of the calibration that made its predictions (``{}`` without one)."""
        calibration = ((self.forecast or {}).get("settings") or {}).get("calibration")
        return calibration if isinstance(calibration, dict) else {}

    def predicted(self) -> list[tuple[str, dict[str, Any]]]:
        """The calibrated predictions, most harmed (largest predicted loss increase) first, as every page orders
        them."""
        predictions = (self.forecast or {}).get("predictions") or {}
        return sorted(predictions.items(), key=lambda item: -item[1]["mean"])

    def unpredicted(self) -> list[tuple[str, str]]:
        """(domain, why) for each forecast domain the calibration made no prediction for (plain text)."""
        predictions = (self.forecast or {}).get("predictions") or {}
        if not predictions:
            return []
        excluded = [str(name) for name in self.calibration.get("excluded") or []]
        out = [(name, "not predicted (excluded when the calibration was applied)") for name in excluded]
        return out + [(name, "no prediction (a feature of the calibration was not computed for it)")
                      for name in (self.forecast or {}).get("domains") or {}
                      if name not in predictions and name not in excluded]

    def calibration_note(self) -> str:
        """Which calibration made the predictions and what it was fitted on, as a sentence (plain text)."""
        calibration = self.calibration
        if not calibration:
            return "The forecast does not record which calibration made these predictions."
        source = f"{calibration['source']}, " if calibration.get("source") else ""
        fitted = calibration.get("fitted_on") if isinstance(calibration.get("fitted_on"), dict) else {}
        runs = fitted.get("runs")
        if not isinstance(runs, int) and isinstance(fitted.get("training_runs"), list):
            runs = len(fitted["training_runs"])
        of = f" of {runs} training runs" if isinstance(runs, int) else ""
        if isinstance(fitted.get("validations"), list):
            of += f" of {len(fitted['validations'])} validation file(s)"
        details = [f"{label} {fitted[key]}" for key, label in (("model", "model"), ("sae", "SAE"), ("recipe", "recipe"))
                   if isinstance(fitted.get(key), str) and fitted[key]]
        scope = fitted.get("scope") if isinstance(fitted.get("scope"), dict) else {}
        if not details and scope:  # a calibration fitted here: its stated scope is what says what it was fitted on
            details = [f"{key} {value}" for key, value in scope.items() if _scalar(value)]
        detail = f" ({'; '.join(details)})" if details else ""
        unseen = [str(n) for n in calibration.get("unseen_domains") or []]
        # as the console says it: such a domain gets the average domain's level and no prior of its own
        unseen_note = (f" Not in the calibration's runs: {', '.join(unseen)} (the average domain's level, no prior "
                       "of their own; the interval does not allow for that).") if unseen else ""
        return f"Calibration: {source}fitted on {calibration.get('n', '?')} measured changes{of}{detail}.{unseen_note}"

    def scope_caution(self) -> str | None:
        """A sentence when the forecast's model or SAE is outside the calibration's stated scope (plain text)."""
        problems = self.calibration.get("scope_problems") or []
        if not problems:
            return None
        return (f"Caution: the calibration was fitted on another setup ({'; '.join(map(str, problems))}): these "
                "predictions do not carry over; fit one on your own runs (sts calibrate).")


RECHECK_RECORD = "an object with an integer step and scores or an error"


def is_recheck_record(record: Any) -> bool:
    """Whether a history line is one the callback writes: a re-check (``step`` and ``scores``) or a failed one
    (``step`` and ``error``); another tool's log (epoch, loss, step) is not."""
    if not isinstance(record, dict):
        return False
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return False
    return isinstance(record.get("scores"), dict) or isinstance(record.get("error"), str)


def gate_outcome(gate: Any) -> str:
    """The gate's decision in words: its ``decision`` and each candidate accepted or rejected (plain text)."""
    if not isinstance(gate, dict):
        return ""
    parts = [f"decision {gate['decision']}"] if _scalar(gate.get("decision")) and gate.get("decision") else []
    candidates = gate.get("candidates")
    if isinstance(candidates, dict):
        candidates = [{"name": k, **v} for k, v in candidates.items() if isinstance(v, dict)]
    if isinstance(candidates, list):
        verdicts: dict[str, list[str]] = {"accepted": [], "rejected": []}
        for c in candidates:
            if isinstance(c, dict) and isinstance(c.get("accepted"), bool):
                verdicts["accepted" if c["accepted"] else "rejected"].append(str(c.get("name", c.get("candidate"))))
        if any(verdicts.values()):
            parts.append(f"{sum(map(len, verdicts.values()))} candidate(s), "
                         + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in verdicts.items()))
    return "; ".join(parts)


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise STSInputError(f"{path} is not valid JSON: {err}") from err
    except OSError as err:
        raise STSInputError(f"{path} cannot be read ({type(err).__name__}: {err}).") from err


# --------------------------------------------------------------------------- plots
_matplotlib_missing = False  # set when an import of matplotlib failed in this process (it has then been said)


def optional_pyplot():
    """``matplotlib.pyplot`` (the Agg backend unless one is chosen), or ``None`` when matplotlib is not installed
    (it is the optional extra ``report``); the first ``None`` in a process warns, naming the install command."""
    global _matplotlib_missing
    try:
        import matplotlib
    except ImportError:
        if not _matplotlib_missing:
            _matplotlib_missing = True
            warnings.warn(NO_MATPLOTLIB, UserWarning, stacklevel=2)
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a domain named in a script the font lacks (CJK) draws boxes; said once a figure
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    try:  # a 128-colour palette: a few KB per plot instead of tens
        from PIL import Image

        buffer.seek(0)
        image = Image.open(buffer).convert("RGB").quantize(colors=128)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    except ImportError:
        pass
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


LABEL_CHARS = 32  # a longer domain name would squeeze the plot area to a strip; the tables keep the whole name
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = "osD^v<>pPX*h"


def short_label(name: str) -> str:
    """A domain name as a figure's label: at most :data:`LABEL_CHARS` characters, its start and end kept."""
    if len(name) <= LABEL_CHARS:
        return name
    head = (LABEL_CHARS - 1) * 2 // 3
    return name[:head] + "…" + name[len(name) - (LABEL_CHARS - 1 - head):]


def series_style(plt, i: int) -> dict[str, Any]:
    """The ``i``-th domain's colour, marker and line style: tab10's ten colours, then each again with the next
    marker and line style, so that domains 1 and 11 are told apart in a legend."""
    cycle = i // 10
    return {"color": plt.get_cmap("tab10")(i % 10), "marker": MARKERS[cycle % len(MARKERS)],
            "linestyle": LINE_STYLES[cycle % len(LINE_STYLES)]}


def plot_forecast(data: ReportData) -> str | None:
    """The forecast bar chart as a PNG data URI (``None`` without matplotlib)."""
    plt = optional_pyplot()
    if plt is None:
        return None
    names = [name for name, _ in data.ranking][::-1]
    values = [value for _, value in data.ranking][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.1))
    colors = [PROTECTED_COLOR if n in data.protected else OTHER_COLOR for n in names]
    bars = ax.barh(range(len(names)), values, color=colors)
    for bar, name in zip(bars, names):
        if name in data.protected:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([short_label(n) + (" (protected)" if n in data.protected else "") for n in names])
    ax.set_xlabel(f"{LABELS.get(data.variant or '', data.variant)}  (higher = more affected)")
    ax.set_title(f"Forecast per target domain, ranked by {LABELS.get(data.variant or '', data.variant)}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_timeline(data: ReportData) -> str | None:
    records = data.rechecks
    plt = optional_pyplot() if records else None
    if plt is None:
        return None
    variant = data.recheck_variant()
    # every domain any re-check scored or measured (a last re-check whose probe failed scored none)
    names = list(dict.fromkeys(name for r in records for name in [*r["scores"], *(r.get("loss_delta") or {})]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    forecast_domains = (data.forecast or {}).get("domains", {})
    for i, name in enumerate(names):
        protected = name in data.protected
        style = dict(**series_style(plt, i), linewidth=2.4 if protected else 1.3, markersize=3.5,
                     label=short_label(name) + (" (protected)" if protected else ""))
        scored = [r for r in records if (r["scores"].get(name) or {}).get(variant) is not None]
        steps, sts = [r["step"] for r in scored], [r["scores"][name][variant] for r in scored]
        base = (forecast_domains.get(name) or {}).get("scores", {}).get(variant)
        if base is not None:  # the forecast, at step 0
            steps, sts = [0, *steps], [base, *sts]
        top.plot(steps, sts, **style)
        loss_steps = [r["step"] for r in records if (r.get("loss_delta") or {}).get(name) is not None]
        deltas = [100 * r["loss_delta"][name] for r in records if (r.get("loss_delta") or {}).get(name) is not None]
        bottom.plot([0, *loss_steps], [0.0, *deltas], **{**style, "label": None})
    if data.tolerance is not None and data.protected:
        bottom.axhline(100 * data.tolerance, color=PROTECTED_COLOR, linestyle=":", linewidth=1,
                       label=f"tolerance {data.tolerance:.0%}")

    def marks(records_warned: list[dict[str, Any]], texts) -> tuple[list[int], list[float]]:
        """A mark on each domain a warning names, at its change (the largest change where it names none)."""
        steps, values = [], []
        for record in records_warned:
            changes = {n: 100 * v for n, v in (record.get("loss_delta") or {}).items() if v is not None}
            said = texts(record)  # the guard's own messages quote a name; this report's start with it
            domains = {*(record.get("loss_delta") or {}), *(record.get("accuracy_delta") or {})}
            named = [n for n in domains if any(repr(n) in text or text.startswith(f"{n}: ") for text in said)]
            # a named domain with no loss change (an lm-eval task's accuracy) has no point on this chart
            for value in [changes[n] for n in named if n in changes] if named else [max(changes.values(),
                                                                                         default=0.0)]:
                steps.append(record["step"])
                values.append(value)
        return steps, values

    warned = [r for r in records if data.violations_of(r)]
    if warned:
        bottom.scatter(*marks(warned, data.violations_of), marker="X", s=70, color=PROTECTED_COLOR, zorder=5,
                       label="warning")
    foreseen = [r for r in records if r.get("projected_warnings") and not data.violations_of(r)]
    if foreseen:
        bottom.scatter(*marks(foreseen, lambda r: r["projected_warnings"]), marker="X", s=70, facecolors="none",
                       edgecolors=PROTECTED_COLOR, zorder=5, label="projected warning")
    for record in data.history:
        if record.get("early_stop"):
            for ax in (top, bottom):
                ax.axvline(record["step"], color="black", linestyle="--", linewidth=1.2)
            top.annotate("early stop", (record["step"], 1), xycoords=("data", "axes fraction"),
                         xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8)
        elif "error" in record:
            for ax in (top, bottom):
                ax.axvline(record["step"], color="grey", linestyle=":", linewidth=1)
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel(f"re-checked {LABELS.get(variant, variant)}")
    bottom.set_ylabel("held-out loss change (%)")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_xlabel("training step (0 = forecast / start)")
    top.set_title("Over training: re-checked STS and measured held-out loss change per domain", fontsize=10)
    for ax in (top, bottom):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.3)
    for ax in (top, bottom):  # a panel with nothing drawn (every score NaN: a diverged model) has no legend
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


@dataclass
class Agreement:
    """Forecast vs measured: the points plotted and the correlation the report quotes, with what it is."""

    label: str  # what was measured, e.g. "|held-out loss change| at step 8"
    series: list[tuple[str, list[tuple[str, float, float]]]]  # (seed name or "", [(domain, score, measured)])
    pearson: float | None
    spearman: float | None
    how: str = ""  # where the quoted numbers come from, plain text ("" when computed here from the points)
    variant: str | None = None
    axis: str = ""  # a short y-axis label ("": the label)

    @property
    def points(self) -> list[tuple[str, float, float]]:
        return [point for _, points in self.series for point in points]

    @property
    def n_domains(self) -> int:
        return len({name for name, _, _ in self.points})


def _validation_agreement(data: ReportData) -> Agreement | None:
    """The correlation validation.json holds for the ranking variant against |Δ|: one seed's, or the seeds' mean."""
    v = data.validation
    correlations = ((v.get("correlations") or {}).get("nll") or {}) if isinstance(v, dict) else {}
    per_seed = v.get("per_seed") if isinstance(v, dict) else None
    if not correlations or not isinstance(per_seed, list) or not per_seed:
        return None
    variant = next((c for c in (data.variant, "sts_icl", *correlations) if c in correlations), None)
    entry = (correlations.get(variant) or {}).get("abs") or {}
    pearson, spearman = entry.get("pearson") or {}, entry.get("spearman") or {}
    series = []
    for seed in per_seed:
        scores, deltas = seed.get("scores") or {}, seed.get("nll_delta_rel") or {}
        points = [(d, scores[d][variant], abs(deltas[d])) for d in v.get("domains") or scores
                  if isinstance((scores.get(d) or {}).get(variant), (int, float))
                  and isinstance(deltas.get(d), (int, float))]
        series.append((f"seed {seed.get('seed')}", points))
    where = f"in validation.json: correlations.nll.{variant}.abs"
    label = "|Δ| (each domain's |relative change of held-out NLL|)"
    if len(per_seed) == 1:
        seed = per_seed[0]
        p = (((seed.get("correlations") or {}).get("nll") or {}).get(variant) or {}).get("abs", {}).get("pearson", {})
        p_text = ""
        if isinstance(p.get("p"), (int, float)):
            p_text = f"; Pearson p = {p['p']:.3g}" + (f" ({p['p_method']})" if p.get("p_method") else "")
        how = f"seed {seed.get('seed')}{p_text}; {where}"
        series = [("", series[0][1])]
    else:
        def each(values: Any) -> str:
            return ", ".join(f"{name} {r:+.2f}" if isinstance(r, (int, float)) else f"{name} n/a"
                             for (name, _), r in zip(series, values or []))

        how = (f"mean over {len(per_seed)} seeds of each seed's r: Pearson {each(pearson.get('values'))}; "
               f"Spearman {each(spearman.get('values'))}; {where}")
    return Agreement(label, series, pearson.get("mean"), spearman.get("mean"), how, variant,
                     "|relative held-out NLL change|")


def scatter_points(data: ReportData) -> Agreement | None:
    """Forecast vs measured: from validation.json's own correlations when it has them, else computed here from
    forecast.json's scores and the measured |change| (a validation's mean, or the last re-check's)."""
    agreement = _validation_agreement(data)
    if agreement is not None:
        return agreement if agreement.points else None
    measured = data.measured()
    if measured is None or not data.ranking:
        return None
    label, values = measured
    points = [(name, score, values[name]) for name, score in data.ranking if name in values]
    if len(points) < 2:
        return None
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    pearson, spearman = (correlation(xs, ys, statistic, n_resamples=0)["r"] for statistic in ("pearson", "spearman"))
    return Agreement(label, [("", points)], pearson, spearman, "", data.variant)


def plot_scatter(data: ReportData, scatter: Agreement) -> str | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    markers = "osD^v<>"
    several = len(scatter.series) > 1
    every = [(x, 100 * y) for _, points in scatter.series for _, x, y in points]
    spans = [max(max(v) - min(v), 1e-12) for v in zip(*every)] if every else [1.0, 1.0]
    labelled: list[tuple[float, float]] = []
    for i, (series, points) in enumerate(scatter.series):
        for name, x, y in points:
            color = PROTECTED_COLOR if name in data.protected else OTHER_COLOR
            if several:  # one colour per seed
                color = plt.get_cmap("tab10")(i % 10)
            ax.scatter([x], [100 * y], color=color, s=36, zorder=3, marker=markers[i % len(markers)],
                       label=series or None)
            # a label beside another point's (within 4% of the axes) moves down a line, so both can be read
            near = sum(abs(x - u) < 0.04 * spans[0] and abs(100 * y - v) < 0.04 * spans[1] for u, v in labelled)
            labelled.append((x, 100 * y))
            ax.annotate(short_label(name), (x, 100 * y), xytext=(4, 3 - 10 * near), textcoords="offset points",
                        fontsize=8)
    if several:
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, frameon=False)
    variant = scatter.variant or data.variant or ""
    ax.set_xlabel(f"forecast {LABELS.get(variant, variant)}")
    ax.set_ylabel(f"measured: {scatter.axis or scatter.label} (%)", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long labels (0.0016, 0.0018, ...) ran together
    ax.tick_params(labelsize=8)
    r = "n/a" if scatter.pearson is None else f"{scatter.pearson:.2f}"
    rho = "n/a" if scatter.spearman is None else f"{scatter.spearman:.2f}"
    mean = " (mean of the seeds' r)" if several else ""
    ax.set_title(f"Forecast vs measured |Δ|: Pearson r = {r}, Spearman ρ = {rho}{mean}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.3)
    return _png(fig)


def _agreement_text(scatter: Agreement) -> str:
    """One sentence (plain text) quoting the correlation and saying what it is."""
    r = "n/a" if scatter.pearson is None else f"{scatter.pearson:.2f}"
    rho = "n/a" if scatter.spearman is None else f"{scatter.spearman:.2f}"
    variant = LABELS.get(scatter.variant or "", scatter.variant or "the forecast")
    how = f" ({scatter.how})" if scatter.how else ""
    return (f"Forecast vs measured: Pearson r = {r}, Spearman ρ = {rho} between {variant} and {scatter.label} over "
            f"{scatter.n_domains} domains{how}.")


def _validation_ceiling_note(data: "ReportData") -> str | None:
    """What the validation's noise ceiling says of the measured changes: noisy only below the forecast's goal."""
    ceiling = data.validation.get("noise_ceiling") if isinstance(data.validation, dict) else None
    if ceiling is None:
        return None
    if ceiling < NOISE_CEILING_GOAL:
        return (f"The measured changes are noisy: against them even a perfect forecast could expect a Pearson r of "
                f"only about {ceiling_text(ceiling)} with the signed change (noise ceiling); raise loss_tokens to measure "
                "them more precisely.")
    return (f"The measured changes are precise enough to judge the forecast: a perfect forecast could expect a "
            f"Pearson r of about {ceiling_text(ceiling)} with the signed change (noise ceiling).")


# --------------------------------------------------------------------------- HTML
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2b45;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:22px}
header .meta{display:flex;flex-wrap:wrap;gap:6px 22px;font-size:13px;opacity:.92}
header .meta b{font-weight:600;color:#9fc3ff}
main{max-width:1100px;margin:0 auto;padding:12px 24px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:4px 0 10px;color:#1d2b45}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.protected td:first-child+td{color:#c0392b;font-weight:600}
.tag{display:inline-block;border-radius:3px;padding:0 5px;font-size:11px;font-weight:600}
.tag.protected{background:#fbe3e0;color:#c0392b}.tag.ok{background:#e1f3e6;color:#1e7d3a}
.tag.warn{background:#fff1d6;color:#9a5b00}.tag.err{background:#eee;color:#555}
.summary{font-size:14px;line-height:1.55}
.warnings li{color:#9a3412}
.caution{color:#9a3412;font-weight:600}
img.plot{max-width:100%;display:block;margin:6px 0}
.bar{display:inline-block;height:9px;background:#2c6fbb;border-radius:2px;vertical-align:middle;margin-right:6px}
.latent{border-top:1px solid #e3e6eb;padding:8px 0}
.latent .head{font-size:13.5px;margin-bottom:4px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;margin:1px 0 1px 12px}
.ctx mark{background:#ffd84d;padding:0 2px;margin:0 .3em;border-radius:2px;font-weight:700}
.ctx .val{color:#777;display:inline-block;min-width:62px}
.src{font-size:12px;color:#555;margin:4px 0 0 4px;font-weight:600}
.muted{color:#777;font-size:12.5px}
a{color:#2c6fbb}
"""


def _img(src: str | None, alt: str) -> str:
    return f'<img class="plot" src="{src}" alt="{esc(alt)}">' if src else ""


def _table(headers: list[str], rows: list[list[str]], row_attrs: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else ""
        cells = "".join(('<td class="num">' + c[1:] if c.startswith("\x00") else "<td>" + c) + "</td>" for c in row)
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num(value: Any, digits: int = 4) -> str:
    return "\x00" + esc(_fmt(value, digits))


# What each shift measures, as the report says it (Forecast.settings["shift"]).
SHIFT_LABELS = {
    "in_context": "the training data's answers in context (in-context estimate)",
    "chosen_vs_rejected": "chosen minus rejected completions",
    "reward_weighted": "the policy's rollouts, high minus low reward",
    "reward_filtered": "the policy's above-mean rollouts in context",
    "teacher_completions": "the teacher's completions in context",
    "teacher_vs_student": "the teacher's minus the student's completions",
}


# Which way a shifted latent moved, per shift (the shift's sign: its second side subtracted from its first).
SHIFT_ARROWS = {
    "chosen_vs_rejected": ("more active in chosen than rejected", "less active in chosen than rejected"),
    "reward_weighted": ("more active in high-reward rollouts", "less active in high-reward rollouts"),
    "teacher_vs_student": ("more active in the teacher's completions", "less active in the teacher's completions"),
}


def shift_arrow(forecast: dict[str, Any], direction: float) -> str:
    """``↑`` / ``↓`` and what the direction means for the forecast's shift."""
    kind = (forecast.get("settings") or {}).get("shift", "in_context")
    up, down = SHIFT_ARROWS.get(kind, ("more active in context", "less active in context"))
    return f"↑ {up}" if direction > 0 else f"↓ {down}"


def shift_label(forecast: dict[str, Any]) -> str:
    """What the forecast's shift was measured on, and any term of the trainer's loss it leaves out."""
    settings = forecast.get("settings") or {}
    kind = settings.get("shift", "in_context")
    label = SHIFT_LABELS.get(kind, kind)
    return label + (f"; left out: {settings['left_out']}" if settings.get("left_out") else "")


def _header(data: ReportData) -> str:
    s = data.settings
    config = s.get("config") or {}
    f = data.forecast or {}
    items = [("model", s.get("model")), ("SAE", data.describe_sae()), ("layer", s.get("layer")),
             ("probe tokens", f"{f['shift_tokens']} ({f.get('shift_queries', '–')} queries)"
              if f.get("shift_tokens") is not None else None),
             ("domain tokens", config.get("domain_tokens")),
             ("shifted latents N", len(f.get("shifted_latents", [])) or None),
             ("shift", shift_label(f) if f else None),
             ("variant", LABELS.get(data.variant or "", data.variant))]
    # what the folder does not hold (a gate decision has no probe of its own) is left out, not shown as "–"
    meta = "".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in items if v not in (None, ""))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (f"<header><h1>STS report: forecast side effects of post-training</h1><div class=\"meta\">{meta}"
            f"<span><b>written</b> {esc(when)}</span></div></header>")


def _summary(data: ReportData, scatter: Agreement | None) -> str:
    lines = []
    predicted = data.predicted()
    if predicted:  # the calibrated prediction leads, as in its table below: the raw scores may order otherwise
        def shown(items):
            return ", ".join(f"<b>{esc(n)}</b> {esc(_pct(p['mean']))}" + (
                ' <span class="tag protected">protected</span>' if n in data.protected else "") for n, p in items)

        harmed = [(n, p) for n, p in predicted if p["mean"] > 0]
        if harmed:
            lines.append(f"Most affected by this training (calibrated prediction of the held-out loss change, most "
                         f"harmed first): {shown(harmed[:3])}.")
        else:  # every domain predicted to gain: the largest changes, not the least improved as "most harmed"
            largest = sorted(predicted, key=lambda item: -abs(item[1]["mean"]))[:3]
            lines.append(f"No domain is predicted to get worse (calibrated prediction of the held-out loss change); "
                         f"the largest changes: {shown(largest)}.")
        if data.scope_caution():  # said in full where the predictions are shown
            lines.append('<span class="caution">Caution: the calibration was fitted on another setup (see Predicted '
                         "change per target domain below): these predictions do not carry over.</span>")
    elif data.ranking:
        top = ", ".join(f"<b>{esc(n)}</b>" + (' <span class="tag protected">protected</span>'
                                               if n in data.protected else "") for n, _ in data.ranking[:3])
        label = esc(LABELS.get(data.variant, data.variant))
        lines.append(f"Most affected by this training (forecast, {label}): {top}.")
    elif data.forecast is None:
        lines.append(esc(data.contents_note()))
    if data.skipped_note():
        lines.append(esc(data.skipped_note()))
    if data.protected:
        lines.append("Protected domains: " + ", ".join(esc(p) for p in data.protected)
                     + (f" (held-out loss tolerance {data.tolerance:.1%})" if data.tolerance is not None else "") + ".")
    if data.rechecks:
        last = data.end_record
        overlap = _overlap(last) if data.forecast is not None else None  # no forecast here to overlap with
        lines.append(f"Re-checks: {esc(data.recheck_count())}, {esc(_which(data, last))}"
                     + (f"; overlap of the actually shifted latents with the forecast: {esc(overlap)}" if overlap
                        else "") + ".")
        for note in (data.ended_note(), data.loaded_note(), data.unfinished_note(), data.earlier_changes_note(),
                     data.probe_error_note()):
            if note:
                lines.append(esc(note))
        if spent := _overhead(data.rechecks[-1], data.has_ended):  # every re-check's, also after a loaded checkpoint
            lines.append(esc(spent))
        note = data.precision_note()
        if note:
            lines.append(esc(note))
    if scatter is not None and scatter.pearson is not None:
        lines.append(esc(_agreement_text(scatter)))
        if note := _validation_ceiling_note(data):
            lines.append(esc(note))
    found = data.warning_items()
    items = "".join(_html_warning(kind, step, text) for kind, step, text in found)
    kinds = {kind for kind, _, _ in found}
    tags = [tag for kind, tag in SUMMARY_TAGS if kind in kinds]
    status = " ".join(tags) or ('<span class="tag ok">no warnings</span>' if data.rechecks else "")
    body = "".join(f"<div>{line}</div>" for line in lines)
    warn = f'<ul class="warnings">{items}</ul>' if items else ""
    return f'<section class="summary"><h2>Summary {status}</h2>{body}{warn}</section>'


SUMMARY_TAGS = (("warning", '<span class="tag warn">warnings</span>'),
                ("projected", '<span class="tag warn">projected warnings</span>'),
                ("early stop", '<span class="tag protected">early stop</span>'),
                ("failed", '<span class="tag err">failed re-checks</span>'),
                ("not measured", '<span class="tag warn">domains not measured</span>'),
                ("train start", '<span class="tag warn">train-start warnings</span>'),
                ("forecast", '<span class="tag warn">forecast warnings</span>'))


# each kind of warning_items() entry as each renderer writes it ({step} and {text} escaped for it)
WARNING_FORMATS = {
    "train start": ('<span class="tag warn">train start</span> {text}', "train start: {text}"),
    "forecast": ('<span class="tag warn">forecast</span> {text}', "forecast: {text}"),
    "warning": ("step {step}: {text}", "step {step}: {text}"),
    "projected": ('step {step} <span class="tag warn">projected</span>: {text}', "step {step} (projected): {text}"),
    "early stop": ("<b>{text}</b>", "**{text}**"),
    "failed": ("step {step}: re-check failed ({text})", "step {step}: re-check failed ({text})"),
    "not measured": ("{text}", "{text}"),
}


def _html_warning(kind: str, step: Any, text: str) -> str:
    return "<li>" + WARNING_FORMATS[kind][0].format(step=esc(step), text=esc(text)) + "</li>"


def _markdown_warning(kind: str, step: Any, text: str) -> str:
    return WARNING_FORMATS[kind][1].format(step=step, text=md_esc(text))


def _prediction_section(data: ReportData) -> str:
    """The calibrated forecast leads: each domain's predicted held-out NLL change, interval, gain/loss/flat."""
    predicted = data.predicted()
    if not predicted:
        return ""
    level = predicted[0][1].get("level", 0.9)
    rows, attrs = [], []

    def domain(name: str) -> str:
        return esc(name) + (' <span class="tag protected">protected</span>' if name in data.protected else "")

    for name, p in predicted:
        mean, low, high = signed_percents([p["mean"], p["low"], p["high"]])
        rows.append([domain(name), f"\x00{mean}", f"\x00[{low}, {high}]", esc(p["label"])])
        attrs.append(f' class="prediction {esc(p["label"])}" data-domain="{esc(name)}"')
    for name, why in data.unpredicted():  # named, not dropped: a missing row would read as "nothing to fear"
        rows.append([domain(name), "\x00–", "\x00–", esc(why)])
        attrs.append(f' class="prediction none" data-domain="{esc(name)}"')
    caution = data.scope_caution()
    caution = f'<p class="caution"><span class="tag warn">out of scope</span> {esc(caution)}</p>' if caution else ""
    return (f'<section id="prediction"><h2>Predicted change per target domain</h2>{caution}'
            f'<p class="muted">Relative change of each domain\'s held-out language-model loss at the end of training '
            f"(+ = worse), with a {level:.0%} interval; loss / gain: the whole interval above / below zero, flat: it "
            f"includes zero. {esc(data.calibration_note())} The raw scores follow below.</p>"
            + _table(["domain", "predicted", f"{level:.0%} interval", "label"], rows, attrs) + "</section>")


def _forecast_section(data: ReportData) -> str:
    if not data.ranking:
        return ""
    domains = data.forecast["domains"]
    shown = ("sts_icl", "sts_act", "sts_sq", "raw_act")
    variants = [v for v in (*shown, *([data.variant] if data.variant not in shown else []))  # the ranked one too
                if all(isinstance(d.get("scores", {}).get(v), (int, float)) for d in domains.values())]
    rows, attrs = [], []
    for rank, (name, _) in enumerate(data.ranking, 1):
        d = domains[name]
        protected = name in data.protected
        rows.append([f"\x00{rank}", esc(name) + (' <span class="tag protected">protected</span>' if protected else ""),
                     *[_num(d["scores"][v]) for v in variants], _num(d.get("tokens")), _num(d.get("texts"))])
        css = "ranking protected" if protected else "ranking"
        attrs.append(f' class="{css}" data-rank="{rank}" data-domain="{esc(name)}"')
    table = _table(["rank", "domain", *[esc(LABELS[v]) + (" ★" if v == data.variant else "") for v in variants],
                    "tokens", "texts"], rows, attrs)
    chart = _img(plot_forecast(data), "forecast bar chart")
    return (f'<section id="forecast"><h2>Forecast per target domain</h2>{chart}'
            f'<p class="muted">Ranked by {esc(LABELS.get(data.variant, data.variant))} (★). Higher = larger expected '
            "change of that domain's performance (magnitude, not sign). Protected domains are red and hatched.</p>"
            f"{table}</section>")


def _accuracy_changes(record: dict[str, Any]) -> str:
    """A re-check's multiple-choice domains: accuracy and its change from train start in points, with the change's
    95% interval over the items where measured, e.g. "quiz 47.5% (-27.5 points [-41.0, -14.0] of 40 items)"; empty
    without any."""
    deltas, intervals = record.get("accuracy_delta") or {}, record.get("accuracy_delta_ci") or {}
    items = record.get("accuracy_items") or {}

    def change(name: str) -> str:
        if deltas.get(name) is None:
            return ""
        low_high = f" [{intervals[name][0] * 100:+.1f}, {intervals[name][1] * 100:+.1f}]" if name in intervals else ""
        over = f" of {items[name]} items" if name in intervals and items.get(name) else ""
        return f" ({deltas[name] * 100:+.1f} points{low_high}{over})"

    return ", ".join(f"{name} {value:.1%}{change(name)}" for name, value in (record.get("accuracy") or {}).items()
                     if isinstance(value, (int, float)) and math.isfinite(value))


def _timeline_section(data: ReportData) -> str:
    if not data.history:
        return ""
    variant = data.recheck_variant()
    rows = []
    for record in data.history:
        if "error" in record:
            rows.append([_num(record.get("step")), '<span class="tag err">failed</span>', esc(record["error"]), "", "",
                         ""])
            continue
        deltas = ", ".join(esc(change) for change in _changes(record, tolerance=data.tolerance))
        if accuracy := _accuracy_changes(record):
            deltas += "<br>accuracy " + esc(accuracy)
        violations = data.violations_of(record)
        tags = [tag for listed, tag in ((violations, '<span class="tag warn">warning</span>'),
                                        (record.get("projected_warnings"),
                                         '<span class="tag warn">projected warning</span>'),
                                        (record.get("early_stop"), '<span class="tag protected">early stop</span>'))
                if listed]
        status = " ".join(tags) or '<span class="tag ok">ok</span>'
        notes = "; ".join([esc(v) for v in violations]
                          + [f"projected: {esc(v)}" for v in record.get("projected_warnings") or []])
        projected = ", ".join(f"{esc(k)} {esc(v)}" for k, v in _projections(record, data.tolerance))
        if record.get("lr_area_fraction") is not None and projected:
            projected = f"after {record['lr_area_fraction']:.0%} of the lr schedule: {projected}"
        if record.get("predicted"):
            projected += ("<br>" if projected else "") + "calibrated at start: " + ", ".join(
                f"{esc(k)} {esc(_pct(v))}" for k, v in record["predicted"].items())
        rows.append([_num(record.get("step")), status, deltas, projected, _num(record.get("overlap_with_forecast")),
                     notes])
    header = ["step", "status", "held-out loss change [95% interval]",
              "projected at the end of training [95% interval]", "overlap with forecast", "warnings"]
    if data.forecast is None:  # no forecast here to overlap with: the column goes
        header.pop(4)
        rows = [row[:4] + row[5:] for row in rows]
    table = _table(header, rows)
    return (f'<section id="timeline"><h2>Over training</h2>{_img(plot_timeline(data), "timeline")}'
            f'<p class="muted">Top: each domain re-scored ({esc(LABELS.get(variant, variant))}) on the latents the '
            "training actually shifted (step 0: the forecast). Bottom: relative change of the held-out language-model "
            "loss vs train start. ✕ = warning (hollow: projected only), dashed line = early stop, dotted grey = "
            "failed re-check.</p>"
            f"{table}</section>")


def _scatter_section(data: ReportData, scatter: Agreement | None) -> str:
    if scatter is None:
        return ""
    r = "n/a (needs ≥ 3 domains that differ)" if scatter.pearson is None else f"{scatter.pearson:.3f}"
    rho = "n/a" if scatter.spearman is None else f"{scatter.spearman:.3f}"
    how = f" ({scatter.how})" if scatter.how else ""
    return (f'<section id="scatter"><h2>Forecast vs measured</h2>{_img(plot_scatter(data, scatter), "scatter")}'
            f"<p>Measured: {esc(scatter.label)}. Pearson r = <b>{esc(r)}</b>, Spearman ρ = <b>{esc(rho)}</b> with "
            f"{esc(LABELS.get(scatter.variant or '', scatter.variant or 'the forecast'))} over {scatter.n_domains} "
            f"domains{esc(how)}. STS forecasts the magnitude of the change, not its sign.</p>"
            "</section>")


def _context_html(entry: dict[str, Any]) -> str:
    def show(text: Any) -> str:
        return esc(text).replace("\n", "↵")

    return (f'<div class="ctx"><span class="val">{esc(_fmt(entry.get("value"), 3))}</span>{show(entry.get("before"))}'
            f'<mark>{show(entry.get("token"))}</mark>{show(entry.get("after"))}</div>')


def _latents_section(data: ReportData) -> str:
    f = data.forecast
    if not f or not f.get("shifted_latents"):
        return ""
    latents, values = f["shifted_latents"], f.get("shift_values") or []
    directions = f.get("shift_direction") or []
    total = sum(values) or 1.0
    top_value = max(values) if values else 1.0
    np_id = (data.settings.get("sae") or {}).get("neuronpedia_id")
    contexts = f.get("latent_contexts") or {}
    blocks = []
    for rank, latent in enumerate(latents, 1):
        value = values[rank - 1] if rank - 1 < len(values) else None
        direction = directions[rank - 1] if rank - 1 < len(directions) else None
        share = value / total if value is not None else None
        arrow = "" if direction is None else shift_arrow(f, direction)
        link = (f' <a href="{esc(NEURONPEDIA.format(id=np_id, latent=latent))}" target="_blank" rel="noopener">'
                "Neuronpedia ↗</a>") if np_id else ""
        width = int(120 * (value or 0) / top_value) if top_value else 0
        head = (f'<div class="head"><b>#{rank} latent {esc(latent)}</b>{link} &nbsp; shift {esc(_fmt(value))} '
                f'&nbsp;<span class="bar" style="width:{width}px"></span>{esc(_fmt(share and 100 * share, 3))}% of the '
                f'top-{len(latents)} shift &nbsp;<span class="muted">{esc(arrow)}</span></div>')
        body = ""
        if rank <= MAX_LATENTS_WITH_CONTEXTS:
            by_source: dict[str, list[dict[str, Any]]] = {}
            for entry in contexts.get(str(latent), []):
                by_source.setdefault(str(entry.get("source")), []).append(entry)
            for source, entries in by_source.items():
                title = "training probe" if source == "train" else f"domain {source}"
                entries = sorted(entries, key=lambda e: -(e.get("value") or 0))[:MAX_CONTEXTS_PER_SOURCE]
                body += f'<div class="src">{esc(title)}</div>' + "".join(_context_html(e) for e in entries)
        blocks.append(f'<div class="latent" data-latent="{esc(latent)}">{head}{body}</div>')
    note = (f"Contexts shown for the first {MAX_LATENTS_WITH_CONTEXTS} latents."
            if len(latents) > MAX_LATENTS_WITH_CONTEXTS else "")
    np_note = "" if np_id else " The SAE has no Neuronpedia id, so no Neuronpedia links."
    return (f'<section id="latents"><h2>The shifted latents</h2><p class="muted">The {len(latents)} SAE latents the '
            f"training shifts most ({esc(shift_label(f))}), with their top-activating contexts (activation, a few "
            f"tokens either side, the activating token highlighted) from the training probe and each target domain. "
            f"{esc(note)}{esc(np_note)}</p>{''.join(blocks)}</section>")


# gate.json's bookkeeping (its format tag, the passes' counts and seconds): for tools, not for the person reading
GATE_INTERNALS = ("format", "forward_calls", "timings")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return '<span class="tag ok">yes</span>' if value else '<span class="tag protected">no</span>'
    if isinstance(value, (int, float)):
        return _num(value)
    if _scalar(value):
        return esc(value)
    if isinstance(value, dict) and all(_scalar(v) for v in value.values()):  # e.g. a score per protected domain
        return ", ".join(f"{esc(k)} {esc(_fmt(v))}" for k, v in value.items())
    return esc(json.dumps(value)[:300])


def _records_table(records: list[Any], first: tuple[str, ...] = ()) -> str:
    if not records:
        return ""
    if not all(isinstance(r, dict) for r in records):
        return "<ul>" + "".join(f"<li>{_cell(r)}</li>" for r in records) + "</ul>"
    keys = [k for k in first if any(k in r for r in records)]
    keys += [k for r in records for k in r if k not in keys]
    keys = list(dict.fromkeys(keys))
    return _table([esc(k) for k in keys], [[_cell(r.get(k)) for k in keys] for r in records])


def _gate_section(gate: Any) -> str:
    if gate is None:
        return ""
    if not isinstance(gate, dict):
        rows = _records_table(gate if isinstance(gate, list) else [gate])
        return f'<section id="gate"><h2>Gate decision</h2>{rows}</section>'
    parts = []
    scalars = {k: v for k, v in gate.items() if _scalar(v) and k not in GATE_INTERNALS}
    if scalars:
        parts.append(_table(["", ""], [[esc(k), _cell(v)] for k, v in scalars.items()]))
    candidates = gate.get("candidates")
    if isinstance(candidates, dict):
        candidates = [{**({} if isinstance(v, dict) and "name" in v else {"name": k}),
                       **(v if isinstance(v, dict) else {"value": v})} for k, v in candidates.items()]
    if isinstance(candidates, list):
        parts.append("<h3>Candidates</h3>" + _records_table(
            candidates, ("name", "candidate", "accepted", "reason", "weight")))
    weights = gate.get("weights")
    if isinstance(weights, dict):
        rows = [[esc(k), _cell(v)] for k, v in weights.items()]
        parts.append("<h3>Weights</h3>" + _table(["dataset", "weight"], rows))
    if isinstance(gate.get("allocation"), dict):
        rows = [[esc(k), _cell(v)] for k, v in gate["allocation"].items()]
        parts.append("<h3>Allocation</h3>" + _table(["dataset", "examples"], rows))
    forecasts = gate.get("forecasts")
    if isinstance(forecasts, dict) and forecasts:  # sts-gate/1: one forecast per candidate
        variant = gate.get("score") if isinstance(gate.get("score"), str) else None
        domains = list(dict.fromkeys(d for f in forecasts.values() if isinstance(f, dict)
                                     for d in (f.get("domains") or {})))
        rows = []
        for name, f in forecasts.items():
            fd = (f.get("domains") or {}) if isinstance(f, dict) else {}
            v = variant or (f.get("ranking") if isinstance(f, dict) else None)
            rows.append([esc(name), *[_cell((fd.get(d) or {}).get("scores", {}).get(v)) for d in domains]])
        title = f"Forecast per candidate ({esc(LABELS.get(variant, variant or 'ranking'))})"
        parts.append(f"<h3>{title}</h3>" + _table(["candidate", *[esc(d) for d in domains]], rows))
    worst: list[Any] = []
    for key in ("worst_examples", "worst", "examples"):
        if isinstance(gate.get(key), list):
            worst = gate[key]
            break
    example_scores = gate.get("example_scores")
    if not worst and isinstance(example_scores, dict):
        worst = [{"candidate": name, **(w if isinstance(w, dict) else {"text": w})}
                 for name, scores in example_scores.items() if isinstance(scores, dict)
                 for w in scores.get("worst") or []]
    if worst:
        parts.append(f"<h3>Worst-scoring examples</h3>{_records_table(worst, ('candidate', 'text', 'score'))}")
    if isinstance(gate.get("notes"), list) and gate["notes"]:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{esc(note)}</li>" for note in gate["notes"]) + "</ul>")
    skip = {"candidates", "weights", "worst_examples", "worst", "examples", "allocation", "forecasts", "example_scores",
            "notes", *GATE_INTERNALS}
    for key in [k for k, v in gate.items() if not _scalar(v) and k not in skip]:
        value = gate[key]
        if isinstance(value, list) and all(_scalar(v) for v in value):
            if value:
                parts.append(f"<div><b>{esc(key)}</b>: {', '.join(esc(v) for v in value)}</div>")
            continue
        if isinstance(value, dict) and all(_scalar(v) or isinstance(v, dict) for v in value.values()):
            rows = [[esc(k), _cell(v)] for k, v in value.items() if v not in (None, {}, [])]
            if rows:
                parts.append(f"<h3>{esc(key)}</h3>" + _table(["", ""], rows))
            continue
        rows = value if isinstance(value, list) else [value]
        parts.append(f"<h3>{esc(key)}</h3>{_records_table(rows)}")
    return f'<section id="gate"><h2>Gate decision</h2>{"".join(parts)}</section>'


def render_html(data: ReportData) -> str:
    scatter = scatter_points(data)
    sections = [_summary(data, scatter), _prediction_section(data), _forecast_section(data),
                _timeline_section(data),
                _scatter_section(data, scatter), _latents_section(data), _gate_section(data.gate)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # No network: nothing may be loaded from elsewhere, and no script may run.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>STS report</title><style>{CSS}</style></head><body>{_header(data)}<main>{_no_figures_note()}"
            f"{''.join(sections)}<p class=\"muted\">Written by sts-callback from {esc(data.sts_dir.name)}/ "
            f"({esc(', '.join(data.files))}). STS: Zhang, Wang et al., ICLR 2026, arXiv 2603.02908.</p></main>"
            "</body></html>\n")


def _no_figures_note() -> str:
    """One line at the top of the page when figures were left out (called after the plots were tried)."""
    return f'<p class="muted" id="no-figures">{esc(NO_MATPLOTLIB)}</p>' if _matplotlib_missing else ""


# --------------------------------------------------------------------------- Markdown
def _overlap(record: dict[str, Any]) -> str | None:
    """"k of n" shifted latents as forecast at a re-check; None where its probe measured no shift."""
    overlap, shifted = record.get("overlap_with_forecast"), len(record.get("shifted_latents") or [])
    return f"{_fmt(overlap)} of {shifted}" if overlap is not None and shifted else None


def _which(data: ReportData, record: dict[str, Any]) -> str:
    """Which re-check a summary line describes: the last, or that of the checkpoint loaded at the end."""
    if data.loaded_best_step is not None and record["step"] == data.loaded_best_step:
        return f"of the weights the run ends with (step {record['step']}, loaded at the end)"
    return f"last at step {record['step']}"


def render_markdown(data: ReportData, top: int = 5) -> str:
    s = data.settings
    lines = ["### STS report", ""]
    if data.forecast is not None:
        lines.append(f"Model `{md_code(s.get('model', '?'))}`, SAE {md_esc(data.describe_sae())}, layer "
                     f"{md_esc(s.get('layer', '?'))}, {md_esc(data.forecast.get('shift_tokens'))} probe tokens, "
                     f"N = {len(data.forecast.get('shifted_latents', []))} shifted latents; shift: "
                     f"{md_esc(shift_label(data.forecast))}.")
        lines.append("")
    predicted = data.predicted()
    if predicted:
        level = predicted[0][1].get("level", 0.9)
        lines += ["**Predicted change of held-out loss at the end of training** (+ = worse)", "",
                  md_esc(data.calibration_note()), ""]
        if data.scope_caution():
            lines += [f"**{md_esc(data.scope_caution())}**", ""]
        lines += [f"| domain | predicted | {level:.0%} interval | label |", "|---|---:|---:|---|"]
        for name, p in predicted:
            mark = " ⚠️ protected" if name in data.protected else ""
            mean, low, high = signed_percents([p["mean"], p["low"], p["high"]])
            lines.append(f"| {md_esc(name)}{mark} | {mean} | [{low}, {high}] | {p['label']} |")
        for name, why in data.unpredicted():
            mark = " ⚠️ protected" if name in data.protected else ""
            lines.append(f"| {md_esc(name)}{mark} | – | – | {md_esc(why)} |")
        lines.append("")
    if data.ranking:
        label = LABELS.get(data.variant, data.variant)
        lines += [f"**Most affected domains (forecast, {label}; raw scores)**", "",
                  f"| rank | domain | {label} | protected |", "|---:|---|---:|:---:|"]
        beyond = [(rank, name, value) for rank, (name, value) in enumerate(data.ranking, 1)
                  if rank > top and name in data.protected]  # protected domains are always listed
        for rank, (name, value) in enumerate(data.ranking[:top], 1):
            mark = "⚠️ yes" if name in data.protected else ""
            lines.append(f"| {rank} | {md_esc(name)} | {value:.4g} | {mark} |")
        if len(data.ranking) > top + len(beyond):
            lines.append(f"| … | {len(data.ranking) - top - len(beyond)} more | | |")
        for rank, name, value in beyond:
            lines.append(f"| {rank} | {md_esc(name)} | {value:.4g} | ⚠️ yes |")
        lines.append("")
    elif data.forecast is None:
        lines += [md_esc(data.contents_note()), ""]
    if data.skipped_note():
        lines += [md_esc(data.skipped_note()), ""]
    if data.rechecks:
        last = data.end_record
        deltas = ", ".join(md_esc(change) for change in _changes(last, data.protected, data.tolerance))
        overlap = _overlap(last) if data.forecast is not None else None  # no forecast here to overlap with
        lines.append(f"**Re-checks:** {data.recheck_count()}, {_which(data, last)}: "
                     f"held-out loss change [95% interval] {deltas}"
                     + (f"; overlap with the forecast {overlap} latents" if overlap else "") + ".")
        if accuracy := _accuracy_changes(last):
            lines.append(f"**Accuracy** (share of the items right; change from train start): {md_esc(accuracy)}.")
        for note in (data.ended_note(), data.loaded_note(), data.unfinished_note(), data.earlier_changes_note(),
                     data.probe_error_note()):
            if note:
                lines.append(md_esc(note))
        if spent := _overhead(data.rechecks[-1], data.has_ended):  # every re-check's, also after a loaded checkpoint
            lines.append(spent)
        note = data.precision_note()
        if note:
            lines.append(note)
        if data.projects_the_end(last):
            weights = last.get("early_blend")
            how = (f"{weights['early']:.2f} x the measured trend + {weights['step0']:.2f} x the step-0 prediction"
                   if isinstance(weights, dict) and {"early", "step0"} <= set(weights)
                   else f"the measured changes extrapolated by the {last.get('early_method') or 'early'} rule")
            had = ", had it gone on" if any(r.get("early_stop") for r in data.rechecks) else ""
            lines.append(f"Projected at the end of training{had} ({how}, {last['lr_area_fraction']:.0%} of the "
                         "learning-rate schedule spent; 95% intervals): " + ", ".join(
                             f"{md_esc(k)} {md_esc(v)}" for k, v in _projections(last, data.tolerance)) + ".")
        lines.append("")
    scatter = scatter_points(data)
    if scatter is not None and scatter.pearson is not None:
        lines += [md_esc(_agreement_text(scatter)), ""]
        if note := _validation_ceiling_note(data):
            lines += [md_esc(note), ""]
    warnings = [_markdown_warning(kind, step, text) for kind, step, text in data.warning_items()]
    if warnings:
        lines += ["**Warnings**", "", *[f"- {w}" for w in warnings], ""]
    elif data.rechecks:
        lines += ["No warnings.", ""]
    if data.forecast and data.forecast.get("shifted_latents"):
        values = data.forecast.get("shift_values") or []
        total = sum(values) or 1.0
        shown = ", ".join(f"{lat} ({100 * v / total:.1f}%)"
                          for lat, v in zip(data.forecast["shifted_latents"][:5], values))
        lines += [f"Top shifted latents (share of the shift): {shown}.", ""]
    if isinstance(data.gate, dict):
        items = [f"{md_esc(k)}: {md_esc(v)}" for k, v in data.gate.items()
                 if _scalar(v) and v is not None and k != "format"]
        candidates = data.gate.get("candidates")
        if isinstance(candidates, dict):
            items += [f"{md_esc(n)} {'accepted' if c.get('accepted') else 'rejected'}"
                      + (f" ({md_esc(c['reason'])})" if c.get("reason") else "")
                      for n, c in candidates.items() if isinstance(c, dict)]
        lines += ["**Gate decision:** " + "; ".join(items), ""]
        weights, allocation = data.gate.get("weights"), data.gate.get("allocation")
        if isinstance(weights, dict) and weights:  # the mixture: what a reader of the decision acts on
            lines += ["| dataset | weight | examples |", "|---|---:|---:|"]
            lines += [f"| {md_esc(n)} | {_fmt(w)} | "
                      f"{md_esc((allocation or {}).get(n, '–')) if isinstance(allocation, dict) else '–'} |"
                      for n, w in weights.items()] + [""]
        if isinstance(data.gate.get("notes"), list) and data.gate["notes"]:
            lines += [f"- {md_esc(note)}" for note in data.gate["notes"]] + [""]
    has_latents = bool((data.forecast or {}).get("shifted_latents"))
    lines.append("Full report" + (" with plots and the shifted latents' contexts" if has_latents else "")
                 + f": `report.html`. Written from {md_esc(data.sts_dir.name)}/ ({md_esc(', '.join(data.files))}).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point
def _holds_results(path: Path) -> bool:
    return any((path / f).exists() for f in (FORECAST_FILE, HISTORY_FILE, GATE_FILE))


def _holds_run(path: Path) -> bool:
    return any((path / f).exists() for f in (FORECAST_FILE, HISTORY_FILE))


def resolve_sts_dir(path: str | Path) -> Path:
    """The ``sts/`` folder for a trainer ``output_dir`` or the folder itself; an ``output_dir`` without ``sts/``
    whose results are in one other subfolder (the callback's ``output_subdir``): that subfolder. A folder that holds
    only a gate decision (``sts gate``'s ``output``) beside such a subfolder with a run: the subfolder (the report
    shows the folder's gate decision with the run, :func:`write_report`)."""
    path = Path(path)
    if not path.exists():
        raise STSInputError(f"{path} does not exist; give the trainer's output_dir or its sts/ folder.")
    if not path.is_dir():
        raise STSInputError(f"{path} is not a folder; give the trainer's output_dir or its sts/ folder.")
    if _holds_run(path):
        return path
    gate_only = _holds_results(path)
    holds = _holds_run if gate_only else _holds_results
    if (path / "sts").is_dir() and (not gate_only or holds(path / "sts")):
        return path / "sts"
    found = sorted(p for p in path.iterdir() if p.is_dir() and holds(p))
    if len(found) == 1:
        return found[0]
    if found and not gate_only:  # several callbacks, each with its own output_subdir: which one is for the user to say
        raise STSInputError(f"{path} holds no {FORECAST_FILE}, {HISTORY_FILE} or {GATE_FILE}, but its subfolders "
                            f"{', '.join(p.name + '/' for p in found)} do (output_subdir of several callbacks); "
                            f"give one of them, e.g. `sts report {found[0]}`.")
    return path


def write_report(sts_dir: str | Path, protected: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``sts_dir``; returns their paths."""
    given, sts_dir = Path(sts_dir), resolve_sts_dir(sts_dir)
    data = ReportData(sts_dir, protected, gate_dir=given if sts_dir != given else None)
    html_path, md_path = sts_dir / HTML_FILE, sts_dir / MD_FILE
    try:
        pages = ((html_path, render_html(data)), (md_path, render_markdown(data)))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
        # a field of another type or missing: a file edited by hand, or of another tool, named not as a traceback
        raise STSInputError(f"{sts_dir}'s files do not read as STS wrote them ({type(err).__name__}: {err}): a file "
                            "edited by hand, cut short or of another tool? Regenerate the run's files, or move the "
                            "odd one out.") from err
    for path, text in pages:
        atomic_write_text(path, text)
    return html_path, md_path



def _overhead(record: dict[str, Any], ended: bool) -> str | None:
    """What the re-checks have cost, as a sentence (records before the overhead was kept: ``None``); ``ended``:
    the run has ended, so the cost is the run's, not "so far"."""
    spent = record.get("overhead") or {}
    if spent.get("share") is None:
        return None
    budget = f" (budget {percent(spent['budget'])})" if spent.get("budget") is not None else ""
    waited = f"; waiting their turn: {', '.join(spent['skipped'])}" if spent.get("skipped") else ""
    share = percent(spent["share"], apart_from=spent.get("budget"))
    return (f"Re-checks {'' if ended else 'so far '}took {share} of training time{budget}: "
            f"{_seconds(spent['recheck_seconds'])} s against {_seconds(spent['train_seconds'])} s{waited}.")

__all__ = ["write_report", "render_html", "render_markdown", "ReportData", "optional_pyplot"]
