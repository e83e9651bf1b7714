"""How well a forecast agrees with what was measured: correlations with a bootstrap interval.

Shared by validation, the report and the benchmarks (scipy.stats underneath).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


def _pearson_along(x, y):
    """Pearson r along the last axis (NaN where either side is constant); vectorized for the bootstrap."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xm = x - x.mean(axis=-1, keepdims=True)
    ym = y - y.mean(axis=-1, keepdims=True)
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xm * ym).sum(axis=-1) / np.sqrt((xm ** 2).sum(axis=-1) * (ym ** 2).sum(axis=-1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def _spearman_along(x, y):
    from scipy.stats import rankdata

    return _pearson_along(rankdata(x, axis=-1), rankdata(y, axis=-1))


# Up to this many points a correlation's p-value comes from every pairing (8! = 40320 of them, ~40 ms): for so
# few, scipy's t-distribution p leans on normality and is 0 for any perfect rank correlation.
EXACT_P_MAX_N = 8


def _exact_permutation_p(x, y, statistic: str) -> float:
    """Two-sided p of Pearson (or Spearman: Pearson of the ranks) under every pairing of ``x`` with ``y``."""
    import numpy as np
    from scipy import stats

    if statistic != "pearson":
        x, y = stats.rankdata(x), stats.rankdata(y)
    yc = y - y.mean()
    yc = yc / np.sqrt((yc ** 2).sum())

    def pearson(a, axis=-1):
        a = np.moveaxis(a, axis, -1)
        ac = a - a.mean(axis=-1, keepdims=True)
        return (ac @ yc) / np.sqrt((ac ** 2).sum(axis=-1))

    result = stats.permutation_test((x,), pearson, permutation_type="pairings", vectorized=True,
                                    n_resamples=np.inf, batch=50_000, alternative="two-sided")
    return float(result.pvalue)


# A paired bootstrap of fewer points draws many resamples of only two distinct points, whose correlation is +-1 by
# construction (a third of them with 4 points, a tenth with 5, 2% with 6): its interval says that, not the data's
# uncertainty (r = 1 over 4 domains read [1.00, 1.00] beside an exact p of 0.083). Below it, no interval is given.
BOOTSTRAP_MIN_POINTS = 7


def correlation(x: Sequence[float], y: Sequence[float], statistic: str = "pearson", *, n_resamples: int = 2000,
                seed: int = 0, confidence_level: float = 0.95) -> dict[str, Any]:
    """``{"r", "p", "p_method", "ci": [low, high], "n"}`` of Pearson or Spearman between ``x`` and ``y``.

    ``p`` (two-sided): up to :data:`EXACT_P_MAX_N` points an exact permutation test over every pairing
    (``scipy.stats.permutation_test``; with 3 points even a perfect correlation has p = 1/3), beyond that
    ``scipy.stats.pearsonr`` / ``spearmanr``; ``p_method`` says which. ``ci`` a paired percentile bootstrap
    (``scipy.stats.bootstrap``, seeded), from :data:`BOOTSTRAP_MIN_POINTS` points on (``None`` below). Resamples
    that are constant on one side have no correlation and are left out of the interval. A constant ``x`` or ``y``
    gives ``r = p = ci = None`` (JSON null), never an error.
    """
    import numpy as np
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out: dict[str, Any] = {"r": None, "p": None, "p_method": None, "ci": None, "n": int(len(x))}
    if len(x) < 3 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.pearsonr(x, y) if statistic == "pearson" else stats.spearmanr(x, y)
        r, p = float(result[0]), float(result[1])
        method = "t-distribution"
        if len(x) <= EXACT_P_MAX_N:
            p, method = _exact_permutation_p(x, y, statistic), "exact permutation"
        out["r"] = r if math.isfinite(r) else None
        out["p"] = p if math.isfinite(p) else None
        out["p_method"] = method if out["p"] is not None else None
        if n_resamples > 0 and len(x) >= BOOTSTRAP_MIN_POINTS:
            function = _pearson_along if statistic == "pearson" else _spearman_along
            rng = np.random.default_rng(seed)
            key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
            boot = stats.bootstrap((x, y), lambda a, b, axis=-1: function(a, b), paired=True, vectorized=True,
                                   n_resamples=n_resamples, method="percentile",
                                   confidence_level=confidence_level, **{key: rng})
            dist = np.asarray(boot.bootstrap_distribution, dtype=np.float64)
            dist = dist[np.isfinite(dist)]
            if dist.size:
                alpha = (1 - confidence_level) / 2
                low, high = np.quantile(dist, [alpha, 1 - alpha])
                out["ci"] = [float(low), float(high)]
    return out


# Below this noise ceiling the measurement alone keeps a perfect forecast from the forecast's goal (r 0.85): the
# changes are called noisy, and more held-out tokens advised, wherever the ceiling is shown.
NOISE_CEILING_GOAL = 0.85


def ceiling_text(ceiling: float) -> str:
    """A noise ceiling as shown: two decimals rounded down, so that one below the goal never reads as the goal."""
    return f"{math.floor(ceiling * 100) / 100:.2f}"


def noise_ceiling(measured: Sequence[float], standard_errors: Sequence[float | None]) -> float | None:
    """The Pearson r that even a perfect forecast of the true changes can expect against ``measured`` changes
    carrying these standard errors: the square root of the measurements' reliability, 1 - mean(se^2) /
    var(measured) across domains (the classical attenuation of a correlation by measurement noise; an estimate,
    a few hundredths low when the noise is as large as the spread). ``None`` when it cannot be said (fewer than
    3 domains, an unknown or infinite error, or no spread at all)."""
    import numpy as np

    y = np.asarray(measured, dtype=np.float64)
    if len(y) < 3 or len(standard_errors) != len(y) or any(e is None for e in standard_errors):
        return None
    se = np.asarray(standard_errors, dtype=np.float64)
    if not (np.isfinite(y).all() and np.isfinite(se).all()):
        return None
    spread = float(np.var(y, ddof=1))
    if spread <= 0:
        return None
    return math.sqrt(max(0.0, 1.0 - float(np.mean(se ** 2)) / spread))


def noise_ceiling_by_domain(changes: Mapping[str, float | None],
                            standard_errors: Mapping[str, float | None]) -> float | None:
    """:func:`noise_ceiling` of per-domain changes and their standard errors (a re-check's ``loss_delta`` and
    ``loss_delta_se``); a domain with no measured change is left out, one with no standard error makes it unknown."""
    measured = [name for name, change in changes.items() if change is not None]
    return noise_ceiling([changes[name] for name in measured], [standard_errors.get(name) for name in measured])


__all__ = ["EXACT_P_MAX_N", "NOISE_CEILING_GOAL", "ceiling_text", "correlation", "noise_ceiling",
           "noise_ceiling_by_domain"]
