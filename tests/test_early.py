"""Early forecasts recover the end-of-training change of a trajectory that follows their model."""

import warnings

import numpy as np
import pytest

from sts_callback.scoring.early import (_shape, areas, blend, blend_coefficients, fit_blend, fit_shared_law, forecast,
                                        trend_interval, trend_projection, trend_weights)


def cosine(n=64, warmup=6):
    return [min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * i / n)) for i in range(n)]


def test_areas_run_from_zero_to_one():
    s1 = areas(cosine())
    assert s1[0] == 0 and s1[-1] == pytest.approx(1.0) and np.all(np.diff(s1) >= 0)


def test_shared_law_is_recovered_and_extrapolates_from_a_quarter():
    s1 = areas(cosine())
    finals = {"a": 0.04, "b": -0.02, "c": 0.01}
    steps = [8, 16]  # re-checks within the first quarter
    points = {n: [(float(s1[s]), end * float(_shape(np.array([s1[s]]), 0.6, 0.05)[0])) for s in steps]
              for n, end in finals.items()}
    alpha, offset = fit_shared_law(points)
    predicted = forecast("lr_law", points)
    for name, end in finals.items():
        assert predicted[name] == pytest.approx(end, rel=0.05)
    assert 0.05 <= alpha <= 2.0 and offset > 0


def test_loss_to_loss_follows_the_train_loss():
    s1 = areas(cosine())
    shape = lambda x: float(_shape(np.array([x]), 0.8, 0.1)[0])  # noqa: E731
    train = [(float(s1[s]), 3.0 * (1 - 0.2 * shape(s1[s]))) for s in range(1, 17)]  # drops 20% by the end
    points = {"a": [(float(s1[s]), 0.5 * -0.2 * shape(s1[s])) for s in (8, 16)]}  # half the train drop
    assert forecast("loss_to_loss", points, train)["a"] == pytest.approx(-0.1, rel=0.1)


def test_power_rule_is_the_linear_extrapolation_with_one_point():
    assert forecast("power", {"a": [(0.5, 0.02)]})["a"] == pytest.approx(0.04)


def test_trend_projects_a_trajectory_that_turns():
    # Falls first, then rises linearly in the lr area: the saturating laws see one monotone curve, the trend
    # rule follows the recent slope.
    truth = lambda f: -0.02 + 0.1 * (f - 0.125) if f > 0.125 else -0.16 * f  # noqa: E731
    points = {"a": [(f, truth(f)) for f in (0.125, 0.25, 0.375)]}
    assert forecast("trend", points)["a"] == pytest.approx(truth(1.0))
    assert forecast("trend", {"a": [(0.25, 0.01)]})["a"] == pytest.approx(0.04)  # one point: through the origin


def test_trend_uses_the_last_three_rechecks_only():
    weights = trend_weights([0.1, 0.2, 0.4, 0.6])
    assert weights[0] == 0 and weights.sum() == pytest.approx(1.0)  # a constant trajectory stays constant
    assert weights @ np.array([9.0, 0.2, 0.4, 0.6]) == pytest.approx(1.0)  # the first point cannot move it


def test_dense_rechecks_read_a_slope_across_a_share_of_the_schedule_not_the_last_three():
    """Re-checks every 10 steps of a long run: the last three span 1% of the lr area, and their noise times the 40%
    left was projected as the slope (the interval so wide that no projection ever warned). The slope now reads as
    many re-checks as span TREND_SPAN of the area; the callback's path and the benchmark's agree."""
    from sts_callback.scoring.early import TREND_SPAN

    rng = np.random.default_rng(0)
    fractions = np.linspace(0.01, 0.6, 60)
    weights = trend_weights(list(fractions))
    used = np.flatnonzero(weights)
    assert fractions[-1] - fractions[used[0]] >= TREND_SPAN > fractions[-1] - fractions[used[1]]
    last_three = np.zeros(60)
    last_three[-3:] = trend_weights(list(fractions[-3:]))
    runs = 0.1 * fractions + rng.normal(0, 0.01, (200, 60))  # each ends at +10%, measured +-1%
    errors = np.array([forecast("trend", {"a": list(zip(fractions, run))})["a"] for run in runs]) - 0.1
    assert np.sqrt(np.mean(errors ** 2)) < 0.035 < 0.1 < np.sqrt(np.mean((runs @ last_three - 0.1) ** 2))
    changes = runs[0]
    history = [{"lr_area_fraction": float(f), "loss_delta": {"a": float(c)},
                "loss_delta_ci": {"a": [float(c) - 0.02, float(c) + 0.02]}} for f, c in zip(fractions[:-1], changes)]
    early, bounds = trend_projection(history, {"a": float(changes[-1])}, float(fractions[-1]),
                                     {"a": [float(changes[-1]) - 0.02, float(changes[-1]) + 0.02]})
    assert early["a"] == pytest.approx(float(weights @ changes))
    three = trend_interval(list(fractions[-3:]), [(c - 0.02, c + 0.02) for c in changes[-3:]])
    assert (bounds["a"][1] - bounds["a"][0]) / 2 < 0.06 < 0.5 < three  # narrow enough to warn on: 3 points' +-0.8


def test_trend_interval_carries_the_measurement_error_to_the_end():
    # Two re-checks at 0.2 and 0.4 with +-0.01 each: the end value is -3 y1 + 4 y2, so its half-width is 5 x 0.01.
    assert trend_interval([0.2, 0.4], [(0.0, 0.02), (0.02, 0.04)]) == pytest.approx(0.05)
    history = [{"lr_area_fraction": 0.2, "loss_delta": {"a": 0.01}, "loss_delta_ci": {"a": [0.0, 0.02]}}]
    early, bounds = trend_projection(history, {"a": 0.03, "b": None}, 0.4, {"a": [0.02, 0.04]})
    assert early == {"a": pytest.approx(0.09), "b": None}
    assert bounds["a"] == pytest.approx([0.04, 0.14]) and bounds["b"] == [None, None]


def test_a_domain_measured_on_one_text_has_a_projection_but_no_interval():
    """One text gives no spread: its interval is NaN, and the projection had a NaN interval (and numpy's bare
    "invalid value encountered in matmul" warning) instead of none."""
    history = [{"lr_area_fraction": 0.2, "loss_delta": {"a": 0.01}, "loss_delta_ci": {"a": [float("nan")] * 2}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early, bounds = trend_projection(history, {"a": 0.03}, 0.4, {"a": [float("nan")] * 2})
    assert early == {"a": pytest.approx(0.09)} and bounds["a"] == [None, None]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown early-forecast method 'magic'"):
        forecast("magic", {})


def test_blend_weights_come_from_the_table_by_share_of_training():
    rng = np.random.default_rng(0)
    early, step0 = rng.normal(size=50), rng.normal(size=50)
    final = 0.01 + 0.4 * early + 0.7 * step0
    assert fit_blend(list(zip(early, step0, final))) == pytest.approx([0.01, 0.4, 0.7])
    table = [[0.25, 0.01, 0.4, 0.7], [0.5, 0.0, 0.9, 0.1]]
    assert blend_coefficients(table, 0.1) == pytest.approx((0.01, 0.4, 0.7))  # before the first row: the first
    assert blend_coefficients(table, 0.375) == pytest.approx((0.005, 0.65, 0.4))  # halfway between rows
    assert blend_coefficients(table, 0.75) == pytest.approx((0.0, 0.95, 0.05))  # towards the projection alone
    assert blend_coefficients(table, 1.0) == pytest.approx((0.0, 1.0, 0.0))
    assert blend_coefficients([], 0.3) == (0.0, 1.0, 0.0)
    blended = blend({"a": 0.1, "b": None, "c": 0.2}, {"a": 0.05}, 0.25, table)
    assert blended == {"a": pytest.approx(0.01 + 0.04 + 0.035), "b": None, "c": 0.2}  # c: no step-0 prediction
    with pytest.raises(ValueError, match="at least 4"):
        fit_blend([(0.1, 0.1, 0.1)])


def test_a_blend_is_no_surer_than_the_step0_prediction_it_leans_on():
    from sts_callback.pipelines.prediction import blended_interval

    weights = {"intercept": 0.0, "early": 0.3, "step0": 0.7}
    projection, measured_ci = 0.0, [-0.001, 0.001]  # measured precisely: about no change
    blended = 0.7 * 0.4
    wide = {"mean": 0.4, "low": -0.68, "high": 1.47, "level": 0.9}  # the step-0 prediction: -68% to +147%
    low, high = blended_interval(blended, projection, measured_ci, wide, weights)
    assert low < 0 < high  # was [0.2807, 0.2813]: a "sure" +28% that stopped a run with no change
    sure = {"mean": 0.4, "low": 0.399, "high": 0.401, "level": 0.9}
    low, high = blended_interval(blended, projection, measured_ci, sure, weights)
    assert high - low == pytest.approx(2 * np.hypot(0.3 * 0.001, 0.7 * 0.001 * 1.96 / 1.6449), rel=1e-3)
    assert blended_interval(None, projection, measured_ci, wide, weights) == [None, None]


def test_a_domain_without_a_step0_prediction_keeps_its_projection_interval():
    """The blend leaves such a domain's projection as it is (say, the own held-out domain under not_predicted and
    also protected): its interval must stay the projection's, not shrink by the blend's early weight, or a projected
    warning (and early_stop="projected") fires on a projection that is not sure of anything."""
    from types import SimpleNamespace

    from sts_callback.pipelines.prediction import early_projection

    table = [[0.25, 0.0, 0.1, 0.9], [0.5, 0.0, 0.5, 0.5]]
    calibration = SimpleNamespace(blend_table=lambda method, recipe=None: table, score_features=["x"], level=0.9)
    forecast = SimpleNamespace(predictions={"a": {"mean": 0.01, "low": 0.0, "high": 0.02, "level": 0.9}},
                               domains={})
    measured, intervals = {"a": 0.03, "b": 0.03}, {"a": [0.0, 0.06], "b": [0.0, 0.06]}
    alone = early_projection([], measured, 0.25, None, None, intervals)
    blended = early_projection([], measured, 0.25, forecast, calibration, intervals)
    assert blended["early_forecast"]["b"] == alone["early_forecast"]["b"]
    assert blended["early_forecast_ci"]["b"] == alone["early_forecast_ci"]["b"]  # was 10% as wide
    assert blended["early_forecast"]["a"] != alone["early_forecast"]["a"]  # the predicted one is blended


def test_a_bad_point_long_ago_does_not_spoil_the_trend_for_the_rest_of_the_run():
    """The rule reads its last three points, yet one NaN change at step 5 made every later projection NaN, and one
    point without an interval left every later projection without one (so no projected warning or stop again)."""
    def record(f, change, ci=True):
        return {"lr_area_fraction": f, "loss_delta": {"a": change},
                "loss_delta_ci": {"a": [change - 0.01, change + 0.01]} if ci else {}}

    recent = [record(0.5, 0.02), record(0.6, 0.03)]
    clean, clean_bounds = trend_projection(recent, {"a": 0.04}, 0.7, {"a": [0.03, 0.05]})
    for spoiled in ([record(0.1, float("nan"))], [record(0.1, 0.01, ci=False)], [{"lr_area_fraction": 0.1}]):
        early, bounds = trend_projection(spoiled + recent, {"a": 0.04}, 0.7, {"a": [0.03, 0.05]})
        assert early == pytest.approx(clean) and bounds["a"] == pytest.approx(clean_bounds["a"])
    assert clean["a"] == pytest.approx(0.07)  # 0.04 + slope 0.1 x 0.3 left


def test_a_projection_never_falls_below_all_of_the_held_out_loss():
    """Re-checks every step fit the slope on a sliver of the schedule: -272% was projected where +3.5% was measured
    (a relative NLL change cannot go below -100%)."""
    from sts_callback.pipelines.prediction import early_projection

    history = [{"lr_area_fraction": 0.100, "loss_delta": {"a": 0.2}, "loss_delta_ci": {"a": [0.19, 0.21]}},
               {"lr_area_fraction": 0.101, "loss_delta": {"a": 0.1}, "loss_delta_ci": {"a": [0.09, 0.11]}}]
    out = early_projection(history, {"a": 0.035}, 0.102, None, None, {"a": [0.03, 0.04]})
    assert out["early_forecast"]["a"] == -1.0
    low, high = out["early_forecast_ci"]["a"]
    assert low == -1.0 and -1.0 <= high


def test_a_forecast_without_shifted_latents_keeps_the_projection():
    """A forecast that found no shifted latents gives every domain the same signed score (all forgetting). The
    refit of the projection on it raised, and the callback then dropped the whole early forecast, its intervals,
    the projected warnings and early_stop="projected" at every re-check."""
    from types import SimpleNamespace

    from sts_callback.pipelines.forecast import DomainForecast
    from sts_callback.pipelines.prediction import early_projection
    from sts_callback.scoring.signed import DEFAULT_SIGNED

    domains = {n: DomainForecast(name=n, texts=5, tokens=100, scores={DEFAULT_SIGNED: 0.0}) for n in "abcd"}
    history = [{"lr_area_fraction": 0.2, "loss_delta": {n: 0.01 for n in "abcd"},
                "loss_delta_ci": {n: [0.0, 0.02] for n in "abcd"}}]
    out = early_projection(history, {n: 0.03 for n in "abcd"}, 0.4, SimpleNamespace(domains=domains, predictions={}),
                           None, {n: [0.02, 0.04] for n in "abcd"})
    assert out["early_forecast"]["a"] > 0.03 and out["early_forecast_ci"]["a"][0] is not None
    assert "calibration" not in out  # nothing to refit on
    domains["a"].scores[DEFAULT_SIGNED] = 1.0  # once the score varies, the refit is made
    assert "calibration" in early_projection(history, {n: 0.03 for n in "abcd"}, 0.4,
                                             SimpleNamespace(domains=domains, predictions={}), None,
                                             {n: [0.02, 0.04] for n in "abcd"})


def test_a_calibration_of_the_domain_prior_alone_keeps_the_projection():
    """A prior-only calibration has no score feature: the refit's one-feature check read row[0] of empty rows and
    the early forecast failed at every re-check (IndexError, warned and skipped)."""
    from types import SimpleNamespace

    from sts_callback.pipelines.forecast import DomainForecast
    from sts_callback.pipelines.prediction import early_projection

    calibration = SimpleNamespace(blend_table=lambda method, recipe=None: [], score_features=[], level=0.9)
    domains = {n: DomainForecast(name=n, texts=5, tokens=100, scores={}) for n in "abcd"}
    out = early_projection([], {n: 0.03 for n in "abcd"}, 0.4, SimpleNamespace(domains=domains, predictions={}),
                           calibration, {n: [0.02, 0.04] for n in "abcd"})
    assert out["early_forecast"]["a"] == pytest.approx(0.03 / 0.4)
