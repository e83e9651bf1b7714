"""A forecast a person reads: predicted change of held-out loss, interval and label first; raw scores second."""

import warnings

import pytest
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import Calibration, Forecast, STSConfig, forecast
from sts_callback.reporting.report import write_report


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tokenizer, model = make_tokenizer(), make_model("llama")
    sae = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    targets = {d: domain_texts(d, 15) for d in ("code", "chem", "food")}
    config = STSConfig(n_shifted=12, shift_tokens=300, domain_tokens=150, batch_size=4, n_domain_demonstrations=3)
    plain = forecast(model, tokenizer, sae, domain_texts("law", 30), targets, config)
    acts = [plain.domains[d].scores["sts_act"] for d in targets]
    # a calibration in which more STS_act means a larger loss rise, with a small residual spread
    low, high = min(acts), max(acts)
    xs = [low + (high - low) * i / 9 for i in range(10)]
    ys = [0.5 * (x - low) / (high - low + 1e-12) - 0.1 + (0.003 if i % 2 else -0.003) for i, x in enumerate(xs)]
    calibration = Calibration.fit(xs, ys, ["sts_act"], level=0.9)
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    calibration.save(path)
    result = forecast(model, tokenizer, sae, domain_texts("law", 30), targets, config, calibration=str(path))
    return plain, result, calibration


def test_calibrated_forecast_predicts_each_domain_with_interval_and_label(calibrated):
    plain, result, calibration = calibrated
    assert set(result.predictions) == set(result.domains)
    for name, p in result.predictions.items():
        expected = calibration.predict(result.domains[name].scores)
        assert p["mean"] == pytest.approx(expected.mean) and p["low"] < p["mean"] < p["high"]
        assert p["level"] == 0.9
        assert p["label"] == ("loss" if p["low"] > 0 else "gain" if p["high"] < 0 else "flat")
    labels = {p["label"] for p in result.predictions.values()}
    assert labels & {"loss", "gain"}  # the spread of the calibration separates the extremes


def test_table_leads_with_the_prediction_and_keeps_the_scores_apart(calibrated):
    plain, result, _ = calibrated
    text = result.table()
    assert text.startswith("STS forecast: predicted change of each domain's held-out loss")
    worst = max(result.predictions, key=lambda n: result.predictions[n]["mean"])
    assert text.splitlines()[3].startswith(worst)  # most harmed first
    assert "90% interval" in text and "raw scores: forecast.table(view='scores')" in text
    assert "STS_act" in result.table(view="scores") and "STS_act" not in text
    assert plain.table().startswith("STS forecast: 3 target domains, ranked by")  # uncalibrated: scores
    # the protected domains marked, as the re-check lines mark them (the train-start table did not)
    for table in (result.table(protected=["chem", "other"]), plain.table(protected=["chem"])):
        rows = [line.split()[0] if not line[0].isspace() else line.split()[1] for line in table.splitlines()
                if "chem" in line or "food" in line]
        assert "chem*" in rows and "food" in rows and table.endswith("(*: protected domain)")
    assert "*" not in plain.table()


def test_predictions_round_trip_and_lead_the_report(calibrated, tmp_path):
    _, result, _ = calibrated
    result.save(tmp_path / "sts" / "forecast.json")
    assert Forecast.load(tmp_path / "sts" / "forecast.json").predictions == result.predictions
    html_path, md_path = write_report(tmp_path / "sts")
    html, md = html_path.read_text(), md_path.read_text()
    assert html.index('id="prediction"') < html.index('id="forecast"')
    assert md.index("Predicted change of held-out loss") < md.index("raw scores")
    for name, p in result.predictions.items():
        assert f'data-domain="{name}"' in html and p["label"] in md


def test_builtin_calibration_is_shipped_with_its_scope_and_loads_by_name():
    from importlib.resources import files

    from sts_callback.core.errors import STSConfigError
    from sts_callback.scoring.calibration import BUILTIN, builtin_calibration, load_calibration

    for name, file in BUILTIN.items():
        assert files("sts_callback").joinpath("calibrations", file).is_file()
        calibration = load_calibration(name)
        if name == "gemma3-270m-lora-compressed":  # the compressed run's change is its prediction: no SAE, no prior
            continue
        assert calibration.centered and "domain_prior" in calibration.features
        assert {"model", "sae", "recipe", "units", "leave_one_source_out"} <= set(calibration.fitted_on)
        assert len(calibration.domain_prior) == 11  # the built-in domains it was fitted over
    compressed = load_calibration("gemma3-270m-lora-compressed")
    assert compressed.features == ["compressed"] and compressed.run_level_inputs() == ["compressed"]
    assert compressed.fitted_run_level_share == 0.25 and compressed.fitted_run_level_steps is None
    assert compressed.predict_all({"a": {"compressed": 0.03}})["a"].mean == pytest.approx(0.03)  # the change itself
    assert {"model", "recipe", "units", "against_the_precise_final_change"} <= set(compressed.fitted_on)
    plain = load_calibration("gemma3-270m-lora")
    assert plain.source_features == [] and "sts_icl" in plain.features  # no run-level term needed
    lookahead = load_calibration("gemma3-270m-lora-lookahead")  # the level from the callback's own-only lookahead
    assert lookahead.source_features == ["lookahead_own"] and lookahead.features == ["domain_prior"]
    assert lookahead.fitted_on["scope"]["run_level_steps"] == 2 and lookahead.run_level_inputs() == ["lookahead_own"]
    assert lookahead.blend_table("power", "lora") and not lookahead.blend_table("power", "full")  # early forecast
    # the best step-0 forecast: the same level, the pattern also from a signed SAE score and the in-context NLL change
    icl = load_calibration("gemma3-270m-lora-lookahead-icl")
    assert icl.source_features == ["lookahead_own"] and "icl_loss_change" in icl.score_features
    assert icl.fitted_on["icl_loss"]["tokens"] == 384 and icl.fitted_on["leave_one_source_out"]["goal_met"] >= 9
    assert icl.fitted_on["scope"]["run_level_steps"] == 1 and icl.blend_table("power", "lora")
    with pytest.raises(STSConfigError, match="gemma3-270m-lora"):
        builtin_calibration("gemma3-270m-full")
    with pytest.raises(STSConfigError, match="neither a file nor a built-in"):
        load_calibration("no-such-calibration")


def test_excluded_domain_is_not_predicted_and_the_others_centre_without_it(calibrated):
    from sts_callback.core.errors import STSConfigError, STSDataWarning
    from sts_callback.scoring.calibration import builtin_calibration

    plain, _, _ = calibrated
    calibration = builtin_calibration("gemma3-270m-lora")
    with pytest.warns(STSDataWarning, match="fitted on another setup: model_class 'LlamaForCausalLM'"):
        Forecast.from_dict(plain.to_dict()).apply_calibration(calibration)
    # the setup it states as its scope (the demo's model and SAE): no warning
    gemma = plain.to_dict()
    gemma["settings"] = {**gemma["settings"], "model_class": "Gemma3ForCausalLM",
                         "sae": {**gemma["settings"]["sae"], "d_in": 640, "d_sae": 4096,
                                 "hook_name": "blocks.12.hook_resid_post"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        both = Forecast.from_dict(gemma).apply_calibration(calibration)
        result = Forecast.from_dict(gemma).apply_calibration(calibration, exclude=["code"])
    assert set(both.predictions) == {"code", "chem", "food"}
    # the built-in's runs never measured these toy domains: they take the average domain's level, said in the table
    assert "not in the calibration's runs: ['chem', 'code', 'food'] (the average domain's level" in " ".join(
        both.table().split())
    assert set(result.predictions) == {"chem", "food"}
    expected = calibration.predict_all({n: plain.domains[n].scores for n in ("chem", "food")})
    for name in ("chem", "food"):  # centred over chem and food only: code's scores do not move them
        assert result.predictions[name]["mean"] == pytest.approx(expected[name].mean)
    assert result.predictions["chem"]["mean"] != pytest.approx(both.predictions["chem"]["mean"])
    assert "not predicted: ['code']" in result.table()
    assert "not predicted" not in both.table()  # read from one dict, applied apart: neither writes the other's
    assert gemma["settings"].get("calibration") is None
    with pytest.raises(STSConfigError, match="not target domains"):
        Forecast.from_dict(gemma).apply_calibration(calibration, exclude=["cod"])


def test_a_calibration_that_needs_a_training_run_is_refused_before_the_forecast_runs():
    from pathlib import Path

    from sts_callback.core.errors import STSConfigError

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "transfer" / "calibration_gemma3_270m.json"
    never = object()  # no model at all: the refusal must come first
    with pytest.raises(STSConfigError, match=r"\['lookahead', 'first_order', 'lookahead_own'\].*gemma3-270m-lora"):
        forecast(never, None, None, ["text"], {"a": ["text"]}, calibration=str(path))


def test_table_rows_stay_intact_whatever_the_domain_names_hold():
    from sts_callback.pipelines.forecast import DomainForecast

    names = ["tab\there", "new\nline", "ansi\x1b[31mred", "naïve 法律", "plain"]
    result = Forecast(domains={n: DomainForecast(n, 10, 100, {"sts_act": 1.0 + i}) for i, n in enumerate(names)},
                      shifted_latents=[1], shift_values=[1.0], shift_direction=[1.0], raw_shifted_dims=[],
                      raw_shift_values=[], shift_tokens=100, shift_queries=5, ranking="sts_act")
    lines = result.table().splitlines()
    assert len(lines) == 3 + len(names) and "\x1b" not in result.table() and "\t" not in result.table()
    shown = {line[6:].split("  ")[0].rstrip() for line in lines[3:]}
    assert shown == {r"tab\there", r"new\nline", r"ansi\x1b[31mred", "naïve 法律", "plain"}
    # the score column starts at one terminal column in every row (a CJK character takes two)
    import unicodedata

    def column(line, cell):
        head = line[: line.index(cell)]
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in head)

    assert len({column(line, f"{i + 1.0:>10.4g}") for line, i in
                zip(lines[3:], sorted(range(len(names)), reverse=True))}) == 1
    result.predictions = {n: {"mean": 0.01, "low": -0.01, "high": 0.02, "level": 0.9, "label": "flat"} for n in names}
    assert "\x1b" not in result.table() and len(result.table().splitlines()) == 3 + len(names) + 1


def test_a_lookahead_calibration_is_refused_for_a_forecast_of_another_lookahead_length(calibrated):
    """STSCallback refused a calibration fitted on 2-step lookaheads for a 1-step run; apply_calibration on the
    run's forecast.json predicted silently from a level on the wrong scale."""
    from sts_callback.core.errors import STSConfigError
    from sts_callback.scoring.calibration import builtin_calibration

    plain, _, _ = calibrated
    lookahead = builtin_calibration("gemma3-270m-lora-lookahead")  # its level: a 2-step lookahead's own change
    run = plain.to_dict()
    run["settings"] = {**run["settings"], "run_level": {"method": "lookahead", "steps": 1, "own_change": -0.02,
                                                        "change": {}}}
    with pytest.raises(STSConfigError, match=r"after 2 lookahead step\(s\), this forecast's after 1"):
        Forecast.from_dict(run).apply_calibration(lookahead)
    run["settings"]["run_level"]["steps"] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model is outside the calibration's scope: said, not refused
        assert Forecast.from_dict(run).apply_calibration(lookahead).predictions
