"""A compressed GRPO run as the forecast before RL training (issue 17): the run's first quarter of steps at the rate
that holds its whole learning-rate area, every domain measured after.

    python benchmarks/transfer/rl_proxy.py                      # the 11 KL-held runs not yet on disk (resumable)
    python benchmarks/transfer/rl_proxy.py --only grpo-legal-to-python_code-kl-long
    python benchmarks/transfer/rl_proxy.py --score              # table + rl_proxy.json

On the SFT benchmark a compressed run (``proxy.py``: a quarter of the run's steps at the constant rate holding the
whole schedule's area) orders every source's other domains at r >= 0.85 before training, where every SAE forecast
missed some. GRPO's forecasts here (twelve rounds, ``rl.py`` / ``rl_vs_sft.py``) stay at the family's domain prior
(+0.75 on the 11 KL-held runs). This script runs the same compression for a GRPO run of ``rl.py``: its own prompts,
reward functions, group size, completion length, temperature and KL term, LoRA as the run, seed 0, for a quarter of
its steps at its constant rate times four (the runs use a constant schedule), then each domain's held-out NLL change
on the first ``--tokens`` of ``precise.py``'s sample (the run's own ``measured_precise`` is on all 4,096). One JSON
per run: ``rl_proxy/<run>.json``.

Registered before any run (commit of this file): on the 11 KL-held runs (``grpo-*-kl-long``), the compressed run's
own changes order the other domains' precise final changes at mean Pearson r >= 0.87 (issue 17's bar: the SFT
forecast on the SFT units) and beat the family's domain prior alone (+0.75 in ``rl_vs_sft_precise_kl11_icl.json``)
by >= 0.05.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl  # noqa: E402
import units  # noqa: E402
from proxy import agreement, measured_subset  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl_proxy"
SHARE = 0.25  # of the run's steps, as the SFT proxy and the callback's run_level="compressed"
KL_HELD = [name for name in rl.RUNS if name.startswith("grpo-") and name.endswith("-kl-long")]


def run_proxy(name: str, model, tokenizer, texts, precise: rl.PreciseSample, tokens: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from sts_callback.core.heldout import paired_change, sequence_nll
    from sts_callback.core.torch_utils import pad_token_id
    from sts_callback.pipelines.forecast import inference_mode

    spec = rl.RUNS[name]
    s = rl.GRPO[spec["size"]]
    source = spec["source"]
    train_texts, _ = units.split(source, texts)
    word_texts = texts[spec["reward_domain"]][0::2] if "reward_domain" in spec else None
    built = rl.keywords_task(tokenizer, train_texts, s, spec["rewards"], word_texts)
    steps = max(1, round(SHARE * s["steps"]))
    lr = s["learning_rate"] * s["steps"] / steps  # a constant schedule: the whole area in the compressed steps
    start = time.perf_counter()
    set_seed(0)
    args = GRPOConfig(output_dir=str(work / name), logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                      lr_scheduler_type="constant", seed=0, data_seed=0, disable_tqdm=True, bf16=False,
                      gradient_checkpointing=False, max_steps=steps,
                      per_device_train_batch_size=s["per_device_train_batch_size"],
                      num_generations=s["num_generations"], max_completion_length=s["max_completion_length"],
                      learning_rate=lr, temperature=1.0, top_k=0, **({"beta": s["beta"]} if "beta" in s else {}))
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=built["reward_funcs"], args=args,
                          train_dataset=Dataset.from_list(built["rows"]), processing_class=copy.deepcopy(tokenizer),
                          peft_config=LoraConfig(task_type="CAUSAL_LM", **rl.LORA))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trained = time.perf_counter() - start
    sample, before = measured_subset(precise.sample, precise.before, tokens)
    changes = {}
    with inference_mode(trainer.model):
        for domain, sequences in sample.items():
            after = sequence_nll(trainer.model, sequences, pad_token_id(tokenizer), 8)
            change = paired_change(torch.tensor(before[domain], dtype=torch.float64), after)
            changes[domain] = {"delta": change.delta, "low": change.low, "high": change.high}
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    data = {"format": "sts-transfer-rl-proxy/1", "run": name, "source": source, "proxy_steps": steps,
            "run_steps": s["steps"], "learning_rate": lr, "run_learning_rate": s["learning_rate"],
            "tokens": tokens, "nll_delta_rel": {d: c["delta"] for d, c in changes.items()}, "change": changes,
            "reward": rewards, "seconds": {"train": trained, "total": time.perf_counter() - start},
            "domains_fingerprint": units.fingerprint(texts), "date": time.strftime("%Y-%m-%d")}
    units.write_json(OUT / f"{name}.json", data)
    del trainer
    return data


PRIOR = ("rl_vs_sft_precise_kl11_icl.json", "grpo domain prior alone (family's other runs)")  # the registered baseline


def score(names: list[str], json_out: Path) -> None:
    file, family = PRIOR
    prior = json.loads((HERE / file).read_text())["families"][family]
    rows = []
    for name in names:
        proxy_file, run_file = OUT / f"{name}.json", rl.OUT / f"{name}.json"
        if not proxy_file.exists() or not run_file.exists():
            continue
        proxy = json.loads(proxy_file.read_text())
        truth = json.loads(run_file.read_text())["measured_precise"]["loss_delta"]
        rows.append({"run": name, "source": proxy["source"], **agreement(proxy["nll_delta_rel"], truth,
                                                                         proxy["source"]),
                     "reward_first_last": [proxy["reward"][0], proxy["reward"][-1]] if proxy["reward"] else None,
                     "prior_pearson": (prior.get(name) or {}).get("pearson")})
    print("compressed GRPO run vs the run's precise final change (r / direction over the other domains), beside "
          "the family's domain prior alone (rl_vs_sft.py)")
    for row in rows:
        r = "-" if row["pearson"] is None else f"{row['pearson']:+.2f}"
        base = "-" if row["prior_pearson"] is None else f"{row['prior_pearson']:+.2f}"
        print(f"{row['run']:<40} {r:>6} / {100 * row['direction']:.0f}%{' *' if row['meets_goal'] else '  '}"
              f"   the domain prior alone {base}")
    values = [r["pearson"] for r in rows if r["pearson"] is not None]
    summary = {"runs": len(rows), "mean_pearson": float(np.mean(values)) if values else None,
               "mean_direction": float(np.mean([r["direction"] for r in rows])) if rows else None,
               "meeting_goal": sum(r["meets_goal"] for r in rows),
               "prior_mean_pearson_same_runs": float(np.mean([r["prior_pearson"] for r in rows
                                                              if r["prior_pearson"] is not None])) if rows else None}
    print(json.dumps(summary))
    units.write_json(json_out, {"rows": rows, "summary": summary})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[n for n in rl.RUNS if rl.RUNS[n]["kind"] == "grpo"
                                                      and rl.RUNS[n].get("precise_tokens")])
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens per domain measured after")
    parser.add_argument("--work", type=Path, default=Path("outputs/transfer-rl-proxy"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score", action="store_true")
    args = parser.parse_args()
    names = args.only or KL_HELD
    if args.score:
        score(names, HERE / "rl_proxy.json")
        return
    todo = [n for n in names if not (OUT / f"{n}.json").exists()]
    print(f"{len(todo)} compressed GRPO run(s) to do", flush=True)
    if not todo:
        return
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(padding_side|generation flags|use_cache).*")
    from sts_callback.tools.models import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    texts = units.domain_texts(units.UNITS)
    precise = rl.PreciseSample(model, tokenizer, texts, rl.PRECISE_TOKENS, units.UNITS)
    for name in todo:
        print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        data = run_proxy(name, model, tokenizer, texts, precise, args.tokens, args.work)
        print(f"   done in {data['seconds']['total'] / 60:.1f} min (lr {data['learning_rate']:.1e}, reward "
              f"{data['reward'][0]:.2f} -> {data['reward'][-1]:.2f})" if data["reward"] else "   done", flush=True)


if __name__ == "__main__":
    main()
