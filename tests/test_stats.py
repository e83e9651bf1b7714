"""Streaming statistics: merge, state round trip, and memory that does not grow with tokens."""

import json
import subprocess
import sys
import textwrap

import torch

from sts_callback.core.stats import ActivationStats, ShiftStats


def test_streaming_equals_one_batch_and_merge():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1000, 50, generator=generator, dtype=torch.float64)
    ctx = torch.rand(1000, 50, generator=generator, dtype=torch.float64)
    whole, whole_shift = ActivationStats(50), ShiftStats(50)
    whole.update(base)
    whole_shift.update(base, ctx)
    parts, part_shifts = [], []
    for chunk_b, chunk_c in zip(base.split(137), ctx.split(137)):
        s, sh = ActivationStats(50), ShiftStats(50)
        s.update(chunk_b)
        sh.update(chunk_b, chunk_c)
        parts.append(s)
        part_shifts.append(sh)
    merged, merged_shift = parts[0], part_shifts[0]
    for s, sh in zip(parts[1:], part_shifts[1:]):
        merged.merge(s)
        merged_shift.merge(sh)
    torch.testing.assert_close(merged.sum, whole.sum)
    torch.testing.assert_close(merged.sum_sq, whole.sum_sq)
    torch.testing.assert_close(merged_shift.mean_shift(), ((ctx - base) ** 2).mean(0))
    torch.testing.assert_close(merged_shift.mean_diff(), (ctx - base).mean(0))
    assert merged.tokens == 1000 and merged_shift.tokens == 1000


def test_state_round_trip():
    stats = ActivationStats(8)
    stats.update(torch.arange(16.0).reshape(2, 8))
    restored = ActivationStats.from_state_dict(stats.state_dict())
    torch.testing.assert_close(restored.sum, stats.sum)
    assert restored.tokens == 2


def test_stats_groups_merge_and_round_trip_by_their_declared_fields():
    from sts_callback.core.extract import PairedStats
    from sts_callback.pipelines.monitor import DomainBaseline

    def paired(seed):
        rows = torch.rand(20, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        group = PairedStats(ActivationStats(8), ActivationStats(4), ShiftStats(8), ShiftStats(4))
        group.latents.update(rows)
        group.residual.update(rows[:, :4])
        group.latent_shift.update(rows, rows * 2)
        group.residual_shift.update(rows[:, :4], rows[:, :4] + 1)
        return group

    merged = paired(0).merge(paired(1))
    assert merged.latents.tokens == 40 and merged.residual_shift.tokens == 40
    state = merged.state_dict()
    assert sorted({k.split("/")[0] for k in state}) == ["latent_shift", "latents", "residual", "residual_shift"]
    again = PairedStats.from_state_dict(state)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    base = DomainBaseline.from_state_dict({k: v for k, v in state.items() if k.startswith("latents/")})
    assert base.latent_shift is None and torch.equal(base.latents.sum, merged.latents.sum)


def test_float32_rows_are_summed_in_float64():
    """2 million float32 additions of 1e-4 drift by ~1e-2 in float32; in float64 they are exact to 1e-9."""
    stats = ActivationStats(1)
    value = torch.tensor(1e-4, dtype=torch.float32)
    block = value.expand(200_000, 1).contiguous()
    for _ in range(10):
        stats.update(block)
    assert stats.sum.dtype == torch.float64
    assert abs(float(stats.sum) - 2_000_000 * float(value)) < 1e-9 * 200


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, "tests")
    import torch
    from tiny import TinySAE, domain_texts, make_model, make_tokenizer
    from sts_callback import STSConfig, forecast
    tokens = int(sys.argv[1])
    model, tokenizer = make_model("llama"), make_tokenizer()
    sae = TinySAE(32, 16384, hook_name="blocks.1.hook_resid_post")
    config = STSConfig(n_shifted=10, shift_tokens=tokens, domain_tokens=tokens, compute_icl=False,
                       ranking="sts_act", batch_size=8)
    texts = domain_texts("law", n=2000, length=40)
    forecast(model, tokenizer, sae, texts[:40], {"d": texts[40:80]}, STSConfig(n_shifted=10, shift_tokens=50,
             domain_tokens=50, compute_icl=False, ranking="sts_act"))  # warm-up: allocator, lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = forecast(model, tokenizer, sae, texts, {"d": texts}, config)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": result.shift_tokens + result.domains["d"].tokens, "growth_kb": after - before}))
""")


def test_peak_memory_does_not_grow_with_tokens():
    """A dense [tokens x 16384] float32 matrix would be 64 KB per token: 12,000 tokens = 750 MB."""
    results = []
    for tokens in (500, 6_000):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tokens)], capture_output=True, text=True,
                             check=True, timeout=300)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = results
    assert large["tokens"] > 10 * small["tokens"] / 2
    dense_kb = (large["tokens"] - small["tokens"]) * 16384 * 4 / 1024
    assert large["growth_kb"] - small["growth_kb"] < dense_kb / 10, (results, dense_kb)


def test_half_precision_rows_are_summed_without_overflow_or_rounding():
    """fp16 rows above 256 squared to inf before the float64 sum; bf16 ones rounded 1.001 to 1."""
    rows = torch.tensor([[300.0, 1.0], [300.0, 1.0]])
    for dtype in (torch.float16, torch.bfloat16):
        stats, shift = ActivationStats(2), ShiftStats(2)
        stats.update(rows.to(dtype))
        shift.update(torch.zeros(2, 2, dtype=dtype), rows.to(dtype))
        expected = 2 * rows[0].double().to(dtype).double().square()
        assert torch.isfinite(stats.sum_sq).all() and torch.allclose(stats.sum_sq, expected, rtol=1e-6)
        assert torch.allclose(shift.sum_sq_diff, expected, rtol=1e-6)
