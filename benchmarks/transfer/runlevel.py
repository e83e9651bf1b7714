"""The run-level term of the transfer benchmark (issue 13, item 2): one resumable unit per (recipe, source), seed 0.

    python benchmarks/transfer/runlevel.py                      # every unit not yet on disk, in plan order
    python benchmarks/transfer/runlevel.py --list               # the plan and which units are done
    python benchmarks/transfer/runlevel.py --only runlevel-lora-legal

For each (recipe, source) that ``units.plan()`` trains with seed 0, before any training: the recipe's model
(Gemma 3 270M with LoRA r=8 on peft's default modules, or every weight trainable), the run's own optimizer
(built by the Trainer with the arguments ``sts_callback.validation.validate`` trains with: AdamW, betas (0.9, 0.95), weight
decay 0.01 off biases and norms, gradient clipping 1.0, the learning rate of the cosine schedule's peak), K = 3
training batches of the run's size (4 examples of at most 128 tokens from the source's even-indexed texts), and
every domain's held-out sequences sampled exactly as the unit's ``STSCallback`` samples its loss sets (same
corpora, seed and ``loss_tokens`` budget, so the texts whose NLL change the unit measures). Then

- ``lookahead``: 3 real optimizer steps (under 5% of the 64 planned), each domain's relative held-out NLL
  change measured, parameters / optimizer state / RNG restored (``sts_callback.pipelines.runlevel.lookahead``);
- ``first_order``: ``<grad L_d, delta> / L_d`` with ``delta`` the optimizer's update of 3 steps with the
  batches' mean gradient held (``sts_callback.pipelines.runlevel.first_order``); no parameter changes.

``units/runlevel-<recipe>-<source>.json`` is written the moment a unit finishes: both features per domain,
their seconds (and parts), the optimizer-step time measured here, and each feature's cost as a share of the
64-step run (64 x that step time). A stopped run loses at most the unit in progress.

    python benchmarks/transfer/runlevel.py --own-only          # the cheap level: the LoRA units, 1-3 steps

``--own-only``: the lookahead of 1, 2 and 3 steps (``OWN_STEPS``) measuring only the source's own held-out texts
(what a calibration whose level is ``lookahead_own`` and whose pattern needs no per-domain lookahead uses: the
callback then measures nothing else), each with its time; ``units/runlevel-own-<recipe>-<source>.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from units import COMMON, FORECAST, RECIPES, UNITS, plan, split, write_json  # noqa: E402

K = 3  # lookahead / first-order steps: 3 of 64 planned steps is 4.7%
OWN_STEPS = (1, 2, 3)  # --own-only: lookaheads of the own domain alone (3: the full lookahead's, to compare)
SEED = 0
LOSS_BATCH = 4  # held-out sequences per forward (Monitor.loss_batch_size)
LORA_RANK = 8  # validate()'s defaults, which units.py trains with
LORA_ALPHA = 16


def unit_name(recipe: str, source: str) -> str:
    return f"runlevel-{recipe}-{source}"


def status(path: Path, own_only: bool = False) -> str:
    """``done``, ``todo``, or ``stale``: written with another held-out budget or K (``--own-only``: other steps)
    than the plan's now (the loss sets would not be the units' any more); stale units are run again."""
    if not path.exists():
        return "todo"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "stale"
    fresh = data.get("steps") == list(OWN_STEPS) if own_only else data.get("k") == K
    return "done" if data.get("loss_tokens") == COMMON["loss_tokens"] and fresh else "stale"


def planned() -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for recipe, source, seed in plan():
        if seed == SEED and (recipe, source) not in seen:
            seen.append((recipe, source))
    return seen


def loss_sets(model, tokenizer, targets: dict[str, list]) -> dict[str, list]:
    """Each domain's held-out sequences as the unit's STSCallback samples them (Monitor.sample_sequences with
    the callback's seed string and COMMON['loss_tokens'])."""
    from sts_callback.core.config import STSConfig
    from sts_callback.core.data import load_domains
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.pipelines.monitor import Monitor

    config = STSConfig(**FORECAST).replace(seed=SEED)
    setup = SimpleNamespace(builder=prompt_builder(model, tokenizer, config))
    return {name: Monitor.sample_sequences(corpus, setup, COMMON["loss_tokens"],
                                           seed=f"{config.seed}:heldout:{name}")[0]
            for name, corpus in load_domains(targets).items()}


def build_run(model, tokenizer, recipe: str, train: list, work: Path):
    """The recipe's trainable model, the Trainer's optimizer and the training set, as validate() builds them."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from sts_callback.core.data import load_corpus
    from sts_callback.pipelines.recipe import PadCollator, training_features, wrap_lora

    method, lr = RECIPES[recipe]["method"], RECIPES[recipe]["learning_rate"]
    set_seed(SEED)  # validate(): seeded before the copy, so LoRA's initialisation is the run's
    trained = copy.deepcopy(model)
    if method == "lora":
        trained = wrap_lora(trained, LORA_RANK, LORA_ALPHA, None)
    else:
        for p in trained.parameters():
            p.requires_grad_(True)
    features = training_features(load_corpus(train, name="train"), tokenizer, COMMON["max_length"], True, False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = PadCollator(pad)
    args = TrainingArguments(  # sts_callback.validation.validate._train_one_seed's arguments
        output_dir=str(work), max_steps=COMMON["steps"], per_device_train_batch_size=COMMON["batch_size"],
        learning_rate=lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=0.1, seed=SEED, data_seed=SEED, save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
        label_names=["labels"])
    trainer = Trainer(model=trained, args=args, train_dataset=features, data_collator=collator,
                      processing_class=tokenizer)
    optimizer = trainer.create_optimizer()
    return trained, optimizer, features, collator, pad, lr


def run_unit(model, tokenizer, recipe: str, source: str, domains: dict[str, list[str]], out: Path) -> dict:
    from sts_callback.pipelines.runlevel import RunLevelConfig, first_order, lookahead, training_batches

    start = time.perf_counter()
    train, targets = split(source, domains)
    sequences = loss_sets(model, tokenizer, targets)
    with tempfile.TemporaryDirectory() as work:
        trained, optimizer, features, collator, pad, lr = build_run(model, tokenizer, recipe, train, Path(work))
    batches = training_batches(features, collator, COMMON["batch_size"], K, seed=SEED)
    settings = RunLevelConfig(steps=K, lr=lr, max_grad_norm=1.0, pad=pad, batch_size=LOSS_BATCH)
    ahead = lookahead(trained, optimizer, batches, sequences, settings)
    first = first_order(trained, optimizer, batches, sequences, settings)
    step = ahead.timings["step_seconds"]
    run_seconds = COMMON["steps"] * step

    def cost(estimate, without_before: float) -> dict:
        return {"seconds": estimate.seconds, "share_of_run": estimate.seconds / run_seconds,
                "seconds_without_base_losses": without_before,
                "share_without_base_losses": without_before / run_seconds}

    data = {
        "format": "sts-runlevel-unit/1", "unit": unit_name(recipe, source), "recipe": recipe, "source": source,
        "seed": SEED, "others": [d for d in domains if d != source], "k": K, "steps_planned": COMMON["steps"],
        "learning_rate": lr, "batch_size": COMMON["batch_size"], "max_length": COMMON["max_length"],
        "loss_tokens": COMMON["loss_tokens"], "train_examples": len(features),
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "optimizer": type(optimizer).__name__,
        "lookahead": ahead.to_dict(), "first_order": first.to_dict(),
        "step_seconds": step, "run_seconds_estimate": run_seconds,
        # the callback measures the base losses at train start anyway: the lookahead's extra cost is the rest
        "cost": {"lookahead": cost(ahead, ahead.seconds - ahead.timings["before"]),
                 "first_order": cost(first, first.seconds)},
        "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
    }
    write_json(out / f"{unit_name(recipe, source)}.json", data)
    del trained, optimizer
    gc.collect()
    return data


def own_unit_name(recipe: str, source: str) -> str:
    return f"runlevel-own-{recipe}-{source}"


def run_own_unit(model, tokenizer, recipe: str, source: str, domains: dict[str, list[str]], out: Path) -> dict:
    """Lookaheads of ``OWN_STEPS`` steps that measure only the source's own held-out texts (the unit's loss set
    of that domain), each on its own seeded draw of batches as the callback draws them for that many steps; the
    costs as shares of the 64-step run, with and without the own domain's base loss (which the callback measures
    at train start anyway when the training data is one of its target domains)."""
    from sts_callback.pipelines.runlevel import RunLevelConfig, lookahead, measure_losses, training_batches

    start = time.perf_counter()
    train, targets = split(source, domains)
    own = {source: loss_sets(model, tokenizer, {source: targets[source]})[source]}
    with tempfile.TemporaryDirectory() as work:
        trained, optimizer, features, collator, pad, lr = build_run(model, tokenizer, recipe, train, Path(work))
    t = time.perf_counter()
    before = measure_losses(trained, own, pad=pad, batch_size=LOSS_BATCH)
    before_seconds = time.perf_counter() - t
    estimates = {}
    for steps in OWN_STEPS:
        batches = training_batches(features, collator, COMMON["batch_size"], steps, seed=SEED)
        settings = RunLevelConfig(steps=steps, lr=lr, max_grad_norm=1.0, pad=pad, batch_size=LOSS_BATCH)
        estimate = lookahead(trained, optimizer, batches, own, settings, before=before).to_dict()
        run_seconds = COMMON["steps"] * estimate["timings"]["step_seconds"]
        extra = estimate["timings"]["steps"] + estimate["timings"]["after"]
        estimate["cost"] = {"seconds": extra + before_seconds, "share_of_run": (extra + before_seconds) / run_seconds,
                            "seconds_without_base_loss": extra, "share_without_base_loss": extra / run_seconds,
                            "run_seconds_estimate": run_seconds}
        estimates[f"k{steps}"] = estimate
    data = {"format": "sts-runlevel-own/1", "unit": own_unit_name(recipe, source), "recipe": recipe,
            "source": source, "seed": SEED, "steps": list(OWN_STEPS), "loss_tokens": COMMON["loss_tokens"],
            "learning_rate": lr, "before_seconds": before_seconds, "lookahead": estimates,
            "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU"}
    write_json(out / f"{own_unit_name(recipe, source)}.json", data)
    del trained, optimizer
    gc.collect()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--only", nargs="+", help="run only these units (names as --list prints them)")
    parser.add_argument("--out", type=Path, default=UNITS)
    parser.add_argument("--own-only", action="store_true",
                        help=f"the LoRA units' lookaheads of {OWN_STEPS} steps on the own domain alone")
    args = parser.parse_args()

    units = planned()
    name_of = unit_name
    if args.own_only:
        units, name_of = [u for u in units if u[0] == "lora"], own_unit_name
    names = [name_of(*u) for u in units]
    if args.list:
        for name in names:
            print(f"{name:<36} {status(args.out / f'{name}.json', args.own_only)}")
        return
    if args.only:
        prefix = "runlevel-own-" if args.own_only else "runlevel-"
        wanted = {n if n.startswith(prefix) else f"{prefix}{n}" for n in args.only}
        unknown = sorted(wanted - set(names))
        if unknown:
            parser.error(f"unknown unit(s) {unknown}; --list prints the plan")
        units = [u for u in units if name_of(*u) in wanted]
    todo = [u for u in units if status(args.out / f"{name_of(*u)}.json", args.own_only) != "done"]
    print(f"{len(todo)} of {len(units)} units to run", flush=True)
    if not todo:
        return

    from sts_callback.tools.models import load_gemma3_270m
    from units import domain_texts

    model, tokenizer = load_gemma3_270m()
    domains = domain_texts(args.out)  # the units' frozen texts
    for recipe, source in todo:
        name = name_of(recipe, source)
        print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        if args.own_only:
            data = run_own_unit(model, tokenizer, recipe, source, domains, args.out)
            print("   " + "; ".join(f"{k}: own {e['change'][source]:+.3%}, {e['cost']['share_of_run']:.1%} of the run "
                                    f"({e['cost']['share_without_base_loss']:.1%} without the base loss)"
                                    for k, e in data["lookahead"].items()), flush=True)
            continue
        data = run_unit(model, tokenizer, recipe, source, domains, args.out)
        ahead, first = data["lookahead"], data["first_order"]
        print(f"   done in {data['seconds'] / 60:.1f} min; own domain: lookahead {ahead['change'][source]:+.3%}, "
              f"first-order {first['change'][source]:+.3%}; mean over others: lookahead "
              f"{sum(ahead['change'][d] for d in data['others']) / len(data['others']):+.3%}, first-order "
              f"{sum(first['change'][d] for d in data['others']) / len(data['others']):+.3%}; cost "
              f"{data['cost']['lookahead']['share_of_run']:.1%} / {data['cost']['first_order']['share_of_run']:.1%} "
              "of the run", flush=True)


if __name__ == "__main__":
    main()
