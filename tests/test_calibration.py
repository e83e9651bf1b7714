"""Calibration: forecast score -> predicted change with an interval; cross-validation; early forecast."""

import json
import re

import numpy as np
import pytest

from sts_callback import STSDataWarning, STSInputError
from sts_callback.scoring.calibration import (
    Calibration,
    fitted_exponent,
    early_forecast,
    leave_one_group_out,
    lr_area_fraction,
)


def noisy_line(n, seed=0, slope=0.5, intercept=0.1, noise=0.05):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 2, n)
    return x, intercept + slope * x + rng.normal(0, noise, n)


def test_fit_recovers_the_line_and_intervals_cover_new_points():
    x, y = noisy_line(200)
    calibration = Calibration.fit(x, y, ["sts_icl"], level=0.9)
    assert calibration.predict(1.0).mean == pytest.approx(0.6, abs=0.02)
    assert calibration.predict({"sts_icl": 0.0}).mean == pytest.approx(0.1, abs=0.03)
    x_new, y_new = noisy_line(2000, seed=1)
    inside = [p.low <= t <= p.high for p, t in zip((calibration.predict(float(v)) for v in x_new), y_new)]
    assert 0.86 <= np.mean(inside) <= 0.94  # a 90% interval holds about 90% of new measurements
    far = calibration.predict(10.0)
    near = calibration.predict(1.0)
    assert far.high - far.low > near.high - near.low  # wider away from the data


def test_level_and_pattern_are_recovered_and_predicted_together(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for own in (-0.4, -0.2, -0.1, -0.05, -0.3):  # each run: level 0.01 - 0.2 * own, pattern 0.5 * centred x
        x = rng.normal(size=(8, 1))
        runs.append((x, 0.01 - 0.2 * own + 0.5 * (x[:, 0] - x[:, 0].mean()), [own]))
    calibration = Calibration.fit_level_pattern(runs, ["lookahead"], ["lookahead_own"])
    assert calibration.intercept == pytest.approx(0.01, abs=1e-9)
    assert calibration.source_coef[0] == pytest.approx(-0.2, abs=1e-9)
    assert calibration.coef[0] / calibration.scale[0] == pytest.approx(0.5, rel=1e-2)  # a ridge: nearly exact
    domains = {"a": {"lookahead": 1.0}, "b": {"lookahead": -1.0}, "c": {"lookahead": None}}
    predicted = Calibration.load(calibration.save(tmp_path / "c.json")).predict_all(domains, {"lookahead_own": -0.3})
    assert set(predicted) == {"a", "b"}  # c lacks the feature; the mean is over a and b
    assert predicted["a"].mean == pytest.approx(0.07 + 0.5, rel=1e-2)
    assert predicted["b"].mean == pytest.approx(0.07 - 0.5, rel=1e-2)
    assert predicted["a"].low < predicted["a"].mean < predicted["a"].high
    with pytest.raises(STSInputError, match="train with run_level"):
        calibration.predict_all(domains)
    with pytest.raises(STSInputError, match="use predict_all"):
        calibration.predict({"lookahead": 1.0})
    with pytest.raises(STSInputError, match="at least 3 runs"):
        Calibration.fit_level_pattern(runs[:2], ["lookahead"], ["lookahead_own"])


def test_domain_prior_learns_how_each_domain_usually_departs_from_the_runs_mean(tmp_path):
    # Each domain moves by its own offset (code +0.04, prose -0.03, math 0) around the run's level, plus noise;
    # the feature carries no signal. Runs see different subsets of the domains.
    rng = np.random.default_rng(1)
    offsets = {"code": 0.04, "prose": -0.03, "math": 0.0, "legal": 0.01}
    runs = []
    for i, own in enumerate((-0.4, -0.2, -0.1, -0.05, -0.3, -0.25)):
        names = [n for j, n in enumerate(offsets) if j != i % 4]
        x = rng.normal(size=(len(names), 1))
        y = 0.01 - 0.2 * own + np.asarray([offsets[n] for n in names]) + rng.normal(0, 0.002, len(names))
        runs.append((x, y, [own], names))
    plain = Calibration.fit_level_pattern(runs, ["sts_icl"], ["lookahead_own"])
    prior = Calibration.load(Calibration.fit_level_pattern(runs, ["sts_icl"], ["lookahead_own"], domain_prior=True)
                             .save(tmp_path / "c.json"))
    assert prior.features == ["sts_icl", "domain_prior"]
    assert prior.domain_prior["code"] - prior.domain_prior["prose"] == pytest.approx(0.07, abs=0.01)
    domains = {"code": {"sts_icl": 0.3}, "prose": {"sts_icl": -0.2}, "math": {"sts_icl": 0.1}}
    predicted = prior.predict_all(domains, {"lookahead_own": -0.2})
    assert predicted["code"].mean - predicted["prose"].mean == pytest.approx(0.07, abs=0.01)
    assert np.mean([p.mean for p in predicted.values()]) == pytest.approx(0.05, abs=0.01)  # the level
    without = plain.predict_all(domains, {"lookahead_own": -0.2})
    assert abs(without["code"].mean - without["prose"].mean) < 0.03  # the feature alone cannot tell them apart
    # A domain no run measured gets the seen domains' mean: it neither shifts the others nor stands out.
    with_new = prior.predict_all({**domains, "unseen": {"sts_icl": 0.0}}, {"lookahead_own": -0.2})
    assert with_new["unseen"].mean == pytest.approx(0.05, abs=0.01)
    assert with_new["code"].mean - with_new["prose"].mean == pytest.approx(
        predicted["code"].mean - predicted["prose"].mean, abs=1e-9)
    with pytest.raises(STSInputError, match=r"\(x, y, s, names\)"):
        Calibration.fit_level_pattern([r[:3] for r in runs], ["sts_icl"], ["lookahead_own"], domain_prior=True)


def test_weighted_domain_prior_follows_the_runs_that_weigh_most():
    from sts_callback.scoring.calibration import _domain_effects

    # code-like runs hurt prose more than code; prose-like runs the reverse; each run has its own level
    names = [["code", "prose", "math"]] * 4
    departures = [np.array([0.0, 0.04, 0.02]) + 0.1 * i for i in range(2)] + \
                 [np.array([0.04, 0.0, 0.02]) - 0.1 * i for i in range(2)]
    even = _domain_effects(names, departures)
    assert even == pytest.approx(_domain_effects(names, departures, weights=[3.0] * 4))  # only ratios matter
    assert even["code"] == pytest.approx(even["prose"])
    code_like = _domain_effects(names, departures, weights=[1.0, 1.0, 0.01, 0.01])
    assert code_like["prose"] - code_like["code"] == pytest.approx(0.04, abs=0.002)
    dropped = _domain_effects(names, departures, weights=[1.0, 1.0, 1.0, 0.0])
    assert dropped == pytest.approx(_domain_effects(names, departures, leave_out=3))  # weight 0: as left out


def test_pattern_over_each_runs_spread_is_not_set_by_one_large_run(tmp_path):
    # Five runs of small changes share a pattern (code +2% above the run's mean, prose -2%); one run moved every
    # domain ~30x more, with its own pattern (math up, legal down). Fitted on the changes as measured, the large
    # run sets the prior; over each run's spread it counts as one run of six, and the predicted departures come
    # back in the runs' median spread.
    from scipy.stats import pearsonr

    names = ["code", "prose", "math", "legal"]
    small = np.array([0.02, -0.02, 0.0, 0.0])
    rng = np.random.default_rng(0)
    runs = [(np.zeros((4, 0)), 0.01 + small + rng.normal(0, 0.002, 4), [], names) for _ in range(5)]
    runs.append((np.zeros((4, 0)), 0.6 + np.array([0.0, 0.0, 0.6, -0.6]), [], names))
    domains = {n: {} for n in names}
    absolute = Calibration.fit_level_pattern(runs, [], [], domain_prior=True).predict_all(domains)
    per_run = Calibration.load(Calibration.fit_level_pattern(runs, [], [], domain_prior=True, pattern_scale="run")
                               .save(tmp_path / "c.json"))
    assert per_run.pattern_scale == "run"
    predicted = per_run.predict_all(domains)
    assert pearsonr([predicted[n].mean for n in names], small)[0] > 0.9  # the five runs' pattern
    assert pearsonr([absolute[n].mean for n in names], small)[0] < 0.5  # the large run's
    assert 0.01 < predicted["code"].mean - predicted["prose"].mean < 0.05  # in the small runs' units, not 30x
    assert predicted["code"].low < predicted["code"].mean < predicted["code"].high
    flat = [(np.zeros((4, 0)), np.full(4, 0.01), [], names)] + runs
    with pytest.raises(STSInputError, match="moved all its domains alike"):
        Calibration.fit_level_pattern(flat, [], [], domain_prior=True, pattern_scale="run")
    with pytest.raises(Exception, match="pattern_scale must be one of"):
        Calibration.fit_level_pattern(runs, [], [], domain_prior=True, pattern_scale="relative")


def test_several_features_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = 0.3 * X[:, 0] - 0.2 * X[:, 1] + rng.normal(0, 0.01, 60)
    calibration = Calibration.fit(X, y, ["a", "b"])
    assert calibration.predict({"a": 1.0, "b": 1.0}).mean == pytest.approx(0.1, abs=0.02)
    loaded = Calibration.load(calibration.save(tmp_path / "c.json"))
    assert loaded.predict([1.0, 1.0]) == calibration.predict([1.0, 1.0])
    with pytest.raises(STSInputError, match="needs the feature"):
        calibration.predict({"a": 1.0})


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(STSInputError, match="at least 3"):
        Calibration.fit([1.0, 2.0], [0.1, 0.2], ["sts_icl"])
    with pytest.raises(STSInputError, match="NaN"):
        Calibration.fit([1.0, 2.0, float("nan"), 3.0], [0.1, 0.2, 0.3, 0.4], ["sts_icl"])
    with pytest.raises(STSInputError, match="sts validate"):
        Calibration.from_validation(tmp_path)
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(STSInputError, match="Not an STS calibration"):
        Calibration.load(tmp_path / "x.json")
    # rows that do not pair with the changes: named, never reshaped into some other fit
    with pytest.raises(STSInputError, match=r"x of shape \(5, 1\) for 4 changes"):
        Calibration.fit([1, 2, 3, 4, 5], [1, 2, 3, 4], ["a"])
    with pytest.raises(STSInputError, match=r"x of shape \(3, 2\) for 6 changes"):
        Calibration.fit([[1, 2], [3, 4], [5, 6]], [1, 2, 3, 4, 5, 6], ["a"])
    with pytest.raises(STSInputError, match=r"\['a'\] more than once"):
        Calibration.fit([[1, 2], [3, 1], [5, 6], [7, 8], [2, 2]], [1, 2, 3, 4, 5], ["a", "a"])
    with pytest.raises(STSInputError, match=r"\['a'\] take one value over all 4 pairs"):
        Calibration.fit([1, 1, 1, 1], [1, 2, 3, 4], ["a"])
    column = Calibration.fit([1, 2, 3, 4, 5], [[1], [2], [2.5], [4], [5]], ["a"])  # y as a column: its values
    assert column.coef == pytest.approx(Calibration.fit([1, 2, 3, 4, 5], [1, 2, 2.5, 4, 5], ["a"]).coef)
    assert Calibration.load(column.save(tmp_path / "column.json")).predict(2.0).mean == pytest.approx(
        column.predict(2.0).mean)
    twice = column.to_dict() | {"features": ["a", "a"], "coef": [1.0, 1.0], "center": [0.0, 0.0],
                                "scale": [1.0, 1.0]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(STSInputError, match="'features' is .*distinct feature names"):
        Calibration.load(tmp_path / "twice.json")


def test_from_validation_uses_every_domain_and_seed():
    record = {"output_dir": "v", "per_seed": [
        {"scores": {d: {"sts_icl": float(i)} for i, d in enumerate("abcd")},
         "nll_delta_rel": {d: 0.01 * i for i, d in enumerate("abcd")}},
        {"scores": {d: {"sts_icl": float(i) + 0.5} for i, d in enumerate("abcd")},
         "nll_delta_rel": {d: 0.01 * i + 0.005 for i, d in enumerate("abcd")}}]}
    calibration = Calibration.from_validation(record, ["sts_icl"])
    assert calibration.n == 8 and calibration.fitted_on["pairs"] == 8
    assert calibration.predict(2.0).mean == pytest.approx(0.02)
    with pytest.raises(STSInputError, match="they have \\['sts_icl'\\]"):  # the default feature is missing
        Calibration.from_validation(record)


@pytest.mark.parametrize("seed, words", [
    ({"nll_delta_rel": {"a": 0.1}}, r"per_seed\[1\] is not a seed's result"),
    (3, r"per_seed\[1\] is not a seed's result"),
    ({"scores": None}, r"per_seed\[1\] is not a seed's result"),
    ({"scores": {"a": None}}, r"per_seed\[1\].scores\['a'\] must map feature names to numbers"),
    ({"scores": {"a": {"sts_icl": "1.0"}}}, r"per_seed\[1\].scores\['a'\] must map feature names to numbers"),
    ({"scores": {"a": {"sts_icl": 1.0}}, "nll_delta_rel": {"a": "0.1"}}, r"per_seed\[1\].nll_delta_rel must map"),
    ({"scores": {"a": {"sts_icl": 1.0}}, "nll_delta_rel": [0.1]}, r"per_seed\[1\].nll_delta_rel must map"),
])
def test_an_edited_or_cut_validation_is_named_field_by_field(tmp_path, seed, words):
    """A seed entry without scores, or with a change written as text, raised KeyError / TypeError (or was read
    through float())."""
    good = {"scores": {d: {"sts_icl": float(i)} for i, d in enumerate("abcd")},
            "nll_delta_rel": {d: 0.01 * i for i, d in enumerate("abcd")}}
    path = tmp_path / "validation.json"
    path.write_text(json.dumps({"format": "sts-validation/1", "per_seed": [good, seed]}))
    with pytest.raises(STSInputError, match=words):
        Calibration.from_validation(path, ["sts_icl"])


def test_leave_one_group_out_never_sees_the_held_out_group():
    x = [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    y = [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]  # source C behaves differently
    groups = ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    predictions = leave_one_group_out([[v] for v in x], y, groups, ["s"])
    assert [p.mean for p in predictions[8:]] == pytest.approx([0.0, 1.0, 2.0, 3.0])  # fitted on A and B only
    assert predictions[0].mean != pytest.approx(0.0)  # A's prediction saw C's outlying rows


def test_lr_area_fraction_and_early_forecast():
    assert lr_area_fraction(5, 10, [1.0] * 10) == pytest.approx(0.5)
    decaying = [1.0 - i / 10 for i in range(10)]
    assert lr_area_fraction(5, 10, decaying) > 0.5  # most of a decaying schedule's area comes early
    assert lr_area_fraction(10, 10, decaying) == 1.0
    assert early_forecast({"law": 0.01, "x": None}, 0.25) == {"law": pytest.approx(0.04), "x": None}
    with pytest.raises(STSInputError):
        lr_area_fraction(1, 10, [1.0] * 3)


def test_cli_calibrate_writes_a_calibration_the_callback_reads(tmp_path, capsys):
    import json

    from sts_callback.tools.cli import main

    record = {"format": "sts-validation/1", "output_dir": "v", "per_seed": [
        {"scores": {d: {"sts_icl": float(i), "signed_usage": float(-i)} for i, d in enumerate("abcde")},
         "nll_delta_rel": {d: 0.01 * i for i, d in enumerate("abcde")}}]}
    (tmp_path / "validation.json").write_text(json.dumps(record))
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(tmp_path / "validation.json"), "--features", "sts_icl", "signed_usage",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "5 measured (domain, seed) pairs" in said
    # the residual std read against how far the changes spread (alone it cannot say whether the features help)
    assert re.search(r"against the changes' spread 1\.41% \(the features account for \d+% of it\)", said)
    assert Calibration.load(out).features == ["sts_icl", "signed_usage"]
    assert Calibration.load(out).fitted_on["changes_spread"] == pytest.approx(np.std([0, 0.01, 0.02, 0.03, 0.04]))
    assert main(["calibrate", str(tmp_path / "missing")]) == 2
    assert "No validation.json" in capsys.readouterr().err
    (tmp_path / "run" / "sts").mkdir(parents=True)  # a training run's folder given without --runs
    (tmp_path / "run" / "sts" / "forecast.json").write_text("{}")
    assert main(["calibrate", str(tmp_path / "run")]) == 2
    assert "to fit on training runs, pass them with `sts calibrate --runs" in capsys.readouterr().err
    # a feature that never varies: an error with the fix, not a traceback; the library's warnings as the command's
    for i, d in enumerate("abcde"):
        record["per_seed"][0]["scores"][d]["sts_icl"] = 1.0
    (tmp_path / "validation.json").write_text(json.dumps(record))
    assert main(["calibrate", str(tmp_path / "validation.json"), "--features", "sts_icl", "--out",
                 str(tmp_path / "flat.json")]) == 2
    assert "sts: error: The feature(s) ['sts_icl'] take one value" in capsys.readouterr().err


def test_fitted_exponent_recovers_a_saturating_power_law():
    points = [(f, {"a": -0.1 * f ** 0.6, "b": 0.03 * f ** 0.6, "tiny": 0.001 * f}) for f in (0.25, 0.5)]
    assert fitted_exponent(points) == pytest.approx(0.6)  # "tiny" is below the noise floor and ignored
    assert fitted_exponent(points[:1]) is None  # one re-check: no exponent yet
    flipped = [(0.25, {"a": -0.02}), (0.5, {"a": 0.03})]
    assert fitted_exponent(flipped) is None  # a change that flips sign says nothing about the exponent
    early = early_forecast({"a": points[0][1]["a"]}, 0.25, 0.6)
    assert early["a"] == pytest.approx(-0.1)  # extrapolated to the end with the fitted exponent


def test_a_domain_off_the_features_correlation_gets_the_wide_interval_least_squares_gives(tmp_path):
    """With correlated features (STS_icl beside signed_usage, any feature beside domain_prior) the interval read a
    domain's distance from the fitted centre as z.z / n: a domain whose features break their correlation got an
    interval a quarter as wide as ordinary least squares gives it."""
    from scipy.stats import t

    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    x = np.column_stack([a, a + 0.1 * rng.normal(size=30)])  # correlation about 0.99
    y = x @ [0.02, 0.01] + 0.01 * rng.normal(size=30)
    calibration = Calibration.fit(x, y, ["f1", "f2"], ridge=0.0, level=0.9)
    query = np.array([1.0, -1.0])  # off the correlation
    design = np.column_stack([np.ones(30), x])
    residuals = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    sigma = np.sqrt(residuals @ residuals / (30 - 3))
    row = np.concatenate([[1.0], query])
    ols = t.ppf(0.95, 27) * sigma * np.sqrt(1 + row @ np.linalg.inv(design.T @ design) @ row)
    for fitted in (calibration, Calibration.load(calibration.save(tmp_path / "c.json"))):
        prediction = fitted.predict(list(query))
        assert (prediction.high - prediction.low) / 2 == pytest.approx(ols, rel=1e-6)


def test_predict_takes_one_value_per_feature_and_names_what_is_not_a_number():
    """A 2-feature calibration took predict(0.5) (numpy spread it over both features) and even predict("0.5"); a
    NaN feature was blamed on the calibration ("refit it")."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 2))
    calibration = Calibration.fit(X, 0.3 * X[:, 0] + rng.normal(0, 0.01, 40), ["a", "b"])
    for values in (0.5, [0.5], "0.5", [0.5, 0.5, 0.5]):
        with pytest.raises(STSInputError, match=r"feature|numbers"):
            calibration.predict(values)
    with pytest.raises(STSInputError, match=r"\{'a': nan\} are not finite numbers"):
        calibration.predict({"a": float("nan"), "b": 0.1})
    assert calibration.predict([np.float32(0.5), 0.1]).mean == pytest.approx(calibration.predict([0.5, 0.1]).mean,
                                                                               rel=1e-6)
    import torch

    one = Calibration.fit(X[:, :1], 0.3 * X[:, 0] + rng.normal(0, 0.01, 40), ["a"])
    for number in (np.array(0.5), torch.tensor(0.5), torch.tensor([0.5]), {"a": torch.tensor(0.5)}, (0.5,)):
        assert one.predict(number).mean == pytest.approx(one.predict(0.5).mean)  # numbers however held
    # among a forecast's domains, one whose score could not be computed is left out, the others predicted
    with pytest.warns(STSDataWarning, match=r"\['x'\] have a feature that is not a finite number"):
        predicted = calibration.predict_all({"x": {"a": float("nan"), "b": 0.0}, "y": {"a": 0.2, "b": 0.0}})
    assert list(predicted) == ["y"]


def test_from_validation_refuses_copies_and_nothing_and_warns_of_a_fit_with_no_freedom(tmp_path):
    """A copied validation folder counted its pairs twice (intervals 20% narrower); an empty list was called a
    diverged training; six features on eight pairs passed without a word; the runs' length went unrecorded, so
    the callback never compared it with its own run's."""
    def record(out, shift=0.0, steps=16, domains="abcdef"):
        return {"output_dir": out, "training": {"steps": steps, "learning_rate": 1e-3}, "per_seed": [
            {"scores": {d: {"sts_icl": float(i) + shift, "sts_act": float(i * i)} for i, d in enumerate(domains)},
             "nll_delta_rel": {d: 0.01 * i + shift / 100 + 0.001 * (i % 2) for i, d in enumerate(domains)}}]}

    with pytest.raises(STSInputError, match=r"hold the same measured changes \(copies of one validation\)"):
        Calibration.from_validation([record("v1"), record("v2")], ["sts_icl"])
    # two diverged validations (every change null) are no copies: they add no pair, the good one is fitted
    diverged = [{**record(f"div{i}", i + 1.0), "per_seed": [{**record("x", i + 1.0)["per_seed"][0],
                                                            "nll_delta_rel": {d: None for d in "abcdef"}}]}
                for i in range(2)]
    assert Calibration.from_validation([record("v1"), *diverged], ["sts_icl"]).n == 6
    with pytest.raises(STSInputError, match=r"validation #1 \(in memory\)', 'validation #2"):
        Calibration.from_validation([{k: v for k, v in record("x").items() if k != "output_dir"}] * 2, ["sts_icl"])
    with pytest.raises(STSInputError, match="No validation given"):
        Calibration.from_validation([], ["sts_icl"])
    with pytest.warns(STSDataWarning, match=r"2 feature\(s\) and a level on 5 \(domain, seed\) pairs: 2 degree"):
        few = Calibration.from_validation([record("v1", domains="abcde")], ["sts_icl", "sts_act"])
    assert few.fitted_run_steps == [16]
    with pytest.warns(STSDataWarning, match=r"different lengths or rates \(steps \[16, 64\]"):
        Calibration.from_validation([record("v1"), record("v2", 0.5, steps=64)], ["sts_icl"])
