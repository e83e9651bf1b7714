"""The ``sts`` command: forecasts from a config file, validation by real fine-tuning, SAE training, the
built-in domains, the demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.atomic import atomic_write_text, check_writable_folder, output_target
from ..core.config import DEFAULT_SIGNED, device_problem
from ..core.data import named_items, repeated_names
from ..core.distributed import is_main_process
from ..core.errors import (STSConfigError, STSDataWarning, STSError, STSInputError,
                           STSNegativeTransferWarning, first_line)
from ..core.run_store import FORECAST_FILE, HISTORY_FILE

EXAMPLE_CONFIG = """\
# sts forecast config (YAML or JSON)
model: gemma-3-270m            # a local Hugging Face folder, a hub name already in the cache, or gemma-3-270m
sae: ~/.cache/sts_callback/sae/gemma-3-270m-L12-w4096-k32   # sae-lens folder, or {release: ..., sae_id: ...}
train_data: my_sft_set.jsonl   # texts / messages / prompt+completion records, or a registered domain name
targets:                       # name -> JSONL path or registered domain name (see `sts domains`)
  legal: legal
  code: python_code
  my_eval: evals/my_eval.jsonl
options:                       # any STSConfig field
  n_shifted: 100
  shift_tokens: 20000
  domain_tokens: 10000
output: forecast.json          # a new or regular file (a device, FIFO or folder there is refused)
# device: cuda                       # where the model runs (default cpu): cpu, cuda, cuda:1, mps
# dtype: bfloat16                    # model weights: float32 (default), bfloat16, float16, float64 or auto
# calibration: my_calibration.json   # `sts calibrate` output or a built-in name (gemma3-270m-lora): predicted % changes
# not_predicted: [code]              # targets a calibration should not predict (the training data's own held-out part)
# What the training is, when it is not SFT (the shift the callback would forecast at the run's start):
# shift: auto                        # auto (default): prompt/chosen/rejected data -> chosen_vs_rejected (DPO),
#                                    #   reward_funcs -> reward_weighted (GRPO), teacher -> teacher_completions
#                                    #   (distillation), else in_context; or name one of those, reward_filtered,
#                                    #   teacher_vs_student
# reward_funcs: [my_rewards.py:format_reward]  # GRPO's reward functions: 'package.module:name' or 'file.py:name'
# teacher: path/to/teacher_model     # distillation: the teacher (it must share the model's tokenizer)
# settings: {num_generations: 8, max_completion_length: 256, temperature: 1.0}  # the trainer's generation
#                                    #   settings (GRPO, distillation), or DPO's {max_length, truncation_mode}
"""


class _RepeatedKey(Exception):
    """A key given twice in one mapping of a config (YAML and JSON readers keep the last value silently)."""

    def __init__(self, key: Any, at: str = "", first: str = "", keys: list[Any] | None = None):
        super().__init__(key)
        self.key, self.at, self.first, self.keys = key, at, first, keys

    def message(self, where: str) -> str:
        at = (f" at {self.at} (first at {self.first})" if self.at
              else f" in the object with keys {self.keys}" if self.keys else "")
        return (f"{where} repeats the key {self.key!r}{at}; the reader would keep only the last value and silently "
                "drop the other. Rename or remove one.")


EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key repeated in one mapping (:class:`_RepeatedKey`)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.checked: set[int] = set()

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode) and id(node) not in self.checked:
                self.checked.add(id(node))  # merges (<<) rewrite node.value: check its own keys once, first
                seen: dict[Any, str] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # keys merged in may be overridden: that is what a merge is for
                    key = self.construct_object(key_node, deep=True)
                    mark = key_node.start_mark
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue  # an unhashable key: the base class reports it
                    if first is not None:
                        raise _RepeatedKey(key, f"line {mark.line + 1}, column {mark.column + 1}", first)
                    seen[key] = f"line {mark.line + 1}, column {mark.column + 1}"
            return super().construct_mapping(node, deep)

    # YAML 1.1 (PyYAML) reads 2e-4, 5e6 and 5.0e6 as text; a config's numbers are written that way (YAML 1.2 floats)
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json: a key repeated in one object is a :class:`_RepeatedKey`."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _RepeatedKey(key, keys=[k for k, _ in pairs])
        data[key] = value
    return data


def _read_config(path: str) -> dict[str, Any]:
    """The config file as a mapping; every way it cannot be read is an :class:`STSInputError` naming the file."""
    file = Path(os.path.expanduser(path))
    if not file.exists():
        raise STSInputError(f"Config file {path} does not exist; check the path (or write one from the template "
                            "that `--example` prints).")
    if not file.is_file():
        raise STSInputError(f"Config {path} is not a file; pass a YAML or JSON config file.")
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no text
    except UnicodeDecodeError as err:
        raise STSInputError(f"Config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                            "UTF-8.") from err
    if file.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        except _RepeatedKey as err:
            try:  # json gives no position; YAML reads most JSON and does
                _load_yaml(text)
            except _RepeatedKey as located:
                err = located if located.key == err.key else err
            except Exception:  # noqa: BLE001 - only a better message was sought
                pass
            raise STSInputError(err.message(f"Config file {path}")) from err
        except json.JSONDecodeError as err:
            raise STSInputError(f"Config file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                                f"{err.colno}); fix it there.") from err
    else:
        import yaml

        try:
            data = _load_yaml(text)
        except _RepeatedKey as err:
            raise STSInputError(err.message(f"Config file {path}")) from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise STSInputError(f"Config file {path} is not valid YAML ({problem}{where}); fix it there.") from err
    if not isinstance(data, dict):
        raise STSInputError(f"{path} must hold a mapping with keys model, sae, ... (see `--example`), not "
                            f"{type(data).__name__}.")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise STSInputError(f"--set {item!r}: use KEY=VALUE, e.g. --set n_shifted=50.")
    key, value = item.split("=", 1)
    import yaml

    try:
        return key.strip(), _load_yaml(value)
    except _RepeatedKey as err:
        raise STSInputError(err.message(f"--set {item!r}")) from err
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise STSInputError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it or fix it, e.g. "
                            "--set seed=3.") from err


def load_model(spec: str, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) from ``gemma-3-270m`` (the offline demo model) or a Hugging Face folder / name."""
    if spec in ("gemma-3-270m", "gemma3-270m"):
        from .models import load_gemma3_270m

        model, tokenizer = load_gemma3_270m()
        if dtype not in (None, "auto"):  # the GGUF is dequantised to float32; a config's dtype still applies
            model = model.to(_torch_dtype(dtype))
    else:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _check_model(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(spec))
            try:
                model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec), dtype=_torch_dtype(dtype))
            except ValueError:  # a VLM (LLaVA, Gemma 3 4B+, ...): its language model is read, with its processor
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(os.path.expanduser(spec),
                                                                    dtype=_torch_dtype(dtype))
                tokenizer = _processor_or(spec, tokenizer)
        except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: weights cut short
            raise STSInputError(
                f"Could not load model {spec!r} ({first_line(err)}). Pass a local Hugging Face folder (config.json and "
                "weights, as save_pretrained writes), a hub name already in the cache (offline: HF_HUB_OFFLINE=1), "
                "or gemma-3-270m.") from err
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


def _processor_or(spec: str, tokenizer: Any) -> Any:
    """A VLM folder's processor (its chat template may be the processor's only), else ``tokenizer``."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(os.path.expanduser(spec))
    except (OSError, ValueError):
        return tokenizer


# `dtype:` of a config: "auto" (the checkpoint's own) or a floating torch dtype, by torch's name for it.
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")
DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64"}  # torch's own names, read as before
DTYPE_HINTS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64", "f32": "float32",
               "f16": "float16", "bfloat": "bfloat16"}


def _torch_dtype(dtype: str | None) -> Any:
    """The ``dtype`` argument of ``from_pretrained`` for a config's (checked) ``dtype``; float32 by default."""
    import torch

    if dtype == "auto":
        return "auto"
    return getattr(torch, DTYPE_ALIASES.get(dtype, dtype)) if dtype else torch.float32


def _check_model_settings(where: str, config_file: dict[str, Any], config: Any) -> None:
    """The config's ``dtype`` and ``device`` (and options.device) can be used here, before the model loads: a
    wrong name or a GPU this machine lacks is a one-line error instead of a traceback from torch."""
    dtype = config_file.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and (dtype in MODEL_DTYPES or dtype in DTYPE_ALIASES)):
        hint = DTYPE_HINTS.get(str(dtype).lower())
        raise STSInputError(f"{where}: dtype={dtype!r} is not a model dtype; "
                            f"{f'did you mean {hint!r}? ' if hint else ''}Use one of {list(MODEL_DTYPES)} (auto: the "
                            "checkpoint's own), or leave it out for float32.")
    for key, value in (("device", config_file.get("device")), ("options.device", config.device)):
        _check_device(value, f"{where}: {key}")


def _check_device(value: Any, where: str) -> None:
    problem = device_problem(value, available=True) if value is not None else None
    if problem:
        raise STSInputError(f"{where}={value!r}: {problem}")


def _expand(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):  # targets: [~/law.jsonl, ...]
        return [_expand(v) for v in value]
    return value


def _command_config(args: argparse.Namespace, command: str, required: tuple[str, ...]):
    """(config file contents, validated STSConfig with --set overrides), before any model is loaded: unknown
    keys at any level, an unusable model spec and unreadable data files are errors here."""
    from ..core.config import STSConfig

    if not args.config:
        raise STSInputError(f"sts {command} needs a CONFIG file (see `sts {command} --example`).")
    config_file = _read_config(args.config)
    _check_config_keys(args.config, command, config_file)
    missing = [k for k in required if config_file.get(k) is None]  # `targets:` with no value is missing too
    if missing:
        raise STSInputError(f"{args.config} lacks {missing} (or leaves them empty); see `sts {command} --example`.")
    options = dict(config_file.get("options") or {})
    options.update(dict(_parse_override(item) for item in args.set or []))
    config = STSConfig.from_dict(options)
    _check_model(config_file["model"])
    from ..core.sae import check_sae_folder, missing_sae_folder

    sae = _expand(config_file["sae"])  # a path, as for the model
    problem = missing_sae_folder(sae) if isinstance(sae, (str, dict)) else None  # a bare name is a path too
    if problem:
        raise STSInputError(f"{args.config}: {problem}")
    folder = sae.get("path") if isinstance(sae, dict) else sae
    if isinstance(folder, str) and Path(os.path.expanduser(folder)).is_dir():
        check_sae_folder(os.path.expanduser(folder))  # a damaged folder: named now, not after the model loads
        _check_sae_fits_model(args.config, config_file["model"], os.path.expanduser(folder), config)
    _check_model_settings(args.config, config_file, config)
    _check_data_values(args.config, config_file)
    _check_data_files(_data_specs(config_file))
    return config_file, config


# ---------------------------------------------------------------------------------------- input checks
# The top-level keys of a gate config that are GateRules fields (its rules; budget is an input of the call).
GATE_RULE_KEYS = ("score", "limits", "max_rank", "tolerance", "weights", "wanted", "floor")
CONFIG_KEYS = {
    "forecast": ("model", "sae", "train_data", "targets", "demonstrations", "options", "output", "device", "dtype",
                 "calibration", "not_predicted", "shift", "reward_funcs", "teacher", "settings"),
    "gate": ("model", "sae", "candidates", "targets", "protected", *GATE_RULE_KEYS, "budget", "options", "output",
             "filtered_dir", "keep_fraction", "threshold", "device", "dtype"),
    "validate": ("model", "sae", "train_data", "targets", "demonstrations", "validation", "multiple_choice",
                 "options", "output_dir", "device", "dtype", "reward_funcs"),
}
SAE_SPEC_KEYS = ("release", "sae_id", "path")
OUTPUT_KEYS = ("output", "output_dir", "filtered_dir")
GEMMA_NAMES = ("gemma-3-270m", "gemma3-270m")


def _unknown_keys(where: str, given: Any, valid: Any, listing: str | None = None) -> None:
    """Raise naming the keys of mapping ``given`` that are not in ``valid`` (closest valid key suggested)."""
    import difflib

    if given is None:
        return
    if not isinstance(given, dict):
        raise STSInputError(f"{where} must be a mapping (key: value), not {type(given).__name__}.")
    valid = [str(v) for v in valid]
    unknown = [str(k) for k in given if str(k) not in valid]
    if not unknown:
        return
    hints = {k: difflib.get_close_matches(k, valid, n=1, cutoff=0.6) for k in unknown}
    hint = " ".join(f"Did you mean {m[0]!r} (not {k!r})?" for k, m in hints.items() if m)
    listed = listing or (f"valid keys are {sorted(valid)}" if valid else "it takes no keys")
    raise STSInputError(f"{where}: unknown key(s) {sorted(unknown)}. {hint + ' ' if hint else ''}"
                        f"{listed[0].upper() + listed[1:]}.")


def _check_config_keys(path: str, command: str, config_file: dict[str, Any]) -> None:
    """Unknown keys at any level of a config file are errors (a typo must not run with defaults)."""
    import dataclasses

    from ..core.config import STSConfig

    _unknown_keys(f"{path}", config_file, CONFIG_KEYS[command], f"`sts {command}` takes {list(CONFIG_KEYS[command])}")
    for key in OUTPUT_KEYS:  # YAML reads `output: 5` as a number and `output: yes` as true
        value = config_file.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise STSInputError(f"{path}: {key} must be a path, got {value!r} ({type(value).__name__}). Quote it "
                                f"if it is meant as a name ({key}: \"{value}\"), or leave the key out for the "
                                "default.")
    if isinstance(config_file.get("sae"), dict):
        _unknown_keys(f"{path}: sae", config_file["sae"], SAE_SPEC_KEYS,
                      "an SAE is a folder, 'release::sae_id', {release: ..., sae_id: ...} or {path: ...}")
    _unknown_keys(f"{path}: options", config_file.get("options"), [f.name for f in dataclasses.fields(STSConfig)],
                  f"valid STSConfig fields are {sorted(f.name for f in dataclasses.fields(STSConfig))}")
    targets = config_file.get("targets")
    target_names = _target_names(targets) if isinstance(targets, (dict, list)) else None
    if command == "validate":
        validation = config_file.get("validation")
        _unknown_keys(f"{path}: validation", validation, VALIDATE_KEYS)
        if isinstance(validation, dict) and validation.get("training_args") is not None:
            from ..validation.validate import training_argument_fields, trl_argument_fields

            fields = training_argument_fields() | trl_argument_fields()
            _unknown_keys(f"{path}: validation.training_args", validation["training_args"], fields,
                          "valid keys are the fields of transformers.TrainingArguments (and of TRL's DPOConfig "
                          "for preference pairs, GRPOConfig with reward_funcs)")
        if target_names is not None:
            _unknown_keys(f"{path}: multiple_choice", config_file.get("multiple_choice"), target_names,
                          f"its keys are target domains: {target_names}")
    if command == "gate":
        protected = config_file.get("protected")
        protected = [protected] if isinstance(protected, str) else protected
        if isinstance(config_file.get("limits"), dict) and isinstance(protected, list):
            _unknown_keys(f"{path}: limits", config_file["limits"], protected,
                          f"its keys are protected domains: {[str(p) for p in protected]}")
        candidates = config_file.get("candidates")
        if isinstance(config_file.get("wanted"), dict) and isinstance(candidates, dict):
            _unknown_keys(f"{path}: wanted", config_file["wanted"], list(candidates),
                          f"its keys are candidates: {[str(c) for c in candidates]}")


def _check_model(spec: Any) -> None:
    """A model that cannot be there fails before anything is loaded (a hub name is left to the loader)."""
    if not isinstance(spec, str) or not spec.strip():
        raise STSInputError(f"model={spec!r}: give a local Hugging Face folder, a hub name already in the cache, "
                            "or gemma-3-270m.")
    if spec in GEMMA_NAMES:
        return
    path = Path(os.path.expanduser(spec))
    if path.exists():
        if not path.is_dir():
            raise STSInputError(f"Model {spec} is a file; pass the model's folder (with config.json).")
        if not (path / "config.json").is_file():
            raise STSInputError(f"Model folder {spec} has no config.json: not a Hugging Face model folder "
                                "(model.save_pretrained(folder) and tokenizer.save_pretrained(folder) write one).")
        return
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_like_path:
        raise STSInputError(f"Model folder {spec} does not exist; check the path (or give a hub name already in "
                            "the cache, or gemma-3-270m).")


def _local_model_config(spec: str) -> Any:
    """The text config of a model that is on this machine already (a folder, or the demo model once built),
    read from its config.json alone; None for a hub name or a config transformers cannot read (the loader
    says why)."""
    from transformers import AutoConfig

    from .models import GEMMA3_270M, default_cache_dir

    folder = default_cache_dir() / GEMMA3_270M if spec in GEMMA_NAMES else Path(os.path.expanduser(spec))
    if not (folder / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - a config only the model's own code reads: checked once it loads
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_sae_fits_model(path: str, model_spec: str, sae_folder: str, config: Any) -> None:
    """An SAE folder for another model (its width, or a layer the model lacks, or another layer than
    ``options.layer``) is refused from the two folders' JSON, before minutes of model loading."""
    from ..core.capture import config_hidden_size, config_num_layers
    from ..core.sae import check_sae_for_model, layer_to_read, sae_folder_reads

    d_in, hook_name, sae_layer, d_sae = sae_folder_reads(sae_folder)
    if d_sae is not None and config.n_shifted > d_sae:  # said now, not after the model loads
        raise STSConfigError(f"{path}: n_shifted={config.n_shifted} is larger than the SAE width {d_sae} "
                             f"({sae_folder}); set n_shifted to at most {d_sae} (options: or --set n_shifted=...).")
    if config.layer is None and sae_layer is None:
        return  # said where it is read (STSConfig.layer is then needed), with the loaded SAE's own words
    try:
        layer = layer_to_read(config.layer, sae_layer, hook_name)
        model_config = _local_model_config(model_spec)
        if model_config is None or d_in is None:
            return
        hidden, layers = config_hidden_size(model_config), config_num_layers(model_config)
        if hidden is not None and layers is not None:
            check_sae_for_model(d_in, hook_name, hidden, layers, layer)
    except STSError as err:
        raise type(err)(f"{path}: the SAE {sae_folder} and the model {model_spec}: {err}") from err


def _data_specs(config_file: dict[str, Any]) -> list[Any]:
    """The config's values that name data: training data, target / candidate domains, demonstrations,
    multiple-choice sets."""
    specs: list[Any] = []
    for key in ("train_data", "demonstrations", "targets", "candidates", "multiple_choice"):
        value = config_file.get(key)
        if isinstance(value, dict):
            specs.extend(value.values())
        elif isinstance(value, (list, tuple)):
            specs.extend(value)
        elif value is not None:
            specs.append(value)
    return specs


def _target_names(targets: Any) -> list[str]:
    """The names the target domains get (as :func:`~sts_callback.core.data.load_domains` names them)."""
    if isinstance(targets, dict):
        return [str(k) for k in targets]
    names = []
    for item in targets if isinstance(targets, (list, tuple)) else []:
        path = _existing_file(_expand(item))
        names.append(path.stem if path is not None else str(item) if isinstance(item, str) else "data")
    return names


def _check_data_values(path: str, config_file: dict[str, Any]) -> None:
    """Each value that names data can be data (a file, a registered domain, a list of texts), and no two
    names of one mapping are equal as text, before the model loads; the error names the entry."""
    from ..core.data import check_data_spec
    from ..core.lm_eval_tasks import LmEvalTarget, is_lm_eval_target

    for key in ("targets", "candidates", "multiple_choice"):
        if isinstance(config_file.get(key), dict):
            named_items(config_file[key], f"{path}: `{key}`")
    for key in ("train_data", "demonstrations"):
        if config_file.get(key) is not None:
            check_data_spec(_expand(config_file[key]), f"`{key}` in {path}")
            _no_empty_list(config_file[key], f"`{key}` in {path}")
    targets = config_file.get("targets")
    if targets is not None:
        if not isinstance(targets, (dict, list)):
            raise STSInputError(f"{path}: `targets` must be a mapping name -> data (a JSONL path, a registered domain "
                                f"name or a list of texts) or a list of domain names / paths, not "
                                f"{type(targets).__name__}.")
        if not targets:
            raise STSInputError(f"{path}: `targets` is empty; name at least one target domain.")
        items = targets.items() if isinstance(targets, dict) else enumerate(targets)
        for name, value in items:
            what = f"target {str(name)!r}" if isinstance(targets, dict) else f"targets[{name}]"
            if isinstance(targets, dict) and is_lm_eval_target(value):  # its fields now; its task when read
                try:
                    LmEvalTarget.from_spec(value, str(name))
                except STSError as err:
                    raise STSInputError(f"{path}: {err}") from err
                continue
            check_data_spec(_expand(value), f"{what} in {path}")
            _no_empty_list(value, f"{what} in {path}")
        names = _target_names(targets)
        repeated = repeated_names(names)
        if repeated:
            raise STSInputError(f"{path}: two target domains are named {repeated[0]!r}; give `targets` as a mapping "
                                "name -> data.")
    if isinstance(config_file.get("candidates"), dict):
        for name, value in config_file["candidates"].items():
            check_data_spec(_expand(value), f"candidate {str(name)!r} in {path}")
            _no_empty_list(value, f"candidate {str(name)!r} in {path}")


def _no_empty_list(value: Any, what: str) -> None:
    """Inline data given as an empty list (a filter that kept nothing) is said now, not after the model loads."""
    if isinstance(value, (list, tuple)) and not value:
        raise STSInputError(f"{what} is an empty list; give it texts (or a data file, or a domain name).")


def _existing_file(value: Any) -> Path | None:
    """``value`` as the path of an existing file, else None (inline texts are not paths)."""
    if not isinstance(value, (str, Path)) or (isinstance(value, str) and (len(value) > 4096 or "\n" in value)):
        return None
    try:
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def _check_data_files(specs: list[Any]) -> None:
    """Every data file named can be read as data (UTF-8, a .json parses, a table opens) and holds at least one
    record, before the model loads; the error names the file."""
    from ..core.data import load_corpus

    for spec in specs:
        path = _existing_file(spec)
        if path is None:
            continue
        with warnings.catch_warnings():  # said once, when the command reads it for use (naming its role)
            warnings.simplefilter("ignore", STSDataWarning)
            texts = len(load_corpus(str(path)))
        if texts == 0:
            raise STSInputError(f"Data file {path} holds no texts (it is empty, or holds only blank lines); give "
                                "it data, or leave it out.")


# --------------------------------------------------------------------------------------- output checks
def _check_output_file(path: str | Path, what: str) -> Path:
    """``path`` can take the file: new or a regular file (a link: the file it points at) that can be written, in
    a folder that can be written. A folder, device, FIFO or socket there is refused: the write would replace it,
    and so is a path written as a folder (``results/``: ``Path`` drops the slash, and a file took the name)."""
    if str(path).endswith(("/", os.sep)):
        raise STSInputError(f"{what} {path} ends with '/', a folder; name the file, e.g. "
                            f"{Path(str(path)) / 'out.json'}.")
    path = Path(os.path.expanduser(str(path)))
    label = what[0].lower() + what[1:]
    real, existing = output_target(path, label)
    if existing is not None and not os.access(real, os.W_OK):
        raise STSInputError(f"{what} {path} exists and cannot be written; choose another path or fix its "
                            "permissions.")
    check_writable_folder(real.parent, f"{label} {path}")
    return path


def _check_output_folder(path: Path, what: str, files: tuple[str, ...] = ()) -> Path:
    """``path`` is a folder, or can be created, and can be written; ``files``: the paths in it that will be
    written, each new or a regular file (see :func:`_check_output_file`)."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise STSInputError(f"{what} {path} is an existing file, not a folder; give a folder path (it is "
                            "created) or move the file away.")
    check_writable_folder(path, f"{what[0].lower() + what[1:]} {path}")
    for name in files:
        if not (path / name).parent.is_dir():  # a subfolder such as sts/ that is a file: refused as a folder
            _check_output_folder((path / name).parent, what)
        output_target(path / name, f"{what[0].lower() + what[1:]}'s file")
    return path


def _check_no_overwrite(outputs: list[tuple[Path, str]], inputs: dict[Path, str],
                        fix: str = "Choose an output path that is none of the inputs, e.g. in a new folder.",
                        folders_whole: bool = True) -> None:
    """No output path is one of the inputs (or another output); ``outputs``: (path, what writes it),
    ``inputs``: path -> what it is. ``folders_whole``: nothing is written inside an input folder either (a model's
    or an SAE's: a file there is part of it)."""
    seen: dict[Path, str] = {}
    for path, what in inputs.items():
        seen.setdefault(path.resolve(), what)
    folders = {path: what for path, what in seen.items() if folders_whole and path.is_dir()}
    for path, what in outputs:
        key = path.resolve()
        if key in seen:
            raise STSInputError(f"{what} would overwrite {path}, which is {seen[key]}. {fix}")
        inside = next((folder for folder in folders if folder in key.parents), None)
        if inside is not None:
            raise STSInputError(f"{what} {path} is inside {inside}, {folders[inside]}, which the run reads; write "
                                "it outside that folder.")
        seen[key] = f"where {what} writes too"


def _check_not_in_a_run(out: Path, runs: list[Path]) -> None:
    """The calibration is not written into a run's STS folder, whose forecast and history it reads (and a later
    `sts calibrate` reads again)."""
    from ..scoring.calibration import run_sts_folder

    for run in runs:
        folder = run_sts_folder(run)
        holds_results = (folder / FORECAST_FILE).exists() or (folder / HISTORY_FILE).exists()
        if holds_results and folder.resolve() in out.resolve().parents:
            raise STSInputError(f"The calibration output {out} is in {folder}, the STS folder of the training run "
                                f"{run}, whose files the calibration reads; write it outside the runs' folders, "
                                "e.g. --out calibration.json.")


def _named_inputs(args: argparse.Namespace, config_file: dict[str, Any]) -> dict[Path, str]:
    """Input files of a config, path -> a description ("the input of candidate 'code'")."""
    inputs: dict[Path, str] = {Path(os.path.expanduser(args.config)): "the config file"}
    labels = {"train_data": "train_data", "demonstrations": "demonstrations", "targets": "target",
              "candidates": "candidate", "multiple_choice": "multiple_choice set"}
    for key, label in labels.items():
        value = config_file.get(key)
        items = (value.items() if isinstance(value, dict)
                 else ((None, v) for v in value) if isinstance(value, (list, tuple)) else [(None, value)])
        for name, spec in items:
            path = _existing_file(spec)
            if path is not None:
                inputs.setdefault(path, f"the input of {label} {str(name)!r}" if name is not None
                                  else f"the {label} input")
    sae = config_file.get("sae")
    for key, spec in (("model", config_file.get("model")), ("SAE", sae.get("path") if isinstance(sae, dict) else sae),
                      ("teacher", config_file.get("teacher")),
                      ("calibration", getattr(args, "calibration", None) or config_file.get("calibration"))):
        where = Path(os.path.expanduser(spec)) if isinstance(spec, str) else None
        if where is not None and where.exists():
            inputs.setdefault(where, f"the {key} {'folder' if where.is_dir() else 'file'}")
    rewards = config_file.get("reward_funcs")
    for spec in rewards if isinstance(rewards, list) else [rewards]:
        where = Path(os.path.expanduser(spec.rsplit(":", 1)[0])) if isinstance(spec, str) and ":" in spec else None
        if where is not None and where.is_file():
            inputs.setdefault(where, "a reward-function file")
    return inputs


def _calibration_argument(value: str | None, what: str = "--calibration"):
    """``--calibration`` (or the config's key, ``what``): a calibration JSON or a built-in name, loaded now (before
    any model loads)."""
    if value is None:
        return None
    from ..scoring.calibration import BUILTIN, load_calibration

    if value not in BUILTIN and not Path(os.path.expanduser(value)).is_file():
        raise STSInputError(f"{what} {value}: no such file and not a built-in calibration ({sorted(BUILTIN)}); "
                            "fit one on your runs with `sts calibrate`.")
    try:
        return load_calibration(value)
    except STSConfigError as err:
        raise STSInputError(f"{what} {value}: {err}") from err


def _offline_calibration_argument(value: str | None, config: Any = None, what: str = "--calibration"):
    """``--calibration`` of a forecast made without training: loaded, and refused now (before any model loads)
    if it needs what only a training run computes (a run-level term), or a score ``config`` does not compute."""
    calibration = _calibration_argument(value, what)
    if calibration is not None:
        from ..pipelines.forecast import check_calibration_config, check_offline_calibration

        try:
            check_offline_calibration(calibration)
            if config is not None:
                check_calibration_config(calibration, config)
        except STSConfigError as err:
            raise STSInputError(f"{what} {value}: {err}") from err
    return calibration


def _save_after_the_work(save: Any, path: Path, what: str) -> None:
    """``save(path)``, where an OSError (a disk that filled during the work: the output check passed before it) is
    the CLI's one-line error naming the path, not a traceback that hides that the table above was printed. Under a
    launcher, rank 0 writes."""
    if not is_main_process():
        return
    try:
        save(path)
    except OSError as err:
        raise STSInputError(f"Cannot write the {what} to {path} ({err.strerror or err}); only the table above "
                            f"has it, and {path} was left as it was. Free space there (or choose another output "
                            "path) and run again.") from err


def cmd_forecast(args: argparse.Namespace) -> int:
    from ..pipelines.shifts import training_forecast
    from ..reporting.report import shift_label

    if args.example:
        return _print_example(args, EXAMPLE_CONFIG)
    config_file, config = _command_config(args, "forecast", ("model", "sae", "train_data", "targets"))
    output = _check_output_file(args.output or config_file.get("output") or "forecast.json",
                                "The forecast output")
    _check_no_overwrite([(output, f"The forecast output {output}")], _named_inputs(args, config_file))
    calibration = _offline_calibration_argument(args.calibration or config_file.get("calibration"), config,
                                                "--calibration" if args.calibration else f"{args.config}: calibration:")
    not_predicted = args.not_predicted or config_file.get("not_predicted") or []
    not_predicted = [not_predicted] if isinstance(not_predicted, str) else list(not_predicted)  # one name, not letters
    targets = config_file["targets"]
    names = _target_names(targets)
    # a list target may be named by its entry as written (a path) as well as by its domain name (its stem)
    domain_of = {**({str(t): n for t, n in zip(targets, names)} if isinstance(targets, list) else {}),
                 **{n: n for n in names}}
    unknown = [n for n in not_predicted if n not in domain_of]
    if unknown:
        raise STSInputError(f"not_predicted {unknown}: not among the targets {names}; name target domains.")
    not_predicted = [domain_of[n] for n in not_predicted]
    if not_predicted and calibration is None:
        raise STSInputError("not_predicted only applies with a calibration (--calibration FILE|NAME).")
    training = _training_inputs(args, config_file)
    if calibration is not None:  # applied after the forecast: what it reads is computed in it, if the shift can
        from ..pipelines.forecast import check_icl_loss_shift, with_icl_loss

        try:  # before the model loads
            check_icl_loss_shift(calibration, training["shift"])
        except STSConfigError as err:
            raise STSInputError(f"--calibration: {err}") from err
        config = with_icl_loss(config, calibration)
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    teacher = _load_teacher(training["teacher"], config_file, tokenizer)
    result = training_forecast(model, tokenizer, _expand(config_file["sae"]), training["train"],
                               _expand(config_file["targets"]), config, shift=training["shift"],
                               demonstrations=_expand(config_file.get("demonstrations")), teacher=teacher,
                               reward_funcs=training["reward_funcs"], settings=training["settings"],
                               progress=not args.no_progress and is_main_process())
    if calibration is not None:
        result.apply_calibration(calibration, exclude=not_predicted)
    print(result.table())
    chosen = "" if training["asked"] != "auto" else " (shift: auto)"
    print(f"shift: {shift_label({'settings': result.settings})}{chosen}")
    _save_after_the_work(result.save, output, "forecast")
    print(f"\nwrote {output} ({result.tokens_per_second:.0f} tokens/s, {result.timings['total']:.1f} s)")
    return 0


def _training_inputs(args: argparse.Namespace, config_file: dict[str, Any]) -> dict[str, Any]:
    """What the training is (``shift``, ``reward_funcs``, ``teacher``, ``settings``) and its data, read and checked
    before any model loads: the reward functions imported, the shift chosen as the callback would choose it, the
    inputs checked against it (:func:`~sts_callback.pipelines.shifts.check_training_inputs`), the data read as that
    forecast reads it."""
    from ..core.data import load_corpus
    from ..pipelines.distillation import DISTILLATION_SHIFTS
    from ..pipelines.rollouts import prompt_records
    from ..pipelines.shifts import RL_SHIFTS, check_training_inputs, choose_shift

    where = args.config
    asked = args.shift or config_file.get("shift") or "auto"
    reward_funcs = _reward_functions(config_file, where)
    teacher = _expand(config_file.get("teacher"))
    settings = config_file.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise STSInputError(f"{where}: settings must be a mapping (e.g. {{num_generations: 8, temperature: 1.0}}), "
                            f"not {type(settings).__name__}.")
    if teacher is not None:
        try:
            _check_model(teacher)
        except STSInputError as err:
            raise STSInputError(f"{where}: teacher: {err}") from err
    try:
        train = load_corpus(_expand(config_file["train_data"]), name="train")
        missing = "`teacher:`" if asked in DISTILLATION_SHIFTS else "`reward_funcs:`"
        shift = choose_shift(asked, train, rl=reward_funcs is not None, teacher=teacher is not None,
                             has_demonstrations=config_file.get("demonstrations") is not None,
                             where=f"the config gives no {missing}")
        check_training_inputs(shift, reward_funcs=reward_funcs is not None, teacher=teacher is not None,
                              settings=settings)
        # what the forecast reads (the prompts the rollouts are sampled for, or the in-context examples): a record
        # it cannot read is said now, not after the model loads
        read = (prompt_records(train, "train_data") if shift in (*RL_SHIFTS, *DISTILLATION_SHIFTS) else
                train if shift == "in_context" else [])
        for i in range(min(len(read), 64)):
            read[i]
    except STSError as err:
        raise type(err)(f"{where}: {err}") from err
    if teacher is not None:
        _check_same_tokenizer(config_file["model"], teacher)
    return {"asked": asked, "shift": shift, "train": train, "reward_funcs": reward_funcs, "teacher": teacher,
            "settings": settings}


def _reward_functions(config_file: dict[str, Any], where: str) -> list[Any] | None:
    """The config's ``reward_funcs`` imported ('package.module:name' or 'file.py:name'), before any model loads."""
    from ..pipelines.rollouts import check_reward_funcs
    from .python_objects import import_object

    specs = config_file.get("reward_funcs")
    specs = [specs] if isinstance(specs, str) else specs
    if specs is None:
        return None
    if not (isinstance(specs, list) and specs):
        raise STSInputError(f"{where}: reward_funcs must be a list of 'package.module:name' or 'file.py:name' "
                            f"entries, not {specs!r}.")
    return check_reward_funcs([import_object(spec, f"{where}: reward function") for spec in specs])


def _check_same_tokenizer(model: str, teacher: str) -> None:
    """A teacher folder whose tokenizer is not the model folder's is refused before either model loads (the
    offline Gemma's tokenizer comes with its weights: checked after loading, by :func:`_load_teacher`)."""
    if model in GEMMA_NAMES or teacher in GEMMA_NAMES:
        return
    from transformers import AutoTokenizer

    try:
        ours, theirs = (AutoTokenizer.from_pretrained(os.path.expanduser(spec)) for spec in (model, teacher))
    except (OSError, ValueError):
        return  # the model loader names what is wrong with a folder
    _same_vocabulary(ours, theirs, teacher)


def _same_vocabulary(tokenizer: Any, teacher_tokenizer: Any, teacher: str) -> None:
    ours, theirs = (getattr(t, "tokenizer", t) for t in (tokenizer, teacher_tokenizer))  # a VLM's processor
    if ours.get_vocab() != theirs.get_vocab():
        raise STSInputError(f"The teacher's tokenizer ({teacher}: {len(theirs)} tokens) is not the model's "
                            f"({len(ours)} tokens): STS samples the teacher on the model's token ids, so it must "
                            "share the tokenizer. Distil from a teacher of the same family (or one retokenised).")


def _load_teacher(spec: Any, config_file: dict[str, Any], tokenizer: Any) -> Any:
    """The distillation teacher, on the model's device and dtype; it must read the model's token ids."""
    if spec is None:
        return None
    teacher, teacher_tokenizer = load_model(spec, config_file.get("device"), config_file.get("dtype"))
    _same_vocabulary(tokenizer, teacher_tokenizer, spec)
    return teacher


# What `sts train-sae` writes into its folder: sae-lens' inference SAE and train_sae's report.
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "training_report.json")


def _print_example(args: argparse.Namespace, text: str) -> int:
    """``--example``: the example config on stdout; a config path or output beside it is refused (it would be
    ignored: the example is not written there)."""
    output = getattr(args, "output", None) or getattr(args, "output_dir", None)
    given = [f"{name} {value}" for name, value in (("the config", args.config), ("-o", output)) if value]
    if given:
        raise STSInputError(f"--example prints the example config and ignores {' and '.join(given)}; redirect it to a "
                            f"file instead: sts {args.command} --example > my_config.yaml")
    print(text, end="")
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    from .train_sae import SAETrainingConfig, check_training_inputs, train_sae

    # bad settings fail here, before the model loads
    try:
        config = SAETrainingConfig.from_dict({"d_sae": args.d_sae, "k": args.k, "training_tokens": args.tokens})
    except STSConfigError as err:  # said by the flags the user typed, not the Python fields
        message = str(err)
        for field, flag in (("training_tokens", "--tokens"), ("d_sae", "--d-sae"), ("k", "-k")):
            message = message.replace(f"SAETrainingConfig.{field}=", f"{flag} ").replace(f"e.g. {field}=",
                                                                                         f"e.g. {flag} ")
        raise STSInputError(message) from err
    _check_model(args.model)
    _check_data_files(args.data)
    texts = check_training_inputs(args.model, args.layer, args.data)
    _check_device(args.device, "--device")
    output = _check_output_folder(Path(args.output), "The SAE output folder", SAE_FILES)
    model, tokenizer = load_model(args.model, args.device)
    trained = train_sae(model, tokenizer, texts, args.layer, config, output_dir=output, progress=True)
    print(json.dumps(trained.to_dict(), indent=2))
    return 0


def cmd_domains(args: argparse.Namespace) -> int:
    from ..core.corpora import available_domains, load_domain

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

    from ..scoring.calibration import BUILTIN

    if args.train_steps is not None and args.train_steps < 0:
        raise STSInputError(f"--train-steps {args.train_steps}: give a number of steps >= 1, or 0 to skip the "
                            "training run.")
    if args.calibration.lower() == "none":
        calibration = None
    else:  # the demo's forecast is made before its training run: checked as a forecast's, before the model loads
        calibration = _offline_calibration_argument(args.calibration)
        if args.calibration in BUILTIN:  # by name: the demo then says its scope
            calibration = args.calibration
    run_demo(output_dir=_check_output_folder(Path(args.output), "The demo output folder"), quick=args.quick,
             train_steps=args.train_steps, calibration=calibration)
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
# rules: the fields of sts_callback.pipelines.gate.GateRules (all given apply; none of limits / max_rank /
# tolerance given: reject when a protected score > 1.5 x the median of the other candidates)
# limits: {legal: 1.5e+7}      # absolute limits on the gated score, on its own scale (the model's and SAE's:
#                              #   Gemma 3 270M + the demo SAE give STS_icl 1e6-1e7): read a first run's scores
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
filtered_dir: filtered/        # optional: write each accepted candidate minus its worst examples as JSONL (every
                               #   example of every candidate is scored for it, a built-in domain whole: often
                               #   most of the run; leave filtered_dir out, with --no-example-scores, to skip)
keep_fraction: 0.9             # ... keeping this fraction (or `threshold: <score>`)
"""


REJECTED_EXIT = 3  # `sts gate`: every candidate rejected, or filtered to nothing


def cmd_gate(args: argparse.Namespace) -> int:
    from ..pipelines.gate import (GateRules, MixtureRejected, check_budget, check_filter, check_gate_names,
                                  filter_examples, gate_mixture, gated_score, load_candidates, write_jsonl)

    if args.example:
        return _print_example(args, EXAMPLE_GATE_CONFIG)
    config_file, config = _command_config(args, "gate", ("model", "sae", "candidates", "targets", "protected"))
    if not isinstance(config_file["candidates"], dict):
        raise STSInputError(f"{args.config}: `candidates` must be a mapping name -> JSONL path or registered domain "
                            f"name, not {type(config_file['candidates']).__name__}.")
    if not config_file["candidates"]:
        raise STSInputError(f"{args.config}: `candidates` is empty; name at least one candidate dataset "
                            "(name: JSONL path or registered domain name).")
    # every setting fails here, before the model loads (gate_mixture runs the same checks)
    rules = GateRules.from_dict({k: config_file[k] for k in GATE_RULE_KEYS if config_file.get(k) is not None})
    gated_score(rules, config)
    check_budget(config_file.get("budget"))
    check_gate_names([str(c) for c in config_file["candidates"]], _target_names(config_file["targets"]),
                     config_file["protected"], rules)
    keep_fraction, threshold = config_file.get("keep_fraction"), config_file.get("threshold")
    filtered_dir = args.filtered_dir or config_file.get("filtered_dir")
    if not filtered_dir and (keep_fraction is not None or threshold is not None):
        given = "keep_fraction" if keep_fraction is not None else "threshold"
        raise STSInputError(f"{args.config}: `{given}` says what to keep of each accepted candidate in filtered_dir, "
                            f"but no filtered_dir is given; add `filtered_dir: filtered/` (or --filtered-dir DIR), "
                            f"or drop `{given}`.")
    if filtered_dir:
        if args.no_example_scores:
            raise STSInputError("--no-example-scores skips the per-example scores that filtered_dir's filtering "
                                "ranks examples by; drop --no-example-scores, or drop filtered_dir "
                                f"({'--filtered-dir' if args.filtered_dir else f'{args.config}: filtered_dir:'}).")
        if keep_fraction is None and threshold is None:
            keep_fraction = 0.9
        check_filter(keep_fraction, threshold)
    output = _check_output_file(args.output or config_file.get("output") or "gate.json", "The decision output")
    outputs = [(output, f"The decision output {output}")]
    if filtered_dir:
        filtered_dir = _check_output_folder(Path(filtered_dir), "filtered_dir")
        # each candidate's name becomes a file name there: one that reaches out of the folder is refused
        unsafe = [str(n) for n in config_file["candidates"] if Path(str(n)).name != str(n) or str(n) in ("", ".", "..")]
        if unsafe:
            raise STSInputError(f"Candidate name(s) {unsafe} cannot be file names in filtered_dir (each accepted "
                                "candidate is written there as <name>.jsonl); name candidates without '/' or "
                                "'..', e.g. 'code_v2'.")
        for name in config_file["candidates"]:  # which are accepted is known only later: every candidate's file
            outputs.append((_check_output_file(filtered_dir / f"{name}.jsonl", "The filtered candidate"),
                            f"filtered_dir {filtered_dir}"))
    _check_no_overwrite(outputs, _named_inputs(args, config_file),
                        "Choose output paths that are none of the inputs" + (
                            " (filtered_dir gets <candidate>.jsonl for each accepted candidate: give it a new "
                            "folder, e.g. filtered/)." if filtered_dir else ", e.g. in a new folder."))
    # the candidates read before the model loads: a blank or prompt-only set is refused in seconds, not minutes
    candidates = load_candidates({k: _expand(v) for k, v in named_items(config_file["candidates"],
                                                                         "candidates").items()})
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    try:
        decision = gate_mixture(model, tokenizer, _expand(config_file["sae"]), candidates,
                                _expand(config_file["targets"]), config_file["protected"], rules,
                                budget=config_file.get("budget"), config=config,
                                score_examples=not args.no_example_scores,
                                progress=not args.no_progress and is_main_process())
    except MixtureRejected as err:
        print(err.decision.table())
        _save_after_the_work(err.decision.save, output, "gate decision")
        print(f"\nwrote {output}")
        if filtered_dir and is_main_process():
            _remove_earlier_filtered(filtered_dir, config_file["candidates"], accepted=[])
            _record_filtered(filtered_dir, [], output)
        print(f"sts: rejected: {err}", file=sys.stderr)
        return REJECTED_EXIT  # a decision, not a mistake in the input (2): a script can tell them apart
    print(decision.table())
    _save_after_the_work(decision.save, output, "gate decision")
    print(f"\nwrote {output} ({decision.timings['total']:.1f} s)")
    if filtered_dir:  # the filter on every rank (no forward: cheap), so that every rank exits alike
        # an accepted candidate the weights leave out is no training file; nor is one the filter keeps nothing of
        kept = {name: filter_examples(decision, name, keep_fraction=keep_fraction, threshold=threshold)
                for name in decision.in_mixture}
        written = [name for name in decision.in_mixture if kept[name].examples]
        if is_main_process():
            _remove_earlier_filtered(filtered_dir, config_file["candidates"], decision.in_mixture)
            _record_filtered(filtered_dir, written, output)  # first: a stop mid-way leaves them named
            for name in decision.in_mixture:
                count = decision.candidates[name].examples
                if not kept[name].examples:
                    print(f"kept none of the {count} examples of {name}: no file written")
                    continue
                path = write_jsonl(kept[name].examples, Path(filtered_dir) / f"{name}.jsonl")
                print(f"wrote {path} ({len(kept[name].examples)} of {count} examples kept)")
        if not written:  # a pipeline would go on to train on nothing
            rule = f"threshold={threshold}" if threshold is not None else f"keep_fraction={keep_fraction}"
            if is_main_process():
                print(f"sts: rejected: the filter ({rule}) keeps no example of any candidate in the mixture, so "
                      "filtered_dir holds no training file; raise the threshold or filter by keep_fraction.",
                      file=sys.stderr)
            return REJECTED_EXIT
    return 0


# filtered_dir's record of the files the last `sts gate` wrote there: a later run removes exactly those
FILTERED_RECORD = ".sts_gate_filtered.json"


def _remove_earlier_filtered(folder: Path, candidates: Any, accepted: list[str]) -> None:
    """An earlier run's ``<candidate>.jsonl`` in filtered_dir goes before this run's are written: a file there must
    be this decision's (a candidate rejected now would otherwise look accepted, a candidate of the earlier run's
    mixture that this one does not name would look part of it, and a stop mid-way would mix runs). The earlier
    run's files are those its record names, and any of this run's candidates' names; other files are left."""
    record = Path(folder) / FILTERED_RECORD
    names = {str(n) for n in candidates}
    if record.is_file():
        try:
            names |= {str(n) for n in json.loads(record.read_text(encoding="utf-8"))["candidates"]}
        except (OSError, ValueError, KeyError, TypeError):  # a damaged record: this run's names still go
            pass
    for name in sorted(names):
        path = Path(folder) / f"{name}.jsonl"
        if Path(name).name == name and path.is_file():
            path.unlink()
            if name not in accepted:
                print(f"removed {path} (an earlier run's; {name} is not accepted now)")
    record.unlink(missing_ok=True)


def _record_filtered(folder: Path, accepted: list[str], decision: Path) -> None:
    atomic_write_text(Path(folder) / FILTERED_RECORD,
                      json.dumps({"decision": str(decision.resolve()), "candidates": list(accepted)}, indent=1))


EXAMPLE_VALIDATE_CONFIG = """\
# sts validate config (YAML or JSON): forecast, then fine-tune for real and check the forecast
model: gemma-3-270m
sae: ~/.cache/sts_callback/sae/gemma-3-270m-L12-w4096-k32
train_data: my_sft_set.jsonl   # what you will post-train on (texts, messages or prompt/completion records; prompt/
                               #   chosen/rejected pairs are trained with DPOTrainer)
# reward_funcs: [my_rewards.py:format_reward]  # GRPO: the data's prompts trained with GRPOTrainer and these rewards
targets:                       # at least 3 domains: name -> JSONL path or registered domain name
  legal: legal
  code: python_code
  math: math
  docs: ml_docs
validation:                    # every key optional; defaults shown
  method: lora                 # lora or full
  steps: 32                    # optimizer steps per seed
  # learning_rate: 2e-4        # default 2e-4 (lora) / 1e-5 (full)
  batch_size: 8
  max_length: 256
  lora_rank: 8
  seeds: [0]                   # paper protocol: [0, 1, 2]
  loss_tokens: 4096            # held-out tokens per domain for the NLL before/after
  # recheck_steps: 8           # also re-check every 8 steps (0.1: every tenth of the run; [2, 4, 8, 16]: at those)
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


# What `sts validate` writes into OUTPUT_DIR/sts/ (validate.py, the report); the seed-N/ run folders are its own.


def cmd_validate(args: argparse.Namespace) -> int:
    if args.example:
        return _print_example(args, EXAMPLE_VALIDATE_CONFIG)
    config_file, config = _command_config(args, "validate", ("model", "sae", "train_data", "targets"))
    options = dict(config_file.get("validation") or {})  # its keys were checked with the config's
    for key in ("method", "steps", "seeds", "learning_rate"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    from ..validation.validate import SUMMARY_FILES, ValidationConfig, multiple_choice_accuracy, validate

    given = {key for key in ("method", "steps", "seeds", "learning_rate") if getattr(args, key) is not None}
    with _speaking_config_keys(args.config, given):
        validation = ValidationConfig.from_dict(options)  # bad settings fail here, before the model loads
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
        lacking = sorted(set(_target_names(targets)) - set(map(str, choices)))
        if lacking:
            raise STSInputError(f"{args.config}: `multiple_choice` lacks items for {lacking}; give a JSONL for "
                                "every target domain, or drop `multiple_choice`.")
        metric = multiple_choice_accuracy({k: _expand(v) for k, v in
                                           named_items(choices, f"{args.config}: `multiple_choice`").items()})
    output_dir = _check_output_folder(Path(args.output_dir or config_file.get("output_dir") or "sts-validation"),
                                      "The validation output folder",
                                      tuple(f"sts/{name}" for name in SUMMARY_FILES))
    _check_no_overwrite([(output_dir / "sts" / name, "The validation output folder") for name in SUMMARY_FILES],
                        _named_inputs(args, config_file))
    reward_funcs = _reward_functions(config_file, args.config)
    from ..core.data import load_corpus
    from ..validation.validate import check_trainer_fields, check_training_data

    train = load_corpus(_expand(config_file["train_data"]), name="train")  # its kind decides the trainer: now
    kind = check_training_data(train, reward_funcs, config_file.get("demonstrations") is not None)
    with _speaking_config_keys(args.config, given):
        check_trainer_fields(kind, validation.training_args or {}, validation.batch_size)
    model, tokenizer = load_model(config_file["model"], config_file.get("device"), config_file.get("dtype"))
    result = validate(model, tokenizer, _expand(config_file["sae"]), train,
                      _expand(config_file["targets"]), config, metric=metric, reward_funcs=reward_funcs,
                      demonstrations=_expand(config_file.get("demonstrations")), validation=validation,
                      output_dir=output_dir, progress=not args.no_progress)
    print(result.table())
    print(f"\nwrote {result.files['json']}" + (f" and {result.files['plot']}" if "plot" in result.files else "")
          + f" ({result.timings['total']:.1f} s)")
    return 0


@contextlib.contextmanager
def _speaking_config_keys(config: str, flags: set[str]):
    """The validation's errors as a config file's reader wants them: ``validate(steps=...)`` (the Python API's
    words) as the key of the config's `validation:` section, or the flag given on the command line."""
    try:
        yield
    except STSError as err:
        def key(name: str) -> str:
            return f"--{name.replace('_', '-')}" if name in flags else f"`validation: {name}`"

        def keys(match: re.Match) -> str:  # every setting named inside validate(...), each as its key or flag
            names = re.findall(r"(?:^|,\s*)(\w+)=", match.group(1))
            said = " and ".join(key(name) for name in names)
            return said + (f" in {config}" if any(name not in flags for name in names) else "")

        raise type(err)(re.sub(r"validate\(((?:[^()]|\([^()]*\))*)\)", keys, str(err))) from err


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..scoring.calibration import Calibration

    out = _check_output_file(args.out, "The calibration output")
    if args.prior_only and (not args.runs or args.features):
        raise STSInputError("--prior-only fits the pattern on the domain prior alone, from training runs: use it "
                            "with --runs and without --features.")
    if args.pattern_scale != "absolute" and not args.runs:
        raise STSInputError("--pattern-scale applies to the level + pattern calibration of training runs: use it "
                            "with --runs.")
    if args.runs:  # training runs with the callback: a level + pattern calibration with the domain prior
        inputs = {Path(p): "a training run" for p in args.validations}
        # a run's folder may take the calibration (its STS folder may not: _check_not_in_a_run)
        _check_no_overwrite([(out, f"The calibration output {out}")], inputs, folders_whole=False)
        _check_not_in_a_run(out, [Path(p) for p in args.validations])
        calibration = Calibration.from_runs(args.validations, [] if args.prior_only else args.features,
                                            level=args.level, pattern_scale=args.pattern_scale)
        path = calibration.save(out)
        level = (f"level from {calibration.source_features[0]}" if calibration.source_features
                 else "level: the runs' mean (no run-level term in every run)")
        print(f"level + pattern calibration on {calibration.fitted_on['runs']} runs ({calibration.n} domain "
              f"changes), features {calibration.features}, {level}: residual std {calibration.sigma:.2%} of the "
              f"NLL; its predictions come with {calibration.level:.0%} intervals")
        print(f"wrote {path}; use it with STSCallback(..., calibration={str(path)!r})")
        return 0
    inputs = _validation_inputs(args.validations)
    _check_no_overwrite([(out, f"The calibration output {out}")], inputs)
    calibration = Calibration.from_validation(args.validations, args.features or [DEFAULT_SIGNED], level=args.level)
    path = calibration.save(out)
    spread = calibration.fitted_on["changes_spread"]
    explained = 1 - (calibration.sigma / spread) ** 2 if spread > 0 else None
    print(f"calibration on {calibration.n} measured (domain, seed) pairs, features {calibration.features}: "
          f"residual std {calibration.sigma:.2%} of the NLL against the changes' spread {spread:.2%}"
          + (f" (the features account for {max(explained, 0):.0%} of it)" if explained is not None else "")
          + f"; its predictions come with {calibration.level:.0%} intervals")
    print(f"wrote {path}; use it with STSCallback(..., calibration={str(path)!r})")
    return 0


def _validation_inputs(items: list[str]) -> dict[Path, str]:
    """Each VALIDATION argument read up front: a file that is not the output of `sts validate` (a forecast,
    broken JSON) is an error naming it. Returns path -> description for the overwrite check."""
    from ..scoring.calibration import read_validation, validation_file

    inputs: dict[Path, str] = {}
    for item in items:
        path = validation_file(item)
        if not path.is_file():
            continue  # Calibration.from_validation names what is missing
        read_validation(path)
        inputs[path] = f"the validation input {path}"
    return inputs


def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting.report import HTML_FILE, MD_FILE, resolve_sts_dir, write_report

    sts_dir = resolve_sts_dir(Path(args.output_dir))
    for name in (HTML_FILE, MD_FILE):  # both refused before either is written
        _check_output_file(sts_dir / name, "The report")
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("forecast", help="rank target domains by how much training on a dataset will move them",
                       description="Compute the STS forecast described by CONFIG (YAML or JSON), print the ranked "
                                   "table and write the forecast JSON.")
    p.add_argument("config", nargs="?", help="YAML/JSON file with model, sae, train_data, targets, options, output")
    p.add_argument("-o", "--output", help="forecast JSON path (default: the config's `output` or forecast.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an STSConfig option (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--example", action="store_true", help="print an example config and exit")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="a calibration JSON (`sts calibrate`) or a built-in name (gemma3-270m-lora): the table then "
                        "leads with each domain's predicted held-out loss change, interval and gain / loss / flat "
                        "(default: the config's `calibration`, else raw scores)")
    p.add_argument("--not-predicted", nargs="+", metavar="DOMAIN",
                   help="target domains not to predict, e.g. the training data's own held-out part (default: the "
                        "config's `not_predicted`)")
    p.add_argument("--shift", default=None, metavar="SHIFT",
                   help="what the training pushes: auto (preference pairs -> chosen_vs_rejected, reward_funcs -> "
                        "reward_weighted, a teacher -> teacher_completions, else in_context), or one of those, "
                        "reward_filtered, teacher_vs_student (default: the config's `shift`, else auto)")
    p.set_defaults(func=cmd_forecast)

    p = sub.add_parser("train-sae", help="train a TopK SAE (sae-lens format) for a model that has none",
                       description="Collect residual-stream activations at LAYER over the given texts and train a "
                                   "TopK SAE with sae-lens; prints variance unexplained and dead latents.")
    p.add_argument("--model", required=True, help="Hugging Face folder or gemma-3-270m")
    p.add_argument("--layer", type=int, required=True, help="decoder block whose output the SAE reads")
    p.add_argument("--data", nargs="+", required=True,
                   help="data files (.jsonl, .json, .csv, .tsv, .parquet, .txt, .md) or built-in domain names "
                        "(sts domains)")
    p.add_argument("--d-sae", type=int, default=4096, help="number of latents (default 4096)")
    p.add_argument("-k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens (default 200000)")
    p.add_argument("--device", default=None, help="where the model and SAE run, e.g. cuda, cuda:1, cpu "
                                                  "(default: cpu)")
    p.add_argument("-o", "--output", required=True, help="folder to write the SAE to")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser("domains", help="list the built-in offline text domains",
                       description="Target domains that can be referred to by name in configs and STSCallback.")
    p.add_argument("--count", action="store_true", help="load each domain and show its size")
    p.set_defaults(func=cmd_domains)

    p = sub.add_parser("demo", help="end-to-end demo on Gemma 3 270M, offline",
                       description="Builds Gemma 3 270M from the offline GGUF package, trains (once, cached) an SAE "
                                   "at layer 12, forecasts the effect of fine-tuning on Python code for real text "
                                   "domains, then runs a short training with the callback when available. The "
                                   "console gets a short story; progress bars, the trainer's logs and full tables "
                                   "go to OUTPUT/demo.log.")
    p.add_argument("-o", "--output", default="outputs/demo", help="where to write results (default outputs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller budgets (a few minutes on 2 CPU cores)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="steps of the short training run (default 4, 2 with --quick; 0 skips it)")
    p.add_argument("--calibration", default="gemma3-270m-lora", metavar="FILE|NAME|none",
                   help="the forecast's calibration: a JSON (`sts calibrate`) or a built-in name (default "
                        "gemma3-270m-lora, fitted on benchmarks/transfer's LoRA runs of this model); 'none': raw "
                        "scores only")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gate", help="accept / reject / weight candidate datasets of a mixture before training",
                       description="Forecast every candidate dataset of CONFIG over the target domains (encoded "
                                   "once), reject candidates predicted to move the protected domains too much "
                                   "(absolute limits, a rank rule, or by default more than `tolerance` x the median "
                                   "of the other candidates), weight the accepted ones (the paper's STS-proportional "
                                   "rule or min_impact), print the decision table, write the decision JSON and, "
                                   "with a filtered_dir, each accepted candidate minus its worst examples as JSONL.",
                       epilog=f"Start from `sts gate --example`. Exit status {REJECTED_EXIT} when every candidate is "
                              "rejected, or filtered_dir's filter keeps no example (2: an error in the input).")
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
                   help="validation.json files or the output_dir of `sts validate` runs (with --runs: the "
                        "output_dir of training runs with STSCallback)")
    p.add_argument("--runs", action="store_true",
                   help="fit a level + pattern calibration with the domain prior on training runs with the "
                        "callback (forecast.json and the last re-check of each): the level from the run-level "
                        "term's own change when every run has one (run_level=...)")
    p.add_argument("--features", nargs="+", default=None,
                   help=f"forecast scores to calibrate on (default: {DEFAULT_SIGNED}; with --runs every score all "
                        "domains have; e.g. sts_icl signed_usage)")
    p.add_argument("--prior-only", action="store_true",
                   help="with --runs: the pattern from the domain prior alone, no forecast score (each domain's "
                        "usual departure over your runs; on the transfer benchmark the best forecast for domains "
                        "every run measured; a domain none measured gets the level alone)")
    p.add_argument("--pattern-scale", choices=["absolute", "run"], default="absolute",
                   help="with --runs: 'run' fits the pattern on each run's departures over their own spread, so "
                        "that runs with large changes do not set the pattern for all (RL runs whose changes differ "
                        "in scale; on the RL benchmark it lifted the GRPO and DPO forecasts)")
    p.add_argument("--level", type=float, default=0.9, help="prediction interval level (default 0.9)")
    p.add_argument("--out", default="calibration.json",
                   help="the calibration file to write (default calibration.json); give it to `sts forecast "
                        "--calibration` or STSCallback(calibration=...)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="write report.html (plots, shifted latents) and report.md for a run",
                       description="Read forecast.json / history.jsonl (and gate.json when present) from OUTPUT_DIR "
                                   "(the trainer's output_dir or its sts/ folder) and write a self-contained "
                                   "report.html plus a report.md summary for a pull-request comment next to them.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="trainer output_dir or its sts/ folder")
    p.add_argument("--protected", nargs="+", default=None,
                   help="mark these domains protected in the report's tables, in place of those the callback "
                        "stored in sts/settings.json (the default); the warnings the run recorded are shown as "
                        "recorded")
    p.set_defaults(func=cmd_report)
    return parser


def _command_warnings(shown: Any) -> Any:
    """``warnings.showwarning`` for a command: the library's own warnings as the command's (``sts: warning:
    ...``), not as Python source locations; other libraries' as ``shown`` (Python's) shows them."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, (STSDataWarning, STSNegativeTransferWarning)):
            print(f"sts: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _no_accelerator_no_deepspeed_notice()  # after parsing: --help and --version need no torch import
    for option in ("output", "output_dir", "filtered_dir", "out"):
        value = getattr(args, option, None)
        if isinstance(value, str) and not value.strip():  # `-o "$OUT"` with OUT unset: never the current folder
            parser.error(f"--{option.replace('_', '-')} is empty; give a path (an unset shell variable?).")
    with warnings.catch_warnings(), _quiet_libraries(getattr(args, "no_progress", False)):
        warnings.showwarning = _command_warnings(warnings.showwarning)
        try:
            with _launched_process_group(args.command):
                return args.func(args)
        except STSError as err:
            print(f"sts: error: {err}", file=sys.stderr)
            return 2


# commands whose passes split across the processes of a launcher (torchrun, accelerate launch): each process runs
# its share, rank 0 prints and writes
SPLIT_COMMANDS = ("forecast", "gate")


@contextlib.contextmanager
def _launched_process_group(command: str | None):
    """Under a launcher (``WORLD_SIZE`` > 1) the process group the launcher set up for, so that a forecast's
    passes split across the processes (each GPU its own: ``LOCAL_RANK``) instead of every process running all of
    them and writing the same files; the other ranks print nothing. A command that does not split is refused."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1:
        yield
        return
    if command not in SPLIT_COMMANDS:
        raise STSInputError(f"sts {command} runs in one process, but it was launched as {launched} (torchrun / "
                            "accelerate launch): run it without the launcher (sts forecast and sts gate split "
                            "their passes across processes).")
    import torch
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        if torch.cuda.is_available():  # "cuda" in a config is then this process's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        if dist.get_rank() == 0:
            yield
        else:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                yield
    finally:
        if started:
            dist.destroy_process_group()


def _no_accelerator_no_deepspeed_notice() -> None:
    """DeepSpeed, imported by transformers, logs "Setting accelerator to CPU" on stdout when it finds no
    accelerator, into a command's output: on such a machine it is told CPU up front (what it would choose)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    try:
        import torch

        if torch.accelerator.current_accelerator() is None:
            os.environ["DS_ACCELERATOR"] = "cpu"
    except (ImportError, AttributeError, RuntimeError):  # an older torch: DeepSpeed detects as before
        pass


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """``--no-progress``: transformers' weight-loading bar and datasets' map bars too, not only STS's own (put
    back after: ``main`` may be called from a Python session)."""
    if not quiet:
        yield
        return
    import datasets
    from transformers.utils import logging as transformers_logging

    shown = (transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown[0]:
            transformers_logging.enable_progress_bar()
        if shown[1]:
            datasets.enable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
