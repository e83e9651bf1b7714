"""Reading a trainer's own datasets back as examples, in the shapes TRL leaves them in: the training probe, and
the target domains (``target_domains="eval_dataset"``: the trainer's eval set(s)).

Raw columns (``text``, ``messages``, ``prompt``/``completion``, ``prompt``/``chosen``/``rejected``) are used
as they are. Tokenized datasets are decoded: ``input_ids`` (+ ``completion_mask`` / ``assistant_masks``, or
``labels`` with -100 over the prompt as current TRL and hand-made sets leave it, to split prompt from answer; a
packed row, TRL's ``packing=True`` with ``seq_lengths``, is read as the examples packed in it), DPO's
``prompt_ids`` / ``chosen_ids``. KTO's unpaired data (a ``label`` beside the completions) is read as its desirable
examples. Decoded text keeps chat-template markers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.data import Corpus, Example, is_dataset, load_corpus, load_domains, named_items, take_streamed
from ..core.errors import STSConfigError, STSInputError
from ..core.lm_eval_tasks import LmEvalTarget, is_lm_eval_target

EVAL_DATASET = "eval_dataset"  # target_domains= value: the trainer's own eval set(s), by name

RAW_COLUMNS = {"text", "messages", "prompt"}
IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross_entropy default, what TRL writes over prompts)


class DecodedCorpus(Corpus):
    """Examples decoded lazily from token ids; a packed dataset's rows (``seq_lengths``) give one example per
    sequence packed in them."""

    def __init__(self, name: str, dataset: Sequence[Any], tokenizer, prompt_key: str | None, answer_key: str | None,
                 mask_key: str | None):
        super().__init__(name, dataset)
        self.tokenizer = tokenizer
        self.prompt_key, self.answer_key, self.mask_key = prompt_key, answer_key, mask_key
        self._strip = {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None}
        self._spans = packed_spans(dataset) if answer_key is None else None

    def __len__(self) -> int:
        return len(self._spans) if self._spans is not None else len(self._items)

    def _decode(self, ids) -> str:
        ids = token_list(ids)
        while ids and ids[0] in self._strip:  # the prompt builder adds BOS itself
            ids = ids[1:]
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.decode([i for i in ids if i != pad], skip_special_tokens=False)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if self.answer_key is not None:
            row = self._items[index]
            return Example(prompt=self._decode(row[self.prompt_key]), answer=self._decode(row[self.answer_key]))
        row_index, start, stop = self._spans[index] if self._spans is not None else (index, 0, None)
        row = self._items[row_index]
        ids = token_list(row["input_ids"])[start:stop]
        if self.mask_key is not None and self.mask_key in row:
            mask = [int(label != IGNORE_INDEX) for label in token_list(row["labels"])] \
                if self.mask_key == "labels" else token_list(row[self.mask_key])
            mask = mask[start:stop]
            first = mask.index(1) if 1 in mask else 0
            if first > 0:  # no masked prompt (every token trained, or none): the row is plain text
                return Example(prompt=self._decode(ids[:first]), answer=self._decode(ids[first:]))
        return Example(prompt=self._decode(ids), plain_text=True)


def token_list(value: Any) -> list[int]:
    """Token ids (or mask flags) of one row as ints, from a list or a tensor (a tokenizer's ``return_tensors="pt"``
    row of shape [1, n] too): 0-d tensors would compare unequal to the BOS id and keep a second BOS."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    return [int(v) for v in value]


def packed_spans(dataset: Sequence[Any]) -> list[tuple[int, int, int]] | None:
    """(row, start, stop) of every sequence packed in the rows of a dataset TRL packed (its ``seq_lengths``
    column), or None when it is not packed. Reading a packed row whole would join unrelated examples (and split
    a completion-only row at its first prompt only)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        if "seq_lengths" not in columns:
            return None
        lengths = dataset["seq_lengths"]
    else:  # rows given one by one: packed only when the first is (reading every row would tokenize a lazy set)
        if not len(dataset) or not isinstance(dataset[0], Mapping) or "seq_lengths" not in dataset[0]:
            return None
        lengths = [dataset[i]["seq_lengths"] for i in range(len(dataset))]
    spans = []
    for row_index, row_lengths in enumerate(lengths):
        start = 0
        for length in row_lengths:
            spans.append((row_index, start, start + int(length)))
            start += int(length)
    return spans


def corpus_from_training_dataset(dataset: Any, tokenizer, name: str = "train") -> Corpus:
    """A trainer's dataset (raw or tokenized, map-style or streaming) as a corpus named ``name``."""
    if not hasattr(dataset, "__len__"):  # a streaming IterableDataset: its first examples stand for it
        dataset = take_streamed(dataset)
    first = dataset[0] if len(dataset) else {}
    columns = set(getattr(dataset, "column_names", None) or (first.keys() if isinstance(first, Mapping) else []))
    if "label" in columns and columns & {"completion", "completion_ids"}:
        dataset = _desirable_only(dataset, name)
    if columns & RAW_COLUMNS and not _trained_as_tokenized(columns, first) or not isinstance(first, Mapping):
        try:
            corpus = load_corpus(dataset, name=name)
            if len(corpus):
                _ = corpus[0]  # read now: a row of another shape fails here, with the hint, not at the first pass
            return corpus
        except STSInputError as err:
            if name != "train":
                raise
            raise STSInputError(f"{err} (This is the trainer's train dataset, read for the forecast: pass "
                                "train_probe= to STSCallback with texts or records of the training data.)") from err
    if {"prompt_ids", "chosen_ids"} <= columns:
        return DecodedCorpus(name, dataset, tokenizer, "prompt_ids", "chosen_ids", None)
    if {"prompt_ids", "completion_ids"} <= columns:
        return DecodedCorpus(name, dataset, tokenizer, "prompt_ids", "completion_ids", None)
    if "input_ids" in columns:
        mask_key = next((k for k in ("completion_mask", "assistant_masks", "labels") if k in columns), None)
        return DecodedCorpus(name, dataset, tokenizer, None, None, mask_key)
    what = "train dataset (pass train_probe= to STSCallback" if name == "train" else \
        f"dataset {name!r} (pass that domain's texts or records"
    raise STSInputError(f"Cannot read the trainer's {what} with texts or records instead); its columns are "
                        f"{sorted(columns)}, none of {sorted(RAW_COLUMNS)}, 'input_ids' or 'prompt_ids'.")


def _trained_as_tokenized(columns: set[str], first: Any) -> bool:
    """Whether a set that keeps its raw text beside TRL's ``input_ids`` is read from the ids: what is trained,
    cut at ``max_length``, not the whole raw text. Chats keep their raw turns (the forecast lays them out with
    the chat template itself); so do DPO's columns, which have no ``input_ids``."""
    if "input_ids" not in columns or "messages" in columns:
        return False
    return not isinstance(first.get("prompt") if isinstance(first, Mapping) else None, list)


def _desirable_only(dataset: Any, name: str) -> Any:
    """KTO's unpaired data (completions with a bool ``label``): only the desirable ones are what training pushes
    the model toward; an undesirable one read as a demonstration would point the forecast the wrong way."""
    labels = dataset["label"] if hasattr(dataset, "column_names") else [row["label"] for row in dataset]
    keep = [i for i, label in enumerate(labels) if bool(label)]
    if not keep:
        raise STSInputError(f"The trainer's {name} dataset has a `label` column (KTO) but no example labelled "
                            "desirable (True): nothing shows what training pushes toward; pass train_probe= with "
                            "desirable texts.")
    return dataset.select(keep) if hasattr(dataset, "select") else [dataset[i] for i in keep]


def target_corpora(target: Any, trainer: Any, tokenizer) -> tuple[dict[str, Corpus], dict[str, LmEvalTarget]]:
    """The target domains and the lm-eval tasks among them; the trainer's eval set(s) for ``"eval_dataset"``;
    datasets raw or tokenized."""
    if isinstance(target, (str, Path)) and str(target) == EVAL_DATASET:
        eval_sets = getattr(trainer, "eval_dataset", None)
        if eval_sets is None:
            raise STSConfigError(f"target_domains={EVAL_DATASET!r} but the trainer has no eval_dataset; pass "
                                 "eval_dataset= (a dataset or a dict name -> dataset) to the trainer, or give "
                                 "target_domains explicitly.")
        target = dict(eval_sets) if isinstance(eval_sets, dict) else {"eval": eval_sets}
    lm_eval_targets: dict[str, LmEvalTarget] = {}
    if isinstance(target, dict):
        target = named_items(target, "target_domains")
        lm_eval_targets = {name: LmEvalTarget.from_spec(value, name)
                           for name, value in target.items() if is_lm_eval_target(value)}
        target = {name: lm_eval_targets[name].texts() if name in lm_eval_targets
                  else corpus_from_training_dataset(value, tokenizer, name=name) if is_dataset(value)
                  else value for name, value in target.items()}
    return load_domains(target), lm_eval_targets


def probe_corpus(train_probe: Any, trainer: Any, train_dataloader: Any, tokenizer) -> Corpus:
    """The training data whose shift is forecast and re-checked: ``train_probe`` or the trainer's train set."""
    if train_probe is not None:
        corpus = load_corpus(train_probe, name="train_probe")
        if len(corpus) == 0:
            raise STSInputError("train_probe has no texts; give the training data whose effect is forecast (or "
                                "leave train_probe unset for the trainer's train dataset).")
        return corpus
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None and train_dataloader is not None:
        dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None:
        raise STSInputError("No training data found for the forecast: pass train_probe= to STSCallback.")
    return corpus_from_training_dataset(dataset, tokenizer)
