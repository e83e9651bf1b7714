"""Multiple-choice target domains: ``{"question", "choices", "answer"}`` items scored by the log-likelihood of
each choice after the question; accuracy measured in lockstep across ranks (one forward per item everywhere)."""

from __future__ import annotations

import itertools
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import clamped_to_vocabulary, input_vocabulary, max_positions
from .data import as_mc_record, read_text, special_prefix, special_token_ids
from .distributed import LocalFailure, shard
from .errors import STSInputError
from .heldout import HEAD_CHUNK, head_nll, split_head
from .torch_utils import model_device, pad_token_id

FIELDS = ("question", "choices", "answer")
PROMPT_FORMAT = "{question}\nAnswer:"
CHOICE_FORMAT = " {choice}"


def argmax(values: list[float]) -> int:
    """Index of the highest value; ties go to the first."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _read_items(path: Path) -> list[Any]:
    """A JSONL file's items (one JSON object a line), or a .json file's array of them; a line or file that is not
    JSON is an error naming it."""
    text = read_text(path, " (multiple choice)")  # the data files' reader: UTF-8, a byte-order mark as none
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise STSInputError(f"Multiple-choice file {path} is not valid JSON ({err}); give a JSON array of "
                                "items, or JSONL (one item a line).") from err
        return items if isinstance(items, list) else [items]
    items = []
    for number, line in enumerate(text.split("\n"), 1):  # as the data files' JSONL: not splitlines (U+2028)
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise STSInputError(f"Multiple-choice file {path}, line {number}, is not a JSON item ({err}); "
                                    "give JSONL, one {'question', 'choices', 'answer'} object a line (or a .json "
                                    "file holding an array of them).") from err
    return items


def check_items(items: Any, where: str) -> list[dict[str, Any]]:
    """Validated items from a list, a ``datasets.Dataset``, a pandas DataFrame or a JSONL path, each in one of
    :data:`~.data.MC_LAYOUTS`; the error names the item and the fix."""
    if isinstance(items, (str, Path)):
        path = Path(items)
        if not path.exists():
            raise STSInputError(f"Multiple-choice file {path} does not exist; check the path.")
        items = _read_items(path)
    if hasattr(items, "columns") and hasattr(items, "to_dict"):  # a pandas DataFrame: its rows
        items = items.to_dict("records")
    if hasattr(items, "column_names") and hasattr(items, "__len__"):  # a datasets.Dataset: its rows
        items = [items[i] for i in range(len(items))]
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or len(items) == 0:
        raise STSInputError(f"Multiple choice: {where} needs a non-empty list (or Dataset, DataFrame, JSONL file) "
                            "of {'question', 'choices', 'answer'} items.")
    return [check_item(item, f"item {i} of {where}") for i, item in enumerate(items)]


def check_item(item: Any, where: str) -> dict[str, Any]:
    """One multiple-choice item as ``{"question", "choices", "answer": index}``: MMLU's fields, ARC's or
    HellaSwag's (:func:`~.data.as_mc_record`); the answer an index, a letter (``"B"``), a digit string or the
    right choice's text."""
    record = as_mc_record(item)
    if record is None:
        raise STSInputError(f"Multiple choice: {where} must be a dict with 'question', 'choices' (list of strings) "
                            "and 'answer' (index of the right choice), or ARC's 'question' / 'choices' {'text', "
                            "'label'} / 'answerKey', or HellaSwag's 'ctx' / 'endings' / 'label'.")
    choices, answer, question = record["choices"], record["answer"], record["question"]
    if hasattr(choices, "tolist") and not isinstance(choices, (str, bytes)):
        choices = choices.tolist()  # a numpy array: what pandas holds a list column as (df.to_dict("records"))
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        got = f"a {type(choices).__name__}" if not isinstance(choices, (list, tuple)) else f"{len(choices)}"
        raise STSInputError(f"Multiple choice: {where} needs a list of at least two choices, got {got}.")
    if not isinstance(question, str):
        chat = " (a conversation: multiple-choice items take the question as plain text)" \
            if isinstance(question, (list, tuple)) else ""
        raise STSInputError(f"Multiple choice: {where} has question={question!r:.80}{chat}; give the question as a "
                            "string.")
    bad = [c for c in choices if not isinstance(c, str) or not c.strip()]
    if bad:
        raise STSInputError(f"Multiple choice: {where} has the choice(s) {bad!r:.80}; every choice must be a "
                            "non-empty string (a set padded to a fixed number of choices: leave the padding out).")
    texts = [c.strip() for c in choices]
    repeated = sorted({c for c in texts if texts.count(c) > 1})
    if repeated:  # scored alike, the first copy wins every tie: an answer on another copy could never count
        raise STSInputError(f"Multiple choice: {where} has the choice(s) {repeated!r:.80} more than once; give each "
                            "choice once.")
    readings = _answer_readings(answer, list(choices))
    if len(set(readings.values())) > 1:  # "1" among "1".."4", "A" among "B", "C", "A": item by item it varied
        said = " and ".join(READING_WORDS[kind].format(i) for kind, i in readings.items())
        raise STSInputError(f"Multiple choice: {where} has answer={answer!r}, which is {said}; give the index as a "
                            "number (answer=0 for the first choice) or the choice's text where it is not also an "
                            "index or a letter.")
    index = next(iter(readings.values()), None)
    if index is None:
        raise STSInputError(f"Multiple choice: {where} has answer={answer!r}; give the index (0..{len(choices) - 1}) "
                            f"of the right choice, its letter (A..{chr(ord('A') + min(len(choices), 26) - 1)}) or "
                            "its text.")
    return {"question": question, "choices": list(choices), "answer": index}


def _answer_readings(answer: Any, choices: list[str]) -> dict[str, int]:
    """Every reading of ``answer`` that names a choice: ``{"index" | "text" | "digit" | "letter": index}``."""
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        answer = int(answer)  # numpy / pandas integers (df.to_dict("records")) are indices too
        return {"index": answer} if 0 <= answer < len(choices) else {}
    if not isinstance(answer, str):
        return {}
    text, out = answer.strip(), {}
    matches = [i for i, choice in enumerate(choices) if choice.strip() == text]
    if len(matches) == 1:  # the choice itself (numeric choices too: "4" among "3", "4", "5")
        out["text"] = matches[0]
    if text.isdigit() and int(text) < len(choices):  # HellaSwag's label "2"
        out["digit"] = int(text)
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
        out["letter"] = ord(text.upper()) - ord("A")
    return out


READING_WORDS = {"text": "the text of choice {}", "digit": "as an index, choice {}", "letter": "as a letter, choice {}"}


def choice_scores(model: nn.Module, tokenizer, item: dict[str, Any], *, prompt_format: str = PROMPT_FORMAT,
                  choice_format: str = CHOICE_FORMAT, normalize: bool = True) -> list[float]:
    """Log-likelihood of each choice's continuation after the question (mean per token when ``normalize``)."""
    device = model_device(model)
    # the tokenizer's start (BOS) and the question, no EOS a tokenizer with add_eos_token would put before the choice
    prompt_text = prompt_format.format(question=item["question"])
    question = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    continuations = [continuation_ids(tokenizer, prompt_text, question, choice_format.format(choice=c))
                     for c in item["choices"]]
    if any(not c for c in continuations):
        raise STSInputError(f"A choice of {item['question'][:60]!r} has no tokens; give non-empty choices.")
    prompt = special_prefix(tokenizer) + question
    if not prompt:  # nothing would predict a choice's first token: the end-of-text token as the context, as lm-eval
        start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if start is None:
            raise STSInputError(f"The multiple-choice prompt {prompt_text!r} has no tokens and the tokenizer no BOS "
                                "or EOS token to start from: give each item a question, or a prompt_format with "
                                "text.")
        prompt = [start]
    prompt = fit_context(prompt, max(len(c) for c in continuations), max_positions(model), tokenizer, item)
    pad = pad_token_id(tokenizer)
    longest = max(len(prompt) + len(c) for c in continuations)
    ids = torch.full((len(continuations), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    keep = torch.zeros((len(continuations), longest - 1), dtype=torch.bool)  # positions predicting a choice token
    for row, c in enumerate(continuations):
        ids[row, : len(prompt) + len(c)] = torch.tensor(prompt + c)
        mask[row, : len(prompt) + len(c)] = 1
        keep[row, len(prompt) - 1: len(prompt) - 1 + len(c)] = True
    ids, beyond = clamped_to_vocabulary(ids, input_vocabulary(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logprobs = answer_logprobs(model, ids.to(device), mask.to(device), keep.to(device))
    finally:
        model.train(was_training)
    if beyond is not None:
        raise beyond
    rows = torch.arange(len(continuations), device=keep.device)[:, None].expand_as(keep)[keep]
    totals = torch.zeros(len(continuations), dtype=torch.float64).index_add_(0, rows, logprobs.double().cpu())
    return [float(total) / len(c) if normalize else float(total) for total, c in zip(totals, continuations)]


def continuation_ids(tokenizer, prompt_text: str, prompt: list[int], continuation: str) -> list[int]:
    """The tokens ``continuation`` adds after ``prompt_text``, as the joined text tokenizes (lm-eval's way): a
    tokenizer that prepends a space marker to each text it encodes (Llama 2's ``Prepend("▁")`` normaliser) gives
    the choice alone a token the joined text does not have. Encoded alone where the joined text does not start
    with the prompt's own tokens."""
    whole = list(tokenizer(prompt_text + continuation, add_special_tokens=False)["input_ids"])
    if prompt and whole[:len(prompt)] == prompt and len(whole) > len(prompt):
        return whole[len(prompt):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def fit_context(prompt: list[int], longest_choice: int, limit: int | None, tokenizer,
                item: dict[str, Any]) -> list[int]:
    """The prompt cut from the left (its leading BOS kept) so that it and the longest choice fit the model's
    positions, as the held-out loss keeps a text's end: past them a model with learned positions fails (an index
    error, a device assert on a GPU) and a rotary one reads beyond what it was trained on."""
    if limit is None or len(prompt) + longest_choice <= limit:
        return prompt
    special = special_token_ids(tokenizer)
    lead = list(itertools.takewhile(lambda token: token in special, prompt))
    room = limit - longest_choice - len(lead)
    if room < 1:
        raise STSInputError(f"A choice of {item['question'][:60]!r} has {longest_choice} tokens, which leave no room "
                            f"for the question in the model's {limit} positions; shorten the choices.")
    return lead + prompt[len(lead):][-room:]


def answer_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[keep.sum()] float32 log-probability of each next token where ``keep`` ([batch, length - 1]) is set. One
    forward of the body; the LM head only at those positions, ``HEAD_CHUNK`` rows at a time, as the held-out loss
    runs it (:func:`~.heldout.split_head`): never [choices x length x vocab] logits, 2.3 GB for one 575-token
    question of a 262k-vocabulary model. Runs under the caller's autocast, as the full forward did."""
    targets = ids[:, 1:][keep]
    split = split_head(model)
    if split is None:  # sharded (every rank calls the root module) or scaling its logits: the full forward
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
        del logits
        return logprobs.gather(1, targets[:, None])[:, 0]
    body, head, softcap = split
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][keep]
    if not len(targets):
        return torch.zeros(0, device=ids.device)
    chunks = zip(hidden.split(HEAD_CHUNK), targets.split(HEAD_CHUNK))
    return -torch.cat([head_nll(head, softcap, h, t) for h, t in chunks])


def answered_right(model: nn.Module, tokenizer, items: Sequence[dict[str, Any]]) -> list[bool]:
    """Whether the model picks each item's answer, over every rank: each rank scores a padded 1/world share and the
    per-item flags are summed; an exception on one rank is raised on every rank at that sum (see
    :class:`~.distributed.LocalFailure`)."""
    part = shard(len(items), [len(item["question"]) for item in items])
    right = torch.zeros(len(items), dtype=torch.float64)
    failed = LocalFailure.around_forwards(model)
    for index, counted in zip(part.indices, part.counted):
        if failed.skip:
            break
        with failed:
            item = items[index]
            if argmax(choice_scores(model, tokenizer, item)) == item["answer"] and counted:
                right[index] = 1.0
    failed.sum_across_ranks(right)
    return [bool(flag) for flag in right.tolist()]


def accuracy_change_interval(before: Sequence[bool], after: Sequence[bool], level: float = 0.95,
                             ) -> tuple[float, float] | None:
    """The ``level`` interval of the accuracy change on the same items answered ``before`` and ``after``: the
    paired difference's Wald interval with half an item added to each of the four before/after cells (Agresti and
    Min 2005), which holds for few items and for no flip at all, where the plain paired spread is zero; cut to the
    changes the start's accuracy allows (from 80%, no more than +20 points). ``None``
    without items, or with another number of items than before (items drawn again)."""
    from scipy.stats import norm

    n = len(before)
    if n == 0 or len(after) != n:
        return None
    start = sum(bool(b) for b in before) / n
    lost = sum(b and not a for b, a in zip(before, after)) + 0.5
    gained = sum(a and not b for b, a in zip(before, after)) + 0.5
    cells = n + 2.0
    change = (gained - lost) / cells
    spread = ((lost + gained) - (gained - lost) ** 2 / cells) ** 0.5 / cells
    half = float(norm.ppf(0.5 + level / 2)) * spread
    return max(-start, change - half), min(1.0 - start, change + half)  # no accuracy below 0 or above 1


__all__ = ["CHOICE_FORMAT", "FIELDS", "PROMPT_FORMAT", "accuracy_change_interval", "answer_logprobs", "answered_right",
           "argmax", "check_item", "check_items", "choice_scores"]
