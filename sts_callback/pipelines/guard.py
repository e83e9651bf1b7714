"""The decisions about protected domains: what counts as a violation, when to warn, when to stop.

Pure: no Trainer, no files, no model. Feed it what the forecast and each re-check measured; it answers with
messages and a stop decision, and keeps the few counters a resume needs (``state()`` / ``load_state()``),
in the manner of ``transformers.EarlyStoppingCallback.check_metric_value``. Usable from any training loop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.config import plain_numbers, settings_from_dict
from ..core.data import repeated_names
from ..core.formatting import percent, signed_percent as pct
from ..core.errors import STSConfigError, STSDataWarning
from ..core.sae_fit import MAX_FVU, poor_fit_message
from .recheck import Recheck


ACCURACY_ROUNDING = 1e-9  # far below one item of any set a re-check scores


@dataclass
class GuardConfig:
    """Rules for the protected target domains.

    Args:
        protected: names of target domains that must not be harmed.
        tolerance: a protected domain's held-out NLL may rise by at most this fraction (0.05 = 5%).
        accuracy_tolerance: a protected multiple-choice domain's accuracy may fall by at most this much
            (absolute; 0.02 = two points).
        max_sts: a protected domain's re-checked score may not exceed this (``None``: no such rule).
        forecast_top_k: warn when the forecast ranks a protected domain among the ``k`` most affected.
        early_stop: stop training after ``patience`` consecutive re-checks with a violation: ``True`` counts
            measured violations, ``"projected"`` also protected domains projected (the whole interval of the projection) to end above
            ``tolerance`` (an earlier stop, on the early forecast), ``False`` never stops.
        patience: see ``early_stop``; a failed re-check (nothing measured) neither counts nor ends the run of
            consecutive violations.
        warn_confidence: how sure the train-start calibrated prediction must be that a protected domain ends above
            ``tolerance`` before it warns: the probability its interval (read as normal) puts above the tolerance.
            0.5 (the default): the predicted mean above it; higher trades warnings on domains that end just inside
            the tolerance (false alarms) for later warnings (the benchmark's curve: ``compressed_callback.py
            --score --batches whole``). A projection during training warns only when its whole 95% interval is
            above the tolerance, whatever this is.
        max_fvu: warn when the SAE's fraction of variance unexplained on the training probe is above this at
            train start (an SAE for another model or layer: the forecast then means little).
        fvu_rise: warn when a re-check's FVU exceeds the train-start FVU by more than this (the SAE stops
            fitting as the weights move, and re-checked scores lose their meaning).
    """

    protected: list[str] = field(default_factory=list)
    tolerance: float = 0.05
    accuracy_tolerance: float = 0.02
    max_sts: float | None = None
    forecast_top_k: int = 1
    early_stop: bool | str = False
    patience: int = 1
    warn_confidence: float = 0.5
    max_fvu: float = MAX_FVU
    fvu_rise: float = 0.15

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.protected is None:  # "nothing protected", as the default
            self.protected = []
        if isinstance(self.protected, Mapping):  # its values would be dropped unseen
            raise STSConfigError(f"protected must be a list of domain names, got a mapping {self.protected!r}: the "
                                 "re-checks hold every protected domain to one tolerance=; pass "
                                 f"protected={list(self.protected)!r} with tolerance= (per-domain score limits are "
                                 "the gate's limits=).")
        if (isinstance(self.protected, str) or not isinstance(self.protected, Iterable)
                or not all(isinstance(p, str) for p in self.protected)):
            hint = f" (one domain: protected=[{self.protected!r}])" if isinstance(self.protected, str) else ""
            raise STSConfigError(f"protected must be a list of domain names, got {self.protected!r}{hint}.")
        self.protected = list(self.protected)
        repeated = repeated_names(self.protected)
        if repeated:
            raise STSConfigError(f"protected names {repeated} more than once; name each protected domain once.")
        for name in ("tolerance", "accuracy_tolerance", "max_fvu", "fvu_rise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise STSConfigError(f"{name} must be a non-negative number (0.05 = 5%), got {value!r}.")
            if name in ("tolerance", "accuracy_tolerance") and 1 <= value < math.inf:
                # likely a percent: a loss rise of 1 is +100%, and an accuracy never falls by more than 1
                allows = f"allows a loss rise of {value:.0%}" if name == "tolerance" else "can never be exceeded"
                warnings.warn(f"{name}={value!r} {allows}: it is a fraction (0.02 = 2%), not a percent. If you meant "
                              f"{value:g}%, pass {name}={value / 100:g}; to turn the rule off, math.inf.",
                              STSDataWarning, stacklevel=4)
            setattr(self, name, float(value))
        if self.max_sts is not None and (isinstance(self.max_sts, bool) or not isinstance(self.max_sts, (int, float))
                                         or not self.max_sts >= 0):  # an STS score is never negative
            raise STSConfigError(f"max_sts must be a non-negative number (an STS score's limit) or None, got "
                                 f"{self.max_sts!r}.")
        if isinstance(self.warn_confidence, bool) or not isinstance(self.warn_confidence, (int, float)) \
                or not 0 < self.warn_confidence < 1:
            raise STSConfigError(f"warn_confidence must be a probability strictly between 0 and 1 (0.5: warn when "
                                 f"the predicted mean is above the tolerance), got {self.warn_confidence!r}.")
        self.warn_confidence = float(self.warn_confidence)
        for name, low in (("forecast_top_k", 0), ("patience", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise STSConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not isinstance(self.early_stop, bool) and self.early_stop != "projected":
            raise STSConfigError(f"early_stop must be True, False or 'projected', got {self.early_stop!r}.")
        if self.patience != 1 and not self.early_stop:
            warnings.warn(f"patience={self.patience} has no effect without early_stop (it counts the consecutive "
                          "violating re-checks before a stop); pass early_stop=True, or leave patience out.",
                          STSDataWarning, stacklevel=4)
        if self.early_stop and not self.protected:  # only a protected domain's violation stops a run
            raise STSConfigError(f"early_stop={self.early_stop!r} with no protected domain would never stop the run; "
                                 "name the domains that must not be harmed, e.g. protected=['law'].")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "GuardConfig":
        return settings_from_dict(cls, values, "guard setting(s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    """What one re-check means for the run."""

    violations: list[str]
    stop: bool = False
    reason: str | None = None
    new_violations: list[str] = field(default_factory=list)  # rules not broken at the re-check before: warn these


def _interval(bounds: list[float] | None, tolerance: float) -> str:
    """A measured change's 95% interval for a violation message; where it reaches below the tolerance, said: the
    held-out texts (or ``loss_tokens``) ran out before the measurement was sure."""
    if not bounds or None in bounds or not all(math.isfinite(b) for b in bounds):
        return ""
    low, high = bounds
    unsure = "; it reaches below the tolerance: more held-out texts or loss_tokens measure it surely" \
        if low <= tolerance else ""
    return f" (95% interval {pct(low, apart_from=tolerance)} to {pct(high)}{unsure})"


def _points_interval(bounds: list[float] | None, items: int | None, tolerance: float) -> str:
    """An accuracy change's 95% interval (in points) for a violation message; where it reaches a fall within the
    tolerance, said: the items are too few to be sure."""
    if not bounds:
        return ""
    low, high = bounds
    unsure = ("; it reaches a fall within the tolerance: more items (accuracy_items) measure it surely"
              if -high <= tolerance else "")
    over = f" over {items} items" if items else ""
    return f" (95% interval {low * 100:+.1f} to {high * 100:+.1f} points{over}{unsure})"


def chance_above(prediction: Mapping[str, float], tolerance: float, level: float) -> float:
    """The probability that a prediction (``mean``, ``low``, ``high`` of its ``level`` interval, read as a normal
    with the interval's half-width) ends above ``tolerance``; 1 or 0 by the mean where the interval has no width."""
    mean, low, high = prediction["mean"], prediction.get("low"), prediction.get("high")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    spread = (high - low) / (2 * z) if low is not None and high is not None and high > low else 0.0
    if not spread > 0:
        return float(mean > tolerance)
    return 1.0 - NormalDist(mean, spread).cdf(tolerance)


class Guard:
    """Applies a :class:`GuardConfig` to forecasts and re-checks, remembering what it already warned about."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self.violations_in_a_row = 0
        self.warned: list[str] = []
        self.violating: list[str] = []  # (rule, domain) keys broken at the last re-check
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ state for resume
    def state(self) -> dict[str, Any]:
        return {"violations_in_a_row": self.violations_in_a_row, "warned": list(self.warned),
                "violating": list(self.violating), "stop_reason": self.stop_reason}

    def load_state(self, state: dict[str, Any]) -> None:
        self.violations_in_a_row = int(state.get("violations_in_a_row", 0))
        self.warned = list(state.get("warned", []))
        self.violating = list(state.get("violating", []))
        self.stop_reason = state.get("stop_reason")

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen: each warning is given once per run."""
        if key in self.warned:
            return False
        self.warned.append(key)
        return True

    # ------------------------------------------------------------------ before training
    def forecast_warnings(self, ranked: list[tuple[str, float | None]], label: str,
                          predicted: bool = False) -> dict[str, str]:
        """Protected domains the forecast ranks among the ``forecast_top_k`` most affected: key -> message.
        ``predicted``: ``ranked`` holds calibrated predicted changes (most harmed first), shown as percentages; a
        domain predicted to improve is not among the most affected, whatever its rank."""
        order = [name for name, _ in ranked]
        out = {}
        if len(order) <= self.config.forecast_top_k:  # every domain is among the top k: a rank says nothing
            return out
        for name in self.config.protected:
            value = dict(ranked).get(name)
            rank = order.index(name) + 1 if name in order else None
            if predicted and value is not None and not value > 0:  # predicted to improve: not harmed, first or not
                continue
            if value is not None and rank is not None and rank <= self.config.forecast_top_k:
                shown = f"{label} {pct(value)}" if predicted else f"{label}={value:.4g}"
                below, next_value = ranked[self.config.forecast_top_k]
                if not predicted and next_value is not None and value > 0:  # how far ahead a rank may be is the
                    # user's to judge: a score 1% above the next domain's ranks first as one 10x above does
                    shown += (f"; the first domain below the top {self.config.forecast_top_k}, {below!r}, scores "
                              f"{next_value:.4g}, {1 - next_value / value:.0%} lower")
                out[f"forecast:{name}"] = (f"STS forecast: protected domain {name!r} ranks {rank} of {len(order)} "
                                           f"among the domains most affected by this training ({shown}).")
        return out

    def predicted_warnings(self, predicted: dict[str, dict[str, float]], level: float) -> dict[str, str]:
        """Protected domains whose calibrated end-of-training change ends above the tolerance with probability at
        least ``warn_confidence`` (:func:`chance_above`; ``level``: the intervals' coverage)."""
        out, tol, confidence = {}, self.config.tolerance, self.config.warn_confidence
        for name in self.config.protected:
            p = predicted.get(name)
            if p is None or (chance := chance_above(p, tol, level)) < confidence:
                continue
            change = f"get worse by {percent(p['mean'], apart_from=tol)}" if p["mean"] > 0 else \
                f"change by {pct(p['mean'])}"
            where = f"above the tolerance {tol:.1%}" if confidence == 0.5 else \
                f"a {chance:.0%} chance of ending above the tolerance {tol:.1%} (warn_confidence {confidence:g})"
            out[f"predicted:{name}"] = (
                f"STS calibrated forecast: protected domain {name!r} is predicted to {change} ({level:.0%} interval "
                f"{pct(p['low'])} to {pct(p['high'])}), {where}.")
        return out

    def fit_warnings(self, start: dict[str, float] | None, now: dict[str, float] | None) -> dict[str, str]:
        """The SAE does not fit the model (at start: ``now`` with ``start=None``) or stopped fitting since."""
        if now is None or not math.isfinite(now.get("fvu", math.nan)):
            return {}
        if start is None:
            message = poor_fit_message(now, "the training probe", self.config.max_fvu)
            return {"fit:start": message} if message else {}
        if now["fvu"] > start["fvu"] + self.config.fvu_rise:
            return {"fit:drift": (
                f"The SAE fits the trained weights less and less: fraction of variance unexplained {now['fvu']:.2f} "
                f"now vs {start['fvu']:.2f} at train start (mean L0 {now['l0']:.0f} vs {start['l0']:.0f}); "
                "re-checked STS scores mean less from here, the held-out loss changes still hold.")}
        return {}

    # ------------------------------------------------------------------ during training
    def projected(self, early: dict[str, float | None], measured: dict[str, float | None], fraction: float,
                  intervals: dict[str, list[float]] | None = None) -> dict[str, str]:
        """Protected domains on course (by the early forecast) to exceed the tolerance by the end: name -> message.

        With ``intervals`` (the projection's interval per domain), only a domain whose whole interval lies above
        the tolerance: a projection that may still end within it never warns."""
        out = {}
        for name in self.config.protected:
            value = early.get(name)
            interval = (intervals or {}).get(name)
            if value is None or fraction >= 1 or value <= self.config.tolerance:
                continue
            if intervals is not None and (interval is None or interval[0] is None
                                          or not interval[0] > self.config.tolerance):
                continue
            now, tol = measured.get(name), self.config.tolerance
            span = f" (interval {pct(interval[0], apart_from=tol)} to {pct(interval[1])})" if interval else ""
            worse = percent(value, apart_from=tol)
            course = f"protected domain {name!r} is on course to get worse by {worse}{span}"
            out[name] = (f"{course} by the end of training (measured {pct(now)} after {fraction:.0%} of the "
                         f"learning-rate schedule; tolerance {tol:.1%})" if now is not None else
                         f"{course} by the end of training")
        return out

    def violations(self, recheck: Recheck, variant: str) -> list[str]:
        """The rules broken by one re-check."""
        return [message for _, message in self._violations(recheck, variant)]

    def _violations(self, recheck: Recheck, variant: str) -> list[tuple[str, str]]:
        """The rules broken by one re-check: ``(rule:domain, message)``."""
        found = []
        for name in self.config.protected:
            delta = recheck.loss_delta.get(name)
            loss = recheck.loss.get(name)
            if (delta is not None and not math.isfinite(delta)) or (loss is not None and not math.isfinite(loss)):
                found.append((f"nonfinite:{name}", f"held-out loss of protected domain {name!r} is not finite "
                              f"({loss}): the model diverged on it (lower the learning rate, check for fp16 overflow)"))
            elif delta is not None and delta > self.config.tolerance:
                rose = percent(delta, apart_from=self.config.tolerance)
                moved = recheck.accuracy_delta.get(name)  # a quiz whose answers held while its loss rose: said
                also = f"; its accuracy changed by {moved * 100:+.1f} points" if moved is not None else ""
                found.append((f"loss:{name}", f"held-out loss of protected domain {name!r} rose by {rose}"
                                              f"{_interval(recheck.loss_delta_ci.get(name), self.config.tolerance)} "
                                              f"(tolerance {self.config.tolerance:.1%}){also}"))
            drop = recheck.accuracy_delta.get(name)
            # a share of items: 5/100 - 3/100 is 0.020000000000000004 in floats, and losing exactly the tolerance
            # is no violation ("more than"), so the comparison allows float rounding
            if drop is not None and -drop > self.config.accuracy_tolerance + ACCURACY_ROUNDING:
                # a share of items: points, not a relative change (51.7% of a base of 0.75 is not 0.75 -> 0.23)
                fell = percent(-drop, apart_from=self.config.accuracy_tolerance).removesuffix("%")
                now = recheck.accuracy.get(name)
                was = f" ({now - drop:.1%} -> {now:.1%})" if isinstance(now, (int, float)) else ""
                span = _points_interval(recheck.accuracy_delta_ci.get(name), recheck.accuracy_items.get(name),
                                        self.config.accuracy_tolerance)
                found.append((f"accuracy:{name}", f"accuracy of protected domain {name!r} fell by {fell} points{was}"
                                                  f"{span} (tolerance {self.config.accuracy_tolerance * 100:.1f} "
                                                  "points)"))
            value = recheck.score(name, variant)
            if self.config.max_sts is not None and value is not None and value > self.config.max_sts:
                found.append((f"sts:{name}", f"re-checked STS of protected domain {name!r} is {value:.4g} > "
                                             f"max_sts={self.config.max_sts} ({recheck.scored_as(name, variant)})"))
        return found

    def check(self, step: int, recheck: Recheck, variant: str, projected: list[str] | None = None,
              finished: bool = False) -> Decision:
        """Count consecutive violations and decide whether to stop (with ``early_stop``). ``projected``: this
        re-check's projected violations (:meth:`projected`), which count only with ``early_stop="projected"``.
        ``finished``: the re-check of a run that has ended (its last step): violations are reported, but there is
        nothing left to stop early."""
        keyed = self._violations(recheck, variant)
        found = [message for _, message in keyed]
        counted = found + list(projected or []) if self.config.early_stop == "projected" else found
        self.violations_in_a_row = self.violations_in_a_row + 1 if counted else 0
        new = [message for key, message in keyed if key not in self.violating]
        self.violating = [key for key, _ in keyed]
        decision = Decision(violations=found, new_violations=new)
        if counted and self.config.early_stop and self.violations_in_a_row >= self.config.patience and not finished:
            what = "negative transfer" if found else "negative transfer projected by the early forecast"
            self.stop_reason = (f"early stop at step {step} after {self.violations_in_a_row} consecutive re-check(s) "
                                f"with {what}: {'; '.join(counted)}")
            decision.stop, decision.reason = True, self.stop_reason
        return decision

    def violations_at_the_end_of(self, history: list[dict[str, Any]], variant: str) -> int:
        """The run of consecutive re-checks that count toward an early stop at the end of ``history`` (the
        callback's records), judged by this guard's rules (a resume may have changed them): a re-check that
        :meth:`breaks_a_rule` extends it, one that measured and broke none ends it; a failed re-check measured
        nothing and leaves it as it was."""
        run, measured_before = 0, False
        for record in history:
            if record.get("step", 0) <= 0 or "error" in record:
                continue  # the train-start record is no re-check; a failed one says nothing either way
            run = run + 1 if self.breaks_a_rule(record, variant, measured_before) else 0
            measured_before = measured_before or bool(record.get("loss_delta"))
        return run

    def breaks_a_rule(self, record: dict[str, Any], variant: str, measured_before: bool = True) -> bool:
        """Whether a history record of a re-check counts toward an early stop under this guard's rules: a rule
        broken, or with ``early_stop="projected"`` a projection whose whole interval lies above the tolerance
        (from the second measured re-check on, as :meth:`check` is given them)."""
        if self._violations(Recheck.from_dict(record), variant):
            return True
        return (self.config.early_stop == "projected" and measured_before and record.get("early_forecast") is not None
                and bool(self.projected(record["early_forecast"] or {}, record.get("loss_delta") or {},
                                        record.get("lr_area_fraction") or 0.0, record.get("early_forecast_ci"))))

    def violating_at_the_end_of(self, history: list[dict[str, Any]], variant: str) -> list[str]:
        """The rules broken at the last re-check of ``history`` that measured (:meth:`check`'s ``violating``)."""
        last = next((r for r in reversed(history) if r.get("step", 0) > 0 and "error" not in r), None)
        return [key for key, _ in self._violations(Recheck.from_dict(last), variant)] if last is not None else []


__all__ = ["Decision", "Guard", "GuardConfig"]
