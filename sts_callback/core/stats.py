"""Streaming per-latent sums: everything STS needs, in O(width) memory, mergeable and reducible.

Like torchmetrics' ``Metric``: the state is declared once (every entry reduces by summation), ``update``
takes one batch of rows (tokens x width), ``merge`` adds another instance, ``all_reduce`` sums across
processes. Sums are float64 so that millions of tokens add up without drift.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .distributed import gather_objects, sum_across_ranks, world_size
from .errors import STSInputError


class _SummedState:
    """Base class: named float64 tensors of shape [width] plus a token count, all reduced by sum."""

    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, width: int, device: torch.device | str | None = None):
        self.width = int(width)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        for name in self.state_names:
            setattr(self, name, torch.zeros(self.width, dtype=torch.float64, device=device))

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, **{name: getattr(self, name) for name in self.state_names}}

    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise STSInputError(f"Expected rows of shape [tokens, {self.width}], got {tuple(rows.shape)}.")

    def merge(self, other: "_SummedState") -> "_SummedState":
        if type(other) is not type(self) or other.width != self.width:
            raise STSInputError(f"Cannot merge {type(other).__name__}({other.width}) into {type(self).__name__}({self.width}).")
        for name, tensor in self._tensors().items():
            tensor += other._tensors()[name].to(tensor.device)
        return self

    def all_reduce(self) -> "_SummedState":
        """Sum the state across the processes of ``torch.distributed`` (no-op when not initialised)."""
        if world_size() > 1:
            flat = sum_across_ranks(torch.cat([t.reshape(-1) for t in self._tensors().values()]))
            offset = 0
            for tensor in self._tensors().values():
                n = tensor.numel()
                tensor.copy_(flat[offset: offset + n].reshape(tensor.shape))
                offset += n
        return self

    def to(self, device) -> "_SummedState":
        for name, tensor in self._tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().clone() for name, tensor in self._tensors().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]):
        width = next(t for n, t in state.items() if n != "count").numel()
        instance = cls(width)
        for name, tensor in instance._tensors().items():
            if name not in state:
                raise STSInputError(f"Saved {cls.__name__} lacks {name!r}; it was written by another version.")
            tensor.copy_(state[name].to(torch.float64).reshape(tensor.shape))
        return instance

    @property
    def tokens(self) -> int:
        return int(self.count.item())


class ActivationStats(_SummedState):
    """Sums of h and h^2 per latent over the counted tokens of one condition."""

    state_names = ("sum", "sum_sq")

    def update(self, rows: torch.Tensor) -> None:
        self._check_rows(rows)
        if rows.shape[0] == 0:
            return
        device = self.sum.device
        rows = _at_least_float32(rows)  # an fp16 square overflows above 256, a bf16 one rounds
        self.count += rows.shape[0]
        self.sum += rows.sum(dim=0, dtype=torch.float64).to(device)
        self.sum_sq += rows.square().sum(dim=0, dtype=torch.float64).to(device)

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    def mean_sq(self) -> torch.Tensor:
        return self.sum_sq / self.count.clamp(min=1)


class ShiftStats(_SummedState):
    """Sums over position-matched tokens of (with-context - without-context) per latent.

    ``sum_sq_diff`` gives the paper's shift (mean squared difference); ``sum_diff`` its signed direction.
    """

    state_names = ("sum_diff", "sum_sq_diff")

    def update(self, base_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
        self._check_rows(base_rows)
        if base_rows.shape != context_rows.shape:
            raise STSInputError(
                f"Paired rows differ in shape: {tuple(base_rows.shape)} vs {tuple(context_rows.shape)}; "
                "the two conditions must be compared at the same tokens."
            )
        if base_rows.shape[0] == 0:
            return
        device = self.sum_diff.device
        diff = _at_least_float32(context_rows) - _at_least_float32(base_rows)
        self.count += diff.shape[0]
        self.sum_diff += diff.sum(dim=0, dtype=torch.float64).to(device)
        self.sum_sq_diff += diff.square().sum(dim=0, dtype=torch.float64).to(device)

    def mean_shift(self) -> torch.Tensor:
        """Per-latent E[(h_ctx - h_base)^2]: the paper's shift_j."""
        return self.sum_sq_diff / self.count.clamp(min=1)

    def mean_diff(self) -> torch.Tensor:
        return self.sum_diff / self.count.clamp(min=1)


def _at_least_float32(rows: torch.Tensor) -> torch.Tensor:
    return rows.float() if rows.is_floating_point() and torch.finfo(rows.dtype).bits < 32 else rows


_KINDS: dict[str, type[_SummedState]] = {}  # filled below: the summed states a group may hold, by class name


class StatsGroup:
    """Mixin for a dataclass whose fields are summed states (or ``None``): merge, cross-rank reduction and a flat
    ``state_dict`` (``"<field>/<state>"`` keys) derived from the fields, declared once in the dataclass."""

    def _states(self) -> dict[str, _SummedState]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if isinstance(getattr(self, f.name), _SummedState)}

    def merge(self, other: Any) -> Any:
        for name, state in self._states().items():
            state.merge(getattr(other, name))
        return self

    def all_reduce(self) -> Any:
        for state in self._states().values():
            state.all_reduce()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": value for name, state in self._states().items()
                for key, value in state.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Any:
        """The group back from :meth:`state_dict`; a field without saved tensors is ``None`` (it must allow it)."""
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            part = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == f.name}
            kind = _KINDS.get(str(f.type).split("|")[0].strip())
            if part and kind is None:
                raise STSInputError(f"{cls.__name__}.{f.name} is not a summed state; it cannot be loaded.")
            values[f.name] = kind.from_state_dict(part) if part else None
        return cls(**values)


class TopActivations:
    """A bounded reservoir: the ``k`` largest activations of every latent with where they occurred.

    ``where`` is (sequence index, token position) in the caller's numbering. Memory is O(width * k),
    whatever the number of tokens; the report draws each shifted latent's top contexts from it.
    """

    def __init__(self, width: int, k: int = 5):
        self.width, self.k = int(width), int(k)
        self.values = torch.full((self.k, self.width), float("-inf"))
        self.sequence = torch.full((self.k, self.width), -1, dtype=torch.int64)
        self.position = torch.full((self.k, self.width), -1, dtype=torch.int64)

    def update(self, rows: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> None:
        """rows: [tokens, width] activations; sequence / position: [tokens] where each row came from."""
        if rows.shape[0] == 0:
            return
        k = min(self.k, rows.shape[0])
        top = torch.topk(rows.detach().float().cpu(), k, dim=0)
        values = torch.cat([self.values, top.values])
        seqs = torch.cat([self.sequence, sequence.cpu()[top.indices]])
        poss = torch.cat([self.position, position.cpu()[top.indices]])
        best = torch.topk(values, self.k, dim=0).indices
        self.values = values.gather(0, best)
        self.sequence = seqs.gather(0, best)
        self.position = poss.gather(0, best)

    def merge(self, other: "TopActivations") -> "TopActivations":
        values = torch.cat([self.values, other.values])
        best = torch.topk(values, self.k, dim=0).indices
        self.values = values.gather(0, best)
        self.sequence = torch.cat([self.sequence, other.sequence]).gather(0, best)
        self.position = torch.cat([self.position, other.position]).gather(0, best)
        return self

    def merge_across_ranks(self) -> "TopActivations":
        """Every rank ends with the top ``k`` over all ranks (sequence indices must be global)."""
        if world_size() > 1:
            for rank_index, (values, sequence, position) in enumerate(
                    gather_objects((self.values, self.sequence, self.position))):
                other = TopActivations(self.width, self.k)
                other.values, other.sequence, other.position = values, sequence, position
                if rank_index == 0:
                    self.values, self.sequence, self.position = values, sequence, position
                else:
                    self.merge(other)
        return self

    def top(self, latent: int) -> list[tuple[float, int, int]]:
        """(value, sequence, position) of a latent's largest positive activations, largest first (equal ones in
        text order: the order topk leaves them in depends on how the ranks' reservoirs were merged)."""
        found = [(float(v), int(s), int(p)) for v, s, p in zip(self.values[:, latent], self.sequence[:, latent],
                                                              self.position[:, latent]) if s >= 0 and v > 0]
        return sorted(found, key=lambda entry: (-entry[0], entry[1], entry[2]))


_KINDS.update({kind.__name__: kind for kind in (ActivationStats, ShiftStats)})
