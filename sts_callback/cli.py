"""The ``sts`` command: forecasts from a config file, validation by real fine-tuning, SAE training, the
built-in domains, the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import DEFAULT_SIGNED
from .errors import STSError, STSInputError

EXAMPLE_CONFIG = """\
# sts forecast config (YAML or JSON)
model: gemma-3-270m            # a local Hugging Face folder, a hub name already in the cache, or gemma-3-270m
sae: ~/.cache/sts_callback/sae/gemma-3-270m-L12   # sae-lens folder, or {release: ..., sae_id: ...}
train_data: my_sft_set.jsonl   # texts / messages / prompt+completion records, or a registered domain name
targets:                       # name -> JSONL path or registered domain name (see `sts domains`)
  legal: legal
  code: python_code
  my_eval: evals/my_eval.jsonl
options:                       # any STSConfig field
  n_shifted: 100
  shift_tokens: 20000
  domain_tokens: 10000
output: forecast.json
"""


def _read_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        return json.loads(text)
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise STSInputError(f"{path} must hold a mapping with keys model, sae, train_data, targets.")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise STSInputError(f"--set {item!r}: use KEY=VALUE, e.g. --set n_shifted=50.")
    key, value = item.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(value)


def load_model(spec: str, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) from ``gemma-3-270m`` (the offline demo model) or a Hugging Face folder / name."""
    import torch

    if spec in ("gemma-3-270m", "gemma3-270m"):
        from .models import load_gemma3_270m

        model, tokenizer = load_gemma3_270m()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(spec))
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec),
                                                     dtype=getattr(torch, dtype) if dtype else torch.float32)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


def _expand(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _command_config(args: argparse.Namespace, command: str, required: tuple[str, ...]):
    """(config file contents, validated STSConfig with --set overrides), before any model is loaded."""
    from .config import STSConfig

    if not args.config:
        raise STSInputError(f"sts {command} needs a CONFIG file (see `sts {command} --example`).")
    config_file = _read_config(args.config)
    missing = [k for k in required if k not in config_file]
    if missing:
        raise STSInputError(f"{args.config} lacks {missing}; see `sts {command} --example`.")
    options = dict(config_file.get("options") or {})
    options.update(dict(_parse_override(item) for item in args.set or []))
    return config_file, STSConfig.from_dict(options)


def cmd_forecast(args: argparse.Namespace) -> int:
    from .forecast import forecast

    if args.example:
        print(EXAMPLE_CONFIG, end="")
        return 0
    config_file, config = _command_config(args, "forecast", ("model", "sae", "train_data", "targets"))
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    result = forecast(model, tokenizer, _expand(config_file["sae"]), _expand(config_file["train_data"]),
                      _expand(config_file["targets"]), config,
                      demonstrations=_expand(config_file.get("demonstrations")), progress=not args.no_progress)
    print(result.table())
    output = Path(args.output or config_file.get("output") or "forecast.json")
    result.save(output)
    print(f"\nwrote {output} ({result.tokens_per_second:.0f} tokens/s, {result.timings['total']:.1f} s)")
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    from .data import example_text, load_corpus
    from .train_sae import train_sae

    model, tokenizer = load_model(args.model, args.device)
    texts = [example_text(corpus[i]) for corpus in map(load_corpus, args.data) for i in range(len(corpus))]
    trained = train_sae(model, tokenizer, texts, args.layer, d_sae=args.d_sae, k=args.k,
                        training_tokens=args.tokens, output_dir=args.output, progress=True)
    print(json.dumps(trained.to_dict(), indent=2))
    return 0


def cmd_domains(args: argparse.Namespace) -> int:
    from .corpora import available_domains, load_domain

    for name, description in available_domains().items():
        count = ""
        if args.count:
            try:
                count = f" ({len(load_domain(name))} texts)"
            except STSError as err:
                count = f" (unavailable: {err})"
        print(f"{name:<20} {description}{count}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=Path(args.output), quick=args.quick, train_steps=args.train_steps)
    return 0


EXAMPLE_GATE_CONFIG = """\
# sts gate config (YAML or JSON): which candidate datasets may enter the training mixture, and with what weight
model: gemma-3-270m
sae: ~/.cache/sts_callback/sae/gemma-3-270m-L12-w4096-k32
candidates:                    # name -> JSONL path or registered domain name (see `sts domains`)
  code: python_code
  math: math
  my_set: data/my_set.jsonl
targets:                       # every domain scored; must include the protected ones
  legal: legal
  code: python_code
  math: math
  docs: ml_docs
protected: [legal]             # domains the mixture must not move too much
# rules (all given apply; none given: reject when a protected score > tolerance x median of the other candidates)
# limits: {legal: 0.5}         # absolute limits on the gated score
# max_rank: 1                  # reject when a protected domain ranks in a candidate's top-k
tolerance: 1.5
score: sts_icl                 # gated score variant (default: options.ranking)
weights: sts                   # sts (paper: share in proportion to STS) or min_impact (linear program)
# wanted: {code: code}         # candidate -> the target domain it serves (default: inferred)
floor: 0.1                     # min_impact: smallest share of each served domain
budget: 220                    # optional: examples to split by the weights
options:                       # any STSConfig field
  shift_tokens: 20000
  domain_tokens: 10000
output: gate.json
filtered_dir: filtered/        # optional: write each accepted candidate minus its worst examples as JSONL
keep_fraction: 0.9             # ... keeping this fraction (or `threshold: <score>`)
"""

GATE_KEYS = ("score", "limits", "max_rank", "tolerance", "weights", "wanted", "floor", "budget")


def cmd_gate(args: argparse.Namespace) -> int:
    from .gate import MixtureRejected, filter_examples, gate_mixture, write_jsonl

    if args.example:
        print(EXAMPLE_GATE_CONFIG, end="")
        return 0
    config_file, config = _command_config(args, "gate", ("model", "sae", "candidates", "targets", "protected"))
    if not isinstance(config_file["candidates"], dict) or not config_file["candidates"]:
        raise STSInputError(f"{args.config}: `candidates` must be a mapping name -> path or domain name.")
    keep_fraction, threshold = config_file.get("keep_fraction"), config_file.get("threshold")
    filtered_dir = args.filtered_dir or config_file.get("filtered_dir")
    if filtered_dir and keep_fraction is None and threshold is None:
        keep_fraction = 0.9
    output = Path(args.output or config_file.get("output") or "gate.json")
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    candidates = {str(k): _expand(v) for k, v in config_file["candidates"].items()}
    try:
        decision = gate_mixture(model, tokenizer, _expand(config_file["sae"]), candidates,
                                _expand(config_file["targets"]), config_file["protected"], config=config,
                                score_examples=not args.no_example_scores or bool(filtered_dir),
                                progress=not args.no_progress,
                                **{k: config_file[k] for k in GATE_KEYS if config_file.get(k) is not None})
    except MixtureRejected as err:
        print(err.decision.table())
        err.decision.save(output)
        print(f"\nwrote {output}")
        raise
    print(decision.table())
    decision.save(output)
    print(f"\nwrote {output} ({decision.timings['total']:.1f} s)")
    if filtered_dir:
        for name in decision.accepted:
            kept = filter_examples(decision, name, keep_fraction=keep_fraction, threshold=threshold)
            path = write_jsonl(kept.examples, Path(filtered_dir) / f"{name}.jsonl")
            print(f"wrote {path} ({len(kept.examples)} of {decision.candidates[name].examples} examples kept)")
    return 0


EXAMPLE_VALIDATE_CONFIG = """\
# sts validate config (YAML or JSON): forecast, then fine-tune for real and check the forecast
model: gemma-3-270m
sae: ~/.cache/sts_callback/sae/gemma-3-270m-L12-w4096-k32
train_data: my_sft_set.jsonl   # what you will post-train on (texts, messages or prompt/completion records)
targets:                       # at least 3 domains: name -> JSONL path or registered domain name
  legal: legal
  code: python_code
  math: math
  docs: ml_docs
validation:                    # every key optional; defaults shown
  method: lora                 # lora or full
  steps: 32                    # optimizer steps per seed
  # learning_rate: 0.0002      # default 2e-4 (lora) / 1e-5 (full); write 2.0e-4, not 2e-4 (YAML)
  batch_size: 8
  max_length: 256
  lora_rank: 8
  seeds: [0]                   # paper protocol: [0, 1, 2]
  loss_tokens: 4096            # held-out tokens per domain for the NLL before/after
  # recheck_steps: 8           # also re-check every 8 steps (the trajectory of the NLL changes)
# multiple_choice:             # optional: accuracy before/after per domain; JSONL of {question, choices, answer}
#   legal: evals/legal_mc.jsonl
options:                       # any STSConfig field (the forecast)
  shift_tokens: 20000
  domain_tokens: 10000
output_dir: validation         # writes validation/sts/validation.json, validation.png, report.html
"""

VALIDATE_KEYS = ("method", "steps", "learning_rate", "batch_size", "max_length", "lora_rank", "lora_alpha",
                 "lora_target_modules", "seeds", "loss_tokens", "recheck_tokens", "recheck_steps", "completion_only_loss",
                 "n_resamples", "training_args")


def cmd_validate(args: argparse.Namespace) -> int:
    if args.example:
        print(EXAMPLE_VALIDATE_CONFIG, end="")
        return 0
    config_file, config = _command_config(args, "validate", ("model", "sae", "train_data", "targets"))
    options = dict(config_file.get("validation") or {})
    unknown = sorted(set(options) - set(VALIDATE_KEYS))
    if unknown:
        raise STSInputError(f"{args.config}: unknown `validation` key(s) {unknown}; valid keys are "
                            f"{list(VALIDATE_KEYS)}.")
    for key in ("method", "steps", "seeds", "learning_rate"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if isinstance(options.get("learning_rate"), str):  # YAML reads 2e-4 as a string
        try:
            options["learning_rate"] = float(options["learning_rate"])
        except ValueError as err:
            raise STSInputError(f"validation.learning_rate={options['learning_rate']!r} is not a number.") from err
    from .validate import _check_arguments, multiple_choice_accuracy, validate

    _check_arguments(options.get("method", "lora"), options.get("seeds", [config.seed]), options.get("steps", 32),
                     options.get("learning_rate"), options.get("batch_size", 8), options.get("max_length", 256),
                     options.get("lora_rank", 8), options.get("loss_tokens", 4096), options.get("recheck_tokens", 2048),
                     None, options.get("n_resamples", 2000), True)  # bad settings fail before the model loads
    targets = config_file["targets"]
    if isinstance(targets, (dict, list)) and len(targets) < 3:
        raise STSInputError(f"{args.config}: `targets` has {len(targets)} domain(s); validation correlates across "
                            "domains and needs at least 3.")
    metric = None
    if config_file.get("multiple_choice"):
        choices = config_file["multiple_choice"]
        if not isinstance(choices, dict):
            raise STSInputError(f"{args.config}: `multiple_choice` must map domain -> JSONL of "
                                "{question, choices, answer}.")
        if isinstance(targets, dict) and set(map(str, targets)) - set(map(str, choices)):
            raise STSInputError(f"{args.config}: `multiple_choice` lacks items for "
                                f"{sorted(set(map(str, targets)) - set(map(str, choices)))}; give a JSONL for "
                                "every target domain, or drop `multiple_choice`.")
        metric = multiple_choice_accuracy({str(k): _expand(v) for k, v in choices.items()})
    output_dir = Path(args.output_dir or config_file.get("output_dir") or "sts-validation")
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    result = validate(model, tokenizer, _expand(config_file["sae"]), _expand(config_file["train_data"]),
                      _expand(config_file["targets"]), config, metric=metric,
                      demonstrations=_expand(config_file.get("demonstrations")), output_dir=output_dir,
                      progress=not args.no_progress, **options)
    print(result.table())
    print(f"\nwrote {result.files['json']}" + (f" and {result.files['plot']}" if "plot" in result.files else "")
          + f" ({result.timings['total']:.1f} s)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import Calibration

    calibration = Calibration.from_validation(args.validations, args.features, level=args.level)
    path = calibration.save(args.out)
    print(f"calibration on {calibration.n} measured (domain, seed) pairs, features {calibration.features}: "
          f"residual std {calibration.sigma:.2%} of the NLL; {calibration.level:.0%} intervals")
    print(f"wrote {path}; use it with STSCallback(..., calibration={str(path)!r})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    html_path, md_path = write_report(Path(args.output_dir), protected=args.protected)
    print(f"wrote {html_path}\nwrote {md_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sts",
        description="Forecast which capabilities post-training on a dataset will move, before training "
                    "(SAE-based Transferability Score), and check the forecast during training.",
        epilog="Start with `sts demo` (offline, real model) or `sts forecast --example` for a config template.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("forecast", help="rank target domains by how much training on a dataset will move them",
                       description="Compute the STS forecast described by CONFIG (YAML or JSON), print the ranked "
                                   "table and write the forecast JSON.")
    p.add_argument("config", nargs="?", help="YAML/JSON file with model, sae, train_data, targets, options, output")
    p.add_argument("-o", "--output", help="forecast JSON path (default: the config's `output` or forecast.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an STSConfig option (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--example", action="store_true", help="print an example config and exit")
    p.set_defaults(func=cmd_forecast)

    p = sub.add_parser("train-sae", help="train a TopK SAE (sae-lens format) for a model that has none",
                       description="Collect residual-stream activations at LAYER over the given texts and train a "
                                   "TopK SAE with sae-lens; prints variance unexplained and dead latents.")
    p.add_argument("--model", required=True, help="Hugging Face folder or gemma-3-270m")
    p.add_argument("--layer", type=int, required=True, help="decoder block whose output the SAE reads")
    p.add_argument("--data", nargs="+", required=True, help="JSONL paths or registered domain names")
    p.add_argument("--d-sae", type=int, default=4096, help="number of latents (default 4096)")
    p.add_argument("-k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens (default 200000)")
    p.add_argument("--device", default=None)
    p.add_argument("-o", "--output", required=True, help="folder to write the SAE to")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser("domains", help="list the built-in offline text domains",
                       description="Target domains that can be referred to by name in configs and STSCallback.")
    p.add_argument("--count", action="store_true", help="load each domain and show its size")
    p.set_defaults(func=cmd_domains)

    p = sub.add_parser("demo", help="end-to-end demo on Gemma 3 270M, offline",
                       description="Builds Gemma 3 270M from the offline GGUF package, trains (once, cached) an SAE "
                                   "at layer 12, forecasts the effect of fine-tuning on Python code for real text "
                                   "domains, then runs a short training with the callback when available.")
    p.add_argument("-o", "--output", default="outputs/demo", help="where to write results (default outputs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller budgets (a few minutes on 2 CPU cores)")
    p.add_argument("--train-steps", type=int, default=None, help="steps of the short training run")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gate", help="accept / reject / weight candidate datasets of a mixture before training",
                       description="Forecast every candidate dataset of CONFIG over the target domains (encoded "
                                   "once), reject candidates predicted to move the protected domains too much "
                                   "(absolute limits, a rank rule, or by default more than `tolerance` x the median "
                                   "of the other candidates), weight the accepted ones (the paper's STS-proportional "
                                   "rule or min_impact), print the decision table, write the decision JSON and, "
                                   "with a filtered_dir, each accepted candidate minus its worst examples as JSONL.",
                       epilog="Start from `sts gate --example`. Exit status 2 when every candidate is rejected.")
    p.add_argument("config", nargs="?", help="YAML/JSON file with model, sae, candidates, targets, protected, rules")
    p.add_argument("-o", "--output", help="decision JSON path (default: the config's `output` or gate.json)")
    p.add_argument("--filtered-dir", help="write the filtered accepted candidates as JSONL here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an STSConfig option (repeatable)")
    p.add_argument("--no-example-scores", action="store_true",
                   help="skip per-example scoring (one pass less per candidate; no filtering)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--example", action="store_true", help="print an example config and exit")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("validate", help="check a forecast on your setup: fine-tune for real, measure, correlate",
                       description="Compute the forecast described by CONFIG, fine-tune a copy of the model on the "
                                   "training data (LoRA or full, a few dozen steps, one run per seed) with the STS "
                                   "callback, measure every target domain's held-out NLL (and multiple-choice "
                                   "accuracy when given) before and after, and report Pearson / Spearman (p-values, "
                                   "bootstrap 95% intervals) between each score variant and the measured change, "
                                   "plus the overlap of forecast and actually-shifted latents. Writes "
                                   "OUTPUT_DIR/sts/validation.json, validation.png and report.html.",
                       epilog="Start from `sts validate --example`. Needs at least 3 target domains.")
    p.add_argument("config", nargs="?", help="YAML/JSON file with model, sae, train_data, targets, validation, options")
    p.add_argument("-o", "--output-dir", help="output folder (default: the config's `output_dir` or sts-validation)")
    p.add_argument("--method", choices=("lora", "full"), default=None, help="training method (default lora)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per seed (default 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, e.g. --seeds 0 1 2 (default 0)")
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="learning rate (default 2e-4 for lora, 1e-5 for full)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an STSConfig option (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--example", action="store_true", help="print an example config and exit")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("calibrate", help="fit forecast score -> predicted NLL change (with an interval) on validate runs",
                       description="Fit a Calibration on the (domain, seed) pairs of one or more `sts validate` "
                                   "outputs; STSCallback(calibration=PATH) then predicts each domain's end-of-"
                                   "training change at train start and warns for protected domains.")
    p.add_argument("validations", nargs="+", metavar="VALIDATION",
                   help="validation.json files or the output_dir of `sts validate` runs")
    p.add_argument("--features", nargs="+", default=[DEFAULT_SIGNED],
                   help=f"forecast scores to calibrate on (default: {DEFAULT_SIGNED}; e.g. sts_icl signed_usage)")
    p.add_argument("--level", type=float, default=0.9, help="prediction interval level (default 0.9)")
    p.add_argument("--out", default="calibration.json")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="write report.html (plots, shifted latents) and report.md for a run",
                       description="Read forecast.json / history.jsonl (and gate.json when present) from OUTPUT_DIR "
                                   "(the trainer's output_dir or its sts/ folder) and write a self-contained "
                                   "report.html plus a report.md summary for a pull-request comment next to them.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="trainer output_dir or its sts/ folder")
    p.add_argument("--protected", nargs="+", default=None,
                   help="protected domains (default: those the callback stored in sts/settings.json)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except STSError as err:
        print(f"sts: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
