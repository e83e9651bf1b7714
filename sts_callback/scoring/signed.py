"""Signed forecast features: which way a domain moves, not only how much (issue "signed, calibrated forecasts").

Pure functions over the forecast's streaming statistics (no model call). Notation: D_N the shifted latents,
``delta_j`` the training data's mean in-context shift of latent j (signed), ``E_j`` its mean squared shift,
``mu_d`` a domain's mean latent activations, ``mu_s`` the training queries' own.

- ``signed_usage``: sum over D_N of delta_j * mu_d,j: positive when the shift raises the latents the domain
  uses, negative when it suppresses them.
- ``transfer_share``: the share of the shift energy sum E_j that falls on latents the domain uses as much as
  the training data does (weight min(1, mu_d,j / mu_s,j)); the rest is energy the domain does not use
  ("generic forgetting"). ``forgetting_minus_transfer`` = (1 - share) - share, in [-1, 1].
- ``decoder_projection``: the signed shift mapped to the residual stream through the SAE decoder
  (sum_j delta_j W_dec[j]), projected on the domain's own direction (its mean residual minus the mean over
  all target domains), as a cosine.

Orientation and scale are left to the calibration (calibration.py): these are features, not predictions.
"""

from __future__ import annotations

import torch

from ..core.config import DEFAULT_SIGNED, SIGNED_VARIANTS  # noqa: F401  - re-exported
from ..core.stats import ActivationStats, ShiftStats




def signed_usage(shift: ShiftStats, domain: ActivationStats, latents: torch.Tensor) -> float:
    return float((shift.mean_diff().cpu()[latents] * domain.mean().cpu()[latents]).sum())


def transfer_share(shift: ShiftStats, source: ActivationStats, domain: ActivationStats, latents: torch.Tensor) -> float:
    energy = shift.mean_shift().cpu()[latents]
    mu_source = source.mean().cpu()[latents].clamp(min=0)
    mu_domain = domain.mean().cpu()[latents].clamp(min=0)
    used = torch.where(mu_source > 0, (mu_domain / mu_source.clamp(min=1e-12)).clamp(max=1.0),
                       (mu_domain > 0).double())
    total = float(energy.sum())
    return float((energy * used).sum()) / total if total > 0 else 0.0


def residual_shift_direction(shift: ShiftStats, latents: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """sum_{j in D_N} delta_j W_dec[j]: the in-context shift as a residual-stream vector (SAE input space)."""
    delta = shift.mean_diff().cpu()[latents].to(torch.float64)
    return delta @ decoder.detach().cpu().to(torch.float64)[latents]


def decoder_projection(direction: torch.Tensor, domain_mean: torch.Tensor, all_means: torch.Tensor) -> float:
    """Cosine between the decoded shift and the domain's direction (its mean minus the mean over domains)."""
    own = domain_mean.to(torch.float64) - all_means.to(torch.float64)
    norm = float(direction.norm() * own.norm())
    return float(direction @ own) / norm if norm > 0 else 0.0


def signed_scores(shift: ShiftStats, source: ActivationStats, domains: dict[str, tuple[ActivationStats, ActivationStats]],
                  latents: torch.Tensor, decoder: torch.Tensor | None) -> dict[str, dict[str, float | None]]:
    """Every signed feature per domain. ``domains``: name -> (latent stats, residual stats) without context."""
    out: dict[str, dict[str, float | None]] = {}
    direction = residual_shift_direction(shift, latents, decoder) if decoder is not None else None
    mean_of_means = (torch.stack([residual.mean().cpu() for _, residual in domains.values()]).mean(0)
                     if domains else None)
    for name, (latent_stats, residual_stats) in domains.items():
        share = transfer_share(shift, source, latent_stats, latents)
        projection = None
        if direction is not None and direction.numel() == residual_stats.width:
            projection = decoder_projection(direction, residual_stats.mean().cpu(), mean_of_means)
        out[name] = {"signed_usage": signed_usage(shift, latent_stats, latents),
                     "forgetting_minus_transfer": 1.0 - 2.0 * share,
                     "decoder_projection": projection}
    return out
