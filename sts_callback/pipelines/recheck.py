"""Re-checks: their settings (``RecheckConfig``) and what one measured (``Recheck``, a typed record).

:meth:`Monitor.recheck <sts_callback.pipelines.monitor.Monitor.recheck>` makes it, :class:`Guard` judges it, the
callback logs it; :meth:`Recheck.to_dict` is the line ``history.jsonl`` holds (format ``sts-history/1``: the keys
below, plus the step and what the callback adds: early forecast, violations, early stop).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.config import plain_numbers, settings_from_dict
from ..core.errors import STSConfigError
from ..core.head_sample import TAIL_DEFAULT
from ..core.heldout import HEAD_DTYPES

EARLY_METHODS = ("trend", "power")  # the early forecasts whose intervals carry over (scoring.early)
RecheckSteps = int | float | Sequence[int | float] | None


def _schedule_error(value: Any) -> STSConfigError:
    return STSConfigError(
        f"recheck_steps must be None (the default: at every checkpoint save; validate: at the end), an integer >= 1 "
        f"(every that many steps), a fraction of the run's steps between 0 and 1 (0.1: every tenth of the run, as "
        f"TrainingArguments' eval_steps), or a list of steps or of fractions (e.g. [2, 4, 8, 16, 32, 64] or "
        f"[0.05, 0.1, 0.25, 0.5]), got {value!r}.")


def _step_or_fraction(value: Any) -> int | float | None:
    """``value`` as a step (an integer >= 1; a whole float such as 10.0 from a YAML file too) or a fraction of
    the run (a float strictly between 0 and 1); ``None`` if it is neither."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if value >= 1 and float(value).is_integer():
        return int(value)
    return float(value) if isinstance(value, float) and 0 < value < 1 else None


def checked_recheck_steps(value: Any) -> RecheckSteps:
    """``recheck_steps`` validated: a step count or a fraction, or a list of one kind as a sorted tuple."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable):  # a list, a range, an array
        schedule = [_step_or_fraction(v) for v in value]
        if not schedule or None in schedule:
            raise _schedule_error(value)
        if any(isinstance(v, float) for v in schedule):  # [0.25, 0.5, 1.0]: 1.0 is the end, not step 1
            schedule = [1.0 if isinstance(given, float) and given == 1.0 else v for given, v in zip(value, schedule)]
        if len({type(v) for v in schedule}) > 1:
            raise STSConfigError(f"recheck_steps mixes steps and fractions of the run ({list(value)!r}); give one "
                                 f"kind, e.g. [2, 4, 8, 16] or [0.05, 0.1, 0.25].")
        return tuple(sorted(set(schedule)))
    single = _step_or_fraction(value)
    if single is None:
        raise _schedule_error(value)
    return single


def _as_step(value: int | float, max_steps: int) -> int:
    """A step as given, or a fraction of the run as the Trainer turns a fractional ``eval_steps`` into steps."""
    return value if isinstance(value, int) else max(1, math.ceil(max_steps * value))


@dataclass
class RecheckConfig:
    """When and how much a re-check measures.

    Args:
        recheck_steps: when to re-check: every this many optimizer steps (an integer); every this fraction of the
            run's steps (a float between 0 and 1, as ``TrainingArguments.eval_steps``); at the steps, or fractions
            of the run, in a list (e.g. ``[2, 4, 8, 16, 32, 64]``, dense early); ``None``: at every checkpoint
            save.
        recheck_tokens: tokens of the training probe whose actual SAE-latent shift is measured.
        loss_tokens: held-out tokens per target domain for the loss change (the most a re-check reads).
        loss_precision: measure each domain's loss change in blocks of the same sequences before and after
            until its 95% interval is within +-``loss_precision * tolerance`` (or a protected domain is surely
            above ``tolerance``); ``None``: always all ``loss_tokens``.
        accuracy_items: items sampled per multiple-choice domain for its accuracy (one forward each).
        recheck_at_end: re-check at the end of training when the last step was not re-checked.
        loss_sequence_tokens: each held-out text is cut to its first this many counted tokens, so that
            ``loss_tokens`` holds more, shorter sequences and the sequential measurement can stop after a few
            of them; ``None`` (default): the texts as the forecast reads them (up to
            ``STSConfig.max_query_tokens``). A cut changes what is measured (the change on the texts'
            openings): on the overhead benchmark, 64-token openings of python_code moved by -6.1% where the
            texts moved by -3.7%.
        loss_domains: measure the held-out loss of at most this many unprotected domains per re-check, in
            turns (protected domains every time): with k others, each is measured every ceil(k / loss_domains)
            re-checks, and the history holds only the domains measured at each step. ``None``: all, always.
        early_method: how the measured changes are projected to the end of training: ``"trend"`` (the latest
            change plus the recent slope in the learning-rate area) or ``"power"`` (change ~ f^b, b fitted on the
            run's re-checks). ``None`` (default): the transfer benchmark's best (``benchmarks/transfer/
            early_compare.py``): ``"power"`` blended with the step-0 prediction when the calibration carries a
            blend for it, else ``"trend"``.
        overhead_budget: hold re-checks to this share of training time (``0.03``: 3%): each re-check measures
            the probe and the protected domains, and only as many unprotected domains' losses (in turns, the least
            recently measured first) as the seconds left in the budget afford, timed on the run itself; each
            history record says what the re-checks have cost so far and which domains waited. ``None``: no limit
            (the cost is still recorded).
        fresh_rollouts: under RL, each re-check samples new completions of the current policy for fresh prompts
            (a few, about ``recheck_tokens`` of completion, 2 per prompt) as its probe, with their base residuals
            from the trainer's reference model or the adapters-disabled model; ``False``: the train-start
            rollouts throughout (no generation at re-checks).
        loss_head_dtype: the LM head's matmul precision for the held-out losses (base and re-checks alike; each
            token's top 32 logits and its target's are recomputed exactly, the softmax stays float32): ``"auto"``
            (default): bfloat16 when the head is float32, runs apart from the body (not under ZeRO-3 / FSDP) and
            the device multiplies in bf16 natively (a recent CUDA GPU, a CPU with AVX512-BF16 or AMX), else the
            head's own; ``"bfloat16"``; ``None``: the head's own dtype. On Gemma 3 270M a measured change moved by
            at most 0.005 points, 1.4% of its 95% interval's half-width (``benchmarks/perf/head_precision.py``);
            the head is about two thirds of a float32 held-out pass on a 262k vocabulary.
        loss_body_dtype: the body's precision for the held-out losses, as autocast (the matmuls in that dtype, the
            residual stream and norms float32; base and re-checks alike): ``"auto"`` (default): bfloat16 when the
            body's weights are float32 and the head runs apart from it on a device that multiplies in bf16
            natively, else none; ``"bfloat16"``; ``None``: the body's own dtype. On Gemma 3 270M (a CPU with
            AVX512-BF16) held-out passes ran 2.1x faster than float32 with head and body in bf16 (1.6x with the head
            alone), and a measured change moved by up to 0.08 points, 0.14 of its 95% half-width: per-token noise,
            which the interval, estimated from the same rows, includes (``benchmarks/perf/head_precision.py``).
        loss_head_samples: the re-checks' LM head from a sample of the vocabulary: the train-start pass keeps each
            held-out token's top 32 logits and this many draws from the rest (in proportion to their probability),
            and a re-check computes only those rows of the head and the target's, moving the base log-sum-exp by
            their change (``sts_callback.core.head_sample``): exact for the top, an unbiased estimate for the rest
            whose noise is per token and so inside the change's interval. The train-start pass costs about a
            second head pass more; the head's cost at re-checks all but vanishes. Needs the head to run apart from
            the body as a plain linear layer (else the whole head, as with ``None``). Default 32.
    """

    recheck_steps: RecheckSteps = None
    recheck_tokens: int = 2048
    loss_tokens: int = 1024
    loss_precision: float | None = 0.25
    accuracy_items: int = 100
    recheck_at_end: bool = True
    loss_sequence_tokens: int | None = None
    loss_domains: int | None = None
    early_method: str | None = None
    fresh_rollouts: bool = True
    overhead_budget: float | None = None
    loss_head_dtype: str | None = "auto"
    loss_body_dtype: str | None = "auto"
    loss_head_samples: int | None = TAIL_DEFAULT

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("recheck_tokens", "loss_tokens", "accuracy_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise STSConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        tail = self.loss_head_samples
        if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool) or tail < 1):
            raise STSConfigError(f"loss_head_samples must be None (the whole LM head at every re-check) or an integer "
                                 f">= 1 (draws per token from outside its top logits), got {tail!r}.")
        domains = self.loss_domains
        if domains is not None and (not isinstance(domains, int) or isinstance(domains, bool) or domains < 1):
            raise STSConfigError(f"loss_domains must be None (every domain at every re-check) or an integer >= 1, "
                                 f"got {domains!r}.")
        cut = self.loss_sequence_tokens
        if cut is not None and (not isinstance(cut, int) or isinstance(cut, bool) or cut < 8):
            raise STSConfigError(f"loss_sequence_tokens must be None (whole texts) or an integer >= 8, got {cut!r}.")
        self.recheck_steps = checked_recheck_steps(self.recheck_steps)
        precision = self.loss_precision
        if precision is not None and (isinstance(precision, bool) or not isinstance(precision, (int, float))
                                      or not precision > 0):
            raise STSConfigError(f"loss_precision must be a positive fraction of the tolerance (0.25: the 95% "
                                 f"interval of a loss change is at most +-tolerance/4) or None, got {precision!r}.")
        budget = self.overhead_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise STSConfigError(f"overhead_budget must be a share of training time between 0 and 1 (0.03: "
                                 f"re-checks take at most 3%) or None, got {budget!r}.")
        if self.early_method is not None and self.early_method not in EARLY_METHODS:
            raise STSConfigError(f"early_method must be one of {EARLY_METHODS} or None (the benchmark's best), got "
                                 f"{self.early_method!r}.")
        for name, own in (("loss_head_dtype", "the head's own dtype"), ("loss_body_dtype", "the body's own dtype")):
            value = getattr(self, name)
            if value is not None and value not in HEAD_DTYPES:
                raise STSConfigError(f"{name} must be one of {HEAD_DTYPES} or None ({own}), got {value!r}.")
        for name in ("recheck_at_end", "fresh_rollouts"):
            if not isinstance(getattr(self, name), bool):
                raise STSConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def recheck_due(self, step: int, max_steps: int) -> bool | None:
        """Whether optimizer step ``step`` of a run of ``max_steps`` has a scheduled re-check; ``None`` when
        re-checks follow the checkpoint saves."""
        steps = self.recheck_steps
        if steps is None:
            return None
        if isinstance(steps, tuple):
            return any(step == _as_step(v, max_steps) for v in steps)
        return step % _as_step(steps, max_steps) == 0

    def schedule_beyond(self, max_steps: int) -> list[int]:
        """The listed re-check steps a run of ``max_steps`` never reaches (to warn about at train start)."""
        steps = self.recheck_steps
        return [v for v in steps if isinstance(v, int) and v > max_steps] if isinstance(steps, tuple) else []

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "RecheckConfig":
        return settings_from_dict(cls, values, "re-check setting(s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recheck:
    """One re-check: the actual shift of the SAE latents on the training probe, the target domains re-scored on
    it, and each domain's held-out loss against train start.

    ``loss_delta`` is the relative change of a domain's held-out NLL (``None`` without a base loss), with its
    95% interval in ``loss_delta_ci`` and standard error in ``loss_delta_se`` (``None`` from one sequence) measured
    on ``loss_tokens`` tokens; ``accuracy`` / ``accuracy_delta`` only
    for multiple-choice or lm-eval domains, with ``accuracy_items`` (the items read) and, for multiple-choice items
    answered at train start, the change's 95% interval ``accuracy_delta_ci``; ``sae_fit`` is the SAE's fraction of variance unexplained and L0 on
    the probe (``None`` without a decoder). ``probe_error``: why the probe could not be read (NaN / inf residuals:
    the model diverged); the shift, scores and fit are then empty and the held-out losses still measured, so that
    the guard sees the divergence.
    """

    shift_total: float | None
    shifted_latents: list[int]
    shift_values: list[float]
    overlap_with_forecast: float | None
    scores: dict[str, dict[str, float]]
    loss: dict[str, float]
    loss_delta: dict[str, float | None]
    loss_delta_ci: dict[str, list[float]]
    loss_tokens: dict[str, int]
    probe_tokens: int
    sae_fit: dict[str, float] | None
    seconds: float
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_delta: dict[str, float | None] = field(default_factory=dict)
    accuracy_delta_ci: dict[str, list[float]] = field(default_factory=dict)
    accuracy_items: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: probe (shift and SAE fit), losses, accuracy
    loss_seconds: dict[str, float] = field(default_factory=dict)  # seconds of each measured domain's loss
    loss_delta_se: dict[str, float | None] = field(default_factory=dict)
    probe_error: str | None = None
    # batches of a domain's held-out loss the sampled LM head misread (checked against the whole head), measured whole
    loss_head_fallbacks: dict[str, int] = field(default_factory=dict)

    def scored_as(self, domain: str, variant: str) -> str:
        """The variant :meth:`score` reads for ``domain``: ``variant``, or ``sts_act`` where it was not computed."""
        return variant if variant in (self.scores.get(domain) or {}) else "sts_act"

    def score(self, domain: str, variant: str) -> float | None:
        """The re-checked score of ``domain`` under ``variant`` (``sts_act`` where the variant was not computed)."""
        scores = self.scores.get(domain)
        if scores is None:
            return None
        return scores.get(self.scored_as(domain, variant))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.accuracy:  # the history's lines carry accuracy keys only for domains that have them
            for key in ("accuracy", "accuracy_delta", "accuracy_delta_ci", "accuracy_items"):
                out.pop(key)
        if self.probe_error is None:
            out.pop("probe_error")
        if not self.loss_head_fallbacks:
            out.pop("loss_head_fallbacks")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recheck":
        """A history line back as a record (extra keys such as ``step`` or ``violations`` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


__all__ = ["Recheck", "RecheckConfig", "RecheckSteps", "checked_recheck_steps"]
