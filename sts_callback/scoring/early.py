"""Early forecasts: each domain's end-of-training loss change from the re-checks so far (issue 14).

Three ways, compared on the transfer benchmark's trajectories (``benchmarks/transfer/early_compare.py``):

- ``power``: change(f) = c * f ** b, f the share of the learning-rate area spent, b fitted on the run's own
  re-checks (the callback's rule until now; :func:`sts_callback.scoring.calibration.fitted_exponent`);
- ``lr_law``: the learning-rate-area law of Tissue et al. (2024), L(s) = L0 + A (S1 + S0)^-alpha - C S2, written
  for a change from step 0 with the exponent alpha and offset S0 shared by the run's domains and the annealing
  term left out (S2 is ~0 until the schedule decays, so C cannot be seen early);
- ``loss_to_loss``: each domain's change in proportion to the trainer's own train-loss drop (free: the Trainer
  logs it every step), the train loss projected to the end by the same law fitted on its many logged points.

Any of them can be blended with the step-0 forecast (:func:`blend`): a line fitted on the benchmark's runs per
share of training, stored with the calibration (``Calibration.early_blend``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METHODS = ("power", "lr_law", "loss_to_loss", "trend")
TREND_WINDOW = 3
# ...and as many more as the slope needs to span this share of the lr area: three re-checks 10 steps apart in a
# 2,000-step run span 1% of it, and their noise times (1 - f) / 0.01 is no slope (the benchmark's re-checks, every
# 8 of 64 steps, span more with three up to 97% of the area: the rule is the same there)
TREND_SPAN = 0.15
ALPHAS = np.linspace(0.05, 2.0, 40)
OFFSETS = np.geomspace(1e-3, 1.0, 25)  # S0 as a share of the whole schedule's area


def areas(learning_rates: Sequence[float]) -> np.ndarray:
    """S1 after each step 0..n as a share of the total area (S1[0] = 0, S1[n] = 1)."""
    rates = np.asarray(learning_rates, dtype=np.float64)
    total = rates.sum()
    return np.concatenate([[0.0], np.cumsum(rates) / (total if total > 0 else 1.0)])


def _shape(s1: np.ndarray, alpha: float, offset: float) -> np.ndarray:
    """g(S1) = S0^-alpha - (S1 + S0)^-alpha, normalised to g(1) = 1: 0 at the start, rising and saturating."""
    g = offset ** -alpha - (s1 + offset) ** -alpha
    end = offset ** -alpha - (1 + offset) ** -alpha
    return g / end


def fit_shared_law(points: dict[str, list[tuple[float, float]]]) -> tuple[float, float]:
    """(alpha, S0) shared by every series of ``points`` (name -> [(S1 share, change)]), each series scaled by
    its own least-squares amplitude; grid search over (alpha, S0) for the smallest total squared error."""
    best, best_error = (1.0, 1.0), math.inf
    series = [(np.array([p[0] for p in s]), np.array([p[1] for p in s])) for s in points.values() if s]
    for alpha in ALPHAS:
        for offset in OFFSETS:
            error = 0.0
            for x, y in series:
                g = _shape(x, alpha, offset)
                denominator = float(g @ g)
                amplitude = float(g @ y) / denominator if denominator > 0 else 0.0
                error += float(((y - amplitude * g) ** 2).sum())
            if error < best_error:
                best, best_error = (float(alpha), float(offset)), error
    return best


def lr_law(points: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """End-of-training change of each series from its points on the shared law (g(1) = 1: the amplitude)."""
    alpha, offset = fit_shared_law(points)
    out = {}
    for name, series in points.items():
        x = np.array([p[0] for p in series])
        y = np.array([p[1] for p in series])
        g = _shape(x, alpha, offset)
        out[name] = float(g @ y) / float(g @ g) if len(series) and float(g @ g) > 0 else math.nan
    return out


def power(points: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """change(f) = c f^b: b from the run's own points (the callback's rule), c from the latest point."""
    from .calibration import early_forecast, fitted_exponent

    fractions = sorted({f for series in points.values() for f, _ in series})
    by_fraction = [(f, {name: dict(series).get(f) for name, series in points.items()}) for f in fractions]
    exponent = fitted_exponent(by_fraction) or 1.0
    last_fraction, last = by_fraction[-1]
    return {name: (math.nan if v is None else v) for name, v in early_forecast(last, last_fraction, exponent).items()}


def loss_to_loss(points: dict[str, list[tuple[float, float]]], train_loss: list[tuple[float, float]]) -> dict[str, float]:
    """Each series as k * (relative train-loss drop), k by least squares through the origin at its points; the
    train loss (``[(S1 share, loss)]`` logged every step) projected to the end by the shared law."""
    if len(train_loss) < 3:
        return {name: math.nan for name in points}
    x = np.array([p[0] for p in train_loss])
    loss = np.array([p[1] for p in train_loss])
    start = loss[: max(1, len(loss) // 8)].mean()  # the first logged losses stand for the starting loss
    drop = (loss - start) / start
    alpha, offset = fit_shared_law({"train": list(zip(x.tolist(), drop.tolist()))})
    g = _shape(x, alpha, offset)
    end_drop = float(g @ drop) / float(g @ g) if float(g @ g) > 0 else math.nan
    out = {}
    for name, series in points.items():
        # the train-loss drop at each re-check, from the fitted curve (the per-step loss is noisy)
        at = np.array([end_drop * float(_shape(np.array([f]), alpha, offset)[0]) for f, _ in series])
        y = np.array([v for _, v in series])
        out[name] = float(at @ y) / float(at @ at) * end_drop if float(at @ at) > 0 else math.nan
    return out


def trend_covered(count: int, spanned: float, window: int = TREND_WINDOW) -> bool:
    """Whether ``count`` re-checks spanning ``spanned`` of the lr area are all the slope needs: ``window`` of them
    spanning ``TREND_SPAN``."""
    return count >= window and spanned >= TREND_SPAN


def trend_start(fractions: Sequence[float], window: int = TREND_WINDOW) -> int:
    """Index of the first re-check the slope reads: the last ``window`` of ``fractions`` (ascending), and earlier
    ones until they are covered (:func:`trend_covered`)."""
    start = max(len(fractions) - window, 0)
    while start > 0 and not trend_covered(len(fractions) - start, fractions[-1] - fractions[start], window):
        start -= 1
    return start


def trend_weights(fractions: Sequence[float], window: int = TREND_WINDOW) -> np.ndarray:
    """Weights w over the re-checks at ``fractions`` (ascending shares of the lr area) with the end-of-training
    change = w @ changes: the last change plus the least-squares slope of the last ``window`` re-checks (more when
    they span less than ``TREND_SPAN`` of the area, :func:`trend_start`) times (1 - last fraction); one re-check:
    change / fraction."""
    x = np.asarray(fractions, dtype=np.float64)
    weights = np.zeros(len(x))
    if len(x) == 0 or x[-1] <= 0:
        return weights * math.nan
    recent = x[trend_start(list(x), window):]
    if len(recent) == 1 or np.ptp(recent) == 0:
        weights[-1] = 1.0 / x[-1]
        return weights
    centred = recent - recent.mean()
    weights[-len(recent):] = (1.0 - x[-1]) * centred / float(centred @ centred)
    weights[-1] += 1.0
    return weights


def trend(points: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """End-of-training change of each series by the recent trend in the lr area (see :func:`trend_weights`)."""
    out = {}
    for name, series in points.items():
        series = sorted(series)
        weights = trend_weights([f for f, _ in series])
        out[name] = float(weights @ np.array([v for _, v in series])) if series else math.nan
    return out


def trend_interval(fractions: Sequence[float], intervals: Sequence[tuple[float, float]], z: float = 1.96) -> float:
    """Half-width of the trend projection's interval from the re-checks' own (symmetric, level ``z``) intervals,
    their errors taken as independent. The changes are measured on the same held-out tokens each time, so their
    errors are positively correlated and the slope's true error is smaller: the interval errs wide."""
    weights = trend_weights(fractions)
    se = np.array([(high - low) / (2 * z) for low, high in intervals])
    return float(z * math.sqrt(float((weights ** 2) @ (se ** 2))))


def trend_projection(history: list[dict], measured: dict[str, float | None], fraction: float,
                     intervals: dict[str, list[float]] | None) -> tuple[dict[str, float | None], dict[str, list]]:
    """Each domain's end-of-training change by the trend rule over the re-checks in ``history`` (the callback's
    records: ``lr_area_fraction``, ``loss_delta``, ``loss_delta_ci``) and the one ``measured`` now at ``fraction``,
    and the projection's 95% interval (``[None, None]`` where a point has no interval)."""
    early: dict[str, float | None] = {}
    bounds: dict[str, list] = {}
    course = [r for r in history if r.get("lr_area_fraction") and 0 < r["lr_area_fraction"] < fraction]
    for name, value in measured.items():
        if value is None or fraction <= 0:
            early[name], bounds[name] = None, [None, None]
            continue
        # the rule reads the points it weighs only (trend_start): the earlier ones cost time at every re-check of
        # a long run, and one non-finite change or missing interval among them had spoiled the projection for good
        earlier: list[dict] = []
        for record in reversed(course):
            change = (record.get("loss_delta") or {}).get(name)
            if isinstance(change, (int, float)) and math.isfinite(change):
                earlier.insert(0, record)
                if trend_covered(len(earlier) + 1, fraction - earlier[0]["lr_area_fraction"]):
                    break
        fractions = [r["lr_area_fraction"] for r in earlier] + [fraction]
        changes = [r["loss_delta"][name] for r in earlier] + [value]
        early[name] = float(trend_weights(fractions) @ np.array(changes))
        cis = [(r.get("loss_delta_ci") or {}).get(name) for r in earlier] + [(intervals or {}).get(name)]
        # a bound None or NaN (one text measured: no spread) gives the projection no interval
        if all(ci and all(v is not None and math.isfinite(v) for v in ci) for ci in cis):
            half = trend_interval(fractions, cis)
            bounds[name] = [early[name] - half, early[name] + half]
        else:
            bounds[name] = [None, None]
    return early, bounds


def fit_blend(rows: Sequence[tuple[float, float, float]]) -> list[float]:
    """[intercept, weight of the early projection, weight of the step-0 prediction]: least squares of the
    end-of-training change on the two, over ``rows`` of (early projection, step-0 prediction, final change)."""
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    if len(data) < 4 or not np.isfinite(data).all():
        raise ValueError(f"fit_blend needs at least 4 finite (early, step0, final) rows; got {len(data)}.")
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    coef, *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
    return [float(c) for c in coef]


def blend_coefficients(table: Sequence[Sequence[float]], fraction: float) -> tuple[float, float, float]:
    """(intercept, early weight, step-0 weight) at ``fraction`` of the lr area from ``table`` rows [fraction,
    intercept, early weight, step-0 weight] (ascending fractions): linear between rows, the first row's below
    it, and towards the early projection alone (0, 1, 0) at the end of training after the last."""
    rows = sorted([list(map(float, row)) for row in table])
    if not rows:
        return 0.0, 1.0, 0.0
    if rows[-1][0] < 1.0:
        rows.append([1.0, 0.0, 1.0, 0.0])
    if fraction <= rows[0][0]:
        return tuple(rows[0][1:])  # type: ignore[return-value]
    for low, high in zip(rows, rows[1:]):
        if fraction <= high[0]:
            t = (fraction - low[0]) / (high[0] - low[0]) if high[0] > low[0] else 1.0
            return tuple(a + t * (b - a) for a, b in zip(low[1:], high[1:]))  # type: ignore[return-value]
    return tuple(rows[-1][1:])  # type: ignore[return-value]


def blend(early: dict[str, float | None], step0: dict[str, float], fraction: float,
          table: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """The early projection of each domain combined with its step-0 (calibrated) prediction, weighted by how far
    training is (:func:`blend_coefficients`); a domain without a step-0 prediction keeps its projection. Early,
    the re-checks have seen little and the step-0 forecast carries the order; late, the measurement does."""
    intercept, w_early, w_step0 = blend_coefficients(table, fraction)
    return {name: (value if value is None or step0.get(name) is None
                   else intercept + w_early * value + w_step0 * step0[name]) for name, value in early.items()}


def forecast(method: str, points: dict[str, list[tuple[float, float]]],
             train_loss: list[tuple[float, float]] | None = None) -> dict[str, float]:
    """End-of-training change per domain by ``method`` (one of :data:`METHODS`)."""
    if method == "power":
        return power(points)
    if method == "lr_law":
        return lr_law(points)
    if method == "loss_to_loss":
        return loss_to_loss(points, train_loss or [])
    if method == "trend":
        return trend(points)
    raise ValueError(f"unknown early-forecast method {method!r}; use one of {METHODS}")


__all__ = ["METHODS", "areas", "blend", "blend_coefficients", "fit_blend", "fit_shared_law", "forecast", "loss_to_loss", "lr_law", "power", "trend",
           "trend_covered", "trend_interval", "trend_projection", "trend_start", "trend_weights"]
