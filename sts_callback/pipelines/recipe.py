"""A fine-tuning recipe's pieces shared by ``validate`` and the run-level term: token ids and labels of the
training examples (completion-only loss like TRL's default), a padding collator, LoRA adapters."""

from __future__ import annotations

import re
import warnings

from typing import Any

import torch
from torch import nn

from ..core.data import Corpus, Example, chat_template_text, needs_typed_content, special_prefix
from ..core.errors import STSConfigError, STSInputError, first_line


def training_features(corpus: Corpus, tokenizer, max_length: int, completion_only: bool,
                      chat_fallback: bool) -> list[dict[str, list[int]]]:
    """Token ids and labels of every example: plain texts as language modelling, prompt/answer examples with
    the loss on the answer only (``completion_only``; TRL's default) and EOS appended. Prompt-only examples
    are skipped."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    typed = has_template and needs_typed_content(tokenizer)  # a VLM template that reads typed content parts only
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    start = special_prefix(tokenizer)  # a prompt the answer follows: BOS, never the EOS of add_eos_token
    features = []
    for i in range(len(corpus)):
        example: Example = corpus[i]
        if example.plain_text and not example.can_demonstrate:  # no text (a row training trains none of)
            continue
        if example.plain_text:
            ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])[:max_length]
            labels = list(ids)
        elif example.answer is None:
            continue
        else:
            if example.is_chat:
                if has_template:
                    kwargs = example.template_kwargs or {}  # its tools, as training renders them
                    prompt_text = chat_template_text(tokenizer, example.prompt, typed, add_generation_prompt=True, **kwargs)
                    answer = {"role": "assistant", "content": example.answer} if example.answer_turn is None else \
                        {**example.answer_turn, "content": example.answer_turn.get("content") or ""}  # its tool calls
                    full = chat_template_text(tokenizer, list(example.prompt) + [answer], typed, **kwargs)
                    if full.startswith(prompt_text):
                        answer_text, extra_eos = full[len(prompt_text):], []
                    else:  # a template that renders the prompt differently in the full conversation
                        prompt_text, answer_text, extra_eos = "", full, []
                    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
                    answer_ids = list(tokenizer(answer_text, add_special_tokens=False)["input_ids"]) + extra_eos
                else:
                    if not chat_fallback:
                        raise STSInputError(
                            f"{corpus.name!r} holds chat conversations but the tokenizer has no chat template. "
                            "Give a tokenizer with a chat template, or set STSConfig(chat_fallback=True).")
                    prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in example.prompt) + "assistant: "
                    prompt_ids = start + list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
                    answer_ids = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) + eos
            else:
                prompt_ids = start + list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
                answer_ids = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) + eos
            ids = (prompt_ids + answer_ids)[:max_length]
            labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length] if completion_only else list(ids)
        if len(ids) < 2 or all(label == -100 for label in labels[1:]):
            continue
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not features:
        raise STSInputError(
            f"No trainable example in {corpus.name!r}: every example is prompt-only, empty, or its prompt fills "
            "max_length; give texts or prompt/answer records, or raise max_length.")
    return features


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.full((len(features), longest), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
                 "labels": torch.full((len(features), longest), -100, dtype=torch.long)}
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(f["labels"])
        return batch


def records_dataset(records: list[Any]) -> Any:
    """Records as the ``datasets.Dataset`` TRL's trainers read (DPO's preference pairs, GRPO's prompts)."""
    import pyarrow
    from datasets import Dataset

    try:
        return Dataset.from_list(records)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, TypeError) as err:  # one column of two types
        raise STSInputError(f"The training records cannot be one dataset ({first_line(err)}): a column holds values "
                            "of different types across records (text in some, chat messages in others?). Give "
                            "every record the same format.") from err


def check_target_modules(model: nn.Module, target_modules: Any) -> None:
    """A list of LoRA target modules names modules of ``model`` (as peft matches them: the name, or its last
    parts); a name matching none fails now, not in peft after the forecast. A string is peft's regex (or
    'all-linear') and is left to peft."""
    names = [name for name, _ in model.named_modules()]
    if isinstance(target_modules, str) and target_modules != "all-linear":  # peft's regex over the full names
        try:
            matched = any(re.fullmatch(target_modules, n) for n in names)
        except re.error as err:
            raise STSConfigError(f"lora_target_modules {target_modules!r} is not a valid regex ({err}); give a list "
                                 "of module names, e.g. ['q_proj', 'v_proj'].") from err
        if not matched:
            raise STSConfigError(f"lora_target_modules {target_modules!r} is one string, which peft reads as a regex "
                                 f"over full module names (e.g. 'model.layers.0.self_attn.q_proj'), and it matches "
                                 f"none; give a list of names instead, e.g. [{target_modules!r}], or a regex such as "
                                 f"'.*{target_modules}'.")
        return
    if not isinstance(target_modules, (list, tuple)):
        return
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise STSConfigError(f"lora_target_modules {missing} match no module of the model; its linear layers are "
                             f"named {linear[:12]}{' ...' if len(linear) > 12 else ''} (or use 'all-linear').")


def wrap_lora(model: nn.Module, rank: int, alpha: int, target_modules: Any):
    from peft import LoraConfig, get_peft_model

    def build(targets):
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                    target_modules=targets, task_type="CAUSAL_LM"))

    if target_modules is not None:
        return build(target_modules)
    try:
        return build(None)
    except ValueError:  # an architecture peft has no default for
        remove_injected_adapters(model)
        return build("all-linear")



def has_injected_adapters(model: nn.Module) -> bool:
    """PEFT adapter layers inside ``model`` (``inject_adapter_in_model``, or a wrap left half-way)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def remove_injected_adapters(model: nn.Module) -> None:
    """Put back the plain layers PEFT wrapped in ``model`` outside a PEFT model (a ``get_peft_model`` that failed
    or was interrupted half-way leaves its adapter layers injected; a finished one is unloaded by its model)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for name, module in list(model.named_modules()):
        if name and isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


__all__ = ["PadCollator", "has_injected_adapters", "records_dataset", "remove_injected_adapters", "training_features",
           "wrap_lora"]
