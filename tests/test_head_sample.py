"""The re-checks' sampled LM head: an unchanged model measures no change, a fine-tune's change is measured as the
whole head measures it (inside its interval), the tail draws follow the base probabilities outside the top, and
the draws do not depend on how sequences are batched."""

import pytest
import torch
from tiny import domain_texts, make_model, make_tokenizer
from torch import nn

from sts_callback.core import head_sample, lm_head
from sts_callback.core.head_sample import HeadSamples
from sts_callback.core.heldout import paired_change, sequence_nll, split_head


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def small_top(monkeypatch):
    # the tiny vocabulary (~100 tokens) would fit inside Gemma-sized top 32: keep the tail large, as on a real model
    monkeypatch.setattr(lm_head.HeadInPrecision, "exact_top", 4)
    monkeypatch.setattr(lm_head.HeadInPrecision, "vocab_block", 30)


def sequences(tokenizer, n=16, seed=0):
    out = []
    for text in domain_texts("law", n, seed=seed):
        ids = tokenizer(text)["input_ids"]
        out.append((ids, [True] * (len(ids) - 1)))
    return out


def fine_tune(model, seqs, steps=6, lr=3e-3):
    optimizer = torch.optim.Adam(model.model.layers.parameters(), lr=lr)
    for ids, _ in seqs[:steps]:
        batch = torch.tensor([ids])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def measure(model, seqs, pad, samples=None, head=None, batch_size=4):
    with torch.no_grad():
        return sequence_nll(model.eval(), seqs, pad, batch_size, head_precision=head, head_samples=samples)


@pytest.mark.parametrize("head_dtype", [None, torch.bfloat16])
def test_an_unchanged_model_measures_no_change_and_the_base_pass_is_the_whole_heads_nll(tokenizer, head_dtype,
                                                                                     monkeypatch):
    monkeypatch.setattr(lm_head, "GATHER_ELEMENTS", 2000)  # the exact logits a few rows at a time
    model = make_model("gemma3", vocab_size=len(tokenizer), hidden=32)
    model.config.final_logit_softcapping = 3.0
    seqs, pad = sequences(tokenizer), tokenizer.pad_token_id
    precision = lm_head.HeadInPrecision(head_dtype) if head_dtype else None
    samples = HeadSamples(tail=8, seed="t")
    base = measure(model, seqs, pad, samples, precision)
    assert sorted(samples.by_sequence) == list(range(len(seqs)))
    assert all(len(samples.by_sequence[i]) == int(base[i, 1]) for i in range(len(seqs)))
    torch.testing.assert_close(base, measure(model, seqs, pad), rtol=2e-3 if head_dtype else 1e-5, atol=1e-4)
    samples.recording = False
    again = measure(model, seqs, pad, samples, precision)
    assert torch.equal(again, base)
    assert paired_change(base, again).delta == 0


def test_the_sampled_head_measures_a_fine_tunes_change_as_the_whole_head_does(tokenizer):
    model = make_model("gemma3", vocab_size=len(tokenizer), hidden=32)
    seqs, pad = sequences(tokenizer, n=24), tokenizer.pad_token_id
    samples = HeadSamples(tail=16, seed="t")
    base_sampled, base_whole = measure(model, seqs, pad, samples), measure(model, seqs, pad)
    fine_tune(model, seqs)
    samples.recording = False
    whole = paired_change(base_whole, measure(model, seqs, pad))
    sampled = paired_change(base_sampled, measure(model, seqs, pad, samples))
    assert abs(whole.delta) > 0.01  # a real change to measure
    assert abs(sampled.delta - whole.delta) < 0.1 * abs(whole.delta)
    assert sampled.low < whole.delta < sampled.high
    assert samples.fallbacks == 0  # an ordinary fine-tune is read from the sample, not the whole head


def test_mass_moved_onto_tokens_the_sample_never_saw_is_measured_with_the_whole_head(tokenizer):
    """Training that raises tokens the base ranked low and the tail never drew: the sample cannot see where the
    mass went and read the loss far too low (a harmed domain measured as improved); the spaced check against the
    whole head catches it and the batch is measured whole."""
    model = make_model("llama", vocab_size=2048, hidden=32)
    seqs, pad = sequences(tokenizer, n=16), tokenizer.pad_token_id
    samples = HeadSamples(tail=8, seed="t")
    base = measure(model, seqs, pad, samples)
    samples.recording = False
    body, head, _ = split_head(model)
    with torch.no_grad():
        hidden = torch.cat([body(input_ids=torch.tensor([ids])).last_hidden_state[0] for ids, _ in seqs])
        direction = hidden.mean(0) / hidden.mean(0).norm() ** 2
        raised = torch.randperm(2048, generator=torch.Generator().manual_seed(0))[:300] + 0
        head.weight[raised[raised >= len(tokenizer)]] += 8 * direction  # ~8 nats more for 300 unseen tokens
    whole = paired_change(base, measure(model, seqs, pad))
    sampled = paired_change(base, measure(model, seqs, pad, samples))
    assert whole.delta > 0.1  # the loss rose a lot
    assert sampled.delta == pytest.approx(whole.delta, abs=1e-4)
    assert samples.fallbacks > 0
    # a rank's padded copies (run for lockstep, uncounted) add nothing to the count: one process counted 1, two 2
    counted = samples.fallbacks
    with torch.no_grad():
        sequence_nll(model.eval(), seqs, pad, 4, head_samples=samples, duplicates=[True] * len(seqs))
    assert samples.fallbacks == counted


def test_more_tail_draws_bring_each_tokens_nll_closer_to_the_whole_heads(tokenizer):
    model = make_model("gemma3", vocab_size=len(tokenizer), hidden=32)
    seqs, pad = sequences(tokenizer, n=8), tokenizer.pad_token_id
    tails = (2, 16, 256)
    recorded = {tail: HeadSamples(tail=tail, seed="t") for tail in tails}
    for samples in recorded.values():
        measure(model, seqs, pad, samples)
    fine_tune(model, seqs)
    body, head, softcap = split_head(model)
    errors = {}
    with torch.no_grad():
        for tail, samples in recorded.items():
            gaps = []
            for i, (ids, _) in enumerate(seqs):
                hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1]
                targets = torch.tensor(ids[1:])
                whole = lm_head.exact_nll(head(hidden).float(), softcap, targets)
                sampled = head_sample.sampled_nll(head, softcap, hidden, targets, samples.by_sequence[i])
                gaps.append((sampled - whole).abs())
            errors[tail] = float(torch.cat(gaps).mean())
    assert errors[2] > errors[16] > errors[256]
    assert errors[256] < 0.1 * errors[2]


def test_a_change_that_moves_the_base_mass_away_from_peaked_logits_is_measured_exactly():
    # logits 0, -1000, -2000, ...: every probability but the first underflows; training then lowers token 0 by 100
    # and raises token 1 by 100, so nearly all the base's mass leaves (the sum in probability space is -1)
    vocab = 64
    head = nn.Linear(1, vocab, bias=False)
    with torch.no_grad():
        head.weight[:, 0] = -1000.0 * torch.arange(vocab, dtype=torch.float32)
    hidden, targets = torch.ones(1, 1), torch.tensor([1])
    base, sample = head_sample.record(None, head, None, hidden, targets, torch.rand(1, 32))
    assert base.tolist() == [1000.0]
    with torch.no_grad():
        head.weight[0, 0] -= 100.0
        head.weight[1, 0] += 100.0
    exact = nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    assert exact.tolist() == [800.0]
    assert head_sample.sampled_nll(head, None, hidden, targets, sample).tolist() == pytest.approx([800.0])


def test_tail_draws_follow_the_base_probabilities_outside_the_top():
    torch.manual_seed(0)
    head = nn.Linear(16, 90, bias=True)
    hidden = torch.randn(3, 16) * 2
    targets = torch.tensor([0, 5, 7])
    draws = 6000
    uniforms = HeadSamples(tail=draws, seed="d").uniforms(0, len(hidden))
    with torch.no_grad():
        _, sample = head_sample.record(None, head, None, hidden, targets, uniforms)
        probabilities = torch.softmax(head(hidden).double(), 1)
    top = sample.top
    for row in range(len(hidden)):
        ids = sample.ids[row].long()
        assert set(ids[:top].tolist()) == set(probabilities[row].topk(top).indices.tolist())
        tail_ids = ids[top:]
        assert not set(tail_ids.tolist()) & set(ids[:top].tolist())  # the top is never drawn
        expected = probabilities[row].clone()
        expected[ids[:top]] = 0
        expected /= expected.sum()
        frequency = torch.bincount(tail_ids, minlength=90).double() / draws
        assert (frequency - expected).abs().max() < 0.01  # stratified draws: close to the distribution


def test_the_draws_do_not_depend_on_how_sequences_are_batched(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    seqs, pad = sequences(tokenizer, n=10), tokenizer.pad_token_id
    one, five = HeadSamples(tail=8, seed="b"), HeadSamples(tail=8, seed="b")
    measure(model, seqs, pad, one, batch_size=1)
    measure(model, seqs, pad, five, batch_size=5)
    for i in range(len(seqs)):
        assert torch.equal(one.by_sequence[i].ids, five.by_sequence[i].ids)


def test_a_head_that_is_not_a_plain_linear_layer_is_measured_whole(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    model.lm_head = nn.Sequential(model.lm_head)  # as an adapter wrapping the head would be
    seqs, pad = sequences(tokenizer, n=6), tokenizer.pad_token_id
    samples = HeadSamples(tail=8, seed="a")
    torch.testing.assert_close(measure(model, seqs, pad, samples), measure(model, seqs, pad))
    assert not samples.by_sequence


def test_head_samples_survive_a_save_and_load():
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    head = nn.Linear(8, 50)
    samples = HeadSamples(tail=4, seed="s")
    for key, rows in ((3, 5), (7, 2)):
        hidden = torch.randn(rows, 8)
        with torch.no_grad():
            targets = torch.zeros(rows, dtype=torch.long)
            _, samples.by_sequence[key] = head_sample.record(None, head, None, hidden, targets,
                                                             samples.uniforms(key, rows))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_file(samples.state_dict(), f"{folder}/s.safetensors")
        again = HeadSamples.from_state_dict(load_file(f"{folder}/s.safetensors"), seed="s")
    assert not again.recording and again.tail == 4 and sorted(again.by_sequence) == [3, 7]
    for key in (3, 7):
        for field in ("ids", "logits", "weights", "lse"):
            assert torch.equal(getattr(again.by_sequence[key], field), getattr(samples.by_sequence[key], field))


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "32"])
def test_a_bad_number_of_tail_draws_is_refused_at_construction(value):
    from sts_callback.core.errors import STSConfigError
    from sts_callback.integrations.callback import STSCallback

    with pytest.raises(STSConfigError, match="loss_head_samples must be None"):
        STSCallback(sae=None, target_domains={}, loss_head_samples=value)


def test_a_small_vocabulary_or_a_head_inside_the_forward_is_read_whole():
    """A 128-token head sampled 65 tokens a row read a large step's change a point off (DDP), while ZeRO-3, whose
    sharded head runs inside the full forward, read it whole: one run, two answers by backend. Sampling saves nothing
    on a small head; a head that cannot run apart is read whole and recorded so."""
    from sts_callback.core.heldout import SAMPLED_HEAD_MIN_VOCAB, resolve_head_samples

    assert resolve_head_samples(32, make_model("llama", vocab_size=128)) is None
    large = make_model("llama", vocab_size=SAMPLED_HEAD_MIN_VOCAB, hidden=16, layers=1)
    assert resolve_head_samples(32, large) == 32 and resolve_head_samples(None, large) is None
    large.config.logit_scale = 2.0  # its logits are more than head(body): the full forward runs
    assert resolve_head_samples(32, large) is None
