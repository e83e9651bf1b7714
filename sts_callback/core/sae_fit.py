"""How well an SAE reconstructs a model's residual stream: the fraction of variance unexplained (FVU) and mean L0,
from sums that add across batches and ranks. An SAE for another model or layer reconstructs nothing, and every
score read from its latents is then meaningless: the forecast and the callback check it before they are trusted."""

from __future__ import annotations

from typing import Any

import torch

MAX_FVU = 0.6  # above it the SAE barely reconstructs the residuals it reads


def new_fit_sums(d_in: int) -> torch.Tensor:
    """Empty sums for residuals of width ``d_in``: (squared reconstruction error, sum of squares, active-latent
    count, rows, then the d-vector sum of rows), float64."""
    return torch.zeros(4 + d_in, dtype=torch.float64)


def add_fit_sums(sums: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor, reconstruction: torch.Tensor) -> None:
    """Add one chunk of residual ``rows`` [n, d], their SAE ``latents`` and ``reconstruction`` to ``sums``
    (computed where the rows are, in float64: a residual stream's large mean would cancel float32's variance; one
    small vector comes back)."""
    x = rows.double()
    totals = torch.stack([(x - reconstruction.to(x.device).double()).square().sum(), x.square().sum(),
                          (latents != 0).sum().to(x.device).double(),  # AbsTopK SAEs have negative active latents
                          torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=x.device)])
    sums += torch.cat([totals, x.sum(0)]).cpu()


def fit_from_sums(sums: torch.Tensor) -> dict[str, float] | None:
    """Fraction of variance unexplained and mean L0 from the sums (``None`` without rows)."""
    n = float(sums[3])
    if n == 0:
        return None
    total = float(sums[1]) - float(sums[4:].square().sum()) / n  # sum of squares about the mean
    return {"fvu": float(sums[0]) / total if total > 0 else float("nan"), "l0": float(sums[2]) / n, "tokens": int(n)}


def poor_fit_message(fit: dict[str, Any], on: str, max_fvu: float = MAX_FVU) -> str | None:
    """The warning for an SAE that barely reconstructs the residuals (FVU above ``max_fvu``) ``on`` some data;
    None when it fits."""
    fvu = fit.get("fvu") if fit else None
    if not isinstance(fvu, float) or not fvu > max_fvu:  # NaN too: no variance to explain, nothing to say
        return None
    return (f"The SAE reconstructs this model's residual stream poorly: fraction of variance unexplained {fvu:.2f} "
            f"on {on} (above {max_fvu:.2f}; mean L0 {fit['l0']:.0f}). Either it is an SAE for another model or "
            "layer, which makes the forecast meaningless, or this data is far from what it was trained on, and its "
            "latents miss part of what training moves: use an SAE for this model and layer trained on data like "
            "this (sts train-sae).")


__all__ = ["MAX_FVU", "add_fit_sums", "fit_from_sums", "new_fit_sums", "poor_fit_message"]
