"""What the run will do to each domain: the forecast's scores calibrated into predicted end-of-training changes,
and, during training, the measured changes projected to the end (the early forecast) with their intervals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from scipy.stats import norm

from ..core.errors import STSInputError
from ..scoring.calibration import Calibration, early_forecast, fitted_exponent
from ..scoring.early import blend, blend_coefficients, trend_projection
from ..scoring.signed import DEFAULT_SIGNED
from .forecast import Forecast


def calibrated_predictions(forecast: Forecast, calibration: Calibration | None, exclude: Iterable[str] = (),
                           ) -> dict[str, dict[str, float]]:
    """The calibrated end-of-training change of every domain but those in ``exclude`` (also set on
    ``forecast.predictions``)."""
    if calibration is None:
        return {}
    # a domain without a feature (STS_icl of a one-text domain, said at train start) goes unpredicted; a feature
    # no domain has is an error there (check_calibration_features)
    forecast.apply_calibration(calibration, exclude=sorted(set(exclude)))
    return {name: {k: p[k] for k in ("mean", "low", "high", "level")} for name, p in forecast.predictions.items()}


def best_early_method(calibration: Calibration | None, recipe: str | None = None) -> str:
    """The transfer benchmark's best early forecast for this calibration (``benchmarks/transfer/early_compare.py``):
    the power rule blended with the step-0 prediction where the calibration carries that blend for the run's
    ``recipe`` (``"lora"`` / ``"full"``; every LoRA source reliable from a quarter of training), else the trend
    rule (the best unblended)."""
    return "power" if calibration is not None and calibration.blend_table("power", recipe) else "trend"


def early_projection(history: list[dict[str, Any]], measured: dict[str, float | None], fraction: float,
                     forecast: Forecast | None, calibration: Calibration | None,
                     intervals: dict[str, list[float]] | None = None, method: str = "trend",
                     recipe: str | None = None) -> dict[str, Any]:
    """The measured changes extrapolated from ``fraction`` of the learning-rate area to the end of training, and
    the calibration refitted on the projections (forecast scores -> projected change) when enough domains have
    both. ``method`` ``"trend"``: the latest change plus the recent slope over this run's re-checks
    (:func:`~sts_callback.scoring.early.trend_weights`); ``"power"``: change ~ f^b, b fitted on the earlier
    re-checks (linear until there are two). ``intervals``: the measured changes' 95% intervals, carried to the
    end alike (``early_forecast_ci``: the measurement's uncertainty; the model's own is not in it). With a
    calibration that has an ``early_blend`` table for ``method`` (and the run's ``recipe``) and step-0 predictions,
    ``early_forecast`` is the projection blended with them (the projection alone: ``early_projection``; the weights: ``early_blend``)."""
    out: dict[str, Any] = {"lr_area_fraction": fraction, "early_method": method}
    if method == "power":
        points = [(r["lr_area_fraction"], r["loss_delta"]) for r in history if r.get("lr_area_fraction")]
        exponent = fitted_exponent(points + [(fraction, measured)]) or 1.0
        early = early_forecast(measured, fraction, exponent)
        out.update(early_exponent=exponent, early_forecast=early)
        if intervals is not None:
            low = early_forecast({n: ci[0] for n, ci in intervals.items() if ci}, fraction, exponent)
            high = early_forecast({n: ci[1] for n, ci in intervals.items() if ci}, fraction, exponent)
            out["early_forecast_ci"] = {n: [low[n], high[n]] for n in low}
    else:
        early, bounds = trend_projection(history, measured, fraction, intervals)
        out["early_forecast"] = early
        if intervals is not None:
            out["early_forecast_ci"] = bounds
    table = calibration.blend_table(method, recipe) if calibration is not None else []
    step0 = {n: p["mean"] for n, p in (forecast.predictions if forecast is not None else {}).items()}
    if table and step0:
        # the measurement so far and the step-0 prediction, weighted by how far training is
        out["early_projection"] = early
        early, blended_ci, out["early_blend"] = blend_with_step0(early, out.get("early_forecast_ci"),
                                                                 forecast.predictions, fraction, table)
        out["early_forecast"] = early
        if blended_ci is not None:
            out["early_forecast_ci"] = blended_ci
    # a held-out NLL cannot fall by more than all of it: a steep early slope (re-checks every step) had projected
    # -272% where +3.5% was measured
    early = {n: max(v, -1.0) if v is not None and math.isfinite(v) else v for n, v in early.items()}
    out["early_forecast"] = early
    if "early_forecast_ci" in out:
        out["early_forecast_ci"] = {n: [None if b is None or not math.isfinite(b) else max(b, -1.0) for b in ci]
                                    if ci else ci for n, ci in out["early_forecast_ci"].items()}
    features = calibration.score_features if calibration is not None else [DEFAULT_SIGNED]
    domains = forecast.domains if forecast is not None else {}
    # a domain whose change is not finite (a diverged model: the guard says so) teaches the refit nothing
    names = [n for n, v in early.items() if v is not None and math.isfinite(v) and n in domains
             and all(domains[n].scores.get(f) is not None and math.isfinite(domains[n].scores[f]) for f in features)]
    if len(names) >= len(features) + 2:
        try:
            refit = Calibration.fit([[domains[n].scores[f] for f in features] for n in names],
                                    [early[n] for n in names], features,
                                    level=calibration.level if calibration is not None else 0.9)
        except STSInputError:  # features it cannot fit on (one with one value over the domains: a forecast
            pass               # without shifted latents reads every domain as pure forgetting): the projection stands
        else:
            out["calibration"] = {"features": features, "coef": refit.coef, "intercept": refit.intercept,
                                  "center": refit.center, "scale": refit.scale, "sigma": refit.sigma, "n": refit.n}
    return out


def blend_with_step0(early: dict[str, float | None], intervals: dict[str, list] | None,
                     predictions: dict[str, dict[str, float]], fraction: float, table: list[list[float]]
                     ) -> tuple[dict[str, float | None], dict[str, list] | None, dict[str, float]]:
    """The projection ``early`` (its 95% ``intervals``, or None) blended with the step-0 ``predictions`` (name ->
    ``mean``, ``low``, ``high``) at ``fraction`` of the lr area by the calibration's ``table``: (the blend, its
    intervals or None, the weights)."""
    step0 = {n: p["mean"] for n, p in predictions.items()}
    blended = blend(early, step0, fraction, table)
    weights = dict(zip(("intercept", "early", "step0"), blend_coefficients(table, fraction)))
    if intervals is None:
        return blended, None, weights
    # a domain without a step-0 prediction keeps its projection (blend), so its interval too
    return blended, {n: blended_interval(blended.get(n), early.get(n), ci, predictions.get(n), weights)
                     if step0.get(n) is not None else ci for n, ci in intervals.items()}, weights


def blended_interval(blended: float | None, projection: float | None, interval: list[float | None],
                     step0: dict[str, float] | None, weights: dict[str, float]) -> list[float | None]:
    """The 95% interval of ``blended`` = intercept + w_early * projection + w_step0 * step-0 prediction: each
    side's spread weighted and added in quadrature. The step-0 prediction's own interval counts: a blend that leans
    on a prediction of -68% to +147% is not sure of anything, however precise the measurement."""
    if blended is None or projection is None or None in interval:
        return [None, None]
    prior = 0.0
    if step0 is not None and step0.get("low") is not None and step0.get("high") is not None:
        # its interval is at the calibration's level (e.g. 90%): the same spread at 95%
        z = float(norm.ppf(0.5 + step0.get("level", 0.9) / 2))
        prior = weights["step0"] * (step0["high"] - step0["low"]) / 2 * (1.96 / z)
    below = math.hypot(weights["early"] * (projection - interval[0]), prior)
    above = math.hypot(weights["early"] * (interval[1] - projection), prior)
    return [blended - below, blended + above]


__all__ = ["best_early_method", "blend_with_step0", "blended_interval", "calibrated_predictions", "early_projection"]
