"""Callback overhead: a short LoRA SFT (TRL) on Gemma 3 270M with and without STSCallback at default settings.

    python benchmarks/perf/callback_overhead.py [--steps 20] [--save-steps 10] [--out benchmarks/perf/callback_overhead.json]

Each run is a fresh subprocess (same data order, same seed). The callback runs with its defaults (the forecast
config's defaults, re-check at every checkpoint save, 2048 probe tokens, 1024 held-out tokens per domain) on
four target domains. Reported: training time without the callback, the forecast at train start (a one-off),
the time of each re-check, re-check time as a percentage of the training time at this run's save interval,
and projected at the Trainer's default interval (``save_steps=500``) from the measured per-step time.
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
import json, sys, time, tempfile
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from sts_callback.integrations.callback import STSCallback
from sts_callback.core.corpora import load_domain
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.tools.models import load_gemma3_270m

with_callback, steps, save_steps, batch, length = sys.argv[1] == "with", *map(int, sys.argv[2:6])
model, tokenizer = load_gemma3_270m()
sae = ensure_demo_sae(model, tokenizer, log=lambda *a: None)
texts = load_domain("python_code")[0::2]
callbacks = []
if with_callback:
    sts = STSCallback(sae=str(sae), target_domains=["python_code", "math", "legal", "readme_prose"], protected=["legal"])
    callbacks.append(sts)
out = tempfile.mkdtemp()
trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=out, max_steps=steps, save_steps=save_steps,
                     per_device_train_batch_size=batch, max_length=length, learning_rate=1e-3, use_cpu=True,
                     report_to=[], disable_tqdm=True, logging_steps=steps, seed=0),
                     train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer,
                     peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), callbacks=callbacks)
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
result = {"with_callback": with_callback, "train_seconds": seconds}
if with_callback:
    result["forecast_seconds"] = sts.forecast.timings["total"]
    result["recheck_seconds"] = [r["seconds"] for r in sts.history]
    result["recheck_steps"] = [r["step"] for r in sts.history]
    result["errors"] = [r["error"] for r in sts.history if "error" in r]
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/perf/callback_overhead.json")
    args = parser.parse_args()
    runs = {}
    for mode in ("without", "with"):
        done = subprocess.run([sys.executable, "-c", WORKER, mode, str(args.steps), str(args.save_steps),
                               str(args.batch_size), str(args.max_length)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode:>7} callback: {runs[mode]['train_seconds']:.0f} s", flush=True)
    base, sts = runs["without"], runs["with"]
    step_seconds = base["train_seconds"] / args.steps
    recheck = sts["recheck_seconds"]
    per_recheck = sum(recheck) / max(len(recheck), 1)
    share = sum(recheck) / base["train_seconds"]
    projected = per_recheck / (500 * step_seconds)
    rest = sts["train_seconds"] - base["train_seconds"] - sts["forecast_seconds"] - sum(recheck)
    print(f"\n{'training without the callback':<46} {base['train_seconds']:8.1f} s ({step_seconds:.1f} s/step, "
          f"{args.steps} steps, batch {args.batch_size} x {args.max_length})")
    print(f"{'training with the callback':<46} {sts['train_seconds']:8.1f} s")
    print(f"{'  forecast at train start (one-off)':<46} {sts['forecast_seconds']:8.1f} s")
    print(f"{'  re-checks at steps ' + str(sts['recheck_steps']):<46} {sum(recheck):8.1f} s "
          f"({per_recheck:.1f} s each)")
    print(f"{'  other (base losses at start, saving, noise)':<46} {rest:8.1f} s")
    print(f"{'re-check time / training time, save every ' + str(args.save_steps):<46} {share:8.1%}")
    print(f"{'same, projected at save_steps=500 (default)':<46} {projected:8.2%}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
              "args": vars(args), "runs": runs, "step_seconds": step_seconds, "recheck_seconds_each": per_recheck,
              "recheck_share": share, "recheck_share_at_save_steps_500": projected, "other_seconds": rest,
              "errors": sts.get("errors")}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
