"""Held-out loss at the precision needed: per-sequence NLL through a chunked LM head, and the sequential paired
estimate of a domain's relative loss change with its 95% interval.

The LM head of a large-vocabulary model dominates a loss pass (Gemma 3: 262k outputs); logits are computed
only at the counted positions, a chunk of rows at a time, never as one [tokens x vocab] tensor (:mod:`.lm_head`),
and a re-check can read them from a sample of the vocabulary recorded by the base pass (:mod:`.head_sample`). A
change is a paired difference on the same sequences before and after; sequences are measured in blocks until the
interval is narrow enough, so a clear change costs a fraction of the token budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import clamped_to_vocabulary, input_vocabulary, parameters_are_sharded, text_config, unwrap_model
from .distributed import LocalFailure, gather_objects, warn_on_main
from .errors import STSDataWarning
from .data import TokenSequence
from .extract import batches_by_length, consecutive_batches, whole_batch_share
from .head_sample import HeadSamples
from .lm_head import HeadInPrecision, exact_nll, own_logits
from .torch_utils import model_device

HEAD_CHUNK = 512  # rows of logits at a time: 512 x 262k floats = 0.5 GB for Gemma 3
HEAD_DTYPES = ("auto", "bfloat16")  # besides None: the head in its own dtype


def resolve_head_dtype(setting: str | None, model: nn.Module) -> torch.dtype | None:
    """The dtype the held-out loss runs the LM head in: ``None`` (its own), ``"bfloat16"``, or ``"auto"``:
    bfloat16 where the head is float32, runs apart from the body (:func:`split_head`) and the device multiplies in
    bf16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else its own."""
    return _resolve_loss_dtype("loss_head_dtype", setting, model, lambda split: getattr(split[1], "weight", None))


def resolve_body_dtype(setting: str | None, model: nn.Module) -> torch.dtype | None:
    """The autocast dtype the held-out loss runs the body (embeddings to final norm) in: ``None`` (no autocast),
    ``"bfloat16"``, or ``"auto"``: bfloat16 where the body's weights are float32, the head runs apart from it and
    the device multiplies in bf16 natively. The residual stream and the norms stay float32 under autocast; only the
    matmuls run in bf16."""
    return _resolve_loss_dtype("loss_body_dtype", setting, model,
                               lambda split: next((p for p in split[0].parameters() if p.is_floating_point()), None))


def _resolve_loss_dtype(name: str, setting: str | None, model: nn.Module, weight_of) -> torch.dtype | None:
    if setting is None:
        return None
    if setting not in HEAD_DTYPES:
        raise ValueError(f"{name} must be one of {HEAD_DTYPES} or None, got {setting!r}.")
    split = split_head(model)
    if split is None:  # the head runs inside the full forward, in its own dtype
        if setting == "bfloat16":
            warn_on_main(f"{name}='bfloat16' does not apply to a sharded model (ZeRO-3 / FSDP) or one whose LM head "
                         f"cannot run apart from its body: the model runs its full forward in its own dtype. "
                         f"Held-out losses are measured so.", STSDataWarning, stacklevel=3)
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    weight = weight_of(split)
    if weight is None or weight.dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bf16(weight.device) else None


# Below this many output tokens the whole LM head costs little beside the body, and a sample of 65 of them reads a
# large step's change poorly (a 128-token head: a point off where the mass moved): the head is read whole.
SAMPLED_HEAD_MIN_VOCAB = 4096


def resolve_head_samples(setting: int | None, model: nn.Module) -> int | None:
    """The tail draws the re-checks' LM head samples per token (``loss_head_samples``), or ``None`` where the whole
    head is read: a head that cannot run apart from its body (a sharded model: ZeRO-3 / FSDP; logits scaled beyond
    head(body)), which always runs the full forward, or a vocabulary under :data:`SAMPLED_HEAD_MIN_VOCAB`."""
    if not setting:
        return None
    split = split_head(model)
    if split is None:
        return None
    weight = getattr(split[1], "weight", None)
    if weight is None or weight.shape[0] < SAMPLED_HEAD_MIN_VOCAB:
        return None
    return setting


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (a recent CUDA GPU, a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def split_head(model: nn.Module):
    """(body, head, softcap) when the model can run its LM head apart from its body; ``None`` otherwise (a
    sharded model, where every rank must call the root module, or an architecture whose logits are more than
    head(body) and a softcap, see :func:`transforms_its_logits`)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    body = getattr(inner, "base_model", None)
    if head is None or body is None or body is inner or parameters_are_sharded(model):
        return None
    if transforms_its_logits(model):
        return None
    config = text_config(model)
    softcap = next((value for name in SOFTCAP_FIELDS if (value := getattr(config, name, None)) is not None), None)
    return body, head, softcap


# Config fields of a final logit soft-cap, tanh(logits / cap) * cap (Gemma 2/3: final_logit_softcapping;
# RecurrentGemma: logits_soft_cap).
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")


# Config fields by which a causal-LM class scales its logits (or the hidden state its head reads) beyond
# head(body) and a softcap (Granite divides by logits_scaling, Cohere multiplies by logit_scale, Falcon-H1 by
# lm_head_multiplier, Inkling divides by logits_mup_width_multiplier, ...). Read from the config, not by a probe
# forward: a pass must not run forwards its ranks do not all run.
LOGIT_SCALE_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                      "logits_mup_width_multiplier")
# Model types that mask some of their logits before the loss (Chameleon: its image tokens)
LOGIT_MASKING_MODEL_TYPES = ("chameleon",)


def transforms_its_logits(model: nn.Module) -> bool:
    """Whether ``model``'s logits are more than head(body) and a softcap: multiplied or divided by a config factor
    other than 1, cut to an ``unpadded_vocab_size`` below the head's rows, or masked (then the head cannot run
    apart from the body: its loss would be off, and the full forward measures it)."""
    configs = [getattr(unwrap_model(model), "config", None), text_config(model)]
    for config in configs:
        if config is None:
            continue
        for name in LOGIT_SCALE_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
                return True
        unpadded, rows = getattr(config, "unpadded_vocab_size", None), getattr(config, "vocab_size", None)
        if isinstance(unpadded, int) and isinstance(rows, int) and unpadded < rows:
            return True
        if getattr(config, "model_type", None) in LOGIT_MASKING_MODEL_TYPES:
            return True
    return False


def sequence_nll(model: nn.Module, sequences: Sequence[TokenSequence], pad: int, batch_size: int,
                 chunk: int = HEAD_CHUNK, head_precision: HeadInPrecision | None = None,
                 body_dtype: torch.dtype | None = None, head_samples: HeadSamples | None = None,
                 keys: Sequence[int] | None = None, batches: Sequence[Sequence[int]] | None = None,
                 failed: LocalFailure | None = None, on_batch: Callable[[int], Any] | None = None,
                 duplicates: Sequence[bool] | None = None) -> torch.Tensor:
    """[n, 2] float64: (NLL sum, token count) of each sequence's counted tokens. Call under no_grad / eval.
    ``batches``: the sequences run together (default: grouped by length). ``failed``: keeps an exception of a
    batch (under distribution; see :class:`~.distributed.LocalFailure`), the rows left unmeasured at zero.
    ``head_precision``: run the LM head so, and ``body_dtype``: the body under autocast to it (both where the head
    runs apart from the body). ``head_samples``: record each sequence's head sample (keyed by ``keys``, default
    the positions in ``sequences``), or measure through the recorded ones (:mod:`.head_sample`). ``on_batch``:
    called with each batch's number of sequences once it is measured (a progress bar's ``update``).
    ``duplicates``: which sequences are a rank's padded copies (run for lockstep, not counted): a batch of them
    alone adds nothing to the head samples' fallback count."""
    device = model_device(model)
    out = torch.zeros(len(sequences), 2, dtype=torch.float64)
    lengths = [len(ids) for ids, _ in sequences]
    split = split_head(model)
    vocabulary = input_vocabulary(model)

    def measure(batch: Sequence[int]) -> None:
        longest = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        counted = torch.zeros((len(batch), longest), dtype=torch.bool)
        for row, i in enumerate(batch):
            seq, flags = sequences[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            counted[row, len(seq) - len(flags): len(seq)] = torch.tensor(flags)
        ids, beyond = clamped_to_vocabulary(ids, vocabulary)
        ids, mask = ids.to(device), mask.to(device)
        keep = counted[:, 1:].to(device)
        targets = ids[:, 1:][keep]
        rows = torch.arange(len(batch), device=device)[:, None].expand_as(keep)[keep]
        if split is not None:
            body, head, softcap = split
            with torch.autocast(device.type, dtype=body_dtype or torch.float32, enabled=body_dtype is not None):
                hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][keep]
            hidden = hidden.float() if body_dtype is not None else hidden
            nll = None
            if head_samples is not None and len(targets):
                nll = head_samples.nll([keys[i] if keys is not None else i for i in batch], keep.sum(1).tolist(),
                                       head_precision, head, softcap, hidden, targets, chunk,
                                       tally=duplicates is None or not all(duplicates[i] for i in batch))
            if nll is None:
                nll = torch.cat([head_nll(head, softcap, h, t, head_precision)
                                 for h, t in zip(hidden.split(chunk), targets.split(chunk))]) \
                    if len(targets) else torch.zeros(0, device=device)
            del hidden
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets, reduction="none")
            del logits
        if beyond is not None:
            raise beyond
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
        counts = keep.sum(1)
        for row, i in enumerate(batch):
            out[i, 0] = float(sums[row])
            out[i, 1] = float(counts[row])

    failed = failed or LocalFailure(collective=False)  # none given: an exception propagates at once
    for batch in batches_by_length(lengths, batch_size) if batches is None else batches:
        if not failed.skip:
            with failed:
                measure(batch)
        if on_batch is not None:
            on_batch(len(batch))
    return out


def head_nll(head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor,
             precision: HeadInPrecision | None = None) -> torch.Tensor:
    if precision is not None:
        return precision.nll(head, softcap, hidden, targets)
    return exact_nll(own_logits(head, hidden).float(), softcap, targets)


def all_sequence_nll(model: nn.Module, sequences: Sequence[TokenSequence], pad: int, batch_size: int,
                     indices: Sequence[int] | None = None, head_precision: HeadInPrecision | None = None,
                     body_dtype: torch.dtype | None = None, head_samples: HeadSamples | None = None,
                     on_batch: Callable[[int], Any] | None = None) -> torch.Tensor:
    """:func:`sequence_nll` of ``indices`` (default: all) with every rank running a padded share of whole batches
    (:func:`~.distributed.shard_batches`: the numbers of one process on any number of ranks); the result,
    [len(sequences), 2] with zeros where not measured, is summed across ranks, so every rank holds all of it.
    ``head_samples`` (keyed by the index in ``sequences``) recorded on one rank are gathered to every rank.
    An exception in one rank's batches is raised on every rank at the closing sum (no rank left waiting in it)."""
    indices = list(range(len(sequences))) if indices is None else list(indices)
    out = torch.zeros(len(sequences), 2, dtype=torch.float64)
    lengths = [len(sequences[i][0]) for i in indices]
    part, sizes = whole_batch_share(lengths, batch_size)
    positions, layout = part.indices, consecutive_batches(sizes)  # positions: into indices
    local = [sequences[indices[j]] for j in positions]
    keys = [indices[j] for j in positions]
    failed = LocalFailure.around_forwards(model)
    measured = sequence_nll(model, local, pad, batch_size, head_precision=head_precision, body_dtype=body_dtype,
                            head_samples=head_samples, keys=keys, batches=layout, failed=failed,
                            on_batch=on_batch, duplicates=[not flag for flag in part.counted]) if local \
        else torch.zeros(0, 2, dtype=torch.float64)
    if head_samples is not None and head_samples.recording:
        recorded = {key: head_samples.by_sequence[key] for key in keys if key in head_samples.by_sequence}
        for theirs in gather_objects(recorded):
            head_samples.by_sequence.update(theirs)
    for row, (j, flag) in enumerate(zip(positions, part.counted)):
        if flag:
            out[indices[j]] = measured[row]
    return failed.sum_across_ranks(out)


@dataclass
class LossChange:
    """A domain's relative loss change on the sequences measured so far, with its 95% interval."""

    delta: float
    low: float
    high: float
    tokens: int
    sequences: int
    seconds: float = 0.0  # what measuring it took (set by the caller that timed it)
    head_fallbacks: int = 0  # batches the sampled LM head misread, measured with the whole head (set by the caller)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def standard_error(self) -> float:
        """The change's standard error (the interval's half-width over its Student's t quantile); inf with
        fewer than 2 sequences."""
        if self.sequences < 2 or not math.isfinite(self.half_width):
            return math.inf
        from scipy.stats import t

        return self.half_width / float(t.ppf(0.975, self.sequences - 1))


def paired_change(before: torch.Tensor, after: torch.Tensor) -> LossChange:
    """Ratio estimate sum(after - before) / sum(before) over sequences ([n, 2] sums and counts on the same
    tokens), with a delta-method 95% interval over sequences (tokens within a sequence are not independent), its
    quantile Student's t with n - 1 degrees of freedom: a re-check reads a handful of sequences, and the normal
    quantile's intervals then held the 4,096-token change in only 87-94% of re-checks
    (``benchmarks/perf/interval_coverage.py``)."""
    measured = before[:, 1] > 0  # a text with no measured token (one token: its first is never predicted) adds
    b, a = before[measured, 0], after[measured, 0]  # a zero residual, and narrowed the interval on nothing
    total = float(b.sum())
    n = len(b)
    delta = float((a - b).sum()) / total if total else 0.0
    if n >= 2 and total:
        from scipy.stats import t

        residual = (a - b) - delta * b
        half = float(t.ppf(0.975, n - 1)) * math.sqrt(float(residual.square().sum()) * n / (n - 1)) / total
    else:
        half = math.inf
    return LossChange(delta=delta, low=delta - half, high=delta + half, tokens=int(before[:, 1].sum()),
                      sequences=n)


def sequential_change(measure: Callable[[list[int]], torch.Tensor], base: torch.Tensor, order: Sequence[int],
                      lengths: Sequence[int], *, half_width: float | None, block_tokens: int = 256,
                      tolerance: float | None = None, min_sequences: int = 4) -> LossChange:
    """Measure ``order``'s sequences block by block (``measure(indices)`` -> [len(base), 2] with the measured
    rows filled) until the 95% interval's half-width is at most ``half_width``, or the whole interval is above
    ``tolerance`` (a violation either way), or every sequence is measured. ``half_width=None`` measures all."""
    after = torch.zeros_like(base)
    done: list[int] = []
    position = 0
    while position < len(order):
        block, tokens = [], 0
        while position < len(order) and (tokens < block_tokens or len(done) + len(block) < min_sequences):
            block.append(order[position])
            tokens += lengths[order[position]]
            position += 1
        after += measure(block)
        done += block
        change = paired_change(base[done], after[done])
        if half_width is None or len(done) < min_sequences:
            continue
        if change.half_width <= half_width or (tolerance is not None and change.low > tolerance):
            return change
    return paired_change(base[done], after[done])


__all__ = ["HEAD_DTYPES", "HeadInPrecision", "LossChange", "all_sequence_nll", "native_bf16", "paired_change",
           "resolve_body_dtype", "resolve_head_dtype", "sequence_nll", "sequential_change"]
