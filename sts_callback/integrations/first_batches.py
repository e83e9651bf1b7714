"""The run's own first training micro-batches, read at train start without touching the run.

A compressed run stands for the run: trained on the batches the run will start with (as the benchmark's
``proxy.py`` trains), it sees the data the run's first quarter sees, not another sample of it. The Trainer's
prepared dataloader is never iterated here (accelerate tracks its iterations and its gradient-accumulation state):
its batch sampler is, with every random state it may draw from saved and put back, so the run then draws the same
order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..core.torch_utils import rng_state, set_rng_state

__all__ = ["run_first_batches"]


def _samplers(batch_sampler: Any) -> list[Any]:
    """The batch sampler and what it wraps (accelerate's ``BatchSamplerShard`` -> torch's ``BatchSampler`` ->
    the index sampler): the objects an iteration may change."""
    out, current = [], batch_sampler
    while current is not None and len(out) < 4 and all(current is not seen for seen in out):
        out.append(current)
        current = getattr(current, "batch_sampler", None) or getattr(current, "sampler", None)
    return out


@contextmanager
def _untouched(batch_sampler: Any) -> Iterator[None]:
    """Every random state an iteration of ``batch_sampler`` may draw from (the process's generators, the samplers'
    own generators, their attributes such as an epoch counter) is put back after."""
    objects = _samplers(batch_sampler)
    attributes = [(o, dict(vars(o))) for o in objects if hasattr(o, "__dict__")]
    generators = [(g, g.get_state()) for o in objects
                  if isinstance(g := getattr(o, "generator", None), torch.Generator)]
    process = rng_state()
    try:
        yield
    finally:
        set_rng_state(process)
        for generator, state in generators:
            generator.set_state(state)
        for obj, values in attributes:
            vars(obj).clear()
            vars(obj).update(values)


def _is_the_ranks_own(batch_sampler: Any, world: int) -> bool:
    """Whether ``batch_sampler`` yields this process's own micro-batches: one process, or accelerate's per-process
    shard of the global batches (a dispatching loader, where rank 0 reads for all, is not)."""
    if world == 1:
        return True
    try:
        from accelerate.data_loader import BatchSamplerShard
    except ImportError:  # pragma: no cover - the Trainer needs accelerate
        return False
    return isinstance(batch_sampler, BatchSamplerShard)


def _replayed(batch_sampler: Any, count: int, perturbed: bool = False) -> list[list[int]]:
    """The first ``count`` index batches of ``batch_sampler``, pass after pass with the epoch set as the Trainer
    sets it (``set_epoch`` on each sampler that has one), everything it touched put back after. ``perturbed``:
    with the process's random generators reseeded and the samplers' own generators advanced first (a data loader
    draws its workers' seed from its generator before its sampler runs), to tell an order that depends on them."""
    indices: list[list[int]] = []
    with _untouched(batch_sampler):
        if perturbed:
            random.seed(0x5EED)
            np.random.seed(0x5EED)
            torch.manual_seed(0x5EED)
            for sampler in _samplers(batch_sampler):
                if isinstance(generator := getattr(sampler, "generator", None), torch.Generator):
                    torch.empty((), dtype=torch.int64).random_(generator=generator)
        for epoch in range(count + 1):
            for sampler in _samplers(batch_sampler):
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)
            before = len(indices)
            for batch in batch_sampler:
                indices.append(list(batch))
                if len(indices) == count:
                    return indices
            if len(indices) == before:
                break
    return []


def run_first_batches(dataloader: Any, count: int, world: int = 1) -> tuple[list[Any], list[Any]] | None:
    """``(this process's first count micro-batches, every process's first ones)`` that ``dataloader``
    (the Trainer's prepared train dataloader, as ``on_train_begin`` gets it) will feed the run, in its order (into
    the next epochs when the first is shorter), or ``None`` where they cannot be known without touching the run:
    no batch sampler (an iterable or streamed dataset), a dispatching loader, a sampler that fails, or one whose
    order depends on the state of a random generator when the run's loader starts (torch's ``RandomSampler``
    without accelerate's seedable sampler, ``train_sampling_strategy="group_by_length"``): the loader draws from
    them before its sampler does. Accelerate's seedable sampler (the Trainer's default), a sequential one and
    transformers' ``BatchRebalanceSampler`` seed themselves from the epoch: known."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    dataset, collate = getattr(dataloader, "dataset", None), getattr(dataloader, "collate_fn", None)
    if (batch_sampler is None or dataset is None or collate is None
            or isinstance(dataset, torch.utils.data.IterableDataset) or not _is_the_ranks_own(batch_sampler, world)):
        return None
    try:
        mine = _replayed(batch_sampler, count)
        if not mine or _replayed(batch_sampler, count, perturbed=True) != mine:
            return None
        if world > 1:  # every process's: the global batches the shard takes its part of
            # split_batches: the wrapped sampler's batches are already global (each process takes a slice of one)
            every = _replayed(batch_sampler.batch_sampler,
                              count if getattr(batch_sampler, "split_batches", False) else count * world)
            if not every:
                return None
    except Exception:  # noqa: BLE001 - a sampler that cannot be replayed: the caller draws its own batches
        return None
    mine_collated = [collate([dataset[i] for i in batch]) for batch in mine]
    if world == 1:  # one process: its batches are every process's
        return mine_collated, mine_collated
    return mine_collated, [collate([dataset[i] for i in batch]) for batch in every]
