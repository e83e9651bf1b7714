"""train_sae: a TopK SAE trained on a tiny llama reconstructs held-out residuals and round-trips through disk."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sts_callback.core.errors import STSConfigError, STSInputError  # noqa: E402
from sts_callback.tools.train_sae import (REPORT_FILENAME, SAETrainingConfig, collect_activations,  # noqa: E402
                                          evaluate_sae, train_sae)

from tiny import domain_texts, make_model, make_tokenizer  # noqa: E402

DOMAINS = ("law", "code", "chem", "sport", "food")
LAYER = 1


def _texts(n_per_domain: int = 40) -> list[str]:
    return [text for domain in DOMAINS for text in domain_texts(domain, n_per_domain)]


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama"), make_tokenizer()


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model, tokenizer = tiny
    model.train()  # train_sae must switch to eval for the forwards and restore this afterwards
    rng_before = torch.get_rng_state()
    out = tmp_path_factory.mktemp("sae")
    config = SAETrainingConfig(d_sae=128, k=8, training_tokens=12_000, batch_size_tokens=256, seed=0)
    result = train_sae(model, tokenizer, _texts(), LAYER, config, output_dir=out)
    state = {"was_training": model.training, "rng_unchanged": torch.equal(rng_before, torch.get_rng_state())}
    model.eval()
    return result, out, state


def test_trained_sae_reconstructs_held_out_residuals(tiny, trained):
    model, tokenizer = tiny
    result, _, state = trained
    assert (result.layer, result.d_in, result.d_sae, result.k) == (LAYER, 32, 128, 8)
    # A broken trainer (no learning, wrong scale folding, decoder = mean) gives FVU >= ~1.
    assert result.fvu < 0.2, result.to_dict()
    assert 0 < result.mean_l0 <= 8
    assert 0 <= result.dead_fraction < 0.25
    assert result.held_out_tokens > 0 and result.unique_tokens > 0
    # Fewer unique tokens than the budget: training cycles over them.
    assert result.unique_tokens < result.training_tokens <= 12_000
    assert result.seconds > 0

    acts = collect_activations(model, tokenizer, _texts(), LAYER, max_tokens=10**6).acts
    held_out = acts[-result.held_out_tokens:]
    assert evaluate_sae(result.sae, held_out)["fvu"] == pytest.approx(result.fvu, rel=1e-4)

    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    untrained = TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=8))
    assert result.fvu < 0.5 * evaluate_sae(untrained, held_out)["fvu"]

    # The SAE reads raw residuals: the training-time input scaling is folded into the weights.
    assert result.sae.cfg.normalize_activations == "none"
    assert result.details["input_scale"] != pytest.approx(1.0, rel=0.1)
    assert state == {"was_training": True, "rng_unchanged": True}


def test_saved_folder_reloads_with_same_encodings(tiny, trained):
    from sae_lens import SAE

    from sts_callback.core.sae import load_sae

    model, tokenizer = tiny
    result, out, _ = trained
    assert result.path == str(out.resolve())
    handle = load_sae(out)
    assert (handle.d_in, handle.d_sae, handle.layer) == (32, 128, LAYER)
    assert handle.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert handle.module.cfg.metadata.hf_hook_name == f"model.layers.{LAYER}"
    assert handle.module.cfg.metadata.model_name

    x = collect_activations(model, tokenizer, _texts(5), LAYER, max_tokens=500).acts
    expected = result.sae.encode(x)
    assert torch.allclose(handle.encode(x), expected, atol=1e-6)
    raw = SAE.load_from_disk(str(out))
    assert torch.allclose(raw.decode(raw.encode(x)), result.sae.decode(expected), atol=1e-6)

    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["fvu"] == pytest.approx(result.fvu)
    assert report["layer"] == LAYER and report["d_sae"] == 128 and report["k"] == 8
    assert report["unique_tokens"] == result.unique_tokens
    assert {"lr", "steps", "train_seconds", "mean_l0", "dead_fraction", "hook_name"} <= set(report)


def test_collect_counts_only_real_tokens(tiny):
    model, tokenizer = tiny
    texts = _texts(4)
    words = sum(len(text.split()) for text in texts)
    assert collect_activations(model, tokenizer, texts, LAYER, max_tokens=10**6).acts.shape == (words, 32)
    with_bos = collect_activations(model, tokenizer, texts, LAYER, {"exclude_special_tokens": False}, max_tokens=10**6)
    assert with_bos.acts.shape[0] == words + len(texts)
    capped = collect_activations(model, tokenizer, texts, LAYER, SAETrainingConfig(training_tokens=30, max_length=4))
    assert capped.acts.shape[0] == 30 and capped.truncated  # max_tokens: the config's training_tokens


def test_same_seed_same_sae(tiny):
    model, tokenizer = tiny
    config = SAETrainingConfig(d_sae=64, k=4, training_tokens=1024, batch_size_tokens=128, seed=3)
    a = train_sae(model, tokenizer, _texts(5), LAYER, config)
    b = train_sae(model, tokenizer, _texts(5), LAYER, config.to_dict())  # a dict of its fields works as well
    assert torch.equal(a.sae.W_enc, b.sae.W_enc) and a.fvu == b.fvu
    assert a.path is None


def test_without_held_out_evaluates_on_training_tokens(tiny):
    model, tokenizer = tiny
    result = train_sae(model, tokenizer, _texts(3), LAYER, SAETrainingConfig(d_sae=64, k=4, training_tokens=600,
                                                                             batch_size_tokens=100,
                                                                             held_out_fraction=0.0))
    words = sum(len(text.split()) for text in _texts(3))
    assert result.held_out_tokens == 0 and result.unique_tokens == words
    assert result.details["evaluated_on"] == "train" and result.training_tokens == 600


@pytest.mark.parametrize("texts, layer, error, words", [
    ([], LAYER, STSInputError, "non-empty"),
    (["   ", ""], LAYER, STSInputError, "non-empty"),
    (["<|user|> <|end|>"], LAYER, STSInputError, "exclude_special_tokens=False"),
    (None, 3, STSInputError, "0..2"),
    (None, -1, STSInputError, "0..2"),
])
def test_bad_inputs_raise(tiny, texts, layer, error, words):
    model, tokenizer = tiny
    config = SAETrainingConfig(d_sae=64, k=4, training_tokens=256)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        train_sae(model, tokenizer, _texts(2) if texts is None else texts, layer, config)


@pytest.mark.parametrize("values, words", [
    ({"k": 64, "d_sae": 64}, "k < d_sae"),
    ({"k": 0}, "SAETrainingConfig.k=0 must be a positive integer"),
    ({"d_sae": True}, "SAETrainingConfig.d_sae=True"),
    ({"held_out_fraction": 1.0}, "held_out_fraction=1.0 must be in [0, 1)"),
    ({"training_tokens": 0}, "training_tokens=0"),
    ({"max_length": 0}, "max_length=0"),
    ({"batch_size_tokens": 2.5}, "batch_size_tokens=2.5"),
    ({"lr": 0.0}, "lr=0.0 must be a positive number"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"seed": "0"}, "seed='0' must be an integer"),
    ({"exclude_special_tokens": 1}, "exclude_special_tokens=1 must be True or False"),
    ({"d_sea": 64}, "Unknown SAE training setting(s) ['d_sea']"),
])
def test_bad_settings_raise_when_the_config_is_built(values, words):
    with pytest.raises(STSConfigError, match=re.escape(words)):
        SAETrainingConfig.from_dict(values)


def test_config_round_trips_and_max_tokens_is_checked(tiny):
    config = SAETrainingConfig(d_sae=64, k=4, lr=1e-3)
    assert SAETrainingConfig.from_dict(config.to_dict()) == config
    assert SAETrainingConfig.from_dict(None) == SAETrainingConfig()
    model, tokenizer = tiny
    with pytest.raises(STSConfigError, match="max_tokens=0"):
        collect_activations(model, tokenizer, _texts(2), LAYER, max_tokens=0)
