"""A ValidationResult from given scores and measured changes (no model, no training), for table and report tests."""

from __future__ import annotations

from sts_callback.scoring.agreement import correlation
from sts_callback.validation.validate import KINDS, STATISTICS, SeedResult, ValidationResult


def fake_validation(scores: list[dict[str, dict[str, float]]], changes: list[dict[str, float]], *,
                    training_args: dict | None = None, n_resamples: int = 0,
                    trainer: str = "Trainer") -> ValidationResult:
    """One seed per (scores, changes) pair: ``scores[domain][variant]``, ``changes[domain]`` (relative NLL change);
    correlations as validate computes them (``n_resamples`` bootstrap resamples; none by default)."""
    per_seed = []
    for seed, (score, change) in enumerate(zip(scores, changes)):
        names = list(change)
        variants = list(score[names[0]])
        correlations = {"nll": {v: {kind: {stat: correlation(
            [score[d][v] for d in names], [abs(change[d]) if kind == "abs" else change[d] for d in names], stat,
            n_resamples=n_resamples) for stat in STATISTICS} for kind in KINDS} for v in variants}}
        per_seed.append(SeedResult(
            seed=seed, scores=score, nll_before={d: 4.0 for d in names},
            nll_after={d: 4.0 * (1 + change[d]) for d in names}, nll_delta_rel=dict(change),
            nll_delta_abs={d: 4.0 * change[d] for d in names}, overlap=2, n_shifted=8, forecast_latents=[1, 2],
            actual_latents=[2, 3], actual_scores={}, correlations=correlations))
    first = per_seed[0]
    return ValidationResult(domains=list(first.nll_delta_rel), variants=list(next(iter(first.scores.values()))),
                            seeds=[s.seed for s in per_seed], method="lora",
                            training={"trainer": trainer, "steps": 2, "learning_rate": 0.01, "batch_size": 4,
                                      "lora_rank": 8, "loss_tokens": 120, "training_args": training_args or {}},
                            config={}, per_seed=per_seed, n_resamples=n_resamples)
