"""The capture path against this machine's physical limit, and where its time goes.

    python benchmarks/perf/physical_limit.py [--tokens 20000] [--out benchmarks/perf/physical_limit.json]

1. Measures this machine's fp32 matmul rate (torch.mm on the shapes the capture path multiplies, and a large
   square one; best of several repeats).
2. Counts the FLOPs the capture path must do for the benchmark's tokens: the forward of Gemma 3 270M up to
   layer 12 (projections, MLP, causal attention over the real, unpadded tokens) plus the SAE encoder on the
   counted tokens. The FLOPs actually executed (padding and full attention squares included) are counted
   with ``torch.utils.flop_counter.FlopCounterMode`` on the same batches.
3. Times ``Extractor.activations`` on those tokens: achieved rate, and the floor (FLOPs / matmul rate).
4. Profiles a few batches with ``torch.profiler``: the share of time per operator family.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch


def matmul_rate(repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of fp32 torch.mm on representative shapes, best of ``repeats``."""
    shapes = {"2048x640 @ 640x2048 (MLP up)": (2048, 640, 2048), "2048x2048 @ 2048x640 (MLP down)": (2048, 2048, 640),
              "512x640 @ 640x4096 (SAE encoder)": (512, 640, 4096), "2048x2048 @ 2048x2048": (2048, 2048, 2048)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - start) / 4)
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


def required_flops(config, layer: int, lengths: list[int], counted_tokens: int, d_sae: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) the capture path cannot avoid: unpadded tokens, causal attention."""
    d, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    tokens = sum(lengths)
    projections = 2 * tokens * d * (heads * head_dim + 2 * kv_heads * head_dim) + 2 * tokens * heads * head_dim * d
    mlp = 3 * 2 * tokens * d * inter
    attention = 0.0
    for kind in layer_types[: layer + 1]:
        span = window if (kind == "sliding_attention" and window) else None
        # each query attends to its causal prefix (capped by the window): QK^T and AV, 2 FLOPs per MAC each
        keys = sum(sum(min(i + 1, span) if span else i + 1 for i in range(n)) for n in lengths)
        attention += 2 * 2 * keys * heads * head_dim
    blocks = layer + 1
    sae = 2 * counted_tokens * d * d_sae
    return {"projections": projections * blocks, "mlp": mlp * blocks, "attention": attention, "sae_encoder": sae,
            "total": projections * blocks + mlp * blocks + attention + sae}


FAMILIES = (("matmul", ("mm", "addmm", "bmm", "matmul", "linear")), ("attention", ("scaled_dot_product", "softmax")),
            ("SAE top-k / scatter", ("topk", "scatter", "relu")),
            ("statistics (float64 sums)", ("sum", "square", "_to_copy", "copy_")),
            ("elementwise + norms", ("mul", "add", "rsqrt", "pow", "mean", "gelu", "tanh", "div", "sub", "neg",
                                     "cat", "rms")),
            ("indexing / masks", ("index", "where", "arange", "expand", "masked", "full", "zeros", "embedding",
                                  "lt", "le", "gt", "ge", "eq", "and", "fill")))


def family(op: str) -> str:
    name = op.replace("aten::", "").lstrip("_")
    for label, keys in FAMILIES:
        if any(name == k or name.startswith(k) for k in keys):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--profile-batches", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/perf/physical_limit.json")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from sts_callback.core.corpora import load_domain
    from sts_callback.tools.demo import DEMO_LAYER, ensure_demo_sae
    from sts_callback.core.extract import Extractor
    from sts_callback.tools.models import load_gemma3_270m
    from sts_callback.core.sae import load_sae

    torch.manual_seed(0)
    rates = matmul_rate()
    peak = max(rates.values())
    print("fp32 matmul rate (GFLOP/s, best of 5):")
    for name, rate in rates.items():
        print(f"  {name:<34} {rate:8.1f}")

    model, tokenizer = load_gemma3_270m()
    model.eval()
    sae = load_sae(ensure_demo_sae(model, tokenizer, log=lambda *a: None))
    texts = [t for name in ("python_code", "legal", "math", "ml_docs") for t in load_domain(name)]
    sequences, total = [], 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        sequences.append((ids, [False] + [True] * (len(ids) - 1)))
        total += len(ids) - 1
        if total >= args.tokens:
            break
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    need = required_flops(config, DEMO_LAYER, [len(s) for s, _ in sequences], total, sae.d_sae)

    extractor = Extractor(model, sae, DEMO_LAYER, batch_size=8, truncate=True, pad_token_id=0)
    extractor.activations(sequences[:8])  # warm-up outside the measurement
    start = time.perf_counter()
    extractor.activations(sequences)
    seconds = time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        extractor.activations(sequences[: max(16, len(sequences) // 4)])
    counted_part = sum(len(s) for s, _ in sequences[: max(16, len(sequences) // 4)])
    executed_per_token = counter.get_total_flops() / counted_part  # matmuls and SDPA as run, padding included

    times: dict[str, float] = defaultdict(float)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        extractor.activations(sequences[: 8 * args.profile_batches])
    for event in prof.key_averages():
        times[family(event.key)] += event.self_cpu_time_total
    profiled = sum(times.values())
    top_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]

    floor = need["total"] / (peak * 1e9)
    all_tokens = sum(len(s) for s, _ in sequences)
    print(f"\n{total} counted tokens ({all_tokens} with each text's first token), {len(sequences)} texts, "
          f"layer {DEMO_LAYER} of {config.num_hidden_layers}, SAE width {sae.d_sae}")
    print(f"{'FLOPs the path must do':<40} {need['total'] / 1e9:10.1f} GFLOP "
          f"({need['total'] / total / 1e6:.1f} MFLOP per counted token)")
    for part in ("projections", "mlp", "attention", "sae_encoder"):
        print(f"  {part:<38} {need[part] / 1e9:10.1f} GFLOP ({need[part] / need['total']:.0%})")
    print(f"{'FLOPs executed (FlopCounterMode)':<40} {executed_per_token / 1e6:10.1f} MFLOP per token "
          f"(vs {need['total'] / all_tokens / 1e6:.1f} required)")
    print(f"{'measured time':<40} {seconds:10.2f} s ({total / seconds:.0f} tokens/s)")
    print(f"{'floor at the best matmul rate':<40} {floor:10.2f} s ({peak:.0f} GFLOP/s)")
    print(f"{'achieved':<40} {need['total'] / seconds / 1e9:10.1f} GFLOP/s = {floor / seconds:.0%} of the floor")
    print("\nwhere the time goes (torch.profiler, self CPU time):")
    for name, value in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<30} {value / profiled:6.1%}")
    print("\ntop operators:")
    for event in top_ops:
        print(f"  {event.key:<40} {event.self_cpu_time_total / profiled:6.1%}  calls {event.count}")

    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, CPU, torch "
                         f"{torch.__version__}, {torch.get_num_threads()} threads",
              "matmul_gflops": rates, "peak_gflops": peak, "counted_tokens": total, "tokens": all_tokens,
              "texts": len(sequences), "required_flops": need, "executed_flops_per_token": executed_per_token,
              "seconds": seconds, "tokens_per_second": total / seconds, "floor_seconds": floor,
              "achieved_gflops": need["total"] / seconds / 1e9, "fraction_of_floor": floor / seconds,
              "time_share": {k: v / profiled for k, v in times.items()},
              "top_operators": [{"op": e.key, "share": e.self_cpu_time_total / profiled, "calls": e.count}
                                for e in top_ops]}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
