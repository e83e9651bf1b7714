"""The early-warning benchmark's lead-time count (benchmarks/transfer/early_compare.py): what the README's lead and
false-alarm numbers mean, on a hand-made trajectory."""

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


def test_lead_over_every_violation_and_false_alarms_over_the_quiet_domains(compressed_callback):
    cell = compressed_callback.lead_summary([whole_unit()])["0.01"]
    assert (cell["violations"], cell["missed"], cell["false_alarms"]) == (2, 0, 1)
    assert cell["mean_lead_share"] == pytest.approx((6 / 8 + 2 / 8) / 2)
    assert cell["false_alarm_rate"] == 1.0 and not cell["meets_goal"]
    # at 5% nothing violates and nothing is warned: no lead to speak of, no goal met
    assert compressed_callback.lead_summary([whole_unit()])["0.05"]["violations"] == 0
