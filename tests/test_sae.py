"""SAE loading: sae-lens objects and folders, generic modules, hook-name mapping."""

from pathlib import Path

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSInputError, forecast, load_sae
from sts_callback.core.sae import layer_from_hook_name


@pytest.mark.parametrize("hook,layer", [
    ("blocks.12.hook_resid_post", 12),
    ("blocks.12.hook_resid_pre", 11),
    ("model.layers.5", 5),
    ("model.layers.5.output", 5),
    ("model.language_model.layers.3", 3),
    ("transformer.h.7", 7),
    ("model.layers.5.input", 4),  # a block's input is the previous block's output
    ("model.blocks.4.hook_resid_post", 4),  # a model or release prefix
    ("gpt2-small/blocks.4.hook_resid_pre", 3),
    ("blocks.3.hook_mlp_out", None),
    (None, None),
])
def test_hook_names_map_to_decoder_blocks(hook, layer):
    assert layer_from_hook_name(hook) == layer


@pytest.mark.parametrize("hook", ["model.layers.1.mlp", "model.layers.1.self_attn", "model.layers.1.input_layernorm",
                                  "model.layers.1.post_attention_layernorm", "model.layers.1.mlp.down_proj",
                                  "transformer.h.1.attn", "transformer.h.1.ln_2", "blocks.1.hook_mlp_out",
                                  "model.norm", "transformer.ln_f", "model.final_layernorm",
                                  # inputs of a block's parts (Gemma Scope 2 transcoders read hook_mlp_in) and the
                                  # embeddings: a layer= would make them read a block's output silently
                                  "blocks.1.hook_mlp_in", "blocks.1.hook_attn_in", "blocks.1.hook_q_input",
                                  "model.embed_tokens", "transformer.wte",
                                  # Falcon's, GPT-NeoX's and Phi's names for the same parts (were read as block 1)
                                  "transformer.h.1.self_attention", "transformer.word_embeddings",
                                  "gpt_neox.layers.1.post_attention_dropout", "model.layers.1.resid_mlp_dropout",
                                  "model.layers.1.resid_dropout",
                                  # a multimodal model's vision tower (was read as text layer 0, silently)
                                  "model.vision_tower.encoder.layers.0", "model.visual.blocks.1"])
def test_an_sae_on_a_block_part_is_refused_so_that_a_layer_cannot_make_it_read_the_residual(hook):
    with pytest.raises(STSInputError, match="not the residual stream"):
        load_sae(TinySAE(32, 64, hook_name=hook))


@pytest.mark.parametrize("hook", ["model.layers.1", "transformer.h.1", "gemma-l1-res", "layer_1_norm_free"])
def test_a_residual_or_descriptive_hook_name_is_accepted(hook):
    assert load_sae(TinySAE(32, 64, hook_name=hook)).hook_name == hook


def test_resid_pre_of_layer_zero_is_rejected():
    with pytest.raises(STSInputError, match="embeddings"):
        layer_from_hook_name("blocks.0.hook_resid_pre")


def make_sae_lens_sae(d_in=32, d_sae=64, layer=1, k=None):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny",
                           neuronpedia_id="tiny/1-res")
    if k is None:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def test_sae_lens_object_folder_and_forecast(tmp_path):
    sae = make_sae_lens_sae(k=8)
    handle = load_sae(sae)
    assert (handle.d_in, handle.d_sae, handle.layer, handle.neuronpedia_id) == (32, 64, 1, "tiny/1-res")
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.layer == 1 and loaded.source["kind"] == "sae_lens_folder"
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded.encode(x), handle.encode(x))
    model, tokenizer = make_model("llama"), make_tokenizer()
    config = STSConfig(n_shifted=8, shift_tokens=100, domain_tokens=60)
    targets = {"chem": domain_texts("chem", 20)}
    from_object = forecast(model, tokenizer, sae, domain_texts("law", 20), targets, config)
    from_folder = forecast(model, tokenizer, str(tmp_path / "sae"), domain_texts("law", 20), targets, config)
    assert from_object.shifted_latents == from_folder.shifted_latents
    assert from_folder.settings["sae"]["path"].endswith("sae")


def test_sae_dtype_cast():
    given = make_sae_lens_sae()
    handle = load_sae(given, dtype=torch.bfloat16)
    assert next(handle.module.parameters()).dtype == torch.bfloat16
    assert handle.encode(torch.randn(3, 32)).shape == (3, 64)
    # the caller's own object keeps its dtype (was cast in place, its cfg.dtype with it)
    assert next(given.parameters()).dtype == torch.float32 and given.cfg.dtype == "float32"
    tiny = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    assert next(load_sae(tiny, dtype=torch.bfloat16).module.parameters()).dtype == torch.bfloat16
    assert tiny.W_enc.dtype == torch.float32
    assert load_sae(tiny, dtype=torch.float32).module is tiny  # nothing to cast: no copy


def test_the_callers_sae_stays_on_its_device():
    """A SAE moved to the model's device is a copy (before: the caller's CPU SAE was moved to the GPU in place).
    'meta' stands in for a GPU on this CPU-only machine."""
    from sts_callback.core.sae import _own_copy_if_moved

    for given in (make_sae_lens_sae(), TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")):
        moved = _own_copy_if_moved(given, "meta", None)
        assert moved is not given and next(moved.parameters()).device.type == "cpu"  # moved by the handle later
        assert next(given.parameters()).device.type == "cpu"
        assert _own_copy_if_moved(given, "cpu", None) is given and _own_copy_if_moved(given, None, None) is given
        assert load_sae(given, device="cpu").module is given  # already there: no copy


def test_a_sae_lens_training_sae_is_used_as_the_inference_sae_it_saves():
    # BatchTopK's training encode keeps the top k x batch latents of the whole batch, so scores changed with
    # STSConfig.batch_size (-25% at 2 vs 8); the inference SAE it saves encodes each row alone
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    training = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(
        d_in=32, d_sae=64, k=8, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    handle = load_sae(training)
    assert not isinstance(handle.module, sae_lens.TrainingSAE) and handle.layer == 1
    assert handle.source["kind"] == "sae_lens_training_object"
    x = torch.randn(20, 32)
    with torch.no_grad():
        torch.testing.assert_close(handle.encode(x)[:5], handle.encode(x[:5]))


def test_generic_module_sizes():
    handle = load_sae(TinySAE(32, 80, hook_name="model.layers.2"))
    assert (handle.d_in, handle.d_sae, handle.layer) == (32, 80, 2)

    class EncodeOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 50)
            self.d_in = 32

        def encode(self, x):
            return torch.relu(self.proj(x))

    assert load_sae(EncodeOnly()).d_sae == 50


def test_bad_sae_specs(tmp_path):
    with pytest.raises(STSInputError, match="not a folder"):
        load_sae("does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(STSInputError, match="no cfg.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(STSInputError, match="encode"):
        load_sae(object())
    with pytest.raises(STSInputError, match="release"):
        load_sae({"sae_id": "x"})


def test_encoding_ignores_a_trainers_bf16_autocast():
    sae = load_sae(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"))
    rows = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    expected = sae.encode(rows)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # TRL's default bf16=True on CPU
        inside = sae.encode(rows)
    assert inside.dtype == torch.float32 and torch.equal(inside, expected)


def test_a_non_residual_hook_name_is_refused_whatever_the_hugging_face_name_says():
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name="blocks.1.hook_mlp_in", hf_hook_name="model.layers.1")
    with pytest.raises(STSInputError, match="hook_mlp_in.*not the residual stream"):
        load_sae(StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=metadata)))


def test_a_transcoder_is_refused_as_no_residual_sae():
    sae_lens = pytest.importorskip("sae_lens")
    if not hasattr(sae_lens, "Transcoder"):
        pytest.skip("this sae-lens has no transcoders")
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name="blocks.1.hook_resid_post", hook_name_out="blocks.1.hook_mlp_out")
    transcoder = sae_lens.Transcoder(sae_lens.TranscoderConfig(d_in=32, d_sae=64, d_out=32, metadata=metadata,
                                                               apply_b_dec_to_input=False))
    with pytest.raises(STSInputError, match="is a transcoder"):
        load_sae(transcoder)


def test_an_encode_that_returns_no_dense_latents_is_refused_at_load():
    """EleutherAI sparsify's Sae.encode returns (top_acts, top_indices, pre_acts): it failed mid-pass with a bare
    AttributeError."""
    class SparseOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 64)
            self.d_in = 32

        def encode(self, x):
            top = torch.relu(self.proj(x)).topk(4)
            return top.values, top.indices

    with pytest.raises(STSInputError, match="returned a tuple.*dense floating-point latents of shape \\[n, d_sae\\]"):
        load_sae(SparseOutput())


def test_sae_objects_stsneeds_to_read_otherwise_are_read_as_they_mean_or_refused_at_load():
    """Each of these was accepted at load and failed after the model's forwards, or scored wrongly: top-k indices
    (read as 8 latents), a sparse COO result (torch's topk has no sparse kernel), a cfg-carrying object whose
    encode returns a tuple or whose cfg.hook_name was ignored, a BatchNorm in training mode refused by the load's
    own test, an SAE under torch.compile (its training SAE's encode used, its fingerprint another), buffers cast in
    the caller's object."""
    from types import SimpleNamespace

    class Linear(torch.nn.Module):
        def __init__(self, out="dense"):
            super().__init__()
            torch.manual_seed(0)
            self.proj, self.d_in, self.out = torch.nn.Linear(32, 64), 32, out
            self.norm = torch.nn.BatchNorm1d(64)

        def encode(self, x):
            acts = torch.relu(self.norm(self.proj(x)))
            if self.out == "indices":
                return acts.topk(8).indices
            if self.out == "sparse":
                return acts.to_sparse()
            if self.out == "tuple":
                return acts, None
            return acts

    with pytest.raises(STSInputError, match="returned a torch.int64 tensor of shape \\(1, 8\\).*floating-point"):
        load_sae(Linear("indices"))
    dense, sparse = Linear(), Linear("sparse")
    assert dense.training  # a new module: its BatchNorm cannot normalise one row in training mode
    x = torch.randn(5, 32)
    handle = load_sae(sparse)
    assert handle.d_sae == 64 and torch.equal(handle.encode(x), load_sae(dense).encode(x))
    with_cfg = Linear("tuple")
    with_cfg.cfg = SimpleNamespace(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post")
    with pytest.raises(STSInputError, match="returned a tuple"):
        load_sae(with_cfg)
    with_cfg.out, with_cfg.cfg.hook_name = "dense", "blocks.1.hook_mlp_out"
    with pytest.raises(STSInputError, match="not the residual stream"):
        load_sae(with_cfg)
    with_cfg.cfg.hook_name = "blocks.1.hook_resid_post"
    assert load_sae(with_cfg).layer == 1
    plain = make_sae_lens_sae()
    compiled = torch.compile(plain)
    assert load_sae(compiled).fingerprint() == load_sae(plain).fingerprint()

    class BufferSAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("W_enc", torch.randn(32, 64))

        def encode(self, x):
            return torch.relu(x @ self.W_enc)

    held = BufferSAE()
    assert load_sae(held, dtype=torch.bfloat16).module is not held and held.W_enc.dtype == torch.float32


def test_a_callers_sae_in_training_mode_is_read_in_eval_mode_and_left_in_its_own():
    """An SAE the caller is still training (dropout on, one submodule frozen in eval): STS reads it without dropout,
    every call alike, and hands it back with each submodule's flag as it was."""
    class DropoutSAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d_in, self.enc, self.drop = 32, torch.nn.Linear(32, 64), torch.nn.Dropout(0.5)
            self.dec = torch.nn.Linear(64, 32)

        def encode(self, x):
            return torch.relu(self.drop(self.enc(x)))

        def decode(self, z):
            return self.dec(self.drop(z))

    sae = DropoutSAE()
    sae.dec.eval()
    handle = load_sae(sae)
    x = torch.randn(16, 32)
    with torch.no_grad():
        latents = handle.encode(x)
        assert torch.equal(latents, handle.encode(x)) and torch.equal(latents, torch.relu(sae.enc(x)))
        assert torch.equal(handle.decode(latents), sae.dec(latents))
    assert sae.training and sae.enc.training and sae.drop.training and not sae.dec.training


def test_the_sae_fit_counts_negative_latents_as_active():
    from sts_callback.pipelines.monitor import fit_from_sums, fit_sums

    class SignedLatents(torch.nn.Module):  # AbsTopK: the k largest by magnitude, negative ones too
        def encode(self, x):
            return torch.stack([x[:, 0], -x[:, 1].abs(), torch.zeros_like(x[:, 0])], dim=1)

        def decode(self, latents):
            return torch.nn.functional.pad(latents[:, :2], (0, 2))

    rows = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    assert fit_from_sums(fit_sums(SignedLatents(), rows))["l0"] == 2.0


def test_an_sae_held_in_buffers_gets_its_rows_in_its_own_dtype():
    """Weights registered as buffers (no parameters): every pass's float32 rows are cast to them, as at load."""
    class BufferSAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d_in = 32
            self.register_buffer("W_enc", torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16())

        def encode(self, x):
            return torch.relu(x @ self.W_enc)

    handle = load_sae(BufferSAE())
    latents = handle.encode(torch.randn(5, 32))
    assert handle.d_sae == 64 and latents.shape == (5, 64) and latents.dtype == torch.bfloat16


def test_an_sae_file_this_user_cannot_read_is_named_at_load(tmp_path, monkeypatch):
    """Another user's 0600 weights in a shared cache failed in safetensors with a FileNotFoundError for a file
    that was there. (os.access is denied for the weights: root, running the tests, may read any file.)"""
    import os

    make_sae_lens_sae().save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != weights and access(path, mode, **kw))
    with pytest.raises(STSInputError, match="lacks read permission") as caught:
        load_sae(tmp_path / "sae")
    assert str(weights) in str(caught.value) and "chmod -R a+rX" in str(caught.value)


def test_a_damaged_sae_folder_is_named(tmp_path):
    """safetensors' 'incomplete metadata' or json's error came with no word on which file or what to do."""
    make_sae_lens_sae().save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(STSInputError, match="cannot be read") as caught:
        load_sae(tmp_path / "sae")
    assert str(weights) in str(caught.value) and "Save it again" in str(caught.value)
    weights.write_bytes(whole)
    (tmp_path / "sae" / "cfg.json").write_text("[1, 2]")
    with pytest.raises(STSInputError, match="not sae-lens' settings object"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": 32}')  # parses, but sae-lens lacks its settings
    with pytest.raises(STSInputError, match="sae-lens cannot load the SAE folder"):
        load_sae(tmp_path / "sae")


def test_an_sae_folder_under_the_home_folder_loads_from_python(tmp_path, monkeypatch):
    """forecast(sae="~/sae") said "not a folder" (the callback and the CLI expanded `~`, load_sae did not)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    make_sae_lens_sae().save_model(tmp_path / "sae")
    assert load_sae("~/sae").d_sae == load_sae(Path("~/sae")).d_sae == load_sae(tmp_path / "sae").d_sae


def test_the_fingerprint_is_computed_once_yet_follows_the_weights():
    """Read at every checkpoint save: kept while the weights are the same storage unchanged in place, computed
    again after an in-place change or a copy."""
    import copy

    handle = load_sae(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"))
    first = handle.fingerprint()
    assert handle.fingerprint() == first == copy.deepcopy(handle).fingerprint()
    kept = handle.module.W_enc.detach().clone()
    with torch.no_grad():
        handle.module.W_enc.add_(1.0)
    assert handle.fingerprint() != first
    with torch.no_grad():
        handle.module.W_enc.copy_(kept)
    assert handle.fingerprint() == first
