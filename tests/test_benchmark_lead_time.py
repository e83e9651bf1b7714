"""The early-warning benchmark's lead-time count (benchmarks/transfer/early_compare.py): what the README's lead and
false-alarm numbers mean, on a hand-made trajectory."""

import json

import pytest

from benchmark_scripts import load_transfer_script


@pytest.fixture(scope="module")
def early_compare():
    return load_transfer_script("early_compare")


# Three domains re-checked at steps 2, 4, 6, 8 of 8: A crosses 1% at step 6 and ends at +3% (precise); B's re-check
# noise crosses 1% at step 4 but it ends at +0.5%; C never crosses in a re-check and ends at +1.5%.
TRAJECTORY = [{"step": s, "nll_delta_rel": {"A": a, "B": b, "C": c}}
              for s, a, b, c in ((2, 0.002, 0.003, 0.0), (4, 0.006, 0.012, 0.002), (6, 0.012, 0.004, 0.004),
                                 (8, 0.02, 0.005, 0.005))]
STEP0 = {"A": (0.02, 0.0), "B": (0.02, 0.0), "C": (0.0, -0.01)}  # A and B predicted above 1% before training


def leads(early_compare, final=None):
    out = early_compare.lead_times({"others": ["A", "B", "C"]}, TRAJECTORY, lambda step: step / 8, [], 8,
                                   step0=STEP0, tables={}, final=final)
    return out["0.01/step0+trend"]


def test_violations_are_the_measured_crossings_without_a_precise_final(early_compare):
    cell = leads(early_compare)
    assert (cell["violations"], cell["missed"], cell["false_alarms"]) == (2, 0, 0)
    assert cell["mean_lead_steps"] == pytest.approx(5.0)  # A warned at 0, measured at 6; B at 0 and 4


def test_precise_final_decides_violations_and_false_alarms(early_compare):
    cell = leads(early_compare, final={"A": 0.03, "B": 0.005, "C": 0.015})
    # A: a violation warned 6 steps ahead; B: its crossing was noise, so the step-0 warning is a false alarm;
    # C: a violation no re-check measured, counted at the end of the run and missed by the rule
    assert (cell["violations"], cell["missed"], cell["false_alarms"]) == (2, 1, 1)
    assert cell["mean_lead_steps"] == pytest.approx(6.0)


def test_the_step0_warning_curve_counts_lead_and_false_alarms_as_the_lead_table_does():
    """benchmarks/transfer/step0_warnings.py: a warning at step 0 when P(change > tolerance) >= p; a warned
    violation's lead is the share of the run at which a re-check first measured it (else the end), a missed one 0;
    a warning for a domain that ended below the tolerance is a false alarm."""
    module = load_transfer_script("step0_warnings")
    rows = [{"source": "s", "domain": d, "mean": mean, "sd": 0.01, "final": final, "steps": 8,
             "trajectory": [(s, a) for s, a in zip((2, 4, 6, 8), values)]}
            for d, mean, final, values in (("A", 0.02, 0.03, TRAJECTORY_A), ("B", 0.02, 0.005, (0, 0, 0, 0)),
                                           ("C", 0.002, 0.015, (0, 0, 0, 0)))]
    by_threshold = {c["threshold"]: c for c in module.curve(rows, [r["sd"] for r in rows], 0.01)}
    # P(A > 1%) = P(B > 1%) = 0.84 and P(C > 1%) = 0.21: at p 0.5 A and B are warned, C is not
    half = by_threshold[0.5]
    assert half["violations"] == 2 and half["warned"] == 1 and half["false_alarms"] == 1
    assert half["lead_per_violation"] == pytest.approx((6 / 8 + 0.0) / 2)  # A measured at step 6; C missed
    assert half["false_alarm_rate"] == 1.0  # B, the one domain that did not violate
    assert by_threshold[0.9]["warned"] == 0 and by_threshold[0.9]["false_alarms"] == 0
    assert by_threshold[0.2]["lead_per_violation"] == pytest.approx((6 / 8 + 8 / 8) / 2)  # C warned, measured at end


TRAJECTORY_A = (0.002, 0.006, 0.012, 0.02)


# The shipped callback's whole run (compressed_callback.py --whole-run): its own warnings on its own texts.
def whole_unit():
    """Re-checks at steps 2 (lr 0: no point of the course), 4, 6, 8 of 8; A predicted above 1% at train start;
    B's projection's interval above 1% at step 4 (its second measured re-check, not the first after learning: the
    callback does not warn there) and at step 6; C warned by a projection though it ends within the tolerance."""
    def recheck(step, fraction, measured, projected, low):
        return {"step": step, "lr_area_fraction": fraction, "loss_delta": measured,
                "early_forecast": projected, "early_forecast_ci": {d: [low[d], projected[d] + 0.01] for d in low}}
    trajectory = [
        recheck(2, 0.0, {"A": 0.0, "B": 0.0, "C": 0.0}, {"A": 0.0, "B": 0.0, "C": 0.0}, {"A": 0, "B": 0, "C": 0}),
        recheck(4, 0.3, {"A": 0.004, "B": 0.005, "C": 0.0}, {"A": 0.01, "B": 0.03, "C": 0.0},
                {"A": 0.0, "B": 0.02, "C": -0.01}),
        recheck(6, 0.7, {"A": 0.012, "B": 0.008, "C": 0.004}, {"A": 0.02, "B": 0.03, "C": 0.03},
                {"A": 0.01, "B": 0.02, "C": 0.015}),
        recheck(8, 1.0, {"A": 0.02, "B": 0.015, "C": 0.006}, {"A": 0.02, "B": 0.015, "C": 0.006},
                {"A": 0.02, "B": 0.015, "C": 0.006}),
    ]
    return {"final_step": 8, "predicted": {"A": 0.02, "B": 0.0, "C": 0.0}, "trajectory": trajectory,
            "interval": {"A": [-0.01, 0.05], "B": [-0.03, 0.03], "C": [-0.03, 0.03]},  # 90%: A 71% likely above 1%
            "final_on_its_texts": {"A": 0.02, "B": 0.015, "C": 0.006}}


@pytest.fixture(scope="module")
def compressed_callback():
    return load_transfer_script("compressed_callback")


def test_the_callbacks_own_warnings_follow_its_rules(compressed_callback):
    found = compressed_callback.callback_leads(whole_unit(), 0.01)["domains"]
    assert found["A"] == {"warned": 0, "violated": 6}  # the train-start prediction; first measured above at 6
    # the first re-check after learning (step 4) is a point, not a course: B's projection warns at step 6
    assert found["B"] == {"warned": 6, "violated": 8}
    assert found["C"] == {"warned": 6, "violated": None}
    # the callback's warn_confidence: at 0.8 A's 71% chance warns at no train start, and no projection of it either
    assert compressed_callback.callback_leads(whole_unit(), 0.01, 0.8)["domains"]["A"] == {"warned": None,
                                                                                           "violated": 6}


def test_lead_over_every_violation_and_false_alarms_over_the_quiet_domains(compressed_callback):
    cell = compressed_callback.lead_summary([whole_unit()])["0.01"]
    assert (cell["violations"], cell["missed"], cell["false_alarms"]) == (2, 0, 1)
    assert cell["mean_lead_share"] == pytest.approx((6 / 8 + 2 / 8) / 2)
    assert cell["false_alarm_rate"] == 1.0 and not cell["meets_goal"]
    # at 5% nothing violates and nothing is warned: no lead to speak of, no goal met
    assert compressed_callback.lead_summary([whole_unit()])["0.05"]["violations"] == 0


def blendable_unit(source: str, predicted: dict, final: dict) -> dict:
    """A whole run whose every re-check projects 2 * final - predicted: the final change is half the projection and
    half the train-start prediction at each step, the line ``--fit-blend`` should find."""
    projected = {d: 2 * final[d] - predicted[d] for d in final}
    trajectory = [{"step": step, "lr_area_fraction": fraction, "loss_delta": dict(final),
                   "early_forecast": dict(projected), "early_forecast_ci": {d: [v - 0.01, v + 0.01]
                                                                           for d, v in projected.items()}}
                  for step, fraction in ((2, 0.3), (4, 0.6), (6, 0.9))]
    return {"source": source, "final_step": 8, "predicted": predicted, "trajectory": trajectory,
            "interval": {d: [v - 0.03, v + 0.03] for d, v in predicted.items()}, "final_on_its_texts": final}


BLENDABLE = [blendable_unit("s1", {"A": 0.01, "B": -0.02}, {"A": 0.03, "B": 0.0}),
             blendable_unit("s2", {"A": 0.04, "B": 0.0}, {"A": 0.01, "B": -0.01}),
             blendable_unit("s3", {"A": -0.01, "B": 0.02}, {"A": 0.02, "B": 0.05})]


def test_the_fitted_blend_is_the_line_from_projection_and_train_start_to_the_end(compressed_callback):
    table = compressed_callback.fit_blend_table(BLENDABLE)
    assert [row[0] for row in table] == pytest.approx([0.3, 0.6, 0.9])  # one row per re-check step
    for row in table:
        assert row[1:] == pytest.approx([0.0, 0.5, 0.5], abs=1e-9)
    mixed = compressed_callback.blended(BLENDABLE[0], table)
    for record in mixed["trajectory"]:
        assert record["early_forecast"] == pytest.approx(BLENDABLE[0]["final_on_its_texts"])
        for d, (low, high) in record["early_forecast_ci"].items():  # wider than the projection's own half of it
            assert low < record["early_forecast"][d] - 0.005 and high > record["early_forecast"][d] + 0.005
    assert BLENDABLE[0]["trajectory"][0]["early_forecast"]["A"] == pytest.approx(0.05)  # the unit itself unchanged


def test_a_unit_the_shipped_blend_was_fitted_on_is_scored_with_one_fitted_on_the_others(compressed_callback):
    odd = blendable_unit("s4", {"A": 0.0, "B": 0.01}, {"A": 0.06, "B": 0.02})
    odd["trajectory"] = [dict(r, early_forecast={"A": 0.0, "B": 0.0}) for r in odd["trajectory"]]
    shipped = compressed_callback.fit_blend_table(BLENDABLE + [odd])
    blend_json = {"table": shipped, "fitted_on": ["s1", "s2", "s3", "s4"]}  # what BLEND holds
    held_out = blendable_unit("s5", {"A": 0.02, "B": 0.0}, {"A": 0.0, "B": 0.01})
    scored = compressed_callback.blended_units(BLENDABLE + [odd, held_out], blend_json)

    def at(unit, table):
        return compressed_callback.blended(unit, table)["trajectory"][1]["early_forecast"]
    # s1 with the line of s2, s3, s4 (s1 left out of it), the held-out s5 with the shipped table
    assert scored["s1"]["trajectory"][1]["early_forecast"] == pytest.approx(
        at(BLENDABLE[0], compressed_callback.fit_blend_table(BLENDABLE[1:] + [odd])))
    assert scored["s1"]["trajectory"][1]["early_forecast"] != pytest.approx(at(BLENDABLE[0], shipped))
    assert scored["s5"]["trajectory"][1]["early_forecast"] == pytest.approx(at(held_out, shipped))
    # a line needs 3 runs: with two others, s1 keeps its projection
    few = compressed_callback.blended_units(BLENDABLE, blend_json)
    assert few["s1"]["trajectory"][1]["early_forecast"] == pytest.approx({"A": 0.05, "B": 0.02})


def test_the_built_in_compressed_calibration_ships_the_blend_the_benchmark_fitted(compressed_callback):
    """What --fit-blend wrote into the calibration is what --score scored as shipped, and only LoRA runs get it."""
    from sts_callback.pipelines.prediction import best_early_method
    from sts_callback.scoring.calibration import load_calibration

    calibration = load_calibration("gemma3-270m-lora-compressed")
    shipped = json.loads(compressed_callback.BLEND.read_text())
    table = calibration.blend_table("trend", "lora")
    assert len(table) == len(shipped["table"])
    for row, fitted in zip(table, shipped["table"]):
        assert row == pytest.approx(fitted)
    assert [row[0] for row in shipped["table"]] == sorted(row[0] for row in shipped["table"])
    assert calibration.blend_table("trend", "full") == []  # a full fine-tune keeps the projection alone
    assert best_early_method(calibration, "lora") == "trend"
    assert len(shipped["fitted_on"]) >= 3
