"""How precise is the benchmark's measured change? Units re-run with a held-out measurement 8x larger.

    python benchmarks/transfer/precise.py --only lora-python_code-seed0 lora-python_code-seed1
    python benchmarks/transfer/precise.py --list

A unit of ``units.py`` measures each target domain's held-out NLL change on 512 tokens: about 4 texts of 128
tokens, drawn with the run's seed, so seed 0 and seed 1 of a source measure *different* texts. The callback's
own 95% interval over those texts is often as wide as the spread of the changes across domains. This script
re-runs a unit's training (the same recipe, seed, data and ``validate`` path; the step-0 forecast cheapened,
the re-checks only at the end) and measures every domain's change on a fixed sample of ``--tokens`` held-out
tokens (odd-indexed texts of every domain, the first 128 tokens of each, one sample for all units, so every
run is measured on the same texts), with its 95% interval over texts, beside the callback's 512-token change.
The base model's per-text NLL is computed once and kept (``units/precise-base.json``). Each unit is written to
``units/precise-<unit>.json`` when it ends; a stopped run loses at most the unit in progress.

``learned.py`` then scores the step-0 forecasts (fitted, as before, on the 512-token units) against these
changes, and the seed agreement with both seeds measured on the same texts.

    python benchmarks/transfer/precise.py --only lora-legal-seed0 --recheck-steps 16 --loss-tokens 2048

re-checks during training too, as the callback would with ``loss_tokens=2048`` (about 16 texts a domain, 4x the
units' 512), every ``--recheck-steps`` steps, and writes ``units/trajectory-<unit>.json``: the callback's
trajectory (each re-check's changes and 95% intervals) beside the precise final change, which
``early_compare.py`` reads when present: is an early forecast from re-checks this precise reliable from 25% of
training? With another interval, e.g. ``--recheck-steps 4`` (dense: four re-checks by a quarter of the run),
``units/trajectory-<unit>-every4.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from units import (COMMON, FORECAST, RECIPES, UNITS, fingerprint, load_setup, plan, split, unit_name,  # noqa: E402
                   write_json)

TOKENS = 4096
# The step-0 forecast is not what this script measures (the units keep it); the callback needs one.
CHEAP_FORECAST = {**FORECAST, "shift_tokens": 512, "domain_tokens": 256, "compute_icl": False, "ranking": "sts_act"}


def precise_sample(texts: dict[str, list[str]], builder, tokens: int, parity: int = 1) -> dict[str, list]:
    """Per domain, a seeded sample of its odd-indexed (held-out for every source) texts within ``tokens``;
    ``parity=0``: of its even-indexed ones instead (a source's training texts, held out for every *other* source:
    a second sample sharing no text with the first, its own seed)."""
    from sts_callback.core.data import Corpus, sample_within_budget

    sample = {}
    for name in sorted(texts):
        corpus = Corpus(name, texts[name][parity::2])
        seed = f"precise-{name}" if parity == 1 else f"even-{name}"
        indices, _ = sample_within_budget(corpus, builder, tokens, random.Random(seed))
        sample[name] = [builder.single(corpus[i]) for i in indices]
    return sample


def base_nll(model, tokenizer, sample: dict[str, list], key: str, out: Path,
             file: str = "precise-base.json") -> dict[str, list[list[float]]]:
    from sts_callback.core.heldout import sequence_nll
    from sts_callback.core.torch_utils import pad_token_id
    from sts_callback.pipelines.forecast import inference_mode

    path = out / file
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["nll"]
    start = time.perf_counter()
    with inference_mode(model):
        nll = {name: sequence_nll(model, seqs, pad_token_id(tokenizer), 8).tolist() for name, seqs in sample.items()}
    write_json(path, {"key": key, "nll": nll, "seconds": time.perf_counter() - start})
    return nll


def measuring_metric(sample: dict[str, list], before: dict[str, list]):
    """(metric, after, seconds) for ``validate(metric=...)``: the metric gives each domain's base NLL from
    ``before`` (cached) on its first call per domain, then measures ``sample`` on the trained weights, keeping each
    text's (NLL sum, tokens) in ``after`` and the time in ``seconds["measure"]``."""
    import torch

    from sts_callback.core.heldout import sequence_nll
    from sts_callback.core.torch_utils import pad_token_id

    after: dict[str, list[list[float]]] = {}
    seconds = {"measure": 0.0}

    def metric(trained, tok, domain):
        metric.calls = getattr(metric, "calls", 0) + 1
        if metric.calls <= len(before):
            values = torch.tensor(before[domain], dtype=torch.float64)
        else:
            start = time.perf_counter()
            values = sequence_nll(trained, sample[domain], pad_token_id(tok), 8)
            seconds["measure"] += time.perf_counter() - start
            after[domain] = values.tolist()
        return float(values[:, 0].sum() / values[:, 1].sum())

    return metric, after, seconds


TRAJECTORY_STEPS = 16  # the first re-runs' re-check interval: their files carry no suffix


def output_path(out: Path, name: str, recheck_steps: int | None) -> Path:
    if not recheck_steps:
        return out / f"precise-{name}.json"
    suffix = "" if recheck_steps == TRAJECTORY_STEPS else f"-every{recheck_steps}"
    return out / f"trajectory-{name}{suffix}.json"


def run_unit(model, tokenizer, sae_path, recipe: str, source: str, seed: int, texts, sample, before, out: Path,
             work: Path, tokens: int, recheck_steps: int | None = None, loss_tokens: int | None = None) -> dict:
    import torch

    from sts_callback.core.config import STSConfig
    from sts_callback.core.heldout import paired_change
    from sts_callback.validation.validate import validate

    metric, after, seconds = measuring_metric(sample, before)

    train, targets = split(source, texts)
    start = time.perf_counter()
    args = RECIPES[recipe]
    result = validate(model, tokenizer, sae_path, train, targets, STSConfig(**CHEAP_FORECAST), seeds=[seed],
                      method=args["method"], learning_rate=args["learning_rate"], steps=COMMON["steps"],
                      batch_size=COMMON["batch_size"], max_length=COMMON["max_length"],
                      loss_tokens=loss_tokens or COMMON["loss_tokens"],
                      # a re-check's probe (the actual shift) is not what a trajectory run measures: the smallest one
                      recheck_tokens=256 if recheck_steps else COMMON["recheck_tokens"], recheck_steps=recheck_steps,
                      training_args={"logging_steps": 1},
                      output_dir=work / output_path(Path(), unit_name(recipe, source, seed), recheck_steps).stem,
                      n_resamples=0, plot=False, report=False, metric=metric)
    run = result.per_seed[0]
    changes = {}
    for name in sorted(before):
        change = paired_change(torch.tensor(before[name], dtype=torch.float64),
                               torch.tensor(after[name], dtype=torch.float64))
        changes[name] = {"delta": change.delta, "low": change.low, "high": change.high, "tokens": change.tokens,
                         "sequences": change.sequences}
    data = {"format": "sts-transfer-precise/1", "unit": unit_name(recipe, source, seed), "recipe": recipe,
            "source": source, "seed": seed, "tokens": tokens, "nll_delta_rel": {n: c["delta"] for n, c in changes.items()},
            "change": changes, "nll_delta_rel_512": run.nll_delta_rel, "train_loss": run.train_loss,
            **({"format": "sts-transfer-trajectory/1", "loss_tokens": loss_tokens, "recheck_steps": recheck_steps,
                "steps": COMMON["steps"], "trajectory": [{k: r[k] for k in ("step", "nll_delta_rel", "nll_delta_ci",
                                                                            "lr_area_fraction", "seconds")}
                                                         for r in run.trajectory],
                "log_history": run.log_history} if recheck_steps else {}),
            "after": after, "domains_fingerprint": fingerprint(texts),
            "seconds": {"total": time.perf_counter() - start, **seconds}, "date": time.strftime("%Y-%m-%d")}
    write_json(output_path(out, unit_name(recipe, source, seed), recheck_steps), data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the units and which have a precise re-run")
    parser.add_argument("--only", nargs="+", help="re-run these units (names as --list prints them)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="held-out tokens per domain (default 4096)")
    parser.add_argument("--out", type=Path, default=UNITS)
    parser.add_argument("--work", type=Path, default=Path("outputs/transfer-units"))
    parser.add_argument("--recheck-steps", type=int, default=None,
                        help="also re-check every this many steps, as the callback would (trajectory-<unit>.json)")
    parser.add_argument("--loss-tokens", type=int, default=None,
                        help="the re-checks' held-out tokens per domain (default: the units' 512)")
    args = parser.parse_args()

    names = [unit_name(*u) for u in plan()]
    if args.list:
        for name in names:
            print(f"{name:<36} {'done' if output_path(args.out, name, args.recheck_steps).exists() else 'todo'}")
        return
    chosen = args.only or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown unit(s) {unknown}; --list prints them")
    todo = [u for u in plan() if unit_name(*u) in chosen
            and not output_path(args.out, unit_name(*u), args.recheck_steps).exists()]
    print(f"{len(todo)} unit(s) to re-run", flush=True)
    if not todo:
        return

    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.forecast import prompt_builder

    model, tokenizer, sae_path, texts = load_setup(args.out)
    sample = precise_sample(texts, prompt_builder(model, tokenizer, STSConfig(**CHEAP_FORECAST)), args.tokens)
    before = base_nll(model, tokenizer, sample, f"{fingerprint(texts)}-{args.tokens}", args.out)
    print("held-out sample: " + ", ".join(f"{n} {len(s)} texts" for n, s in sample.items()), flush=True)
    for recipe, source, seed in todo:
        name = unit_name(recipe, source, seed)
        print(f"== precise {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        data = run_unit(model, tokenizer, sae_path, recipe, source, seed, texts, sample, before, args.out, args.work,
                        args.tokens, args.recheck_steps, args.loss_tokens)
        widths = [c["high"] - c["low"] for n, c in data["change"].items() if n != source]
        print(f"   done in {data['seconds']['total'] / 60:.1f} min; mean 95% interval width over the other domains "
              f"{100 * sum(widths) / len(widths):.2f} points", flush=True)


if __name__ == "__main__":
    main()
