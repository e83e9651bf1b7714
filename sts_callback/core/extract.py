"""The inner loop: batches of token ids -> residual stream -> SAE latents -> streaming statistics.

Only the counted positions of each batch are encoded by the SAE; no [tokens x d_sae] matrix outlives a
batch. The residual stream itself is summarised too (the raw-activation baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from .capture import ResidualCapture, clamped_to_vocabulary, input_vocabulary
from .data import TokenPair
from .distributed import LocalFailure, Shard, shard, shard_batches, world_size
from .errors import STSNumericalError
from .sae import SAEHandle
from .sae_fit import add_fit_sums, new_fit_sums
from .stats import ActivationStats, ShiftStats, StatsGroup, TopActivations

StatsGroupT = TypeVar("StatsGroupT", bound=StatsGroup)

# Rows are encoded and summed this many at a time: the dense [rows x d_sae] latents (and their float64
# squares) of a whole batch would dominate the path's memory (benchmarks/perf/extraction.py).
ENCODE_CHUNK_TOKENS = 512
ENCODE_CHUNK_ELEMENTS = 2 ** 23  # rows x d_sae latents encoded at once: 32 MB of float32, whatever the SAE's width


def encode_chunk_rows(d_sae: int) -> int:
    """Residual rows to encode at once: ENCODE_CHUNK_TOKENS, fewer for a wide SAE (a 1M-latent SAE's latents of
    512 rows would take 2 GB)."""
    return max(1, min(ENCODE_CHUNK_TOKENS, ENCODE_CHUNK_ELEMENTS // max(1, d_sae)))


@dataclass
class ConditionStats(StatsGroup):
    """Statistics of one set of texts: activations (latents and residual) without context."""

    latents: ActivationStats
    residual: ActivationStats


@dataclass
class PairedStats(StatsGroup):
    """Activations without context plus the position-matched shift caused by the context."""

    latents: ActivationStats
    residual: ActivationStats
    latent_shift: ShiftStats
    residual_shift: ShiftStats


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length (longest first) so that padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def local_sequences(sequences: Sequence[tuple[list[int], list[bool]]], part: Shard) -> list[tuple[list[int], list[bool]]]:
    """This rank's (ids, counted flags); padded duplicates keep their ids but count no token."""
    return [sequences[i] if keep else (sequences[i][0], [False] * len(sequences[i][1]))
            for i, keep in zip(part.indices, part.counted)]


@dataclass
class RowBatch:
    """One batch of an extraction pass: ``batch`` indexes the sequences given, ``rows`` are the residual rows at
    their counted tokens (``where``: the (batch row, position) of each row), ``context_rows`` the same tokens
    with demonstrations in context (paired passes)."""

    batch: list[int]
    rows: torch.Tensor
    where: list
    context_rows: torch.Tensor | None = None


class Extractor:
    """Runs a model up to a layer and streams SAE statistics.

    Args:
        model: the (possibly wrapped) Hugging Face model; put in eval mode by the caller.
        sae: the loaded SAE.
        layer: decoder block read.
        batch_size: sequences per forward.
        truncate: stop the forward after ``layer`` when safe.
        pad_token_id: id used for right padding (never counted).
        on_batch: optional callback called after each batch (progress bars).
        split: under ``torch.distributed``, each rank runs a padded 1/world share of the sequences and the
            statistics are summed across ranks (every rank must then call the same methods). An exception in a
            rank's forwards or encoding (NaN / inf, out of memory) is then kept (:attr:`failed`) and raised on every
            rank at the end of the pass (:meth:`finish`), so that no rank is left waiting in a collective.
    """

    def __init__(self, model: nn.Module, sae: SAEHandle, layer: int, *, batch_size: int = 8,
                 truncate: bool = True, pad_token_id: int = 0, on_batch: Callable[[int], None] | None = None,
                 split: bool = True):
        self.model = model
        self.sae = sae
        self.capture = ResidualCapture(model, layer, truncate=truncate)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.on_batch = on_batch
        self.device = _input_device(model)
        self.split = split
        self.failed = LocalFailure.around_forwards(model, split and world_size() > 1)
        self.batches_run = 0
        self.vocabulary = input_vocabulary(model)  # rows of the input embedding (None: no check)
        self.fit: torch.Tensor | None = None  # the SAE's fit sums on what is encoded, while :meth:`track_fit` is on

    def track_fit(self, on: bool) -> None:
        """Add up the SAE's reconstruction of every row encoded from now on (``sae_fit``'s sums, this rank's), or
        stop; an SAE that cannot decode has no fit to track."""
        self.fit = new_fit_sums(self.sae.d_in) if on and self.sae.can_decode else None

    def share(self, lengths: Sequence[int]) -> Shard:
        """The sequences this process runs (all of them when not split or not distributed)."""
        if self.split:
            return shard(len(lengths), lengths)
        return Shard(tuple(range(len(lengths))), (True,) * len(lengths))

    def share_batches(self, lengths: Sequence[int]) -> tuple[Shard, list[int] | None]:
        """The sequences this process runs as whole batches of one process's batching, dealt out in turn
        (:func:`shard_batches`), and those batches' sizes: each sequence runs with the neighbours and padding it has
        in one process, so its residuals are one process's to the bit (batched otherwise, the last float bits
        differ, and a latent at the edge of the top shifted ones can change places). Not split: all, in one
        process's batches (sizes None)."""
        if not self.split or world_size() == 1:
            return self.share(lengths), None
        return whole_batch_share(lengths, self.batch_size)

    def _new_condition(self) -> tuple[ActivationStats, ActivationStats]:
        return ActivationStats(self.sae.d_sae, self.device), ActivationStats(self.sae.d_in, self.device)

    def _forward(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, beyond = clamped_to_vocabulary(ids, self.vocabulary)
        resid = self.capture(ids.to(self.device), mask.to(self.device))
        if beyond is not None:
            raise beyond
        return resid

    @staticmethod
    def _rows(resid: torch.Tensor, lengths: Sequence[int], n_query: Sequence[int],
              counted: Sequence[Sequence[bool]], where: list | None = None) -> torch.Tensor:
        """Residual rows at the counted query positions, in a fixed (sequence, position) order.

        ``where``, when given, receives (batch row, position) tensors of the rows.
        """
        batch_index, position_index = [], []
        for row, (length, n, flags) in enumerate(zip(lengths, n_query, counted)):
            start = length - n
            for offset, keep in enumerate(flags):
                if keep:
                    batch_index.append(row)
                    position_index.append(start + offset)
        b = torch.tensor(batch_index, dtype=torch.long, device=resid.device)
        p = torch.tensor(position_index, dtype=torch.long, device=resid.device)
        if where is not None:
            where.extend([b.cpu(), p.cpu()])
        rows = resid[b, p]
        return rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows

    def _check_finite(self, rows: torch.Tensor, what: str) -> None:
        """Raise on NaN / inf (inside ``with self.failed``: kept to the end of the pass when split across ranks)."""
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()[:5].tolist()
            raise STSNumericalError(
                f"NaN or inf in the residual stream at layer {self.capture.layer} in batch {self.batches_run} "
                f"of {what} (rows {bad}); check the model's dtype (fp16 overflows are common) and the input texts."
            )

    def finish_pass(self, stats: StatsGroupT, reservoir: TopActivations | None = None) -> StatsGroupT:
        """End of a statistics pass: raise a recorded failure, then sum ``stats`` (and merge the reservoir) across
        the ranks that split the work."""
        self.finish()
        if self.split:
            stats.all_reduce()
            if reservoir is not None:
                reservoir.merge_across_ranks()
        return stats

    def finish(self) -> None:
        """End of a pass: a failure kept on any rank raised on every rank (a collective when split across ranks;
        every rank must call it)."""
        self.failed.raise_everywhere()

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """SAE latents of residual rows (float32 when the SAE computes in half precision)."""
        latents = self.sae.encode(rows).to(rows.device)
        return latents.float() if latents.dtype in (torch.float16, torch.bfloat16) else latents

    def iter_rows(self, sequences: Sequence[tuple[list[int], list[bool]]], what: str = "texts",
                  batch_sizes: Sequence[int] | None = None) -> Iterator[RowBatch]:
        """Residual rows at the counted tokens of ``sequences`` ((ids, counted flags for the last len(flags)
        ids)), one length-sorted batch at a time (``batch_sizes``: consecutive batches of these sizes instead, as
        :meth:`share_batches` gives them); non-finite values raise (collectively, see :meth:`finish`).
        A consumer that computes on the rows runs that inside ``with self.failed`` too."""
        lengths = [len(ids) for ids, _ in sequences]
        for batch in _batch_plan(lengths, self.batch_size, batch_sizes):
            item = None
            if not self.failed.skip:
                with self.failed:
                    resid = self._forward([sequences[i][0] for i in batch])
                    where: list = []
                    rows = self._rows(resid, [lengths[i] for i in batch], [len(sequences[i][1]) for i in batch],
                                      [sequences[i][1] for i in batch], where)
                    del resid
                    self._check_finite(rows, what)
                    item = RowBatch(batch=batch, rows=rows, where=where)
            if item is not None:
                yield item
            self._after_batch(len(batch))

    def iter_paired_rows(self, pairs: Sequence[TokenPair], what: str = "queries", *,
                         skip_uncounted: bool = False, batch_sizes: Sequence[int] | None = None,
                         ) -> Iterator[RowBatch]:
        """Rows of the query tokens without (``rows``) and with (``context_rows``) the demonstrations, at the
        same positions, one batch at a time. ``skip_uncounted``: no forward for a batch that counts no token
        (never under torch.distributed, where every rank must run the same forwards)."""
        for batch in _batch_plan([len(p.context) for p in pairs], self.batch_size, batch_sizes):
            chosen = [pairs[i] for i in batch]
            if self.failed.skip or (skip_uncounted and not any(any(p.counted) for p in chosen)):
                self._after_batch(len(batch))
                continue
            item = None
            with self.failed:
                n_query = [p.n_query for p in chosen]
                counted = [p.counted for p in chosen]
                resid = self._forward([p.base for p in chosen])
                where: list = []
                base_rows = self._rows(resid, [len(p.base) for p in chosen], n_query, counted, where)
                resid = self._forward([p.context for p in chosen])
                context_rows = self._rows(resid, [len(p.context) for p in chosen], n_query, counted)
                del resid
                self._check_finite(base_rows, what)
                self._check_finite(context_rows, what + " (with demonstrations)")
                item = RowBatch(batch=batch, rows=base_rows, where=where, context_rows=context_rows)
            if item is not None:
                yield item
            self._after_batch(len(batch))

    def encoded_chunks(self, rows: torch.Tensor, latents: ActivationStats, reservoir: TopActivations | None,
                        sequence_of_row: list[int], where: list):
        """Encode ``rows`` :func:`encode_chunk_rows` at a time into ``latents`` (and the reservoir, keyed by global
        sequence index and position); yields (chunk slice, latents of the chunk) for further use."""
        sequence = torch.tensor(sequence_of_row)[where[0]] if reservoir is not None else None
        step = encode_chunk_rows(self.sae.d_sae)
        for start in range(0, rows.shape[0], step):
            chunk = slice(start, start + step)
            encoded = self.encode(rows[chunk])
            latents.update(encoded)
            if self.fit is not None:
                add_fit_sums(self.fit, rows[chunk], encoded, self.sae.decode(encoded).float())
            if reservoir is not None:
                reservoir.update(encoded, sequence[chunk], where[1][chunk])
            yield chunk, encoded

    @torch.no_grad()
    def activations(self, sequences: Sequence[tuple[list[int], list[bool]]], what: str = "texts",
                    reservoir: TopActivations | None = None) -> ConditionStats:
        """Statistics of texts alone. ``sequences``: (ids, counted flags for the last len(flags) ids).

        ``reservoir`` keeps each latent's top activations as (index into ``sequences``, position).
        """
        latents, residual = self._new_condition()
        part, sizes = self.share_batches([len(ids) for ids, _ in sequences])
        for item in self.iter_rows(local_sequences(sequences, part), what, sizes):
            with self.failed:
                residual.update(item.rows)
                for _ in self.encoded_chunks(item.rows, latents, reservoir, [part.indices[i] for i in item.batch],
                                              item.where):
                    pass
        return self.finish_pass(ConditionStats(latents, residual), reservoir)

    @torch.no_grad()
    def paired(self, pairs: Sequence[TokenPair], what: str = "queries",
               reservoir: TopActivations | None = None) -> PairedStats:
        """Statistics without context plus the shift caused by the context, at the same query tokens.

        ``reservoir`` keeps each latent's top activations *without* context as (pair index, position in
        ``pair.base``).
        """
        latents, residual = self._new_condition()
        latent_shift = ShiftStats(self.sae.d_sae, self.device)
        residual_shift = ShiftStats(self.sae.d_in, self.device)
        part, sizes = self.share_batches([len(p.context) for p in pairs])
        local = [pairs[i] if keep else replace(pairs[i], counted=[False] * len(pairs[i].counted))
                 for i, keep in zip(part.indices, part.counted)]
        for item in self.iter_paired_rows(local, what, batch_sizes=sizes):
            with self.failed:
                residual.update(item.rows)
                residual_shift.update(item.rows, item.context_rows)
                for chunk, base_latents in self.encoded_chunks(item.rows, latents, reservoir,
                                                                [part.indices[i] for i in item.batch], item.where):
                    latent_shift.update(base_latents, self.encode(item.context_rows[chunk]))
        return self.finish_pass(PairedStats(latents, residual, latent_shift, residual_shift), reservoir)

    def _after_batch(self, n: int) -> None:
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(n)


def whole_batch_share(lengths: Sequence[int], batch_size: int) -> tuple[Shard, list[int]]:
    """This process's whole batches of one process's batching (:func:`~.distributed.shard_batches`), flattened: the
    sequences it runs (a padding batch's uncounted) and each batch's size. Every sequence runs with the neighbours
    and padding it has in one process, so its numbers are one process's to the bit."""
    mine, counted = shard_batches(batches_by_length(lengths, batch_size), lengths)
    return (Shard(tuple(i for batch in mine for i in batch),
                  tuple(keep for batch, keep in zip(mine, counted) for _ in batch)), [len(batch) for batch in mine])


def consecutive_batches(sizes: Sequence[int]) -> list[list[int]]:
    """Batches of these sizes over consecutive indices: a flattened :func:`whole_batch_share`, batched again."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return [list(range(a, b)) for a, b in zip(starts, starts[1:])]


def _batch_plan(lengths: Sequence[int], batch_size: int, sizes: Sequence[int] | None) -> list[list[int]]:
    """Length-sorted batches, or consecutive ones of the given ``sizes``."""
    return batches_by_length(lengths, batch_size) if sizes is None else consecutive_batches(sizes)


def _input_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
