"""Training sets and target domains: loading, sampling within token budgets, and prompt building.

Every input shape becomes a sequence of :class:`Example` (a prompt and an optional answer). Prompts with
in-context demonstrations are built so that the query's tokens are *identical* with and without the
demonstrations: the two conditions are compared position by position at those tokens only.
"""

from __future__ import annotations

import array
import bisect
import copy
import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .distributed import warn_on_main
from .errors import STSDataWarning, STSInputError
from .lm_eval_tasks import KEY as LM_EVAL_KEY
from .lm_eval_tasks import LmEvalTarget, is_lm_eval_target

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Example:
    """One training example or domain text.

    ``prompt`` is a string or chat messages (ending with a user turn); ``answer`` the assistant's reply
    (``None`` for plain text, where the whole text serves both as query and as demonstration, and for
    prompt-only data such as GRPO prompts, which cannot serve as demonstrations).
    """

    prompt: str | Messages
    answer: str | None = None
    plain_text: bool = False
    # A chat answer's own turn when it calls tools: the chat template renders its ``tool_calls`` as training does.
    answer_turn: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # The record's own chat-template arguments (its ``tools``, its ``chat_template_kwargs``), as TRL renders it.
    template_kwargs: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # A plain text that ends in what it is about (a target domain's prompt + answer): a cut to max_query_tokens keeps
    # its end, as a chat's keeps its last turns (its start would keep the prompt and lose the answer)
    keep_end: bool = field(default=False, compare=False, repr=False)
    # The whole conversation it was split from (turns after the answer included): what a target domain measures.
    conversation: Messages | None = field(default=None, compare=False, repr=False)

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    @property
    def prompt_texts(self) -> list[str]:
        """The prompt's text: itself, or each turn's content."""
        return [self.prompt] if isinstance(self.prompt, str) else [message_text(m) for m in self.prompt]

    @property
    def can_demonstrate(self) -> bool:
        """It has text to show the model as a demonstration: a plain text, or an answer (blank ones have none)."""
        if self.plain_text:  # a text, or a whole conversation read as a domain's text
            return any(turn.strip() for turn in self.prompt_texts)
        return self.answer is not None and bool(self.answer.strip())


def is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in value)
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content blocks: keep the text parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)  # None: a tool-call turn with no text


def tool_calls_text(message: dict[str, Any]) -> str:
    """A turn's tool calls as JSON lines ``{"name", "arguments"}`` (OpenAI / Hugging Face ``tool_calls``)."""
    lines = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        lines.append(json.dumps({"name": function.get("name"), "arguments": function.get("arguments")},
                                ensure_ascii=False, default=str))
    return "\n".join(lines)


def message_text(message: dict[str, Any]) -> str:
    """A turn's text: its content, then its tool calls as JSON (a tool-call turn's content is often None)."""
    text, calls = _content_text(message.get("content")), tool_calls_text(message)
    return text + ("\n" if text and calls else "") + calls


def _split_conversation(messages: Messages) -> Example:
    """The last assistant turn is the answer; everything before it is the prompt."""
    last_assistant = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None
    )
    if last_assistant is None:
        return Example(prompt=list(messages), answer=None)
    prompt = list(messages[:last_assistant]) or [{"role": "user", "content": ""}]
    turn = messages[last_assistant]
    return Example(prompt=prompt, answer=message_text(turn), answer_turn=turn if turn.get("tool_calls") else None,
                   conversation=list(messages))


def _tool_call_turn(value: Any) -> dict[str, Any] | None:
    """A conversational completion's one assistant turn when it calls tools (TRL's prompt / completion and
    preference formats), for the chat template to render as training does; else ``None``."""
    turns = [m for m in value if m["role"] == "assistant"] if is_messages(value) else []
    return turns[0] if len(turns) == 1 and turns[0].get("tool_calls") else None


def _answer_text(value: Any, field: str = "answer", where: str = "") -> str:
    if isinstance(value, str):
        return value
    if is_messages(value):
        return "".join(message_text(m) for m in value if m["role"] == "assistant") or "".join(
            message_text(m) for m in value)
    raise STSInputError(f"Cannot read example{where}: its {field!r} is {type(value).__name__} {value!r:.40}, but "
                        "an answer must be a string or chat messages (write a numeric answer as text, e.g. \"34\").")


RECORD_FIELDS = ("'text', 'messages', 'prompt'/'completion', 'prompt'/'chosen'/'rejected', or "
                 "'question'/'choices'/'answer' (multiple choice)")


def record_template_kwargs(record: Any, where: str = "") -> dict[str, Any]:
    """A record's own chat-template arguments as TRL's SFT and DPO trainers pass them: its ``tools`` (tool schemas,
    or their JSON text, as a dataset column often holds them) and its ``chat_template_kwargs``."""
    if not isinstance(record, dict):
        return {}
    kwargs = dict(record.get("chat_template_kwargs") or {})
    tools = record.get("tools")
    if isinstance(tools, str) and not tools.strip():  # a JSON-text column's empty rows: no tools
        tools = None
    elif isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise STSInputError(f"Example{where}: its 'tools' is text that is not JSON ({err}). Give a list of tool "
                                "schemas, or their JSON text.") from None
    if tools:  # TRL passes None for an empty list: some templates render tool boilerplate for tools=[]
        kwargs["tools"] = tools
    return kwargs


def joined_template_kwargs(examples: Sequence[Example]) -> dict[str, Any]:
    """The template arguments of one conversation joined from several examples: the first one's (the query's),
    and every example's tools, once each (a template lists them all before the turns)."""
    kwargs: dict[str, Any] = {}
    tools: list[Any] = []
    seen: set[str] = set()
    for example in examples:
        for key, value in (example.template_kwargs or {}).items():
            if key != "tools":
                kwargs.setdefault(key, value)
        for tool in (example.template_kwargs or {}).get("tools") or []:
            key = json.dumps(tool, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                tools.append(tool)
    if tools:
        kwargs["tools"] = tools
    return kwargs


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a preference pair in TRL's implicit-prompt form (``extract_prompt``): the
    shared leading turns of two conversations, or the shared start of two texts (a space before the first
    difference goes with the completions)."""
    shortest = min(len(chosen), len(rejected))
    n = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if n is None:  # one is the start of the other: as TRL, the last shared item goes with the completions
        n = max(shortest - 1, 0)
    elif isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def example_from_record(record: Any, where: str = "") -> Example:
    """Turn one item (string, chat conversation or TRL-style record) into an :class:`Example`."""
    example = _example_from_record(record, where)
    template_kwargs = record_template_kwargs(record, where) if example.is_chat else {}  # only a chat is templated
    if template_kwargs:
        example = replace(example, template_kwargs=template_kwargs)
    for text in [*example.prompt_texts, example.answer or ""]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. half of an emoji's surrogate pair; the tokenizer's error names nothing
            raise STSInputError(
                f"Example{where} holds {text[err.start:err.end]!r} at character {err.start}, which is not valid "
                "Unicode text (a lone surrogate: often half of an emoji a scraper split). Clean the data, e.g. "
                "text.encode('utf-8', 'replace').decode('utf-8').") from None
    return example


def _example_from_record(record: Any, where: str = "") -> Example:
    if isinstance(record, str):
        return Example(prompt=record, plain_text=True)
    if is_messages(record):
        return _split_conversation(record)
    if isinstance(record, dict):
        if "messages" in record and is_messages(record["messages"]):
            return _split_conversation(record["messages"])
        if "text" in record and isinstance(record["text"], str):
            return Example(prompt=record["text"], plain_text=True)
        if as_mc_record(record) is not None:  # a multiple-choice item: its text is the question and right answer
            from .multiple_choice import CHOICE_FORMAT, PROMPT_FORMAT

            item = check_multiple_choice(record, where)
            return Example(prompt=PROMPT_FORMAT.format(question=item["question"]),
                           answer=CHOICE_FORMAT.format(choice=item["choices"][item["answer"]]))
        if "prompt" not in record and "chosen" in record and "rejected" in record:  # TRL's implicit prompt
            chosen, rejected = record["chosen"], record["rejected"]
            if (isinstance(chosen, str) and isinstance(rejected, str)) or (is_messages(chosen) and
                                                                            is_messages(rejected)):
                prompt, answer, _ = implicit_prompt(chosen, rejected)
                return _example_from_record({"prompt": prompt, "chosen": answer}, where)
        if "prompt" in record:
            prompt = record["prompt"]
            answer_field = next((k for k in ("completion", "chosen", "response", "answer") if k in record), None)
            value = record[answer_field] if answer_field else None
            answer = _answer_text(value, answer_field, where) if value is not None else None
            if isinstance(prompt, str):
                return Example(prompt=prompt, answer=answer)
            if is_messages(prompt):
                return Example(prompt=list(prompt), answer=answer, answer_turn=_tool_call_turn(value))
    if isinstance(record, dict):
        _check_field_types(record, where)
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise STSInputError(
        f"Cannot read example{where}: got {keys}. Each item must be a string, a chat conversation "
        f"(list of {{'role', 'content'}}), or a record with {RECORD_FIELDS}."
    )


def _check_field_types(record: dict[str, Any], where: str) -> None:
    """A record that has a known field of the wrong type: an error naming that field, not the generic list of
    fields (which the record, holding the field, seems to satisfy)."""
    expected = {"text": "a string", "prompt": "a string or chat messages",
                "messages": "a list of {'role', 'content'} turns"}
    for key, kind in expected.items():
        if key in record:
            value = record[key]
            shown = "null (None)" if value is None else f"{type(value).__name__} {value!r:.40}"
            hint = " (write numbers as text, e.g. \"7\"; fill or drop empty ones)" if key != "messages" else ""
            raise STSInputError(f"Cannot read example{where}: its {key!r} is {shown}, but {key!r} must be "
                                f"{kind}{hint}.")


MC_FIELDS = ("question", "choices", "answer")
# the multiple-choice layouts read as (question, choices, answer): MMLU's, ARC's (choices {"text", "label"},
# answerKey a label), HellaSwag's (ctx, endings, label)
MC_LAYOUTS = (MC_FIELDS, ("question", "choices", "answerKey"), ("ctx", "endings", "label"))


def is_mc_layout(columns: Iterable[str]) -> bool:
    """Whether a table's columns hold multiple-choice items in one of :data:`MC_LAYOUTS`."""
    present = set(columns)
    return any(set(layout) <= present for layout in MC_LAYOUTS)


def as_mc_record(record: Any) -> dict[str, Any] | None:
    """A multiple-choice record of any of :data:`MC_LAYOUTS` as ``{"question", "choices", "answer"}`` (the answer
    as given: an index, a letter, a label or the choice's text; :func:`~.multiple_choice.check_items` reads it);
    ``None`` for any other record."""
    if not isinstance(record, Mapping):
        return None
    for question, choices, answer in MC_LAYOUTS:
        if question in record and choices in record and answer in record:
            options, right = record[choices], record[answer]
            if isinstance(options, Mapping) and "text" in options:  # ARC: {"text": [...], "label": ["A", ...]}
                labels = [str(label) for label in (options.get("label") or [])]
                options = list(options["text"])
                right = labels.index(str(right)) if str(right) in labels else right
            return {"question": record[question], "choices": options, "answer": right}
    return None


def _mc_layout_without_answer(record: Any) -> tuple[str, str, str] | None:
    """The multiple-choice layout whose question and choices ``record`` has, its answer key missing."""
    if isinstance(record, Mapping):
        for layout in MC_LAYOUTS:
            if layout[0] in record and layout[1] in record and layout[2] not in record:
                return layout
    return None


def check_multiple_choice(record: dict[str, Any], where: str = "") -> dict[str, Any]:
    from .multiple_choice import check_item

    return check_item(record, f"example{where}")


def multiple_choice_items(corpus: "Corpus") -> list[dict[str, Any]] | None:
    """The items of a multiple-choice domain (every record a multiple-choice item), else ``None``; a domain that
    mixes them with other texts is said to be measured by its loss only."""
    items = getattr(corpus, "_items", None)
    if items is None or not len(items):
        return None
    # a text domain: its first rows say whether items are mixed in
    read = [items[i] for i in range(min(len(items), 1000))] if as_mc_record(items[0]) is None else items
    records = [as_mc_record(r) for r in read]
    found = sum(r is not None for r in records)
    if found < len(records):
        for i, record in enumerate(records):  # an item with a question and choices lacks only its answer: a typo
            layout = _mc_layout_without_answer(read[i]) if record is None and found else None
            if layout is not None:
                question, choices, answer = layout
                keys = sorted(str(k) for k in read[i])
                raise STSInputError(f"Multiple choice: example{corpus._where(i)} has {question!r} and {choices!r} "
                                    f"but no {answer!r} (its keys: {keys}); give each multiple-choice item its "
                                    "answer.")
        if found:
            warn_on_main(f"Target domain {corpus.name!r} mixes {found} multiple-choice item(s) with "
                         f"{len(records) - found} other text(s): its accuracy is not measured (only a domain of "
                         "multiple-choice items alone is); give the items a domain of their own.", STSDataWarning,
                         stacklevel=3)
        return None
    from .multiple_choice import check_items

    return check_items(records, repr(corpus.name))


def example_text(example: Example) -> str:
    """The example as one plain text (prompt, then answer), e.g. for SAE training or loss measurement."""
    if isinstance(example.prompt, str):
        prompt = example.prompt
    else:
        prompt = "\n".join(message_text(m) for m in example.prompt)
    return prompt + ("\n" + example.answer if example.answer else "")


class Corpus(Sequence):
    """A named, lazily converted sequence of examples (a training set or a target domain)."""

    def __init__(self, name: str, items: Sequence[Any], places: Sequence[str] | None = None):
        self.name = name
        self._items = items
        self._places = places  # where each item is in its file (e.g. "law.jsonl line 8"), for errors

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        try:
            return example_from_record(self._items[index], where=self._where(index))
        except STSInputError:
            if index != 0 and len(self._items):  # records all in another layout: named at the first, not a drawn one
                example_from_record(self._items[0], where=self._where(0))
            raise

    def _where(self, index: int) -> str:
        place = f" ({self._places[index]})" if self._places is not None else ""
        return f" {index} of {self.name!r}{place}"

    def records(self) -> list[Any]:
        """The items as given (records keep columns an :class:`Example` drops, e.g. ``rejected``)."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self)} examples)"


def domain_example(example: Example) -> Example:
    """A target domain's example as the text whose held-out loss and latents are measured: the prompt with its
    answer (a chat's reply as its last turn; a completion after its prompt, joined as TRL's SFT joins them; a
    multiple-choice question with its right answer). The prompt alone would leave out the text the domain is about."""
    if example.answer is None:
        return example
    if example.is_chat:  # the conversation as given (its tool calls, its turns after the answer), else rebuilt
        turns = example.conversation or [*example.prompt,
                                         example.answer_turn or {"role": "assistant", "content": example.answer}]
        return Example(prompt=list(turns), plain_text=True, template_kwargs=example.template_kwargs)
    return Example(prompt=example.prompt + example.answer, plain_text=True, keep_end=True)


class DomainCorpus(Corpus):
    """A target domain: the examples of ``corpus`` (any kind of :class:`Corpus`) read whole, answers included
    (:func:`domain_example`); its records as given."""

    def __init__(self, corpus: Corpus):
        super().__init__(corpus.name, getattr(corpus, "_items", []))
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        return domain_example(self.corpus[index])

    def records(self) -> list[Any]:
        return self.corpus.records()


class Places(Sequence):
    """Where each item of a file is, e.g. "law.jsonl line 8", made when an error asks (not one string per item)."""

    def __init__(self, where: str, numbers: Sequence[int]):
        self.where, self.numbers = where, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return f"{self.where} {self.numbers[index]}"


def read_json_file(path: Path, label: str = "") -> tuple[list[Any], Places | None]:
    """The records of a .json file: a list, an object with a 'data' / 'texts' list, or JSON Lines (which
    ``Dataset.to_json`` writes under .json); anything else is an error naming the file."""
    text = read_text(path, label)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and err.lineno > 1:  # a whole value, then more lines: JSON Lines, read as such
            return _read_jsonl(path, label)  # (a broken line among them is named by its number)
        raise STSInputError(f"Data file {path}{label} is not valid JSON ({err.msg} at line {err.lineno}, column "
                            f"{err.colno}); fix it, or write one JSON record per line as .jsonl.") from err
    if isinstance(loaded, dict) and "data" not in loaded and "texts" not in loaded and (
            set(loaded) & {"text", "messages", "prompt"} or is_mc_layout(list(loaded))):
        loaded = [loaded]  # one record (Dataset.select([0]).to_json() writes one line)
    items = loaded if isinstance(loaded, list) else (
        loaded.get("data", loaded.get("texts")) if isinstance(loaded, dict) else None)
    if not isinstance(items, list):
        raise STSInputError(f"{path}{label} must hold a JSON list (or an object with a 'data' list).")
    return items, None


class JsonlRecords(Sequence):
    """A JSONL file's records, each parsed where it is used: the file is read once and checked line by line (each
    record parsed, then dropped); its bytes and each record's place in them are kept, so that a file of millions of
    records costs its size in memory, not every record as Python objects (a few times the size), and a file
    changed or deleted after loading changes nothing."""

    def __init__(self, path: Path, label: str = ""):
        self.path, self.label = path, label
        try:
            self.data = path.read_bytes()
        except OSError as err:
            raise STSInputError(f"Data file {path}{label} cannot be read ({err.strerror}); check its "
                                "permissions.") from err
        self.starts, self.ends, self.lines = array.array("q"), array.array("q"), array.array("q")
        offset = len(UTF8_BOM) if self.data.startswith(UTF8_BOM) else 0  # a byte-order mark (Windows tools)
        line_number = 0
        while offset < len(self.data):
            line_number += 1
            end = self.data.find(b"\n", offset)  # only b"\n" ends a line: U+2028 inside a text stays inside
            end = len(self.data) if end < 0 else end
            if self.data[offset:end].strip():
                self._parse(offset, end, line_number)
                self.starts.append(offset)
                self.ends.append(end)
                self.lines.append(line_number)
            offset = end + 1

    def _parse(self, start: int, end: int, line_number: int) -> Any:
        try:
            return json.loads(self.data[start:end].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise not_utf8_error(self.path, self.label, f"byte {start + err.start}: {err.reason}") from err
        except json.JSONDecodeError as err:
            raise STSInputError(f"{self.path}:{line_number}{self.label} is not valid JSON ({err.msg}); fix or "
                                "remove that line.") from err

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._parse(self.starts[index], self.ends[index], self.lines[index])


UTF8_BOM = b"\xef\xbb\xbf"


def _read_jsonl(path: Path, label: str = "") -> tuple[JsonlRecords, Places]:
    """The records of a JSONL file (read where used) and the line each came from."""
    records = JsonlRecords(path, label)
    return records, Places(f"{path} line", records.lines)


JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
# read as plain text, one text per blank-line separated block
TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".markdown", ".rst")
DATA_FILE_KINDS = (".jsonl or .json (records), .csv, .tsv or .parquet (a table with a 'text', 'messages' or "
                   "'prompt' column), or plain text (.txt, .md or no suffix; texts separated by blank lines)")
MANY_LINES = 10  # a plain-text file of this many lines and no blank line is likely one text per line


def _read_table(path: Path, label: str = "") -> tuple["TableRows", Places]:
    """The rows of a CSV / TSV / Parquet file as records (with pyarrow, which ``datasets`` depends on), and the
    row each came from; an error naming the columns when none holds text."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    kind = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet"}[suffix]
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            from pyarrow import csv

            parse = csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
            names = csv.open_csv(path, parse_options=parse).schema.names
            # every cell as text: a CSV has no types, and inferring them would turn a text such as "7" into a number
            convert = csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
            table = csv.read_csv(path, parse_options=parse, convert_options=convert)
    except UnicodeDecodeError as err:  # its header, read by open_csv
        raise not_utf8_error(path, label, f"byte {err.start} of its header: {err.reason}") from err
    except pa.ArrowInvalid as err:
        if "utf8" in str(err).lower().replace("-", ""):
            raise not_utf8_error(path, label, str(err).strip()) from err
        raise STSInputError(f"Data file {path}{label} cannot be read as {kind} ({str(err).strip()}); fix it, or "
                            "write one JSON record per line as .jsonl.") from err
    except OSError as err:
        raise STSInputError(f"Data file {path}{label} cannot be read ({err}); check its permissions.") from err
    repeated = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if repeated:  # a record holds one value a name: the last column would silently win
        raise STSInputError(f"Data file {path}{label} has the column(s) {repeated} more than once; rename them so "
                            "that each column has its own name" + (" in the header row." if suffix != ".parquet"
                                                                   else "."))
    check_columns(table.column_names, f"Data file {path}{label}",
                  "rename its text column to 'text'" + (" in the header row" if suffix != ".parquet" else ""))
    # row 1 is a CSV's first line after its header
    return TableRows(table), Places(f"{path} row", range(1, table.num_rows + 1))


class TableRows(Sequence):
    """An Arrow table's rows as records, each converted where it is used: the table's columns hold the data
    compactly, where every row as Python objects would take a few times its size."""

    def __init__(self, table: Any):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.table.slice(index % len(self), 1).to_pylist()[0]

    def __iter__(self):  # every row (Corpus.records()): a batch at a time, not a slice a row
        for batch in self.table.to_batches():
            yield from batch.to_pylist()


def check_columns(columns: Sequence[str], described: str, fix: str) -> None:
    """An error when no column of a table holds text in a form :func:`example_from_record` reads."""
    if not set(columns) & {"text", "messages", "prompt"} and not is_mc_layout(columns):
        raise STSInputError(f"{described} has columns {sorted(columns)} but none of 'text', 'messages' or 'prompt' "
                            f"(or 'question'/'choices'/'answer'); {fix}.")


def _read_plain_text(path: Path, label: str = "") -> list[str]:
    """One text per block of lines between blank lines (a line of spaces, or a Windows line end, is blank too)."""
    text = read_text(path, label).replace("\r\n", "\n")  # a Windows line end inside a text is a line end too
    items = [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
    lines = sum(1 for line in text.split("\n") if line.strip())
    if len(items) == 1 and lines >= MANY_LINES:  # most likely one text per line, silently joined into one
        warn_on_main(f"Data file {path}{label} has {lines} lines and no blank line, so it is read as one text: in a "
                     "plain-text file, texts are separated by blank lines. Put a blank line between texts, or write "
                     "one JSON record per line ({\"text\": ...}) as .jsonl.", STSDataWarning, stacklevel=4)
    return items


def not_utf8_error(path: Path, label: str, where: str) -> STSInputError:
    """The error for a data file that is not UTF-8, with the conversion its start suggests (a UTF-16 byte-order
    mark, as Excel's "Unicode Text" writes, else latin-1)."""
    try:
        with open(path, "rb") as file:
            head = file.read(2)
    except OSError:
        head = b""
    encoding = "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "latin1"
    return STSInputError(f"Data file {path}{label} is not UTF-8 text ({where}); convert it, e.g. `iconv -f {encoding} "
                         f"-t utf-8 {path} > fixed{path.suffix}`.")


def read_text(path: Path, label: str = "") -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows tools write one) is no text
    except UnicodeDecodeError as err:
        raise not_utf8_error(path, label, f"byte {err.start}: {err.reason}") from err
    except OSError as err:
        raise STSInputError(f"Data file {path}{label} cannot be read ({err.strerror}); check its permissions.") from err


def named_items(mapping: dict[Any, Any], what: str, error: type[Exception] = STSInputError) -> dict[str, Any]:
    """``mapping`` with its keys as names (``str(key)``); two keys with one name (``1`` and ``"1"``) would
    silently merge, so they are an ``error`` naming both, and an empty name (shown as nothing in every table and
    column) is one too. ``what`` names the mapping (e.g. "targets")."""
    if is_dataset_dict(mapping):  # a dict subclass: its splits would silently become domains named "train", "test"
        raise error(f"{what} is a datasets.DatasetDict (splits {sorted(mapping)}), whose splits would be read as "
                    "entries named after them. Pass a dict of name -> data, e.g. {'legal': data['test']}, or "
                    "dict(data) if the splits really are separate entries.")
    named: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key)
        if not name.strip():
            raise error(f"{what} has an entry with the empty name {name!r}; give it a name (e.g. the domain's "
                        "topic), which the forecast's tables and columns show.")
        if name in keys:
            raise error(f"{what} has two entries named {name!r} (keys {keys[name]!r} and {key!r}); names are "
                        "compared as text, so one would silently replace the other: rename one.")
        keys[name], named[name] = key, value
    return named


def repeated_names(names: Sequence[str]) -> list[str]:
    """The names given more than once in ``names``, sorted (each would get a second column, rule or vote)."""
    return sorted({name for name in names if names.count(name) > 1})


def _for(label: str | None) -> str:
    return f" for {label}" if label else ""


def anchored(data: Any) -> Any:
    """A path given as a string or ``Path``, made absolute (``~`` expanded) when it names an existing file or
    folder: a callback reads it at train start, perhaps after the process changed its working folder (a notebook,
    Hydra, a launcher). Anything else (a registered domain's name, data, ``'release::sae_id'``) is returned as is."""
    if not isinstance(data, (str, Path)) or not str(data).strip():
        return data
    from .corpora import available_domains

    path = Path(os.path.expanduser(str(data)))
    if not path.exists() or (str(data) in available_domains() and not path.is_file()):
        return data
    return path.absolute() if isinstance(data, Path) else str(path.absolute())


def check_data_spec(data: Any, what: str | None = None) -> None:
    """Raise what :func:`load_corpus` would raise for ``data`` that cannot be data, without reading files.
    ``what`` names the input in the message (e.g. "target 'chem'")."""
    if isinstance(data, Corpus) or is_dataset(data) or is_pandas(data):
        return
    if isinstance(data, (str, Path)):
        from .corpora import available_domains

        path = Path(os.path.expanduser(str(data)))
        if not str(data).strip():  # Path("") is the working directory: say what is wrong, not "a folder"
            raise STSInputError(f"An empty path or name{_for(what)} (an unset variable?); give a data file "
                                "(.jsonl/.json/.csv/.parquet/.txt), a list of texts or a registered domain name.")
        if str(data) in available_domains() and not path.is_file():  # a folder named like a domain is no data
            return
        if path.is_dir():
            raise STSInputError(f"{str(data)!r}{_for(what)} is a folder; give a data file (.jsonl/.json/.csv/"
                                ".parquet/.txt), a list of texts or a registered domain name.")
        suffix = path.suffix.lower()
        if path.exists():
            if suffix not in (*JSON_SUFFIXES, *TABLE_SUFFIXES, *TEXT_SUFFIXES):  # e.g. a .gz, .pkl or .xlsx file
                raise STSInputError(f"Data file {path}{_for(what)} has the suffix {path.suffix!r}, which is no data "
                                    f"format read here; give {DATA_FILE_KINDS}.")
            return
        if suffix in (*JSON_SUFFIXES, *TABLE_SUFFIXES, *TEXT_SUFFIXES[1:]):
            where = "" if path.is_absolute() else f" (a relative path is read from the working folder, {Path.cwd()})"
            raise STSInputError(f"Data file {path}{_for(what)} does not exist{where}; check the path.")
        import difflib

        close = difflib.get_close_matches(str(data), sorted(available_domains()), n=1)
        raise STSInputError(
            f"{str(data)!r}{_for(what)} is neither an existing file nor a registered domain"
            + (f" (did you mean {close[0]!r}?)" if close else "") + ". Pass a data file "
            "(.jsonl/.json/.csv/.parquet/.txt), a list of texts, a datasets.Dataset, or one of the registered "
            f"domains: {sorted(available_domains())}.")
    if is_dataset_dict(data):
        raise STSInputError(
            f"A datasets.DatasetDict (splits {sorted(data)}) is not one dataset{_for(what)}: pick a split, e.g. "
            "data['train'] for training data, data['test'] for a target domain's held-out text.")
    if is_lm_eval_target(data):
        raise STSInputError(f"An lm-eval task ({data[LM_EVAL_KEY]!r}){_for(what)} is a target domain, not data to "
                            "train on: give it under a name in `targets` (e.g. {'arc': {'lm_eval': 'arc_easy'}}).")
    if isinstance(data, dict):
        raise STSInputError(
            f"A dict is not a dataset here{f' (given{_for(what)})' if what else ''}: pass a list of texts / "
            "records, a datasets.Dataset, or a path (for several target domains, pass a dict of name -> data to "
            "`targets`).")
    if not isinstance(data, Sequence) and not is_map_style_torch_dataset(data):
        raise STSInputError(
            f"Cannot use {type(data).__name__} {data!r:.60} as data{_for(what)}; pass a list of texts, chat "
            "conversations or records, a datasets.Dataset, a JSONL path, or a registered domain name.")


def load_corpus(data: Any, name: str | None = None, *, what: str | None = None) -> Corpus:
    """Accept a list of strings / conversations / records, a ``datasets.Dataset``, a JSON(L), CSV / TSV or
    Parquet path, a plain-text file path (texts separated by blank lines), a built-in domain name (see
    :mod:`sts_callback.core.corpora`), or a :class:`Corpus`.
    ``what`` names the input in error messages (default: ``name``), e.g. "target 'chem'"."""
    if isinstance(data, Corpus):
        return data
    what = what or (repr(name) if name else None)
    check_data_spec(data, what)
    label = f" ({what})" if what else ""
    if isinstance(data, (str, Path)):
        path = Path(os.path.expanduser(str(data)))
        if path.is_file():
            suffix = path.suffix.lower()
            items: Sequence[Any]
            places: Places | None = None
            if suffix == ".jsonl":
                items, places = _read_jsonl(path, label)
            elif suffix in TABLE_SUFFIXES:
                items, places = _read_table(path, label)
            elif suffix == ".json":
                items, places = read_json_file(path, label)
            else:  # plain text (check_data_spec refused any other suffix)
                items = _read_plain_text(path, label)
            return Corpus(name or path.stem, items, places)
        from .corpora import load_domain

        return Corpus(name or str(data), load_domain(str(data)))
    if is_pandas(data):  # a DataFrame's rows as records (its columns as a Dataset's); a Series' values
        data = [_plain_cell(v) for v in (data.to_dict("records") if hasattr(data, "columns") else data.tolist())]
    if is_dataset(data) and not hasattr(data, "__len__"):
        data = take_streamed(data)
    if is_dataset(data):
        tokenized = "input_ids" in data.column_names
        check_columns(data.column_names, f"Dataset{_for(what)}",
                      "it is tokenized: give it with its tokenizer (STSSession.prepare / start read it so, as the "
                      "callback reads a trainer's sets), or decode it to a 'text' column" if tokenized else
                      "rename the text column, e.g. dataset.rename_column('body', 'text')")
        return Corpus(name or "dataset", data)
    if is_map_style_torch_dataset(data):  # read by index where sampled: listing it would read (load) every row
        return Corpus(name or "data", data)
    return Corpus(name or "data", list(data))


def is_map_style_torch_dataset(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and any(
        cls.__module__.startswith("torch.utils.data") for cls in type(data).__mro__)


MAX_STREAMED_EXAMPLES = 4096


def take_streamed(dataset: Any, limit: int = MAX_STREAMED_EXAMPLES) -> list[Any]:
    """The first ``limit`` examples of a streaming (``IterableDataset``) source, which has no ``len()``: the
    forecast and re-checks sample a few thousand tokens, so the head of the stream stands for it."""
    import itertools

    return list(itertools.islice(iter(dataset), limit))


def is_pandas(data: Any) -> bool:
    """A pandas DataFrame or Series."""
    return type(data).__module__.startswith("pandas") and hasattr(data, "to_dict")


REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character cut apart


def _plain_cell(value: Any) -> Any:
    """A pandas cell as the Python value a Dataset row holds: a list column (``Dataset.to_pandas()``,
    ``read_parquet``) holds NumPy arrays, a missing value is NaN (a Dataset's None), numbers NumPy scalars."""
    if isinstance(value, dict):
        return {key: _plain_cell(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain_cell(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def is_dataset_dict(data: Any) -> bool:
    """A ``datasets.DatasetDict`` / ``IterableDatasetDict``: ``load_dataset``'s splits, a dict of datasets."""
    return isinstance(data, dict) and type(data).__name__ in ("DatasetDict", "IterableDatasetDict")


def is_dataset(data: Any) -> bool:
    return type(data).__name__ in ("Dataset", "IterableDataset") and hasattr(data, "column_names")


def check_not_empty(data: Any, what: str) -> None:
    """An empty list given as a domain's or the probe's data: refused before any work, naming it."""
    if isinstance(data, (list, tuple)) and not data:
        raise STSInputError(f"{what} is empty; give it at least one text.")


def check_named_target(item: Any, what: str, argument: str = "targets") -> None:
    """One entry of a *list* of target domains: a registered domain name, a data file (named by its stem) or a
    named :class:`Corpus`. Data without a name (texts, a Dataset) or a text given where a name goes is refused,
    with the dict form that names it."""
    example = f"{argument}={{'law': [...]}}"
    if isinstance(item, Corpus):
        return
    if isinstance(item, (str, Path)):
        from .corpora import available_domains

        text = str(item)
        if (text in available_domains() or Path(os.path.expanduser(text)).exists()
                or not (len(text.split()) > 1 or "\n" in text)):
            return  # a name or a path: check_data_spec says what is wrong with it, if anything
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
        raise STSInputError(f"{what} ({shown}) looks like a text, not a domain name or a data file: a list of "
                            f"target domains names them; to give a domain's texts, name the domain: {example}.")
    check_data_spec(item, what)  # no data at all: said as for any input
    kind = f"a list of {len(item)} texts" if isinstance(item, (list, tuple)) else f"a {type(item).__name__}"
    raise STSInputError(f"{what} is {kind} without a name: a list of target domains holds domain names or data files "
                        f"(each named by its stem); give data under a name: {example}.")


def load_domains(targets: Any) -> dict[str, Corpus]:
    """``targets``: a dict name -> data, or a list of domain names / paths."""
    if isinstance(targets, dict):  # an lm-eval task: its documents' prompts and right answers
        named = named_items(targets, "targets")
        for k, v in named.items():
            check_not_empty(v, f"target {k!r}")
        domains = {k: load_corpus(LmEvalTarget.from_spec(v, k).texts() if is_lm_eval_target(v) else v, name=k,
                                  what=f"target {k!r}") for k, v in named.items()}
    elif isinstance(targets, (list, tuple)):
        domains = {}
        for index, item in enumerate(targets):
            check_named_target(item, f"targets[{index}]")
            corpus = load_corpus(item, what=f"targets[{index}]")
            if not corpus.name.strip():
                raise STSInputError(f"targets[{index}] has the empty name {corpus.name!r}; pass a dict of name -> "
                                    "data.")
            if corpus.name in domains:
                raise STSInputError(f"Two target domains are named {corpus.name!r}; pass a dict of name -> data.")
            domains[corpus.name] = corpus
    else:
        raise STSInputError(f"targets must be a dict of name -> data or a list of domain names / paths, got a "
                            f"{type(targets).__name__}; name the domain: {{'law': data}}.")
    if not domains:
        raise STSInputError("No target domains given; pass at least one in `targets`.")
    return {name: corpus if isinstance(corpus, DomainCorpus) else DomainCorpus(corpus)
            for name, corpus in domains.items()}


# ----------------------------------------------------------------------------------------- prompts



TokenSequence = tuple[list[int], list[bool]]  # token ids, counted flags for the last len(flags) ids

@dataclass
class TokenPair:
    """Token ids of one query without (``base``) and with (``context``) demonstrations.

    The query's tokens are the last ``n_query`` ids of both; ``counted`` marks which of them enter the
    statistics (special tokens excluded).
    """

    base: list[int]
    context: list[int]
    n_query: int
    counted: list[bool]


# encode_head: the characters first encoded (at least), and the tokens kept clear of the prefix's cut
HEAD_CHARS = 4096
HEAD_MARGIN = 32


def text_tokenizer(processing_class: Any) -> Any:
    """The text tokenizer STS renders and tokenizes with, from what a trainer or a caller holds: a tokenizer as it
    is; a processor's (a VLM's: LlavaProcessor, ...) tokenizer, with the processor's chat template where the
    processor has one, since the processor (and TRL through it) renders chats with its own template while many VLM
    checkpoints leave the tokenizer's empty. The caller's objects are left as they are: a shallow copy of the
    tokenizer carries the processor's template."""
    if not hasattr(processing_class, "tokenizer"):  # a tokenizer (or None, which the caller names)
        return processing_class
    tokenizer = processing_class.tokenizer  # None: a processor without one, which the caller names
    if tokenizer is None or tokenizer is processing_class:
        return tokenizer
    template = getattr(processing_class, "chat_template", None)
    if template and template != getattr(tokenizer, "chat_template", None):
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = template
    return tokenizer


# A probe turn's text: a template that prints string content renders it; one that reads typed parts only does not.
_PROBE_TEXT = "sts-probe-text"


def typed_content(messages: Messages) -> Messages:
    """``messages`` with each string content as one typed text part, as VLM chat templates read content (and as
    TRL passes it to a processor); other contents (typed parts already, a tool call's None) stay as they are."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def needs_typed_content(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads typed content parts only (LLaVA-1.5, SmolVLM, Idefics3: it loops
    over ``message['content']`` printing parts of type 'text'): a turn with string content renders without its text,
    or raises, while the same text as a typed part renders. Ordinary templates are left alone."""
    def rendered(content: Any) -> bool:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template's own raise_exception or a bug on this content's shape
            return False
        return isinstance(text, str) and _PROBE_TEXT in text

    if not getattr(tokenizer, "chat_template", None) or rendered(_PROBE_TEXT):
        return False
    return rendered([{"type": "text", "text": _PROBE_TEXT}])


def chat_template_text(tokenizer, messages: Messages, typed: bool, **kwargs: Any) -> str:
    """The chat template's text of ``messages`` (``typed``: string contents as typed parts, see
    :func:`needs_typed_content`)."""
    return tokenizer.apply_chat_template(typed_content(messages) if typed else messages, tokenize=False, **kwargs)


def special_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens: those it names (BOS, EOS, pad, ...) and the added tokens it marks special
    without naming them (chat-template control tokens, as Llama 3's tokenizer declares them)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, token in added.items() if getattr(token, "special", False)}


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (usually BOS; none for Qwen's, or one whose chat template writes
    the BOS): what a text another text follows starts with. Its special tokens after the text (EOS, where
    ``add_eos_token`` is set) are not in it."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


class PromptBuilder:
    """Builds position-matched token sequences from examples with a given tokenizer."""

    def __init__(self, tokenizer, *, max_query_tokens: int, max_demonstration_tokens: int, max_length: int,
                 exclude_special_tokens: bool = True, chat_fallback: bool = False):
        self.tokenizer = tokenizer = text_tokenizer(tokenizer)  # every offline entry's builder: a processor's too
        self.max_query_tokens = max_query_tokens
        self.max_demonstration_tokens = max_demonstration_tokens
        self.max_length = max_length
        self.chat_fallback = chat_fallback
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.typed_content = needs_typed_content(tokenizer)  # once: every render then passes what the template reads
        self.all_special_ids = special_token_ids(tokenizer)  # read once: a tokenizer lists its added tokens anew
        self.special_ids = self.all_special_ids if exclude_special_tokens else set()
        self.prefix = special_prefix(tokenizer)
        self.separator = self.encode_text("\n\n")

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_head(self, text: str, max_tokens: int) -> list[int]:
        """The first ``max_tokens`` token ids of ``text``, from a prefix of its characters (widened while it holds
        too few): a 5-MB text was tokenized whole, several times, for a few hundred tokens. The prefix's tokens
        are the text's but near the cut, which the ids kept stay :data:`HEAD_MARGIN` tokens away from."""
        chars = max(HEAD_CHARS, 8 * max_tokens)
        while chars < len(text):
            ids = self.encode_text(text[:chars])
            if len(ids) > max_tokens + HEAD_MARGIN:
                return ids[:max_tokens]
            chars *= 4
        return self.encode_text(text)[:max_tokens]

    def encode_tail(self, text: str, max_tokens: int) -> list[int]:
        """The last ``max_tokens`` token ids of ``text``, from a suffix of its characters (as :meth:`encode_head`
        reads a prefix)."""
        chars = max(HEAD_CHARS, 8 * max_tokens)
        while chars < len(text):
            ids = self.encode_text(text[-chars:])
            if len(ids) > max_tokens + HEAD_MARGIN:
                return ids[-max_tokens:]
            chars *= 4
        return self.encode_text(text)[-max_tokens:]

    def _cut_text(self, text: str, max_tokens: int, keep_end: bool = False) -> str:
        ids = (self.encode_tail if keep_end else self.encode_head)(text, max_tokens + 1)
        if len(ids) <= max_tokens:
            return text
        kept = ids[1:] if keep_end else ids[:max_tokens]
        cut = self.tokenizer.decode(kept)
        # A byte-level tokenizer splits a character (CJK, an emoji) over tokens: cut there, its bytes decode as
        # U+FFFD, which re-encodes as other tokens. The cut goes before the whole character instead.
        # (A text's own U+FFFD at the edge, whole, re-encodes as the tokens kept: it stays.)
        while (len(kept) > 1 and (cut.startswith(REPLACEMENT) if keep_end else cut.endswith(REPLACEMENT))
               and len(self.encode_text(cut)) > len(kept)):
            kept = kept[1:] if keep_end else kept[:-1]
            cut = self.tokenizer.decode(kept)
        return cut

    # -- chat rendering
    def check_chat(self, corpus_name: str) -> None:
        if not self.has_chat_template and not self.chat_fallback:
            raise STSInputError(
                f"{corpus_name!r} holds chat conversations but the tokenizer has no chat template. Give a "
                "tokenizer with a chat template (tokenizer.chat_template = ...), or set "
                "STSConfig(chat_fallback=True) to join turns as plain 'role: content' text."
            )

    def apply_template(self, messages: Messages, **kwargs: Any) -> str:
        """The chat template's text of ``messages``, string contents as typed parts where the template reads those."""
        return chat_template_text(self.tokenizer, messages, self.typed_content, **kwargs)

    def render_chat(self, messages: Messages, template_kwargs: dict[str, Any] | None = None) -> str:
        if self.has_chat_template:
            return self.apply_template(messages, **(template_kwargs or {}))
        return "".join(f"{m['role']}: {message_text(m)}\n" for m in messages)

    def _render_in_context(self, demo_messages: Messages, query_messages: Messages,
                           template_kwargs: dict[str, Any] | None = None) -> str:
        """The demonstrations and the query as one conversation. A template that allows a system turn only first,
        or only alternating roles (Gemma's, Llama 2's, Mistral's), refuses the demonstrations' own system turns in
        the middle: then one system turn (the query's, else the first) leads and turns of one role in a row are
        joined. Training renders each conversation alone, so it never met such a conversation."""
        messages = demo_messages + query_messages
        try:
            return self.render_chat(messages, template_kwargs)
        except Exception as err:  # noqa: BLE001 - a template's own raise_exception (jinja2 TemplateError) or bug
            joined = one_conversation(messages, query_messages)
            try:
                return self.render_chat(joined, template_kwargs)
            except Exception:  # noqa: BLE001
                raise STSInputError(
                    f"The tokenizer's chat template refuses the conversation STS builds from demonstrations and a "
                    f"query ({type(err).__name__}: {err}). Give a tokenizer whose template renders several "
                    "user/assistant exchanges in one conversation, or plain-text demonstrations "
                    "(demonstrations=[...] of strings).") from err

    def _demo_messages(self, example: Example) -> Messages:
        prompt = example.prompt if example.is_chat else [{"role": "user", "content": example.prompt}]
        prompt = [self._cut_turn(m, self.max_demonstration_tokens) for m in prompt]
        if example.is_chat and example.plain_text:  # a whole conversation (a target domain's): its turns as they are
            return prompt
        if example.answer_turn is not None:  # its tool calls as the template renders them, its text cut
            return prompt + [self._cut_turn(example.answer_turn, self.max_demonstration_tokens)]
        answer = self._cut_text(example.answer or "", self.max_demonstration_tokens)
        return prompt + [{"role": "assistant", "content": answer}]

    def _cut_turn(self, message: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        """The turn with its text cut to ``max_tokens``; its other keys (``tool_calls``, ``name``) kept for the
        template, or, without one, its tool calls' JSON in the text."""
        if self.has_chat_template:
            kept = {key: value for key, value in message.items() if value is not None}  # Arrow's None for absent
            return {**kept, "content": self._cut_text(_content_text(message.get("content")), max_tokens)}
        return {"role": message["role"], "content": self._cut_text(message_text(message), max_tokens)}

    def _query_messages(self, example: Example) -> Messages:
        prompt = example.prompt if example.is_chat else [{"role": "user", "content": example.prompt}]
        return [dict(m) for m in prompt[:-1]] + [self._cut_turn(prompt[-1], self.max_query_tokens)]

    def _demo_text(self, example: Example) -> str:
        if example.plain_text:
            return self._cut_text(example.prompt, self.max_demonstration_tokens, example.keep_end)
        prompt = example.prompt if isinstance(example.prompt, str) else self.render_chat(example.prompt,
                                                                                          example.template_kwargs)
        # joined as TRL's SFT joins a prompt and its completion (nothing between): the text trained on
        return self._cut_text(prompt, self.max_demonstration_tokens) + self._cut_text(
            example.answer or "", self.max_demonstration_tokens
        )

    def uses_chat(self, query: Example, demonstrations: Sequence[Example]) -> bool:
        return query.is_chat or any(d.is_chat for d in demonstrations)

    # -- sequences
    def single(self, example: Example) -> tuple[list[int], list[bool]]:
        """Token ids of one text alone (a domain text or a query) and the mask of counted positions."""
        pair = self.pair(example, [])
        return pair.base, [False] * (len(pair.base) - pair.n_query) + pair.counted

    def pair(self, query: Example, demonstrations: Sequence[Example]) -> TokenPair:
        if self.uses_chat(query, demonstrations):
            head_base, head_context, query_ids = self._chat_parts(query, demonstrations)
        else:
            query_text = query.prompt if isinstance(query.prompt, str) else self.render_chat(query.prompt,
                                                                                             query.template_kwargs)
            encode = self.encode_tail if query.keep_end else self.encode_head
            query_ids = encode(query_text, self.max_query_tokens)
            head_base = list(self.prefix)
            head_context = list(self.prefix)
            for demo in demonstrations:
                head_context += self.encode_text(self._demo_text(demo)) + self.separator
        query_ids = query_ids[max(0, len(query_ids) - self.max_length):]  # a chat turn's template tokens beside it
        room = self.max_length - len(query_ids)
        base_start = head_base + query_ids  # BOS, added by the tokenizer or written by a chat template
        # demonstrations, and a conversation's earlier turns in both: dropped from the left past max_length
        head_context = self._cut_from_the_left(head_context, room, base_start)
        head_base = self._cut_from_the_left(head_base, room, base_start)
        over = max(len(head_base), len(head_context)) + len(query_ids) - self.max_length
        query_ids = query_ids[max(over, 0):]  # the special start kept before a query as long as the limit
        counted = [token not in self.special_ids for token in query_ids]
        return TokenPair(base=head_base + query_ids, context=head_context + query_ids,
                         n_query=len(query_ids), counted=counted)

    def _cut_from_the_left(self, head: list[int], room: int, start: list[int]) -> list[int]:
        """``head`` cut to ``room`` tokens from the left, keeping the special start it shares with ``start``."""
        if len(head) <= room:
            return head
        starts = set(self.prefix) | {self.tokenizer.bos_token_id}
        lead = 0
        while lead < min(len(start), len(head)) and head[lead] == start[lead] and head[lead] in starts:
            lead += 1
        keep, body = head[:lead], head[lead:]
        return keep + body[len(body) - max(room - len(keep), 0):]

    def _chat_parts(self, query: Example, demonstrations: Sequence[Example]) -> tuple[list[int], list[int], list[int]]:
        query_messages = self._query_messages(query)
        demo_messages: Messages = []
        for demo in demonstrations:
            demo_messages += self._demo_messages(demo)
        alone = self.encode_text(self.render_chat(query_messages, query.template_kwargs))
        full = self.encode_text(self._render_in_context(demo_messages, query_messages,
                                                        joined_template_kwargs([query, *demonstrations])))
        # The query turn is the longest common *token* suffix of both renderings: identical ids by construction.
        shared = 0
        while shared < min(len(alone), len(full)) and alone[-1 - shared] == full[-1 - shared]:
            shared += 1
        query_ids = alone[len(alone) - shared:]
        head_base = alone[: len(alone) - shared]
        head_context = full[: len(full) - shared]
        limit = self.max_query_tokens + 16  # room for the turn's template tokens
        if len(query_ids) > limit:  # a long conversation (a long system prompt): its last turns are what counts;
            lead = list(itertools.takewhile(lambda token: token in self.all_special_ids, query_ids))  # BOS first
            earlier, query_ids = query_ids[len(lead):-limit], query_ids[-limit:]
            kept = lead + earlier[-self.max_query_tokens:]  # as much again before them: uncounted context, in both
            head_base, head_context = head_base + kept, head_context + kept
        if not self.has_chat_template:
            head_base = list(self.prefix) + head_base
            head_context = list(self.prefix) + head_context
        return head_base, head_context, query_ids


def one_conversation(messages: Messages, query_messages: Messages) -> Messages:
    """``messages`` with one system turn, first (the query's own, else the first one), and consecutive turns of
    one role joined: what strict chat templates accept."""
    systems = [m for m in query_messages if m["role"] == "system"] or [m for m in messages if m["role"] == "system"]
    out: Messages = systems[:1]
    for message in messages:
        if message["role"] == "system":
            continue
        if out and out[-1]["role"] == message["role"] and out[-1]["role"] != "system":
            out[-1] = {**out[-1], "content": _content_text(out[-1].get("content")) + "\n\n"
                       + _content_text(message.get("content"))}
        else:
            out.append(message)
    return out


def token_count(builder: PromptBuilder, example: Example) -> int:
    _, counted = builder.single(example)
    return sum(counted)


def has_two_demonstrations(corpus: Corpus) -> bool:
    """Whether two of ``corpus``'s texts can be in-context demonstrations (a domain's STS_icl needs another text of
    it beside each one measured); reads only as far as the second."""
    usable = (i for i in range(len(corpus)) if corpus[i].can_demonstrate)
    return len(list(itertools.islice(usable, 2))) == 2


class AllBut(Sequence):
    """``items`` (ascending indices, e.g. a ``range``) without ``excluded``, as a view: ``random.sample`` draws
    from it exactly what it draws from the list ``[i for i in items if i != excluded]``, without building that
    list (one per query: quadratic in a large training set)."""

    def __init__(self, items: Sequence[int], excluded: int | None):
        self.items = items
        position = bisect.bisect_left(items, excluded) if excluded is not None else len(items)
        self.position = position if position < len(items) and items[position] == excluded else None

    def __len__(self) -> int:
        return len(self.items) - (self.position is not None)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.items[index + 1 if self.position is not None and index >= self.position else index]


def sample_within_budget(corpus: Corpus, builder: PromptBuilder, budget: int, rng: random.Random,
                         *, require_demonstrable: bool = False, tokens_each: int | None = None) -> tuple[list[int], int]:
    """Indices of examples drawn in a seeded random order until ``budget`` counted tokens are reached
    (``tokens_each``: each example counts at most this many, as when it is cut to its first tokens)."""
    order = list(range(len(corpus)))
    rng.shuffle(order)
    chosen: list[int] = []
    total = 0
    for index in order:
        if total >= budget:
            break
        example = corpus[index]
        if require_demonstrable and not example.can_demonstrate:
            continue
        n = token_count(builder, example)
        if n == 0:
            continue
        chosen.append(index)
        total += n if tokens_each is None else min(n, tokens_each)
    return chosen, total


def last_counted(sequence: TokenSequence, tokens: int) -> TokenSequence:
    """``sequence`` with only its last ``tokens`` counted tokens counted (the earlier ones kept as context): a
    prompt + answer cut to what it is about, its answer (:attr:`Example.keep_end`)."""
    ids, flags = sequence
    kept, seen = list(flags), 0
    for position in reversed(range(len(kept))):
        if kept[position]:
            seen += 1
            kept[position] = seen <= tokens
    return ids, kept


def first_counted(sequence: TokenSequence, tokens: int) -> TokenSequence:
    """``sequence`` cut right after its first ``tokens`` counted tokens (flags aligned with the ids' end)."""
    ids, flags = sequence
    offset, seen = len(ids) - len(flags), 0
    for position, counted in enumerate(flags):
        seen += counted
        if seen == tokens:
            return ids[: offset + position + 1], flags[: position + 1]
    return ids, flags
