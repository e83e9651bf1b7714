"""The 11-source transfer benchmark, one resumable unit per (recipe, source, seed).

    python benchmarks/transfer/units.py                 # every planned unit not yet on disk, in plan order
    python benchmarks/transfer/units.py --list          # the plan and which units are done
    python benchmarks/transfer/units.py --only lora-legal-seed0

Model: Gemma 3 270M (offline GGUF package), the demo SAE (layer 12, TopK width 4096, k=32). A unit fine-tunes
on the even-indexed texts of one built-in domain (its odd-indexed texts are held out as the source's own
target; the other 10 domains are the other targets) through ``sts_callback.validation.validate`` and writes
``units/<recipe>-<source>-seed<seed>.json`` the moment it finishes: the step-0 forecast's scores, the held-out
NLL of every target before and after, the re-check trajectory every 8 steps (per-domain NLL change, lr-area
fraction, re-check seconds) and the Trainer's log at every step (train loss, learning rate). The in-context NLL
baseline is per source, in ``units/icl-<source>.json``. A stopped run loses at most the unit in progress. The
domains' texts are frozen in ``units/domains.json.gz`` at the first run (they are read from the installed
packages' files, which change with the venv); each unit records the texts' fingerprint.

Plan: LoRA (r=8, q/v, lr 1e-3) seed 0 for all 11 sources, a full fine-tune (lr 2e-5) seed 0 for 5 sources,
LoRA seed 1 for 6 sources, then for the other 5; 64 steps of batch 4 x 128 tokens each.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITS = HERE / "units"
SOURCES = ("changelog", "chat_templates", "cpp_code", "legal", "markup", "math", "ml_docs", "nlp_tutorials",
           "python_code", "python_reference", "readme_prose")
SUBSET = ("legal", "chat_templates", "python_code", "math", "markup", "changelog")  # diverse: prose, chat, code
RECIPES = {
    "lora": {"method": "lora", "learning_rate": 1e-3},
    "full": {"method": "full", "learning_rate": 2e-5},
}
# Re-check budgets sized for ~15 min a unit on 2 busy cores: 11 domains x 512 held-out tokens per re-check
# (the paired change on the same tokens: ~0.3% relative standard error), a 1,024-token probe.
COMMON = {"steps": 64, "batch_size": 4, "max_length": 128, "loss_tokens": 512, "recheck_tokens": 1024,
          "recheck_steps": 8}
FORECAST = {"n_shifted": 100, "shift_tokens": 4000, "domain_tokens": 1500, "n_domain_demonstrations": 3,
            "max_query_tokens": 128, "max_demonstration_tokens": 128, "batch_size": 8}
ICL_TOKENS = 384


def plan() -> list[tuple[str, str, int]]:
    units = [("lora", s, 0) for s in SOURCES]
    units += [("full", s, 0) for s in SUBSET[:5]]
    units += [("lora", s, 1) for s in SUBSET]
    # added 2026-12-05: a second seed for the other five sources, so every source's runs teach the prior alike
    units += [("lora", s, 1) for s in SOURCES if s not in SUBSET]
    return units


def unit_name(recipe: str, source: str, seed: int) -> str:
    return f"{recipe}-{source}-seed{seed}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


SNAPSHOT = UNITS / "domains.json.gz"


def domain_texts(out: Path) -> dict[str, list[str]]:
    """The built-in domains' texts, frozen: the domains are read from the installed packages' files, so a new
    package in the venv changes them. The first run writes ``domains.json.gz`` beside the units; every later
    run (any session, any venv) reads the same texts from it."""
    path = out / SNAPSHOT.name
    if path.exists():
        return json.loads(gzip.decompress(path.read_bytes()))
    from sts_callback.core.corpora import available_domains, load_domain

    texts = {name: list(load_domain(name)) for name in sorted(available_domains())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(json.dumps(texts).encode("utf-8"), mtime=0))
    os.replace(tmp, path)
    return texts


def fingerprint(texts: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def split(source: str, texts: dict[str, list[str]]):
    train, own = texts[source][0::2], texts[source][1::2]
    return train, {name: (own if name == source else texts[name]) for name in sorted(texts)}


def run_icl(model, tokenizer, config, source: str, texts: dict[str, list[str]], out: Path) -> None:
    from sts_callback.pipelines.icl_loss import icl_loss_change

    path = out / f"icl-{source}.json"
    if path.exists():
        return
    train, targets = split(source, texts)
    start = time.perf_counter()
    change = icl_loss_change(model, tokenizer, train, targets, config, tokens=ICL_TOKENS)
    write_json(path, {"source": source, "tokens": ICL_TOKENS, "icl_loss_change": change,
                      "domains_fingerprint": fingerprint(texts), "seconds": time.perf_counter() - start})


def run_unit(model, tokenizer, sae_path, config, recipe: str, source: str, seed: int, texts: dict[str, list[str]],
             out: Path, work: Path) -> dict:
    from sts_callback.validation.validate import validate

    from sts_callback.pipelines.recheck import RecheckConfig

    if RecheckConfig().loss_sequence_tokens is not None:  # validate() re-checks with the callback's defaults
        raise SystemExit("The units measure each held-out text as the forecast reads it (up to max_query_tokens); "
                         "RecheckConfig.loss_sequence_tokens now cuts them, which would change what is measured.")
    train, targets = split(source, texts)
    domains = sorted(texts)
    start = time.perf_counter()
    recipe_args = RECIPES[recipe]
    result = validate(model, tokenizer, sae_path, train, targets, config, seeds=[seed], method=recipe_args["method"],
                      learning_rate=recipe_args["learning_rate"], steps=COMMON["steps"],
                      batch_size=COMMON["batch_size"], max_length=COMMON["max_length"],
                      loss_tokens=COMMON["loss_tokens"], recheck_tokens=COMMON["recheck_tokens"],
                      recheck_steps=COMMON["recheck_steps"], training_args={"logging_steps": 1},
                      output_dir=work / unit_name(recipe, source, seed), n_resamples=0, plot=False, report=False)
    seed_result = result.per_seed[0].to_dict()
    for bulky in ("forecast_latents", "actual_latents", "actual_scores", "correlations"):
        seed_result.pop(bulky, None)
    for point in seed_result["trajectory"]:
        point.pop("shifted_latents", None)
    data = {"format": "sts-transfer-unit/1", "unit": unit_name(recipe, source, seed), "recipe": recipe,
            "source": source, "seed": seed, "others": [d for d in domains if d != source],
            "training": {**result.training, "held_out_texts": "whole, up to max_query_tokens"},
            "config": result.config, "variants": result.variants,
            "result": seed_result, "domains_fingerprint": fingerprint(texts), "seconds": time.perf_counter() - start,
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU"}
    write_json(out / f"{unit_name(recipe, source, seed)}.json", data)
    return data


def load_setup(out: Path):
    """(model, tokenizer, SAE path, frozen domain texts): what every benchmark unit runs on."""
    from sts_callback.tools.demo import ensure_demo_sae
    from sts_callback.tools.models import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    return model, tokenizer, ensure_demo_sae(model, tokenizer), domain_texts(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--only", nargs="+", help="run only these units (names as --list prints them)")
    parser.add_argument("--out", type=Path, default=UNITS)
    parser.add_argument("--work", type=Path, default=Path("outputs/transfer-units"))
    args = parser.parse_args()

    units = plan()
    names = [unit_name(*u) for u in units]
    if args.list:
        for name in names:
            print(f"{name:<36} {'done' if (args.out / f'{name}.json').exists() else 'todo'}")
        return
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown unit(s) {unknown}; --list prints the plan")
        units = [u for u in units if unit_name(*u) in args.only]
    todo = [u for u in units if not (args.out / f"{unit_name(*u)}.json").exists()]
    print(f"{len(todo)} of {len(units)} units to run", flush=True)
    if not todo:
        return

    from sts_callback.core.config import STSConfig

    model, tokenizer, sae_path, texts = load_setup(args.out)
    print(f"domains {fingerprint(texts)}: " + ", ".join(f"{n} {len(t)}" for n, t in texts.items()), flush=True)
    config = STSConfig(**FORECAST)
    for recipe, source, seed in todo:
        name = unit_name(recipe, source, seed)
        print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        run_icl(model, tokenizer, config, source, texts, args.out)
        data = run_unit(model, tokenizer, sae_path, config, recipe, source, seed, texts, args.out, args.work)
        own = data["result"]["nll_delta_rel"][source]
        print(f"   done in {data['seconds'] / 60:.1f} min; own held-out NLL change {own:+.2%}", flush=True)


if __name__ == "__main__":
    main()
