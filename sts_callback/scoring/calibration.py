"""From forecast scores to a predicted change with an interval, and the early forecast (issue 8).

``Calibration`` is a linear map from one or more forecast features (``STS_icl``, ``signed_usage``, ...) to the
relative change of a domain's held-out NLL at the end of training (+ = worse), with a prediction interval from
the residuals (ordinary least squares; a small ridge penalty on standardised features when there are several).
It is fitted on measured runs (``sts validate`` results: :meth:`Calibration.from_validation`), judged by
leave-one-source-out cross-validation (:func:`leave_one_group_out`), and refitted online by the callback at each
re-check from the early forecasts of the end-of-training change.

The early forecast (:func:`lr_area_fraction`) extrapolates a change measured at step ``s`` to the end of
training by the share of the learning-rate schedule's area already spent: a first-order model in which the
weights move in proportion to the learning rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.config import ICL_LOSS_FEATURE, ICL_LOSS_SETTINGS
from ..core.run_store import FORECAST_FILE, FORECAST_FORMAT, HISTORY_FILE
from .signed import DEFAULT_SIGNED

FORMAT = "sts-calibration/1"
PRIOR = "domain_prior"  # the pattern feature of a calibration fitted with domain_prior=True
# fit_level_pattern's pattern_scale: the pattern on the changes as measured / over each run's spread
PATTERN_SCALES = ("absolute", "run")
# Calibrations shipped in the package (sts_callback/calibrations/), by name; each file's ``fitted_on`` states its
# scope (model, SAE, recipe, domains) and its leave-one-source-out numbers.
BUILTIN = {"gemma3-270m-lora": "gemma3_270m_lora.json",
           # for STSCallback(run_level="lookahead"): the level from the run's 2-step own-domain lookahead
           "gemma3-270m-lora-lookahead": "gemma3_270m_lora_lookahead.json",
           # the same level; the pattern also from a signed SAE score and each domain's in-context NLL change (the
           # forecast then computes it: STSConfig.icl_loss_tokens), the best step-0 forecast of the benchmark
           "gemma3-270m-lora-lookahead-icl": "gemma3_270m_lora_lookahead_icl.json",
           # for STSCallback(run_level="compressed"): the compressed run's change as the prediction, its interval
           # from its errors on the benchmark (the best-ordering forecast before training, at a quarter of the
           # run's steps)
           "gemma3-270m-lora-compressed": "gemma3_270m_lora_compressed.json"}


@dataclass
class Prediction:
    """Predicted relative NLL change and its interval (``level``: e.g. 0.9 for a 90% interval)."""

    mean: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def label(self) -> str:
        return change_label(self.low, self.high)


def change_label(low: float, high: float) -> str:
    """A predicted change's label: ``loss`` when its whole interval is above 0, ``gain`` below, else ``flat``."""
    return "loss" if low > 0 else "gain" if high < 0 else "flat"


@dataclass
class Calibration:
    """``change = intercept + sum_k coef_k * (x_k - center_k) / scale_k``, residual std ``sigma``.

    A *level + pattern* calibration (:meth:`fit_level_pattern`, ``centered=True``) splits the change in two: the
    level, the mean change over the domains forecast together, from run-level values of the run itself
    (``source_features``, e.g. ``lookahead_own``: how far the run-level lookahead moved the training data's own
    loss): ``intercept + sum_j source_coef_j * s_j``; and the pattern, each domain's departure from that mean,
    from its features centred over those domains: ``x_k - mean_k`` in place of ``x_k - center_k``. With
    ``domain_prior`` (fitted with ``domain_prior=True``) one more pattern feature, ``"domain_prior"``, is each
    domain's usual departure from its run's mean change over the runs it was fitted on: how the domain usually
    moves relative to the others (for a domain it has not seen: neutral). With ``pattern_scale="run"`` the pattern
    is fitted on each run's departures over their own spread (so runs that moved the domains by 60% and by 2% count
    alike) and predicted in the units of ``pattern_spread``, the fitted runs' median spread.

    ``early_blend`` (set by whoever fitted it on runs' trajectories, e.g. ``benchmarks/transfer/learned.py``):
    how much the callback's early projection and this calibration's step-0 prediction each count at each share
    of training, per early method (:func:`sts_callback.scoring.early.blend`); applied only to runs of
    ``early_blend_recipe`` (``"lora"``: adapters; ``"full"``: full fine-tunes) when set.
    """

    features: list[str]
    coef: list[float]
    intercept: float
    center: list[float]
    scale: list[float]
    sigma: float
    n: int
    level: float = 0.9
    ridge: float = 0.0
    fitted_on: dict[str, Any] = field(default_factory=dict)
    centered: bool = False
    source_features: list[str] = field(default_factory=list)
    source_coef: list[float] = field(default_factory=list)
    domain_prior: dict[str, float] = field(default_factory=dict)
    # early method -> rows [lr-area fraction, intercept, early weight, step-0 weight] (scoring.early.blend)
    early_blend: dict[str, list[list[float]]] = field(default_factory=dict)
    early_blend_recipe: str | None = None  # "lora" / "full": the runs it was fitted on; None: any
    pattern_scale: str = "absolute"  # "run": the pattern fitted on each run's departures over their spread
    pattern_spread: float = 1.0  # the pattern's predicted departures are multiplied by this (median run spread)
    # the level's own uncertainty (fit_level_pattern): the runs it was fitted on (0: not recorded, as in older
    # files: the interval as before), its residual variance, and the source values' mean and inverse centred
    # cross-product (the leverage of a new run's source values)
    level_runs: int = 0
    level_var: float = 0.0
    source_center: list[float] = field(default_factory=list)
    source_precision: list[list[float]] = field(default_factory=list)
    # the pattern coefficients' covariance over sigma^2 (ridge: A^-1 Z'Z A^-1, A = Z'Z + penalty), for a domain's
    # distance from the fitted centre; empty in older files: z.z / n, exact only for uncorrelated features
    pattern_precision: list[list[float]] = field(default_factory=list)
    # where it was loaded from ("built-in <name>" or the file's path), for the forecast to say; not saved
    source: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def fit(cls, x: Sequence[Sequence[float]] | Sequence[float], y: Sequence[float], features: Sequence[str], *,
            level: float = 0.9, ridge: float | None = None, fitted_on: dict[str, Any] | None = None) -> "Calibration":
        """Fit on rows ``x`` (one value per feature, or a plain list for one feature) and changes ``y``."""
        features = [features] if isinstance(features, str) else list(features)
        twice = sorted({f for f in features if features.count(f) > 1})
        if twice:  # one value would feed both columns, fitted on different data
            raise STSInputError(f"Calibration.fit got the feature(s) {twice} more than once; name each column once.")
        try:
            Y = np.asarray(y, dtype=np.float64)
            X = np.asarray(x, dtype=np.float64) if len(Y) else np.zeros((0, len(features)))
        except (TypeError, ValueError) as err:
            raise STSInputError(f"Calibration.fit needs x as rows of numbers (one per feature) and y as numbers: "
                                f"{err}") from err
        if Y.ndim == 2 and Y.shape[1] == 1:  # a column of changes
            Y = Y[:, 0]
        if Y.ndim != 1:
            raise STSInputError(f"Calibration.fit needs y as one change per row; got an array of shape {Y.shape}.")
        if X.ndim == 1 and len(features) == 1:  # a plain list for one feature
            X = X[:, None]
        if X.ndim != 2 or X.shape[0] != len(Y):
            raise STSInputError(f"Calibration.fit got x of shape {X.shape} for {len(Y)} changes y: give one row per "
                                "change, one value per feature (a plain list for one feature).")
        if X.shape[1] != len(features):
            raise STSInputError(f"Calibration.fit got {X.shape[1]} values per row for {len(features)} features.")
        if not 0 < level < 1:
            raise STSConfigError(f"level must be in (0, 1), e.g. 0.9 for a 90% interval; got {level!r}.")
        if ridge is not None and not ridge >= 0:  # from_dict refuses it: never save one
            raise STSConfigError(f"ridge must be >= 0 (or None for the default); got {ridge!r}.")
        if len(Y) < len(features) + 2:
            raise STSInputError(f"Calibration needs at least {len(features) + 2} measured (score, change) pairs for "
                                f"{len(features)} feature(s); got {len(Y)}. Add target domains, sources or seeds.")
        if not (np.isfinite(X).all() and np.isfinite(Y).all()):
            raise STSInputError("Calibration data contains NaN or inf; drop the domains whose score was not computed.")
        center = X.mean(axis=0)
        scale = X.std(axis=0)
        alpha = (1e-3 if len(features) > 1 else 0.0) if ridge is None else float(ridge)
        constant = [f for f, spread in zip(features, scale) if spread == 0]
        if constant and alpha == 0:  # no penalty: the normal equations are singular
            raise STSInputError(f"The feature(s) {constant} take one value over all {len(Y)} pairs, so they cannot "
                                "predict a change; fit on a feature that varies across the domains (features=, "
                                "`sts calibrate --features`), or on more runs.")
        scale[scale == 0] = 1.0
        Z = (X - center) / scale
        penalised = Z.T @ Z + alpha * len(Y) * np.eye(len(features))
        coef = np.linalg.solve(penalised, Z.T @ (Y - Y.mean()))
        residuals = Y - Y.mean() - Z @ coef
        dof = max(len(Y) - len(features) - 1, 1)
        return cls(features=features, coef=coef.tolist(), intercept=float(Y.mean()), center=center.tolist(),
                   scale=scale.tolist(), sigma=float(math.sqrt((residuals ** 2).sum() / dof)), n=len(Y), level=level,
                   ridge=alpha, fitted_on=dict(fitted_on or {}), pattern_precision=_coef_covariance(Z, penalised))

    @classmethod
    def fit_level_pattern(cls, runs: Sequence[tuple[Any, ...]], features: Sequence[str],
                          source_features: Sequence[str], *, domain_prior: bool = False, level: float = 0.9,
                          pattern_scale: str = "absolute", fitted_on: dict[str, Any] | None = None) -> "Calibration":
        """Fit a level + pattern calibration on measured runs, each ``(x, y, s)`` or ``(x, y, s, names)``: its
        domains' feature rows ``x`` ([domains, features]), their measured changes ``y``, the run's source-level
        values ``s`` and the domains' names. The level is a least-squares line of each run's mean change on
        ``s``; the pattern a ridge on features and changes centred within each run, its penalty chosen by
        leave-one-run-out. ``domain_prior=True`` (needs names) adds each domain's usual departure from its run's
        mean as a pattern feature (an additive run + domain model over the runs), for each run computed from the
        *other* runs only (so the fit cannot see a run's own changes in its feature). ``pattern_scale="run"``
        divides each run's departures by their standard deviation before the pattern and the prior are fitted, so
        that a few runs of large changes do not set the pattern for all (e.g. GRPO runs that moved the domains by
        +2% and by +60%); the prediction's departures are then in units of the runs' median spread."""
        features, source_features = list(features), list(source_features)
        if pattern_scale not in PATTERN_SCALES:
            raise STSConfigError(f"pattern_scale must be one of {PATTERN_SCALES}; got {pattern_scale!r}.")
        xs, ys, levels, means, names = [], [], [], [], []
        for run in runs:
            x, y, s = run[:3]
            X, Y = np.asarray(x, dtype=np.float64).reshape(len(y), -1), np.asarray(y, dtype=np.float64)
            S = np.asarray(s, dtype=np.float64).reshape(-1)
            if X.shape[1] != len(features) or len(S) != len(source_features):
                raise STSInputError(f"fit_level_pattern got rows of {X.shape[1]} features and {len(S)} source values "
                                    f"for {features} and {source_features}.")
            if not (np.isfinite(X).all() and np.isfinite(Y).all() and np.isfinite(S).all()) or len(Y) < 2:
                raise STSInputError("Each run needs at least 2 domains and finite features, changes and source values.")
            if domain_prior and (len(run) < 4 or len(run[3]) != len(Y)):
                raise STSInputError("domain_prior=True needs each run as (x, y, s, names), one name per domain.")
            xs.append(X - X.mean(axis=0))
            ys.append(Y - Y.mean())
            levels.append(S)
            means.append(Y.mean())
            names.append([str(n) for n in run[3]] if len(run) > 3 else [])
        if len(runs) < len(source_features) + 2:
            raise STSInputError(f"A level + pattern calibration needs at least {len(source_features) + 2} runs for "
                                f"{len(source_features)} source feature(s); got {len(runs)}. Add runs of other sources.")
        if not 0 < level < 1:
            raise STSConfigError(f"level must be in (0, 1), e.g. 0.9 for a 90% interval; got {level!r}.")
        # the pattern's residual dof: each run's changes lose one to their centring, each feature one more
        changes, n_features = sum(len(y) for y in ys), len(features) + bool(domain_prior)
        if changes - len(runs) < n_features + 1:
            raise STSInputError(f"A level + pattern calibration with {n_features} pattern feature(s)"
                                f"{' (with domain_prior)' if domain_prior else ''} needs at least {n_features + 1} "
                                f"changes beyond one per run; got {changes} changes in {len(runs)} runs. Add runs, or "
                                "fit on fewer features (`sts calibrate --features ...`, or `--prior-only` for the "
                                "domain prior alone).")
        spread = 1.0
        if pattern_scale == "run":
            spreads = [float(y.std()) for y in ys]
            if min(spreads) <= 0:
                raise STSInputError("pattern_scale='run' needs every run's domains to differ in their change; a run "
                                    "moved all its domains alike. Drop that run or use pattern_scale='absolute'.")
            ys = [y / s for y, s in zip(ys, spreads)]
            spread = float(np.median(spreads))
        prior: dict[str, float] = {}
        if domain_prior:
            prior = _domain_effects(names, ys)
            xs = [np.column_stack([X, _centred(_domain_effects(names, ys, leave_out=i), names[i])])
                  for i, X in enumerate(xs)]
            features = [*features, PRIOR]
        A = np.column_stack([np.ones(len(levels)), np.asarray(levels)])
        line, *_ = np.linalg.lstsq(A, np.asarray(means), rcond=None)
        level_residuals = np.asarray(means) - A @ line
        X, Y = np.vstack(xs), np.concatenate(ys)
        scale = X.std(axis=0)
        scale[scale == 0] = 1.0
        Z = X / scale
        groups = np.concatenate([[i] * len(y) for i, y in enumerate(ys)])
        alpha = _ridge_by_leaving_out(Z, Y, groups)
        penalised = Z.T @ Z + alpha * np.eye(len(features))
        coef = np.linalg.solve(penalised, Z.T @ Y)
        pattern_residuals = Y - Z @ coef
        level_var = float((level_residuals ** 2).sum()) / max(len(means) - len(source_features) - 1, 1)
        sources = np.asarray(levels, dtype=float).reshape(len(levels), -1)  # one row of source values per run
        centred = sources - sources.mean(0)
        precision = np.linalg.pinv(centred.T @ centred) if source_features else np.zeros((0, 0))
        pattern_var = float((pattern_residuals ** 2).sum()) / max(len(Y) - len(runs) - len(features), 1)
        return cls(features=features, coef=coef.tolist(), intercept=float(line[0]), center=[0.0] * len(features),
                   scale=scale.tolist(), sigma=math.sqrt(level_var + pattern_var * spread ** 2), n=len(Y),
                   level=level, ridge=alpha, fitted_on={**(fitted_on or {}), "runs": len(runs)}, centered=True,
                   source_features=source_features, source_coef=[float(c) for c in line[1:]], domain_prior=prior,
                   pattern_scale=pattern_scale, pattern_spread=spread, level_runs=len(runs), level_var=level_var,
                   source_center=sources.mean(0).tolist() if source_features else [],
                   source_precision=precision.tolist(), pattern_precision=_coef_covariance(Z, penalised))

    def run_level_inputs(self) -> list[str]:
        """The features and level values this calibration needs from a training run's run-level term
        (``lookahead``, ``lookahead_own``, ...): a forecast made without training cannot give them."""
        names = {*RUN_LEVEL_METHODS, *(own_feature(m) for m in RUN_LEVEL_METHODS)}
        return [f for f in [*self.features, *self.source_features] if f in names]

    @property
    def fitted_run_level_steps(self) -> int | None:
        """The lookahead steps its run-level feature was measured after, when it uses one: the level's scale (a
        1-step change is not a 3-step one), which a forecast applying it must match."""
        if not self.run_level_inputs():
            return None
        return ((self.fitted_on or {}).get("scope") or {}).get("run_level_steps")

    @property
    def fitted_run_steps(self) -> list[int]:
        """The lengths (optimizer steps) of the runs it was fitted on, where it records them (``sts calibrate
        --runs``: each run's; a built-in: its scope's ``run_steps``): how far training moved the domains scales
        with the run's length, so its level belongs to runs of about that length."""
        fitted = self.fitted_on or {}
        steps = (fitted.get("scope") or {}).get("run_steps", fitted.get("steps"))
        steps = [steps] if isinstance(steps, int) else steps if isinstance(steps, list) else []
        return [int(s) for s in steps if isinstance(s, int) and not isinstance(s, bool) and s > 0]

    @property
    def fitted_run_level_share(self) -> float | None:
        """A compressed run's steps as a share of its run's, when its run-level feature is one: the feature's
        scale (a run compressed into an eighth of its steps forgets more than one into a quarter)."""
        if not self.run_level_inputs():
            return None
        return ((self.fitted_on or {}).get("scope") or {}).get("run_level_share")

    def blend_table(self, method: str, recipe: str | None = None) -> list[list[float]]:
        """The early blend for ``method`` on a run of ``recipe`` (empty: none, or fitted on the other recipe)."""
        if self.early_blend_recipe is not None and recipe is not None and recipe != self.early_blend_recipe:
            return []
        return self.early_blend.get(method, [])

    @property
    def score_features(self) -> list[str]:
        """The features a forecast must provide for each domain (the domain prior is the calibration's own)."""
        return [f for f in self.features if f != PRIOR]

    def _z(self, values: Sequence[float]) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - np.asarray(self.center)) / np.asarray(self.scale)

    def predict_all(self, domains: dict[str, dict[str, float | None]], source: dict[str, float | None] | None = None,
                    ) -> dict[str, Prediction]:
        """Predicted change of every domain that has the features (``domains``: name -> feature values); a
        centred calibration centres them over those domains and takes its level from ``source``."""
        if self.domain_prior:  # unseen domains neutral once centred over the domains
            priors = _prior_values(self.domain_prior, list(domains))
            domains = {name: {**values, PRIOR: p} for (name, values), p in zip(domains.items(), priors)}
        usable = {name: [float(values[f]) for f in self.features] for name, values in domains.items()
                  if all(values.get(f) is not None for f in self.features)}
        unfinite = [name for name, values in usable.items() if not all(math.isfinite(v) for v in values)]
        if unfinite:  # one domain's score the forecast could not compute: that domain, not every prediction, goes
            warnings.warn(f"Domain(s) {unfinite} have a feature that is not a finite number (a score the forecast "
                          "could not compute there): not predicted.", STSDataWarning, stacklevel=2)
            usable = {name: values for name, values in usable.items() if name not in unfinite}
            if not usable:
                return {}
        if not usable:
            if domains:  # an empty result would read as "nothing to predict": say which features are missing
                absent = [f for f in self.features if all(v.get(f) is None for v in domains.values())]
                raise STSInputError(f"No domain has every feature this calibration uses ({self.features}"
                                    + (f"; none has {absent}" if absent else "") + "). Compute them in the forecast "
                                    "(compute_icl=True for STS_icl; run_level=... for a run-level feature), or fit "
                                    "a calibration on the features it has (`sts calibrate --features ...`).")
            return {}
        offset = np.zeros(len(self.features))
        if self.centered:
            offset = np.asarray(list(usable.values())).mean(axis=0) - np.asarray(self.center)
        base = self._level(source)
        leverage = self._level_leverage(source)
        return {name: self._predict(np.asarray(values) - offset, base, leverage) for name, values in usable.items()}

    def _level_leverage(self, source: dict[str, float | None] | None) -> float | None:
        """How far the level's line is from its fitted runs at ``source`` (0 at their mean); None when the
        calibration does not record its level's runs (older files: the interval as before)."""
        if not self.level_runs:
            return None
        if not self.source_features:
            return 0.0
        d = np.asarray([float(source[f]) for f in self.source_features]) - np.asarray(self.source_center)
        return float(d @ np.asarray(self.source_precision) @ d)

    def _level(self, source: dict[str, float | None] | None) -> float:
        if not self.source_features:
            return self.intercept
        missing = [f for f in self.source_features if (source or {}).get(f) is None]
        if missing:
            raise STSInputError(f"This calibration takes its level from {missing} (run-level values of the run "
                                "itself); the forecast lacks them: train with run_level=... .")
        return self.intercept + sum(c * float(source[f]) for c, f in zip(self.source_coef, self.source_features))

    def predict(self, values: Sequence[float] | dict[str, float] | float) -> Prediction:
        """Predicted change for one domain's feature values (a dict by feature name, a list, or one number)."""
        if self.centered or self.source_features:
            raise STSInputError("A level + pattern calibration predicts the domains of a forecast together: use "
                                "predict_all(domains, source).")
        if isinstance(values, dict):
            missing = [f for f in self.features if values.get(f) is None]
            if missing:
                raise STSInputError(f"This calibration needs the feature(s) {missing}; the forecast lacks them.")
            values = [values[f] for f in self.features]
        elif not isinstance(values, (str, bytes)) and np.ndim(values) == 0:  # a number, a 0-d array or tensor
            values = [values]
        try:
            if isinstance(values, (str, bytes)) or any(isinstance(v, (str, bytes, bool)) for v in values):
                raise TypeError
            values = [float(v) for v in values]  # numpy and torch numbers too
        except (TypeError, ValueError):
            raise STSInputError(f"predict() takes this calibration's feature values as numbers: a dict by name or a "
                                f"list in the order {self.features}, got {values!r}.") from None
        if len(values) != len(self.features):  # numpy would spread one number over every feature
            raise STSInputError(f"This calibration uses {len(self.features)} feature(s), {self.features}; got "
                                f"{len(values)} value(s). Give a dict by feature name.")
        self._check_finite(dict(zip(self.features, values)))
        return self._predict(np.asarray(values, dtype=np.float64), self.intercept)

    @staticmethod
    def _check_finite(values: dict[str, float]) -> None:
        """A feature that is not a finite number (a score the forecast could not compute) is the input's, named."""
        bad = {f: v for f, v in values.items() if not math.isfinite(float(v))}
        if bad:
            raise STSInputError(f"The feature value(s) {bad} are not finite numbers: the forecast could not compute them there (a diverged "
                                "model, or too few tokens); the calibration cannot predict from them.")

    def _predict(self, values: np.ndarray, base: float, leverage: float | None = None) -> Prediction:
        z = self._z(values)
        mean = base + self.pattern_spread * float(z @ np.asarray(self.coef))
        from scipy.stats import t

        # Interval: residual spread, widened for the mean's uncertainty and the distance from the fitted centre.
        distance = (float(z @ np.asarray(self.pattern_precision) @ z) if self.pattern_precision
                    else float(z @ z) / self.n)
        widen = 1 + 1 / self.n + distance
        if leverage is None:
            width = float(t.ppf(0.5 + self.level / 2, max(self.n - len(self.features) - 1, 1))) * self.sigma * \
                math.sqrt(widen)
        else:  # the level is known from level_runs runs, not from n changes: its own error and its line's
            level_var = self.level_var * (1 + 1 / self.level_runs + leverage)
            # sigma * sigma: an edited sigma of 1e200 gives inf (said below), where sigma ** 2 raised OverflowError
            pattern_var = max(self.sigma * self.sigma - self.level_var, 0.0) * widen
            dfs = (max(self.level_runs - len(self.source_features) - 1, 1),
                   max(self.n - self.level_runs - len(self.features), 1))
            # Welch-Satterthwaite: the t of a sum of two variances estimated with few and many dof
            total = level_var + pattern_var
            df = total ** 2 / (level_var ** 2 / dfs[0] + pattern_var ** 2 / dfs[1]) if total > 0 else 1.0
            width = float(t.ppf(0.5 + self.level / 2, max(df, 1.0))) * math.sqrt(total)
        if not (math.isfinite(mean) and math.isfinite(width)):  # e.g. a hand-edited coefficient of 1e308
            raise STSConfigError(f"The calibration predicts a non-finite change ({mean} +- {width}) from finite "
                                 f"features {[float(v) for v in values]}: its fields are out of range; refit it "
                                 "(`sts calibrate`).")
        # a held-out NLL cannot fall below 0: a relative change below -100% is not a possible outcome
        return Prediction(mean=max(mean, -1.0), low=max(mean - width, -1.0), high=max(mean + width, -1.0),
                          level=self.level)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k != "source"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """A calibration from its dict (:meth:`to_dict`); every field is checked here, so that a corrupt or
        hand-edited file fails when it is loaded, naming the field, not later as NaN or a numpy error."""
        if not isinstance(data, dict):
            raise STSInputError(f"Not an STS calibration: {_kind(data)}, not a JSON object of format {FORMAT!r}; "
                                "write one with Calibration.save or `sts calibrate`.")
        if data.get("format") != FORMAT:
            raise STSInputError(f"Not an STS calibration (format={data.get('format')!r}); write one with "
                                "Calibration.save or `sts calibrate`.")
        return cls(**_checked_fields({k: v for k, v in data.items() if k != "format"}))

    def save(self, path: str | Path) -> Path:
        from ..core.atomic import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            return cls.from_dict(_read_json(path))
        except STSInputError as err:
            raise STSInputError(f"{path}: {err}") from err

    @classmethod
    def from_runs(cls, runs: Sequence[str | Path], features: Sequence[str] | None = None, *,
                  domain_prior: bool = True, level: float = 0.9, pattern_scale: str = "absolute") -> "Calibration":
        """A level + pattern calibration (:meth:`fit_level_pattern`) fitted on training runs with the callback
        (their output folders): each run's domains' forecast scores (``features``; default: every score all of
        them have) against the change measured at its last re-check; the level from the run-level term's own
        change (``lookahead_own`` / ``first_order_own``) when every run has one, else the runs' mean; with each
        domain's usual departure (``domain_prior``). Leave the training data itself out of the target domains.
        ``pattern_scale="run"``: the pattern over each run's spread (:meth:`fit_level_pattern`), for runs whose
        changes differ in scale by an order of magnitude (RL runs). A level from the run-level term holds for its
        number of lookahead steps, recorded as ``fitted_on["scope"]["run_level_steps"]`` (the callback takes it)."""
        records = run_records([runs] if isinstance(runs, (str, Path)) else runs)
        methods = {(r["run_level"] or {}).get("method") for r in records}
        has_level = len(methods) == 1 and None not in methods and all(
            r["run_level"].get("own_change") is not None for r in records)
        if not has_level and methods != {None}:  # some runs have a level feature, not all alike: say why it is unused
            kinds = sorted(_run_level_kind(r) for r in records)
            warnings.warn(f"The runs' run-level terms differ ({'; '.join(kinds)}): the level is the runs' mean "
                          "change, not the run-level term's own change. Give every run the same run_level for a "
                          "level from it.", STSDataWarning, stacklevel=2)
        source_features = [own_feature(methods.pop())] if has_level else []
        _warn_mixed_scope(records)
        scope = shared_scope([r["scope"] for r in records])  # warned about when applied to another setup
        if has_level and records[0]["run_level"]["method"] == "compressed":  # its scale: the share of the run
            shares = [r["run_level"].get("run_share") for r in records]
            if None not in shares and max(shares) - min(shares) > 0.25 * min(shares):
                raise STSInputError(f"The runs' compressed runs took different shares of their runs' steps "
                                    f"({min(shares):.0%} to {max(shares):.0%}); fit on runs with the same share.")
            if None not in shares:
                scope["run_level_share"] = float(np.mean(shares))
        elif has_level:  # the own change grows with the lookahead's steps: the level holds for that many only
            steps = sorted({r["run_level"].get("steps") for r in records}, key=str)
            if len(steps) > 1:
                raise STSInputError(f"The runs' run-level terms took different numbers of steps ({steps}); fit on "
                                    "runs with the same run_level_steps.")
            if steps[0] is not None:
                scope["run_level_steps"] = steps[0]
        if features is None:
            common = None
            for r in records:
                for name in r["changes"]:
                    present = {k for k, v in r["scores"].get(name, {}).items() if v is not None}
                    common = present if common is None else common & present
            features = sorted(common or ())
        features = _feature_names(features)
        available = sorted({k for r in records for scores in r["scores"].values() for k, v in scores.items()
                            if _finite(v)})
        unknown = [f for f in features if f not in available]
        if unknown:
            hint = (f" The domain prior ({PRIOR}) is not a forecast score: it is added by default, and `sts calibrate "
                    "--runs --prior-only` fits on it alone." if PRIOR in unknown else "")
            raise STSInputError(f"No run has the feature(s) {unknown}; the runs' forecasts have {available}. Pass "
                                f"features from those.{hint}")
        rows = []
        for r in records:
            names = [n for n, change in r["changes"].items() if change is not None
                     and all(_finite(r["scores"].get(n, {}).get(f)) for f in features)]
            if len(names) < 2:
                raise STSInputError(f"{r['run']}: {len(names)} domain(s) have both a measured change and the "
                                    f"features {features}; a run needs at least 2.")
            x = [[float(r["scores"][n][f]) for f in features] for n in names]
            own = [float(r["run_level"]["own_change"])] if source_features else []
            rows.append((x, [float(r["changes"][n]) for n in names], own, names))
        fitted_on = {"training_runs": [r["run"] for r in records], "steps": [r["step"] for r in records],
                     **({"scope": scope} if scope else {})}
        if ICL_LOSS_FEATURE in features:  # what a forecast applying it measures with (the settings: warned about)
            measured = {key: {r["icl_loss"][key] for r in records} for key in records[0]["icl_loss"]}
            fitted_on["icl_loss"] = {("tokens" if key == "icl_loss_tokens" else key): values.pop()
                                     for key, values in measured.items() if len(values) == 1
                                     and isinstance(next(iter(values)), int)}
        if domain_prior:
            _warn_unlinked_domains([(str(r["run"]), set(names)) for r, (_, _, _, names) in zip(records, rows)])
        calibration = cls.fit_level_pattern(rows, features, source_features, domain_prior=domain_prior, level=level,
                                            pattern_scale=pattern_scale, fitted_on=fitted_on)
        changes = np.concatenate([y for _, y, _, _ in rows])
        if calibration.sigma <= 0.01 * float(changes.std()):  # intervals of a fit that reproduces its runs exactly
            warnings.warn(f"The calibration reproduces its {len(rows)} runs almost exactly (residual std "
                          f"{calibration.sigma:.2g} against changes spread {float(changes.std()):.2g}): its intervals "
                          "will be far too narrow for a new run. Are some runs copies of one another, or too few "
                          "runs for the features? Fit on distinct runs, or on fewer features.", STSDataWarning,
                          stacklevel=2)
        return calibration

    @classmethod
    def from_validation(cls, results: Sequence[str | Path | dict[str, Any]] | str | Path | dict[str, Any],
                        features: Sequence[str] = (DEFAULT_SIGNED,), *, level: float = 0.9) -> "Calibration":
        """Fit on every (domain, seed) of one or more ``validation.json`` files (or their folders). ``fitted_on``
        records the files and the scope they share (model class, SAE width and hook, from the forecast saved
        with each validation), for :meth:`Forecast.apply_calibration` to warn on another setup."""
        x, y, used, scopes = [], [], [], []
        features = _feature_names(features)
        records = _validation_records(results)
        for data, source in records:
            for seed in data["per_seed"]:
                for domain, scores in seed["scores"].items():
                    change = (seed.get("nll_delta_rel") or {}).get(domain)
                    unmeasured = change is None or not math.isfinite(change)  # a diverged run's: null, or NaN
                    if unmeasured or any(scores.get(f) is None for f in features):  # no pair
                        continue
                    x.append([float(scores[f]) for f in features])
                    y.append(float(change))
            used.append(source)
            scopes.append(_validation_scope(data, source))
        _warn_mixed_scope([{"run": str(source), "scope": scope} for source, scope in zip(used, scopes)])
        if not y:
            available = sorted({k for data, _ in records for seed in data["per_seed"]
                                for scores in seed["scores"].values() for k, v in scores.items() if v is not None})
            measured = any(value is not None and math.isfinite(value) for data, _ in records
                           for seed in data["per_seed"] for value in (seed.get("nll_delta_rel") or {}).values())
            if not measured:  # a diverged run: every change NaN, written null
                raise STSInputError("No domain of these validation runs has a finite measured change (every held-out "
                                    "NLL change is null: the training diverged); validate again with a lower "
                                    "learning rate.")
            raise STSInputError(f"No domain of these validation runs has the feature(s) {list(features)}; "
                                f"they have {available}. Pass features= (`sts calibrate --features`) from those, "
                                "or re-run `sts validate`.")
        scope = shared_scope(scopes)
        # the runs' length and rate: how far training moved the domains, which the level (intercept) is
        steps = sorted({int(data["training"]["steps"]) for data, _ in records
                        if isinstance((data.get("training") or {}).get("steps"), int)})
        rates = sorted({float(data["training"]["learning_rate"]) for data, _ in records
                        if isinstance((data.get("training") or {}).get("learning_rate"), (int, float))})
        if len(steps) > 1 or len(rates) > 1:
            warnings.warn(f"The validations were trained for different lengths or rates (steps {steps}, learning "
                          f"rates {rates}): one level fits them all, and the changes it predicts belong to none of "
                          "them. Fit one calibration per recipe.", STSDataWarning, stacklevel=2)
        spare = len(y) - len(features) - 1
        if spare <= 2:
            warnings.warn(f"The calibration fits {len(features)} feature(s) and a level on {len(y)} (domain, seed) "
                          f"pairs: {max(spare, 0)} degree(s) of freedom left, so it can follow these runs' noise and "
                          "its intervals cannot be trusted on a new run. Validate more sources (or seeds), or fit "
                          "fewer features.", STSDataWarning, stacklevel=2)
        calibration = cls.fit(x, y, features, level=level,
                              fitted_on={"validations": used, "pairs": len(y), **({"steps": steps} if steps else {}),
                                         # how far the changes spread: what the residual std is read against
                                         "changes_spread": float(np.std(y)),
                                         **({"scope": scope} if scope else {})})
        changes = np.asarray(y, dtype=np.float64)
        if spare > 2 and calibration.sigma <= 0.01 * float(changes.std()):
            warnings.warn(f"The calibration reproduces its {len(y)} pairs almost exactly (residual std "
                          f"{calibration.sigma:.2g} against changes spread {float(changes.std()):.2g}): its intervals "
                          "will be far too narrow for a new run. Fit on more validations, or on fewer features.",
                          STSDataWarning, stacklevel=2)
        return calibration


RUN_LEVEL_METHODS = ("lookahead", "compressed", "first_order")  # the run-level terms (pipelines.runlevel), a feature each


def _run_level_kind(record: dict[str, Any]) -> str:
    """What a calibration run's run-level term is, for a message: its method, or why it gives no level."""
    level = record["run_level"]
    if not level:
        return f"{record['run']}: no run-level term"
    missing = "" if level.get("own_change") is not None else " without the training data's own change"
    return f"{record['run']}: {level['method']}{missing}"


def own_feature(method: str) -> str:
    """The calibration feature of a run-level method's own change (``lookahead`` -> ``lookahead_own``)."""
    return f"{method}_own"


def run_records(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Per training run with the callback (its output folder, or the STS folder in it): the domains' forecast
    scores, the run-level term's settings and the held-out loss change measured at its last re-check."""
    from ..core.run_store import RunStore

    stores = [RunStore(run_sts_folder(item)) for item in runs]
    _refuse_duplicates(runs, stores)
    parents: dict[Path, list[str]] = {}
    for item in runs:  # a validate() output's seed folders: one training source, trained again with another seed
        folder = run_sts_folder(item).resolve().parent  # a seed folder, or its sts/ folder
        if folder.name.startswith("seed-") and (folder.parent / "sts" / "validation.json").is_file():
            parents.setdefault(folder.parent, []).append(str(item))
    for parent, seeds in parents.items():
        if len(seeds) > 1:
            warnings.warn(f"Runs {seeds} are seeds of one validation ({parent}): one training source, so the level's "
                          "spread across them is seed noise, not how far runs of other sources move the domains "
                          "(its intervals come out too narrow). Give runs of several sources.", STSDataWarning,
                          stacklevel=3)
    records = []
    for item, store in zip(runs, stores):
        if not Path(item).exists():
            raise STSInputError(f"{item}: no such folder; pass the output_dir of a run trained with STSCallback.")
        seeds = sorted(p.name for p in Path(item).glob("seed-*") if (p / "sts" / HISTORY_FILE).is_file())
        if seeds:  # validate()'s output: one training run per seed, each in its own folder
            raise STSInputError(f"{item} is a validate() output of {len(seeds)} seed run(s) ({', '.join(seeds)}), "
                                "which `sts calibrate` reads without --runs (its validation.json). --runs wants runs "
                                "of several training sources (their level is fitted across sources); pass one seed "
                                f"folder of it (e.g. {Path(item) / seeds[0]}) among other sources' runs.")
        if not store.forecast_path.is_file():
            inside = next((parent for parent in Path(item).resolve().parents
                           if (run_sts_folder(parent) / FORECAST_FILE).is_file()), None)
            hint = (f" It is inside the run {inside}: pass that folder (a checkpoint's STS folder holds the "
                    "re-checks up to it, not the run's forecast)." if inside is not None else "")
            raise STSInputError(f"{item}: no forecast.json (looked in {store.root}); pass the output_dir of a run "
                                f"trained with STSCallback, or its STS folder.{hint}")
        forecast = _run_forecast(store.forecast_path)
        history = _run_history(store)
        measured = [r for r in history if r.get("loss_delta")]
        if not measured:
            raise STSInputError(f"{item}: no re-check measured a held-out loss change (history.jsonl); the run needs "
                                "re-checks (recheck_steps, or a save at the end) to calibrate on.")
        # a run stopped part-way is refused whatever it loaded at its end (EarlyStoppingCallback loads the best)
        _refuse_unfinished(item, max(measured, key=lambda r: r["step"]))
        # a run that loaded its best checkpoint at the end (load_best_model_at_end) ends with that step's weights
        loaded = history[-1].get("loaded_best_step") if history else None
        if loaded is not None:
            measured = [r for r in measured if r["step"] <= loaded]
            if not measured or max(r["step"] for r in measured) != loaded:
                raise STSInputError(f"{item}: the run ended with its best checkpoint's weights (step {loaded}, "
                                    "load_best_model_at_end), which no re-check measured: the changes it has are of "
                                    f"weights the run no longer has. Re-check at every save to calibrate on it. "
                                    f"{_RUN_FIX}")
        # each domain's latest measured change: re-checks that rotate the domains (loss_domains=) measure only
        # some of them each time, so the last re-check alone would leave the others out of the fit
        changes: dict[str, float] = {}
        not_finite: dict[str, list[int]] = {}
        for record in sorted(measured, key=lambda r: r["step"]):
            for name, value in record["loss_delta"].items():
                if _finite(value):
                    changes[name] = value
                elif value is not None:
                    not_finite.setdefault(name, []).append(record["step"])
        left_out = sorted(n for n in not_finite if n not in changes)
        if left_out:  # a re-check that failed for a domain records no number; one that wrote NaN is the same
            steps = sorted({step for n in left_out for step in not_finite[n]})
            warnings.warn(f"{item}: the change of {left_out} is not a finite number (history.jsonl, step(s) "
                          f"{steps}); left out of the fit, as an unmeasured domain is.", STSDataWarning, stacklevel=3)
        last = max(measured, key=lambda r: r["step"])
        # a domain the last re-check measured as no finite number (NaN / inf: the loss diverged), as against one it
        # left to a later turn (absent, or null): an earlier change is not the end of training
        failed = sorted(n for n, v in last["loss_delta"].items() if v is not None and not _finite(v) and n in changes)
        if failed:
            warnings.warn(f"{item}: the last re-check (step {last['step']}) has no finite change for {failed} "
                          "(history.jsonl): left out of the fit rather than taken from an earlier step, which is not "
                          "the end of training.", STSDataWarning, stacklevel=3)
            changes = {n: v for n, v in changes.items() if n not in failed}
        records.append({"run": str(item), "step": last["step"], "changes": changes,
                        "scores": {name: d.get("scores") or {} for name, d in forecast.get("domains", {}).items()},
                        "run_level": (forecast.get("settings") or {}).get("run_level"),
                        "icl_loss": {k: ((forecast.get("settings") or {}).get("config") or {}).get(k)
                                     for k in ("icl_loss_tokens", *ICL_LOSS_SETTINGS)},
                        "scope": forecast_scope(forecast.get("settings"))})
    return records


def run_sts_folder(run: str | Path) -> Path:
    """The STS folder of a training run given by its output_dir (``<output_dir>/sts``) or by that folder itself."""
    return Path(run) / "sts" if (Path(run) / "sts").is_dir() else Path(run)


_RUN_FIX = "Rerun that run to the end, or leave it out of the runs to calibrate on."


def _refuse_duplicates(runs: Sequence[str | Path], stores: Sequence[Any]) -> None:
    """One run passed twice (its folder, its sts/ folder, a trailing slash, a copy of its folder) would count as
    two agreeing runs."""
    seen: dict[Path, list[str]] = {}
    for item, store in zip(runs, stores):
        seen.setdefault(Path(store.root).resolve(), []).append(str(item))
    twice = [f"{', '.join(items)} (all {root})" for root, items in seen.items() if len(items) > 1]
    if twice:
        raise STSInputError(f"The same run was passed more than once: {'; '.join(twice)}. Pass each run once: a "
                            "repeated run would count as several agreeing runs and narrow the intervals.")
    contents: dict[bytes, list[str]] = {}
    for item, store in zip(runs, stores):
        files = [store.forecast_path, store.path(HISTORY_FILE)]
        if all(f.is_file() for f in files):
            contents.setdefault(hashlib.sha256(b"".join(f.read_bytes() for f in files)).digest(), []).append(str(item))
    copies = [", ".join(items) for items in contents.values() if len(items) > 1]
    if copies:
        raise STSInputError(f"These runs hold the same forecast and history, copies of one run: {'; '.join(copies)}. "
                            "Pass each run once: a copy would count as another agreeing run and narrow the "
                            "intervals.")


def _run_forecast(path: Path) -> dict[str, Any]:
    """A run's forecast.json, refused with the file named when it is cut or not a forecast."""
    from ..core.run_store import FORECAST_FORMAT

    try:
        forecast = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise STSInputError(f"{path} is not readable JSON ({err}): the file is cut or corrupt (the run died while "
                            f"writing it?). {_RUN_FIX}") from err
    if not isinstance(forecast, dict) or forecast.get("format") != FORECAST_FORMAT:
        what = f"format={forecast.get('format')!r}" if isinstance(forecast, dict) else _kind(forecast)
        raise STSInputError(f"{path} is not an STS forecast ({what}); pass the output_dir of a run trained with "
                            "STSCallback, or its STS folder.")
    domains = forecast.get("domains", {})
    if not isinstance(domains, dict) or not all(isinstance(d, dict) for d in domains.values()) or not isinstance(
            forecast.get("settings") or {}, dict):
        raise STSInputError(f"{path} is malformed: its 'domains' or 'settings' is not an object as STSCallback "
                            f"writes it. {_RUN_FIX}")
    return forecast


def _run_history(store: Any) -> list[dict[str, Any]]:
    """A run's re-check records, refused with the file named when one is not a re-check record."""
    path = store.path("history.jsonl")
    try:
        history = store.read_history()
    except (OSError, UnicodeDecodeError) as err:
        raise STSInputError(f"{path} cannot be read ({err}). {_RUN_FIX}") from err
    for i, record in enumerate(history):
        ok = isinstance(record, dict) and (not record.get("loss_delta") or (
            isinstance(record["loss_delta"], dict) and isinstance(record.get("step"), int)))
        if not ok:
            raise STSInputError(f"{path}: record {i + 1} is not a re-check record (a JSON object with 'step' and "
                                f"'loss_delta'); the file is corrupt. {_RUN_FIX}")
    return history


def _refuse_unfinished(item: str | Path, last: dict[str, Any]) -> None:
    """A run that stopped part-way measured a change short of the end of training: the fit would take it for
    the end's. ``lr_area_fraction`` is absent in old histories and runs without a known schedule: not refused."""
    if last.get("ended_early"):  # stopped by STS's guard or another callback alike (a record without a fraction)
        raise STSInputError(f"{item}: training ended at step {last['step']}, before max_steps="
                            f"{last['ended_early'].get('max_steps')} (stopped early): its change is not an "
                            f"end-of-training change. {_RUN_FIX}")
    fraction = last.get("lr_area_fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and fraction < 1 - 1e-6:
        raise STSInputError(f"{item}: its last re-check (step {last['step']}) is at {fraction:.0%} of the learning-"
                            "rate schedule: the run stopped before the end (it died or was stopped) or was not "
                            "re-checked at its end (recheck_at_end=False), and its change is not an end-of-training "
                            f"change. {_RUN_FIX}")


# what Forecast._check_scope compares; the SAE's weights by their hash (a same-shaped SAE of another seed differs);
# the shift: a calibration fitted on SFT forecasts does not carry over to a DPO, RL or distillation one
SCOPE_KEYS = ("model_class", "d_in", "d_sae", "hook_name", "sae_fingerprint", "shift", "recipe")


def forecast_scope(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The model class, SAE (width, hook), shift and training recipe (``"lora"``: adapters, ``"full"``; recorded by
    a training run) a forecast's ``settings`` record: a calibration's scope."""
    settings = settings if isinstance(settings, dict) else {}
    sae = settings.get("sae") if isinstance(settings.get("sae"), dict) else {}
    here = {"model_class": settings.get("model_class"), **sae, "shift": settings.get("shift", "in_context"),
            "recipe": settings.get("recipe")}
    return {k: here[k] for k in SCOPE_KEYS if here.get(k) is not None}


def _warn_unlinked_domains(runs: list[tuple[str, set[str]]]) -> None:
    """Each run's domain prior is read against the run's other domains: runs whose domains share none with the
    rest (directly or through other runs) leave the priors of the two groups with no common level."""
    groups: list[tuple[list[str], set[str]]] = []
    for run, domains in runs:
        linked = [g for g in groups if g[1] & domains]
        merged = ([run] + [r for g in linked for r in g[0]], set(domains).union(*(g[1] for g in linked)))
        groups = [g for g in groups if g not in linked] + [merged]
    if len(groups) > 1:
        described = "; ".join(f"{sorted(runs_)} on {sorted(domains)}" for runs_, domains in groups)
        warnings.warn(f"The runs fall into {len(groups)} groups with no target domain in common ({described}): the "
                      "domain prior of one group's domains has no common level with the other's, so a forecast "
                      "over domains of both orders them by chance. Give the runs some target domains in common, "
                      "or (from Python) fit without the prior: Calibration.from_runs(..., domain_prior=False).",
                      STSDataWarning, stacklevel=3)


def _warn_mixed_scope(records: Sequence[dict[str, Any]]) -> None:
    """Runs of different models or SAEs: pooling them may be deliberate, but the scope then drops the key, so
    applying the calibration to yet another model or SAE would not be warned about."""
    mixed = []
    for key in SCOPE_KEYS:
        by_value: dict[str, list[str]] = {}
        for r in records:
            if r["scope"].get(key) is not None:
                by_value.setdefault(repr(r["scope"][key]), []).append(r["run"])
        if len(by_value) > 1:
            mixed.append(f"{key}: " + "; ".join(f"{v} ({', '.join(runs)})" for v, runs in by_value.items()))
    if mixed:
        warnings.warn(f"The runs were trained on different setups ({' | '.join(mixed)}). The calibration pools "
                      "them and its scope leaves these keys out, so applying it to another setup (model, SAE, shift) "
                      "will not be warned about. Fit on the runs of one setup unless pooling is intended.",
                      STSDataWarning, stacklevel=3)


def shared_scope(scopes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The scope entries every run that records them agrees on (runs of two models: no model_class)."""
    shared: dict[str, Any] = {}
    for key in SCOPE_KEYS:
        values = [s[key] for s in scopes if s.get(key) is not None]
        if values and all(v == values[0] for v in values):
            shared[key] = values[0]
    return shared


def _validation_scope(data: dict[str, Any], source: str | None) -> dict[str, Any]:
    """The scope of a validation: from the forecast `sts validate` saves beside validation.json (its folder
    copied elsewhere: the copy's), else the path it records; {} when neither can be read."""
    candidates = [Path(source).parent / "forecast.json"] if source else []
    recorded = (data.get("files") or {}).get("forecast") if isinstance(data.get("files"), dict) else None
    candidates += [Path(recorded)] if recorded else []
    for path in candidates:
        try:
            forecast = json.loads(path.read_text())
        except (OSError, ValueError):  # a scope is best effort: an unreadable file records none
            continue
        if isinstance(forecast, dict):
            return forecast_scope(forecast.get("settings"))
    return {}


def _named(records: list[tuple[dict[str, Any], str | None]], index: int) -> str:
    """A validation as an error names it: its path, or its place in the list for one held in memory."""
    source = records[index][1]
    return str(source) if source is not None else f"validation #{index + 1} (in memory)"


def _validation_records(results) -> list[tuple[dict[str, Any], str | None]]:
    """Each validation result with where it came from: its file's absolute path; for a dict, the path it
    records (``files["json"]``, or ``output_dir``), else None."""
    if isinstance(results, (str, Path, dict)):
        results = [results]
    results = list(results)
    if not results:
        raise STSInputError("No validation given: give at least one validation.json or the folder holding it.")
    records = []
    for item in results:
        if isinstance(item, dict):
            files = item.get("files") if isinstance(item.get("files"), dict) else {}
            records.append((item, files.get("json") or item.get("output_dir")))
            continue
        path = validation_file(item)
        if not path.is_file():
            folder = Path(item)
            run = next((f for f in (folder / "sts" / "forecast.json", folder / "forecast.json") if f.is_file()), None)
            hint = (f" {folder} holds a training run's forecast ({run.name}): to fit on training runs, pass them with "
                    "`sts calibrate --runs ...`.") if run is not None else ""
            raise STSInputError(f"No validation.json at {item}; run `sts validate` first.{hint}")
        data = read_validation(path)
        records.append((data, str(path.resolve())))
    for data, source in records:
        _check_per_seed(data, source or "a validation result")
    sources = [source for _, source in records if source is not None]
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:  # each copy would count its pairs again and narrow the intervals
        raise STSInputError(f"The same validation was given more than once ({repeated}); give each once.")
    # each seed's finite changes and scores: a validation with none (every change null: diverged) adds no pair
    measured = [[json.dumps([{d: v for d, v in (seed.get("nll_delta_rel") or {}).items() if _finite(v)},
                             seed.get("scores")], sort_keys=True)
                 for seed in data["per_seed"] if any(_finite(v) for v in (seed.get("nll_delta_rel") or {}).values())]
                for data, _ in records]
    seen: dict[str, int] = {}
    copies = []
    for index, ((_, source), seeds) in enumerate(zip(records, measured)):
        for seed in seeds:  # a seed another validation holds too (a copy, or a rerun of its seeds into a folder)
            if seed in seen and seen[seed] != index:
                copies += [_named(records, seen[seed]), _named(records, index)]
            seen.setdefault(seed, index)
    copies = sorted(set(copies))
    if copies:  # a copied folder: the same measured changes under another path
        raise STSInputError(f"Validations {copies} hold the same measured changes (copies of one validation); "
                            "give each once: a copy counts its pairs again and narrows the intervals.")
    return records


# what a file given as a validation may be instead, by its format
OTHER_FORMATS = {FORECAST_FORMAT: "a forecast (written by `sts forecast` or the callback)",
                 "sts-gate/1": "a gate decision (written by `sts gate`)", FORMAT: "a calibration (written by "
                 "`sts calibrate`)"}


def validation_file(item: str | Path) -> Path:
    """The validation.json an argument names: the file, or the one in its folder (``sts/`` or the folder itself);
    the path as given when there is none."""
    path = Path(item).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "sts" / "validation.json", path / "validation.json") if p.exists()), path)
    return path


def read_validation(path: Path) -> dict[str, Any]:
    """A validation.json's contents; a file that is not one (broken JSON, a forecast, ...) is an error naming it."""
    fix = "pass the validation.json that `sts validate` writes (OUTPUT_DIR/sts/validation.json) or its output folder."
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise STSInputError(f"{path} is not a JSON file ({err}); {fix}") from err
    if not isinstance(data, dict) or not isinstance(data.get("per_seed"), list):
        kind = OTHER_FORMATS.get(data.get("format")) if isinstance(data, dict) else None
        raise STSInputError(f"{path} is {kind or 'not a validation result (no per_seed)'}, not the output of "
                            f"`sts validate`; {fix}")
    return data


def _check_per_seed(data: dict[str, Any], where: str) -> None:
    """Each ``per_seed`` entry as ``sts validate`` writes it (``scores``: domain -> feature -> number or null;
    ``nll_delta_rel``: domain -> number or null): an edited or cut file is named, field by field, not a traceback
    or a change read from text."""
    def number_or_null(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    seeds = data.get("per_seed")
    if not isinstance(seeds, list):
        raise STSInputError(f"{where} has no per_seed list; pass the validation.json that `sts validate` writes.")
    for i, seed in enumerate(seeds):
        at = f"{where}: per_seed[{i}]"
        if not isinstance(seed, dict) or not isinstance(seed.get("scores"), dict):
            raise STSInputError(f"{at} is not a seed's result (an object with 'scores'); re-run `sts validate` or "
                                "restore the file.")
        for domain, scores in seed["scores"].items():
            if not isinstance(scores, dict) or not all(number_or_null(v) for v in scores.values()):
                raise STSInputError(f"{at}.scores[{domain!r}] must map feature names to numbers (or null), got "
                                    f"{scores!r}; re-run `sts validate` or restore the file.")
        changes = seed.get("nll_delta_rel")
        if changes is not None and (not isinstance(changes, dict) or
                                    not all(number_or_null(v) for v in changes.values())):
            raise STSInputError(f"{at}.nll_delta_rel must map domains to numbers (or null), got {changes!r}; re-run "
                                "`sts validate` or restore the file.")


def _finite(value: Any) -> bool:
    """A number a fit can use (not None, NaN or inf, nor a bool or a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _feature_names(features: Any) -> list[str]:
    """Feature names as given: one name (not its letters), or a sequence of them, each once in order."""
    names = [features] if isinstance(features, str) else list(features)
    return list(dict.fromkeys(names))


def _domain_effects(names: list[list[str]], departures: list[np.ndarray], leave_out: int | None = None,
                    weights: Sequence[float] | None = None) -> dict[str, float]:
    """Each domain's effect in an additive model, change = run effect + domain effect, fitted by least squares
    over the runs (but ``leave_out``; each run's squared errors times its ``weights`` entry, if given): runs
    measuring different sets of domains still compare like with like. Centred over the domains."""
    keep = [i for i in range(len(names)) if i != leave_out]
    domains = sorted({n for i in keep for n in names[i]})
    if not domains:
        return {}
    column = {n: j for j, n in enumerate(domains)}
    rows, targets = [], []
    for r, i in enumerate(keep):
        root = 1.0 if weights is None else math.sqrt(weights[i])  # weighted least squares: rows times sqrt(w)
        for name, value in zip(names[i], departures[i]):
            row = np.zeros(len(keep) + len(domains))
            row[r], row[len(keep) + column[name]] = root, root
            rows.append(row)
            targets.append(root * float(value))
    solution, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(targets), rcond=None)
    effects = solution[len(keep):]
    return dict(zip(domains, (effects - effects.mean()).tolist()))


def _prior_values(prior: dict[str, float], names: list[str]) -> list[float]:
    """The prior of each of ``names``; unseen ones get the mean of the seen (0 when none is seen)."""
    seen = [prior[n] for n in names if n in prior]
    unseen = float(np.mean(seen)) if seen else 0.0
    return [prior.get(n, unseen) for n in names]


def _centred(prior: dict[str, float], names: list[str]) -> np.ndarray:
    """The prior of each of ``names`` (:func:`_prior_values`), centred over them."""
    values = np.asarray(_prior_values(prior, names))
    return values - values.mean()


def _ridge_by_leaving_out(Z: np.ndarray, Y: np.ndarray, groups: np.ndarray) -> float:
    """The ridge penalty (on standardised features) with the least squared error predicting each group from the
    others."""
    best, best_error = 1.0, math.inf
    labels = np.unique(groups)
    if len(labels) < 3:
        return best
    for alpha in np.logspace(-3, 3, 13):
        error = 0.0
        for label in labels:
            train, test = groups != label, groups == label
            coef = np.linalg.solve(Z[train].T @ Z[train] + alpha * np.eye(Z.shape[1]), Z[train].T @ Y[train])
            error += float(((Y[test] - Z[test] @ coef) ** 2).sum())
        if error < best_error:
            best, best_error = float(alpha), error
    return best


def leave_one_group_out(x: Sequence[Sequence[float]], y: Sequence[float], groups: Sequence[Any],
                        features: Sequence[str], **fit_kwargs) -> list[Prediction]:
    """Prediction for every row from a calibration fitted on the *other* groups only (e.g. other sources)."""
    X = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    Y = np.asarray(y, dtype=np.float64)
    labels = list(groups)
    out: list[Prediction | None] = [None] * len(Y)
    for group in dict.fromkeys(labels):
        train = [i for i, g in enumerate(labels) if g != group]
        model = Calibration.fit(X[train], Y[train], features, **fit_kwargs)
        for i, g in enumerate(labels):
            if g == group:
                out[i] = model.predict(X[i].tolist())
    return out  # type: ignore[return-value]


def lr_area_fraction(step: int, total_steps: int, learning_rates: Sequence[float]) -> float:
    """Share of the schedule's summed learning rate spent after ``step`` of ``total_steps`` optimizer steps.

    ``learning_rates``: the learning rate of each step 1..total_steps (e.g. from the trainer's scheduler).
    """
    if total_steps < 1 or len(learning_rates) < total_steps:
        raise STSInputError(f"lr_area_fraction needs {total_steps} learning rates, got {len(learning_rates)}.")
    total = float(sum(learning_rates[:total_steps]))
    if total <= 0:
        return 1.0
    return float(sum(learning_rates[: max(0, min(step, total_steps))])) / total


def early_forecast(measured: dict[str, float | None], fraction: float, exponent: float = 1.0) -> dict[str, float | None]:
    """End-of-training change extrapolated from the change measured after ``fraction`` of the lr area.

    ``change(f) = change(1) * f ** exponent``: 1 is the first-order (linear) model; losses that saturate give
    smaller exponents (see :func:`fitted_exponent`).
    """
    if fraction <= 0:
        return {name: None for name in measured}
    scale = fraction ** exponent
    return {name: (None if value is None else value / scale) for name, value in measured.items()}


def fitted_exponent(points: Sequence[tuple[float, dict[str, float | None]]], *, min_change: float = 0.005,
                    bounds: tuple[float, float] = (0.2, 1.5)) -> float | None:
    """The exponent b of ``change(f) = c * f ** b`` from two or more re-checks ``(fraction, {domain: change})``.

    Median over domains whose change is clear (> ``min_change``) and keeps its sign between the first and the
    last point; ``None`` with fewer than two usable points. Clipped to ``bounds``.
    """
    usable = [(f, m) for f, m in points if 0 < f < 1 or f == 1]
    if len(usable) < 2:
        return None
    (f1, first), (f2, last) = usable[0], usable[-1]
    if f2 <= f1:
        return None
    ratios = []
    for name, a in first.items():
        b = last.get(name)
        if a is None or b is None or abs(a) <= min_change or abs(b) <= min_change or math.copysign(1, a) != math.copysign(1, b):
            continue
        ratios.append(math.log(abs(b) / abs(a)) / math.log(f2 / f1))
    if not ratios:
        return None
    return float(min(max(float(np.median(ratios)), bounds[0]), bounds[1]))


RECIPES = ("lora", "full")  # early_blend_recipe: the runs' recipe (STSSession.recipe)
_FIX = "Correct that field, or refit the calibration with `sts calibrate` (Calibration.save writes a valid file)."


def _kind(value: Any) -> str:
    """What a JSON value is, for a message: ``a list``, ``null``, ``the string 'abc'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return {list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise STSInputError(f"not a JSON file ({err}); pass the calibration JSON that `sts calibrate` or "
                            "Calibration.save writes.") from err


def _bad(name: str, value: Any, must: str) -> STSInputError:
    return STSInputError(f"Calibration field {name!r} is {_kind(value)}; it must be {must}. {_FIX}")


def _number(name: str, value: Any, must: str = "a finite number", ok=lambda v: True) -> float:
    # bool is an int to Python, never a meaningful calibration number
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise _bad(name, value, must)
    return float(value)


def _numbers(name: str, value: Any, length: int | None, of: str, ok=lambda v: True,
             must: str = "finite") -> list[float]:
    """A list of numbers, one per entry of ``of`` (``length`` of them) when ``length`` is given."""
    if not isinstance(value, list):
        raise _bad(name, value, f"a list of {must} numbers, one per entry of {of!r}")
    if length is not None and len(value) != length:
        raise STSInputError(f"Calibration field {name!r} has {len(value)} value(s) but {of!r} has {length}; they "
                            f"must match one to one. {_FIX}")
    return [_number(f"{name}[{i}]", v, f"a {must} number", ok) for i, v in enumerate(value)]


def _names(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(name, value, "a list of feature names (strings)")
    return list(value)


def _checked_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a calibration dict (less ``format``), each checked against what prediction needs of it."""
    from .early import METHODS as EARLY_METHODS

    known = [f.name for f in fields(Calibration)]
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise STSInputError(f"Calibration has unknown field(s) {unknown}; its fields are {known}. Remove them, or "
                            "refit the calibration with `sts calibrate`.")
    required = [f.name for f in fields(Calibration) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise STSInputError(f"Calibration lacks the field(s) {missing}; refit the calibration with `sts calibrate` "
                            "(Calibration.save writes every field).")
    out = dict(data)
    features = out["features"] = _names("features", data["features"])
    if len(set(features)) != len(features):
        raise _bad("features", features, "a list of distinct feature names")
    out["coef"] = _numbers("coef", data["coef"], len(features), "features")
    out["center"] = _numbers("center", data["center"], len(features), "features")
    out["scale"] = _numbers("scale", data["scale"], len(features), "features", lambda v: v > 0, "positive")
    out["intercept"] = _number("intercept", data["intercept"])
    out["sigma"] = _number("sigma", data["sigma"], "a finite number >= 0 (the residual std)", lambda v: v >= 0)
    n = data["n"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) or n < 1:
        raise _bad("n", n, "a whole number >= 1 (the measured changes it was fitted on)")
    out["n"] = int(n)
    if "level" in data:
        out["level"] = _number("level", data["level"], "a number in (0, 1), e.g. 0.9 for a 90% interval",
                               lambda v: 0 < v < 1)
    if "ridge" in data:
        out["ridge"] = _number("ridge", data["ridge"], "a finite number >= 0", lambda v: v >= 0)
    fitted_on = data.get("fitted_on", {})
    if not isinstance(fitted_on, dict):
        raise _bad("fitted_on", fitted_on, "an object (what it was fitted on)")
    scope = fitted_on.get("scope")
    if scope is not None:  # Forecast._check_scope and the callback read it
        if not isinstance(scope, dict):
            raise _bad("fitted_on.scope", scope, "an object (model_class, d_in, d_sae, hook_name, ...)")
        steps = scope.get("run_level_steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise _bad("fitted_on.scope.run_level_steps", steps, "an integer >= 1 (the lookahead's steps)")
    if not isinstance(data.get("centered", False), bool):
        raise _bad("centered", data["centered"], "true or false")
    source = out["source_features"] = _names("source_features", data.get("source_features", []))
    out["source_coef"] = _numbers("source_coef", data.get("source_coef", []), len(source), "source_features")
    prior = data.get("domain_prior", {})
    if not isinstance(prior, dict):
        raise _bad("domain_prior", prior, "an object: domain name -> its usual departure")
    out["domain_prior"] = {str(k): _number(f"domain_prior.{k}", v) for k, v in prior.items()}
    if (PRIOR in features) != bool(prior):  # predict_all fills the "domain_prior" feature from the map
        raise STSInputError(f"Calibration fields disagree: features {'has' if PRIOR in features else 'lacks'} "
                            f"{PRIOR!r} but the domain_prior map is {'empty' if not prior else 'given'}; a "
                            f"calibration fitted with domain_prior=True has both. {_FIX}")
    blend = data.get("early_blend", {})
    if not isinstance(blend, dict):
        raise _bad("early_blend", blend, "an object: early method -> rows")
    for method, rows in blend.items():
        if method not in EARLY_METHODS:
            raise STSInputError(f"Calibration field 'early_blend' has the method {method!r}; the early methods are "
                                f"{list(EARLY_METHODS)}. {_FIX}")
        if not isinstance(rows, list):
            raise _bad(f"early_blend.{method}", rows, "a list of rows")
        for i, row in enumerate(rows):
            where = f"early_blend.{method}[{i}]"
            if not isinstance(row, list) or len(row) != 4:
                raise _bad(where, row, "a row [lr-area fraction, intercept, early weight, step-0 weight]")
            _number(f"{where}[0]", row[0], "an lr-area fraction in [0, 1]", lambda v: 0 <= v <= 1)
            for j, v in enumerate(row[1:], 1):
                _number(f"{where}[{j}]", v)
    recipe = data.get("early_blend_recipe")
    if recipe is not None and recipe not in RECIPES:
        raise _bad("early_blend_recipe", recipe, f"null (any run) or one of {list(RECIPES)}")
    if data.get("pattern_scale", "absolute") not in PATTERN_SCALES:
        raise _bad("pattern_scale", data["pattern_scale"], f"one of {list(PATTERN_SCALES)}")
    if "level_runs" in data:
        runs = data["level_runs"]
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
            raise _bad("level_runs", runs, "a whole number >= 0 (the runs its level was fitted on)")
    if "level_var" in data:
        out["level_var"] = _number("level_var", data["level_var"], "a finite number >= 0", lambda v: v >= 0)
    if data.get("level_runs"):  # the leverage needs one centre and a square matrix per source feature
        size = len(source)
        out["source_center"] = _numbers("source_center", data.get("source_center"), size, "source_features")
        out["source_precision"] = _square_matrix("source_precision", data.get("source_precision"), size,
                                                 "source_features")
    if data.get("pattern_precision"):
        out["pattern_precision"] = _square_matrix("pattern_precision", data["pattern_precision"], len(features),
                                                  "features")
    if data.get("pattern_scale") == "run" and "pattern_spread" not in data:  # the default 1.0 is no run's spread
        raise STSInputError("Calibration has pattern_scale 'run' but lacks the field 'pattern_spread' (the fitted "
                            f"runs' median spread, the unit of its predicted departures). {_FIX}")
    if "pattern_spread" in data:
        out["pattern_spread"] = _number("pattern_spread", data["pattern_spread"],
                                        "a positive number (the fitted runs' median spread)", lambda v: v > 0)
    return out


def _square_matrix(name: str, matrix: Any, size: int, per: str) -> list[list[float]]:
    """A saved ``size`` x ``size`` matrix, one row and column per entry of ``per``, checked number by number."""
    if not isinstance(matrix, list) or len(matrix) != size:
        row = per.replace("_", " ").removesuffix("s")
        raise _bad(name, matrix, f"a {size} x {size} list of lists (one row per {row})")
    return [_numbers(f"{name}[{i}]", row, size, per) for i, row in enumerate(matrix)]


def _coef_covariance(Z: np.ndarray, penalised: np.ndarray) -> list[list[float]]:
    """The ridge coefficients' covariance over sigma^2, ``A^-1 Z'Z A^-1`` (``A``: the penalised ``Z'Z``): the
    leverage ``z' C z`` of a new domain's standardised features ``z`` (with correlated features, ``z.z / n`` read
    a domain off their correlation as close to the centre, and its interval four times too narrow)."""
    inverse = np.linalg.pinv(penalised)
    return (inverse @ (Z.T @ Z) @ inverse).tolist()


def builtin_calibration(name: str) -> Calibration:
    """A calibration shipped in the package (:data:`BUILTIN`), e.g. ``"gemma3-270m-lora"``: fitted on
    ``benchmarks/transfer``'s LoRA runs of Gemma 3 270M with the demo SAE; its ``fitted_on`` says its scope."""
    from importlib.resources import files

    if name not in BUILTIN:
        raise STSConfigError(f"No built-in calibration {name!r}; built in: {sorted(BUILTIN)}. Fit one on your own "
                             "runs with `sts calibrate`.")
    return Calibration.from_dict(json.loads(files("sts_callback").joinpath("calibrations", BUILTIN[name]).read_text()))


def load_calibration(calibration: Any) -> Calibration:
    """A Calibration from itself, its dict, its JSON path or a built-in name (:data:`BUILTIN`); the error names
    what was given."""
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, dict):
        return Calibration.from_dict(calibration)
    if isinstance(calibration, (str, Path)):
        if str(calibration) in BUILTIN and not Path(calibration).is_file():
            loaded = builtin_calibration(str(calibration))
            loaded.source = f"built-in {calibration}"
            return loaded
        calibration = Path(os.path.expanduser(str(calibration)))  # `~/cal.json` as the shell reads it
        if not Path(calibration).is_file():
            raise STSConfigError(f"calibration={str(calibration)!r} is neither a file nor a built-in calibration "
                                 f"({sorted(BUILTIN)}); fit one on your runs with `sts calibrate` (or "
                                 "Calibration.from_runs(...).save(path)).")
        try:
            loaded = Calibration.from_dict(_read_json(calibration))
            loaded.source = str(calibration)
            return loaded
        except STSInputError as err:
            raise STSConfigError(f"calibration={str(calibration)!r} is not a usable calibration file: {err}") from err
    raise STSConfigError(f"calibration must be a Calibration, its dict, a JSON path or a built-in name "
                         f"({sorted(BUILTIN)}); got {type(calibration).__name__}.")


