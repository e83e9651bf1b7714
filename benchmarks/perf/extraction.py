"""Extraction throughput and memory: our streaming path vs a naive reference-style path.

    python benchmarks/perf/extraction.py [--tokens 5000 20000 80000] [--out benchmarks/perf/extraction.json]
    python benchmarks/perf/extraction.py --mmap-threshold 65536 --out benchmarks/perf/extraction_mmap.json

Ours: forward stopped after the hooked layer, SAE encode of the counted tokens only, per-latent float64
sums. Naive (mirrors the reference implementation): full forward (all layers and the LM head), dense
latents of every token kept, statistics computed at the end. Both run on Gemma 3 270M at layer 12 with the
demo SAE, on the same texts. Peak extra memory is the growth of the process's peak RSS during the run,
measured in a fresh subprocess per (method, size).

``--mmap-threshold BYTES`` runs the subprocesses with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed: by default glibc
raises the threshold after large frees, so later tensors come from the heap, whose freed space the process keeps;
that fragmentation, not data the path holds, is what makes the default peak grow with the token count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
import torch
from sts_callback.core.capture import ResidualCapture
from sts_callback.core.corpora import load_domain
from sts_callback.tools.demo import DEMO_LAYER, ensure_demo_sae
from sts_callback.core.extract import Extractor
from sts_callback.tools.models import load_gemma3_270m
from sts_callback.core.sae import load_sae
from sts_callback.core.stats import ActivationStats

method, budget = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model, tokenizer = load_gemma3_270m()
sae = load_sae(ensure_demo_sae(model, tokenizer, log=lambda *a: None))
texts = [t for name in ("python_code", "legal", "math", "ml_docs") for t in load_domain(name)]
sequences, total = [], 0
for text in texts:
    ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
    sequences.append((ids, [False] + [True] * (len(ids) - 1)))
    total += len(ids) - 1
    if total >= budget:
        break
with torch.no_grad():  # warm-up (allocator, kernels) outside the measurement
    model(input_ids=torch.tensor([sequences[0][0][:32]]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if method == "ours":
    extractor = Extractor(model, sae, DEMO_LAYER, batch_size=8, truncate=True, pad_token_id=0)
    stats = extractor.activations(sequences).latents
    checksum = float(stats.sum.sum())
else:
    capture = ResidualCapture(model, DEMO_LAYER, truncate=False)
    capture._logits_to_keep = False  # the reference runs the whole model, head included
    dense = []
    with torch.no_grad():
        for i in range(0, len(sequences), 8):
            batch = sequences[i:i + 8]
            longest = max(len(s) for s, _ in batch)
            ids = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (s, _) in enumerate(batch):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            resid = capture(ids, mask)
            for row, (s, flags) in enumerate(batch):
                dense.append(sae.encode(resid[row, :len(s)]).float())  # every token's dense latents
        latents = torch.cat(dense)
        keep = torch.tensor([f for _, flags in sequences for f in flags])
        stats = ActivationStats(sae.d_sae)
        stats.update(latents[keep].double())
        checksum = float(stats.sum.sum())
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"method": method, "tokens": int(stats.tokens), "seconds": seconds,
                  "tokens_per_second": stats.tokens / seconds, "peak_extra_mb": (after - before) / 1024,
                  "checksum": checksum}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[5_000, 20_000, 80_000])
    parser.add_argument("--methods", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="run with MALLOC_MMAP_THRESHOLD_ fixed to this many bytes (glibc)")
    parser.add_argument("--out", default="benchmarks/perf/extraction.json")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    rows = []
    for budget in args.tokens:
        for method in args.methods:
            out = subprocess.run([sys.executable, "-c", WORKER, method, str(budget)], capture_output=True,
                                 text=True, check=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{method:>6} {budget:>7} tokens: {rows[-1]['tokens_per_second']:8.0f} tok/s, "
                  f"peak extra {rows[-1]['peak_extra_mb']:8.0f} MB", flush=True)
    print(f"\n{'tokens':>7} {'ours tok/s':>11} {'naive tok/s':>12} {'speed-up':>9} {'ours MB':>8} {'naive MB':>9} "
          f"{'mem ratio':>10} {'same sums':>10}")
    for budget in args.tokens:
        ours = next((r for r in rows if r["method"] == "ours" and budget * 0.9 <= r["tokens"] <= budget * 1.2), None)
        naive = next((r for r in rows if r["method"] == "naive" and ours and r["tokens"] == ours["tokens"]), None)
        if ours is None or naive is None:
            continue
        same = abs(ours["checksum"] - naive["checksum"]) <= 1e-4 * abs(naive["checksum"])
        print(f"{ours['tokens']:>7} {ours['tokens_per_second']:>11.0f} {naive['tokens_per_second']:>12.0f} "
              f"{ours['tokens_per_second'] / naive['tokens_per_second']:>8.2f}x {ours['peak_extra_mb']:>8.0f} "
              f"{naive['peak_extra_mb']:>9.0f} {naive['peak_extra_mb'] / max(ours['peak_extra_mb'], 1):>9.1f}x "
              f"{str(same):>10}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or ''} "
              f"{os.cpu_count()} cores, CPU", "malloc_mmap_threshold": args.mmap_threshold, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
