"""train_sae: a TopK SAE trained on a tiny llama reconstructs held-out residuals and round-trips through disk."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sts_callback.core.errors import STSConfigError, STSDataWarning, STSInputError  # noqa: E402
from sts_callback.tools.train_sae import (REPORT_FILENAME, SAETrainingConfig, TrainedSAE,  # noqa: E402
                                          check_training_inputs, collect_activations, evaluate_sae, train_sae)

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


@pytest.fixture
def no_training(monkeypatch):
    """Training may not start: sae-lens' trainer fails if it is built."""
    from sae_lens.training import sae_trainer

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(sae_trainer.SAETrainer, "__init__", refuse)


@pytest.mark.parametrize("held_out_fraction, words", [
    (0.1, "held-out 10% is 1 token(s): too few to measure"),
    (0.0, "too few to train an SAE and measure"),
])
def test_too_few_tokens_to_evaluate_fail_before_training(tiny, no_training, held_out_fraction, words):
    """One short text (10 tokens) used to train for hundreds of passes and report fvu NaN with exit 0."""
    model, tokenizer = tiny
    text = ["goal match team player score"]
    config = SAETrainingConfig(d_sae=64, k=4, training_tokens=5000, held_out_fraction=held_out_fraction)
    with pytest.raises(STSInputError, match=re.escape(words)) as raised:
        train_sae(model, tokenizer, text, LAYER, config)
    assert "more or longer texts" in str(raised.value)


def test_data_far_below_the_budget_warns_and_a_nan_metric_is_written_as_null(tiny, tmp_path, monkeypatch):
    from sts_callback.tools import train_sae as module

    model, tokenizer = tiny
    real = module.evaluate_sae
    monkeypatch.setattr(module, "evaluate_sae", lambda sae, acts: {**real(sae, acts), "fvu": float("nan")})
    config = SAETrainingConfig(d_sae=64, k=4, training_tokens=4096, batch_size_tokens=512)
    with pytest.warns(STSDataWarning, match=r"passes \d+ times over them.*lower training_tokens"):
        result = train_sae(model, tokenizer, _texts(2), LAYER, config, output_dir=tmp_path)
    assert result.details["passes"] > 10

    def no_nan(name):
        raise AssertionError(f"{name} in {REPORT_FILENAME}: not strict JSON")

    report = json.loads((tmp_path / REPORT_FILENAME).read_text(), parse_constant=no_nan)
    assert report["fvu"] is None
    notes = " ".join(report["notes"])
    assert "fvu is null" in notes and "passes" in notes
    assert TrainedSAE(sae=None, path=None, layer=1, d_in=32, d_sae=64, k=4, fvu=float("inf"), mean_l0=1.0,
                      dead_fraction=0.0, training_tokens=1, unique_tokens=1, seconds=0.0).to_dict()["fvu"] is None


def test_an_sae_that_explains_little_is_said_so_in_the_warning_and_the_report(tiny, tmp_path):
    """Two training steps leave an SAE the callback would warn about at train start (FVU above 0.6): said now,
    where the fix (more tokens) is in reach, not first in a training run."""
    model, tokenizer = tiny
    config = SAETrainingConfig(d_sae=64, k=4, training_tokens=256, batch_size_tokens=128)
    with pytest.warns(STSDataWarning, match=r"explains little of the residual stream: fraction of variance "
                                            r"unexplained \d\.\d\d on held-out tokens \(above 0\.6.*after 2 "
                                            r"training step\(s\)\. Train on more tokens"):
        result = train_sae(model, tokenizer, _texts(10), LAYER, config, output_dir=tmp_path)
    assert result.fvu > 0.6
    assert any("explains little" in note for note in json.loads((tmp_path / REPORT_FILENAME).read_text())["notes"])


def test_inputs_are_checked_from_config_json_and_the_data_before_weights_load(tmp_path):
    """`sts train-sae` can check the layer and the data with no weights loaded: the folder here has none."""
    make_model("llama").config.save_pretrained(tmp_path / "model")  # config.json only, 3 layers
    law = tmp_path / "law.jsonl"
    law.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["law court judge", "statute appeal"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for layer in (9, -1, 3):
        with pytest.raises(STSInputError, match=re.escape("the model has 3 decoder layers; pass a layer in 0..2")):
            check_training_inputs(tmp_path / "model", layer, [law])
    with pytest.raises(STSInputError, match=f"No texts to train the SAE on: {re.escape(str(empty))}"):
        check_training_inputs(tmp_path / "model", 1, [empty])
    with pytest.warns(STSDataWarning, match=re.escape(f"{empty} hold(s) no text")):
        assert check_training_inputs(tmp_path / "model", 1, [empty, law]) == ["law court judge", "statute appeal"]
    # a model it cannot read here (a hub name not in the cache): the layer is left to the loader, the data not
    assert check_training_inputs("nobody-here/no-such-model", 5, [law]) == ["law court judge", "statute appeal"]
    # a file given twice (by two spellings) or a domain twice: its texts were read twice, and the held-out FVU was
    # partly measured on training texts
    for twice in ([law, tmp_path / "." / "law.jsonl"], ["legal", "legal"]):
        with pytest.raises(STSInputError, match="more than once; give each file or domain once"):
            check_training_inputs(tmp_path / "model", 1, twice)
    with pytest.raises(STSInputError, match="layers are numbered from 0"):
        check_training_inputs("nobody-here/no-such-model", -1, [law])


def test_an_interrupted_retrain_leaves_the_folders_sae_and_report_together(tiny, tmp_path, monkeypatch):
    """The SAE files and the report are moved in only once all are written (before: a Ctrl-C in the evaluation
    left the new SAE beside the old SAE's report)."""
    from sts_callback.core.sae import load_sae
    from sts_callback.tools import train_sae as module

    model, tokenizer = tiny
    small = dict(d_sae=64, training_tokens=2048, batch_size_tokens=256, seed=0)
    train_sae(model, tokenizer, _texts(10), LAYER, SAETrainingConfig(k=4, **small), output_dir=tmp_path)

    def interrupted(sae, acts):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "evaluate_sae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(model, tokenizer, _texts(10), 0, SAETrainingConfig(k=8, **small), output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors", REPORT_FILENAME]
    handle, report = load_sae(tmp_path), json.loads((tmp_path / REPORT_FILENAME).read_text())
    assert (handle.layer, handle.module.cfg.k, report["layer"], report["k"]) == (LAYER, 4, LAYER, 4)
    monkeypatch.undo()
    # a staging folder a killed run left a day ago goes; a report kept elsewhere through a link is written through
    stale = tmp_path / ".sts-train-sae-killed"
    stale.mkdir()
    os.utime(stale, (0, 0))
    elsewhere = tmp_path.parent / f"{tmp_path.name}-reports" / REPORT_FILENAME
    elsewhere.parent.mkdir()
    os.replace(tmp_path / REPORT_FILENAME, elsewhere)
    (tmp_path / REPORT_FILENAME).symlink_to(elsewhere)
    train_sae(model, tokenizer, _texts(10), 0, SAETrainingConfig(k=8, **small), output_dir=tmp_path)
    handle, report = load_sae(tmp_path), json.loads((tmp_path / REPORT_FILENAME).read_text())
    assert (handle.layer, handle.module.cfg.k, report["layer"], report["k"]) == (0, 8, 0, 8)
    assert not stale.exists() and (tmp_path / REPORT_FILENAME).is_symlink()
    assert json.loads(elsewhere.read_text())["k"] == 8
