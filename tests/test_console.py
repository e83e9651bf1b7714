"""A re-check as the console shows it during training: protected domains first, then the largest changes."""

from sts_callback.reporting.console import recheck_status


def test_a_recheck_line_shows_the_protected_domains_then_the_largest_changes_and_counts_the_rest():
    changes = {f"d{i}": 0.01 * i for i in range(10)}
    record = {"step": 20, "loss_delta": {**changes, "food": -0.002},
              "loss_delta_ci": {"food": [-0.004, 0.0], "d9": [0.08, 0.10]},
              "accuracy_delta": {"quiz": -0.05}, "violations": ["x", "y"]}
    line = recheck_status(record, 100, protected=["food"], shown=3)
    assert line == ("STS re-check at step 20/100: held-out loss food* -0.20±0.20%, d9 +9.00±1.00%, d8 +8.00%, "
                    "8 more in the history; accuracy quiz -5.0 points; 2 rule(s) broken")
    assert "\n" not in recheck_status({"step": 3, "error": "RuntimeError: out of memory"})
    assert recheck_status({"step": 3, "error": "RuntimeError: out of memory"}) == (
        "STS re-check at step 3: failed (RuntimeError: out of memory)")
    many = recheck_status(record, protected=[f"d{i}" for i in range(5)], shown=3)  # every protected one is shown
    assert all(f"d{i}* " in many for i in range(5))


def test_a_protected_domain_not_measured_is_shown_and_numpy_numbers_are_numbers():
    import numpy as np

    line = recheck_status({"step": 1, "loss_delta": {"food": None, "law": np.float32(0.01)}}, protected=["food"])
    assert line == "STS re-check at step 1: held-out loss food* n/a, law +1.00%"
