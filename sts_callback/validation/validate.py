"""``validate()``: check a forecast on your own setup by fine-tuning for real (README, "Check the forecast").

For each seed: a copy of the model is fine-tuned on the training set (LoRA or full) with a real
``transformers.Trainer`` and an :class:`~sts_callback.integrations.callback.STSCallback` attached. The callback computes the
forecast at train start (with that seed's sampling), measures every target domain's held-out mean token NLL
before the first step, and re-checks at the end with the actual shift (actually-shifted latents, their overlap
with the forecast's, held-out NLL after training). An optional user metric is evaluated before and after too.
Across the target domains, each score variant is then correlated (Pearson, Spearman, p-values, paired
bootstrap 95% intervals) with the magnitude and with the sign of the measured change; several seeds give
mean and std of every correlation, as in the paper's protocol.

Writes ``<output_dir>/sts/validation.json`` (read by ``sts report``), ``validation.png`` (score vs measured
change, one panel per variant), the first seed's ``forecast.json`` and ``history.jsonl`` and ``report.html`` /
``report.md`` next to it; each seed's run keeps its own callback folder under ``<output_dir>/seed-<seed>/sts/``.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_write_json, check_format, read_json
from ..core.config import STSConfig, device_problem, json_serializable, plain_numbers, settings_from_dict
from ..core.data import Corpus, load_corpus, load_domains, text_tokenizer
from ..core.errors import STSConfigError, STSDataWarning, STSInputError, first_line
from ..core.formatting import json_safe, signed_percent
from ..pipelines.forecast import SCORE_LABELS, display_width, shown_name
from ..core.multiple_choice import argmax, check_items, choice_scores
from ..core.run_store import FORECAST_FILE, HISTORY_FILE, SETTINGS_FILE
from ..pipelines.monitor import peft_model_of
from ..pipelines.recheck import RecheckSteps, checked_recheck_steps
from ..pipelines.recipe import (PadCollator, check_target_modules, has_injected_adapters, records_dataset,
                                remove_injected_adapters, training_features, wrap_lora)
from ..pipelines.rollouts import check_reward_funcs, prompt_records
from ..pipelines.shifts import is_preference_data
from ..scoring.agreement import (BOOTSTRAP_MIN_POINTS, NOISE_CEILING_GOAL, ceiling_text, correlation,
                                 noise_ceiling_by_domain)
from ..scoring.signed import SIGNED_VARIANTS
from ..core.torch_utils import model_device, pad_token_id

FORMAT = "sts-validation/1"
VALIDATION_FILE = "validation.json"
PLOT_FILE = "validation.png"
# What a validation writes in its sts/ folder (the run's summary, beside the seeds' own folders)
SUMMARY_FILES = (VALIDATION_FILE, PLOT_FILE, FORECAST_FILE, HISTORY_FILE, SETTINGS_FILE, "report.html", "report.md")
METHODS = ("lora", "full")
VARIANTS = ("sts_icl", "sts_act", "sts_sq", "raw_act") + SIGNED_VARIANTS
LABELS = {v: SCORE_LABELS[v] for v in VARIANTS}
KINDS = ("abs", "signed")
STATISTICS = ("pearson", "spearman")
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5}
MIN_DOMAINS = 3

Metric = Callable[[nn.Module, Any, str], float]


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else None
    std = None
    if len(finite) >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))  # type: ignore[operator]
    return {"mean": mean, "std": std, "n": len(finite), "values": list(values)}


# --------------------------------------------------------------------------- a ready-made metric
def multiple_choice_accuracy(items: Sequence[dict[str, Any]] | dict[str, Sequence[dict[str, Any]]], *,
                             prompt_format: str = "{question}\nAnswer:", choice_format: str = " {choice}",
                             normalize: bool = True) -> Metric:
    """A metric ``metric(model, tokenizer, domain) -> accuracy`` for :func:`validate`.

    ``items``: dicts ``{"question": str, "choices": [str, ...], "answer": index of the right choice}``, either one
    list used for every domain or a dict ``domain -> list``. Each choice is scored by the log-likelihood of its
    continuation ``choice_format`` after ``prompt_format`` (mean per token when ``normalize``, else the sum);
    an item counts as right when the right choice scores highest (ties: the first highest). A path to a JSONL
    file is accepted in place of a list.
    """
    per_domain = isinstance(items, dict)
    table = {str(k): check_items(v, str(k)) for k, v in items.items()} if per_domain else None
    shared = None if per_domain else check_items(items, "items")

    def metric(model: nn.Module, tokenizer, domain: str) -> float:
        if table is not None and domain not in table:
            raise STSInputError(f"multiple_choice_accuracy has no items for domain {domain!r} (it has "
                                f"{sorted(table)}); give items for every target domain.")
        chosen = table[domain] if table is not None else shared
        right = sum(int(argmax(choice_scores(model, tokenizer, item, prompt_format=prompt_format,
                                              choice_format=choice_format, normalize=normalize)) == item["answer"])
                    for item in chosen)
        return right / len(chosen)

    metric.__name__ = "multiple_choice_accuracy"
    if table is not None:  # validate() checks them against its target domains before any work
        metric.domains = sorted(table)  # type: ignore[attr-defined]
    return metric


# --------------------------------------------------------------------------- results
@dataclass
class SeedResult:
    """One seed: its forecast, the measured changes, the actually-shifted latents and the correlations."""

    seed: int
    scores: dict[str, dict[str, float]]
    nll_before: dict[str, float]
    nll_after: dict[str, float]
    nll_delta_rel: dict[str, float]
    nll_delta_abs: dict[str, float]
    overlap: int | None
    n_shifted: int
    forecast_latents: list[int]
    actual_latents: list[int]
    actual_scores: dict[str, dict[str, float]]
    correlations: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]
    metric_before: dict[str, float] | None = None
    metric_after: dict[str, float] | None = None
    metric_delta: dict[str, float] | None = None
    train_loss: float | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    run_dir: str = ""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    forecast_timings: dict[str, float] = field(default_factory=dict)
    nll_delta_se: dict[str, float | None] = field(default_factory=dict)  # each measured change's standard error

    @property
    def noise_ceiling(self) -> float | None:
        """The Pearson r with the signed NLL changes that a perfect forecast could expect, given how precisely
        they were measured (:func:`~sts_callback.scoring.agreement.noise_ceiling`)."""
        return noise_ceiling_by_domain(self.nll_delta_rel, self.nll_delta_se)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "scores": self.scores, "nll_before": self.nll_before, "nll_after": self.nll_after,
            "nll_delta_rel": self.nll_delta_rel, "nll_delta_abs": self.nll_delta_abs,
            "nll_delta_se": self.nll_delta_se, "noise_ceiling": self.noise_ceiling,
            "metric_before": self.metric_before, "metric_after": self.metric_after, "metric_delta": self.metric_delta,
            "overlap": {"count": self.overlap, "n_shifted": self.n_shifted,
                        "fraction": None if self.overlap is None else self.overlap / max(self.n_shifted, 1)},
            "forecast_latents": self.forecast_latents, "actual_latents": self.actual_latents,
            "actual_scores": self.actual_scores, "correlations": self.correlations,
            "train_loss": self.train_loss, "trajectory": self.trajectory, "seconds": self.seconds, "run_dir": self.run_dir,
            "log_history": self.log_history, "forecast_timings": self.forecast_timings,
        }

    def diverged(self) -> list[str]:
        """The domains whose held-out NLL after training is not a finite number (the model diverged on them)."""
        return [d for d, value in self.nll_after.items() if not math.isfinite(value)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SeedResult":
        """The inverse of :meth:`to_dict` (its derived ``noise_ceiling`` and overlap fraction dropped)."""
        values = {k: _null_as_nan(v) if k in PER_DOMAIN_NUMBERS and isinstance(v, dict) else v
                  for k, v in data.items() if k in {f.name for f in fields(cls)} and k != "overlap"}
        overlap = data.get("overlap") or {}
        return cls(**values, overlap=overlap.get("count"), n_shifted=overlap.get("n_shifted") or 0)


# SeedResult's per-domain numbers: NaN is written as null (strict JSON), read back as NaN
PER_DOMAIN_NUMBERS = ("scores", "nll_before", "nll_after", "nll_delta_rel", "nll_delta_abs", "metric_before",
                      "metric_after", "metric_delta")


def _null_as_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _null_as_nan(v) for k, v in value.items()}
    return value


@dataclass
class ValidationResult:
    """What :func:`validate` measured; ``table()`` for the console, ``to_dict()`` for ``validation.json``."""

    domains: list[str]
    variants: list[str]
    seeds: list[int]
    method: str
    training: dict[str, Any]
    config: dict[str, Any]
    per_seed: list[SeedResult]
    n_resamples: int = 2000
    output_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # variant -> the domains without its score

    # ---------------------------------------------------------------- aggregates
    @property
    def measures(self) -> list[str]:
        return ["nll"] + (["metric"] if self.per_seed and self.per_seed[0].metric_delta is not None else [])

    def _mean_over_seeds(self, get) -> dict[str, float]:
        return {d: sum(get(s)[d] for s in self.per_seed) / len(self.per_seed) for d in self.domains}

    @property
    def measured(self) -> dict[str, float]:
        """|relative held-out NLL change| per domain, mean over seeds (what ``sts report`` plots)."""
        return {d: sum(abs(s.nll_delta_rel[d]) for s in self.per_seed) / len(self.per_seed) for d in self.domains}

    def summary(self) -> dict[str, Any]:
        """Mean and std over seeds of every correlation: ``[measure][variant][kind][statistic]``."""
        out: dict[str, Any] = {}
        for measure in self.measures:
            out[measure] = {v: {k: {s: _mean_std([seed.correlations[measure][v][k][s]["r"] for seed in self.per_seed])
                                    for s in STATISTICS} for k in KINDS} for v in self.variants}
        return out

    def correlation(self, variant: str = "sts_icl", kind: str = "abs", statistic: str = "pearson",
                    measure: str = "nll") -> float | None:
        """Mean over seeds of one correlation (``None`` where undefined)."""
        for name, value, allowed in (("variant", variant, self.variants), ("kind", kind, KINDS),
                                     ("statistic", statistic, STATISTICS), ("measure", measure, self.measures)):
            if value not in allowed:
                why = " (measure='metric' needs validate(metric=...))" if name == "measure" else ""
                raise STSConfigError(f"{name}={value!r}: this validation has {list(allowed)}{why}.")
        return self.summary()[measure][variant][kind][statistic]["mean"]

    def overlap_summary(self) -> dict[str, Any]:
        counts = [s.overlap for s in self.per_seed]
        summary = _mean_std([float(c) if c is not None else None for c in counts])
        summary["values"] = counts
        summary["n_shifted"] = self.per_seed[0].n_shifted if self.per_seed else None
        return summary

    def to_dict(self) -> dict[str, Any]:
        seeds = self.per_seed
        mean: dict[str, Any] = {
            "scores": {d: {v: sum(s.scores[d][v] for s in seeds) / len(seeds) for v in self.variants}
                       for d in self.domains},
            "nll_before": self._mean_over_seeds(lambda s: s.nll_before),
            "nll_after": self._mean_over_seeds(lambda s: s.nll_after),
            "nll_delta_rel": self._mean_over_seeds(lambda s: s.nll_delta_rel),
            "nll_delta_abs": self._mean_over_seeds(lambda s: s.nll_delta_abs),
        }
        if "metric" in self.measures:
            mean["metric_before"] = self._mean_over_seeds(lambda s: s.metric_before)
            mean["metric_after"] = self._mean_over_seeds(lambda s: s.metric_after)
            mean["metric_delta"] = self._mean_over_seeds(lambda s: s.metric_delta)
        out = {
            "format": FORMAT,
            "measured": self.measured,
            "measured_label": "|relative change of held-out mean token NLL|, mean over seeds",
            "domains": self.domains,
            "variants": self.variants,
            "measures": self.measures,
            "seeds": self.seeds,
            "method": self.method,
            "training": self.training,
            "config": self.config,
            "correlations": self.summary(),
            "noise_ceiling": self.noise_ceiling,
            "overlap": self.overlap_summary(),
            "mean": mean,
            "per_seed": [s.to_dict() for s in seeds],
            "bootstrap": {"n_resamples": self.n_resamples, "confidence_level": 0.95, "method": "percentile",
                          "paired": True},
            "files": self.files,
            "timings": self.timings,
            "left_out": self.left_out,
        }
        if "metric" in self.measures:
            out["measured_metric"] = {d: sum(abs(s.metric_delta[d]) for s in seeds) / len(seeds)
                                      for d in self.domains}
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, json_safe(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValidationResult":
        """The result :meth:`to_dict` (``validation.json``) holds, for its ``table()`` and ``correlation()``."""
        check_format(data, FORMAT, "an STS validation", "validation.json")
        return cls(domains=data["domains"], variants=data["variants"], seeds=data["seeds"], method=data["method"],
                   training=data["training"], config=data["config"],
                   per_seed=[SeedResult.from_dict(s) for s in data["per_seed"]],
                   n_resamples=(data.get("bootstrap") or {}).get("n_resamples", 2000),
                   files=data.get("files") or {}, timings=data.get("timings") or {},
                   left_out=data.get("left_out") or {})

    @classmethod
    def load(cls, path: str | Path) -> "ValidationResult":
        """A saved ``validation.json`` (or the folder holding it) back as a result."""
        path = Path(path)
        return cls.from_dict(read_json(path / "validation.json" if path.is_dir() else path, "the validation"))

    # ---------------------------------------------------------------- text
    def table(self) -> str:
        seeds = self.per_seed
        several = len(seeds) > 1
        mean = self.to_dict()["mean"]
        training = self.training
        what = (f"LoRA (r={training.get('lora_rank')})" if self.method == "lora" else "full") + " " + TRAINED_AS.get(
            training.get("trainer"), "fine-tune")
        lines = [f"STS validation: {what}, {training.get('steps')} steps, lr {training.get('learning_rate'):g}, "
                 f"batch {training.get('batch_size')}; seeds {self.seeds}; {len(self.domains)} target domains"]
        extra = training.get("training_args") or {}
        if extra:  # they change the recipe: say so next to it
            lines.append("TrainingArguments also set: " + ", ".join(f"{k}={v!r}" for k, v in extra.items()))
        lines.append("measured: relative change of held-out mean token NLL (+ = worse)"
                     + (" and the user metric (after - before)" if "metric" in self.measures else "")
                     + (f"; values are means over {len(seeds)} seeds" if several else ""))
        columns = ["domain"] + [LABELS[v] for v in self.variants] + ["NLL before", "NLL after", "ΔNLL rel"]
        if "metric" in self.measures:
            columns += ["metric bef", "metric aft", "Δmetric"]
        rows = []
        for d in sorted(self.domains, key=lambda d: -self.measured[d]):
            cells = [shown_name(d)] + [f"{mean['scores'][d][v]:.4g}" for v in self.variants]
            cells += [f"{mean['nll_before'][d]:.4f}", f"{mean['nll_after'][d]:.4f}",
                      signed_percent(mean['nll_delta_rel'][d], 2)]
            if "metric" in self.measures:
                cells += [f"{mean['metric_before'][d]:.4g}", f"{mean['metric_after'][d]:.4g}",
                          f"{mean['metric_delta'][d]:+.4g}"]
            rows.append(cells)
        lines += ["", *_aligned(columns, rows, min_width=10)]
        summary = self.summary()
        for measure in self.measures:
            name = "relative NLL change" if measure == "nll" else "user metric change"
            rows, methods = [], set()
            for v in self.variants:
                cells = [LABELS[v]]
                for kind in KINDS:
                    for stat in STATISTICS:
                        if several:
                            agg = summary[measure][v][kind][stat]
                            cell = "n/a" if agg["mean"] is None else (
                                f"{agg['mean']:+.2f}" + ("" if agg["std"] is None else f" ± {agg['std']:.2f}"))
                        else:
                            entry = seeds[0].correlations[measure][v][kind][stat]
                            cell = _format_entry(entry)
                            methods.add(entry.get("p_method"))
                        cells.append(cell)
                rows.append(cells)
            how = "(mean ± std over seeds)"
            if not several:
                methods.discard(None)
                bootstrap = len(self.domains) >= BOOTSTRAP_MIN_POINTS
                how = ("(r [95% bootstrap CI] p" if bootstrap else "(r p") + (
                    f"; p: {methods.pop()} test" if len(methods) == 1 else "") + (
                    "" if bootstrap or not self.n_resamples
                    else f"; no interval: a bootstrap needs {BOOTSTRAP_MIN_POINTS} domains or more") + ")"
            lines += ["", f"correlation across {len(self.domains)} domains with the {name} {how}"]
            lines += _aligned(["variant", "|Δ| Pearson", "|Δ| Spearman", "Δ Pearson", "Δ Spearman"], rows)
            if all(cell == "n/a" for row in rows for cell in row[1:]):
                lines.append(self._why_no_correlation(measure))
        lines += [f"note: {line}" for line in _left_out_lines(self.left_out)]
        lines += self._verdict_lines(summary)
        lines += self._noise_lines()
        overlap = self.overlap_summary()
        if overlap["mean"] is not None:
            spread = "" if overlap["std"] is None else f" ± {overlap['std']:.1f}"
            lines += ["", f"overlap of forecast and actually-shifted latents: {overlap['mean']:.1f}{spread} of "
                          f"{overlap['n_shifted']}"]
        return "\n".join(lines)

    def _why_no_correlation(self, measure: str) -> str:
        """Why a measure's correlations are all n/a: its change, or every variant's score, is the same on every
        domain in every seed (a correlation needs a spread on both sides)."""
        def constant(values: list[float]) -> bool:
            return len(values) < 3 or max(values) == min(values)

        names = list(self.domains)
        if len(names) < 3:
            return f"n/a: a correlation needs 3 domains or more, there are {len(names)}"
        diverged = sorted({d for s in self.per_seed for d in s.diverged()})
        if diverged:
            return (f"n/a: the held-out NLL after training is not finite on {diverged}: the model diverged (lower the "
                    f"learning rate, {self.training.get('learning_rate'):g})")
        deltas = [s.nll_delta_rel if measure == "nll" else s.metric_delta for s in self.per_seed]
        if all(d is None or constant([d[n] for n in names]) for d in deltas):
            what = "held-out NLL" if measure == "nll" else "user metric"
            return (f"n/a: the {what} changed alike on every domain (no spread to correlate with)"
                    + ("; a metric of few items moves in steps: give it more items" if measure == "metric" else ""))
        if all(constant([s.scores[n][v] for n in names]) for s in self.per_seed for v in self.variants):
            return "n/a: every variant's score is the same on every domain (no spread to correlate with)"
        return "n/a: no correlation could be computed (a score or a change that is not a finite number)"

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:  # one line: the dataclass's own repr dumps every seed's scores (kilobytes)
        return (f"<ValidationResult: {len(self.domains)} target domains, {len(self.seeds)} seed(s) of {self.method} "
                f"training, variants {self.variants}; print() it for the table>")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter: the table
        printer.text(repr(self) if cycle else self.table())

    @property
    def noise_ceiling(self) -> float | None:
        """The seeds' mean :attr:`SeedResult.noise_ceiling` (``None`` if a seed's is unknown)."""
        ceilings = [s.noise_ceiling for s in self.per_seed]
        return None if not ceilings or None in ceilings else sum(ceilings) / len(ceilings)

    def _verdict_lines(self, summary: dict[str, Any]) -> list[str]:
        """Whether the forecast's ranking score held here: its |change| Pearson r against the method's goal."""
        ranking = self.config.get("ranking")
        if ranking not in self.variants:
            return []
        lines = []
        diverged = {s.seed: s.diverged() for s in self.per_seed if s.diverged()}
        if diverged:  # said whenever a seed diverged, not only when every correlation is n/a
            lines += ["", "diverged: " + "; ".join(f"seed {seed}'s held-out NLL after training is not finite on "
                                                   f"{names}" for seed, names in diverged.items())
                      + f" (lower the learning rate, {self.training.get('learning_rate'):g}); its correlations are n/a"]
        aggregate = summary["nll"][ranking]["abs"]["pearson"]
        r, counted = aggregate["mean"], aggregate.get("n") or 0
        if r is None:  # no correlation at all: the table's n/a line says why (a divergence among them)
            return []
        held = "meets it" if r >= NOISE_CEILING_GOAL else "short of it"
        seeds = (f", mean over {counted} seeds" if counted > 1 else "") + (
            f" (of {len(self.per_seed)}; the others have no correlation)" if counted < len(self.per_seed) else "")
        return lines + ["", f"verdict: {LABELS.get(ranking, ranking)}, the forecast's ranking score, orders these "
                            f"{len(self.domains)} domains by the size of their change at Pearson r {r:+.2f}{seeds} "
                            f"(the method's goal {NOISE_CEILING_GOAL:.2f}): {held} on this setup"]

    def _noise_lines(self) -> list[str]:
        ceiling = self.noise_ceiling
        errors = [e for s in self.per_seed for e in s.nll_delta_se.values() if e is not None]
        if ceiling is None or not errors:
            return []
        line = (f"measurement noise: each domain's measured change has a standard error of {sum(errors) / len(errors):.2%} "
                f"on average; against changes measured this precisely even a perfect forecast could expect a "
                f"Pearson r of about {ceiling_text(ceiling)} with the signed change")
        if ceiling < NOISE_CEILING_GOAL:  # as the report says it
            line += f" (raise loss_tokens, now {self.training.get('loss_tokens')}, to measure more precisely)"
        return ["", line]


def _aligned(header: list[str], rows: list[list[str]], min_width: int = 0) -> list[str]:
    """Header, rule and rows, each column as wide as its widest cell (first column left-aligned, the rest right)."""
    widths = [max([min_width if i else 0] + [display_width(row[i]) for row in [header, *rows]])
              for i in range(len(header))]

    def line(cells: list[str]) -> str:  # by terminal columns: a CJK name takes two a character
        gaps = [" " * max(w - display_width(c), 0) for c, w in zip(cells, widths)]
        return "  ".join(c + gap if i == 0 else gap + c for i, (c, gap) in enumerate(zip(cells, gaps)))

    head = line(header)
    return [head, "-" * display_width(head), *(line(row) for row in rows)]


def _format_entry(entry: dict[str, Any]) -> str:
    if entry["r"] is None:
        return "n/a"
    ci = "" if entry["ci"] is None else f" [{entry['ci'][0]:+.2f},{entry['ci'][1]:+.2f}]"
    p = "" if entry["p"] is None else (" p<0.001" if entry["p"] < 0.001 else f" p={entry['p']:.3f}")
    return f"{entry['r']:+.2f}{ci}{p}"


# --------------------------------------------------------------------------- checks
def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise STSConfigError(f"validate({name}=...) must be an integer >= {low}, got {value!r}; set {name}={low} "
                             "or more.")


# TrainingArguments fields that validate() sets from its own settings (None: that its data pipeline needs as set):
# in training_args they would silently replace the values validation.json records.
OWN_TRAINING_ARGS: dict[str, str | None] = {
    "max_steps": "steps", "num_train_epochs": "steps", "learning_rate": "learning_rate",
    "per_device_train_batch_size": "batch_size", "per_gpu_train_batch_size": "batch_size",
    "auto_find_batch_size": "batch_size", "seed": "seeds", "data_seed": "seeds", "output_dir": "output_dir",
    "use_cpu": "device", "no_cuda": "device", "disable_tqdm": "progress",
    "remove_unused_columns": None, "label_names": None, "max_length": "max_length",  # DPOConfig's, for pairs
}
# Settings that need an eval_dataset, which validate's Trainer has none of (it measures its target domains itself).
EVALUATION_ARGS = ("eval_strategy", "evaluation_strategy", "do_eval", "load_best_model_at_end", "eval_steps",
                   "metric_for_best_model")
# Where `sts validate` takes the settings its validation: section does not hold (the others are its keys).
CONFIG_FILE_PLACES = {"output_dir": "the top-level output_dir: or -o", "device": "the top-level device:",
                      "progress": "--no-progress"}
VALIDATE_FLAGS = {"steps": "--steps", "learning_rate": "--lr", "seeds": "--seeds", "method": "--method"}


def config_file_place(setting: str) -> str:
    """Where `sts validate` takes one of validate()'s settings: a config key, and its flag where it has one."""
    if setting in CONFIG_FILE_PLACES:
        return CONFIG_FILE_PLACES[setting]
    return f"validation: {setting}:" + (f" or {VALIDATE_FLAGS[setting]}" if setting in VALIDATE_FLAGS else "")


def _check_training_args(training_args: dict[str, Any]) -> None:
    """Refuse training_args that would override validate()'s own settings or that TrainingArguments lacks."""
    for key in training_args:
        if not isinstance(key, str):
            raise STSConfigError(f"validate(training_args=...) has the key {key!r}; its keys are TrainingArguments "
                                 "field names (strings), e.g. {'bf16': True}.")
    evaluations = [k for k in training_args if k in EVALUATION_ARGS and training_args[k] not in (None, False, "no")]
    if evaluations:
        raise STSConfigError(f"validate(training_args=...) sets {evaluations}, which need an eval_dataset; validate's "
                             "Trainer has none (it measures the target domains' held-out loss itself, at recheck_steps "
                             "and the end). Remove them from training_args.")
    needed = [k for k in training_args if k in OWN_TRAINING_ARGS and OWN_TRAINING_ARGS[k] is None]
    if needed:
        raise STSConfigError(f"validate(training_args=...) sets {needed}, which validate sets itself (its data "
                             "collator needs them as set); remove them from training_args.")
    own = {k: OWN_TRAINING_ARGS[k] for k in training_args if OWN_TRAINING_ARGS.get(k)}
    if own:
        pairs = ", ".join(f"{k} -> {setting}" for k, setting in own.items())
        settings = ", ".join(f"{setting}=..." for setting in dict.fromkeys(own.values()))
        epochs = ("; num_train_epochs would be ignored: validate trains `steps` optimizer steps"
                  if "num_train_epochs" in own else "")
        places = "; ".join(f"{setting} as {config_file_place(setting)}" for setting in dict.fromkeys(own.values()))
        raise STSConfigError(f"validate(training_args=...) sets {list(own)}, which validate sets from its own "
                             f"settings ({pairs}{epochs}): they would override the values validation.json records. "
                             f"Remove them from training_args and pass validate({settings}) instead (with sts "
                             f"validate, set {places}).")
    if training_args:  # TRL's configs' own fields are for DPO / GRPO data: which, validate checks on the data
        known = training_argument_fields() | trl_argument_fields()
        unknown = [k for k in training_args if k not in known]
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, training_argument_fields(), n=1) for k in unknown}
            hint = "; ".join(f"{k}: did you mean {m[0]}?" for k, m in hints.items() if m)
            raise STSConfigError(f"validate(training_args=...) has {unknown}, not field(s) of "
                                 "transformers.TrainingArguments; fix the name(s) or remove them"
                                 + (f" ({hint})" if hint else "") + ".")
        _check_training_arg_values({k: v for k, v in training_args.items() if k in training_argument_fields()})


def _check_training_arg_values(values: dict[str, Any]) -> None:
    """TrainingArguments built from ``values`` alone, now: a bad value (``lr_scheduler_type: bogus``) fails here,
    named, not after the forecast."""
    import tempfile

    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as folder:
        try:
            TrainingArguments(**{"output_dir": folder, "use_cpu": True, "report_to": [], **values})
        except (TypeError, ValueError) as err:
            raise STSConfigError(f"validate(training_args={values!r}) is refused by transformers.TrainingArguments: "
                                 f"{first_line(str(err))}") from err


@functools.cache
def training_argument_fields() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in fields(TrainingArguments))


# The trainer validate trains each kind of data with, and its TRL config.
TRAINERS = {"sft": ("Trainer", None), "dpo": ("DPOTrainer", "DPOConfig"), "grpo": ("GRPOTrainer", "GRPOConfig")}
# The table's heading names the training by its trainer ("LoRA (r=8) DPO"); SFT is the fine-tune.
TRAINED_AS = {"DPOTrainer": "DPO", "GRPOTrainer": "GRPO"}


@functools.cache
def trl_argument_fields(kind: str | None = None) -> frozenset[str]:
    """The fields TRL's config for ``kind`` ("dpo", "grpo"; ``None``: both) adds to TrainingArguments (empty
    without TRL)."""
    try:
        import trl
    except ImportError:
        return frozenset()
    names = [TRAINERS[kind][1]] if kind else [config for _, config in TRAINERS.values() if config]
    return frozenset(f.name for name in names if name for f in fields(getattr(trl, name))) - training_argument_fields()


@dataclass
class ValidationConfig:
    """How :func:`validate` fine-tunes and measures (every field is also a keyword of :func:`validate` and a
    key of the ``validation:`` section of an ``sts validate`` config file). Checked when built.

    ``seeds=None``: the forecast config's seed. See :func:`validate` for each field's meaning.
    """

    method: str = "lora"
    seeds: Sequence[int] | int | None = None
    steps: int = 32
    learning_rate: float | None = None
    batch_size: int = 8
    max_length: int = 256
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_target_modules: Any = None
    completion_only_loss: bool = True
    loss_tokens: int = 4096
    recheck_tokens: int = 2048
    recheck_steps: RecheckSteps = None
    output_dir: str | Path = "sts-validation"
    device: Any = None
    copy_model: bool = True
    training_args: dict[str, Any] | None = None
    n_resamples: int = 2000
    progress: bool = False
    plot: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.method not in METHODS:
            raise STSConfigError(f"validate(method={self.method!r}) is not a training method; use 'lora' (adapters, "
                                 "cheap) or 'full' (every weight).")
        if self.seeds is not None:
            seeds = [self.seeds] if isinstance(self.seeds, int) and not isinstance(self.seeds, bool) else self.seeds
            if not isinstance(seeds, (list, tuple, range)):
                raise STSConfigError(f"validate(seeds={self.seeds!r}) must be an integer or a list of them, e.g. "
                                     "seeds=(0, 1, 2) (in YAML: seeds: [0, 1, 2]).")
            if len(seeds) == 0:
                raise STSConfigError(f"validate(seeds={self.seeds!r}) needs at least one seed, e.g. seeds=(0,) or "
                                     "seeds=(0, 1, 2).")
            for seed in seeds:
                if isinstance(seed, bool) or not isinstance(seed, int):
                    raise STSConfigError(f"validate(seeds=...) must hold integers, got {seed!r}.")
                if not 0 <= seed < 2 ** 32:  # numpy's range: a seed outside it failed after the earlier seeds ran
                    raise STSConfigError(f"validate(seeds=...) holds {seed}; a seed must be in 0..2**32 - 1.")
            if len(set(seeds)) != len(seeds):
                raise STSConfigError(f"validate(seeds={list(seeds)}) repeats a seed; give distinct seeds.")
            self.seeds = list(seeds)
        for name, low in (("steps", 1), ("batch_size", 1), ("max_length", 2), ("lora_rank", 1), ("loss_tokens", 1),
                          ("recheck_tokens", 1), ("n_resamples", 0)):
            _check_int(name, getattr(self, name), low)
        if self.lora_alpha is not None:
            _check_int("lora_alpha", self.lora_alpha, 1)
        self.recheck_steps = checked_recheck_steps(self.recheck_steps)  # as the callback takes it
        lr = self.learning_rate
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0
                               or not math.isfinite(lr)):
            raise STSConfigError(f"validate(learning_rate={lr!r}) must be a positive number, e.g. 2e-4 for LoRA or "
                                 "1e-5 for a full fine-tune (None: that default).")
        if not self.copy_model and self.method == "full" and self.seeds is not None and len(self.seeds) > 1:
            raise STSConfigError("validate(copy_model=False, method='full') trains your model in place, so it "
                                 "cannot start several seeds from the same weights; use one seed, copy_model=True, "
                                 "or LoRA.")
        for name in ("completion_only_loss", "copy_model", "progress", "plot", "report"):
            value = getattr(self, name)  # "false" from a config would read as True
            if not isinstance(value, bool):
                raise STSConfigError(f"validate({name}={value!r}) must be true or false.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise STSConfigError(f"validate(output_dir={str(self.output_dir)!r}) is a file; name a folder (new or "
                                 "an earlier validation's).")
        modules = self.lora_target_modules
        if modules is not None and not isinstance(modules, str) and not (
                isinstance(modules, (list, tuple)) and modules and all(isinstance(m, str) and m for m in modules)):
            raise STSConfigError(f"validate(lora_target_modules={modules!r}) must be a module name, a list of them "
                                 "(e.g. ['q_proj', 'v_proj']), 'all-linear', or None (peft's choice).")
        if self.training_args is not None and not isinstance(self.training_args, dict):
            raise STSConfigError(f"validate(training_args=...) must be a dict of TrainingArguments fields, got "
                                 f"{type(self.training_args).__name__}.")
        _check_training_args(self.training_args or {})
        problem = device_problem(self.device) if self.device is not None else None
        if problem:
            raise STSConfigError(f"validate(device={self.device!r}): {problem}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ValidationConfig":
        return settings_from_dict(cls, values, "validation setting(s)")


def training_kind(train: Any, reward_funcs: Any) -> str:
    """How validate trains ``train``: "grpo" with reward functions, "dpo" on preference pairs, else "sft"."""
    return "grpo" if reward_funcs is not None else "dpo" if is_preference_data(train) else "sft"


def check_trainer_fields(kind: str, training_args: dict[str, Any], batch_size: int | None = None) -> None:
    """``training_args`` holds no field of a TRL config other than the one ``kind`` trains with; under GRPO, a
    batch its groups of ``num_generations`` completions fill (TRL's own error came after the model loaded, naming
    ``generation_batch_size``, which validate sets from ``batch_size``)."""
    own = training_argument_fields() | (trl_argument_fields(kind) if kind != "sft" else frozenset())
    foreign = sorted(set(training_args) - own)
    if foreign:
        raise STSConfigError(f"validate(training_args=...) sets {foreign}, fields of another TRL trainer's config: "
                             f"this training is validated with {TRAINERS[kind][0]} (GRPOConfig's fields with "
                             "reward_funcs=, DPOConfig's for prompt / chosen / rejected pairs). Remove them.")
    if kind == "grpo" and batch_size is not None:
        try:
            from trl import GRPOConfig
        except ImportError as err:
            raise STSInputError(f"validate trains this data with TRL's {TRAINERS[kind][0]}: pip install trl.") from err

        generations = training_args.get("num_generations", GRPOConfig.__dataclass_fields__["num_generations"].default)
        steps = training_args.get("steps_per_generation") or training_args.get("gradient_accumulation_steps", 1)
        generated = training_args.get("generation_batch_size") or batch_size * steps
        if generations and generated % generations:
            raise STSConfigError(f"GRPO samples {generations} completions a prompt (num_generations) in batches of "
                                 f"{generated} (batch_size {batch_size} x {steps} step(s) a generation), which "
                                 f"{generations} does not divide: set batch_size to a multiple of {generations}, or "
                                 "training_args num_generations to a divisor of it.")


def _check_grpo_reference(model: nn.Module, method: str, training_args: dict[str, Any]) -> None:
    """GRPO with ``beta > 0`` on every weight reloads its reference model from ``config._name_or_path`` (TRL takes
    no reference model): a model that names no checkpoint would fail there, after the forecast."""
    beta = training_args.get("beta", 0.0)
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    if method == "full" and beta and not name:
        raise STSConfigError(f"GRPO with beta={beta} on every weight reloads its reference model from the model's "
                             "checkpoint, and this model names none (built in memory). Save it and load it with "
                             "from_pretrained, validate with method='lora' (the adapters off are the reference), or "
                             "with beta=0.")


def _trainable_answers(corpus: Corpus) -> bool:
    return any(corpus[i].can_demonstrate for i in range(min(len(corpus), 64)))


# --------------------------------------------------------------------------- the pipeline
def validate(model: nn.Module, tokenizer, sae: Any, train_data: Any, targets: Any,
             config: STSConfig | dict | None = None, validation: ValidationConfig | dict | None = None, *,
             metric: Metric | None = None, demonstrations: Any = None, reward_funcs: Any = None,
             **settings: Any) -> ValidationResult:
    """Forecast, then fine-tune for real and check the forecast against the measured changes.

    For each seed, a copy of ``model`` is fine-tuned on ``train_data`` for ``steps`` optimizer steps with a
    ``transformers.Trainer`` and an ``STSCallback`` (forecast with ``STSConfig.seed = seed``, held-out NLL of
    every target domain before and after, actual shift at the end); the Trainer's seed is ``seed`` too.
    Preference pairs (``prompt`` / ``chosen`` / ``rejected``) are trained with TRL's ``DPOTrainer`` (``DPOConfig``
    defaults, ``max_length``; its own fields, e.g. ``beta``, in ``training_args``), so the forecast checked is the
    chosen-minus-rejected one the callback makes under DPO. With ``reward_funcs`` (GRPO's reward functions) the
    training set's prompts are trained with TRL's ``GRPOTrainer`` (``GRPOConfig``'s defaults; ``num_generations``,
    ``max_completion_length``, ``temperature``, ``beta``, ... in ``training_args``), and the forecast checked is
    the callback's rollout forecast under GRPO.

    Args:
        model, tokenizer, sae, train_data, targets, config, demonstrations: as for :func:`forecast`
            (``targets``: at least 3 domains, since correlations need them).
        method: ``"lora"`` (peft adapters; ``lora_rank``, ``lora_alpha`` (default 2 x rank),
            ``lora_target_modules`` (default: peft's choice for the architecture, else all linear layers))
            or ``"full"``.
        seeds: one seed or several (paper: 3); per-seed results plus mean and std of each correlation.
            Each seed sets ``STSConfig.seed`` (forecast sampling, held-out texts) and the Trainer's seed (LoRA
            init, data order). Default: ``config.seed`` (0 unless set), i.e. one run.
        steps, learning_rate, batch_size, max_length: the training budget (``learning_rate`` default 2e-4
            for LoRA, 1e-5 for full). AdamW (0.9, 0.95), weight decay 0.01, clip 1.0, cosine with 10% warm-up.
        completion_only_loss: prompt/answer examples are trained on the answer tokens only.
        loss_tokens: held-out tokens per domain for the NLL measurement; ``recheck_tokens``: probe tokens
            for the actual shift.
        recheck_steps: also re-check during training, as the callback's ``recheck_steps`` (every this many steps,
            a fraction of the run, or a list of steps; default: only at the end); each seed's ``trajectory`` then
            holds the held-out NLL change and overlap at every re-check.
        metric: optional ``metric(model, tokenizer, domain) -> float`` evaluated before (once, on the
            untouched weights) and after training (per seed), e.g. :func:`multiple_choice_accuracy`.
        output_dir: ``<output_dir>/sts/validation.json`` and ``validation.png``; per-seed callback folders in
            ``<output_dir>/seed-<seed>/``.
        device: where training runs (default: the model's device).
        copy_model: fine-tune a ``copy.deepcopy`` of the model (default; your model is never modified). With
            ``False``: LoRA adapters are added to your model and removed afterwards (weights unchanged); a full
            fine-tune leaves your model trained (one seed only).
        training_args: extra ``TrainingArguments`` fields (e.g. ``{"bf16": True}``), applied last (recorded
            in validation.json and shown in the table). Fields validate sets from its own settings
            (``max_steps``/``num_train_epochs``: ``steps``, ``learning_rate``, ``per_device_train_batch_size``:
            ``batch_size``, ``seed``/``data_seed``: ``seeds``, ... see ``OWN_TRAINING_ARGS``) are refused.
        n_resamples: bootstrap resamples per interval (0: no intervals).
        plot, report: write ``validation.png`` and the ``sts report`` HTML/Markdown next to the JSON.
        progress: show progress bars (forecast, training).
        reward_funcs: GRPO's reward functions, for prompt-only ``train_data``: validated with TRL's GRPOTrainer
            (preference pairs are validated with DPOTrainer, other data with an SFT Trainer).
        validation: a :class:`ValidationConfig` (or its dict) holding the settings above.

    The settings (method ... report) are the fields of :class:`ValidationConfig`: pass ``validation=`` (a
    ValidationConfig or its dict) and/or them as keywords (keywords win).
    """
    start = time.perf_counter()
    base_config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    if isinstance(validation, ValidationConfig):
        validation = {f.name: getattr(validation, f.name) for f in fields(ValidationConfig)}
    v = ValidationConfig.from_dict({**(validation or {}), **settings})
    if metric is not None and not callable(metric):
        raise STSConfigError("validate(metric=...) must be a callable metric(model, tokenizer, domain) -> float, "
                             "e.g. multiple_choice_accuracy(items).")
    seeds = v.seeds if v.seeds is not None else [base_config.seed]
    method, steps, learning_rate, batch_size, max_length = v.method, v.steps, v.learning_rate, v.batch_size, v.max_length
    lora_rank, lora_alpha, lora_target_modules = v.lora_rank, v.lora_alpha, v.lora_target_modules
    completion_only_loss, loss_tokens, recheck_tokens, recheck_steps = (v.completion_only_loss, v.loss_tokens,
                                                                        v.recheck_tokens, v.recheck_steps)
    output_dir, device, copy_model, training_args = v.output_dir, v.device, v.copy_model, v.training_args
    n_resamples, progress, plot, report = v.n_resamples, v.progress, v.plot, v.report
    if model is None or not isinstance(model, nn.Module):
        raise STSInputError(f"validate() needs a Hugging Face model (nn.Module), got {type(model).__name__}.")
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor: its tokenizer, with its chat template
    if tokenizer is None:
        raise STSInputError("validate() needs the model's tokenizer.")
    if peft_model_of(model) is not None or has_injected_adapters(model):
        raise STSInputError("validate() got a model with PEFT adapters; pass the base model "
                            "(model.get_base_model(), or merge_and_unload()): validate adds its own adapters "
                            "(method='lora') or trains every weight (method='full').")
    domains = load_domains(targets)
    covered = getattr(metric, "domains", None)  # a per-domain metric (multiple_choice_accuracy's) names its own
    if covered is not None and set(domains) - set(covered):
        raise STSInputError(f"The metric has no items for target domain(s) {sorted(set(domains) - set(covered))} "
                            f"(it has {sorted(covered)}); give items for every target domain, or one list for all.")
    if len(domains) < MIN_DOMAINS:
        raise STSConfigError(f"validate() correlates scores with measured changes across target domains and needs "
                             f"at least {MIN_DOMAINS}; got {len(domains)} ({sorted(domains)}). Add target domains.")
    train = load_corpus(train_data, name="train")
    demos = load_corpus(demonstrations, name="demonstrations") if demonstrations is not None else None
    # trained as its users train it (the callback then forecasts what that trainer pushes): GRPO with reward
    # functions, DPO on preference pairs, else SFT
    kind = check_training_data(train, reward_funcs, demos is not None)
    if kind != "sft":
        try:
            import trl  # noqa: F401  - fail now, not after the forecast
        except ImportError as err:
            raise STSInputError(f"validate trains this data with TRL's {TRAINERS[kind][0]}: pip install trl.") from err
    check_trainer_fields(kind, training_args or {}, batch_size)
    if kind == "grpo":
        reward_funcs = check_reward_funcs(reward_funcs)
        features = records_dataset(list(prompt_records(train, "the training set")))
        _check_grpo_reference(model, method, training_args or {})
    elif kind == "dpo":
        features = records_dataset(train.records())
    else:
        features = training_features(train, tokenizer, max_length, completion_only_loss, base_config.chat_fallback)
    if method == "lora":
        import peft  # noqa: F401  - fail now, not after the forecast, when peft is missing

        check_target_modules(model, lora_target_modules)
    lr = float(learning_rate) if learning_rate is not None else DEFAULT_LR[method]
    problem = device_problem(device, available=True) if device is not None else None
    if problem:  # now, not when the model's copy moves there
        raise STSConfigError(f"validate(device={device!r}): {problem}")
    train_device = torch.device(device) if device is not None else model_device(model)
    out = Path(output_dir)
    sts_dir = out / "sts"
    sts_dir.mkdir(parents=True, exist_ok=True)
    _clear_earlier_validation(out, sts_dir, seeds)
    training = {"trainer": TRAINERS[kind][0], "method": method, "steps": steps, "learning_rate": lr,
                "batch_size": batch_size, "max_length": max_length,
                "lora_rank": lora_rank if method == "lora" else None,
                "lora_alpha": (lora_alpha or 2 * lora_rank) if method == "lora" else None,
                "lora_target_modules": None,
                # DPO and GRPO train on completions by their own rules: the setting is SFT's
                "completion_only_loss": completion_only_loss if kind == "sft" else None,
                "loss_tokens": loss_tokens, "recheck_tokens": recheck_tokens, "recheck_steps": recheck_steps,
                "train_examples": len(features),
                "device": str(train_device), "copied_model": copy_model,
                "training_args": {k: v for k, v in (training_args or {}).items() if json_serializable(v)}}

    metric_before: dict[str, float] | None = None
    per_seed: list[SeedResult] = []
    variants: list[str] | None = None
    left_out: dict[str, list[str]] = {}
    for seed in seeds:
        seed_start = time.perf_counter()
        config = base_config.replace(seed=seed)
        run = _train_one_seed(model, tokenizer, sae, train, features, domains, demos, config, seed=seed, method=method,
                              steps=steps, lr=lr, batch_size=batch_size, lora_rank=lora_rank,
                              lora_alpha=lora_alpha or 2 * lora_rank, lora_target_modules=lora_target_modules,
                              kind=kind, reward_funcs=reward_funcs, max_length=max_length,
                              loss_tokens=loss_tokens, recheck_tokens=recheck_tokens,
                              recheck_steps=recheck_steps, device=train_device,
                              run_dir=out / f"seed-{seed}", copy_model=copy_model, training_args=training_args,
                              progress=progress, metric=metric, metric_before=metric_before)
        if metric is not None and metric_before is None:
            metric_before = run["metric_before"]
        training["lora_target_modules"] = run["target_modules"]
        forecast = run["callback"].forecast
        if variants is None:
            variants = [v for v in VARIANTS if all(d.scores.get(v) is not None for d in forecast.domains.values())]
            # a variant some domains lack (STS_icl of a one-text domain) leaves the comparison: said, by name
            left_out = {v: sorted(n for n, d in forecast.domains.items() if d.scores.get(v) is None) for v in VARIANTS
                        if v not in variants and any(d.scores.get(v) is not None for d in forecast.domains.values())}
            for line in _left_out_lines(left_out):
                warnings.warn(f"sts validate: {line}", STSDataWarning, stacklevel=2)
        per_seed.append(_seed_result(seed, run, variants, metric_before, n_resamples, time.perf_counter() - seed_start,
                                     out / f"seed-{seed}"))
        diverged = per_seed[-1].diverged()
        if diverged:
            warnings.warn(f"sts validate: seed {seed}'s held-out NLL after training is not finite on {diverged}: the "
                          f"model diverged (learning rate {lr:g}); its correlations are n/a. Lower the learning rate "
                          "(validation: learning_rate), or train fewer steps.", STSDataWarning, stacklevel=2)
        if seed == seeds[0]:  # the report of the validation folder shows the first seed's run
            forecast.save(sts_dir / FORECAST_FILE)
            for name in (HISTORY_FILE, SETTINGS_FILE):  # its re-checks, and its train-start warnings
                if (out / f"seed-{seed}" / "sts" / name).exists():
                    shutil.copyfile(out / f"seed-{seed}" / "sts" / name, sts_dir / name)
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    result = ValidationResult(domains=list(domains), variants=variants or [], seeds=seeds, method=method,
                              training=training, config=base_config.replace(seed=seeds[0]).to_dict(), per_seed=per_seed,
                              n_resamples=n_resamples, output_dir=str(out), left_out=left_out)
    result.files = {"json": str(sts_dir / VALIDATION_FILE), "forecast": str(sts_dir / "forecast.json"),
                    "history": str(sts_dir / "history.jsonl"),
                    "seed_runs": [str(out / f"seed-{s}") for s in seeds]}  # type: ignore[dict-item]
    if plot:
        try:
            result.files["plot"] = str(plot_validation(result, sts_dir / PLOT_FILE))
        except Exception as err:  # noqa: BLE001 - a plot must not lose the measurements
            warnings.warn(f"validation plot not written ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    result.timings = {"total": time.perf_counter() - start}
    result.save(sts_dir / VALIDATION_FILE)
    if report:
        try:
            from ..reporting.report import write_report

            html_path, md_path = write_report(sts_dir)
            result.files.update({"report_html": str(html_path), "report_md": str(md_path)})
            result.save(sts_dir / VALIDATION_FILE)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"report not written ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    return result


def check_training_data(train: Corpus, reward_funcs: Any, demonstrations: bool) -> str:
    """The trainer ``train`` is validated with (``training_kind``), once the data can be trained on: not empty, and
    with answers for SFT unless ``demonstrations`` are given; needs no model, so ``sts validate`` runs it before the
    model loads."""
    if len(train) == 0:
        raise STSInputError("The training set is empty; give it examples.")
    kind = training_kind(train, reward_funcs)
    if not demonstrations and kind == "sft" and not _trainable_answers(train):
        if all(train[i].plain_text for i in range(min(len(train), 64))):
            raise STSInputError("Every training text is empty or blank: there is nothing to fine-tune on; give it "
                                "texts.")
        raise STSInputError("The training set has no answers (prompt-only data): it can neither be fine-tuned on "
                            "with SFT nor give in-context demonstrations; give texts or prompt/answer records (or "
                            "reward_funcs=, to validate GRPO on its prompts).")
    return kind


def _clear_earlier_validation(out: Path, sts_dir: Path, seeds: list[int]) -> None:
    """A validation into a folder an earlier one wrote (its ``validation.json``): that one's summary files go now,
    so that a run stopped part-way never leaves one run's forecast beside another's results (which ``sts report``
    would combine); seed folders of seeds not run now are named (they are not this validation's)."""
    earlier = ([sts_dir / name for name in SUMMARY_FILES if (sts_dir / name).exists()]
               if (sts_dir / VALIDATION_FILE).exists() else [])
    for path in earlier:
        path.unlink()
    if earlier:
        warnings.warn(f"sts validate: {out} held an earlier validation's results "
                      f"({', '.join(p.name for p in earlier)}); they are replaced by this one's.", STSDataWarning,
                      stacklevel=3)
    others = sorted(p.name for p in out.glob("seed-*") if p.is_dir() and p.name not in {f"seed-{s}" for s in seeds})
    if others:
        warnings.warn(f"sts validate: {out} holds seed folders of an earlier validation ({others}); this one runs "
                      f"seeds {seeds} and leaves them as they are (delete them, or use another output folder).",
                      STSDataWarning, stacklevel=3)


def _train_one_seed(model, tokenizer, sae, train: Corpus, features, domains, demos, config: STSConfig, *, seed: int,
                    method: str, steps: int, lr: float, batch_size: int, lora_rank: int, lora_alpha: int,
                    lora_target_modules, loss_tokens: int, recheck_tokens: int, recheck_steps: RecheckSteps,
                    device: torch.device, run_dir: Path, kind: str, reward_funcs: Any, max_length: int,
                    copy_model: bool, training_args, progress: bool, metric, metric_before) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments, set_seed

    from ..integrations.callback import STSCallback
    from ..pipelines.forecast import inference_mode

    set_seed(seed)
    original_device = model_device(model)
    requires_grad = None
    work = copy.deepcopy(model) if copy_model else model
    if not copy_model:  # what training changes on the user's model, put back afterwards
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        modes = {name: module.training for name, module in model.named_modules()}
        dropouts = {name: module.p for name, module in model.named_modules()  # TRL's disable_dropout sets 0
                    if isinstance(module, nn.modules.dropout._DropoutNd)}
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    work.to(device)
    result: dict[str, Any] = {"target_modules": None, "metric_before": metric_before}
    try:
        if metric is not None and metric_before is None:
            with inference_mode(work):
                result["metric_before"] = {d: _metric_value(metric, work, tokenizer, d) for d in domains}
        if method == "lora":
            work = wrap_lora(work, lora_rank, lora_alpha, lora_target_modules)
            targets = work.peft_config["default"].target_modules
            result["target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        else:
            for p in work.parameters():
                p.requires_grad_(True)
        callback = STSCallback(sae=sae, target_domains=domains, train_probe=train, demonstrations=demos,
                               config=config, recheck_tokens=recheck_tokens, loss_tokens=loss_tokens, strict=True,
                               recheck_steps=recheck_steps, recheck_at_end=True,
                               loss_precision=None)  # ground truth: every held-out token, no sequential stop
        if run_dir.exists():
            shutil.rmtree(run_dir / "sts", ignore_errors=True)
        args = dict(output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                    learning_rate=lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                    lr_scheduler_type="cosine", warmup_steps=0.1 if steps >= 10 else 0, seed=seed, data_seed=seed, save_strategy="no",
                    logging_steps=max(1, steps // 4), report_to="none", use_cpu=device.type == "cpu",
                    disable_tqdm=not progress, remove_unused_columns=False, label_names=["labels"])
        if kind != "sft":
            del args["remove_unused_columns"], args["label_names"]  # the TRL trainers' own collators and columns
            if not {"gradient_checkpointing", "activation_checkpointing"} & set(training_args or {}):
                args["activation_checkpointing"] = True  # TRL's default, by its new name (the old one warns)
        if kind == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args.update(training_args or {})
            trainer = GRPOTrainer(model=work, reward_funcs=reward_funcs, args=GRPOConfig(**args),
                                  train_dataset=features, processing_class=tokenizer, callbacks=[callback])
        elif kind == "dpo":
            from trl import DPOConfig, DPOTrainer

            args.update(max_length=max_length, **(training_args or {}))
            # the reference is the policy as it starts: TRL would reload it from config._name_or_path for a full
            # fine-tune (another model's weights, or none for a model built in memory); LoRA's is the base
            reference = copy.deepcopy(work) if peft_model_of(work) is None else None
            trainer = DPOTrainer(model=work, ref_model=reference, args=DPOConfig(**args), train_dataset=features,
                                 processing_class=tokenizer, callbacks=[callback])
        else:
            args.update(training_args or {})
            trainer = Trainer(model=work, args=TrainingArguments(**args), train_dataset=features,
                              data_collator=PadCollator(pad_token_id(tokenizer)), processing_class=tokenizer,
                              callbacks=[callback])
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the result table follows
        with warnings.catch_warnings():  # validate chose save_strategy='no' and the end-only re-check itself
            warnings.filterwarnings("ignore", message="STS: save_strategy='no' and recheck_steps unset",
                                    category=STSDataWarning)
            trainer.train()
        if not callback.history or "error" in callback.history[-1]:
            raise STSInputError(f"The final re-check of seed {seed} did not run; see the warnings above.")
        result["callback"] = callback
        result["train_loss"] = next((e["train_loss"] for e in reversed(trainer.state.log_history)
                                     if "train_loss" in e), None)
        # the Trainer's own log (train loss, learning rate per logging step): free evidence for early forecasts
        result["log_history"] = [{k: v for k, v in e.items() if json_serializable(v) and not k.startswith("sts/")}
                                 for e in trainer.state.log_history]
        if metric is not None:
            with inference_mode(work):
                result["metric_after"] = {d: _metric_value(metric, work, tokenizer, d) for d in domains}
        del trainer
    finally:
        if not copy_model:
            if peft_model_of(work) is not None:
                work.unload()  # the adapters come out, the base weights were never trained
            remove_injected_adapters(model)  # those of a wrap that failed (or was interrupted) half-way
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))  # type: ignore[union-attr]
            for name, module in model.named_modules():
                module.train(modes.get(name, module.training))  # the Trainer left every module training
                if name in dropouts:
                    module.p = dropouts[name]
            if use_cache is not None:
                model.config.use_cache = use_cache  # the Trainer sets it from its arguments
            model.to(original_device)
        del work
    return result


def _left_out_lines(left_out: dict[str, list[str]]) -> list[str]:
    """Why each score variant some target domains lack is not in the validation."""
    icl = ("sts_icl", "raw_icl", "icl_loss_change")
    return [f"{LABELS.get(v, v)} is left out: domain(s) {names} have no score of it"
            + (" (one text: no other to demonstrate it in context; give them more texts)" if v in icl else "")
            for v, names in left_out.items()]


def _metric_value(metric: Metric, model: nn.Module, tokenizer, domain: str) -> float:
    """The user metric of one domain, as a number (anything else is named, with the domain)."""
    value = metric(model, tokenizer, domain)
    try:
        if value is None or isinstance(value, (bool, str, bytes)):
            raise TypeError
        return float(value)  # a number, a numpy scalar, a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        raise STSInputError(f"metric(model, tokenizer, {domain!r}) returned {value!r}; it must return one number "
                            "(e.g. the domain's accuracy as a float).") from None


def _seed_result(seed: int, run: dict[str, Any], variants: list[str], metric_before, n_resamples: int,
                 seconds: float, run_dir: Path) -> SeedResult:
    callback = run["callback"]
    forecast = callback.forecast
    last = callback.history[-1]
    names = list(forecast.domains)
    before = {d: float(callback.base_losses[d]) for d in names}
    after = {d: float(last["loss"][d]) for d in names}
    rel = {d: (after[d] - before[d]) / before[d] if before[d] else 0.0 for d in names}
    absolute = {d: after[d] - before[d] for d in names}
    scores = {d: {v: float(forecast.domains[d].scores[v]) for v in variants} for d in names}
    measures = {"nll": rel}
    metric_after = run.get("metric_after")
    metric_delta = None
    if metric_after is not None:
        metric_delta = {d: metric_after[d] - metric_before[d] for d in names}
        measures["metric"] = metric_delta
    correlations: dict[str, Any] = {}
    for measure, delta in measures.items():
        correlations[measure] = {}
        for v in variants:
            x = [scores[d][v] for d in names]
            correlations[measure][v] = {
                kind: {stat: correlation(x, [abs(delta[d]) if kind == "abs" else delta[d] for d in names], stat,
                                         n_resamples=n_resamples, seed=seed) for stat in STATISTICS}
                for kind in KINDS}
    return SeedResult(
        seed=seed, scores=scores, nll_before=before, nll_after=after, nll_delta_rel=rel, nll_delta_abs=absolute,
        overlap=last.get("overlap_with_forecast"), n_shifted=len(forecast.shifted_latents),
        forecast_latents=list(forecast.shifted_latents), actual_latents=list(last.get("shifted_latents", [])),
        actual_scores=last.get("scores", {}), correlations=correlations,
        metric_before=dict(metric_before) if metric_before is not None else None, metric_after=metric_after,
        metric_delta=metric_delta, train_loss=run.get("train_loss"),
        trajectory=[{"step": r["step"], "nll_delta_rel": r["loss_delta"], "nll_delta_ci": r.get("loss_delta_ci"),
                     "overlap": r.get("overlap_with_forecast"),
                     "lr_area_fraction": r.get("lr_area_fraction"), "early_forecast": r.get("early_forecast"),
                     "shifted_latents": r.get("shifted_latents", []), "seconds": r.get("seconds")}
                    for r in callback.history if "loss_delta" in r],
        seconds=seconds, run_dir=str(run_dir), log_history=run.get("log_history", []),
        forecast_timings=dict(forecast.timings), nll_delta_se=dict(last.get("loss_delta_se") or {}))


# --------------------------------------------------------------------------- plot
def plot_validation(result: ValidationResult, path: str | Path) -> Path:
    """Score vs signed relative NLL change (%), one panel per variant; error bars: std over seeds.

    Needs matplotlib, the optional extra ``report``: without it, an ImportError naming the install command."""
    from ..reporting.report import REPORT_EXTRA, optional_pyplot

    plt = optional_pyplot()
    if plt is None:
        raise ImportError(f"validation.png needs matplotlib; {REPORT_EXTRA}")

    path = Path(path)
    variants = result.variants
    summary = result.summary()["nll"]
    columns = min(max(len(variants), 1), 4)
    rows = max(math.ceil(len(variants) / columns), 1)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    seeds = result.per_seed
    for ax, v in zip(axes.flat, variants):
        for d in result.domains:
            xs = [s.scores[d][v] for s in seeds]
            ys = [100 * s.nll_delta_rel[d] for s in seeds]
            x, y = sum(xs) / len(xs), sum(ys) / len(ys)
            xerr = _std(xs) if len(seeds) > 1 else None
            yerr = _std(ys) if len(seeds) > 1 else None
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color="#2c6fbb", ms=5, capsize=2, zorder=3)
            ax.annotate(d, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        ax.axhline(0, color="#999", lw=0.8)
        r = summary[v]["signed"]["pearson"]["mean"]
        rho = summary[v]["signed"]["spearman"]["mean"]
        fmt = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
        ax.set_title(f"{LABELS[v]} vs Δ: Pearson {fmt(r)}, Spearman {fmt(rho)}", fontsize=9)
        ax.set_xlabel(f"forecast {LABELS[v]}", fontsize=8)
        ax.set_ylabel("held-out NLL change (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long labels (0.0014, 0.0016, ...) ran together
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"STS validation ({result.method}, seeds {result.seeds}): forecast vs measured change", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


__all__ = ["SeedResult", "ValidationConfig", "ValidationResult", "choice_scores", "correlation", "multiple_choice_accuracy",
           "plot_validation", "validate"]
