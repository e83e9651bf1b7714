"""Residual-stream capture across architectures, wrappers and the last layer."""

import pytest
import torch
from tiny import make_model

from sts_callback.core.capture import ResidualCapture, decoder_layers, hidden_size, num_layers, parameters_are_sharded
from sts_callback.core.errors import STSInputError

ARCHS = ["llama", "qwen2", "gemma2", "gemma3", "gemma3_multimodal", "gpt2"]


def batch(vocab=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def final_norm(model):
    base = model.get_decoder()
    return getattr(base, "norm", None) or getattr(base, "ln_f")


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_is_output_of_block(arch):
    model = make_model(arch)
    ids, mask = batch()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = num_layers(model)
    assert n == 3 and hidden_size(model) == 32
    for layer in range(n - 1):
        captured = ResidualCapture(model, layer)(ids, mask)
        torch.testing.assert_close(captured, hidden[layer + 1])
    # last layer: before the final norm, unlike hidden_states[-1]
    last = ResidualCapture(model, n - 1)(ids, mask)
    assert not torch.allclose(last, hidden[-1])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(last), hidden[-1])


@pytest.mark.parametrize("arch", ["llama", "gemma3_multimodal", "gpt2"])
def test_truncated_equals_full_forward(arch):
    model = make_model(arch)
    ids, mask = batch()
    for layer in range(3):
        truncated = ResidualCapture(model, layer, truncate=True)
        full = ResidualCapture(model, layer, truncate=False)
        torch.testing.assert_close(truncated(ids, mask), full(ids, mask))


def test_truncated_forward_never_reaches_the_head():
    model = make_model("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    model.model.layers[2].register_forward_hook(lambda *a: calls.append("layer2"))
    ResidualCapture(model, 1)(*batch())
    assert calls == []
    ResidualCapture(model, 1, truncate=False)(*batch())
    assert calls == ["layer2", "head"]


def test_hook_accepts_tuple_outputs():
    model = make_model("llama")
    layer = model.model.layers[1]
    original = layer.forward
    layer.forward = lambda *a, **k: (original(*a, **k), None)  # older transformers returned tuples
    ids, mask = batch()
    captured = ResidualCapture(model, 1)(ids, mask)
    layer.forward = original
    torch.testing.assert_close(captured, ResidualCapture(model, 1)(ids, mask))


def test_peft_disabled_adapters_equal_base_model():
    from peft import LoraConfig, get_peft_model

    base = make_model("llama")
    ids, mask = batch()
    reference = ResidualCapture(base, 1)(ids, mask).clone()
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    capture = ResidualCapture(peft_model, 1)
    assert capture.block is peft_model.get_base_model().model.layers[1]
    adapted = capture(ids, mask)
    assert not torch.allclose(adapted, reference)
    with peft_model.disable_adapter():
        torch.testing.assert_close(capture(ids, mask), reference)
    torch.testing.assert_close(capture(ids, mask), adapted)


def test_layers_found_through_wrappers():
    model = make_model("gemma3_multimodal")
    assert decoder_layers(model) is model.model.language_model.layers
    gpt2 = make_model("gpt2")
    assert decoder_layers(gpt2) is gpt2.transformer.h
    assert not parameters_are_sharded(gpt2)


def test_layer_out_of_range_is_reported():
    from sts_callback.core.errors import STSInputError

    with pytest.raises(STSInputError, match="Layer 3 does not exist.*0..2"):
        ResidualCapture(make_model("llama"), 3)


def test_gemma3n_altup_blocks_give_their_active_stream_and_other_shapes_are_named():
    """A Gemma 3n block returns its AltUp streams [streams, batch, seq, hidden]: the active one is the residual (it
    indexed batch rows by position before, out of range or silently wrong)."""
    import transformers as tf

    config = tf.Gemma3nTextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        laurel_rank=4, altup_num_inputs=4, num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0], sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.Gemma3nForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 7))
    streams = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: streams.append(out[0] if isinstance(
        out, tuple) else out))
    with torch.no_grad():
        residual = ResidualCapture(model, 0)(ids, torch.ones_like(ids))
    handle.remove()
    assert residual.shape == (2, 7, 32)
    assert torch.equal(residual, streams[0][config.altup_active_idx])

    capture = ResidualCapture(make_model("llama"), 0)
    with pytest.raises(STSInputError, match=r"shape \(7, 32\).*residual stream"):
        capture._residual(torch.zeros(7, 32), (2, 7))


def test_an_sae_at_a_cross_attention_layer_that_text_skips_is_a_setup_error_naming_the_fix():
    """Mllama (Llama 3.2 Vision) skips its cross-attention layers on text-only input: the hook would never fire."""
    from tiny import TinySAE, domain_texts, make_tokenizer

    from sts_callback import STSConfigError, forecast

    model = make_model("mllama")  # text_config.cross_attention_layers=[1]
    texts = domain_texts("law", 10)
    with pytest.raises(STSConfigError, match=r"cross_attention_layers=\[1\].*SAE trained at another layer"):
        forecast(model, make_tokenizer(), TinySAE(32, 64, hook_name="model.language_model.layers.1"), texts,
                 {"food": domain_texts("food", 10)}, dict(n_shifted=8))
    with pytest.raises(STSConfigError, match="cross_attention_layers"):
        ResidualCapture(model, 1)
    ids, mask = batch()
    assert ResidualCapture(model, 2)(ids, mask).shape == (3, 10, 32)  # a self-attention layer runs on text


def test_a_layer_the_forward_skips_is_named_as_a_skipped_layer():
    capture = ResidualCapture(make_model("llama"), 1)
    capture.block = torch.nn.Linear(1, 1)  # a block the forward never runs, as a model skipping the layer
    with pytest.raises(RuntimeError, match="did not fire.*skip a layer for text-only input"):
        capture(*batch())


def test_a_model_whose_text_attends_both_ways_is_refused_naming_the_setting():
    """PaliGemma is a prefix-LM (text_config.use_bidirectional_attention=True): its held-out NLL would read the
    tokens it predicts, and change with the batch."""
    from types import SimpleNamespace

    from tiny import TinySAE, domain_texts, make_tokenizer

    from sts_callback import STSConfigError, forecast
    from sts_callback.core.capture import check_measurable

    with pytest.raises(STSConfigError, match=r"causal next-token loss.*"
                                             r"config.text_config.use_bidirectional_attention=True"):
        forecast(make_model("paligemma"), make_tokenizer(), TinySAE(32, 64, hook_name="model.language_model.layers.1"),
                 domain_texts("law", 10), {"food": domain_texts("food", 10)}, dict(n_shifted=8))
    gemma = make_model("gemma3")
    check_measurable(gemma)  # causal
    gemma.config.use_bidirectional_attention = True  # as EmbeddingGemma
    with pytest.raises(STSConfigError, match=r"config.use_bidirectional_attention=True"):
        check_measurable(gemma)
    from sts_callback.core.capture import _bidirectional_setting

    vision_only = SimpleNamespace(config=SimpleNamespace(use_bidirectional_attention="vision"))  # Gemma 4: images only
    assert _bidirectional_setting(vision_only) is None
    check_measurable(make_model("gemma3_multimodal"))


@pytest.mark.parametrize("arch, name", [("llama", "model.layers.1"), ("gpt2", "transformer.h.1"),
                                        ("gemma3_multimodal", "model.language_model.layers.1")])
def test_a_decoder_blocks_module_path_is_the_models_own(arch, name):
    """train_sae recorded hf_hook_name 'model.layers.L' for every model (GPT-2's blocks are transformer.h.L): a path
    other tools reading sae-lens' metadata could not find."""
    from sts_callback.core.capture import decoder_layer_name

    model = make_model(arch)
    assert decoder_layer_name(model, 1) == name
    assert dict(model.named_modules())[name] is decoder_layers(model)[1]


def test_a_looped_decoder_is_read_at_its_last_pass_whether_truncated_or_not():
    """Dory runs its blocks twice a forward: the truncated read (the default on one process) stopped at the first
    pass, the untruncated one (ZeRO-3, truncate_forward=False) kept the last, so the forecast's residuals
    depended on the setting, silently."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.DoryForCausalLM(tf.DoryConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             pad_token_id=0)).eval()
    assert model.config.n_recurrent_loops > 1
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for layer in range(3):
            truncated = ResidualCapture(model, layer, truncate=True)(ids, mask)
            torch.testing.assert_close(truncated, ResidualCapture(model, layer, truncate=False)(ids, mask))
