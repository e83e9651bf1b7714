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

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.data import (Corpus, Example, is_dataset, is_mc_layout, load_corpus, load_domains, named_items,
                         special_prefix, take_streamed)
from ..core.distributed import warn_on_main
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.lm_eval_tasks import LmEvalTarget, is_lm_eval_target
from ..pipelines.preference import Truncation

EVAL_DATASET = "eval_dataset"  # target_domains= value: the trainer's own eval set(s), by name

RAW_COLUMNS = {"text", "messages", "prompt"}
IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross_entropy default, what TRL writes over prompts)


class DecodedCorpus(Corpus):
    """Examples decoded lazily from token ids; a packed dataset's rows (``seq_lengths``) give one example per
    sequence packed in them."""

    def __init__(self, name: str, dataset: Sequence[Any], tokenizer, prompt_key: str | None, answer_key: str | None,
                 mask_key: str | None, max_length: int | None = None):
        super().__init__(name, dataset)
        self.cut = Truncation(max_length)  # prompt + answer cut there, as a collator that keeps the start cuts them
        self.tokenizer = tokenizer
        self.prompt_key, self.answer_key, self.mask_key = prompt_key, answer_key, mask_key
        self._strip = {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None}
        self._prefix = special_prefix(tokenizer)  # what the prompt builder puts before a text itself
        self._spans = packed_spans(dataset) if answer_key is None else None

    def __len__(self) -> int:
        return len(self._spans) if self._spans is not None else len(self._items)

    def _decode(self, ids) -> str:
        """The text of ``ids`` as the prompt builder re-encodes it: without the start it adds itself (a BOS the
        chat template wrote, which the tokenizer does not add, stays) and without padding."""
        ids = token_list(ids)
        pad = self.tokenizer.pad_token_id
        while ids and ids[0] == pad:  # left padding
            ids = ids[1:]
        if self._prefix and ids[:len(self._prefix)] == self._prefix:
            ids = ids[len(self._prefix):]
        if pad is not None and pad != self.tokenizer.eos_token_id:
            ids = [i for i in ids if i != pad]
        elif pad is not None:  # pad is EOS: one inside the text is real (documents joined); padding trails
            while len(ids) > 1 and ids[-1] == pad and ids[-2] == pad:
                ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _example(self, prompt_ids: list[int], answer_ids: list[int]) -> Example:
        """The prompt and its answer decoded together, the answer as what the whole adds to the prompt: decoded
        alone, an answer loses its leading space under a SentencePiece decoder that strips the first one
        (Llama 2's, Mistral's), and the re-joined text would not be what was trained."""
        prompt = self._decode(prompt_ids)
        whole = self._decode(list(prompt_ids) + list(answer_ids))
        answer = whole[len(prompt):] if whole.startswith(prompt) else self._decode(answer_ids)
        return Example(prompt=prompt, answer=answer)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if self.answer_key is not None:
            row = self._items[index]
            prompt, answer = self.cut.apply(token_list(row[self.prompt_key]), token_list(row[self.answer_key]))
            return self._example(prompt, answer)
        if self._spans is not None:
            row_index, place = self._spans.locate(index)
            row = self._items[row_index]
            start, stop = span_bounds(row["seq_lengths"], place)  # from the row read anyway: not read twice
        else:
            row, start, stop = self._items[index], 0, None
            if "attention_mask" in row:  # a row tokenized with its padding (padding="max_length"): the text only
                attended = [i for i, flag in enumerate(token_list(row["attention_mask"])) if flag]
                if attended:
                    start, stop = attended[0], attended[-1] + 1
        ids = token_list(row["input_ids"])[start:stop]
        if self.mask_key is not None and self.mask_key in row:
            mask = [int(label != IGNORE_INDEX) for label in token_list(row["labels"])] \
                if self.mask_key == "labels" else token_list(row[self.mask_key])
            if not any(mask[start:stop]):  # a prompt piece packing split off: training trains none of it
                return Example(prompt="", plain_text=True)  # no text: passed over where texts are drawn
            attention = token_list(row["attention_mask"])[start:stop] if "attention_mask" in row else None
            trained = mask[start:stop]
            split = prompt_answer_split(ids, trained, attention, self._strip, self.tokenizer.bos_token_id)
            if split is not None:
                prompt_start, answer_start, answer_stop = split
                return self._example(ids[self._with_bos(ids, prompt_start):answer_start], ids[answer_start:answer_stop])
            # plain text: its first trained run only (a wrapped piece: an answer's tail, then a prompt the loss masks)
            first = next(i for i, flag in enumerate(trained) if flag)
            end = next((i for i in range(first, len(trained)) if not trained[i]), len(trained))
            return Example(prompt=self._decode(ids[self._with_bos(ids, first):end]), plain_text=True)
        return Example(prompt=self._decode(ids), plain_text=True)

    def _with_bos(self, ids: list[int], start: int) -> int:
        """``start``, or the BOS just before it where the prompt builder adds none itself (a chat template wrote
        it: the model was trained with it)."""
        bos = self.tokenizer.bos_token_id
        return start - 1 if start > 0 and ids[start - 1] == bos and bos not in self._prefix else start


def prompt_answer_split(ids: Sequence[int], trained: Sequence[int], attention: Sequence[int] | None,
                        filler: set[int], bos: int | None) -> tuple[int, int, int] | None:
    """Where a row's first whole example lies: (prompt start, answer start, answer end), or ``None`` when the row
    is plain text (every real token trained, or none). Leading padding and BOS (``filler``, or attention 0) is no
    prompt: a left-padded row whose labels mask only its padding is plain text. A row of several examples
    (``packing_strategy="wrapped"``: each starts with ``bos``, the row cut anywhere) gives its first example whose
    prompt is in the row, up to the next BOS; a leading answer is the tail of an example the row before cut. A
    conversation's later turns (masked user turns, trained assistant turns, no BOS between) stay in its answer."""
    lead = 0
    while lead < len(ids) and (ids[lead] in filler or (attention is not None and not attention[lead])):
        lead += 1
    starts = [i for i in range(lead + 1, len(ids)) if bos is not None and ids[i] == bos]  # later examples' BOS
    first = next((i for i in range(lead, len(trained)) if trained[i]), None)
    if first is None:
        return None
    prompt_start = lead
    if first == lead:  # trained from the start: plain text, or (wrapped) the tail of an example, then a whole one
        prompt_start = next((i for i in starts if i > first), None)
        if prompt_start is None:
            return None
        first = next((i for i in range(prompt_start, len(trained)) if trained[i]), None)
        if first is None or first == prompt_start:  # texts packed whole (their BOS trained): plain text
            return None
    end = next((i for i in starts if i > first), len(ids))
    return prompt_start, first, end


def token_list(value: Any) -> list[int]:
    """Token ids (or mask flags) of one row as ints, from a list or a tensor (a tokenizer's ``return_tensors="pt"``
    row of shape [1, n] too): 0-d tensors would compare unequal to the BOS id and keep a second BOS."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    return [int(v) for v in value]


class PackedSpans(Sequence):
    """(row, start, stop) of every sequence packed in the rows of a packed dataset, found when asked: only the
    running count of sequences per row is held, as a list of every span took seconds and hundreds of MB to build
    on a large set of which the forecast reads a few thousand."""

    def __init__(self, dataset: Sequence[Any], ends: np.ndarray):
        self._dataset = dataset
        self._ends = ends  # sequences packed in rows 0..r, for each row r

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        """The row that sequence ``index`` is packed in, and its place among that row's sequences."""
        index = operator.index(index)
        size = len(self)
        if index < 0:  # as a list indexes
            index += size
        if not 0 <= index < size:
            raise IndexError("packed sequence index out of range")
        row = int(np.searchsorted(self._ends, index, side="right"))
        return row, index - (int(self._ends[row - 1]) if row else 0)

    def __getitem__(self, index: int) -> tuple[int, int, int]:  # type: ignore[override]
        row, place = self.locate(index)
        return (row, *span_bounds(self._dataset[row]["seq_lengths"], place))


def span_bounds(row_lengths: Any, place: int) -> tuple[int, int]:
    """(start, stop) in its row's tokens of the sequence at ``place`` among the row's ``seq_lengths``."""
    lengths = [int(length) for length in row_lengths]
    start = sum(lengths[:place])
    return start, start + lengths[place]


def packed_spans(dataset: Sequence[Any]) -> PackedSpans | None:
    """(row, start, stop) of every sequence packed in the rows of a dataset TRL packed (its ``seq_lengths``
    column), or None when it is not packed. Reading a packed row whole would join unrelated examples (and split
    a completion-only row at its first prompt only)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        if "seq_lengths" not in columns:
            return None
        counts = _list_sizes(dataset, "seq_lengths")
        if counts is None:  # no Arrow column of int lists: row by row (a malformed row fails here, as ever)
            counts = [_sequence_count(lengths) for lengths in dataset["seq_lengths"]]
    else:  # rows given one by one: packed only when the first is (reading every row would tokenize a lazy set)
        if not len(dataset) or not isinstance(dataset[0], Mapping) or "seq_lengths" not in dataset[0]:
            return None
        counts = [_sequence_count(dataset[i]["seq_lengths"]) for i in range(len(dataset))]
    return PackedSpans(dataset, np.cumsum(counts, dtype=np.int64))


def _sequence_count(row_lengths: Any) -> int:
    return len([int(length) for length in row_lengths])  # int(): a malformed row fails now, not mid-forecast


def _arrow_column(dataset: Any, column: str) -> Any:
    """A ``datasets.Dataset`` column read in bulk as Arrow, in the dataset's row order (a selection or shuffle
    applied), or None for other data: the column read row by row in Python took ~35 µs a row."""
    if not is_dataset(dataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "with_format"):
        return None
    return dataset.with_format("arrow", columns=[column])[:].column(column)


def _list_sizes(dataset: Any, column: str) -> Any:
    """How many items each row's list holds, read in bulk; None where that read could differ from the rows'
    (no Arrow column, a null, a value other than an int)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = _arrow_column(dataset, column)
    if values is None or values.null_count:
        return None
    kind = values.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return None
    if not pa.types.is_integer(kind.value_type) or pc.list_flatten(values).null_count:
        return None
    return pc.list_value_length(values).to_numpy()


def _truth_mask(dataset: Any, column: str) -> np.ndarray | None:
    """``bool(value)`` of each row's ``column``, read in bulk; None where that read could differ from the rows'
    (no Arrow column, values other than bools or numbers)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = _arrow_column(dataset, column)
    if values is None:
        return None
    if pa.types.is_boolean(values.type):
        truth = values
    elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        truth = pc.not_equal(values, 0)  # NaN is true, as bool(nan)
    else:
        return None
    return np.asarray(pc.fill_null(truth, False).to_numpy(), dtype=bool)  # a null reads as None: false


def corpus_from_training_dataset(dataset: Any, tokenizer, name: str = "train", max_length: int | None = None,
                                 target: bool = False) -> Corpus:
    """A trainer's dataset (raw or tokenized, map-style or streaming) as a corpus named ``name``; ``max_length``:
    the trainer's (``SFTConfig.max_length``), at which it cut the rows it tokenized. ``target``: a target domain's
    texts (a KTO set's undesirable completions are its text too), not what training pulls toward."""
    if not hasattr(dataset, "__len__"):  # a streaming IterableDataset: its first examples stand for it
        dataset = take_streamed(dataset)
    first = dataset[0] if len(dataset) else {}
    columns = set(getattr(dataset, "column_names", None) or (first.keys() if isinstance(first, Mapping) else []))
    if is_mc_layout(columns) and "input_ids" not in columns:  # a multiple-choice set (MMLU-, ARC-like): scored
        return load_corpus(dataset, name=name)
    if "label" in columns and columns & {"completion", "completion_ids"} and not target:
        dataset = _desirable_only(dataset, name)
        if {"prompt_ids", "completion_ids"} <= columns and max_length is not None and \
                _some_row_reaches(dataset, ("prompt_ids", "completion_ids"), max_length):
            # KTO's collator cuts prompt + completion at max_length: read the ids, as trained
            return DecodedCorpus(name, dataset, tokenizer, "prompt_ids", "completion_ids", None, max_length)
    if columns & RAW_COLUMNS and not _trained_as_tokenized(dataset, columns, first, max_length) \
            or not isinstance(first, Mapping):
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
        # `labels` is what the loss trains (TRL 1 builds it from the masks it applies, and keeps a
        # `completion_mask` it ignores when completion_only_loss=False); the masks alone only without labels.
        mask_key = next((k for k in ("labels", "completion_mask", "assistant_masks") if k in columns), None)
        return DecodedCorpus(name, dataset, tokenizer, None, None, mask_key)
    raise STSInputError(unreadable_columns(columns, name))


def unreadable_columns(columns: set[str], name: str) -> str:
    """Why a dataset with ``columns`` cannot be read (none of the raw or tokenized columns), and the fix."""
    found = f"its columns are {sorted(columns)}, none of {sorted(RAW_COLUMNS)}, 'input_ids' or 'prompt_ids'"
    if name == "train":
        return (f"Cannot read the trainer's train dataset: {found}. Pass train_probe= to STSCallback with texts or "
                "records of the training data.")
    return (f"Cannot read the dataset of {name}: {found}. Rename its text column (e.g. "
            "dataset.rename_column('content', 'text')) or give that domain's texts as a list.")


def check_readable_columns(data: Any, what: str) -> None:
    """A target given as a datasets.Dataset whose columns hold nothing this package reads: refused before training
    (a tokenized set is read from ``input_ids`` / ``prompt_ids``)."""
    columns = set(getattr(data, "column_names", None) or ()) if is_dataset(data) else set()
    if columns and not columns & (RAW_COLUMNS | {"input_ids", "prompt_ids"}) and not is_mc_layout(columns):
        raise STSInputError(unreadable_columns(columns, what))


def _trained_as_tokenized(dataset: Any, columns: set[str], first: Any, max_length: int | None) -> bool:
    """Whether a set that keeps its raw text beside TRL's ``input_ids`` is read from the ids: what is trained,
    cut at ``max_length``, not the whole raw text. Chats keep their raw turns (the forecast lays them out with
    the chat template itself) unless the trainer cut some row at ``max_length``, or trains every token of them
    (``assistant_only_loss`` / ``completion_only_loss`` off: ``labels`` mask nothing): then what it trains is
    not the raw turns' prompt and answer. DPO's columns, which have no ``input_ids``, stay raw."""
    if "input_ids" not in columns:
        return False
    chat = "messages" in columns or isinstance(first.get("prompt") if isinstance(first, Mapping) else None, list)
    return (not chat or (max_length is not None and _some_row_reaches(dataset, ("input_ids",), max_length))
            or ("labels" in columns and _labels_mask_nothing(dataset)))


def _labels_mask_nothing(dataset: Any, rows: int = 64) -> bool:
    """Whether the first ``rows`` rows' ``labels`` train every token (no -100 over a prompt)."""
    head = [dataset[i]["labels"] for i in range(min(rows, len(dataset)))]
    return bool(head) and all(IGNORE_INDEX not in token_list(labels) for labels in head)


def _some_row_reaches(dataset: Any, columns: tuple[str, ...], length: int, rows: int = 10_000) -> bool:
    """Whether a row's ``columns`` together hold ``length`` items or more (a row cut there), over its first
    ``rows``."""
    head = dataset.select(range(min(rows, len(dataset)))) if hasattr(dataset, "select") else dataset
    sizes = [_list_sizes(head, column) for column in columns]
    if any(size is None for size in sizes):
        total = [sum(len(token_list(dataset[i][c])) for c in columns) for i in range(min(rows, len(dataset)))]
    else:
        total = list(np.sum(sizes, axis=0))
    return bool(len(total)) and int(max(total)) >= length


def _desirable_only(dataset: Any, name: str) -> Any:
    """KTO's unpaired data (completions with a bool ``label``): only the desirable ones are what training pushes
    the model toward; an undesirable one read as a demonstration would point the forecast the wrong way."""
    mask = _truth_mask(dataset, "label")
    if mask is not None:
        keep: Any = np.flatnonzero(mask)
    else:
        labels = dataset["label"] if hasattr(dataset, "column_names") else [row["label"] for row in dataset]
        keep = [i for i, label in enumerate(labels) if bool(label)]
    if not len(keep):
        raise STSInputError(f"The trainer's {name} dataset has a `label` column (KTO) but no example labelled "
                            "desirable (True): nothing shows what training pushes toward; pass train_probe= with "
                            "desirable texts.")
    if len(keep) < len(dataset):
        warn_on_main(f"STS: the {name} dataset is KTO's (a `label` column): its {len(dataset) - len(keep)} undesirable "
                     f"example(s) of {len(dataset)} are left out of the forecast, which reads the desirable completions "
                     "training pulls toward; the push away from the undesirable ones is not forecast (the re-checks "
                     "measure the whole effect).", STSDataWarning, stacklevel=4)
    if hasattr(dataset, "select"):  # a view by indices; every row desirable: the set itself
        return dataset if len(keep) == len(dataset) else dataset.select(keep)
    return [dataset[i] for i in keep]


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
                  else corpus_from_training_dataset(value, tokenizer, name=name, target=True) if is_dataset(value)
                  else value for name, value in target.items()}
    return load_domains(target), lm_eval_targets


def probe_corpus(train_probe: Any, trainer: Any, train_dataloader: Any, tokenizer) -> Corpus:
    """The training data whose shift is forecast and re-checked: ``train_probe`` or the trainer's train set."""
    if train_probe is not None:  # a dataset as the trainer would take it (tokenized too), or texts / records
        corpus = corpus_from_training_dataset(train_probe, tokenizer, name="train_probe",
                                              max_length=trained_length(trainer)) if is_dataset(train_probe) \
            else load_corpus(train_probe, name="train_probe")
        if len(corpus) == 0:
            raise STSInputError("train_probe has no texts; give the training data whose effect is forecast (or "
                                "leave train_probe unset for the trainer's train dataset).")
        return corpus
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None and train_dataloader is not None:
        dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None:
        raise STSInputError("No training data found for the forecast: pass train_probe= to STSCallback.")
    return corpus_from_training_dataset(dataset, tokenizer, max_length=trained_length(trainer))


def trained_length(trainer: Any) -> int | None:
    """The length at which the trainer cuts what it trains (TRL's ``max_length``), if it has one."""
    value = getattr(getattr(trainer, "args", None), "max_length", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
