"""Signed forecast features: their sign follows the direction of the shift on the domain's own latents."""

import pytest
import torch

from sts_callback.scoring.signed import (
    decoder_projection,
    residual_shift_direction,
    signed_scores,
    transfer_share,
)
from sts_callback.core.stats import ActivationStats, ShiftStats


def activations(rows):
    stats = ActivationStats(len(rows[0]))
    stats.update(torch.tensor(rows, dtype=torch.float32))
    return stats


def shift(base, context):
    stats = ShiftStats(len(base[0]))
    stats.update(torch.tensor(base, dtype=torch.float32), torch.tensor(context, dtype=torch.float32))
    return stats


# 4 latents; the training data's context raises latent 0 and suppresses latent 1; 2 and 3 do not move.
SHIFT = shift([[1.0, 2.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]], [[3.0, 0.0, 1.0, 1.0], [3.0, 0.0, 1.0, 1.0]])
SOURCE = activations([[1.0, 2.0, 1.0, 1.0]])
SHIFTED = torch.tensor([0, 1])
# "raised" uses latent 0 only, "suppressed" latent 1 only, "unrelated" only the latents that do not move.
DOMAINS = {"raised": activations([[2.0, 0.0, 0.0, 0.0]]), "suppressed": activations([[0.0, 2.0, 0.0, 0.0]]),
           "unrelated": activations([[0.0, 0.0, 3.0, 3.0]])}


def residuals(vector):
    return activations([vector])


def test_signed_usage_follows_raised_vs_suppressed_latents():
    scores = signed_scores(SHIFT, SOURCE, {n: (s, residuals([0.0, 0.0])) for n, s in DOMAINS.items()}, SHIFTED, None)
    assert scores["raised"]["signed_usage"] == pytest.approx(2.0 * 2.0)  # delta_0 = +2, mu_0 = 2
    assert scores["suppressed"]["signed_usage"] == pytest.approx(-2.0 * 2.0)
    assert scores["unrelated"]["signed_usage"] == 0.0
    assert all(s["decoder_projection"] is None for s in scores.values())  # no decoder given


def test_transfer_share_splits_shift_energy_into_used_and_unused():
    # both shifted latents carry energy 4; "raised" uses latent 0 at least as much as the source: share 1/2
    assert transfer_share(SHIFT, SOURCE, DOMAINS["raised"], SHIFTED) == pytest.approx(0.5)
    assert transfer_share(SHIFT, SOURCE, SOURCE, SHIFTED) == pytest.approx(1.0)  # the training data itself
    assert transfer_share(SHIFT, SOURCE, DOMAINS["unrelated"], SHIFTED) == 0.0  # all energy is "forgetting"
    half = activations([[0.5, 1.0, 0.0, 0.0]])  # uses both at half the source's level
    assert transfer_share(SHIFT, SOURCE, half, SHIFTED) == pytest.approx(0.5)
    scores = signed_scores(SHIFT, SOURCE, {"unrelated": (DOMAINS["unrelated"], residuals([0.0]))}, SHIFTED, None)
    assert scores["unrelated"]["forgetting_minus_transfer"] == 1.0


def test_decoder_projection_points_toward_the_domain_the_shift_moves_to():
    decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # latent 0 -> e0, latent 1 -> e1
    direction = residual_shift_direction(SHIFT, SHIFTED, decoder)
    assert direction.tolist() == pytest.approx([2.0, -2.0])
    domains = {"toward": (DOMAINS["raised"], residuals([5.0, 1.0])), "away": (DOMAINS["suppressed"], residuals([1.0, 5.0]))}
    scores = signed_scores(SHIFT, SOURCE, domains, SHIFTED, decoder)
    assert scores["toward"]["decoder_projection"] == pytest.approx(1.0)
    assert scores["away"]["decoder_projection"] == pytest.approx(-1.0)
    assert decoder_projection(direction, torch.zeros(2), torch.zeros(2)) == 0.0  # no own direction: no sign


def test_icl_loss_change_reads_the_loss_with_training_demonstrations_in_context():
    from tiny import domain_texts, make_model, make_tokenizer

    from sts_callback.pipelines.icl_loss import icl_loss_change

    tokenizer = make_tokenizer()
    model = make_model("llama").train()
    train = domain_texts("law", 20, seed=1)
    config = {"max_query_tokens": 24, "max_demonstration_tokens": 24, "n_demonstrations": 2}
    first = icl_loss_change(model, tokenizer, train, {"law": domain_texts("law", 12), "food": domain_texts("food", 12)},
                            config, tokens=120)
    assert set(first) == {"law", "food"} and all(abs(v) > 0 for v in first.values())
    again = icl_loss_change(model, tokenizer, train, {"law": domain_texts("law", 12), "food": domain_texts("food", 12)},
                            config, tokens=120)
    assert again == first  # seeded sampling: the same numbers every time
    assert model.training  # the model's mode is restored
