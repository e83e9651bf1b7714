"""A calibration fitted on training runs refuses runs that would mislead the fit, and says when runs are pooled."""

import json
import warnings

import numpy as np
import pytest

from sts_callback import STSInputError
from sts_callback.core.errors import STSDataWarning
from sts_callback.core.run_store import FORECAST_FORMAT
from sts_callback.scoring.calibration import BUILTIN, Calibration, builtin_calibration, run_records

LLAMA = {"model_class": "LlamaForCausalLM", "d_in": 32, "d_sae": 64, "hook_name": "blocks.1.hook_resid_post",
         "sae_fingerprint": "816bce5b864eff0f"}
DOMAINS = ("law", "food", "chem", "code")


def write_run(folder, i: int = 0, *, scope: dict | None = None, fraction: float | None = 1.0, n_features: int = 1,
              domains=DOMAINS, recipe: str | None = None):
    """What a run with the callback leaves in OUTPUT_DIR/sts: a forecast and two re-checks, the last at
    ``fraction`` of the lr schedule (None: not recorded, as in old histories)."""
    sts = folder / "sts"
    sts.mkdir(parents=True)
    scope = dict(LLAMA if scope is None else scope)
    settings = {"model_class": scope.pop("model_class", None), "sae": scope,
                **({"recipe": recipe} if recipe else {})}
    rng = np.random.default_rng(i)
    scores = {d: {"scores": {f"f{k}": float(rng.normal()) for k in range(n_features)}} for d in domains}
    (sts / "forecast.json").write_text(json.dumps({"format": FORECAST_FORMAT, "domains": scores,
                                                   "settings": settings}))
    change = {d: 0.01 * i + 0.02 * j + float(rng.normal(0, 0.003)) for j, d in enumerate(domains)}
    records = [{"step": 2, "loss_delta": {d: v / 2 for d, v in change.items()}, "lr_area_fraction": 0.5},
               {"step": 4, "loss_delta": change, "lr_area_fraction": fraction}]
    if fraction is None:
        records = [{k: v for k, v in r.items() if k != "lr_area_fraction"} for r in records]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def runs_in(tmp_path, count: int = 4, **kwargs) -> list[str]:
    return [write_run(tmp_path / f"run{i}", i, **kwargs) for i in range(count)]


def test_a_run_that_stopped_part_way_is_refused_naming_it_and_its_share_of_the_schedule(tmp_path):
    runs = runs_in(tmp_path)
    failed = write_run(tmp_path / "failed", 9, fraction=0.54)
    with pytest.raises(STSInputError, match=f"{failed}: its last re-check \\(step 4\\) is at 54% of the learning-rate "
                                            "schedule.*Rerun that run to the end, or leave it out"):
        Calibration.from_runs([*runs, failed], ["f0"])
    assert Calibration.from_runs(runs, ["f0"]).fitted_on["runs"] == 4  # finished runs (fraction 1.0) fit
    # a history without the fraction (an old one, or no known schedule) cannot tell: not refused
    old = runs_in(tmp_path / "old", fraction=None)
    assert Calibration.from_runs(old, ["f0"]).fitted_on["runs"] == 4


def test_the_same_run_passed_twice_is_refused_naming_the_paths(tmp_path):
    runs = runs_in(tmp_path)
    again = [runs[0] + "/sts", runs[0] + "/"]
    with pytest.raises(STSInputError, match="same run was passed more than once") as err:
        Calibration.from_runs([*runs, *again], ["f0"])
    assert all(path in str(err.value) for path in [runs[0], *again]) and runs[1] not in str(err.value)
    with pytest.raises(STSInputError, match="more than once"):
        run_records([runs[1], runs[1]])


def test_runs_of_different_saes_or_models_are_fitted_with_a_warning_naming_the_key_and_runs(tmp_path):
    runs = runs_in(tmp_path)
    other_sae = write_run(tmp_path / "other_sae", 5, scope={**LLAMA, "sae_fingerprint": "ffffffffffffffff"})
    with pytest.warns(STSDataWarning, match="sae_fingerprint: '816bce5b864eff0f' \\(.*run0.*\\); "
                                            f"'ffffffffffffffff' \\({other_sae}\\)"):
        pooled = Calibration.from_runs([*runs, other_sae], ["f0"])
    assert "sae_fingerprint" not in pooled.fitted_on["scope"]  # pooled deliberately: still fitted
    gpt2 = write_run(tmp_path / "gpt2", 6, scope={**LLAMA, "model_class": "GPT2LMHeadModel"})
    with pytest.warns(STSDataWarning, match=f"model_class: .*'GPT2LMHeadModel' \\({gpt2}\\)"):
        Calibration.from_runs([*runs, gpt2], ["f0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Calibration.from_runs(runs, ["f0"]).fitted_on["scope"] == {**LLAMA, "shift": "in_context"}


def test_a_fit_on_runs_needs_more_changes_than_runs_and_features(tmp_path):
    runs = runs_in(tmp_path, count=3, n_features=9)  # 12 changes, 9 left after centring within each run
    features = [f"f{k}" for k in range(9)]
    with pytest.raises(STSInputError, match="10 pattern feature\\(s\\) \\(with domain_prior\\) needs at least 11 "
                                            "changes beyond one per run; got 12 changes in 3 runs.*Add runs.*"
                                            "--features.*--prior-only"):
        Calibration.from_runs(runs, features)
    # at the limit (9 = 8 features + the prior + 1 residual degree of freedom) it fits
    assert Calibration.from_runs(runs, features[:7]).features == [*features[:7], "domain_prior"]
    with pytest.raises(STSInputError, match="needs at least"):
        Calibration.from_runs(runs, features[:8])
    rows = [(np.arange(6.0).reshape(2, 3) * i, [0.1 * i, 0.2], [float(i)]) for i in range(3)]
    with pytest.raises(STSInputError, match="needs at least 4 changes beyond one per run; got 6"):  # the fit itself
        Calibration.fit_level_pattern(rows, ["a", "b", "c"], ["own"])
    assert Calibration.fit_level_pattern([(x[:, :2], y, s) for x, y, s in rows], ["a", "b"], ["own"]).n == 6


def test_a_run_scaled_calibration_without_its_spread_is_refused_at_load(tmp_path):
    rows = [(np.zeros((3, 0)), np.array([0.0, 0.02, -0.01]) * (1 + i) + 0.01 * i, [], ["law", "food", "chem"])
            for i in range(4)]
    fitted = Calibration.fit_level_pattern(rows, [], [], domain_prior=True, pattern_scale="run").to_dict()
    assert Calibration.from_dict(fitted).pattern_spread == pytest.approx(fitted["pattern_spread"])
    del fitted["pattern_spread"]
    with pytest.raises(STSInputError, match="pattern_scale 'run' but lacks the field 'pattern_spread'"):
        Calibration.from_dict(fitted)
    fitted["pattern_scale"] = "absolute"  # an absolute pattern has no use for it: the default stands
    assert Calibration.from_dict(fitted).pattern_spread == 1.0


@pytest.mark.parametrize("name, text, problem", [
    ("forecast.json", '{"format": "sts-forecast/1", "domains": {"law": {"sco', "is not readable JSON"),
    ("forecast.json", "[]", "is not an STS forecast \\(a list\\)"),
    ("forecast.json", '{"format": "sts-forecast/1", "domains": ["law"]}', "is malformed"),
    ("history.jsonl", '[1, 2]\n', "record 1 is not a re-check record"),
    ("history.jsonl", '{"step": 4, "loss_delta": [0.1]}\n', "record 1 is not a re-check record"),
    ("history.jsonl", b'{"step": 4, "loss_delta": {"law": 0.1}}\n\xff\xfe\n', "cannot be read"),
])
def test_a_cut_or_malformed_run_file_is_refused_naming_it(tmp_path, name, text, problem):
    runs = runs_in(tmp_path)
    path = tmp_path / "run3" / "sts" / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(STSInputError, match=problem) as err:
        Calibration.from_runs(runs, ["f0"])
    assert str(path) in str(err.value)


def test_intervals_of_a_calibration_on_runs_carry_the_levels_own_uncertainty():
    # data drawn from the model the fit assumes: run level = 0.01 - 0.3 * own + N(0, 0.01), each domain = level +
    # its fixed departure + N(0, 0.003); the level was scaled by the 20 changes, not the 4 runs: ~40% coverage
    rng = np.random.default_rng(0)
    names, departure = list(DOMAINS) + ["sport"], np.array([0.02, -0.01, 0.0, -0.015, 0.005])

    def run(own):
        return 0.01 - 0.3 * own + rng.normal(0, 0.01) + departure + rng.normal(0, 0.003, len(names))

    hits = total = 0
    for _ in range(150):
        rows = [(np.zeros((5, 0)), run(own), [own], names) for own in rng.uniform(-0.2, -0.1, 4)]
        calibration = Calibration.fit_level_pattern(rows, [], ["lookahead_own"], domain_prior=True)
        own = rng.uniform(-0.35, -0.25)  # a new run beyond the fitted runs' range
        predicted = calibration.predict_all({n: {} for n in names}, {"lookahead_own": own})
        hits += sum(predicted[n].low <= y <= predicted[n].high for n, y in zip(names, run(own)))
        total += len(names)
    assert hits / total > 0.8
    assert calibration.level_runs == 4 and Calibration.from_dict(calibration.to_dict()) == calibration


def test_a_calibration_file_without_the_level_fields_predicts_as_before():
    from scipy.stats import t

    rows = [(np.arange(4.0).reshape(4, 1) * (1 + i), np.array([0.0, 0.02, -0.01, 0.01]) + 0.02 * i + e, [0.1 * i],
             list(DOMAINS)) for i, e in enumerate([0.003, -0.004, 0.001, 0.0])]
    data = Calibration.fit_level_pattern(rows, ["f0"], ["lookahead_own"], domain_prior=True).to_dict()
    old = {k: v for k, v in data.items() if k not in ("level_runs", "level_var", "source_center", "source_precision",
                                                             "pattern_precision")}
    domains, source = {n: {"f0": float(i)} for i, n in enumerate(DOMAINS)}, {"lookahead_own": 0.9}
    new, before = (Calibration.from_dict(d).predict_all(domains, source) for d in (data, old))
    calibration = Calibration.from_dict(old)
    for name, prediction in before.items():
        values = np.asarray([domains[name]["f0"] - 1.5, calibration.domain_prior[name] - np.mean(
            [calibration.domain_prior[n] for n in DOMAINS])])
        z = (values - np.asarray(calibration.center)) / np.asarray(calibration.scale)
        width = t.ppf(0.95, calibration.n - 3) * calibration.sigma * np.sqrt(1 + (1 + z @ z) / calibration.n)
        assert prediction.high - prediction.mean == pytest.approx(width, rel=1e-9)
        assert new[name].mean == pytest.approx(prediction.mean) and new[name].high - new[name].mean > 1.2 * width
    # the shipped level + pattern files, refitted since the level's uncertainty was added, carry it: their 22 LoRA
    # runs (a plain line, as the compressed run's, has no separate level)
    assert all(builtin_calibration(name).level_runs == 22 for name in BUILTIN if builtin_calibration(name).centered)
    data["source_precision"] = [[1.0, 2.0]]
    with pytest.raises(STSInputError, match=r"'source_precision\[0\]' has 2 value"):
        Calibration.from_dict(data)


def test_a_run_stopped_early_is_refused_whoever_stopped_it_and_a_loaded_best_checkpoint_is_its_end(tmp_path):
    """A run another callback stopped (its last record has no schedule share, only ended_early) was fitted as an
    end-of-training change while one STS's guard stopped was refused; a run that loaded its best checkpoint at the
    end was fitted on the last step's changes, of weights it no longer had."""
    runs = runs_in(tmp_path)
    stopped = write_run(tmp_path / "stopped", 7, fraction=None)
    history = [json.loads(line) for line in (tmp_path / "stopped" / "sts" / "history.jsonl").read_text().splitlines()]
    history[-1]["ended_early"] = {"max_steps": 8}
    (tmp_path / "stopped" / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    with pytest.raises(STSInputError, match=r"stopped.*ended at step 4, before max_steps=8 \(stopped early\)"):
        Calibration.from_runs([*runs, stopped], ["f0"])
    best = write_run(tmp_path / "best", 8)
    history = [json.loads(line) for line in (tmp_path / "best" / "sts" / "history.jsonl").read_text().splitlines()]
    history[-1]["loaded_best_step"] = 2
    (tmp_path / "best" / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    [record] = run_records([best])
    assert record["step"] == 2 and record["changes"] == history[0]["loss_delta"]  # the weights it ended with
    history[-1]["loaded_best_step"] = 3  # a step no re-check measured
    (tmp_path / "best" / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    with pytest.raises(STSInputError, match=r"best checkpoint's weights \(step 3.*which no re-check measured"):
        run_records([best])
    # stopped early and then loaded its best (EarlyStoppingCallback): still a run stopped part-way
    history[-1].update(loaded_best_step=2, ended_early={"max_steps": 8})
    (tmp_path / "best" / "sts" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    with pytest.raises(STSInputError, match="stopped early"):
        run_records([best])


def test_one_path_or_one_feature_name_is_taken_whole_and_a_validation_given_twice_is_refused(tmp_path):
    from fake_validation import fake_validation

    runs = runs_in(tmp_path)
    # one run's path is one run (its letters were taken for as many runs: "passed more than once")
    with pytest.raises(STSInputError, match="needs at least 2 runs .* got 1"):
        Calibration.from_runs(runs[0], "f0")
    names = ("law", "food", "chem", "code")
    scores = {d: {"sts_act": float(i), "sts_icl": float(-i)} for i, d in enumerate(names)}
    data = fake_validation([scores], [dict(zip(names, (0.01, 0.03, -0.02, 0.04)))]).to_dict()
    data["per_seed"][0]["nll_delta_rel"]["chem"] = None  # a domain whose change was not measured
    path = tmp_path / "val" / "validation.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    fitted = Calibration.from_validation(path, "sts_act")  # one name; the unmeasured domain left out, not a crash
    assert fitted.features == ["sts_act"] and fitted.n == 3
    with pytest.raises(STSInputError, match="same validation was given more than once"):
        Calibration.from_validation([path, path.parent], "sts_act")
    (tmp_path / "forecast.json").write_text(json.dumps({"format": FORECAST_FORMAT, "domains": {}}))
    with pytest.raises(STSInputError, match="forecast.json is a forecast .*not the output of `sts validate`"):
        Calibration.from_validation(tmp_path / "forecast.json")


def test_a_copy_of_a_run_folder_is_refused_as_the_same_run(tmp_path):
    import shutil

    runs = runs_in(tmp_path)
    shutil.copytree(runs[0], tmp_path / "copy")
    with pytest.raises(STSInputError, match=f"same forecast and history, copies of one run: {runs[0]}, "
                                            f"{tmp_path / 'copy'}"):
        Calibration.from_runs([*runs, str(tmp_path / "copy")], ["f0"])


def test_runs_a_fit_reproduces_exactly_are_fitted_with_a_warning_that_the_intervals_are_too_narrow(tmp_path):
    runs = runs_in(tmp_path)
    for run in runs:  # every run's changes exactly a line of its feature, at one level: nothing left over
        forecast = json.loads((tmp_path / run / "sts" / "forecast.json").read_text())
        history = (tmp_path / run / "sts" / "history.jsonl").read_text().splitlines()
        last = json.loads(history[-1])
        x = {d: forecast["domains"][d]["scores"]["f0"] for d in DOMAINS}
        last["loss_delta"] = {d: 0.02 + 0.01 * (v - np.mean(list(x.values()))) for d, v in x.items()}
        (tmp_path / run / "sts" / "history.jsonl").write_text(history[0] + "\n" + json.dumps(last) + "\n")
    with pytest.warns(STSDataWarning, match="reproduces its 4 runs almost exactly.*far too narrow.*copies"):
        Calibration.from_runs(runs, ["f0"], domain_prior=False)
    with warnings.catch_warnings():  # runs with the usual noise: no warning
        warnings.simplefilter("error", STSDataWarning)
        Calibration.from_runs(runs_in(tmp_path / "noisy"), ["f0"])


def test_a_change_that_is_not_a_number_is_left_out_like_an_unmeasured_one_naming_the_run(tmp_path):
    runs = runs_in(tmp_path)
    history = tmp_path / "run2" / "sts" / "history.jsonl"
    history.write_text(history.read_text().replace('"chem": ', '"chem": NaN, "was": '))
    with pytest.warns(STSDataWarning, match=r"run2: the change of \['chem'\] is not a finite number.*step\(s\) "
                                            r"\[2, 4\]\); left out of the fit"):
        calibration = Calibration.from_runs(runs, ["f0"])
    assert calibration.n == 15  # 4 runs x 4 domains, less chem of run2


def test_a_domain_the_last_recheck_failed_is_left_out_not_taken_from_an_earlier_step(tmp_path):
    """A new user's run whose last re-check measured chem as NaN (its loss diverged) was fitted with chem's
    mid-training change as if it were the end of training, silently; a domain the last re-check left to a later
    turn (absent or null) still takes its latest change, as rotation (loss_domains=) needs."""
    runs = runs_in(tmp_path)
    history = tmp_path / "run2" / "sts" / "history.jsonl"
    lines = history.read_text().splitlines()
    last = json.loads(lines[-1])
    last["loss_delta"]["chem"] = float("nan")
    history.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    with pytest.warns(STSDataWarning, match=r"run2: the last re-check \(step 4\) has no finite change for "
                                            r"\['chem'\].*left out of the fit rather than taken from an earlier step"):
        calibration = Calibration.from_runs(runs, ["f0"])
    assert calibration.n == 15
    del last["loss_delta"]["chem"]  # not measured at the end (its turn): the step-2 change stands
    history.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        assert Calibration.from_runs(runs, ["f0"]).n == 16


def test_a_feature_no_run_has_is_named_with_the_features_they_have(tmp_path):
    runs = runs_in(tmp_path, n_features=2)
    with pytest.raises(STSInputError, match=r"No run has the feature\(s\) \['f2'\]; the runs' forecasts have "
                                            r"\['f0', 'f1'\]"):
        Calibration.from_runs(runs, ["f0", "f2"])
    with pytest.raises(STSInputError, match="not a forecast score.*--prior-only"):
        Calibration.from_runs(runs, ["domain_prior"])


def test_a_missing_folder_and_a_checkpoint_folder_are_named_for_what_they_are(tmp_path):
    runs = runs_in(tmp_path)
    with pytest.raises(STSInputError, match="no-such-run: no such folder"):
        Calibration.from_runs([*runs, str(tmp_path / "no-such-run")], ["f0"])
    checkpoint = tmp_path / "run0" / "checkpoint-4"
    (checkpoint / "sts").mkdir(parents=True)
    with pytest.raises(STSInputError, match=f"It is inside the run {tmp_path / 'run0'}: pass that folder"):
        Calibration.from_runs([*runs[1:], str(checkpoint)], ["f0"])


def test_the_training_recipe_is_part_of_the_scope(tmp_path):
    """LoRA and full fine-tunes move the domains differently: pooling them is said, and a calibration of one
    applied to the other warns."""
    lora = runs_in(tmp_path / "lora", recipe="lora")
    full = write_run(tmp_path / "full", 7, recipe="full")
    with pytest.warns(STSDataWarning, match=f"recipe: 'lora' .*; 'full' \\({full}\\)"):
        Calibration.from_runs([*lora, full], ["f0"])
    calibration = Calibration.from_runs(lora, ["f0"])
    assert calibration.fitted_on["scope"]["recipe"] == "lora"
    from sts_callback.pipelines.forecast import Forecast

    forecast = json.loads((tmp_path / "full" / "sts" / "forecast.json").read_text())
    forecast.update(shifted_latents=[], shift_values=[], shift_direction=[], raw_shifted_dims=[],
                    raw_shift_values=[], shift_tokens=10, shift_queries=1, ranking="f0",
                    domains={d: {"name": d, "texts": 2, "tokens": 10, **v} for d, v in forecast["domains"].items()})
    with pytest.warns(STSDataWarning, match="recipe 'full' \\(calibrated on 'lora'\\)"):
        applied = Forecast.from_dict(forecast).apply_calibration(calibration)
    assert applied.settings["calibration"]["scope_problems"] == ["recipe 'full' (calibrated on 'lora')"]


def test_the_command_shows_the_librarys_warnings_as_its_own(tmp_path, capsys):
    from sts_callback.tools.cli import main

    runs = runs_in(tmp_path)
    gpt2 = write_run(tmp_path / "gpt2", 6, scope={**LLAMA, "model_class": "GPT2LMHeadModel"})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["calibrate", "--runs", *runs, gpt2, "--features", "f0", "--out", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("sts: warning: The runs were trained on different setups") and ".py:" not in err


def test_runs_in_groups_with_no_domain_in_common_are_fitted_with_a_warning_naming_the_groups(tmp_path):
    """Two runs on law/food, two on chem/code: each group's domain prior is read against its own domains only,
    so their levels are not tied. Linked through one shared domain (a chain of runs), they are."""
    runs = [write_run(tmp_path / f"a{i}", i, domains=("law", "food")) for i in range(2)] + \
        [write_run(tmp_path / f"b{i}", i + 2, domains=("chem", "code")) for i in range(2)]
    with pytest.warns(STSDataWarning, match=r"2 groups with no target domain in common .*domain_prior=False") as got:
        Calibration.from_runs(runs)
    message = str(got[0].message)
    assert "a1'] on ['food', 'law']" in message and "b1'] on ['chem', 'code']" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        Calibration.from_runs(runs, domain_prior=False)  # no prior: nothing to tie
        chained = runs + [write_run(tmp_path / "link", 5, domains=("food", "chem"))]
        Calibration.from_runs(chained)


def test_a_validate_output_is_named_by_its_seed_runs(tmp_path):
    """`sts calibrate --runs <validate output_dir>` calibrated on whatever its top folder held, one seed of
    several, without a word."""
    for seed in (0, 1):
        (tmp_path / "val" / f"seed-{seed}" / "sts").mkdir(parents=True)
        (tmp_path / "val" / f"seed-{seed}" / "sts" / "history.jsonl").write_text("")
    with pytest.raises(STSInputError, match=r"validate\(\) output of 2 seed run\(s\) \(seed-0, seed-1\)"):
        Calibration.from_runs([tmp_path / "val"])


def test_seed_folders_of_one_validation_given_as_runs_are_said_to_be_one_source(tmp_path):
    """The error for a validate() folder told the user to pass its seed folders, which were then fitted as
    separate sources: the level's spread was seed noise and the intervals too narrow, unsaid."""
    validation = tmp_path / "val"
    (validation / "sts").mkdir(parents=True)
    (validation / "sts" / "validation.json").write_text("{}")
    seeds = [write_run(validation / f"seed-{i}", 10 + i) for i in range(3)]
    with pytest.raises(STSInputError, match="reads without --runs .* pass one seed folder of it"):
        Calibration.from_runs([str(validation)], ["f0"])
    others = runs_in(tmp_path, 2)
    for given in (seeds, [f"{seed}/sts" for seed in seeds]):  # a seed's folder, or its sts/ folder
        with pytest.warns(STSDataWarning, match=r"are seeds of one validation .*one training source"):
            Calibration.from_runs(given + others, ["f0"])
