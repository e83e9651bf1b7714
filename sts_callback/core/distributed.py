"""Work split across processes: padded shards, sums across ranks, one writer, agreement checks.

Every rank must run the same number of forwards of the *root* module (DeepSpeed ZeRO-3 and FSDP gather
parameters inside the forward, so a rank that stops early hangs the others). Shards are therefore padded
to one length with duplicates whose tokens are not counted. Without ``torch.distributed`` initialised
everything here is a no-op for a single process.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .capture import parameters_are_sharded
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


def warn_on_main(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """A warning about what every rank computes alike (the same samples and settings): said once, by the main
    process, not once per process under torchrun."""
    if is_main_process():
        warnings.warn(message, category, stacklevel=stacklevel + 1)


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


class LocalFailure:
    """This rank's first exception in the local work of a collective pass (forwards, encoding, loss sums), kept
    by ``with failure: ...`` around that work.

    Under ``torch.distributed`` the exception is caught and kept, so that the rank still takes part in every
    collective of the pass (skipping its remaining local work, see :attr:`skip`), and the pass's closing
    collective (:meth:`raise_everywhere`, or :meth:`sum_across_ranks` folding it into the pass's last sum) raises
    it on every rank: one rank raising alone would leave the others waiting in the pass's next collective (gloo
    aborts, NCCL hangs) and their re-check records would differ. Without distribution (``collective=False``) the
    exception propagates at once, unchanged.

    ``lockstep``: the model's parameters are sharded (ZeRO-3 / FSDP), so every forward is itself a collective and a
    failed rank keeps running the remaining forwards instead of skipping them. That keeps the ranks together when
    the exception came from outside a forward's collectives (the loss, the SAE); one raised inside a forward has
    already left the other ranks waiting in it, which no catching here can undo (README, "Failures").
    """

    def __init__(self, collective: bool | None = None, *, lockstep: bool = False):
        self.collective = world_size() > 1 if collective is None else collective
        self.lockstep = lockstep
        self.error: Exception | None = None
        self.trace: str | None = None

    @classmethod
    def around_forwards(cls, model: torch.nn.Module, collective: bool | None = None) -> "LocalFailure":
        """For a pass of ``model``'s forwards: in lockstep where its parameters are sharded (ZeRO-3 / FSDP), where
        every forward is itself a collective."""
        failure = cls(collective)
        failure.lockstep = failure.collective and parameters_are_sharded(model)
        return failure

    @property
    def skip(self) -> bool:
        """Whether this rank skips the rest of its local work (it failed, and need not keep forwards in lockstep)."""
        return self.error is not None and not self.lockstep

    def __enter__(self) -> "LocalFailure":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if not self.collective or not isinstance(error, Exception):
            return False
        if self.error is None:
            import traceback

            self.trace = "".join(traceback.format_exception(kind, error, trace))
            # its frames hold the failed batch's tensors (an out-of-memory error's memory): not kept to the end
            self.error = error.with_traceback(None)
        return True

    def raise_everywhere(self) -> None:
        """The pass's closing collective (every rank calls it, failed or not): one all-reduce of a flag, and the
        errors gathered and raised on every rank (:func:`raise_collectively`) only when some rank failed."""
        if self.collective:
            self._close(torch.zeros(0))
        elif self.error is not None:
            error, self.error = self.error, None
            raise error

    def sum_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """:func:`sum_across_ranks` of ``tensor`` closing the pass: the failure flag rides in the same all-reduce
        (no extra collective when no rank failed); a failure on any rank is raised on every rank."""
        if self.collective:
            return self._close(tensor)
        self.raise_everywhere()
        return sum_across_ranks(tensor)

    def _close(self, tensor: torch.Tensor) -> torch.Tensor:
        error, trace, self.error, self.trace = self.error, self.trace, None, None
        flag = (torch.ones if error is not None else torch.zeros)(1, dtype=tensor.dtype, device=tensor.device)
        flat = sum_across_ranks(torch.cat([tensor.detach().reshape(-1), flag]))
        if float(flat[-1]) > 0:
            raise_collectively(error, trace)
        tensor.copy_(flat[:-1].reshape(tensor.shape))
        return tensor


def raise_collectively(error: Exception | None, trace: str | None = None) -> None:
    """Collective (every rank calls it, failed or not): the first failing rank's error raised on every rank as one
    same exception, of the original's type with the message ``[rank r] <message>`` (a RuntimeError naming the type
    where the type cannot be rebuilt from a message) and the failing rank's traceback (``trace``) as a note, so
    that every rank's session records the same failure and rank 0 logs where it happened. Nothing when no rank
    failed; without distribution ``error`` itself is raised."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    summary = None if error is None else _failure_summary(error, trace)
    failed = [(r, s) for r, s in enumerate(gather_objects(summary)) if s is not None]
    if not failed:
        return
    failed_rank, (kind, name, message, their_trace) = failed[0]
    others = [str(r) for r, _ in failed[1:]]
    also = f" (rank {', '.join(others)} failed too)" if others else ""
    rebuilt = None
    if kind is not None:
        try:
            rebuilt = kind(f"[rank {failed_rank}] {message}{also}")
        except Exception:  # noqa: BLE001 - a type that takes other arguments: named in a RuntimeError instead
            rebuilt = None
    if not isinstance(rebuilt, Exception):
        rebuilt = RuntimeError(f"[rank {failed_rank}] {name}: {message}{also}")
    if their_trace and hasattr(rebuilt, "add_note"):  # Python 3.11+
        rebuilt.add_note(f"Raised on rank {failed_rank}:\n{their_trace.rstrip()}")
    raise rebuilt


def _failure_summary(error: Exception, trace: str | None) -> tuple:
    """(type where it can be sent to another process else None, type name, message, traceback) of ``error``: plain
    values, so that gathering them cannot fail on one rank alone (an exception object may not pickle)."""
    import pickle
    import traceback

    kind = type(error)
    try:
        portable = pickle.loads(pickle.dumps(kind)) is kind
    except Exception:  # noqa: BLE001 - a class defined in a function, say
        portable = False
    try:
        message = str(error)
    except Exception:  # noqa: BLE001
        message = f"<{kind.__name__} without a printable message>"
    if trace is None and error.__traceback__ is not None:
        trace = "".join(traceback.format_exception(kind, error, error.__traceback__))
    return kind if portable else None, kind.__name__, message, trace
