"""Forecasts for preference training (DPO and kin): the shift is chosen minus rejected, paired over prompts.

Preference training raises the likelihood of each prompt's chosen completion relative to its rejected one. The
latents it pushes are estimated as the difference between the two completions' SAE latents, each completion
forwarded after its prompt and only its own tokens counted. The two completions have different tokens, so the
comparison is not position-matched as the in-context shift is: each completion is summarised by its mean latent
vector m (over its counted tokens) and the pairs by d_i = m(chosen_i) - m(rejected_i):

    shift_j     = mean over pairs of d_ij^2     (ShiftStats.mean_shift: ranks D_N, as the paper's shift does)
    direction_j = mean over pairs of d_ij       (ShiftStats.mean_diff: the signed features)

so the statistics are :class:`~sts_callback.core.stats.ShiftStats` with one row per pair, and every score of
:func:`~sts_callback.pipelines.forecast.assemble_forecast` applies unchanged. The same pass serves the RL forecast
(rollouts.py): a :class:`ContrastUnit` holds any number of completions of one prompt with signed weights, each side
averaged with its weights (chosen / rejected: one completion a side).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import (
    Corpus,
    PromptBuilder,
    check_data_spec,
    TokenSequence,
    implicit_prompt,
    is_messages,
    is_dataset,
    load_corpus,
    load_domains,
    record_template_kwargs,
    take_streamed,
)
from ..core.distributed import fingerprint, shard, warn_on_main
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.extract import Extractor, PairedStats
from ..core.stats import ActivationStats, ShiftStats, TopActivations
from .forecast import (Forecast, ForecastRun, Plan, ForecastSetup, ShiftPass, check_inputs_agree, forecast_with_shift,
                       plan_domains, prepare_forecast, run_forecast)

PREFERENCE_SHIFTS = ("chosen_vs_rejected", "in_context")



@dataclass
class ContrastUnit:
    """Completions of one prompt with signed weights: > 0 on the side training pushes up, < 0 on the side it pushes
    down, 0 for neither. Each ``sequences`` entry is the prompt's and the completion's ids with the completion's
    counted flags (the last ``len(flags)`` ids)."""

    sequences: list[TokenSequence]
    weights: list[float]

    def uncounted(self) -> "ContrastUnit":
        return replace(self, sequences=[(ids, [False] * len(flags)) for ids, flags in self.sequences])


@dataclass
class ContrastStats(PairedStats):
    """:class:`PairedStats` of a contrast: ``latent_shift`` / ``residual_shift`` hold one row per unit (the high
    side's weighted mean of per-completion mean latents vs the low side's, so ``count`` counts units, not tokens);
    ``latents`` / ``residual`` are token-level activations over every counted completion token."""

    @property
    def units(self) -> int:
        return self.latent_shift.tokens


def _side_means(means: torch.Tensor, weights: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    w = weights[side].abs()
    return (w / w.sum()) @ means[side]


@torch.no_grad()
def contrast_stats(extractor: Extractor, units: Sequence[ContrastUnit], what: str = "completions",
                   reservoir: TopActivations | None = None) -> ContrastStats:
    """Stream the contrast of ``units`` (split across ranks like every pass: each rank runs a padded share of whole
    units and the sums are reduced; the reservoir's sequence indices count the units' sequences in order).

    Units are batched whole, about ``batch_size`` sequences at a time, so that no per-completion latent vector
    outlives its batch. Under ZeRO-3 / FSDP every unit must hold the same number of sequences (lockstep forwards).
    """
    d_sae, d_in, device = extractor.sae.d_sae, extractor.sae.d_in, extractor.device
    latents, residual = ActivationStats(d_sae, device), ActivationStats(d_in, device)
    latent_shift, residual_shift = ShiftStats(d_sae, device), ShiftStats(d_in, device)
    offsets, total = [], 0
    for unit in units:
        offsets.append(total)
        total += len(unit.sequences)
    part = extractor.share([sum(len(ids) for ids, _ in u.sequences) for u in units])
    local = [(offsets[i], units[i] if keep else units[i].uncounted()) for i, keep in zip(part.indices, part.counted)]
    per_group = max(1, extractor.batch_size // max((len(u.sequences) for u in units), default=1))
    order = sorted(range(len(local)), key=lambda k: (-max(len(ids) for ids, _ in local[k][1].sequences), k))
    for start in range(0, len(order), per_group):
        group = [local[k] for k in order[start:start + per_group]]
        sequences = [seq for _, unit in group for seq in unit.sequences]
        owner = [offset + s for offset, unit in group for s in range(len(unit.sequences))]
        latent_sums = torch.zeros(len(sequences), d_sae, dtype=torch.float64, device=device)
        residual_sums = torch.zeros(len(sequences), d_in, dtype=torch.float64, device=device)
        counts = torch.zeros(len(sequences), dtype=torch.float64, device=device)
        for item in extractor.iter_rows(sequences, what):
            with extractor.failed:  # an error here on one rank is raised on every rank by finish()
                row_sequence = torch.tensor(item.batch, dtype=torch.long)[item.where[0]].to(device)
                residual.update(item.rows)
                residual_sums.index_add_(0, row_sequence, item.rows.to(device, torch.float64))
                counts.index_add_(0, row_sequence, torch.ones(len(row_sequence), dtype=torch.float64,
                                                              device=device))
                for chunk, encoded in extractor.encoded_chunks(item.rows, latents, reservoir,
                                                                [owner[i] for i in item.batch], item.where):
                    latent_sums.index_add_(0, row_sequence[chunk], encoded.to(device, torch.float64))
        low_rows, high_rows, low_res, high_res = [], [], [], []
        first = 0
        for _, unit in group:
            span = slice(first, first + len(unit.sequences))
            first += len(unit.sequences)
            n = counts[span]
            weights = torch.tensor(unit.weights, dtype=torch.float64, device=device)
            high, low = (weights > 0) & (n > 0), (weights < 0) & (n > 0)
            if not bool(high.any()) or not bool(low.any()):
                continue  # a padded duplicate, or a side without counted tokens: no contrast
            latent_means = latent_sums[span] / n.clamp(min=1).unsqueeze(1)
            residual_means = residual_sums[span] / n.clamp(min=1).unsqueeze(1)
            high_rows.append(_side_means(latent_means, weights, high))
            low_rows.append(_side_means(latent_means, weights, low))
            high_res.append(_side_means(residual_means, weights, high))
            low_res.append(_side_means(residual_means, weights, low))
        if high_rows:
            latent_shift.update(torch.stack(low_rows), torch.stack(high_rows))
            residual_shift.update(torch.stack(low_res), torch.stack(high_res))
    return extractor.finish_pass(ContrastStats(latents, residual, latent_shift, residual_shift), reservoir)


# Different sequences go through different batches and positions, so two sides with equal mean latents differ by
# float rounding: a latent moves only when its shift exceeds this share of the largest mean squared activation
# (a difference of means above ~1e-6 of the activation scale).
NOISE_FLOOR = 1e-12


def contrast_pass(units: list[ContrastUnit], *, kind: str, what: str, nothing_moved: str,
                  settings: dict[str, Any] | None = None) -> ShiftPass:
    """The training data's side of a forecast whose shift is the contrast of ``units`` (sampled and tokenized
    already, the same on every rank)."""
    sequences = [seq for unit in units for seq in unit.sequences]
    return ShiftPass(
        kind=kind, run=lambda extractor, reservoir: contrast_stats(extractor, units, what, reservoir),
        # the pass shards whole units (padded with the cheapest), so this process forwards its units' sequences
        sequences=sum(len(units[i].sequences) for i in shard(len(units), [sum(len(ids) for ids, _ in u.sequences)
                                                                          for u in units]).indices),
        forward_tokens=sum(len(ids) for ids, _ in sequences), tokens=sum(sum(flags) for _, flags in sequences),
        units=len(units), sources=[ids for ids, _ in sequences], nothing_moved=nothing_moved,
        noise_floor=NOISE_FLOOR, settings=dict(settings or {}))


def contrast_forecast(setup: ForecastSetup, units: list[ContrastUnit], domains: dict[str, Corpus], *, kind: str,
                      what: str, nothing_moved: str, settings: dict[str, Any] | None = None,
                      progress: bool = False, start: float | None = None) -> ForecastRun:
    """A forecast whose shift is the contrast of ``units`` (:func:`contrast_pass`), beside the target domains'
    usual statistics."""
    shift = contrast_pass(units, kind=kind, what=what, nothing_moved=nothing_moved, settings=settings)
    return forecast_of_contrast(setup, units, shift, what, domains, progress=progress, start=start)


def forecast_of_contrast(setup: ForecastSetup, units: list[ContrastUnit], shift: ShiftPass, what: str,
                         domains: dict[str, Corpus], *, progress: bool = False,
                         start: float | None = None) -> ForecastRun:
    """The forecast of ``shift``, the pass over ``units`` (:func:`contrast_pass`), once every rank is seen to have
    sampled the same units."""
    start = time.perf_counter() if start is None else start
    if setup.config.icl_loss_tokens:  # asked for (a calibration reading it is refused earlier): said, not computed
        warn_on_main(f"STSConfig.icl_loss_tokens={setup.config.icl_loss_tokens}: the in-context NLL change reads "
                     f"training texts in context, which a {shift.kind} forecast has not; it is not computed.",
                     STSDataWarning, stacklevel=3)
    domain_inputs = plan_domains(setup.builder, setup.config, domains)
    checksum = fingerprint([[ids for ids, _ in u.sequences] for u in units], [u.weights for u in units])
    check_inputs_agree(setup, checksum, f"{len(units)} sampled {what} ({checksum})", domain_inputs)
    plan = Plan(shift_pairs=[], shift_tokens=shift.tokens, domains=domain_inputs)
    return forecast_with_shift(setup, shift, plan, progress=progress, start=start)


# ----------------------------------------------------------------------------------------------- preference pairs


def completion_sequence(builder: PromptBuilder, prompt_ids: list[int], completion_ids: list[int]) -> TokenSequence:
    """A prompt's ids followed by a completion's, cut to the limits of ``builder`` (the completion to its first
    ``max_query_tokens`` tokens, the prompt to its last tokens that fit ``max_length``, BOS kept); the completion's
    non-special tokens are counted."""
    completion = list(completion_ids)[: builder.max_query_tokens]
    prompt = list(prompt_ids)
    room = max(builder.max_length - len(completion), 0)
    if len(prompt) > room:
        prefix = builder.prefix if prompt[: len(builder.prefix)] == builder.prefix else []
        body = prompt[len(prefix):]
        prompt = prefix[:room] + body[len(body) - max(room - len(prefix), 0):]
    return prompt + completion, [token not in builder.special_ids for token in completion]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _as_messages(value: Any, role: str) -> list[dict[str, Any]]:
    return list(value) if is_messages(value) else [{"role": role, "content": value}]


def prompt_completion_ids(builder: PromptBuilder, prompt: Any, completion: Any,
                          chat_template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its completion as TRL's DPO trainer tokenizes them: prompt + completion
    tokenized together and split where they diverge from the prompt alone (chat messages through the chat
    template, the prompt with the generation prompt)."""
    encode = builder.encode_text
    if is_messages(prompt) or is_messages(completion):
        messages = _as_messages(prompt, "user")
        if builder.has_chat_template:
            render = builder.apply_template
            kwargs = dict(chat_template_kwargs or {})
            alone = encode(render(messages, add_generation_prompt=True, **kwargs))
            full = encode(render(messages + _as_messages(completion, "assistant"), **kwargs))
        else:  # chat_fallback (checked by the caller): "role: content" lines after the BOS prefix
            alone = builder.prefix + encode(builder.render_chat(messages) + "assistant: ")
            full = builder.prefix + encode(builder.render_chat(messages + _as_messages(completion, "assistant")))
    else:
        alone = builder.prefix + encode(str(prompt))
        full = builder.prefix + encode(str(prompt) + str(completion))
    split = _common_prefix(alone, full)
    return full[:split], full[split:]


@dataclass
class PreferencePair:
    """One preference record, tokenized: prompt + chosen and prompt + rejected, completion tokens counted."""

    chosen: TokenSequence
    rejected: TokenSequence
    index: int  # in the given data


@dataclass(frozen=True)
class Truncation:
    """How a preference trainer cuts each prompt + completion sequence before training on it (TRL ``DPOConfig``'s
    ``max_length`` and ``truncation_mode``: its collator keeps the first, or the last, ``max_length`` tokens)."""

    max_length: int | None = None
    mode: str = "keep_start"

    def __post_init__(self) -> None:
        if self.mode not in ("keep_start", "keep_end"):
            raise STSConfigError(f"truncation_mode={self.mode!r}: use 'keep_start' or 'keep_end', as TRL's DPO does.")

    @classmethod
    def from_args(cls, args: Any) -> "Truncation":
        length = getattr(args, "max_length", None)
        return cls(length if isinstance(length, int) and not isinstance(length, bool) else None,
                   getattr(args, "truncation_mode", None) or "keep_start")

    def apply(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """The prompt and completion tokens the trainer keeps of ``prompt + completion``."""
        if self.max_length is None or len(prompt) + len(completion) <= self.max_length:
            return prompt, completion
        if self.mode == "keep_end":
            cut = len(prompt) + len(completion) - self.max_length
            return prompt[cut:], completion[max(0, cut - len(prompt)):]
        return prompt[: self.max_length], completion[: max(0, self.max_length - len(prompt))]


def tokenize_preference(builder: PromptBuilder, record: Any, index: int, name: str = "preference data",
                        chat_template_kwargs: dict[str, Any] | None = None,
                        truncation: Truncation | None = None) -> PreferencePair:
    """A record ``{"prompt", "chosen", "rejected"}`` (strings or chat messages; TRL's implicit-prompt form without
    ``prompt``; or TRL's tokenized ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, used as they are)."""
    where = f"record {index} of {name!r}"
    if not isinstance(record, dict):
        raise STSInputError(f"{where} is a {type(record).__name__}; preference data needs records with 'prompt', "
                            "'chosen' and 'rejected' (strings or chat messages) or 'prompt_ids', 'chosen_ids' and "
                            "'rejected_ids'.")
    cut = truncation or Truncation()
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(record):
        prompt_ids = list(record["prompt_ids"])
        return PreferencePair(completion_sequence(builder, *cut.apply(prompt_ids, list(record["chosen_ids"]))),
                              completion_sequence(builder, *cut.apply(prompt_ids, list(record["rejected_ids"]))), index)
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if missing:
        raise STSInputError(f"{where} lacks {missing} (it has {sorted(record)}); preference data needs 'prompt', "
                            "'chosen' and 'rejected' in every record (for prompt/completion data use forecast()).")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record and record["prompt"] is not None:
        prompt = record["prompt"]
    elif (is_messages(chosen) and is_messages(rejected)) or (isinstance(chosen, str) and isinstance(rejected, str)):
        prompt, chosen, rejected = implicit_prompt(chosen, rejected)  # TRL's implicit-prompt form
    else:
        raise STSInputError(f"{where} has no 'prompt', and its chosen / rejected are neither two texts nor two chat "
                            "conversations (whose shared start would be the prompt); add the prompt to every record.")
    for label, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) and not is_messages(value):
            raise STSInputError(f"{where}: {label!r} is a {type(value).__name__}; use a string or chat messages "
                                "(a list of {'role', 'content'}).")
    chat = any(is_messages(v) for v in (prompt, chosen, rejected))  # only a chat is templated
    if chat:
        builder.check_chat(name)
    kwargs = {**(chat_template_kwargs or {}), **(record_template_kwargs(record, f" {where}") if chat else {})}
    sequences = []
    for completion in (chosen, rejected):
        prompt_ids, completion_ids = prompt_completion_ids(builder, prompt, completion, kwargs)
        sequences.append(completion_sequence(builder, *cut.apply(prompt_ids, completion_ids)))
    return PreferencePair(sequences[0], sequences[1], index)


class DatasetRows(Sequence):
    """The rows of a ``datasets.Dataset`` (or any sequence), each read when first indexed (``read(data, index)``,
    default ``data[index]``) and kept: a forecast that draws a few hundred rows of a million-row set reads those,
    not the million."""

    def __init__(self, data: Any, read: Callable[[Any, int], Any] | None = None):
        self._data, self._read, self._rows = data, read, {}

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = index + len(self) if index < 0 else index
        if index not in self._rows:
            self._rows[index] = self._data[index] if self._read is None else self._read(self._data, index)
        return self._rows[index]


def raw_records(data: Any, what: str = "preference data") -> Sequence[Any]:
    """The items of ``data`` as given (a list, a ``datasets.Dataset`` (streaming: its head; else
    :class:`DatasetRows`, read as drawn), a JSON(L) path or a :class:`Corpus`), for inputs whose records hold more
    than an :class:`Example` keeps."""
    if isinstance(data, Corpus):
        return data.records()
    if isinstance(data, DatasetRows):
        return data
    check_data_spec(data, what)  # a DatasetDict, a missing path: named as everywhere else
    if isinstance(data, (str, Path)):
        return load_corpus(data, name=what).records()
    if is_dataset(data):
        return take_streamed(data) if not hasattr(data, "__len__") else DatasetRows(data)
    if isinstance(data, Sequence):
        return list(data)
    raise STSInputError(f"Cannot use {type(data).__name__} as {what}; pass a list of records, a datasets.Dataset "
                        "or a JSONL path.")


def plan_preference(builder: PromptBuilder, config, data: Any, name: str = "preference data",
                    chat_template_kwargs: dict[str, Any] | None = None, truncation: Truncation | None = None,
                    ) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs drawn in a seeded random order until ``config.shift_tokens`` counted completion tokens (chosen and
    rejected together). Pairs whose chosen and rejected tokens are identical are skipped: preference training gets no
    gradient from them. Returns the pairs and counts (``tokens``, ``identical``, ``empty``)."""
    records = raw_records(data, name)
    if not records:
        raise STSInputError(f"{name!r} is empty; give it records with 'prompt', 'chosen' and 'rejected'.")
    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    pairs: list[PreferencePair] = []
    counts = {"tokens": 0, "identical": 0, "empty": 0}
    for index in order:
        if counts["tokens"] >= config.shift_tokens:
            break
        pair = tokenize_preference(builder, records[index], index, name, chat_template_kwargs, truncation)
        if not any(pair.chosen[1]) or not any(pair.rejected[1]):
            counts["empty"] += 1
            continue
        if pair.chosen == pair.rejected:
            counts["identical"] += 1
            continue
        pairs.append(pair)
        counts["tokens"] += sum(pair.chosen[1]) + sum(pair.rejected[1])
    if not pairs:
        read = counts["identical"] + counts["empty"]
        raise STSInputError(
            f"No pair of {name!r} can show which way preference training pushes: of the {read} records read, "
            f"{counts['identical']} have identical chosen and rejected tokens and {counts['empty']} a "
            "completion without countable tokens (empty, or special tokens only). Give pairs whose chosen and "
            "rejected completions differ.")
    if counts["identical"]:
        warn_on_main(f"{counts['identical']} of the sampled pairs of {name!r} have identical chosen and rejected "
                     "completions; preference training gets no gradient from them, so the forecast leaves them out.",
                     STSDataWarning, stacklevel=3)
    return pairs, counts


NOTHING_MOVED = ("The chosen and rejected completions of {name!r} differ in no SAE latent (every chosen-minus-"
                 "rejected difference is 0), so preference training has no direction to forecast: check that chosen "
                 "and rejected really differ, and that the SAE is for this model and layer.")


def preference_pass(builder: PromptBuilder, config, pairs: Any, name: str = "preference data",
                    chat_template_kwargs: dict[str, Any] | None = None, truncation: Truncation | None = None,
                    ) -> tuple[list[ContrastUnit], ShiftPass]:
    """The chosen-vs-rejected side of a forecast: the sampled pairs (:func:`plan_preference`) as contrast units,
    and the pass over them."""
    sampled, counts = plan_preference(builder, config, pairs, name, chat_template_kwargs, truncation)
    units = [ContrastUnit([p.chosen, p.rejected], [1.0, -1.0]) for p in sampled]
    settings = {"preference_pairs": len(units), "identical_pairs_skipped": counts["identical"]}
    return units, contrast_pass(units, kind="chosen_vs_rejected", what=f"preference pairs of {name!r}",
                                nothing_moved=NOTHING_MOVED.format(name=name), settings=settings)


def run_preference_forecast(setup: ForecastSetup, pairs: Any, domains: dict[str, Corpus], *, name: str = "preference data",
                            chat_template_kwargs: dict[str, Any] | None = None, progress: bool = False,
                            start: float | None = None, truncation: Truncation | None = None) -> ForecastRun:
    """The chosen-vs-rejected forecast on prepared inputs (``settings["shift"] == "chosen_vs_rejected"``); returns
    the statistics too (``shift`` is a :class:`ContrastStats`)."""
    start = time.perf_counter() if start is None else start
    units, shift = preference_pass(setup.builder, setup.config, pairs, name, chat_template_kwargs, truncation)
    return forecast_of_contrast(setup, units, shift, f"preference pairs of {name!r}", domains, progress=progress,
                                start=start)


def preference_forecast(model: nn.Module, tokenizer, sae: Any, pairs: Any, targets: Any, config: Any = None, *,
                        shift: str = "chosen_vs_rejected", progress: bool = False, calibration: Any = None,
                        chat_template_kwargs: dict[str, Any] | None = None, max_length: int | None = None,
                        truncation_mode: str = "keep_start") -> Forecast:
    """Forecast how preference training (DPO, IPO, ...) on ``pairs`` moves each target domain.

    Args:
        pairs: records ``{"prompt", "chosen", "rejected"}`` (strings or chat messages, TRL's formats, also the
            implicit-prompt one and TRL's tokenized ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``), a
            ``datasets.Dataset`` or a JSONL path.
        shift: ``"chosen_vs_rejected"`` (the direction preference training pushes; STSConfig.shift_tokens counts
            chosen and rejected tokens together) or ``"in_context"`` (the SFT-style forecast: the chosen completions
            as in-context demonstrations before the prompts, as :func:`~sts_callback.pipelines.forecast.forecast`).
        max_length, truncation_mode: how the trainer cuts each prompt + completion (``DPOConfig``'s): the pairs
            are read as it trains them.
        Other arguments as :func:`~sts_callback.pipelines.forecast.forecast`.
    """
    if shift not in PREFERENCE_SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {PREFERENCE_SHIFTS}.")
    setup, calibration, start = prepare_forecast(model, tokenizer, sae, config, calibration, shift)
    domains = load_domains(targets)
    if shift == "chosen_vs_rejected":
        result = run_preference_forecast(setup, pairs, domains, chat_template_kwargs=chat_template_kwargs,
                                         progress=progress, start=start,
                                         truncation=Truncation(max_length, truncation_mode)).forecast
    else:
        result = run_forecast(setup, load_corpus(raw_records(pairs), name="train"), domains,
                              progress=progress, start=start).forecast
    return result.apply_calibration(calibration) if calibration is not None else result

