"""The in-context NLL change (``icl_loss_change``, the feature that let the SFT forecast meet its goal from step 0)
for the GRPO runs of ``rl.py``, from the same base model and the same seeded rollouts.

For each finished GRPO run in ``benchmarks/transfer/rl/`` (the keyword-reward runs; arithmetic's changes are within
their noise), each target domain's relative NLL change when two demonstrations precede its texts (384 query tokens
a domain, the SFT units' setting: ``units.ICL_TOKENS``, ``units.FORECAST``), with three kinds of demonstrations:

- ``high``: the rollouts above their group's mean reward (the reward-filtered demonstrations, the GRPO forecast
  the issue names);
- ``low``: the rollouts below it (``high`` minus ``low`` reads the completions GRPO pushes toward against those it
  pushes away from, the prompts cancelling: the in-context analogue of the reward-weighted shift);
- ``plain``: the prompts' real continuations (plain demonstrations, what the paper says fails for RL).

The rollouts are ``rl.py``'s (same prompts, reward functions, settings and seed); that they are the same rollouts is
checked against the run's stored summary (``rollouts_match``). One JSON per run in ``benchmarks/transfer/rl_icl/``
(resumable); ``rl_vs_sft.py`` reads them. About 5 min a run here, one thread.

    python benchmarks/transfer/rl_icl.py [--only RUN ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl_icl"
sys.path.insert(0, str(HERE))
import rl  # noqa: E402
import units  # noqa: E402

DEMONSTRATIONS = ("high", "low", "plain")


def planned() -> list[str]:
    """The keyword-reward GRPO runs with a result on disk, the KL-held ones first (the family the variants part on)."""
    names = [n for n, spec in rl.RUNS.items() if spec["kind"] == "grpo" and spec.get("task") == "keywords"
             and (rl.OUT / f"{n}.json").exists()]
    return sorted(names, key=lambda n: (not n.endswith("-kl-long"), not n.endswith("-long"), n))


def keyword_run(name: str, tokenizer, texts: dict[str, list[str]], sz: dict[str, Any]):
    """A keyword-reward GRPO run of ``rl.py`` rebuilt offline as its ``run_grpo`` builds it: (spec, sizes, target
    domains, the task's prompts / references / reward functions)."""
    spec = rl.RUNS[name]
    s = sz["grpo"][spec.get("size", spec["task"])]
    train_texts, targets = units.split(spec["source"], texts)
    word_texts = texts[spec["reward_domain"]][0::2] if "reward_domain" in spec else None
    return spec, s, targets, rl.keywords_task(tokenizer, train_texts, s, spec["rewards"], word_texts)


def below_mean(rollouts) -> list[dict[str, Any]]:
    """The completions below their group's mean reward, as ``{"prompt", "completion"}`` records (the low side of
    :meth:`Rollouts.demonstrations`)."""
    trained = rollouts.trained_advantages
    return [{"prompt": group.prompt, "completion": completion} for g, group in enumerate(rollouts.groups)
            for j, completion in enumerate(group.completions) if float(trained[g, j]) < 0]


def run(name: str, model, tokenizer, texts, sz) -> dict[str, Any]:
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.pipelines.icl_loss import icl_loss_change
    from sts_callback.pipelines.rollouts import prompt_records, sample_rollouts

    spec, s, targets, built = keyword_run(name, tokenizer, texts, sz)
    stored = json.loads((rl.OUT / f"{name}.json").read_text())
    trainer_args = {"num_generations": s["num_generations"], "max_completion_length": s["max_completion_length"],
                    "temperature": 1.0, "top_k": 0}
    config = STSConfig(**sz["forecast"])
    t0 = time.perf_counter()
    rollouts = sample_rollouts(model, tokenizer, prompt_records(built["rows"]), built["reward_funcs"], config,
                               settings=trainer_args, builder=prompt_builder(model, tokenizer, config))
    seconds = {"rollouts": time.perf_counter() - t0}
    summary = rollouts.summary()
    stored_summary = stored["forecasts"]["reward_filtered"]["settings"].get("rollouts", {})
    keys = ("prompts", "completions", "completion_tokens", "reward_mean", "above_mean")
    match = all(summary.get(k) == stored_summary.get(k) for k in keys)
    demonstrations = {"high": rollouts.demonstrations(), "low": below_mean(rollouts), "plain": built["references"]}
    icl_config = STSConfig(**units.FORECAST)
    changes = {}
    for kind in DEMONSTRATIONS:
        print(f"   {kind}: {len(demonstrations[kind])} demonstrations ...", flush=True)
        t0 = time.perf_counter()
        changes[kind] = icl_loss_change(model, tokenizer, demonstrations[kind], targets, icl_config,
                                        tokens=units.ICL_TOKENS)
        seconds[kind] = time.perf_counter() - t0
    return {"format": "sts-rl-icl/1", "run": name, "source": spec["source"],
            "reward_domain": spec.get("reward_domain"), "tokens": units.ICL_TOKENS,
            "settings": {k: getattr(icl_config, k) for k in ("n_demonstrations", "max_query_tokens",
                                                             "max_demonstration_tokens", "seed")},
            "icl_loss_change": changes, "demonstrations": {k: len(v) for k, v in demonstrations.items()},
            "rollouts": {k: summary.get(k) for k in keys}, "rollouts_match": match,
            "domains_fingerprint": units.fingerprint(texts), "seconds": seconds,
            "date": time.strftime("%Y-%m-%d")}


def runs_to_measure(description: str, out: Path) -> tuple[argparse.Namespace, list[str]]:
    """The command line of a script measuring the finished keyword GRPO runs one JSON each (``--only``, ``--out``,
    ``--threads``): its arguments and the runs without a JSON yet."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="these runs only (rl.py's names)")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    names = rl.only_these(parser, planned(), args.only, "no finished keyword GRPO run named {}")
    todo = [n for n in names if not (args.out / f"{n}.json").exists()]
    print(f"{len(todo)} of {len(names)} runs to measure", flush=True)
    return args, todo


def base_model(threads: int):
    """The base model and tokenizer the runs started from, the domains' texts and rl.py's sizes."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*(padding_side|generation flags|use_cache).*")
    from sts_callback.tools.models import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    return model, tokenizer, units.domain_texts(units.UNITS), rl.sizes(False)


def main() -> None:
    args, todo = runs_to_measure(__doc__, OUT)
    if not todo:
        return
    model, tokenizer, texts, sz = base_model(args.threads)
    for name in todo:
        if (args.out / f"{name}.json").exists():  # another process took it
            continue
        print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        data = run(name, model, tokenizer, texts, sz)
        units.write_json(args.out / f"{name}.json", data)
        print(f"   rollouts match rl.py's: {data['rollouts_match']}; "
              f"{sum(data['seconds'].values()) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
