"""The 95% interval of a multiple-choice domain's accuracy change: paired over the same items, it must hold for the
few items a protected quiz often has, and for no flip at all (where the paired spread is zero)."""

import random

import pytest

from sts_callback.core.multiple_choice import accuracy_change_interval


@pytest.mark.parametrize("items", [24, 100])
@pytest.mark.parametrize("lose, gain", [(0.02, 0.1), (0.05, 0.0), (0.1, 0.05), (0.3, 0.02)])
def test_the_interval_covers_the_true_change_in_95_of_100_runs_for_few_items_and_many(items, lose, gain):
    """Each item right at train start with chance 0.7, then lost with chance ``lose`` (if right) or gained with
    ``gain`` (if wrong): the true change is 0.3 * gain - 0.7 * lose."""
    rng, truth, covered, runs = random.Random(items), 0.3 * gain - 0.7 * lose, 0, 2000
    for _ in range(runs):
        before = [rng.random() < 0.7 for _ in range(items)]
        after = [(rng.random() >= lose) if right else (rng.random() < gain) for right in before]
        low, high = accuracy_change_interval(before, after)
        covered += low <= truth <= high
    assert covered / runs >= 0.93  # a 95% interval (0.93: its Monte Carlo error and the discrete items)


def test_no_flip_gives_an_interval_of_width_not_zero_and_one_flip_is_not_sure_over_24_items():
    same = [True] * 18 + [False] * 6
    low, high = accuracy_change_interval(same, same)
    assert low < 0 < high and high - low > 0.1  # 24 unchanged items do not prove the accuracy held exactly
    low, high = accuracy_change_interval(same, [False] + same[1:])
    assert low < -1 / 24 < high and low > -0.25


def test_the_interval_holds_only_changes_the_starting_accuracy_allows():
    """From 16 of 20 right, all 20 right is +20 points: the bound said +36.6."""
    low, high = accuracy_change_interval([True] * 16 + [False] * 4, [True] * 20)
    assert high == pytest.approx(0.2) and -0.05 < low < 0.2
    low, high = accuracy_change_interval([False] * 20, [False] * 20)
    assert low == 0 and high > 0


def test_no_interval_without_items_or_with_other_items_than_the_start():
    assert accuracy_change_interval([], []) is None
    assert accuracy_change_interval([True] * 4, [True] * 5) is None
