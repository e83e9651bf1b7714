"""The STS math: pure functions over streaming statistics (README, "What is computed", steps 1 and 2)."""

from __future__ import annotations

import torch

from ..core.stats import ActivationStats, ShiftStats


def shifted_latents(shift: ShiftStats, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D_N: the ``n`` latents with the largest mean squared shift, and their shift values (descending).

    A stable sort breaks ties by the lower index, so the set is deterministic.
    """
    values = shift.mean_shift().cpu()
    index = torch.sort(values, descending=True, stable=True).indices[: min(n, values.numel())]
    return index, values[index]


def sts_act(domain: ActivationStats, latents: torch.Tensor) -> float:
    """Mean over the domain's tokens of the summed activation of the shifted latents."""
    return float(domain.sum.cpu()[latents].sum() / domain.count.clamp(min=1).cpu())


def sts_sq(domain: ActivationStats, latents: torch.Tensor) -> float:
    """Mean over tokens of the mean squared activation of the shifted latents (the reference notebook's)."""
    return float(domain.sum_sq.cpu()[latents].sum() / domain.count.clamp(min=1).cpu() / max(latents.numel(), 1))


def sts_icl(domain_shift: ShiftStats, latents: torch.Tensor) -> float:
    """Mean over the domain's query tokens of the summed squared in-context shift of the shifted latents."""
    return float(domain_shift.sum_sq_diff.cpu()[latents].sum() / domain_shift.count.clamp(min=1).cpu())


def overlap(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> int:
    """Number of latents two top-N sets share."""
    return len(set(torch.as_tensor(a).tolist()) & set(torch.as_tensor(b).tolist()))
