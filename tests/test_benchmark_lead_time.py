"""The early-warning benchmark's lead-time count (benchmarks/transfer/early_compare.py): what the README's lead and
false-alarm numbers mean, on a hand-made trajectory."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer" / "early_compare.py"


@pytest.fixture(scope="module")
def early_compare():
    spec = importlib.util.spec_from_file_location("early_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
