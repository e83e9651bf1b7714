"""Gating data mixtures before training: ``gate_mixture()`` and ``filter_examples()``.

Given candidate training sets, the target domains and the *protected* domains among them, the gate

1. forecasts every candidate over all target domains. The target domains are encoded **once**: one
   :class:`~sts_callback.pipelines.forecast.Setup`, one :class:`~sts_callback.core.extract.Extractor`, one pass over each
   domain's sampled texts; then per candidate only its shift pass (queries with / without demonstrations)
   and the pure :func:`~sts_callback.pipelines.forecast.assemble_forecast`. Each candidate's forecast is the one
   :func:`~sts_callback.pipelines.forecast.forecast` would return for it alone (same seed, same samples);
2. accepts or rejects each candidate against limits on the protected domains, with the reason;
3. weights the accepted candidates (weights sum to 1);
4. scores every example of every candidate by its own contribution to the shift on the latents that drive
   the protected domains' scores, so that the worst examples can be dropped (:func:`filter_examples`).

Decisions made here (see the README, "What is computed", for the method); every rule is a field of
:class:`GateRules`, passed as ``gate_mixture(..., rules=GateRules(...))`` or a dict of its fields:

- **Gating score.** Default: the config's ``ranking`` (``sts_icl`` by default, the paper's headline score).
  ``sts_icl`` has a known answer for a candidate that is a copy of a protected domain's texts: its shifted
  latents D_N are the latents that the domain's *own* in-context shift moves most, so the domain's STS_icl
  under that candidate is (up to sampling) the largest any D_N can give. On random tiny models STS_act does
  not separate such a copy from other candidates (checked empirically; it depends on which latents fire
  anywhere); on real models either can be chosen with ``GateRules.score``.
- **Limits.** ``limits={"legal": 1.5e7}`` rejects a candidate whose score of that protected domain exceeds
  the absolute value (a single float applies to every protected domain). The value is on the gated score's own
  scale, which depends on the model, SAE and data (STS_icl of Gemma 3 270M's built-in domains with the demo SAE is
  1e6 to 1e7; a tiny test model's ~1e-3): read the candidates' scores first; a limit more than 100x below all of them
  is warned about. ``max_rank=k`` rejects a
  candidate when a protected domain ranks among the top ``k`` of the candidate's own forecast. With neither
  (nor ``tolerance``) the default relative rule applies: reject when a protected domain's score exceeds
  ``tolerance`` (default :data:`DEFAULT_TOLERANCE` = 1.5; also for a protected domain that ``limits`` leaves
  out when neither ``max_rank`` nor ``tolerance`` is given) times the median of that domain's score over the
  *other* candidates (leave-one-out, so that one offender cannot raise its own bar; with a single candidate
  the relative rule has nothing to compare to and accepts, saying so). Rules given together all apply.
  When every candidate is rejected :class:`MixtureRejected` (an :class:`STSConfigError`) is raised with
  every reason and the decision attached, never an empty mixture.
- **Weights.** ``weights="sts"`` (default) is the paper's balancing rule ("extra data split in
  proportion to STS"): each accepted candidate *serves* a target domain (``wanted={candidate: domain}``;
  default: the non-protected target domain its own forecast moves most). A served domain's share of the
  mixture is proportional to the pressure the *rest* of the mixture puts on it (the mean score of that
  domain under the other accepted candidates): the domain the other data is predicted to move most gets the
  most data of its own, as the paper split its 220 extra engineering + law examples. Candidates serving the
  same domain split its share equally; one accepted candidate gets weight 1; zero pressure everywhere gives
  equal shares. ``weights="min_impact"`` instead minimises the predicted impact on the protected domains,
  ``sum_i w_i * impact_i`` with ``impact_i = sum_p score_i(p) / max_k score_k(p)`` (each protected domain
  normalised over the accepted candidates so that domains are comparable), subject to ``sum w = 1`` and each
  served domain's share >= ``floor`` (a linear program, ``scipy.optimize.linprog``, HiGHS).
- **Budget.** ``budget`` (a number of examples, as the paper's 220) is split by the weights into integer
  counts (largest remainder, ties by name) in :attr:`GateDecision.allocation`.
- **Per-example scores.** For candidate c, protected domain p and example e (paired with demonstrations
  sampled from c, as in the shift pass, from a seed per candidate)::

      score_p(e) = mean over e's counted tokens of  sum_{j in D_N(c)} a_p(j) * (h_j(demos + e) - h_j(e))^2

  where ``a_p(j)`` is latent j's share of p's score over all latents (for STS_icl: p's own mean squared
  in-context shift of j; for STS_act / STS_sq: p's mean activation / mean squared activation of j),
  normalised to sum 1 over *all* latents so that the scores are comparable across candidates and domains.
  The token-weighted mean of ``score_p`` over c's examples is the D_N shift weighted by how much p uses each
  latent. ``score(e)`` (used for filtering by default) is the sum over protected domains. Streaming: only
  one batch's latents exist at a time; per example only P numbers are kept.
- **Preference candidates.** A candidate of ``prompt`` / ``chosen`` / ``rejected`` records (DPO data) is
  forecast with the chosen-minus-rejected shift, as :func:`~sts_callback.pipelines.preference.preference_forecast`
  (and the callback under a DPO trainer) forecasts it, not as SFT on its chosen answers; each pair's score is its
  own term of that shift: ``sum_{j in D_N(c)} a_p(j) * (m_j(chosen) - m_j(rejected))^2``, m the mean latent over
  the completion's tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.atomic import atomic_write_json, atomic_write_text, check_format, read_json
from ..core.config import SCORE_VARIANTS, STSConfig, settings_from_dict
from ..core.data import (AllBut, Corpus, example_text, has_two_demonstrations, load_corpus, load_domains,
                         named_items, repeated_names)
from ..core.distributed import is_main_process, warn_on_main
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.extract import Extractor, PairedStats
from ..core.formatting import data_value, json_safe
from .forecast import (SCORE_LABELS, Forecast, Plan, ForecastSetup, ShiftPass, assemble_forecast, build_shift_pairs,
                       batched_shard_size, demonstrable_rows, display_width, inference_mode, padded, pass_lengths,
                       plan_domains, progress_bar, shown_name)
from .preference import Truncation, preference_pass, tokenize_preference
from .shifts import is_preference_data, preference_truncation

DEFAULT_TOLERANCE = 1.5
WEIGHT_RULES = ("sts", "min_impact")
GATED_SCORES = tuple(v for v in SCORE_VARIANTS if not v.startswith("raw_"))  # a gate needs latents
WORST_SHOWN = 5
PREVIEW_CHARS = 160


@dataclass
class GateRules:
    """The gate's policy: which score it gates on, what rejects a candidate, how the rest are weighted.

    Checked when built; also the rule keys of an ``sts gate`` config file (``GateRules.from_dict``). See the
    module docstring for each rule. Rules given together all apply; with none of ``limits``, ``max_rank`` and
    ``tolerance`` the relative rule with :data:`DEFAULT_TOLERANCE` applies.

    Args:
        score: the score variant gated on (an STS score; default ``None``: the forecast config's ``ranking``).
        limits: absolute score limits per protected domain (a dict), or one number for every protected domain,
            on the gated score's scale (the model's and SAE's: read the candidates' scores first).
        max_rank: reject when a protected domain ranks within the top ``max_rank`` domains of a candidate.
        tolerance: reject when a protected domain's score exceeds ``tolerance`` x the median of the other
            candidates' scores of it.
        weights: ``"sts"`` (the paper's balancing rule) or ``"min_impact"`` (linear program).
        wanted: candidate -> the target domain it is meant to serve (default: inferred).
        floor: with ``min_impact``, the smallest share of each served domain.
    """

    score: str | None = None
    limits: dict[str, float] | float | None = None
    max_rank: int | None = None
    tolerance: float | None = None
    weights: str = "sts"
    wanted: dict[str, str] | None = None
    floor: float = 0.1

    def __post_init__(self) -> None:
        if self.score is not None and self.score not in GATED_SCORES:
            what = ("is a residual baseline without latents" if self.score in SCORE_VARIANTS
                    else "is not a score variant")
            raise STSConfigError(f"GateRules.score={self.score!r} {what}; gate on an STS score, one of {GATED_SCORES} "
                                 "(None: the config's ranking).")
        if self.weights not in WEIGHT_RULES:
            raise STSConfigError(f"GateRules.weights={self.weights!r}: use one of {WEIGHT_RULES}.")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 <= self.floor < 1:
            raise STSConfigError(f"GateRules.floor={self.floor!r} must be in [0, 1); it is the smallest share of "
                                 "each served domain (e.g. 0.1).")
        self.floor = float(self.floor)
        if self.max_rank is not None and (isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int)
                                          or self.max_rank < 1):
            raise STSConfigError(f"GateRules.max_rank={self.max_rank!r} must be a positive integer (top-k ranks that "
                                 "reject), or None.")
        if self.tolerance is not None:
            if not _number(self.tolerance) or not self.tolerance > 0:
                raise STSConfigError(f"GateRules.tolerance={self.tolerance!r} must be a positive number (e.g. 1.5), "
                                     "or None.")
            self.tolerance = float(self.tolerance)
        if self.limits is not None:
            if _number(self.limits):
                self.limits = float(self.limits)
            elif isinstance(self.limits, dict) and all(_number(v) for v in self.limits.values()):
                self.limits = {k: float(v) for k, v in
                               named_items(self.limits, "GateRules.limits", STSConfigError).items()}
            else:
                raise STSConfigError(f"GateRules.limits={self.limits!r} must be a number or a dict protected domain "
                                     "-> limit on the gated score's scale (e.g. {'legal': 1.5e7}), or None.")
        if self.wanted is not None:
            if not isinstance(self.wanted, dict) or not all(isinstance(v, str) for v in self.wanted.values()):
                raise STSConfigError(f"GateRules.wanted={self.wanted!r} must be a dict candidate -> target domain "
                                     "(e.g. {'code': 'python_code'}), or None.")
            self.wanted = named_items(self.wanted, "GateRules.wanted", STSConfigError)

    @property
    def relative_tolerance(self) -> float | None:
        """The relative rule's factor in force: ``tolerance``, or :data:`DEFAULT_TOLERANCE` when no rule is given."""
        if self.tolerance is None and self.limits is None and self.max_rank is None:
            return DEFAULT_TOLERANCE
        return self.tolerance

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> GateRules:
        return settings_from_dict(cls, values, "gate rule(s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MixtureRejected(STSConfigError):
    """Every candidate was rejected; ``decision`` holds the forecasts and the reasons."""

    def __init__(self, message: str, decision: "GateDecision"):
        super().__init__(message)
        self.decision = decision

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its decision (a process pool sends it back)
        return type(self), (str(self), self.decision)


@dataclass
class CandidateDecision:
    """Accept / reject of one candidate, the reason, and its scores of the protected domains."""

    name: str
    accepted: bool
    reason: str
    serves: str | None
    protected_scores: dict[str, float]
    protected_ranks: dict[str, int]
    examples: int


@dataclass
class ExampleScores:
    """Per-example scores of one candidate (see the module docstring for the formula).

    ``scores[p][i]`` is example i's score on protected domain p; ``total[i]`` their sum; ``tokens[i]`` its
    counted query tokens (a preference pair's: its chosen and rejected completion tokens; 0: nothing counted,
    score 0). ``worst`` lists the highest-scoring examples; ``digests[i]`` is example i's content digest
    (:func:`example_digests`), so that data given again is checked to be the data scored.
    """

    candidate: str
    tokens: list[int]
    scores: dict[str, list[float]]
    total: list[float]
    worst: list[dict[str, Any]] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # empty in a gate.json of an older version

    def __len__(self) -> int:
        return len(self.total)

    def mean(self, domain: str | None = None) -> float:
        """Token-weighted mean score (of ``domain``, else of the total)."""
        values = self.total if domain is None else self.scores[domain]
        weight = sum(self.tokens)
        return sum(v * t for v, t in zip(values, self.tokens)) / weight if weight else 0.0


@dataclass(repr=False)
class GateDecision:
    """The result of :func:`gate_mixture` (``print()`` it, or end a notebook cell with it, for the table).

    Attributes:
        candidates: per-candidate decision (accepted, reason, served domain, protected scores and ranks).
        forecasts: per-candidate :class:`Forecast` over all target domains.
        weights: mixture weight of each accepted candidate (sum 1); rejected candidates are absent.
        allocation: ``budget`` split into example counts by the weights (``None`` without a budget).
        example_scores: per-candidate :class:`ExampleScores` (empty when ``score_examples=False``).
        forward_calls: model forwards per stage: ``domains`` (once for all candidates), ``shift/<name>``,
            ``examples/<name>``.
    """

    candidates: dict[str, CandidateDecision]
    forecasts: dict[str, Forecast]
    weights: dict[str, float]
    protected: list[str]
    targets: list[str]
    score: str
    rules: dict[str, Any]
    weight_rule: str
    allocation: dict[str, int] | None = None
    example_scores: dict[str, ExampleScores] = field(default_factory=dict)
    forward_calls: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _data: dict[str, Corpus] = field(default_factory=dict, repr=False, compare=False)

    @property
    def accepted(self) -> list[str]:
        return [n for n, d in self.candidates.items() if d.accepted]

    @property
    def in_mixture(self) -> list[str]:
        """The accepted candidates the weights give a share (``weights="min_impact"`` can give one none)."""
        return [n for n in self.accepted if self.weights.get(n, 0.0) > 1e-9]

    @property
    def rejected(self) -> list[str]:
        return [n for n, d in self.candidates.items() if not d.accepted]

    def to_dict(self) -> dict[str, Any]:
        """A copy as plain data (editing it leaves the decision as it is)."""
        return copy.deepcopy({
            "format": "sts-gate/1",
            "candidates": {n: asdict(d) for n, d in self.candidates.items()},
            "forecasts": {n: f.to_dict() for n, f in self.forecasts.items()},
            "weights": self.weights,
            "protected": self.protected,
            "targets": self.targets,
            "score": self.score,
            "rules": self.rules,
            "weight_rule": self.weight_rule,
            "allocation": self.allocation,
            "example_scores": {n: asdict(s) for n, s in self.example_scores.items()},
            "forward_calls": self.forward_calls,
            "timings": self.timings,
            "notes": self.notes,
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateDecision":
        check_format(data, "sts-gate/1", "an STS gate decision", "gate.json")
        fields_ = {k: v for k, v in data.items()
                   if k not in ("format", "candidates", "forecasts", "example_scores")}
        return cls(candidates={n: CandidateDecision(**d) for n, d in data["candidates"].items()},
                   forecasts={n: Forecast.from_dict(f) for n, f in data["forecasts"].items()},
                   example_scores={n: ExampleScores(**s) for n, s in data.get("example_scores", {}).items()},
                   **fields_)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, json_safe(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "GateDecision":
        return cls.from_dict(read_json(path, "the gate decision"))

    def table(self) -> str:
        label = SCORE_LABELS[self.score]
        n_targets = len(self.targets)
        width = max([len("candidate")] + [display_width(shown_name(n)) for n in self.candidates])
        serves_w = max([len("serves")] + [display_width(shown_name(d.serves or "-")) for d in self.candidates.values()])
        cells = [f"{label}({shown_name(p)}) rank" for p in self.protected]
        cell_w = max(display_width(c) for c in cells)
        header = (f"{'candidate':<{width}}  {'decision':<8}  {'weight':>6}  {'serves':<{serves_w}}  "
                  + "  ".join(" " * (cell_w - display_width(c)) + c for c in cells)
                  + ("  worst ex." if self.example_scores else ""))
        count = len(self.candidates)
        lines = [f"STS mixture gate: {count} candidate{'s' * (count != 1)}, {n_targets} target "
                 f"domain{'s' * (n_targets != 1)}, protected "
                 f"{', '.join(map(shown_name, self.protected))}; gated on {label}, weights by {self.weight_rule!r}",
                 header, "-" * display_width(header)]
        for name, d in self.candidates.items():
            weight = f"{self.weights[name]:.3f}" if name in self.weights else "-"
            row = (f"{padded(name, width)}  {'accept' if d.accepted else 'REJECT':<8}  {weight:>6}  "
                   f"{padded(d.serves or '-', serves_w)}  "
                   + "  ".join(f"{f'{d.protected_scores[p]:.4g} {d.protected_ranks[p]}/{n_targets}':>{cell_w}}"
                               for p in self.protected))
            scores = self.example_scores.get(name)
            if scores is not None and len(scores):
                row += f"  {max(scores.total):.3g}"
            lines.append(row)
        lines.append("")
        lines.extend(f"{shown_name(name)}: {d.reason}" for name, d in self.candidates.items())
        if self.allocation is not None:
            lines.append("")
            lines.append("allocation of the budget: " + ", ".join(f"{n} {c}" for n, c in self.allocation.items()))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"<GateDecision: {len(self.candidates)} candidates, accepted {self.accepted}, protected "
                f"{self.protected}; print() it for the table>")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter: the table
        printer.text(repr(self) if cycle else self.table())


class Filtered(NamedTuple):
    """What :func:`filter_examples` keeps: the original records, their scores, their indices."""

    examples: list[Any]
    scores: list[float]
    indices: list[int]


# --------------------------------------------------------------------------------------------- the gate


def gate_mixture(model: nn.Module, tokenizer, sae: Any, candidates: dict[str, Any], targets: Any,
                 protected: str | list[str], rules: GateRules | dict | None = None, *, budget: int | None = None,
                 config: STSConfig | dict | None = None, score_examples: bool = True,
                 progress: bool = False) -> GateDecision:
    """Forecast, gate and weight candidate training sets before training (see the module docstring).

    Args:
        model, tokenizer, sae: as for :func:`~sts_callback.pipelines.forecast.forecast`.
        candidates: name -> training set (any input kind the forecast accepts: texts, chat conversations,
            TRL records, a ``datasets.Dataset``, a JSONL path, a registered domain name).
        targets: the target domains (dict name -> data, or a list of names / paths).
        protected: the target domain(s) whose predicted change limits the mixture.
        rules: :class:`GateRules` (or a dict of its fields): the gated score, the rejection rules (``limits``,
            ``max_rank``, ``tolerance``), the weight rule and its ``floor``, ``wanted``. ``None``: the defaults
            (the relative rule, the paper's weights).
        budget: number of examples to split by the weights (``GateDecision.allocation``); ``None``: none.
        config: :class:`STSConfig` (or a dict of its fields) shared by all forecasts.
        score_examples: also score every example of every candidate (one more pass per candidate).
        progress: show a progress bar.

    Raises:
        STSInputError: an empty candidate, a protected / wanted domain not among the targets, ...
        STSConfigError: unusable rules or weights; :class:`MixtureRejected` when every candidate is rejected.
    """
    start = time.perf_counter()
    config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    if not isinstance(rules, (GateRules, dict, type(None))):
        raise STSConfigError(f"rules must be a GateRules, a dict of its fields or None, got {rules!r}; the budget "
                             "is a keyword: gate_mixture(..., budget=220).")
    rules = rules if isinstance(rules, GateRules) else GateRules.from_dict(rules)
    score = gated_score(rules, config)
    budget = check_budget(budget)
    if not isinstance(candidates, dict) or not candidates:
        raise STSInputError("candidates must be a non-empty dict of name -> training set; give at least one.")
    corpora = load_candidates(candidates)
    domains = load_domains(targets)
    protected, limit_map, wanted = check_gate_names(list(corpora), list(domains), protected, rules)
    digests = {name: example_digests(corpus) for name, corpus in corpora.items()}
    copies = _same_examples(digests)
    unscored = check_scorable_domains(domains, protected, wanted, score, rules.weights, len(corpora))
    tolerance = rules.relative_tolerance

    setup = ForecastSetup.create(model, tokenizer, sae, config)
    # Domain sampling is seeded per domain and independent of the training set: one plan serves all.
    domain_plan = plan_domains(setup.builder, config, domains)
    plans: dict[str, Plan] = {}
    passes: dict[str, ShiftPass] = {}  # the candidates whose shift is not in context: preference pairs
    dpo_cut = preference_truncation(None)  # as DPOTrainer cuts pairs by default
    for name, corpus in corpora.items():
        if is_preference_data(corpus):  # DPO pairs: chosen minus rejected, as preference_forecast samples them
            _, passes[name] = preference_pass(setup.builder, config, corpus, name, truncation=dpo_cut)
            plans[name] = Plan(shift_pairs=[], shift_tokens=passes[name].tokens, domains=domain_plan)
            continue
        rng = random.Random(config.seed)  # exactly as plan_inputs samples the shift pairs
        pairs, tokens = build_shift_pairs(corpus, setup.builder, config, rng, config.shift_tokens,
                                          config.n_demonstrations, what=f"candidate {name!r}",
                                          takes_demonstrations=False)
        plans[name] = Plan(shift_pairs=pairs, shift_tokens=tokens, domains=domain_plan)
    mixed = None
    if passes and len(passes) < len(corpora):  # two shifts on their own scales: compared as one, they mislead
        mixed = (f"Candidates {sorted(passes)} are preference pairs (their chosen-minus-rejected shift) and "
                 f"{sorted(set(corpora) - set(passes))} SFT data (the in-context shift): the two scores are on "
                 "different scales, so the relative rule, max_rank and the weights compare unlike things. Gate "
                 "each kind in its own call.")
        warn_on_main(mixed, STSDataWarning, stacklevel=2)
    timings: dict[str, float] = {"prepare": time.perf_counter() - start}

    # the main process's own count: each pass forwards its shard, but every rank scores all the examples
    size = config.batch_size
    scored = sum(len(c) * (2 if n in passes else 1) for n, c in corpora.items()) if score_examples else 0
    total = (sum(batched_shard_size(pass_lengths(d.pairs or d.singles), size) for d in domain_plan.values())
             + sum(passes[n].sequences if n in passes else batched_shard_size(pass_lengths(p.shift_pairs), size)
                   for n, p in plans.items())
             + scored)
    if progress and scored and is_main_process():  # every example of every candidate: most of the work, optional
        print(f"STS gate: {total} steps of work, {scored} of them the per-example scores (every example of every "
              "candidate: what filter_examples ranks by; score_examples=False / --no-example-scores skips them)",
              file=sys.stderr)
    bar = progress_bar(total, progress, desc="STS gate")
    extractor = setup.extractor(on_batch=bar.update if bar is not None else None)
    calls: dict[str, int] = {}
    forecasts: dict[str, Forecast] = {}
    example_scores: dict[str, ExampleScores] = {}
    try:
        with inference_mode(setup.model):
            t0, before = time.perf_counter(), extractor.capture.forward_calls
            domain_stats: dict[str, Any] = {}
            for dname, d in domain_plan.items():
                if bar is not None:
                    bar.set_description(f"domain {dname}")
                domain_stats[dname] = d.statistics(extractor, dname)
            timings["domains"] = time.perf_counter() - t0
            calls["domains"] = extractor.capture.forward_calls - before
            for name, corpus in corpora.items():
                t0, before = time.perf_counter(), extractor.capture.forward_calls
                if bar is not None:
                    bar.set_description(f"shift {name}")
                shift: PairedStats = (passes[name].run(extractor, None) if name in passes else
                                      extractor.paired(plans[name].shift_pairs, what=f"candidate {name!r}"))
                calls[f"shift/{name}"] = extractor.capture.forward_calls - before
                result = assemble_forecast(setup, shift, plans[name], domain_stats,
                                           {"shift": time.perf_counter() - t0}, extractor.capture.truncate,
                                           shift=passes.get(name))
                result.settings["candidate"] = name
                forecasts[name] = result
                timings[f"shift/{name}"] = time.perf_counter() - t0
                if score_examples:
                    t0, before = time.perf_counter(), extractor.capture.forward_calls
                    if bar is not None:
                        bar.set_description(f"examples {name}")
                    weights_matrix = _latent_weights(domain_stats, protected, score, result.shifted_latents)
                    if name in passes:
                        example_scores[name] = _score_pairs(extractor, setup, corpus, name, result.shifted_latents,
                                                            weights_matrix, protected, dpo_cut)
                    else:
                        example_scores[name] = _score_examples(extractor, setup, corpus, name,
                                                               result.shifted_latents, weights_matrix, protected)
                    example_scores[name].digests = digests[name]
                    calls[f"examples/{name}"] = extractor.capture.forward_calls - before
                    timings[f"examples/{name}"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()

    decisions = _decide(forecasts, corpora, protected, score, limit_map, rules.max_rank, tolerance, wanted,
                        unscored, copies)
    decision = GateDecision(candidates=decisions, forecasts=forecasts, weights={}, protected=protected,
                            targets=list(domains), score=score,
                            rules={"limits": limit_map, "max_rank": rules.max_rank, "tolerance": tolerance,
                                   # the relative rule's factor each protected domain was judged with (None: none)
                                   "tolerance_by_domain": {p: _domain_tolerance(p, tolerance, limit_map, rules.max_rank)
                                                           for p in protected},
                                   # the rest of what decided the weights: the decision can be audited and redone
                                   "wanted": dict(wanted), "floor": rules.floor, "budget": budget},
                            weight_rule=rules.weights,
                            example_scores=example_scores, forward_calls=calls, timings=timings, _data=corpora)
    if mixed:
        decision.notes.append(mixed)
    for group in {tuple(sorted([name, *same])) for name, same in copies.items() if same}:
        alike = (f"Candidates {list(group)} hold the same examples: the relative rule compares each candidate with "
                 "the other, distinct ones (copies would raise each other's bar), and the weights count each. Drop "
                 "the copies; for overlapping sets that are not copies, bound the protected domains with limits or "
                 "max_rank, which do not depend on the other candidates.")
        warn_on_main(alike, STSDataWarning, stacklevel=2)
        decision.notes.append(alike)
    for p, limit in limit_map.items():  # the gated score's scale is the model's and SAE's: an example's 0.5 rejects all
        lowest = min(f.score(p, score) for f in forecasts.values())
        if limit > 0 and lowest > 100 * limit:
            scale = (f"limits[{p!r}]={limit:g} is below every candidate's {SCORE_LABELS[score]}({p}) (lowest "
                     f"{lowest:.4g}) by more than 100x: limits are on the gated score's own scale, which depends on "
                     "the model, the SAE and the data; read the candidates' scores in the table or gate.json and set "
                     "the limit among them, or use the relative rule (tolerance) or max_rank.")
            warn_on_main(scale, STSDataWarning, stacklevel=2)
            decision.notes.append(scale)
    unserved = [name for name, d in decisions.items() if d.serves is None]
    if unserved:  # every target protected, or (min_impact) every unprotected one unscored: nothing to serve
        why = (f"Every target domain is protected ({protected})" if all(p in protected for p in domains) else
               f"Every unprotected target domain ({sorted(set(domains) - set(protected))}) has one text and no "
               f"{SCORE_LABELS[score]}")
        nothing = (f"{why}: candidate(s) {unserved} serve no domain, so the weights "
                   + ("are equal shares" if rules.weights == "sts" else "hold no floor for them") + "; add the "
                   "domains the mixture is meant to improve to the targets, unprotected and with texts, or name "
                   "each candidate's domain in wanted.")
        warn_on_main(nothing, STSDataWarning, stacklevel=2)
        decision.notes.append(nothing)
    accepted = decision.accepted
    if not accepted:
        decision.timings["total"] = time.perf_counter() - start
        reasons = "; ".join(f"{n}: {d.reason}" for n, d in decisions.items())
        raise MixtureRejected(
            f"Every candidate was rejected, so there is no mixture ({reasons}). Relax the rules (raise `limits` "
            f"or `tolerance`, lower `max_rank`), protect fewer domains, or add other candidates.", decision)
    decision.weights = (_sts_weights(decision, accepted) if rules.weights == "sts"
                        else _min_impact_weights(decision, accepted, rules.floor))
    unused = [name for name in accepted if decision.weights.get(name, 0.0) <= 1e-9]
    if unused:  # passed the rules, but the weights leave it out: no part of the mixture
        decision.notes.append(f"{', '.join(unused)} passed the rules but get(s) no share of the mixture (weights="
                              f"{rules.weights!r}{f', floor={rules.floor:g}' if rules.weights != 'sts' else ''}): "
                              "left out of it (`sts gate` writes no filtered file for it).")
    if budget is not None:
        decision.allocation = _allocate(decision.weights, budget)
        for name, count in decision.allocation.items():
            if count > len(corpora[name]):
                decision.notes.append(f"{name} is allocated {count} examples but has {len(corpora[name])}: "
                                      "some would be repeated.")
        starved = [n for n in accepted if n not in unused and not decision.allocation.get(n)]
        if starved:
            decision.notes.append(f"{', '.join(starved)} get(s) a share but no example of a budget of {budget}: "
                                  "raise the budget for every candidate to be trained on.")
    decision.timings["total"] = time.perf_counter() - start
    return decision


def load_candidates(candidates: dict[str, Any]) -> dict[str, Corpus]:
    """The candidates read, and refused when one has nothing to forecast from (no example, every text blank, or
    prompts only: no answer to demonstrate in context); needs no model, so ``sts gate`` reads them before it
    loads one."""
    corpora = {name: load_corpus(data, name=name, what=f"candidate {name!r}")
               for name, data in named_items(candidates, "candidates").items()}
    for name, corpus in corpora.items():
        places = getattr(corpus, "_places", None)
        subject = f"Candidate {name!r}" + (f" ({places[0].rsplit(' line ', 1)[0]})" if places else "")
        if len(corpus) == 0:
            raise STSInputError(f"{subject} is empty; give it at least one example or drop it.")
        if is_preference_data(corpus) or any(corpus[i].can_demonstrate for i in range(len(corpus))):
            continue
        if all(corpus[i].plain_text for i in range(len(corpus))):
            raise STSInputError(f"{subject} has no text: each of its {len(corpus)} examples is empty or blank; "
                                "give it texts, or drop it.")
        demonstrable_rows(corpus, subject, takes_demonstrations=False)  # raises, naming prompt-only data's fix
    return corpora


def gated_score(rules: GateRules, config: STSConfig) -> str:
    """The score variant the gate gates on; unusable with ``config``: an error (before any work)."""
    score = rules.score or config.ranking
    if score not in GATED_SCORES:
        raise STSConfigError(f"The config's ranking {score!r} is a residual baseline without latents; gate on an "
                             f"STS score: set GateRules(score=...) to one of {GATED_SCORES}.")
    if score in ("sts_icl", "raw_icl") and not config.compute_icl:
        raise STSConfigError(f"score={score!r} needs compute_icl=True; set it or gate on GateRules(score='sts_act').")
    return score


def check_scorable_domains(domains: dict[str, Corpus], protected: list[str], wanted: dict[str, str], score: str,
                           weights: str, candidates: int) -> set[str]:
    """The target domains ``score`` leaves unscored (one text: no other to demonstrate it in context, so no
    STS_icl); refused before any work where the gate must score them: protected, wanted, or the only domains a
    candidate could serve under the STS weights."""
    if score not in ("sts_icl", "raw_icl"):
        return set()
    unscored = {name for name, corpus in domains.items() if not has_two_demonstrations(corpus)}
    fix = "add texts to them, or gate on GateRules(score='sts_act'), which needs no demonstration"
    bad = [p for p in protected if p in unscored]
    if bad:
        raise STSInputError(f"Protected domain(s) {bad} have one text: {SCORE_LABELS[score]} needs another text of "
                            f"the domain as its in-context demonstration, so the gate cannot score them; {fix}.")
    bad = sorted({d for d in wanted.values() if d in unscored})
    if bad:
        raise STSInputError(f"wanted names domain(s) {bad}, which have one text and no {SCORE_LABELS[score]}; {fix}.")
    unprotected = [d for d in domains if d not in protected]  # none: every candidate serves a protected one
    if unprotected and all(d in unscored for d in unprotected) and weights == "sts" and len(wanted) < candidates:
        raise STSInputError(f"Every unprotected target domain ({sorted(set(domains) - set(protected))}) has one "
                            f"text and no {SCORE_LABELS[score]}, so no candidate has a domain to serve for the STS "
                            f"weights; {fix}, or name each candidate's domain in wanted.")
    return unscored


def check_budget(budget: Any) -> int | None:
    """The number of examples to draw (``None``: no budget): a whole number, ``1e3`` and ``100.0`` included (YAML
    reads ``1e3`` as a float)."""
    if budget is None:
        return None
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool) and float(budget).is_integer():
        budget = int(budget)  # also numpy's numbers
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise STSConfigError(f"budget={budget!r} must be a positive whole number of examples, or None.")
    return budget


def check_gate_names(candidates: list[str], targets: list[str], protected: Any,
                     rules: GateRules) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """(protected domains, limit per protected domain, wanted) checked against the candidate and target
    names; needs no data, so ``sts gate`` runs it before the model loads."""
    if isinstance(protected, (str, int, float)) and not isinstance(protected, bool):
        protected = [protected]
    if not isinstance(protected, (list, tuple)):
        raise STSConfigError(f"protected={protected!r}: name the protected target domain(s), e.g. ['legal'].")
    protected = [str(p) for p in protected]
    if not protected:
        raise STSConfigError("No protected domain given; name at least one target domain in `protected`.")
    repeated = repeated_names(protected)
    if repeated:  # each would get a second column, reason and vote
        raise STSInputError(f"Protected domain(s) {repeated} are named more than once in `protected` ({protected}); "
                            "name each once.")
    missing = [p for p in protected if p not in targets]
    if missing:
        raise STSInputError(f"Protected domain(s) {missing} are not among the target domains {sorted(targets)}; "
                            "add them to `targets` or fix the names.")
    if rules.max_rank is not None and rules.max_rank >= len(targets):  # every domain ranks within 1..len(targets)
        raise STSConfigError(f"max_rank={rules.max_rank} with {len(targets)} target domains rejects every candidate "
                             f"(a protected domain always ranks 1..{len(targets)}); use max_rank <= "
                             f"{len(targets) - 1}, or add target domains.")
    limit_map = _limit_map(rules.limits, protected)
    wanted = dict(rules.wanted or {})
    for name, domain in wanted.items():
        if name not in candidates:
            raise STSInputError(f"wanted names {name!r}, which is not a candidate ({sorted(candidates)}).")
        if domain not in targets:
            raise STSInputError(f"wanted[{name!r}] = {domain!r} is not a target domain ({sorted(targets)}).")
    return protected, limit_map, wanted


def check_filter(keep_fraction: Any, threshold: Any) -> None:
    """The settings of :func:`filter_examples`: exactly one of keep_fraction in (0, 1] or a threshold."""
    if keep_fraction is not None and threshold is not None:
        raise STSConfigError(f"keep_fraction={keep_fraction!r} and threshold={threshold!r} are both given; give "
                             "exactly one of them (keep_fraction: the share of examples kept, threshold: the "
                             "highest score kept).")
    if keep_fraction is None and threshold is None:
        raise STSConfigError("Give exactly one of keep_fraction (e.g. 0.9: keep the 90% lowest-scoring examples) or "
                             "threshold (keep examples scoring at most this).")
    if keep_fraction is not None and not (_number(keep_fraction) and 0 < keep_fraction <= 1):
        raise STSConfigError(f"keep_fraction={keep_fraction!r} must be a number in (0, 1], the share of examples "
                             "kept (e.g. 0.9).")
    if threshold is not None and not _number(threshold):
        raise STSConfigError(f"threshold={threshold!r} must be a finite number: examples scoring at most this are "
                             "kept.")


def _limit_map(limits: dict[str, float] | float | None, protected: list[str]) -> dict[str, float]:
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        return {p: float(limits) for p in protected}
    unknown = [k for k in limits if k not in protected]
    if unknown:
        raise STSConfigError(f"limits name {unknown}, which are not protected domains ({protected}); "
                             "add them to `protected` or fix the names.")
    return {str(k): float(v) for k, v in limits.items()}


def _decide(forecasts: dict[str, Forecast], corpora: dict[str, Corpus], protected: list[str], score: str,
            limits: dict[str, float], max_rank: int | None, tolerance: float | None,
            wanted: dict[str, str], unscored: set[str] = frozenset(),
            copies: dict[str, set[str]] | None = None) -> dict[str, CandidateDecision]:
    """Each candidate accepted or rejected by the rules, with the reason and the domain it serves. ``copies``:
    the candidates holding the same examples as each (:func:`_same_examples`): the relative rule compares a
    candidate with the other, distinct ones, each set of copies counted once."""
    copies = copies or {}
    order = list(forecasts)
    distinct = [o for i, o in enumerate(order) if not copies.get(o, set()) & set(order[:i])]  # a copy's first
    label = SCORE_LABELS[score]
    decisions = {}
    for name, result in forecasts.items():
        ranked = [d for d, _ in result.ranked(score)]
        values = {p: result.score(p, score) for p in protected}
        ranks = {p: ranked.index(p) + 1 for p in protected}
        violations, checks = [], []
        for p in protected:
            if p in limits:
                checks.append(f"{label}({p}) = {values[p]:.4g} vs limit {limits[p]:.4g}")
                if values[p] > limits[p]:
                    violations.append(f"{label}({p}) = {values[p]:.4g} > limit {limits[p]:.4g}")
            if max_rank is not None:
                checks.append(f"{p} ranks {ranks[p]}/{len(ranked)}")
                if ranks[p] <= max_rank:
                    violations.append(f"{p} ranks {ranks[p]} of {len(ranked)} target domains "
                                      f"(max_rank={max_rank} rejects ranks 1..{max_rank})")
            p_tolerance = _domain_tolerance(p, tolerance, limits, max_rank)
            if p_tolerance is not None:
                others = [forecasts[o].score(p, score) for o in distinct
                          if o != name and o not in copies.get(name, ())]
                if not others:
                    checks.append(f"no other candidate to compare {p} with (relative rule not applied; "
                                  "set limits or max_rank)")
                    continue
                bar = p_tolerance * statistics.median(others)
                checks.append(f"{label}({p}) = {values[p]:.4g} <= {bar:.4g} ({p_tolerance:g} x median of the "
                              f"other candidates)")
                if values[p] > bar:
                    violations.append(f"{label}({p}) = {values[p]:.4g} > {bar:.4g} = {p_tolerance:g} x median of "
                                      f"the other candidates ({statistics.median(others):.4g})")
        reason = ("rejected: " + "; ".join(violations)) if violations else ("accepted: " + "; ".join(checks))
        # none where every target domain is protected: nothing for the weights to serve (said by gate_mixture)
        serves = wanted.get(name) or next((d for d in ranked if d not in protected and d not in unscored), None)
        decisions[name] = CandidateDecision(name=name, accepted=not violations, reason=reason, serves=serves,
                                            protected_scores=values, protected_ranks=ranks,
                                            examples=len(corpora[name]))
    return decisions


def _domain_tolerance(domain: str, tolerance: float | None, limits: dict[str, float], max_rank: int | None,
                      ) -> float | None:
    """The relative rule's factor for a protected domain: ``tolerance``; for a domain no rule names (limits for
    some others only, no max_rank), the default rule's."""
    if tolerance is not None or domain in limits or max_rank is not None:
        return tolerance
    return DEFAULT_TOLERANCE


def _sts_weights(decision: GateDecision, accepted: list[str]) -> dict[str, float]:
    """The paper's rule: a served domain's share is proportional to the rest of the mixture's pressure on it."""
    if len(accepted) == 1:
        return {accepted[0]: 1.0}
    served: dict[str, list[str]] = {}
    for name in accepted:
        served.setdefault(decision.candidates[name].serves, []).append(name)
    if None in served:  # every target protected: no domain to serve, no pressure to balance
        return {name: 1.0 / len(accepted) for name in accepted}
    pressure = {}
    for domain, members in served.items():
        others = [o for o in accepted if o not in members] or accepted
        pressure[domain] = max(0.0, statistics.fmean(decision.forecasts[o].score(domain, decision.score)
                                                     for o in others))
    total = sum(pressure.values())
    shares = ({d: v / total for d, v in pressure.items()} if total > 0
              else {d: 1.0 / len(served) for d in served})
    weights = {name: shares[decision.candidates[name].serves] / len(served[decision.candidates[name].serves])
               for name in accepted}
    return _normalise(weights)


def _min_impact_weights(decision: GateDecision, accepted: list[str], floor: float) -> dict[str, float]:
    """min sum_i w_i impact_i  s.t.  sum w = 1, w >= 0, each served domain's share >= floor."""
    from scipy.optimize import linprog

    impact = []
    for name in accepted:
        total = 0.0
        for p in decision.protected:
            top = max(decision.candidates[o].protected_scores[p] for o in accepted)
            total += decision.candidates[name].protected_scores[p] / top if top > 0 else 0.0
        impact.append(total)
    served = sorted({decision.candidates[n].serves for n in accepted} - {None})  # none: no floor to keep
    if floor * len(served) > 1 + 1e-12:  # known only now (which domain each serves): the decision is not lost
        message = (f"floor={floor} for {len(served)} served domains ({served}) adds up to more than 1: the weights "
                   f"use floor={1 / len(served):.3f}, the most they can; lower floor to at most that.")
        warn_on_main(message, STSDataWarning, stacklevel=3)
        decision.notes.append(message)
        floor = 1 / len(served)
    a_ub = [[-1.0 if decision.candidates[n].serves == d else 0.0 for n in accepted] for d in served]
    result = linprog(impact, A_ub=a_ub or None, b_ub=[-floor] * len(served) or None,
                     A_eq=[[1.0] * len(accepted)], b_eq=[1.0], bounds=[(0, 1)] * len(accepted), method="highs")
    if not result.success:  # pragma: no cover - the program is always feasible after the check above
        raise STSConfigError(f"The min_impact weights have no solution ({result.message}); lower floor.")
    return _normalise({n: max(0.0, float(w)) for n, w in zip(accepted, result.x)})


def _normalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}


def _allocate(weights: dict[str, float], budget: int) -> dict[str, int]:
    """Integer counts summing to ``budget`` (largest remainder, ties by name)."""
    exact = {n: w * budget for n, w in weights.items()}
    counts = {n: math.floor(v) for n, v in exact.items()}
    rest = budget - sum(counts.values())
    for name in sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))[:rest]:
        counts[name] += 1
    return counts


# ------------------------------------------------------------------------------------ per-example scores


def _latent_weights(domain_stats: dict[str, Any], protected: list[str], score: str,
                    latents: list[int]) -> torch.Tensor:
    """[N, P]: each shifted latent's share of each protected domain's score (normalised over all latents)."""
    columns = []
    for p in protected:
        stats = domain_stats[p]
        if score == "sts_icl":
            per_latent = stats.latent_shift.mean_shift()
        elif score == "sts_sq":
            per_latent = stats.latents.mean_sq()
        else:
            per_latent = stats.latents.mean()
        per_latent = per_latent.detach().double().cpu().clamp(min=0)
        total = per_latent.sum()
        columns.append(per_latent[latents] / total if total > 0 else per_latent[latents] * 0)
    return torch.stack(columns, dim=1)


def _score_examples(extractor: Extractor, setup: ForecastSetup, corpus: Corpus, name: str, latents: list[int],
                    weights: torch.Tensor, protected: list[str]) -> ExampleScores:
    """Each example's weighted squared shift on D_N, per protected domain (streaming, one batch at a time)."""
    builder, config = setup.builder, setup.config
    rng = random.Random(f"{config.seed}:examples:{name}")
    pool = [i for i in range(len(corpus)) if corpus[i].can_demonstrate]
    pairs = []
    for i in range(len(corpus)):
        others = AllBut(pool, i)
        others = others if len(others) else pool
        chosen = rng.sample(others, min(config.n_demonstrations, len(others)))
        pairs.append(builder.pair(corpus[i], [corpus[j] for j in chosen]))
    index = torch.tensor(latents, dtype=torch.long)
    sums = torch.zeros(len(pairs), len(protected), dtype=torch.float64)
    counts = torch.zeros(len(pairs), dtype=torch.float64)
    for item in extractor.iter_paired_rows(pairs, f"candidate {name!r}", skip_uncounted=True):
        base = extractor.encode(item.rows)[:, index.to(item.rows.device)]
        context = extractor.encode(item.context_rows)[:, index.to(item.context_rows.device)]
        contribution = (context - base).double().square().cpu() @ weights  # [rows, P]
        rows_example = torch.tensor(item.batch, dtype=torch.long)[item.where[0]]
        sums.index_add_(0, rows_example, contribution)
        counts.index_add_(0, rows_example, torch.ones(rows_example.numel(), dtype=torch.float64))
    return _example_scores(name, counts.tolist(), sums / counts.clamp(min=1).unsqueeze(1), protected,
                           lambda i: example_text(corpus[i]))


def _example_scores(name: str, tokens: list[float], per_domain: torch.Tensor, protected: list[str],
                    text: Callable[[int], str]) -> ExampleScores:
    """:class:`ExampleScores` from each example's counted tokens and its ``[examples, P]`` scores (``text(i)``:
    example i as the preview of the worst shows it)."""
    total = per_domain.sum(dim=1)
    scores = ExampleScores(candidate=name, tokens=[int(c) for c in tokens],
                           scores={p: per_domain[:, k].tolist() for k, p in enumerate(protected)},
                           total=total.tolist())
    order = sorted(range(len(tokens)), key=lambda i: (-scores.total[i], i))[:WORST_SHOWN]
    scores.worst = [{"index": i, "score": scores.total[i],
                     "text": text(i)[:PREVIEW_CHARS]} for i in order]
    return scores


def _score_pairs(extractor: Extractor, setup: ForecastSetup, corpus: Corpus, name: str, latents: list[int],
                 weights: torch.Tensor, protected: list[str], truncation: Truncation) -> ExampleScores:
    """Each preference pair's weighted squared chosen-minus-rejected difference of mean latents on D_N, per
    protected domain: the pair's own term of the chosen-vs-rejected shift, on the tokens the forecast reads
    (``truncation``: DPOTrainer's cut). A pair whose chosen or rejected completion counts no token, or whose two
    are the same tokens, counts none and scores 0, as the forecast leaves it out."""
    sequences, differ = [], []
    for i, record in enumerate(corpus.records()):
        pair = tokenize_preference(setup.builder, record, i, name, truncation=truncation)
        sequences += [pair.chosen, pair.rejected]
        differ.append(pair.chosen != pair.rejected)
    index = torch.tensor(latents, dtype=torch.long)
    sums = torch.zeros(len(sequences), len(latents), dtype=torch.float64)
    counts = torch.zeros(len(sequences), dtype=torch.float64)
    for item in extractor.iter_rows(sequences, f"candidate {name!r}"):
        encoded = extractor.encode(item.rows)[:, index.to(item.rows.device)].double().cpu()
        rows_sequence = torch.tensor(item.batch, dtype=torch.long)[item.where[0]]
        sums.index_add_(0, rows_sequence, encoded)
        counts.index_add_(0, rows_sequence, torch.ones(rows_sequence.numel(), dtype=torch.float64))
    means = sums / counts.clamp(min=1).unsqueeze(1)
    counted = ((counts[0::2] > 0) & (counts[1::2] > 0) & torch.tensor(differ)).double()
    per_domain = (means[0::2] - means[1::2]).square() @ weights * counted.unsqueeze(1)  # [pairs, P]
    tokenizer = setup.builder.tokenizer  # a pair's text as the trainer reads it (any of TRL's formats, tokenized too)
    return _example_scores(name, ((counts[0::2] + counts[1::2]) * counted).tolist(), per_domain, protected,
                           lambda i: tokenizer.decode(sequences[2 * i][0], skip_special_tokens=True))


def filter_examples(decision_or_scores: GateDecision | ExampleScores, candidate: str, *,
                    keep_fraction: float | None = None, threshold: float | None = None,
                    domain: str | None = None, data: Any = None) -> Filtered:
    """Drop a candidate's worst examples by their per-example scores.

    Args:
        decision_or_scores: a :class:`GateDecision` (from :func:`gate_mixture` or :meth:`GateDecision.load`)
            or one candidate's :class:`ExampleScores`.
        candidate: the candidate's name.
        keep_fraction: keep this fraction (rounded up) of the examples with the lowest scores, or
        threshold: keep the examples whose score is at most this.
        domain: rank by one protected domain's score instead of the sum over protected domains.
        data: the candidate's data; needed for a loaded decision or for ``ExampleScores`` (the decision
            returned by :func:`gate_mixture` remembers it).

    Returns:
        :class:`Filtered` (examples: the original records in their original order, scores, indices).
    """
    check_filter(keep_fraction, threshold)
    if isinstance(decision_or_scores, GateDecision):
        if candidate not in decision_or_scores.example_scores:
            raise STSInputError(f"No per-example scores for {candidate!r}; candidates with scores: "
                                f"{sorted(decision_or_scores.example_scores)} (run with score_examples=True).")
        scores = decision_or_scores.example_scores[candidate]
        corpus = decision_or_scores._data.get(candidate)
        if candidate not in decision_or_scores.in_mixture:  # a loop over every candidate would ship rejected data
            state = decision_or_scores.candidates[candidate]
            why = state.reason if not state.accepted else "accepted, but the weights give it no share"
            warn_on_main(f"{candidate!r} is not in this decision's mixture ({why}); its filtered examples are "
                         "no part of it.", STSDataWarning, stacklevel=2)
    else:
        scores, corpus = decision_or_scores, None
    if data is not None:
        corpus = load_corpus(data, name=candidate, what=f"the data of candidate {candidate!r}")
    if corpus is None:
        raise STSInputError(f"The data of {candidate!r} is not known here; pass data=... (the candidate's data).")
    if len(corpus) != len(scores):
        raise STSInputError(f"{candidate!r} has {len(corpus)} examples but {len(scores)} scores; pass the same "
                            "data that was gated.")
    _check_same_examples(corpus, scores, candidate)
    if domain is not None and domain not in scores.scores:
        raise STSInputError(f"{domain!r} is not a protected domain of this decision ({sorted(scores.scores)}).")
    values = scores.total if domain is None else scores.scores[domain]
    # an example with no counted token (empty, or only special tokens) has no score, not the best one: never kept
    # first (it read 0, the least harmful, ahead of every real example)
    unscored = {i for i, tokens in enumerate(scores.tokens) if not tokens}
    if unscored:
        warn_on_main(f"{len(unscored)} of the examples of {candidate!r} have no scored token (empty, only special "
                     "tokens, or a preference pair whose two completions are the same: it trains nothing): they are "
                     "not kept.", STSDataWarning, stacklevel=2)
    scored = [i for i in range(len(values)) if i not in unscored]
    if threshold is not None:
        keep = [i for i in scored if values[i] <= threshold]
        if not keep and scored:  # an accepted candidate written as an empty training set
            shown = [values[i] for i in scored]
            warn_on_main(f"threshold={threshold:g} keeps none of the {len(values)} examples of {candidate!r} (their "
                         f"scores run from {min(shown):.4g} to {max(shown):.4g}); raise the threshold, or filter by "
                         "keep_fraction.", STSDataWarning, stacklevel=2)
    else:
        n_keep = min(math.ceil(keep_fraction * len(values)), len(scored))
        keep = sorted(sorted(scored, key=lambda i: (values[i], i))[:n_keep])
    items = getattr(corpus, "_items", None)
    records = [items[i] if items is not None else corpus[i] for i in keep]
    return Filtered(examples=records, scores=[values[i] for i in keep], indices=keep)


def example_digests(corpus: Corpus) -> list[str]:
    """Each example's content digest: its text as the gate reads it (prompt and answer; a preference pair's
    prompt, chosen and rejected), so the same examples given as a JSONL file or as records digest alike."""
    preference = is_preference_data(corpus)
    records = corpus.records() if preference else None
    out = []
    for i in range(len(corpus)):
        record = records[i] if records is not None else None
        content: Any = ({k: record.get(k) for k in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                                                     "rejected_ids")
                         if k in record} if hasattr(record, "get") else example_text(corpus[i]))
        text = json.dumps(_without_nulls(content), sort_keys=True, ensure_ascii=False, default=data_value)
        out.append(hashlib.sha1(text.encode("utf-8")).hexdigest()[:16])
    return out


def _without_nulls(value: Any) -> Any:
    """``value`` without its null-valued keys, at every depth: a ``datasets.Dataset`` fills a message's missing keys
    (``"name": None``) that the same records as JSONL lack."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(v) for v in value]
    return value


def _same_examples(digests: dict[str, list[str]]) -> dict[str, set[str]]:
    """For each candidate, the other candidates holding the same examples (in any order)."""
    content = {name: sorted(d) for name, d in digests.items()}
    return {name: {o for o in digests if o != name and content[o] == content[name]} for name in digests}


def _check_same_examples(corpus: Corpus, scores: ExampleScores, candidate: str) -> None:
    """The data given now against the data scored (each example's digest; a decision of an older version: the
    previews of the worst examples): the same number of other or reordered examples would be filtered by another
    set's scores. (An older decision's preference pairs, whose preview needs the tokenizer: not checked.)"""
    if scores.digests:
        given = example_digests(corpus)
        changed = next((i for i, (a, b) in enumerate(zip(given, scores.digests)) if a != b), None)
        if changed is not None:
            raise STSInputError(f"Example {changed} of the data given for {candidate!r} is not the one that was gated "
                                f"({example_text(corpus[changed])[:60]!r}...); pass the same data, in the same "
                                "order.")
        return
    if is_preference_data(corpus):
        return
    for worst in scores.worst:
        i = worst.get("index")
        if isinstance(i, int) and 0 <= i < len(corpus) and example_text(corpus[i])[:PREVIEW_CHARS] != worst["text"]:
            raise STSInputError(f"Example {i} of the data given for {candidate!r} is not the one that was gated "
                                f"(gated: {worst['text'][:60]!r}...); pass the same data, in the same order.")


def write_jsonl(records: list[Any], path: str | Path) -> Path:
    """Write records so that :func:`~sts_callback.core.data.load_corpus` reads them back (texts as ``{"text"}``,
    conversations as ``{"messages"}``, records as they are; values JSON has no type for, such as a parquet file's
    dates, as :func:`~sts_callback.core.formatting.data_value` writes them, and NaN as null)."""
    lines = []
    for record in records:
        if isinstance(record, str):
            record = {"text": record}
        elif isinstance(record, list):
            record = {"messages": record}
        elif not isinstance(record, dict):
            record = dict(record)
        lines.append(json.dumps(json_safe(record), ensure_ascii=False, default=data_value, allow_nan=False) + "\n")
    return atomic_write_text(path, "".join(lines))
