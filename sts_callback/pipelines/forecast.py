"""``forecast()``: which latents a training set will shift, and how strongly each target domain uses them."""

from __future__ import annotations

import logging
import math
import random
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..scoring import score

from ..scoring import signed
from ..scoring.calibration import RUN_LEVEL_METHODS, forecast_scope, load_calibration, own_feature
from ..core.capture import (check_layer_runs_on_text, check_measurable, hidden_size, max_positions, num_layers,
                            unwrap_model)
from ..core.config import (DEFAULT_ICL_LOSS_TOKENS, ICL_LOSS_FEATURE, ICL_LOSS_SETTINGS, MIN_BUDGET_TOKENS,
                           SCORE_VARIANTS, STSConfig, device_problem)
from ..core.data import AllBut, Corpus, PromptBuilder, TokenPair, load_corpus, load_domains, sample_within_budget
from ..core.distributed import (check_ranks_agree, fingerprint, is_main_process, require_at_least_world,
                                sum_across_ranks, warn_on_main, world_size)
from ..core.atomic import check_format, read_json
from ..core.formatting import json_safe, signed_percent
from ..core.errors import STSConfigError, STSDataWarning, STSInputError, STSNumericalError
from ..core.run_store import FORECAST_FORMAT
from ..core.extract import Extractor, PairedStats, whole_batch_share
from ..core.heldout import all_sequence_nll
from ..core.stats import TopActivations
from ..core.sae import SAEHandle, check_sae_for_model, layer_to_read, load_sae
from ..core.sae_fit import fit_from_sums, poor_fit_message
from ..core.torch_utils import model_device, pad_token_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096
MIN_DOMAIN_TOKENS = MIN_BUDGET_TOKENS

SCORE_LABELS = {
    "sts_icl": "STS_icl", "sts_act": "STS_act", "sts_sq": "STS_sq",
    "raw_icl": "raw_icl", "raw_act": "raw_act", "raw_sq": "raw_sq",
    "signed_usage": "signed_use", "forgetting_minus_transfer": "forget-xfer", "decoder_projection": "dec_proj",
    # the run-level terms: a relative NLL change
    "lookahead": "lookahead", "compressed": "compressed", "first_order": "1st-order",
    ICL_LOSS_FEATURE: "icl_loss",  # a relative NLL change with training demonstrations in context
}


def run_level_values(run_level: dict[str, Any] | None) -> dict[str, float | None]:
    """The run's own values a calibration's level may use: ``lookahead_own`` / ``first_order_own``, the change of
    the training data's own loss in the run-level term (:attr:`RunLevelEstimate.own_change`)."""
    if not run_level:
        return {}
    return {own_feature(run_level["method"]): run_level.get("own_change")}


@dataclass
class DomainForecast:
    """Scores of one target domain (``None`` where a variant was not computed)."""

    name: str
    texts: int
    tokens: int
    scores: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "texts": self.texts, "tokens": self.tokens, "scores": dict(self.scores)}


@dataclass(repr=False)
class Forecast:
    """The result of :func:`forecast`: per-domain scores, the shifted latents, and how they were obtained.
    ``print(forecast)`` (or the last line of a notebook cell) shows the table; ``repr`` a one-line summary."""

    domains: dict[str, DomainForecast]
    shifted_latents: list[int]
    shift_values: list[float]
    shift_direction: list[float]
    raw_shifted_dims: list[int]
    raw_shift_values: list[float]
    shift_tokens: int
    shift_queries: int
    ranking: str
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    latent_contexts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # domain -> {"mean", "low", "high", "level", "label"}: predicted relative change of held-out NLL (calibrated)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def apply_calibration(self, calibration: Any, exclude: Iterable[str] = ()) -> "Forecast":
        """Predict each domain's relative held-out NLL change at the end of training, with the calibration's
        interval and a gain / loss / flat label (loss: the whole interval above 0, gain: below, else flat).
        ``exclude``: domains not to predict, e.g. a held-out part of the training data itself, which a calibration
        fitted on the *other* domains of its runs does not cover (a centred calibration centres over the rest).
        ``calibration``: a :class:`Calibration`, its JSON path or a built-in name. A failed call changes nothing."""
        calibration = load_calibration(calibration)
        excluded = {exclude} if isinstance(exclude, str) else set(exclude)
        unknown = sorted(excluded - set(self.domains))
        if unknown:
            raise STSConfigError(f"exclude={unknown}: not target domains of this forecast ({sorted(self.domains)}).")
        domains = {name: d.scores for name, d in self.domains.items() if name not in excluded}
        check_calibration_features(calibration, domains)
        run_level = self.settings.get("run_level") or {}
        fitted_steps = calibration.fitted_run_level_steps
        if fitted_steps is not None and run_level.get("steps") not in (None, fitted_steps):
            raise STSConfigError(f"The calibration's run-level feature was measured after {fitted_steps} lookahead "
                                 f"step(s), this forecast's after {run_level['steps']}; forecast with "
                                 f"run_level_steps={fitted_steps}, or fit a calibration on runs like this one.")
        # a domain without a feature (STS_icl of a one-text domain) gets no prediction
        predicted = calibration.predict_all(domains, run_level_values(self.settings.get("run_level")))
        scope_problems = self._check_scope(calibration)
        # said in the table (a built-in applied to a user's own domains would warn on every run)
        unseen = sorted(name for name in predicted if calibration.domain_prior and name not in calibration.domain_prior)
        self.predictions = {name: {"mean": p.mean, "low": p.low, "high": p.high, "level": p.level, "label": p.label}
                            for name, p in predicted.items()}
        self.settings["calibration"] = {"source": getattr(calibration, "source", None),
                                        "features": list(calibration.features), "n": calibration.n,
                                        "fitted_on": calibration.fitted_on, "excluded": sorted(excluded),
                                        "scope_problems": scope_problems, "unseen_domains": unseen}
        return self

    def _check_scope(self, calibration: Any) -> list[str]:
        """Warn when the calibration states a scope (``fitted_on["scope"]``: model class, SAE width and hook, the
        shift, the training recipe) that this forecast's model, SAE, shift or recipe is outside: its predictions
        then mean little. Returns the differences (recorded with the predictions, so the table and report say so
        too)."""
        scope = (calibration.fitted_on or {}).get("scope") or {}
        here = forecast_scope(self.settings)
        differ = [f"{key} {here.get(key)!r} (calibrated on {value!r})" for key, value in scope.items()
                  if here.get(key) is not None and here.get(key) != value]
        if differ:
            warn_on_main(f"This calibration was fitted on another setup: {', '.join(differ)}; its predictions do "
                         "not carry over. Fit one on your own runs (`sts calibrate`).", STSDataWarning, stacklevel=3)
        return differ

    def ranked(self, variant: str | None = None) -> list[tuple[str, float]]:
        """(domain, score) from the most to the least affected, by ``variant`` (default: ``ranking``): a score
        variant, or a signed feature / run-level change the forecast holds (highest first: most harm)."""
        variant = self._check_variant(variant)
        pairs = [(name, d.scores.get(variant)) for name, d in self.domains.items()]
        # a domain without the variant (STS_icl of a one-text domain), or NaN, ranks after every scored one
        return sorted(pairs, key=lambda item: (_missing(item[1]), -(0.0 if _missing(item[1]) else item[1]),
                                               item[0]))  # type: ignore[return-value]

    def _check_variant(self, variant: str | None) -> str:
        variant = variant or self.ranking
        if variant not in SCORE_LABELS:
            raise STSConfigError(f"Unknown score variant {variant!r}; use one of {SCORE_VARIANTS}, or a signed "
                                 f"feature the forecast holds ({sorted(set(SCORE_LABELS) - set(SCORE_VARIANTS))}).")
        if all(d.scores.get(variant) is None for d in self.domains.values()):
            computed = sorted({v for d in self.domains.values() for v, x in d.scores.items() if x is not None})
            raise STSConfigError(f"Variant {variant!r} was not computed in this forecast (compute_icl=False? a "
                                 f"run-level term not asked for?); it holds {computed}.")
        return variant

    def score(self, domain: str, variant: str | None = None) -> float:
        if domain not in self.domains:
            raise STSConfigError(f"{domain!r} is not a target domain of this forecast ({sorted(self.domains)}).")
        variant = self._check_variant(variant)
        value = self.domains[domain].scores.get(variant)
        if value is None:
            raise STSConfigError(f"Variant {variant!r} was not computed for {domain!r} (a one-text domain has no "
                                 "STS_icl).")
        return value

    @property
    def shift_source(self) -> str:
        """What the shift was measured on, in words: "<n> query tokens", or "<n> completion tokens, <kind> shift"
        for a preference or RL shift."""
        kind = self.settings.get("shift", "in_context")
        what = "query tokens" if kind == "in_context" else f"completion tokens, {kind} shift"
        return f"{self.shift_tokens} {what}"

    @property
    def tokens_per_second(self) -> float:
        total = self.timings.get("total", 0.0)
        tokens = self.timings.get("forward_tokens", 0.0)
        return tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A copy as plain data (editing it leaves the forecast as it is)."""
        return copy.deepcopy({
            "format": FORECAST_FORMAT,
            "ranking": self.ranking,
            "domains": {name: d.to_dict() for name, d in self.domains.items()},
            "shifted_latents": self.shifted_latents,
            "shift_values": self.shift_values,
            "shift_direction": self.shift_direction,
            "raw_shifted_dims": self.raw_shifted_dims,
            "raw_shift_values": self.raw_shift_values,
            "shift_tokens": self.shift_tokens,
            "shift_queries": self.shift_queries,
            "timings": self.timings,
            "settings": self.settings,
            "latent_contexts": self.latent_contexts,
            "predictions": self.predictions,
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Forecast":
        check_format(data, FORECAST_FORMAT, "an STS forecast", "a forecast.json")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise STSInputError(f"The forecast has fields this version does not know ({unknown}): written by a newer "
                                "sts-callback? Upgrade it to read the file.")
        data = copy.deepcopy(data)  # two forecasts read from one dict must not share (and write) its settings
        domain_fields = {f.name for f in fields(DomainForecast)}
        for name, d in data["domains"].items():
            unknown = sorted(set(d) - domain_fields) if isinstance(d, dict) else None
            if unknown:
                raise STSInputError(f"The forecast's domain {name!r} has fields this version does not know "
                                    f"({unknown}): written by a newer sts-callback, or edited? Upgrade it to read "
                                    "the file.")
        domains = {name: DomainForecast(**d) for name, d in data["domains"].items()}
        fields_ = {k: v for k, v in data.items() if k not in ("format", "domains")}
        return cls(domains=domains, **fields_)

    def save(self, path: str | Path) -> Path:
        """The forecast as JSON at ``path`` (atomically); a non-finite number is written as null (strict JSON)."""
        from ..core.atomic import atomic_write_json

        return atomic_write_json(path, json_safe(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Forecast":
        """A saved forecast: its ``forecast.json``, or the folder holding one (a run's STS folder)."""
        path = Path(path)
        if path.is_dir() and (path / "forecast.json").is_file():
            path = path / "forecast.json"
        return cls.from_dict(read_json(path, "the forecast"))

    def table(self, variant: str | None = None, view: str | None = None, protected: Sequence[str] = ()) -> str:
        """The forecast for a person: the predicted change of each domain's held-out NLL with its interval and
        a gain / loss / flat label when calibrated (``view="predicted"``, the default then), else (or with
        ``view="scores"``, or a ``variant`` named) the raw scores ranked by ``variant``; ``protected`` domains
        are marked ``*``."""
        if view not in (None, "predicted", "scores"):
            raise STSConfigError(f"view={view!r}: use 'predicted' (the calibrated changes) or 'scores'.")
        view = view or ("predicted" if self.predictions and variant is None else "scores")
        marked = {name for name in protected if name in self.domains}
        note = "\n(*: protected domain)" if marked else ""
        if view == "predicted":
            return self._predicted_table(marked) + note
        variant = self._check_variant(variant)
        shown = [v for v in ("sts_icl", "sts_act", "sts_sq", "raw_act", signed.DEFAULT_SIGNED, ICL_LOSS_FEATURE,
                             *RUN_LEVEL_METHODS) if any(
            d.scores.get(v) is not None for d in self.domains.values())]
        width = max([len("domain")] + [display_width(shown_name(n)) + (n in marked) for n in self.domains])
        header = f"{'rank':>4}  {'domain':<{width}}  " + "  ".join(f"{SCORE_LABELS[v]:>10}" for v in shown) + f"  {'tokens':>7}"
        lines = [f"STS forecast: {len(self.domains)} target domains, ranked by {SCORE_LABELS[variant]} "
                 f"(N={len(self.shifted_latents)} shifted latents from {self.shift_source})",
                 header, "-" * len(header)]
        for rank, (name, _) in enumerate(self.ranked(variant), 1):
            d = self.domains[name]
            cells = "  ".join(f"{d.scores.get(v):>10.4g}" if d.scores.get(v) is not None else f"{'n/a':>10}"
                              for v in shown)
            lines.append(f"{rank:>4}  {padded(name, width, name in marked)}  {cells}  {d.tokens:>7}")
        return "\n".join(lines) + note

    def _predicted_table(self, marked: set[str] = frozenset()) -> str:
        if not self.predictions:
            return "No calibrated prediction (fit a calibration on measured runs: sts calibrate)."
        level = next(iter(self.predictions.values()))["level"]
        width = max([len("domain")] + [display_width(shown_name(n)) + (n in marked) for n in self.predictions])
        header = f"{'domain':<{width}}  {'predicted':>10}  {f'{level:.0%} interval':>20}  {'':<5}"
        calibration = self.settings.get("calibration", {})
        source = f"{calibration['source']}, " if calibration.get("source") else ""
        lines = [f"STS forecast: predicted change of each domain's held-out loss at the end of training "
                 f"(+ = worse; calibration {source}fitted on {calibration.get('n', '?')} measured changes)"]
        if calibration.get("scope_problems"):
            problems = "; ".join(calibration["scope_problems"])
            lines.append(f"CAUTION: the calibration was fitted on another setup ({problems}): these predictions do "
                         "not carry over; fit one on your own runs (sts calibrate).")
        lines += [header, "-" * len(header)]
        for name, p in sorted(self.predictions.items(), key=lambda item: -item[1]["mean"]):
            # bounds printed so that their sign, which decides the label, shows (never +0.0% for 0.0004)
            interval = f"[{signed_percent(p['low'])}, {signed_percent(p['high'])}]"
            lines.append(f"{padded(name, width, name in marked)}  {signed_percent(p['mean']):>10}  {interval:>20}  "
                         f"{p['label']:<5}")
        excluded = calibration.get("excluded", [])
        if excluded:
            lines.append(f"not predicted: {excluded} (excluded when the calibration was applied)")
        missing = [n for n in self.domains if n not in self.predictions and n not in excluded]
        if missing:
            lines.append(f"no prediction for {missing} (a feature of the calibration was not computed for them)")
        if calibration.get("unseen_domains"):
            lines.append(f"not in the calibration's runs: {calibration['unseen_domains']} (the average domain's level, "
                         "no prior of their own; the interval does not allow for that: fit on runs that measured "
                         "them, sts calibrate --runs)")
        lines.append("raw scores: forecast.table(view='scores') in Python; the scores in forecast.json")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        what = f"{len(self.predictions)} predicted" if self.predictions else f"ranked by {self.ranking}"
        return (f"<Forecast: {len(self.domains)} target domains, {what}, N={len(self.shifted_latents)} shifted "
                f"latents from {self.shift_source}; print() it for the table>")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter: the table
        printer.text(repr(self) if cycle else self.table())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def shown_name(name: str) -> str:
    """``name`` for a console table: control characters escaped as ``repr`` writes them (no quotes), so a tab or
    line break cannot break a row and an escape sequence cannot reach the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (CJK, emoji) characters two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def padded(name: str, width: int, marked: bool = False) -> str:
    """:func:`shown_name` (``*`` after it when ``marked``) left-aligned to ``width`` terminal columns."""
    shown = shown_name(name) + ("*" if marked else "")
    return shown + " " * max(width - display_width(shown), 0)


@contextmanager
def inference_mode(model: nn.Module):
    """Eval mode and no grad for the duration; the previous training flag is restored even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def resolve_layer(config: STSConfig, sae: SAEHandle) -> int:
    return layer_to_read(config.layer, sae.layer, sae.hook_name)


@dataclass
class ForecastSetup:
    """What every pass of a forecast shares: the prepared model, SAE, layer and prompt builder."""

    model: nn.Module
    sae: SAEHandle
    layer: int
    builder: PromptBuilder
    config: STSConfig
    # warn when the SAE reconstructs the training data poorly (off where the caller checks the fit itself: the
    # callback, on its training probe)
    check_fit: bool = True

    @classmethod
    def create(cls, model: nn.Module, tokenizer, sae: Any, config: STSConfig) -> "ForecastSetup":
        check_measurable(model)
        if config.device is not None:  # the machine is asked here, not in STSConfig: the SAE is about to go there
            problem = device_problem(config.device, available=True)
            if problem:
                raise STSConfigError(f"STSConfig.device={config.device!r}: {problem}")
        device = torch.device(config.device) if config.device else model_device(model)
        dtype = getattr(torch, config.sae_dtype) if config.sae_dtype else None
        handle = load_sae(sae, device=device, dtype=dtype)
        layer = resolve_layer(config, handle)
        check_sae_for_model(handle.d_in, handle.hook_name, hidden_size(model), num_layers(model), layer)
        check_layer_runs_on_text(model, layer)
        if config.n_shifted > handle.d_sae:
            raise STSConfigError(
                f"STSConfig.n_shifted={config.n_shifted} is larger than the SAE width {handle.d_sae}; "
                f"set n_shifted to at most {handle.d_sae}."
            )
        return cls(model=model, sae=handle, layer=layer, builder=prompt_builder(model, tokenizer, config), config=config)

    def extractor(self, on_batch=None, model: nn.Module | None = None) -> Extractor:
        """An extractor for this setup's SAE and layer, on ``model`` (default: the setup's; a re-check passes
        the model being trained)."""
        tokenizer = self.builder.tokenizer
        pad = pad_token_id(tokenizer)
        return Extractor(model if model is not None else self.model, self.sae, self.layer,
                         batch_size=self.config.batch_size,
                         truncate=self.config.truncate_forward, pad_token_id=pad, on_batch=on_batch)


def prompt_builder(model: nn.Module, tokenizer, config: STSConfig) -> PromptBuilder:
    """The PromptBuilder of a forecast's settings (sequence lengths capped by the model's context)."""
    positions = max_positions(model)
    if config.max_length is not None and positions is not None and config.max_length > positions:
        raise STSConfigError(f"STSConfig.max_length={config.max_length} exceeds the model's {positions} positions "
                             f"(its position embeddings would be indexed past their end): set max_length<={positions}, "
                             "or leave it None for the model's own.")
    max_length = config.max_length or min(positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if max_length <= config.max_query_tokens:
        raise STSConfigError(
            f"The model's context ({max_length} tokens) is no longer than a query (STSConfig.max_query_tokens="
            f"{config.max_query_tokens}): no in-context demonstration would fit and every shift would be 0. Lower "
            f"max_query_tokens (e.g. to {max(max_length // 4, 1)}) so that demonstrations fit before the queries.")
    return PromptBuilder(tokenizer, max_query_tokens=config.max_query_tokens,
                         max_demonstration_tokens=config.max_demonstration_tokens, max_length=max_length,
                         exclude_special_tokens=config.exclude_special_tokens, chat_fallback=config.chat_fallback)


def _check_chat(corpus: Corpus, builder: PromptBuilder, indices: list[int]) -> None:
    if any(corpus[i].is_chat for i in indices[:32]):
        builder.check_chat(corpus.name)


def check_demonstrations_fit(pairs: list[TokenPair], builder: PromptBuilder, config: STSConfig, what: str) -> None:
    """Fail when the sequence limit leaves no room for demonstrations: every shift would be exactly zero."""
    empty = sum(len(p.context) == len(p.base) for p in pairs)
    if not pairs or empty < len(pairs) / 2:
        return
    fix = (f"the sequence limit is {builder.max_length} tokens (the model's context, or STSConfig.max_length) and "
           f"queries take up to max_query_tokens={config.max_query_tokens}; lower STSConfig.max_query_tokens (e.g. "
           f"to {max(builder.max_length // 4, 1)}) or max_demonstration_tokens, or use a model with a longer context")
    if empty == len(pairs):
        raise STSInputError(f"No in-context demonstration fits before any query of {what}: {fix}.")
    warn_on_main(f"{empty} of {len(pairs)} queries of {what} have no room for demonstrations ({fix}).",
                 STSDataWarning, stacklevel=3)


def build_shift_pairs(corpus: Corpus, builder: PromptBuilder, config: STSConfig, rng: random.Random,
                      budget: int, n_demonstrations: int, demonstrations: Corpus | None = None,
                      *, what: str | None = None, takes_demonstrations: bool = True,
                      ) -> tuple[list[TokenPair], int]:
    """Queries sampled within ``budget`` tokens, each paired with demonstrations sampled from the data.

    Demonstrations come from ``demonstrations`` when given, else from ``corpus``: never the query itself, unless
    it is the only example that can demonstrate (a one-text training set), which a warning then says. ``what``
    names ``corpus`` in errors (default: its name). ``takes_demonstrations=False`` for a caller with no
    ``demonstrations=`` argument (the gate): its errors and warnings then do not advise one.
    """
    what = what or repr(corpus.name)
    subject = what[:1].upper() + what[1:]
    if len(corpus) == 0:
        raise STSInputError(f"{subject} is empty; give it at least one text.")
    queries, tokens = sample_within_budget(corpus, builder, budget, rng)
    if not queries:
        raise STSInputError(f"{subject} has no countable tokens (all texts empty or special tokens).")
    if tokens < MIN_DOMAIN_TOKENS:  # as for a target domain: too few tokens for a shift that means anything
        raise STSInputError(f"{subject} has only {tokens} tokens (of {budget} asked for), fewer than one query of at "
                            f"least {MIN_DOMAIN_TOKENS}; add texts to it.")
    _check_chat(corpus, builder, queries)
    if demonstrations is not None:  # given apart: read whole (and checked as chats)
        pool: Sequence[int] = demonstrable_rows(demonstrations)
        _check_chat(demonstrations, builder, pool)
    else:  # every row of the training set, until a drawn one cannot demonstrate: only the drawn rows are read
        pool = range(len(corpus))
    start = rng.getstate()
    advice = DemonstrationAdvice(subject, takes_demonstrations)
    pairs = _paired_queries(corpus, demonstrations, queries, pool, builder, rng, n_demonstrations, advice)
    if pairs is None:  # some rows cannot demonstrate: draw again, as from the start, among those that can
        rng.setstate(start)
        pool = demonstrable_rows(corpus, subject, takes_demonstrations)
        pairs = _paired_queries(corpus, None, queries, pool, builder, rng, n_demonstrations, advice)
    check_demonstrations_fit(pairs, builder, config, what)
    return pairs, tokens


@dataclass(frozen=True)
class DemonstrationAdvice:
    """How the data's demonstration problems are named and what fix they advise: other examples through
    ``demonstrations=`` where the caller takes them, else only the data's own fix."""

    subject: str
    takes_demonstrations: bool = True

    def fix(self, own: str, other: str = "pass demonstrations=[...] with other examples") -> str:
        return f"{own}, or {other}." if self.takes_demonstrations else f"{own}."


def demonstrable_rows(corpus: Corpus, subject: str | None = None, takes_demonstrations: bool = True) -> list[int]:
    """The indices of the examples of ``corpus`` that can serve as in-context demonstrations (they have answers)."""
    pool = [i for i in range(len(corpus)) if corpus[i].can_demonstrate]
    if not pool:
        advice = DemonstrationAdvice(subject or repr(corpus.name), takes_demonstrations)
        raise STSInputError(
            f"{advice.subject} has no examples with answers to use as in-context demonstrations (prompt-only rows "
            "such as GRPO prompts, or user-only chats): "
            + advice.fix("give it completions or assistant turns",
                         "pass demonstrations=[...] with prompt/answer examples"))
    return pool


def _paired_queries(corpus: Corpus, demonstrations: Corpus | None, queries: list[int], pool: Sequence[int],
                    builder: PromptBuilder, rng: random.Random, n_demonstrations: int,
                    advice: DemonstrationAdvice) -> list[TokenPair] | None:
    """Each query paired with demonstrations drawn from ``pool`` (from ``demonstrations``, else from ``corpus``
    without the query itself); ``None`` when ``pool`` is the whole ``range`` of rows and a drawn row cannot
    demonstrate (the caller then draws again among the rows that can: the draws are those of that pool)."""
    pool_corpus = demonstrations if demonstrations is not None else corpus
    pairs, copies, candidates = [], 0, pool
    for query_index in queries:
        candidates = pool if demonstrations is not None else AllBut(pool, query_index)
        if not len(candidates):
            # Kept (with a warning) rather than refused: without it a one-text set has no shift at all. The query
            # then follows its own copy, so the shift partly measures repetition, not the data's content.
            warn_on_main(f"{advice.subject} has one text that can serve as an in-context demonstration, so it is "
                         "its own demonstration: the shift then partly measures seeing a text twice, not learning "
                         f"from the data. {advice.fix('Add texts to it')}", STSDataWarning, stacklevel=4)
            candidates = pool
        chosen = [pool_corpus[i] for i in rng.sample(candidates, min(n_demonstrations, len(candidates)))]
        if isinstance(pool, range) and not all(example.can_demonstrate for example in chosen):
            return None
        query = corpus[query_index]
        copies += bool(chosen) and all(example == query for example in chosen)
        pairs.append(builder.pair(query, chosen))
    if copies > len(pairs) // 2 and len(candidates) > 1:  # many texts, but copies of one another
        warn_on_main(f"{advice.subject}: {copies} of its {len(pairs)} sampled queries follow only copies of "
                     "themselves as in-context demonstrations (the data repeats texts), so the shift partly measures "
                     f"seeing a text twice, not learning from the data. {advice.fix('De-duplicate it')}",
                     STSDataWarning, stacklevel=4)
    return pairs


def domain_sequences(corpus: Corpus, builder: PromptBuilder, budget: int, rng: random.Random):
    indices, tokens = sample_within_budget(corpus, builder, budget, rng)
    if len(corpus) == 0 or not indices:
        raise STSInputError(f"Target domain {corpus.name!r} is empty or has no countable tokens; give it texts.")
    if tokens < MIN_DOMAIN_TOKENS:
        raise STSInputError(
            f"Target domain {corpus.name!r} has only {tokens} tokens, fewer than one query of at least "
            f"{MIN_DOMAIN_TOKENS}; add texts to it."
        )
    _check_chat(corpus, builder, indices)
    return indices, tokens


@dataclass
class DomainInput:
    """The sampled texts of one target domain: pairs (with domain demonstrations) or single sequences."""

    pairs: list[TokenPair] | None
    singles: list[tuple[list[int], list[bool]]] | None
    texts: int
    tokens: int

    def statistics(self, extractor: Extractor, name: str, reservoir: TopActivations | None = None):
        """PairedStats with domain demonstrations, or ConditionStats of the texts alone."""
        what = f"domain {name!r}"
        if self.pairs is not None:
            return extractor.paired(self.pairs, what=what, reservoir=reservoir)
        return extractor.activations(self.singles, what=what, reservoir=reservoir)


@dataclass
class Plan:
    """Every token sequence a forecast will run, sampled deterministically from the seed."""

    shift_pairs: list[TokenPair]
    shift_tokens: int
    domains: dict[str, DomainInput]


def plan_domains(builder: PromptBuilder, config: STSConfig, domains: dict[str, Corpus],
                 icl: bool | None = None) -> dict[str, DomainInput]:
    """Sample each domain's texts (and, with ``icl``, its own demonstrations); seeded per domain, so the
    result does not depend on the training set or on the other domains. ``icl`` defaults to
    ``config.compute_icl``."""
    icl = config.compute_icl if icl is None else icl
    inputs: dict[str, DomainInput] = {}
    for name, corpus in domains.items():
        domain_rng = random.Random(f"{config.seed}:{name}")
        indices, tokens = domain_sequences(corpus, builder, config.domain_tokens, domain_rng)
        pairs = _domain_pairs(builder, config, corpus, indices, domain_rng) if icl else None
        if icl and pairs is None:
            answering = any(corpus[i].can_demonstrate for i in range(len(corpus)))  # stops at the first
            why, fix = (("has one text that can be a demonstration: it has no other text to use as its in-context "
                         "demonstration", "Add texts to that domain") if answering else
                        (f"has no text with an answer to serve as an in-context demonstration (its {len(corpus)} "
                         "rows are prompts or user turns only)", "Give that domain texts with answers"))
            warn_on_main(f"Target domain {name!r} {why}, so its STS_icl is not computed (n/a; ranked last by "
                         f"STS_icl). Its STS_act and signed scores stand. {fix} for STS_icl.",
                         STSDataWarning, stacklevel=3)
        if pairs is not None:
            inputs[name] = DomainInput(pairs=pairs, singles=None, texts=len(indices), tokens=tokens)
        else:
            inputs[name] = DomainInput(pairs=None, singles=[builder.single(corpus[i]) for i in indices],
                                       texts=len(indices), tokens=tokens)
    return inputs


def _domain_pairs(builder: PromptBuilder, config: STSConfig, corpus: Corpus, indices: list[int],
                  domain_rng: random.Random) -> list[TokenPair] | None:
    """Each sampled text of a domain with other texts of it as demonstrations; None when some text has no other
    text that can demonstrate (one text, or one beside blank rows): an empty context would read as no shift."""
    if len(corpus) < 2:
        return None
    pairs, usable = [], None
    for i in indices:
        others = AllBut(range(len(corpus)), i)
        chosen = domain_rng.sample(others, min(config.n_domain_demonstrations, len(others)))
        if not all(corpus[j].can_demonstrate for j in chosen):  # a blank text drawn: among those with text
            usable = usable if usable is not None else [j for j in range(len(corpus)) if corpus[j].can_demonstrate]
            candidates = AllBut(usable, i)
            if not len(candidates):
                return None
            chosen = domain_rng.sample(candidates, min(config.n_domain_demonstrations, len(candidates)))
        pairs.append(builder.pair(corpus[i], [corpus[j] for j in chosen]))
    return pairs


def plan_inputs(builder: PromptBuilder, config: STSConfig, train: Corpus, domains: dict[str, Corpus],
                demonstrations: Corpus | None = None) -> Plan:
    """Sample the queries, demonstrations and domain texts of a forecast (no model call)."""
    rng = random.Random(config.seed)
    shift_pairs, shift_tokens = build_shift_pairs(train, builder, config, rng, config.shift_tokens,
                                                  config.n_demonstrations, demonstrations,
                                                  what=f"the training data {train.name!r}")
    return Plan(shift_pairs=shift_pairs, shift_tokens=shift_tokens, domains=plan_domains(builder, config, domains))


def check_plan_agrees(setup: ForecastSetup, plan: Plan) -> None:
    """Under torchrun every rank must forecast the same inputs (their statistics are summed): compare cheap
    checksums of the sampled token ids, the SAE and the settings before the first collective."""
    if world_size() == 1:
        return
    shift = [(p.base, p.context) for p in plan.shift_pairs]
    check_inputs_agree(setup, fingerprint(shift), f"{len(shift)} sampled queries ({fingerprint(shift)})", plan.domains)


def check_inputs_agree(setup: ForecastSetup, shift_checksum: str, shift_what: str, domains: dict[str, DomainInput]) -> None:
    """:func:`check_plan_agrees` for any training-data side: ``shift_checksum`` fingerprints its sampled inputs,
    ``shift_what`` describes them in the error."""
    if world_size() == 1:
        return
    sae = setup.sae
    sae_summary = [*sae.checksum_parts(), setup.layer]
    domain_ids = {name: [(p.base, p.context) for p in d.pairs] if d.pairs is not None else d.singles
                  for name, d in domains.items()}
    settings = {k: v for k, v in setup.config.to_dict().items() if k != "device"}
    check_ranks_agree(
        {"training data": shift_checksum, "target domains": fingerprint(sorted(domain_ids), domain_ids),
         "SAE": fingerprint(sae_summary), "STS config": fingerprint(settings),
         **{f"target domain {name!r}'s texts": fingerprint(ids) for name, ids in domain_ids.items()}},
        {"training data": shift_what,
         "target domains": f"{sorted(domain_ids)} ({fingerprint(sorted(domain_ids), domain_ids)})",
         "SAE": f"{sae.hook_name} d_sae={sae.d_sae} ({fingerprint(sae_summary)})"},
    )


def check_calibration_features(calibration: Any, domains: dict[str, dict[str, float | None]] | None = None) -> None:
    """An error naming the calibration's features that are not forecast scores (as :class:`STSSession` checks),
    or, given the ``domains``' scores, that no domain has: it would predict nothing (a single domain lacking one
    only goes unpredicted, which the table says)."""
    known = (*SCORE_VARIANTS, *signed.SIGNED_VARIANTS, ICL_LOSS_FEATURE, *RUN_LEVEL_METHODS)
    if domains is None:  # before the forecast runs: only the names can be judged
        unknown = [f for f in calibration.score_features if f not in known]
        not_computed: list[str] = []
    else:
        absent = [f for f in calibration.score_features if domains and all(v.get(f) is None for v in domains.values())]
        unknown = [f for f in absent if f not in known]
        not_computed = [f for f in absent if f in known]
    problems = ([f"{unknown}, which are not forecast scores (those are {list(known)})"] if unknown else []) + (
        [f"{not_computed}, which this forecast did not compute for any domain (compute_icl=False? "
         "icl_loss_tokens=0? no SAE decoder? a run-level feature without run_level=...?)"] if not_computed else [])
    if problems:
        fix = "compute them in the forecast, or " if not_computed else ""
        raise STSConfigError(f"The calibration uses {' and '.join(problems)}, so it can predict nothing here; "
                             f"{fix}fit a calibration on forecast scores (`sts calibrate --features ...`).")


def check_calibration_config(calibration: Any, config: STSConfig) -> None:
    """Refuse, before any work, a calibration reading a score ``config`` does not compute (STS_icl under
    ``compute_icl=False``): the forecast would run whole, then predict nothing."""
    icl = [f for f in calibration.score_features if f in ("sts_icl", "raw_icl")]
    if icl and not config.compute_icl:
        raise STSConfigError(f"The calibration uses {icl}, but STSConfig(compute_icl=False) does not compute it: "
                             "set compute_icl=True, or fit a calibration without it (`sts calibrate --features ...`).")
    if ICL_LOSS_FEATURE in calibration.score_features and config.icl_loss_tokens == 0:
        raise STSConfigError(f"The calibration uses {ICL_LOSS_FEATURE!r}, but STSConfig(icl_loss_tokens=0) does not "
                             f"compute it: leave icl_loss_tokens=None (computed when a calibration reads it) or give "
                             f"it a budget ({DEFAULT_ICL_LOSS_TOKENS}), or fit a calibration without it.")


# shifts whose forecast puts no training texts in context before the domains' texts: no in-context NLL change
NO_CONTEXT_SHIFTS = ("chosen_vs_rejected", "reward_weighted", "teacher_vs_student")


def check_icl_loss_shift(calibration: Any, shift: str) -> None:
    """Refuse, before any work, a calibration that reads ``icl_loss_change`` for a forecast of ``shift`` that
    cannot compute it (the forecast would run whole, then predict nothing)."""
    if calibration is not None and shift in NO_CONTEXT_SHIFTS and ICL_LOSS_FEATURE in calibration.score_features:
        raise STSConfigError(f"The calibration reads {ICL_LOSS_FEATURE!r}, the domains' NLL change with training "
                             f"texts in context, which a {shift} forecast does not have (it contrasts two sides); "
                             "use a calibration fitted on this kind of run without it (`sts calibrate --runs ... "
                             "--features ...`).")


def with_icl_loss(config: STSConfig, calibration: Any, warn: bool = True) -> STSConfig:
    """``config`` with ``icl_loss_tokens`` decided: ``None`` becomes, when ``calibration`` reads
    ``icl_loss_change``, the budget it was fitted with (its ``fitted_on["icl_loss"]["tokens"]``, else the default),
    otherwise 0 (a forecast records the budget it used). With ``warn``, :func:`icl_loss_mismatch` is warned about
    (the callback says it at train start instead, once the processes know their ranks)."""
    fitted = _icl_loss_fitted(calibration)
    if fitted is None:
        return config if config.icl_loss_tokens is not None else config.replace(icl_loss_tokens=0)
    if warn and (problem := icl_loss_mismatch(config, calibration)):
        warn_on_main(problem, STSDataWarning, stacklevel=3)
    if config.icl_loss_tokens is not None:
        return config
    tokens = fitted.get("tokens")
    return config.replace(icl_loss_tokens=tokens if isinstance(tokens, int) and tokens > 0 else DEFAULT_ICL_LOSS_TOKENS)


def icl_loss_mismatch(config: STSConfig, calibration: Any) -> str | None:
    """What differs between the settings that set the in-context change's scale (the demonstrations, the lengths)
    and those ``calibration`` was fitted with, as a warning with the settings to pass; None when nothing does."""
    fitted = _icl_loss_fitted(calibration) or {}
    differ = [k for k in ICL_LOSS_SETTINGS if isinstance(fitted.get(k), int) and fitted[k] != getattr(config, k)]
    if not differ:
        return None
    return (f"The calibration's {ICL_LOSS_FEATURE} was measured with {', '.join(f'{k}={fitted[k]}' for k in differ)}, "
            f"this forecast's with {', '.join(f'{k}={getattr(config, k)}' for k in differ)}: the change's scale "
            f"differs, so its predictions shift. Pass STSConfig({', '.join(f'{k}={fitted[k]}' for k in differ)}) to "
            "measure as it was fitted.")


def _icl_loss_fitted(calibration: Any) -> dict[str, Any] | None:
    """What ``calibration`` recorded of how its ``icl_loss_change`` was measured (``fitted_on["icl_loss"]``: the
    budget, the demonstrations, the lengths; empty when it recorded none), or None when it does not read it."""
    if calibration is None or ICL_LOSS_FEATURE not in calibration.score_features:
        return None
    fitted = (calibration.fitted_on or {}).get("icl_loss")
    return fitted if isinstance(fitted, dict) else {}


def check_offline_calibration(calibration: Any) -> Any:
    """``calibration`` if a forecast made without training can apply it, else an error naming what it lacks."""
    check_calibration_features(calibration)
    needs = calibration.run_level_inputs()
    if needs:
        raise STSConfigError(f"This calibration needs {needs} from a training run's run-level term, which a forecast "
                             "made without training does not compute. Apply it in training (STSCallback(run_level="
                             "..., calibration=...)), or use one fitted on forecast scores alone: the built-in "
                             "'gemma3-270m-lora', or `sts calibrate` on runs without run_level.")
    return calibration


def prepare_forecast(model: nn.Module, tokenizer, sae: Any, config: STSConfig | dict | None,
                     calibration: Any = None, shift: str = "in_context") -> tuple[ForecastSetup, Any, float]:
    """What every public forecast entry does first: the setup, the loaded calibration (or None, refused when it
    reads what a forecast of ``shift`` does not compute) and the start time."""
    config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    if calibration is not None:
        from ..scoring.calibration import load_calibration

        calibration = check_offline_calibration(load_calibration(calibration))
        check_calibration_config(calibration, config)
        check_icl_loss_shift(calibration, shift)
    config = with_icl_loss(config, calibration)
    start = time.perf_counter()
    return ForecastSetup.create(model, tokenizer, sae, config), calibration, start


def forecast(model: nn.Module, tokenizer, sae: Any, train_data: Any, targets: Any,
             config: STSConfig | dict | None = None, *, demonstrations: Any = None,
             progress: bool = False, calibration: Any = None) -> Forecast:
    """Forecast how post-training on ``train_data`` moves each target domain (no training needed).

    Args:
        model: Hugging Face decoder-only model (plain or PEFT-wrapped).
        tokenizer: its tokenizer (chat template used for chat data), or a VLM's processor (its tokenizer and chat
            template are used).
        sae: a sae-lens SAE, folder, ``{"release", "sae_id"}``, or a module with ``encode``.
        train_data: texts, chat conversations, TRL-style records, a ``datasets.Dataset``, a pandas DataFrame,
            a data file (.jsonl / .json / .csv / .tsv / .parquet / .txt / .md) or a built-in domain's name.
        targets: dict name -> data, or list of registered domain names / paths.
        config: :class:`STSConfig` (or a dict of its fields).
        demonstrations: examples with answers to use as in-context demonstrations instead of ``train_data``.
        progress: show a progress bar.
        calibration: a :class:`~sts_callback.scoring.calibration.Calibration` (or its JSON path): the result then
            leads with each domain's predicted held-out NLL change, interval and gain / loss / flat label.
    """
    setup, calibration, start = prepare_forecast(model, tokenizer, sae, config, calibration)
    train = load_corpus(train_data, name="train")
    domains = load_domains(targets)
    demo_corpus = load_corpus(demonstrations, name="demonstrations") if demonstrations is not None else None
    result = run_forecast(setup, train, domains, demo_corpus, progress=progress, start=start).forecast
    return result.apply_calibration(calibration) if calibration is not None else result


@dataclass
class ForecastRun:
    """A forecast with the statistics behind it (kept by the callback for re-checks)."""

    forecast: Forecast
    shift: PairedStats
    domains: dict[str, Any]


@dataclass
class ShiftPass:
    """The training data's side of a forecast: the pass that measures which latents training will shift, and
    what the forecast records about it. ``run(extractor, reservoir)`` returns :class:`PairedStats` (or a subclass)
    whose ``latent_shift`` / ``residual_shift`` rank the latents and ``latents`` / ``residual`` are the training
    data's own activations; the reservoir's sequence indices refer to ``sources``."""

    kind: str  # Forecast.settings["shift"]: "in_context", "chosen_vs_rejected", "reward_weighted"
    run: Callable[[Extractor, "TopActivations | None"], PairedStats]
    sequences: int  # sequences this process forwards in the pass, its shard padding included (progress bar)
    forward_tokens: int
    tokens: int  # counted tokens (Forecast.shift_tokens)
    units: int  # what the shift averages over: queries, preference pairs, prompts (Forecast.shift_queries)
    sources: list[list[int]]
    nothing_moved: str | None = None  # the error when no latent moved (default: the in-context wording)
    # a latent counts as moved when its shift exceeds this share of the largest mean squared activation of the
    # training data (0: any positive shift; a contrast of different sequences sets it above float rounding noise)
    noise_floor: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # added to Forecast.settings


def run_forecast(setup: ForecastSetup, train: Corpus, domains: dict[str, Corpus], demo_corpus: Corpus | None = None,
                 *, progress: bool = False, start: float | None = None) -> ForecastRun:
    """The forecast on prepared inputs; returns the statistics too."""
    start = time.perf_counter() if start is None else start
    plan = plan_inputs(setup.builder, setup.config, train, domains, demo_corpus)
    shift_pairs = plan.shift_pairs
    require_at_least_world(len(shift_pairs), f"The training data's forecast sample ({train.name!r})",
                           "Give training data (or train_probe=) with at least one distinct text per process "
                           "(repeated texts are sampled once, so raising STSConfig.shift_tokens helps only where the "
                           "data has more distinct texts than were sampled), or run on fewer processes.")
    check_plan_agrees(setup, plan)
    shift = ShiftPass(
        kind="in_context",
        run=lambda extractor, reservoir: extractor.paired(shift_pairs, what=f"{train.name!r}", reservoir=reservoir),
        sequences=batched_shard_size(pass_lengths(shift_pairs), setup.config.batch_size),
        forward_tokens=sum(len(p.base) + len(p.context) for p in shift_pairs),
        tokens=plan.shift_tokens, units=len(shift_pairs), sources=[p.base for p in shift_pairs])
    run = forecast_with_shift(setup, shift, plan, progress=progress, start=start)
    if setup.config.icl_loss_tokens:
        t0 = time.perf_counter()
        changes, forward_tokens = in_context_loss(setup.model, setup.builder, setup.config, demo_corpus or train,
                                                  domains, setup.config.icl_loss_tokens, progress=progress)
        for name, change in changes.items():
            run.forecast.domains[name].scores[ICL_LOSS_FEATURE] = change
        run.forecast.timings[ICL_LOSS_FEATURE] = time.perf_counter() - t0
        run.forecast.timings["forward_tokens"] += forward_tokens
        run.forecast.timings["total"] = time.perf_counter() - start
    return run


def in_context_loss(model: nn.Module, builder: PromptBuilder, config: STSConfig, demonstrations: Corpus,
                    domains: dict[str, Corpus], tokens: int,
                    progress: bool = False) -> tuple[dict[str, float | None], int]:
    """Each domain's relative NLL change when ``config.n_demonstrations`` texts of ``demonstrations`` precede its
    texts (``tokens`` query tokens a domain, seeded per domain): the same query tokens with and without the context,
    full forwards with the LM head. Negative: the training data helps the domain in context. Every process runs
    its share of the batches and the sums are added, so any number of processes gives one process's numbers.
    ``None`` for a domain whose queries have no counted token. Also the tokens forwarded (every process's)."""
    pad = pad_token_id(builder.tokenizer)
    sequences, spans = [], {}
    for name, corpus in domains.items():
        rng = random.Random(f"{config.seed}:icl-loss:{name}")
        pairs, _ = build_shift_pairs(corpus, builder, config, rng, tokens, config.n_demonstrations,
                                     demonstrations=demonstrations, what=f"target domain {name!r}")
        start = len(sequences)
        for pair in pairs:  # counted: the query, the last tokens of both sequences
            sequences += [(pair.base, pair.counted), (pair.context, pair.counted)]
        spans[name] = (start, len(sequences))
    # whole batches per process (all_sequence_nll): the count is exact on one process, a running count on several
    bar = progress_bar(len(sequences) if world_size() == 1 else None, progress, "STS in-context loss")
    try:
        with inference_mode(model):
            sums = all_sequence_nll(model, sequences, pad, config.batch_size,
                                    on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    out: dict[str, float | None] = {}
    for name, (start, stop) in spans.items():
        alone, context = sums[start:stop:2].sum(0), sums[start + 1:stop:2].sum(0)
        if alone[1] == 0 or context[1] == 0 or alone[0] == 0:
            out[name] = None
            continue
        before = float(alone[0] / alone[1])
        out[name] = (float(context[0] / context[1]) - before) / before
    return out, sum(len(ids) for ids, _ in sequences)


def forecast_with_shift(setup: ForecastSetup, shift: ShiftPass, plan: Plan, *, progress: bool = False,
                        start: float | None = None) -> ForecastRun:
    """Run ``shift``'s pass and the target domains' of ``plan`` under one progress bar, then score (the inputs'
    agreement across ranks is the caller's to check first)."""
    start = time.perf_counter() if start is None else start
    model, config, builder = setup.model, setup.config, setup.builder
    domain_inputs = plan.domains
    prepare_seconds = time.perf_counter() - start

    forward_tokens = shift.forward_tokens
    for d in domain_inputs.values():
        forward_tokens += (sum(len(p.base) + len(p.context) for p in d.pairs) if d.pairs is not None
                           else sum(len(ids) for ids, _ in d.singles))
    total_sequences = shift.sequences + sum(batched_shard_size(pass_lengths(d.pairs or d.singles), config.batch_size)
                                            for d in domain_inputs.values())
    bar = progress_bar(total_sequences, progress)
    extractor = setup.extractor(on_batch=bar.update if bar is not None else None)
    timings = {"prepare": prepare_seconds}
    keep = config.top_contexts
    # the training set's contexts under a key no domain can have ("" is refused as a name): a domain may be "train"
    reservoirs = ({source: TopActivations(setup.sae.d_sae, keep) for source in [TRAIN_KEY, *domain_inputs]}
                  if keep else {})
    try:
        with inference_mode(model):
            t0 = time.perf_counter()
            if bar is not None:
                bar.set_description("shift (train data)")
            extractor.track_fit(True)  # how well the SAE reads the training data, on the rows it encodes anyway
            shift_stats: PairedStats = shift.run(extractor, reservoirs.get(TRAIN_KEY))
            fit_sums = extractor.fit
            extractor.track_fit(False)
            timings["shift"] = time.perf_counter() - t0
            domain_stats = {}
            for name, d in domain_inputs.items():
                t0 = time.perf_counter()
                if bar is not None:
                    bar.set_description(f"domain {shown_name(name)}")
                domain_stats[name] = d.statistics(extractor, name, reservoirs.get(name))
                timings[f"domain/{name}"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    timings["forward_tokens"] = float(forward_tokens)
    fit = fit_from_sums(sum_across_ranks(fit_sums)) if fit_sums is not None else None
    if setup.check_fit and (message := poor_fit_message(fit, "the training data")):
        warn_on_main(message, STSDataWarning, stacklevel=3)
    result = assemble_forecast(setup, shift_stats, plan, domain_stats, timings, extractor.capture.truncate, shift=shift)
    if fit is not None:
        result.settings["sae_fit"] = fit
    if reservoirs:
        sources = {TRAIN_KEY: shift.sources}
        for name, d in domain_inputs.items():
            sources[name] = [p.base for p in d.pairs] if d.pairs is not None else [ids for ids, _ in d.singles]
        result.latent_contexts = latent_contexts(builder.tokenizer, result.shifted_latents, reservoirs, sources)
    result.timings["total"] = time.perf_counter() - start
    return ForecastRun(forecast=result, shift=shift_stats, domains=domain_stats)


def assemble_forecast(setup: ForecastSetup, shift_stats: PairedStats, plan: Plan, domain_stats: dict[str, Any],
                      timings: dict[str, float], truncated: bool, *, shift: ShiftPass | None = None) -> Forecast:
    """Score every domain on the shifted latents of ``shift_stats`` (pure; no model call). ``shift`` describes a
    training-data side other than the in-context one of ``plan.shift_pairs``."""
    config = setup.config
    latents, values = score.shifted_latents(shift_stats.latent_shift, config.n_shifted)
    if not torch.isfinite(values).all():
        raise STSNumericalError("The in-context shift of the SAE latents is not finite (NaN/inf): the SAE or the "
                                "model produced non-finite values; check the SAE weights and the model's dtype.")
    floor = shift.noise_floor * float(shift_stats.latents.mean_sq().max()) if shift is not None else 0.0
    moved = int((values > floor).sum())
    if moved == 0:
        raise STSNumericalError((shift.nothing_moved if shift is not None and shift.nothing_moved else None) or (
            "The training data's in-context demonstrations moved no SAE latent (every shift is "
            "0), so there is nothing to forecast: check that the demonstrations reach the "
            "model (STSConfig.max_query_tokens vs the model's context) and that the SAE is "
            "for this model and layer."))
    if moved < len(latents):
        how = "in context" if shift is None or shift.kind == "in_context" else f"({shift.kind} shift)"
        fired = shift_stats.latents.mean_sq() > 0
        active = int(fired.sum())
        why = (f"only {active} of the SAE's {fired.numel()} latents fire on the training data at all, so more "
               "tokens will not move more: most of this SAE is dead here, or it is not for this model and layer"
               if active < config.n_shifted else "Raise STSConfig.shift_tokens for a fuller picture")
        warn_on_main(f"Only {moved} SAE latents moved {how} (n_shifted={config.n_shifted}); the forecast uses "
                     f"those alone. {why[:1].upper() + why[1:]}.", STSDataWarning, stacklevel=3)
        latents, values = latents[:moved], values[:moved]
    raw_dims, raw_values = score.shifted_latents(shift_stats.residual_shift, min(config.n_shifted, setup.sae.d_in))
    signed_features = signed.signed_scores(
        shift_stats.latent_shift, shift_stats.latents,
        {name: (stats.latents, stats.residual) for name, stats in domain_stats.items()}, latents,
        setup.sae.decoder_weight())
    results = {}
    for name, stats in domain_stats.items():
        paired = isinstance(stats, PairedStats)
        results[name] = DomainForecast(name=name, texts=plan.domains[name].texts, tokens=plan.domains[name].tokens,
                                       scores={
            "sts_icl": score.sts_icl(stats.latent_shift, latents) if paired else None,
            "sts_act": score.sts_act(stats.latents, latents),
            "sts_sq": score.sts_sq(stats.latents, latents),
            "raw_icl": score.sts_icl(stats.residual_shift, raw_dims) if paired else None,
            "raw_act": score.sts_act(stats.residual, raw_dims),
            "raw_sq": score.sts_sq(stats.residual, raw_dims),
            **signed_features[name],
        })
    not_finite = sorted(name for name, d in results.items()
                        if any(v is not None and not math.isfinite(v) for v in d.scores.values()))
    if not_finite:
        raise STSNumericalError(f"Scores of {not_finite} are not finite (NaN/inf): their activations overflowed or "
                                "the SAE holds non-finite weights; check the SAE and run the model in float32.")
    ranking = config.ranking
    if ranking in ("sts_icl", "raw_icl") and results and all(d.scores.get(ranking) is None for d in results.values()):
        # no target has a text that answers (prompt-only eval sets, user-only chats): no in-context domain score
        ranking = ranking.replace("_icl", "_act")
        warn_on_main(f"No target domain has texts with answers to demonstrate (prompt-only or user-only chats), so "
                     f"{SCORE_LABELS[config.ranking]} is computed for none: ranked by {SCORE_LABELS[ranking]}. Give "
                     "targets with answers (completions, assistant turns or plain text) for the in-context score.",
                     STSDataWarning, stacklevel=3)
    base_model = unwrap_model(setup.model)
    return Forecast(
        domains=results,
        shifted_latents=latents.tolist(),
        shift_values=values.tolist(),
        shift_direction=shift_stats.latent_shift.mean_diff().cpu()[latents].tolist(),
        raw_shifted_dims=raw_dims.tolist(),
        raw_shift_values=raw_values.tolist(),
        shift_tokens=shift.tokens if shift is not None else plan.shift_tokens,
        shift_queries=shift.units if shift is not None else len(plan.shift_pairs),
        ranking=ranking,
        timings=dict(timings),
        settings={
            "config": config.to_dict(),
            "sae": setup.sae.describe(),
            "layer": setup.layer,
            "model": getattr(base_model.config, "_name_or_path", "") or type(base_model).__name__,
            "model_class": type(base_model).__name__,
            "truncated_forward": truncated,
            "shift": shift.kind if shift is not None else "in_context",
            **(shift.settings if shift is not None else {}),
        },
    )


CONTEXT_TOKENS = 8
TRAIN_KEY = ""  # the training set's contexts among the domains' (shown as "train")


def latent_contexts(tokenizer, latents: list[int], reservoirs: dict[str, TopActivations],
                    sources: dict[str, list[list[int]]]) -> dict[str, list[dict[str, Any]]]:
    """Top-activating contexts of each latent: a few tokens either side, the activating token apart."""
    out: dict[str, list[dict[str, Any]]] = {}
    for latent in latents:
        entries = []
        for source, reservoir in reservoirs.items():
            for value, sequence, position in reservoir.top(latent):
                ids = sources[source][sequence]
                entries.append({
                    "source": "train" if source == TRAIN_KEY else source, "value": value,
                    "before": tokenizer.decode(ids[max(0, position - CONTEXT_TOKENS): position], skip_special_tokens=True),
                    "token": tokenizer.decode(ids[position: position + 1], skip_special_tokens=False),
                    "after": tokenizer.decode(ids[position + 1: position + 1 + CONTEXT_TOKENS], skip_special_tokens=True),
                })
        out[str(latent)] = entries
    return out


def domain_statistics(setup: ForecastSetup, domains: dict[str, Corpus]) -> dict[str, Any]:
    """Base statistics of each domain without a forecast (when the training data has no demonstrations)."""
    extractor = setup.extractor()
    inputs = plan_domains(setup.builder, setup.config, domains, icl=False)
    with inference_mode(setup.model):
        return {name: d.statistics(extractor, name) for name, d in inputs.items()}


def batched_shard_size(lengths: Sequence[int], batch_size: int) -> int:
    """How many sequences of a pass (of these lengths) this process forwards when the pass is split by whole
    batches (:meth:`~sts_callback.core.extract.Extractor.share_batches`), padding included."""
    return len(lengths) if world_size() == 1 else len(whole_batch_share(lengths, batch_size)[0].indices)


def pass_lengths(items: Sequence[Any]) -> list[int]:
    """The lengths a pass batches its items by: a pair's sequence with context, a single sequence's ids."""
    return [len(item.context) if isinstance(item, TokenPair) else len(item[0]) for item in items]


def progress_bar(total: int | None, enabled: bool, desc: str = "STS forecast"):
    """A tqdm bar over ``total``, the main process's own count of sequences, or None (disabled, or another rank)."""
    if not enabled or not is_main_process():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc=desc)
