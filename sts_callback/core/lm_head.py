"""The LM head's NLL at each row of hidden states in a chosen matmul precision: the vocabulary in blocks with a
running log-sum-exp and top-k, the largest logits and the target's recomputed exactly.

The LM head of a large-vocabulary model dominates a loss pass (Gemma 3: 262k outputs).
"""

from __future__ import annotations

import math

import torch
from torch import nn


GATHER_ELEMENTS = 2**25  # weight rows gathered at once for exact logits: 128 MB in float32


class HeadInPrecision:
    """Each row's NLL through the LM head with its matmul in ``dtype``, each row's ``exact_top`` largest logits and its
    target's recomputed in the head's own precision (the log-sum-exp stays float32). The weight is cast once and
    reused while it is unchanged (same storage, no in-place update since).

    A float32 head on a CPU with bf16 matmul instructions runs 2.8x faster in bfloat16 (Gemma 3's 262k-row head:
    62 vs 173 GFLOP/s, one thread). bf16 logits alone are off by up to ~0.06 at a logit of 20, which moved a
    measured change by up to 0.15 of its interval's half-width; the top logits, which carry the softmax's mass, and
    the target's, taken exactly, cut the per-token error 25-fold (``benchmarks/perf/head_precision.py``). The
    vocabulary runs in blocks of ``vocab_block`` rows (a running log-sum-exp and top-k): a block's logits stay in
    cache, where a [rows x vocab] float tensor (0.5 GB for 512 rows of Gemma 3) cost as much in fresh memory as
    the matmul itself. A head that is not a plain ``nn.Linear`` (an adapter on it) runs as it is."""

    exact_top = 32
    vocab_block = 8192

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None

    def nll(self, head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[rows] float32 NLL of ``targets`` given ``hidden`` ([rows, hidden])."""
        if not is_plain_linear(head) or head.weight.dtype == self.dtype:
            return exact_nll(own_logits(head, hidden).float(), softcap, targets)
        lse, top_values, top_indices = self.block_pass(head, softcap, hidden)
        indices = torch.cat([top_indices, targets[:, None]], 1)
        exact = exact_logits(head, softcap, hidden, indices)
        approx = torch.cat([top_values, self.approx_logits(head, softcap, hidden, targets)[:, None]], 1)
        counted = torch.ones_like(indices, dtype=torch.bool)  # the target once, where it is not among the top
        counted[:, -1] = ~(top_indices == targets[:, None]).any(1)
        return (swap_exact(lse, exact, approx, counted) - exact[:, -1].double()).float()

    def block_pass(self, head: nn.Linear, softcap: float | None, hidden: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head in ``dtype`` over the vocabulary in blocks: each row's log-sum-exp [rows] and its ``exact_top``
        largest logits [rows, top] with their indices, as the blocks had them."""
        rows = len(hidden)
        top = min(self.exact_top, head.weight.shape[0])
        lse = torch.full((rows,), -math.inf, device=hidden.device)
        top_values = torch.empty(rows, 0, device=hidden.device)
        top_indices = torch.empty(rows, 0, dtype=torch.long, device=hidden.device)
        for start, block in self.blocks(head, softcap, hidden):
            lse = torch.logaddexp(lse, torch.logsumexp(block, 1))
            if top:  # the running top-k: this block's best beside the best so far
                values, indices = block.topk(min(top, block.shape[1]), dim=1)
                values, kept = torch.cat([top_values, values], 1).topk(min(top, top_values.shape[1] + values.shape[1]),
                                                                      dim=1)
                top_indices = torch.cat([top_indices, indices + start], 1).gather(1, kept)
                top_values = values
        return lse, top_values, top_indices

    def blocks(self, head: nn.Linear, softcap: float | None, hidden: torch.Tensor):
        """(first vocabulary row, [rows, block] float32 logits) of each block, the matmul in ``dtype``."""
        low_weight, low = self._cast(head), hidden.to(self.dtype)
        bias = head.bias
        for start in range(0, low_weight.shape[0], self.vocab_block):
            block = nn.functional.linear(low, low_weight[start:start + self.vocab_block]).float()
            if bias is not None:
                block += bias[start:start + self.vocab_block].to(self.dtype).float()
            if softcap:
                block = torch.tanh(block / softcap) * softcap
            yield start, block

    def approx_logits(self, head: nn.Linear, softcap: float | None, hidden: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
        """Each row's logit of its target as the block pass had it (bf16 inputs, float32 products)."""
        low_weight = self._cast(head)
        logits = (hidden.to(self.dtype).float() * low_weight[targets].float()).sum(1)
        if head.bias is not None:
            logits += head.bias[targets].to(self.dtype).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _cast(self, head: nn.Linear) -> torch.Tensor:
        weight = head.weight
        key = (weight.data_ptr(), weight._version, weight.device, id(head))
        if key != self._key:
            self._weight = None  # free the old copy before casting the new one
            self._weight, self._key = weight.detach().to(self.dtype), key
        return self._weight


def own_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's logits of ``hidden`` in the head's own dtype: the body's output is float32 where the held-out loss
    autocasts it, and a model cast to bf16 after the base losses were measured (``model.to(torch.bfloat16)``
    mid-run) has a bf16 head that refuses a float32 input."""
    weight = next((p for p in head.parameters() if p.is_floating_point()), None)
    return head(hidden if weight is None else hidden.to(weight.dtype))


def is_plain_linear(head: nn.Module) -> bool:
    """Whether the head's weight rows are its logits' rows (a plain ``nn.Linear``; not an adapter wrapped on it)."""
    return type(head) is nn.Linear


def exact_logits(head: nn.Linear, softcap: float | None, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[rows, k] float32 logits of each row's ``indices`` ([rows, k]) in the head's own precision, exact even under
    the trainer's autocast. The gathered weight rows go a slice of rows at a time (at most ``GATHER_ELEMENTS``)."""
    weight, bias = head.weight, head.bias
    step = max(1, GATHER_ELEMENTS // max(1, indices.shape[1] * weight.shape[1]))
    parts = []
    with torch.autocast(hidden.device.type, enabled=False):
        for h, i in zip(hidden.split(step), indices.split(step)):
            exact = torch.einsum("nd,nkd->nk", h.to(weight.dtype), weight[i]).float()
            if bias is not None:
                exact += bias[i].float()
            if softcap:
                exact = torch.tanh(exact / softcap) * softcap
            parts.append(exact)
    return torch.cat(parts) if parts else torch.zeros(indices.shape, device=hidden.device)


def swap_exact(lse: torch.Tensor, exact: torch.Tensor, approx: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[rows] float64 log-sum-exp with the ``counted`` approximate terms ``approx`` swapped for ``exact`` ones."""
    shift = lse[:, None].double()
    swap = ((exact.double() - shift).exp() - (approx.double() - shift).exp()).where(counted, 0).sum(1)
    return lse.double() + torch.log1p(swap)


def exact_nll(logits: torch.Tensor, softcap: float | None, targets: torch.Tensor) -> torch.Tensor:
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


__all__ = ["HeadInPrecision", "exact_logits", "exact_nll", "is_plain_linear", "swap_exact"]
