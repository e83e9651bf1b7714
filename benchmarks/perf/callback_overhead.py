"""Callback overhead: a short LoRA SFT (TRL) on Gemma 3 270M with and without STSCallback, re-checking every 10 steps.

    python benchmarks/perf/callback_overhead.py [--steps 30] [--every 10] [--settings '{"loss_tokens": 1024}']

Each run is a fresh subprocess (same data order, same seed). The callback runs with its defaults (or the JSON
``--settings`` given: STSCallback arguments) on four target domains, ``legal`` protected, re-checking every
``--every`` steps. Reported: training time without the callback, the forecast at train start (a one-off), each
re-check's time and its parts (probe shift and SAE fit, held-out losses, accuracy), re-check time as a share of
the training time (the measurement, and the callback's whole ``on_step_end`` at a re-check: with the history, the
projection and the report it writes), and the coverage of each domain's stated 95% interval: after every
re-check each domain's change is measured again on ``--truth-tokens`` held-out tokens (the same seeded sample,
larger; not timed), and the share of (re-check, domain) points whose 4,096-token change lies in the re-check's interval is the coverage.
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
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from sts_callback.integrations.callback import STSCallback
from sts_callback.core.corpora import load_domain
from sts_callback.core.heldout import all_sequence_nll, paired_change
from sts_callback.pipelines.forecast import inference_mode
from sts_callback.pipelines.monitor import Monitor
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.tools.models import load_gemma3_270m

with_callback, steps, every, batch, length, truth_tokens = sys.argv[1] == "with", *map(int, sys.argv[2:7])
settings = json.loads(sys.argv[7])
model, tokenizer = load_gemma3_270m()
sae = ensure_demo_sae(model, tokenizer, log=lambda *a: None)
texts = load_domain("python_code")[0::2]
DOMAINS = ["python_code", "math", "legal", "readme_prose"]


class Truth(TrainerCallback):
    # After each STS re-check: every domain's change on truth_tokens held-out tokens (the same seeded sample,
    # a superset of the re-check's), to check the re-check's 95% intervals. Not part of the timed re-checks.
    def __init__(self, sts):
        self.sts, self.sets, self.base, self.points = sts, {}, {}, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        monitor = self.sts.monitor
        domains = {name: load_domain(name) for name in DOMAINS}
        from sts_callback.core.data import load_corpus
        for name in DOMAINS:
            corpus = load_corpus(domains[name], name=name)
            seqs, _ = Monitor.sample_sequences(corpus, monitor.setup, truth_tokens, seed=f"0:heldout:{name}")
            self.sets[name] = seqs
        with inference_mode(model):
            self.base = {n: all_sequence_nll(model, s, tokenizer.pad_token_id, 4) for n, s in self.sets.items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        record = self.sts.history[-1] if self.sts.history else None
        if record is None or record.get("step") != state.global_step or "error" in record:
            return
        # after the step's on_step_end: outside the steps the callback's overhead budget is a share of
        self.measure(record, state, model)

    def measure(self, record, state, model):
        with inference_mode(model):
            for name, seqs in self.sets.items():
                if name not in record["loss_delta_ci"]:  # not in its turn (loss_domains)
                    continue
                change = paired_change(self.base[name], all_sequence_nll(model, seqs, tokenizer.pad_token_id, 4))
                low, high = record["loss_delta_ci"][name]
                self.points.append({"step": state.global_step, "domain": name, "truth": change.delta,
                                    "truth_tokens": change.tokens, "measured": record["loss_delta"][name],
                                    "low": low, "high": high, "tokens": record["loss_tokens"][name],
                                    "covered": low <= change.delta <= high})


class StepClock(TrainerCallback):
    # First in the callback list: its on_step_end runs before the re-check, so (end - begin) is the training
    # step alone, measured in the same process and moment as the re-checks (a busy machine slows both alike).
    def __init__(self):
        self.seconds, self.began = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.began)


clock = StepClock()
callbacks = [clock]
if with_callback:
    sts = STSCallback(sae=str(sae), target_domains=DOMAINS, protected=["legal"], recheck_steps=every,
                      recheck_at_end=False, **settings)
    truth = Truth(sts)
    callbacks += [sts, truth]
    # the callback's whole re-check as the run pays it: the measurement, and the history, projection and report
    step_end, handler_seconds = sts.on_step_end, {}

    def timed_step_end(args, state, control, **kwargs):
        began = time.perf_counter()
        out = step_end(args, state, control, **kwargs)
        handler_seconds[state.global_step] = time.perf_counter() - began
        return out

    sts.on_step_end = timed_step_end
out = tempfile.mkdtemp()
trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=out, max_steps=steps, save_strategy="no",
                     per_device_train_batch_size=batch, max_length=length, learning_rate=1e-3, use_cpu=True,
                     report_to=[], disable_tqdm=True, logging_steps=steps, seed=0),
                     train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer,
                     peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), callbacks=callbacks)
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
result = {"with_callback": with_callback, "train_seconds": seconds, "step_seconds": clock.seconds}
if with_callback:
    result["forecast_seconds"] = sts.forecast.timings["total"]
    result["recheck_seconds"] = [r["seconds"] for r in sts.history]
    result["recheck_wall_seconds"] = [handler_seconds.get(r["step"]) for r in sts.history]
    result["recheck_timings"] = [r.get("timings") for r in sts.history]
    result["recheck_steps"] = [r["step"] for r in sts.history]
    result["loss_tokens"] = [r.get("loss_tokens") for r in sts.history]
    result["probe_tokens"] = [r.get("probe_tokens") for r in sts.history]
    result["measured_domains"] = [sorted(r.get("loss_delta") or {}) for r in sts.history]
    result["loss_head_fallbacks"] = [r.get("loss_head_fallbacks") for r in sts.history]
    result["overhead"] = [r.get("overhead") for r in sts.history]
    result["coverage_points"] = truth.points
    result["errors"] = [r["error"] for r in sts.history if "error" in r]
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="re-check every this many steps")
    parser.add_argument("--truth-tokens", type=int, default=4096)
    parser.add_argument("--settings", default="{}", help="STSCallback arguments as JSON")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/perf/callback_overhead.json")
    parser.add_argument("--runs", default="with", help="'with' (default) or 'without,with' to also time training "
                                                        "without the callback in a second process")
    args = parser.parse_args()
    runs = {}
    for mode in args.runs.split(","):
        done = subprocess.run([sys.executable, "-c", WORKER, mode, str(args.steps), str(args.every),
                               str(args.batch_size), str(args.max_length), str(args.truth_tokens), args.settings],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode:>7} callback: {runs[mode]['train_seconds']:.0f} s", flush=True)
    sts = runs["with"]
    base = runs.get("without")
    # The training steps of the run with the callback, timed around each step (the re-checks excluded): the
    # re-checks' share does not depend on how busy the machine was between two runs.
    step_seconds = sum(sts["step_seconds"]) / len(sts["step_seconds"])
    recheck = sts["recheck_seconds"]
    per_recheck = sum(recheck) / max(len(recheck), 1)
    share = sum(recheck) / sum(sts["step_seconds"])
    wall = [w for w in sts.get("recheck_wall_seconds") or [] if w is not None]
    wall_share = sum(wall) / sum(sts["step_seconds"]) if wall else None
    points = sts["coverage_points"]
    coverage = sum(p["covered"] for p in points) / len(points) if points else None
    parts = {k: sum((t or {}).get(k, 0.0) for t in sts["recheck_timings"]) / max(len(recheck), 1)
             for k in ("probe", "losses", "accuracy")}
    if base is not None:
        print(f"\n{'training without the callback':<46} {base['train_seconds']:8.1f} s")
    print(f"\n{'training steps (timed around each step)':<46} {sum(sts['step_seconds']):8.1f} s ({step_seconds:.1f} "
          f"s/step, {args.steps} steps, batch {args.batch_size} x {args.max_length})")
    print(f"{'train() with the callback':<46} {sts['train_seconds']:8.1f} s")
    print(f"{'  forecast at train start (one-off)':<46} {sts['forecast_seconds']:8.1f} s")
    print(f"{'  re-checks at steps ' + str(sts['recheck_steps']):<46} {sum(recheck):8.1f} s "
          f"({per_recheck:.1f} s each)")
    print(f"{'    probe shift + SAE fit / held-out losses':<46} {parts['probe']:8.1f} s / {parts['losses']:.1f} s each")
    print(f"{'re-check time / training time, every ' + str(args.every) + ' steps':<46} {share:8.1%}  (goal <= 3%)")
    if wall_share is not None:
        print(f"{'  with its files, projection and report':<46} {wall_share:8.1%}  ({sum(wall) / len(wall):.1f} s "
              "each, the callback's on_step_end)")
    spent = (sts.get("overhead") or [None])[-1]
    if spent and spent.get("share") is not None:  # the callback's own account (wall time between re-checks)
        print(f"{'  as the callback counted it (overhead_budget ' + str(spent.get('budget')) + ')':<46} "
              f"{spent['share']:8.1%}")
    if sts.get("measured_domains"):
        print(f"{'  held-out losses measured per re-check':<46} "
              + "; ".join(",".join(names) for names in sts["measured_domains"]))
    if coverage is not None:
        print(f"{'95% intervals covering the ' + str(args.truth_tokens) + '-token change':<46} {coverage:8.1%}  "
              f"({len(points)} re-check x domain points; goal >= 95%)")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
              "args": vars(args), "runs": runs, "step_seconds": step_seconds, "recheck_seconds_each": per_recheck,
              "recheck_parts_each": parts, "recheck_share": share, "recheck_wall_share": wall_share,
              "coverage": coverage,
              "callback_share": (spent or {}).get("share"), "measured_domains": sts.get("measured_domains"),
              "errors": sts.get("errors")}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
