"""The RL-vs-SFT comparison (benchmarks/transfer/rl_vs_sft.py): a run is never calibrated on a run of its own
source, and a measurement that keeps its sequence counts has one noise ceiling, not a range."""

import numpy as np
import pytest

from benchmark_scripts import load_transfer_script


@pytest.fixture(scope="module")
def rl_vs_sft():
    return load_transfer_script("rl_vs_sft")


def test_a_run_is_calibrated_without_the_runs_of_its_own_source(rl_vs_sft):
    x = np.array([-1.0, 1.0, 2.0, 3.0])
    runs = {"legal-short": (x, -10 * x), "legal-long": (x, x + np.array([0, 0.1, -0.1, 0])),
            "math": (x, x), "markup": (x, 2 * x)}
    sources = {"legal-short": "legal", "legal-long": "legal", "math": "math", "markup": "markup"}
    rows = rl_vs_sft.leave_one_out(runs, sources)
    # math and markup alone say the change rises with the score; the other legal run (falling steeply) would have
    # turned the pooled slope negative and the calibrated r to about -1
    assert rows["legal-long"]["pearson"] > 0.9
    assert rows["legal-long"]["direction"] == 1.0
    # a run of another source still sees both legal runs: their pooled slope is negative
    assert rows["math"]["pearson"] < -0.9


def test_precise_measurement_has_one_noise_ceiling(rl_vs_sft):
    others = ["a", "b", "c", "d"]
    changes = {"a": 0.01, "b": 0.03, "c": 0.05, "d": 0.07}
    ci = {d: [v - 0.01, v + 0.01] for d, v in changes.items()}
    low, high = rl_vs_sft.noise_ceiling_range({"loss_delta": changes, "loss_delta_ci": ci}, others)
    assert low < high  # no sequence counts: bracketed between the normal and the t(3) quantile
    precise = rl_vs_sft.noise_ceiling_range(
        {"loss_delta": changes, "loss_delta_ci": ci, "sequences": {d: 32 for d in others}}, others)
    assert precise[0] == precise[1]
    assert low < precise[0] < high  # 31 degrees of freedom: close to the normal quantile, above the t(3) bracket


def test_only_keeps_the_runs_it_names_and_exclude_still_applies(rl_vs_sft):
    everything = [p.stem for p in rl_vs_sft.rl_runs([])]
    held = [p.stem for p in rl_vs_sft.rl_runs([], ["grpo-*-kl-long"])]
    assert held and set(held) == {name for name in everything if name.startswith("grpo-") and
                                  name.endswith("-kl-long")}
    assert "grpo-python_code-to-legal-long" in everything and "grpo-python_code-to-legal-long" not in held
    assert [p.stem for p in rl_vs_sft.rl_runs(["grpo-math-*"], ["grpo-*-kl-long"])] == [
        name for name in held if not name.startswith("grpo-math-")]


def test_within_run_forecast_reads_each_runs_scores_on_their_own_scale(rl_vs_sft):
    # Each run's change follows its scores' order, but the scores' scale and offset differ by run, so a line
    # pooled over runs has the wrong slope; the within-run z-scores do not care.
    domains = ["a", "b", "c", "d", "e"]
    order = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    runs = {"math": (order, 0.05 + 0.01 * order), "markup": (100 + 0.1 * order, 0.001 + 0.001 * order),
            "legal": (50 + 10 * order, 0.02 + 0.005 * order), "cpp": (-3 + order, 0.06 + 0.003 * order)}
    sources = {name: name for name in runs}
    pooled = rl_vs_sft.leave_one_out(runs, sources)
    within = rl_vs_sft.within_run_rows({"grpo reward_filtered": runs}, {name: domains for name in runs}, sources)
    alone = within["grpo reward_filtered (within-run: sts_icl alone, family's other runs)"]
    assert max(pooled[name]["pearson"] for name in runs) < 0  # runs with higher scores moved less: slope < 0
    assert all(alone[name]["pearson"] > 0.99 for name in runs)
    assert all(alone[name]["direction"] == 1.0 for name in runs)  # every change is a loss, as the others' level
    blended = within["grpo reward_filtered (within-run: prior + sts_icl, family's other runs)"]
    assert set(blended["math"]["weights"]) == {"prior", "sts_icl"}
    assert "sft in_context (within-run: sts_icl alone, family's other runs)" not in rl_vs_sft.within_run_rows(
        {"sft in_context": runs}, {name: domains for name in runs}, sources)
