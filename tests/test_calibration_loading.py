"""A calibration is checked when loaded, says when it cannot predict, and records the setup it was fitted on."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from sts_callback import STSConfigError, STSInputError
from sts_callback.core.errors import STSDataWarning
from sts_callback.core.run_store import FORECAST_FORMAT
from sts_callback.pipelines.forecast import DomainForecast, Forecast
from sts_callback.scoring.calibration import BUILTIN, Calibration, builtin_calibration, load_calibration

LLAMA = {"model_class": "LlamaForCausalLM", "d_in": 32, "d_sae": 64, "hook_name": "blocks.1.hook_resid_post"}


def plain() -> dict:
    """A valid one-feature calibration, as its file holds it."""
    return Calibration.fit([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.11, 0.19, 0.31, 0.4], ["sts_act"]).to_dict()


def level_pattern() -> dict:
    """A valid level + pattern calibration with a domain prior and an early blend."""
    rng = np.random.default_rng(0)
    names = ["code", "prose", "math"]
    runs = [(rng.normal(size=(3, 1)), rng.normal(0, 0.01, 3) + 0.1 * own, [own], names)
            for own in (0.1, 0.2, 0.4, 0.3)]
    calibration = Calibration.fit_level_pattern(runs, ["sts_act"], ["lookahead_own"], domain_prior=True)
    calibration.early_blend = {"power": [[0.2, 0.01, 0.3, 0.6], [0.6, 0.0, 0.8, 0.2]]}
    calibration.early_blend_recipe = "lora"
    return calibration.to_dict()


def forecast_of(scores: dict[str, dict], settings: dict | None = None) -> Forecast:
    """A forecast with only what applying a calibration reads: each domain's scores and the settings."""
    return Forecast(domains={n: DomainForecast(n, 10, 100, s) for n, s in scores.items()}, shifted_latents=[],
                    shift_values=[], shift_direction=[], raw_shifted_dims=[], raw_shift_values=[], shift_tokens=0,
                    shift_queries=0, ranking="sts_act", settings=dict(settings or {}))


@pytest.mark.parametrize("content, what", [("[1, 2]", "a list"), ("null", "null"), ("3", "the number 3"),
                                           ('"sts"', "the string")])
def test_a_calibration_file_that_is_not_an_object_is_refused_by_name(tmp_path, capsys, content, what):
    from sts_callback.tools.cli import main

    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(STSConfigError, match=f"cal.json.*Not an STS calibration: {what}.*sts calibrate"):
        load_calibration(str(path))
    with pytest.raises(STSInputError, match="not a JSON object"):
        Calibration.load(path)
    # the CLI's one-line error, before any model loads (the folders only look like a model and an SAE)
    for folder, name in (("model", "config.json"), ("sae", "cfg.json")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text("{}")
    from safetensors.torch import save_file  # a weights file whose header reads (the CLI opens it first)

    save_file({"W_enc": torch.zeros(1)}, str(tmp_path / "sae" / "sae_weights.safetensors"))
    config = tmp_path / "forecast.yaml"
    config.write_text(json.dumps({"model": str(tmp_path / "model"), "sae": str(tmp_path / "sae"),
                                  "train_data": ["a text"], "targets": {"a": ["x y"], "b": ["p q"]}}))
    assert main(["forecast", str(config), "--calibration", str(path), "-o", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sts: error:") and "not a JSON object" in err and "Traceback" not in err


BAD_FIELDS = [  # (kind, field, value, what the message says)
    ("plain", "level", 5, r"'level' is the number 5; it must be a number in \(0, 1\)"),
    ("plain", "level", 0.0, r"'level'.*\(0, 1\)"),
    ("plain", "level", "0.9", r"'level' is the string"),
    ("plain", "scale", [0.0], r"'scale\[0\]'.*positive"),
    ("plain", "scale", [-2.0], r"'scale\[0\]'.*positive"),
    ("plain", "coef", [1.0, 2.0, 3.0], r"'coef' has 3 value\(s\) but 'features' has 1"),
    ("plain", "center", [], r"'center' has 0 value\(s\) but 'features' has 1"),
    ("plain", "coef", 1.0, r"'coef' is the number 1.0; it must be a list"),
    ("plain", "coef", [None], r"'coef\[0\]' is null"),
    ("plain", "n", 0, r"'n' is the number 0; it must be a whole number >= 1"),
    ("plain", "n", 2.5, r"'n'.*whole number"),
    ("plain", "n", True, r"'n' is the boolean true"),
    ("plain", "sigma", "abc", r"'sigma' is the string 'abc'; it must be a finite number >= 0"),
    ("plain", "sigma", -0.1, r"'sigma'.*>= 0"),
    ("plain", "sigma", math.nan, r"'sigma' is the number nan"),
    ("plain", "intercept", math.inf, r"'intercept' is the number inf; it must be a finite number"),
    ("plain", "ridge", -1.0, r"'ridge'.*>= 0"),
    ("plain", "features", "sts_act", r"'features' is the string 'sts_act'; it must be a list of feature names"),
    ("plain", "features", [1], r"'features' is a list; it must be a list of feature names"),
    ("plain", "fitted_on", [], r"'fitted_on' is a list; it must be an object"),
    ("plain", "fitted_on", {"scope": "gemma"}, r"'fitted_on.scope' is the string"),
    ("plain", "fitted_on", {"scope": {"run_level_steps": 0}}, r"'fitted_on.scope.run_level_steps'.*integer >= 1"),
    ("plain", "centered", "yes", r"'centered' is the string 'yes'; it must be true or false"),
    ("level", "source_coef", [], r"'source_coef' has 0 value\(s\) but 'source_features' has 1"),
    ("level", "source_features", [None], r"'source_features' is a list; it must be a list of feature names"),
    ("level", "domain_prior", {"code": "high"}, r"'domain_prior.code' is the string 'high'"),
    ("level", "domain_prior", {}, r"features has 'domain_prior' but the domain_prior map is empty"),
    ("plain", "domain_prior", {"code": 0.1}, r"features lacks 'domain_prior' but the domain_prior map is given"),
    ("level", "early_blend", {"power": [[0.5, 0.0, 1.0]]}, r"'early_blend.power\[0\]' is a list; it must be a row"),
    ("level", "early_blend", {"power": [[1.5, 0.0, 1.0, 0.0]]}, r"'early_blend.power\[0\]\[0\]'.*\[0, 1\]"),
    ("level", "early_blend", {"power": [[0.5, 0.0, "x", 0.0]]}, r"'early_blend.power\[0\]\[2\]' is the string"),
    ("level", "early_blend", {"powr": []}, r"'early_blend' has the method 'powr'; the early methods are"),
    ("level", "early_blend", [], r"'early_blend' is a list; it must be an object"),
    ("level", "early_blend_recipe", "qlora", r"'early_blend_recipe' is the string 'qlora'.*\['lora', 'full'\]"),
    ("level", "pattern_scale", "relative", r"'pattern_scale' is the string 'relative'.*\['absolute', 'run'\]"),
    ("level", "pattern_spread", 0.0, r"'pattern_spread' is the number 0.0; it must be a positive number"),
]


@pytest.mark.parametrize("kind, name, value, message", BAD_FIELDS,
                         ids=[f"{k}-{n}-{v!r}" for k, n, v, _ in BAD_FIELDS])
def test_a_bad_field_fails_when_loaded_naming_the_field_and_the_fix(kind, name, value, message):
    data = {**(plain() if kind == "plain" else level_pattern()), name: value}
    with pytest.raises(STSInputError, match=message) as caught:
        Calibration.from_dict(data)
    assert "sts calibrate" in str(caught.value)  # the fix: correct it, or refit


def test_a_corrupt_file_names_itself_and_missing_or_unknown_fields(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({**plain(), "level": 5}))
    with pytest.raises(STSConfigError, match=r"cal.json.*'level' is the number 5"):
        load_calibration(str(path))
    with pytest.raises(STSInputError, match=r"cal.json: Calibration field 'level'"):
        Calibration.load(path)
    without = plain()
    del without["coef"]
    with pytest.raises(STSInputError, match=r"lacks the field\(s\) \['coef'\]"):
        Calibration.from_dict(without)
    with pytest.raises(STSInputError, match=r"unknown field\(s\) \['extra'\]"):
        Calibration.from_dict({**plain(), "extra": 1})
    path.write_text(json.dumps(plain())[:40])
    with pytest.raises(STSConfigError, match="not a JSON file"):
        load_calibration(str(path))


def test_valid_calibrations_still_load_and_predict_finite_values(tmp_path):
    for name in BUILTIN:
        assert builtin_calibration(name).n > 0
    loaded = Calibration.load(Calibration.from_dict(level_pattern()).save(tmp_path / "c.json"))
    predicted = loaded.predict_all({"code": {"sts_act": 0.2}, "new": {"sts_act": -0.1}}, {"lookahead_own": 0.2})
    assert all(math.isfinite(v) for p in predicted.values() for v in (p.mean, p.low, p.high))
    assert Calibration.from_dict({**plain(), "n": 5.0}).n == 5  # a whole number written as a float


def test_a_calibration_whose_features_the_forecast_lacks_is_an_error_not_an_empty_result():
    calibration = Calibration.from_dict(plain())  # on sts_act
    unknown = Calibration.from_dict({**plain(), "features": ["not_a_score"]})
    result = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}})
    with pytest.raises(STSConfigError, match=r"\['not_a_score'\], which are not forecast scores.*sts calibrate"):
        result.apply_calibration(unknown)
    assert result.predictions == {} and "calibration" not in result.settings  # not marked as applied
    not_computed = forecast_of({"a": {"sts_act": None, "sts_icl": 1.0}, "b": {"sts_act": None, "sts_icl": 2.0}})
    with pytest.raises(STSConfigError, match=r"\['sts_act'\], which this forecast did not compute for any domain"):
        not_computed.apply_calibration(calibration)
    with pytest.raises(STSInputError, match=r"No domain has every feature.*none has \['sts_act'\]"):
        calibration.predict_all({"a": {"sts_icl": 1.0}})
    assert calibration.predict_all({}) == {}
    # one domain without the feature (a one-text domain's STS_icl) only goes unpredicted, as the table says
    partial = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": None}}).apply_calibration(calibration)
    assert set(partial.predictions) == {"a"} and "no prediction for ['b']" in partial.table()


def test_a_calibration_on_unknown_features_is_refused_before_the_forecast_runs():
    from sts_callback import forecast

    never = object()  # no model at all: the refusal must come first
    unknown = Calibration.from_dict({**plain(), "features": ["not_a_score"]})
    with pytest.raises(STSConfigError, match=r"\['not_a_score'\], which are not forecast scores"):
        forecast(never, None, None, ["text"], {"a": ["text"]}, calibration=unknown)


def write_validation(folder, settings: dict, shift: float = 0.0):
    """What `sts validate` writes in OUTPUT_DIR/sts: validation.json and the forecast beside it."""
    sts = folder / "sts"
    sts.mkdir(parents=True)
    per_seed = [{"scores": {d: {"sts_act": float(i) + s} for i, d in enumerate("abcd")},
                 "nll_delta_rel": {d: 0.01 * i + shift + 0.001 * s for i, d in enumerate("abcd")}} for s in (0, 1)]
    (sts / "validation.json").write_text(json.dumps({"format": "sts-validation/1", "per_seed": per_seed,
                                                     "files": {"forecast": str(sts / "forecast.json")}}))
    (sts / "forecast.json").write_text(json.dumps({"format": FORECAST_FORMAT, "settings": settings}))
    return sts / "validation.json"


def sae_settings(scope: dict) -> dict:
    return {"model_class": scope["model_class"], "model": "somewhere",
            "sae": {"kind": "folder", "path": "sae", "layer": 1,
                    **{k: scope[k] for k in ("d_in", "d_sae", "hook_name")}}}


def test_a_calibration_fitted_on_validations_records_their_scope_and_warns_on_another_model(tmp_path, capsys):
    from sts_callback.tools.cli import main

    path = write_validation(tmp_path / "val", sae_settings(LLAMA))
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(tmp_path / "val"), "--features", "sts_act", "--out", str(out)]) == 0
    calibration = load_calibration(str(out))
    assert calibration.fitted_on["scope"] == {**LLAMA, "shift": "in_context"}  # SFT forecasts: in context
    assert calibration.fitted_on["validations"] == [str(path.resolve())]  # where it came from, not null
    gpt2 = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings({**LLAMA, "model_class": "GPT2"}))
    with pytest.warns(STSDataWarning, match="fitted on another setup: model_class 'GPT2'.*'LlamaForCausalLM'"):
        gpt2.apply_calibration(calibration)
    wider = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings({**LLAMA, "d_sae": 128}))
    with pytest.warns(STSDataWarning, match="d_sae 128 .calibrated on 64."):
        wider.apply_calibration(calibration)
    same = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings(LLAMA))
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        same.apply_calibration(calibration)
    # validations of two models: the scope is what they share (the SAE), not one model's class
    other = write_validation(tmp_path / "val2", sae_settings({**LLAMA, "model_class": "GPT2"}), shift=0.002)
    with pytest.warns(STSDataWarning, match=r"different setups \(model_class: 'LlamaForCausalLM' .*'GPT2'"):
        both = Calibration.from_validation([path, other], ["sts_act"])  # pooled: said, as for training runs
    assert both.fitted_on["scope"] == {**{k: v for k, v in LLAMA.items() if k != "model_class"}, "shift": "in_context"}


def write_run(folder, settings: dict, own: float, offsets: dict[str, float]):
    """What a training run with the callback leaves in OUTPUT_DIR/sts: its forecast and re-check history."""
    sts = folder / "sts"
    sts.mkdir(parents=True)
    settings = {**settings, "run_level": {"method": "lookahead", "own_change": own, "steps": 2}}
    domains = {d: {"scores": {"sts_act": float(i)}} for i, d in enumerate(offsets)}
    (sts / "forecast.json").write_text(json.dumps({"format": FORECAST_FORMAT, "domains": domains,
                                                   "settings": settings}))
    delta = {d: 0.01 - 0.5 * own + o for d, o in offsets.items()}
    (sts / "history.jsonl").write_text(json.dumps({"step": 4, "loss_delta": delta}) + "\n")


def test_a_calibration_fitted_on_training_runs_records_their_scope(tmp_path):
    offsets = {"law": 0.02, "food": -0.01, "chem": -0.01}
    runs = []
    for i, own in enumerate((-0.3, -0.1, 0.0, -0.2)):
        write_run(tmp_path / f"run{i}", sae_settings(LLAMA), own, {d: o + 0.001 * i * (j - 1)
                                                                    for j, (d, o) in enumerate(offsets.items())})
        runs.append(str(tmp_path / f"run{i}"))
    calibration = Calibration.from_runs(runs, ["sts_act"])
    assert calibration.fitted_on["scope"] == {**LLAMA, "run_level_steps": 2, "shift": "in_context"}
    assert calibration.fitted_on["training_runs"] == runs
    applied = forecast_of({d: {"sts_act": 1.0 + i} for i, d in enumerate(offsets)},
                          {**sae_settings({**LLAMA, "hook_name": "blocks.5.hook_resid_post"}),
                           "run_level": {"method": "lookahead", "own_change": -0.1}})
    with pytest.warns(STSDataWarning, match="hook_name 'blocks.5.hook_resid_post'"):
        applied.apply_calibration(calibration)


def test_the_table_names_the_calibration_and_says_when_it_is_out_of_scope(tmp_path):
    path = tmp_path / "mine.json"
    Calibration.from_dict(plain()).save(path)
    calibration = load_calibration(str(path))
    assert calibration.source == str(path) and "source" not in calibration.to_dict()  # where from: not saved
    assert load_calibration("gemma3-270m-lora").source == "built-in gemma3-270m-lora"
    forecast = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings(LLAMA))
    forecast.apply_calibration(calibration)
    assert forecast.settings["calibration"]["source"] == str(path)
    assert forecast.settings["calibration"]["scope_problems"] == [] and "CAUTION" not in forecast.table()
    assert f"calibration {path}, fitted on" in forecast.table()
    other = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings(LLAMA))
    gemma = Calibration.from_dict({**plain(), "fitted_on": {"scope": {**LLAMA, "model_class": "Gemma3ForCausalLM"}}})
    with pytest.warns(STSDataWarning, match="another setup"):
        other.apply_calibration(gemma)
    problems = other.settings["calibration"]["scope_problems"]
    assert problems == ["model_class 'LlamaForCausalLM' (calibrated on 'Gemma3ForCausalLM')"]
    assert "CAUTION: the calibration was fitted on another setup (model_class 'LlamaForCausalLM'" in other.table()


def test_a_calibration_fitted_on_sft_forecasts_is_out_of_scope_for_a_dpo_forecast():
    """The built-in calibration was fitted on in-context (SFT) forecasts; applied to a chosen-vs-rejected, RL or
    distillation forecast it said nothing."""
    sft = Calibration.from_dict({**plain(), "fitted_on": {"scope": {**LLAMA, "shift": "in_context"}}})
    same = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, sae_settings(LLAMA))
    same.apply_calibration(sft)  # a forecast without a recorded shift is an in-context one
    assert same.settings["calibration"]["scope_problems"] == []
    dpo = forecast_of({"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, {**sae_settings(LLAMA),
                                                                      "shift": "chosen_vs_rejected"})
    with pytest.warns(STSDataWarning, match="shift 'chosen_vs_rejected' \\(calibrated on 'in_context'\\)"):
        dpo.apply_calibration(sft)
    assert load_calibration("gemma3-270m-lora").fitted_on["scope"]["shift"] == "in_context"
    from sts_callback.scoring.calibration import forecast_scope

    assert forecast_scope(dpo.settings)["shift"] == "chosen_vs_rejected"  # what `sts calibrate` records of runs


def test_a_predicted_change_never_falls_below_minus_100_percent():
    wide = Calibration.fit([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.9, -0.8, 0.7, -0.6], ["sts_act"])
    prediction = wide.predict(40.0)  # far from the fitted centre: the interval is wide
    assert prediction.low == -1.0 and prediction.high > prediction.low >= -1.0 and prediction.mean >= -1.0


def test_runs_whose_rechecks_took_turns_calibrate_on_every_domains_latest_change(tmp_path):
    from sts_callback.scoring.calibration import run_records

    write_run(tmp_path / "run", sae_settings(LLAMA), -0.1, {"law": 0.02, "food": -0.01, "chem": 0.0})
    history = tmp_path / "run" / "sts" / "history.jsonl"  # loss_domains=1: each re-check measures some domains
    history.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 2, "loss_delta": {"law": 0.01, "food": -0.02}}, {"step": 4, "loss_delta": {"law": 0.03, "chem": 0.05}},
        {"step": 6, "loss_delta": {"law": 0.04, "food": None}}]))
    (record,) = run_records([str(tmp_path / "run")])
    assert record["changes"] == {"law": 0.04, "food": -0.02, "chem": 0.05} and record["step"] == 6


def test_a_calibration_fitted_with_one_sae_warns_when_applied_with_another_of_the_same_shape(tmp_path):
    from tiny import TinySAE

    from sts_callback import load_sae

    hook = LLAMA["hook_name"]
    mine, again, other = (load_sae(TinySAE(32, 64, hook_name=hook, seed=s)).fingerprint() for s in (0, 0, 1))
    assert mine == again != other  # the weights, not the shape: another seed differs
    offsets = {"law": 0.02, "food": -0.01, "chem": -0.01}
    runs = []
    for i, own in enumerate((-0.3, -0.1, 0.0, -0.2)):
        settings = sae_settings(LLAMA)
        settings["sae"]["sae_fingerprint"] = mine
        write_run(tmp_path / f"run{i}", settings, own, {d: o + 0.001 * i * (j - 1)
                                                        for j, (d, o) in enumerate(offsets.items())})
        runs.append(str(tmp_path / f"run{i}"))
    calibration = Calibration.from_runs(runs, ["sts_act"])
    assert calibration.fitted_on["scope"]["sae_fingerprint"] == mine
    settings = {**sae_settings(LLAMA), "run_level": {"method": "lookahead", "own_change": -0.1}}
    settings["sae"]["sae_fingerprint"] = other
    applied = forecast_of({d: {"sts_act": 1.0 + i} for i, d in enumerate(offsets)}, settings)
    with pytest.warns(STSDataWarning, match=f"sae_fingerprint '{other}' \\(calibrated on '{mine}'\\)"):
        applied.apply_calibration(calibration)


def test_a_calibration_whose_fields_overflow_is_refused_not_labelled_flat():
    """A hand-edited coefficient of 1e308 passed the load check and predicted inf with a 'flat' label."""
    edited = Calibration.from_dict({**plain(), "coef": [1e308]})
    with pytest.raises(STSConfigError, match="predicts a non-finite change .* refit it"):
        edited.predict({"sts_act": 1e10})
    assert math.isfinite(Calibration.from_dict(plain()).predict({"sts_act": 1e10}).mean)
    edited = Calibration.from_dict({**level_pattern(), "sigma": 1e200})  # was an OverflowError
    with pytest.raises(STSConfigError, match="predicts a non-finite change .* refit it"):
        edited.predict_all({d: {"sts_act": 1.0} for d in ("code", "prose", "math")}, {"lookahead_own": 0.1})
