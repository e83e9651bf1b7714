"""Work split across processes: padded shards, sums across ranks, one writer, agreement checks.

Every rank must run the same number of forwards of the *root* module (DeepSpeed ZeRO-3 and FSDP gather
parameters inside the forward, so a rank that stops early hangs the others). Shards are therefore padded
to one length with duplicates whose tokens are not counted. Without ``torch.distributed`` initialised
everything here is a no-op for a single process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import STSConfigError


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main_process() -> bool:
    return rank() == 0


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the current CUDA device under NCCL, else the CPU."""
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Shard:
    """This rank's share of ``n`` items: global ``indices`` (the same count on every rank) and whether each
    is ``counted`` (padded duplicates are run for lockstep but contribute nothing)."""

    indices: tuple[int, ...]
    counted: tuple[bool, ...]


def shard(n: int, lengths: Sequence[int] | None = None, *, rank_: int | None = None,
          world: int | None = None) -> Shard:
    """Items ``rank, rank + world, ...`` of ``n``, padded to ``ceil(n / world)`` with uncounted copies of the
    shortest item (the cheapest forward to repeat)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n == 0:
        return Shard((), ())
    indices = list(range(rank_, n, world))
    per_rank = math.ceil(n / world)
    filler = min(range(n), key=lambda i: (lengths[i], i)) if lengths is not None else 0
    padding = per_rank - len(indices)
    return Shard(tuple(indices + [filler] * padding), tuple([True] * len(indices) + [False] * padding))


def shard_batches(batches: Sequence[Sequence[int]], lengths: Sequence[int], *, rank_: int | None = None,
                  world: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """Whole ``batches`` (of indices into ``lengths``) for this rank, ``rank, rank + world, ...``, padded to
    ``ceil(len / world)`` with uncounted copies of the cheapest: every sequence runs in the batch it has in one
    process, so its numbers are one process's to the bit (padding and batch shape change the last float bits,
    which a sampled LM head's discrete choices can turn into a visible difference)."""
    costs = [len(batch) * max(lengths[i] for i in batch) for batch in batches]
    part = shard(len(batches), costs, rank_=rank_, world=world)
    return [list(batches[i]) for i in part.indices], list(part.counted)


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (any device; moved to the collective device and back)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return tensor
    device = collective_device()
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved.to(tensor.device))
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank (one entry without distribution)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_main_process(value: Any) -> Any:
    """Collective: rank 0's ``value`` on every rank (``value`` itself without distribution); for what only rank 0
    read from files that other ranks (another node, a slow shared file system) may not see yet."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of nested lists / dicts / strings / numbers / tensors."""
    digest = hashlib.sha256()

    def feed(part: Any) -> None:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().view(-1).to(torch.float64).numpy().tobytes())
        elif isinstance(part, dict):
            for key in sorted(part, key=str):
                feed(str(key))
                feed(part[key])
        elif isinstance(part, (list, tuple)):
            digest.update(b"[")
            for item in part:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(part).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()[:16]


def check_ranks_agree(checksums: dict[str, str], what: dict[str, str]) -> None:
    """Exchange ``checksums`` (name -> hash) and raise on every rank when any rank disagrees.

    ``what`` describes each name for the error (e.g. the domain list as this rank sees it). All ranks take
    part in the exchange, so a disagreement raises everywhere instead of hanging a later collective.
    """
    everyone = gather_objects({"checksums": checksums, "what": what})
    reference = everyone[0]
    problems = []
    for other_rank, theirs in enumerate(everyone[1:], 1):
        for name, value in reference["checksums"].items():
            if theirs["checksums"].get(name) != value:
                problems.append(f"{name}: rank 0 has {reference['what'].get(name, value)}, rank {other_rank} has "
                                f"{theirs['what'].get(name, theirs['checksums'].get(name))}")
    if problems:
        raise STSConfigError(
            "The processes of this run disagree on their STS inputs, so their statistics cannot be summed: "
            + "; ".join(problems) + ". Give every rank the same target_domains, SAE and STS config (build them "
            "from the same files/seed on every process)."
        )


def require_at_least_world(n: int, what: str, fix: str) -> None:
    """Probe sets must give every rank at least one real item."""
    world = world_size()
    if n < world:
        raise STSConfigError(f"{what} has {n} texts but this run has {world} processes: every process needs at "
                             f"least one. {fix}")


def raise_if_any_rank_failed(error: Exception | None) -> None:
    """Collective: re-raise the first rank's error on every rank, so that a data-dependent failure (NaN on
    one rank's shard) ends the pass everywhere instead of leaving the others waiting in a collective."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    failures = [(r, type(e), str(e)) for r, e in enumerate(gather_objects(error)) if e is not None]
    if failures:
        failed_rank, kind, message = failures[0]
        raise kind(f"[rank {failed_rank}] {message}")
