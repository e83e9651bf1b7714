"""The ``sts`` command: forecasts from a config file, SAE training, the built-in domains, the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

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


def cmd_forecast(args: argparse.Namespace) -> int:
    from .config import STSConfig
    from .forecast import forecast

    if args.example:
        print(EXAMPLE_CONFIG, end="")
        return 0
    if not args.config:
        raise STSInputError("sts forecast needs a CONFIG file (see `sts forecast --example`).")
    config_file = _read_config(args.config)
    missing = [k for k in ("model", "sae", "train_data", "targets") if k not in config_file]
    if missing:
        raise STSInputError(f"{args.config} lacks {missing}; see `sts forecast --example`.")
    options = dict(config_file.get("options") or {})
    options.update(dict(_parse_override(item) for item in args.set or []))
    config = STSConfig.from_dict(options)  # validated before the model is loaded
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
