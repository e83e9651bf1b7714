"""Held-out loss: the chunked LM head equals the full logits, and the sequential paired estimate stops early
only with the precision asked for."""

import random

import pytest
import torch
from tiny import domain_texts, make_model, make_tokenizer, scaling_model

from sts_callback.core import heldout
from sts_callback.core.distributed import shard_batches
from sts_callback.core.extract import batches_by_length
from sts_callback.core.heldout import all_sequence_nll, paired_change, sequence_nll, sequential_change


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def sequences(tokenizer, n=12, seed=0):
    out = []
    for text in domain_texts("law", n, seed=seed):
        ids = tokenizer(text)["input_ids"]
        out.append((ids, [True] * (len(ids) - 1)))  # every token but BOS counted
    return out


def full_logits_nll(model, seqs, pad):
    """Reference: one sequence at a time, full logits, float64 cross-entropy."""
    out = []
    with torch.no_grad():
        for ids, flags in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            counted = torch.tensor(flags)[-len(ids) + 1:] if len(flags) >= len(ids) - 1 else \
                torch.tensor([False] * (len(ids) - 1 - len(flags)) + flags)
            out.append([float(nll[counted].sum()), int(counted.sum())])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "peft"])
def test_chunked_head_equals_full_logits(tokenizer, arch, monkeypatch):
    if arch == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    else:
        model = make_model(arch)
        if arch == "gemma3":
            model.config.final_logit_softcapping = 3.0  # small, so that the cap matters
    model.eval()
    seqs = sequences(tokenizer)
    assert heldout.split_head(model) is not None  # the chunked path is the one under test
    monkeypatch.setattr(heldout, "HEAD_CHUNK", 7)
    with torch.no_grad():
        chunked = sequence_nll(model, seqs, 0, batch_size=5, chunk=7)
    reference = full_logits_nll(model, seqs, 0)
    assert torch.equal(chunked[:, 1], reference[:, 1])
    torch.testing.assert_close(chunked[:, 0], reference[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, scaling", [("Granite", {"logits_scaling": 8.0}), ("Cohere", {"logit_scale": 0.0625})])
def test_a_model_that_scales_its_logits_is_measured_with_its_own_loss(tokenizer, arch, scaling):
    # Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale: the head run apart from
    # the body skipped that (a held-out NLL 3x or 6x the model's own), so such a model runs its full forward
    model = scaling_model(arch, **scaling)
    seqs = sequences(tokenizer, n=6)
    assert heldout.split_head(model) is None
    with torch.no_grad():
        measured = sequence_nll(model, seqs, 0, batch_size=3)
    torch.testing.assert_close(measured, full_logits_nll(model, seqs, 0), rtol=1e-5, atol=1e-4)
    assert heldout.split_head(make_model("llama").eval()) is not None  # a plain head still runs apart


def inkling(**extra):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.InklingTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, **extra)
    return tf.InklingForCausalLM(config).eval()


def chameleon():
    import transformers as tf

    image_tokens = {f"IMGIMG{chr(ord('A') + i % 10)}{chr(ord('A') + i // 10)}Z": 100 + i for i in range(27)}
    config = tf.ChameleonConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                vocabulary_map={**image_tokens, "<image>": 127},
                                vq_config=dict(embed_dim=32, num_embeddings=16, latent_channels=32, resolution=32,
                                               base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1))
    torch.manual_seed(0)
    model = tf.ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("build", [lambda: inkling(), lambda: inkling(logits_mup_width_multiplier=1.0,
                                                                     unpadded_vocab_size=100), chameleon],
                         ids=["inkling_mup_width", "inkling_unpadded_vocab", "chameleon_image_tokens"])
def test_logits_cut_or_masked_beyond_the_head_are_measured_with_the_models_own_loss(tokenizer, build):
    """Inkling divides the head's input by logits_mup_width_multiplier and cuts its logits to
    unpadded_vocab_size; Chameleon masks its image tokens' logits: the head run apart from the body skipped each
    (a change read as -5.5% where the model's own was -0.3%)."""
    model = build()
    seqs = sequences(tokenizer, n=6)
    assert heldout.split_head(model) is None
    with torch.no_grad():
        measured = sequence_nll(model, seqs, 0, batch_size=3)
    torch.testing.assert_close(measured, full_logits_nll(model, seqs, 0), rtol=1e-5, atol=1e-4)


def test_full_measurement_is_the_relative_change_of_mean_nll():
    before = torch.tensor([[10.0, 5], [20.0, 8], [6.0, 3]], dtype=torch.float64)
    after = torch.tensor([[11.0, 5], [19.0, 8], [7.5, 3]], dtype=torch.float64)
    change = paired_change(before, after)
    mean_before, mean_after = 36.0 / 16, 37.5 / 16
    assert change.delta == pytest.approx((mean_after - mean_before) / mean_before)
    assert change.low < change.delta < change.high and change.tokens == 16


def simulated(n=400, shift=0.03, noise=0.05, seed=0):
    rng = random.Random(seed)
    counts = [rng.randint(8, 40) for _ in range(n)]
    before = torch.tensor([[c * 3.0 * rng.uniform(0.8, 1.2), c] for c in counts], dtype=torch.float64)
    after = before.clone()
    after[:, 0] = before[:, 0] * torch.tensor([1 + shift + rng.gauss(0, noise) for _ in range(n)], dtype=torch.float64)
    return before, after, counts


def test_sequential_stops_when_precise_enough_and_the_interval_covers_the_full_answer():
    covered, spent = 0, []
    for seed in range(40):
        before, after, counts = simulated(seed=seed)
        full = paired_change(before, after).delta
        measured = []

        def measure(indices):
            measured.extend(indices)
            out = torch.zeros_like(before)
            out[indices] = after[indices]
            return out

        order = list(range(len(counts)))
        random.Random(seed).shuffle(order)
        change = sequential_change(measure, before, order, counts, half_width=0.0125)
        assert change.half_width <= 0.0125 and len(set(measured)) == len(measured) == change.sequences
        covered += change.low <= full <= change.high
        spent.append(change.tokens / sum(counts))
    assert covered >= 36  # >= 90% of 40 (nominal 95%)
    assert max(spent) < 0.5  # a clear change costs a fraction of the budget


def test_a_handful_of_sequences_still_gets_a_95_percent_interval():
    # a re-check reads about 5 held-out texts of a domain: the interval must hold the change of the whole
    # population that often (the normal quantile held it 85% of the time here)
    population = paired_change(*simulated(n=20000, seed=999)[:2]).delta
    covered = sum(change.low <= population <= change.high
                  for change in (paired_change(*simulated(n=5, seed=seed)[:2]) for seed in range(400)))
    assert 0.92 <= covered / 400 <= 0.98


def test_a_text_with_no_measured_token_does_not_narrow_the_interval():
    """A one-token text (a tokenizer without BOS: its only token is never predicted) is sampled, measures nothing
    and read as a zero residual: ten of them made the interval of three real texts 2.3 times narrower."""
    before = torch.tensor([[100.0, 40], [120.0, 40], [90.0, 40]], dtype=torch.float64)
    after = before.clone()
    after[:, 0] = torch.tensor([105.0, 118.0, 99.0], dtype=torch.float64)
    empty = torch.zeros(10, 2, dtype=torch.float64)
    alone, padded = paired_change(before, after), paired_change(torch.cat([before, empty]), torch.cat([after, empty]))
    assert (padded.low, padded.high, padded.sequences) == pytest.approx((alone.low, alone.high, 3))


def test_standard_error_is_the_spread_of_the_change_over_samples_of_texts():
    # what the noise ceiling of validate() reads: the standard error of a change measured on a few texts is how
    # far such measurements scatter around the whole domain's change
    changes = [paired_change(*simulated(n=8, seed=seed)[:2]) for seed in range(600)]
    deltas = torch.tensor([c.delta for c in changes])
    mean_variance = sum(c.standard_error ** 2 for c in changes) / len(changes)
    assert mean_variance ** 0.5 == pytest.approx(float(deltas.std()), rel=0.15)
    single = paired_change(*simulated(n=1, seed=0)[:2])
    assert single.standard_error == float("inf")


def test_sequential_stops_at_once_when_surely_above_tolerance_and_measures_all_without_a_target():
    before, after, counts = simulated(shift=0.30)
    order = list(range(len(counts)))
    fill = lambda idx: torch.zeros_like(before).index_copy_(0, torch.tensor(idx), after[idx])  # noqa: E731
    quick = sequential_change(fill, before, order, counts, half_width=1e-6, tolerance=0.05)
    assert quick.low > 0.05 and quick.sequences < len(counts) / 4
    everything = sequential_change(fill, before, order, counts, half_width=None)
    assert everything.sequences == len(counts)
    assert everything.delta == pytest.approx(paired_change(before, after).delta)


def test_all_sequence_nll_measures_only_the_indices_asked(tokenizer):
    model = make_model("llama")
    seqs = sequences(tokenizer, n=6)
    with torch.no_grad():
        some = all_sequence_nll(model, seqs, 0, 4, indices=[1, 4])
        every = all_sequence_nll(model, seqs, 0, 4)
    assert torch.equal(some[[0, 2, 3, 5]], torch.zeros(4, 2, dtype=torch.float64))
    torch.testing.assert_close(some[[1, 4]], every[[1, 4]])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_run_the_batches_of_one_process_whole_and_the_same_number_of_them(world):
    lengths = [5, 9, 2, 7, 7, 3, 11, 4, 6, 8]
    batches = batches_by_length(lengths, 3)
    shares = [shard_batches(batches, lengths, rank_=r, world=world) for r in range(world)]
    counted = [batch for mine, flags in shares for batch, flag in zip(mine, flags) if flag]
    assert sorted(counted) == sorted(batches)  # each batch of one process, once, with the same sequences in it
    assert len({len(mine) for mine, _ in shares}) == 1  # as many forwards on every rank (ZeRO-3 needs it)
    cheapest = min(batches, key=lambda b: len(b) * max(lengths[i] for i in b))
    assert all(batch == cheapest for mine, flags in shares for batch, flag in zip(mine, flags) if not flag)


def test_the_head_in_bfloat16_measures_nearly_the_float32_nll_and_casts_its_weight_once_per_version(tokenizer):
    from sts_callback.core.heldout import HeadInPrecision

    model = make_model("gemma3", vocab_size=len(tokenizer), hidden=32)
    seqs = sequences(tokenizer)
    pad = tokenizer.pad_token_id
    head = model.get_output_embeddings()
    precision = HeadInPrecision(torch.bfloat16)
    casts = []
    original = torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):
        if tensor.data_ptr() == head.weight.data_ptr():
            casts.append(args)
        return original(tensor, *args, **kwargs)

    with torch.no_grad():
        exact = sequence_nll(model, seqs, pad, 4)
        torch.Tensor.to = counting_to
        try:
            low = sequence_nll(model, seqs, pad, 4, head_precision=precision)
            again = sequence_nll(model, seqs, pad, 4, head_precision=precision)
            assert len(casts) == 1  # three batches, two calls: one cast
            step = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1))
            head.weight.add_(step)  # a full fine-tune's step: the weight changed in place
            moved = sequence_nll(model, seqs, pad, 4, head_precision=precision)
            assert len(casts) == 2
        finally:
            torch.Tensor.to = original
        exact_moved = sequence_nll(model, seqs, pad, 4)
    assert not torch.equal(low, exact)  # the cast happened
    torch.testing.assert_close(low, exact, rtol=1e-2, atol=0)
    torch.testing.assert_close(again, low, rtol=0, atol=0)
    torch.testing.assert_close(moved, exact_moved, rtol=1e-2, atol=0)
    assert (moved - low)[:, 0].abs().max() > 0.1 * low[:, 0].abs().max()  # the new weight, not the cached copy


def test_the_top_logits_and_the_targets_taken_exactly_cut_the_bfloat16_heads_error(tokenizer):
    from sts_callback.core.heldout import HeadInPrecision

    model = make_model("llama", vocab_size=len(tokenizer), hidden=32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits of tens, as a trained model's: bf16 steps of 0.06
        seqs = sequences(tokenizer)
        exact = sequence_nll(model, seqs, tokenizer.pad_token_id, 4)
        errors = {}
        for top in (0, 8):
            precision = HeadInPrecision(torch.bfloat16)
            precision.exact_top = top
            errors[top] = (sequence_nll(model, seqs, tokenizer.pad_token_id, 4, head_precision=precision)
                           - exact)[:, 0].abs().mean()
    assert errors[8] < errors[0] / 4


def reference_bf16_nll(head, softcap, hidden, targets, top):
    """The definition: bf16 logits (float32 accumulation), the top ``top`` and the target's logits exact, float32
    cross-entropy over the whole vocabulary at once."""
    weight, bias = head.weight, head.bias
    logits = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).float()
    exact = hidden @ weight.T
    if bias is not None:
        logits += bias.bfloat16().float()
        exact += bias
    if softcap:
        logits, exact = (torch.tanh(x / softcap) * softcap for x in (logits, exact))
    rows = torch.cat([logits.topk(top, dim=1).indices, targets[:, None]], 1)
    logits.scatter_(1, rows, exact.gather(1, rows))
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("bias, softcap", [(False, None), (True, 30.0)])
def test_the_bf16_head_in_vocabulary_blocks_equals_its_definition_over_the_whole_vocabulary(bias, softcap):
    from sts_callback.core.heldout import HeadInPrecision

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 1000, bias=bias)
    with torch.no_grad():
        head.weight.normal_(0, 1, generator=generator)  # logits of tens: bf16 rounding matters
    hidden = torch.randn(40, 24, generator=generator)
    targets = torch.randint(0, 1000, (40,), generator=generator)
    targets[:5] = (hidden[:5] @ head.weight.T).argmax(1)  # some targets among the top logits, most not
    precision = HeadInPrecision(torch.bfloat16)
    precision.exact_top, precision.vocab_block = 8, 96  # 11 blocks, the last one short: the running top-k merges
    with torch.no_grad():
        blocked = heldout.head_nll(head, softcap, hidden, targets, precision)
        expected = reference_bf16_nll(head, softcap, hidden, targets, 8)
        exact = heldout.head_nll(head, softcap, hidden, targets)
    torch.testing.assert_close(blocked, expected, rtol=1e-4, atol=1e-4)  # ties among bf16 logits may pick either
    assert (expected - exact).abs().max() > 1e-3  # bf16 did round: the comparison is not float32 against itself


def test_the_body_under_bf16_autocast_measures_a_change_as_float32_does(tokenizer):
    model = make_model("gemma3", vocab_size=len(tokenizer), hidden=32)
    seqs = sequences(tokenizer)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        before = {dtype: sequence_nll(model, seqs, pad, 4, body_dtype=dtype) for dtype in (None, torch.bfloat16)}
        unchanged = sequence_nll(model, seqs, pad, 4, body_dtype=torch.bfloat16)
    optimizer = torch.optim.Adam(model.model.layers.parameters(), lr=3e-3)  # a few fine-tuning steps on the body
    for ids, _ in seqs[:6]:
        batch = torch.tensor([ids])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = {dtype: sequence_nll(model, seqs, pad, 4, body_dtype=dtype) for dtype in (None, torch.bfloat16)}
    assert not torch.equal(before[torch.bfloat16], before[None])  # the matmuls did run in bf16
    torch.testing.assert_close(before[torch.bfloat16], before[None], rtol=2e-2, atol=0)
    assert paired_change(before[torch.bfloat16], unchanged).delta == 0  # deterministic: no change, none measured
    exact = paired_change(before[None], after[None])
    low = paired_change(before[torch.bfloat16], after[torch.bfloat16])
    assert abs(exact.delta) > 0.01
    assert abs(low.delta - exact.delta) < 0.1 * abs(exact.delta)
    assert low.low < exact.delta < low.high


@pytest.mark.parametrize("resolve_name", ["resolve_head_dtype", "resolve_body_dtype"])
def test_loss_dtype_auto_is_bfloat16_only_for_float32_weights_with_native_bf16_matmuls(tokenizer, monkeypatch,
                                                                                       resolve_name):
    resolve = getattr(heldout, resolve_name)
    model = make_model("llama", vocab_size=len(tokenizer))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve("auto", model) is torch.bfloat16
    assert resolve(None, model) is None
    assert resolve("auto", model.to(torch.bfloat16)) is None  # already bf16: nothing to gain
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve("auto", make_model("llama", vocab_size=len(tokenizer))) is None  # slow in bf16 here
    assert resolve("bfloat16", model) is torch.bfloat16
    from sts_callback.core.errors import STSDataWarning

    monkeypatch.setattr(heldout, "parameters_are_sharded", lambda m: True)  # ZeRO-3 / FSDP: the head runs inside
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve("auto", model) is None
    with pytest.warns(STSDataWarning, match="does not apply to a sharded model"):
        assert resolve("bfloat16", model) is None


@pytest.mark.parametrize("name", ["loss_head_dtype", "loss_body_dtype"])
def test_a_bad_loss_dtype_is_refused_at_construction(name):
    from sts_callback.core.errors import STSConfigError
    from sts_callback.pipelines.recheck import RecheckConfig

    with pytest.raises(STSConfigError, match=f"{name} must be one of"):
        RecheckConfig(**{name: "float16"})


def test_recurrent_gemmas_logit_soft_cap_is_applied_as_the_model_does(tokenizer):
    """RecurrentGemma names its cap logits_soft_cap: the split head skipped it (NLL 25.8 against the model's 5.6)."""
    import transformers as tf

    config = tf.RecurrentGemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, lru_width=32,
                                     attention_window_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     logits_soft_cap=3.0, block_types=["recurrent", "attention", "recurrent"])
    torch.manual_seed(0)
    model = tf.RecurrentGemmaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits far beyond the cap
    seqs = sequences(tokenizer)[:4]
    assert heldout.split_head(model) is not None
    with torch.no_grad():
        measured = sequence_nll(model, seqs, 0, batch_size=2)
        own = [float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss) for ids, _ in seqs]
    assert (measured[:, 0] / measured[:, 1]).tolist() == pytest.approx(own, rel=1e-4)
