"""The STS formulas against dense computations on random activations."""

import torch

from sts_callback.scoring.score import overlap, shifted_latents, sts_act, sts_icl, sts_sq
from sts_callback.core.stats import ActivationStats, ShiftStats


def test_scores_equal_their_dense_definitions():
    torch.manual_seed(0)
    domain = torch.relu(torch.randn(50, 16))
    base, context = torch.relu(torch.randn(40, 16)), torch.relu(torch.randn(40, 16))
    stats = ActivationStats(16)
    stats.update(domain[:30])
    stats.update(domain[30:])  # streaming in two batches changes nothing
    shift = ShiftStats(16)
    shift.update(base, context)
    latents = torch.tensor([3, 7, 11])
    torch.testing.assert_close(sts_act(stats, latents), float(domain[:, latents].sum(1).mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(sts_sq(stats, latents), float(domain[:, latents].square().mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(sts_icl(shift, latents), float((context - base)[:, latents].square().sum(1).mean()),
                               rtol=1e-6, atol=0)


def test_shifted_latents_are_the_largest_mean_squared_shifts_ties_to_the_lower_index():
    base = torch.zeros(4, 6)
    context = torch.tensor([[0, 2, 1, 2, 0, 3]] * 4, dtype=torch.float32)
    shift = ShiftStats(6)
    shift.update(base, context)
    latents, values = shifted_latents(shift, 3)
    assert latents.tolist() == [5, 1, 3] and values.tolist() == [9.0, 4.0, 4.0]
    assert shifted_latents(shift, 10)[0].numel() == 6


def test_overlap_counts_shared_latents():
    assert overlap([1, 2, 3], torch.tensor([3, 4, 1])) == 2 and overlap([], [1]) == 0
