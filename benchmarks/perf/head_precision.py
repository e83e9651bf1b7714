"""The LM head and the body in bfloat16 for held-out losses: how much faster, and how far they move a measured change.

    python benchmarks/perf/head_precision.py [--source python_code] [--steps 10] [--tokens 1024]

Gemma 3 270M (float32) is LoRA fine-tuned for ``--steps`` steps (TRL SFTTrainer, r=8 q/v, lr 1e-3, batch 4 x 256:
the overhead benchmark's recipe) on ``--source``. Every built-in domain's held-out sample (``--tokens`` counted
tokens, seeded, built as the callback builds its loss sets) is measured before and after training, each time
in float32, with the head's matmul in bfloat16 (``HeadInPrecision``, what ``loss_head_dtype="auto"`` picks on a
CPU with AVX512-BF16 or AMX; the log-sum-exp stays float32), and with the body under bf16 autocast as well (what
``loss_body_dtype="auto"`` adds), and with the re-check's head sampled (``loss_head_samples``: the base pass keeps
each token's top 32 logits and 32 draws from the rest, the pass after training computes only those rows of the
head; ``sts_callback.core.head_sample``). Reported per domain: the paired change each way, its difference from float32,
and the float32 change's 95% half-width; and the seconds of the passes before (the base pass; for the sampled
head, recording) and after training (a re-check's pass), in one thread (as the overhead benchmark times re-checks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="python_code")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tail", type=int, default=32, help="tail draws per token of the sampled head")
    parser.add_argument("--out", type=Path, default=HERE / "head_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sts_callback.core.corpora import load_domain
    from sts_callback.core.head_sample import HeadSamples
    from sts_callback.core.heldout import HeadInPrecision, paired_change, sequence_nll
    from sts_callback.pipelines.forecast import inference_mode
    from sts_callback.tools.models import load_gemma3_270m

    sys.path.insert(0, str(HERE))
    from interval_coverage import held_out_pools

    model, tokenizer = load_gemma3_270m()
    pools = held_out_pools(model, tokenizer, args.tokens, None)
    pad = tokenizer.pad_token_id
    variants = {"float32": (False, None, False), "bf16_head": (True, None, False),
                "bf16_head_body": (True, torch.bfloat16, False), "sampled_head": (True, torch.bfloat16, True)}
    samples = {name: HeadSamples(tail=args.tail, seed=name) for name in pools}
    seconds = {when: dict.fromkeys(variants, 0.0) for when in ("before", "after")}

    def measure(current, when: str) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {label: {} for label in variants}
        with inference_mode(current):
            for label, (low_head, body_dtype, sampled) in variants.items():
                head = HeadInPrecision(torch.bfloat16) if low_head else None
                began = time.perf_counter()
                for name, seqs in pools.items():
                    if sampled:
                        samples[name].recording = when == "before"
                    out[label][name] = sequence_nll(current, seqs, pad, 4, head_precision=head, body_dtype=body_dtype,
                                                    head_samples=samples[name] if sampled else None)
                seconds[when][label] += time.perf_counter() - began
        return out

    before = measure(model, "before")
    print("measured before training: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds["before"].items()),
          flush=True)
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(Path("outputs") / "head_precision"),
                                                     max_steps=args.steps, save_strategy="no",
                                                     per_device_train_batch_size=4, max_length=256, learning_rate=1e-3,
                                                     use_cpu=True, report_to=[], disable_tqdm=True, seed=0),
                         train_dataset=Dataset.from_dict({"text": load_domain(args.source)[0::2]}),
                         processing_class=tokenizer, peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    after = measure(trainer.model, "after")
    tokens = sum(int(s[:, 1].sum()) for s in before["float32"].values())

    rows = {}
    print(f"\n{'domain':<18} {'float32':>9} {'bf16 head':>9} {'diff':>9} {'+ body':>9} {'diff':>9} {'sampled':>9} "
          f"{'diff':>9} {'f32 95% +-':>10}")
    for name in pools:
        changes = {label: paired_change(before[label][name], after[label][name]) for label in variants}
        exact = changes["float32"]
        rows[name] = {label: change.delta for label, change in changes.items()}
        rows[name].update({f"difference_{label}": change.delta - exact.delta for label, change in changes.items()
                           if label != "float32"})
        rows[name].update(half_width=exact.half_width, tokens=exact.tokens)
        print(f"{name:<18} {exact.delta:>+9.4%} " + " ".join(
            f"{rows[name][label]:>+9.4%} {rows[name]['difference_' + label]:>+9.4%}" for label in variants
            if label != "float32") + f" {exact.half_width:>10.3%}")
    passes = tokens  # each of before and after
    total = {label: seconds["before"][label] + seconds["after"][label] for label in variants}
    summary = {}
    for label in variants:
        if label == "float32":
            continue
        differences = [abs(r[f"difference_{label}"]) for r in rows.values()]
        summary[label] = {
            "largest_difference": max(differences),
            "largest_relative_difference": max(abs(r[f"difference_{label}"] / r["float32"]) for r in rows.values()
                                               if r["float32"]),
            "largest_share_of_half_width": max(abs(r[f"difference_{label}"]) / r["half_width"] for r in rows.values()),
            "speedup": total["float32"] / total[label],
            "recheck_speedup": seconds["after"]["float32"] / seconds["after"][label]}
        print(f"\n{label}: largest difference {summary[label]['largest_difference']:.4%} (absolute), "
              f"{summary[label]['largest_relative_difference']:.2%} of the change, "
              f"{summary[label]['largest_share_of_half_width']:.3f} of the float32 interval's half-width; "
              f"before {seconds['before'][label]:.0f} s, after {seconds['after'][label]:.0f} s "
              f"({passes / seconds['after'][label]:.0f} tok/s); {summary[label]['speedup']:.2f}x both passes, "
              f"{summary[label]['recheck_speedup']:.2f}x the pass after training (a re-check's)")
    print(f"float32: before {seconds['before']['float32']:.0f} s, after {seconds['after']['float32']:.0f} s "
          f"({passes / seconds['after']['float32']:.0f} tok/s); {passes} tokens per pass, {args.threads} thread(s)")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
              "args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
              "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "domains": rows, "variants": summary,
              "tokens_per_pass": tokens, "seconds": total,
              "seconds_before": seconds["before"], "seconds_after": seconds["after"]}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
