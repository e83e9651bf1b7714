"""The LM head at a re-check from a sample of the vocabulary: each held-out token's log-sum-exp moved by its base
top logits and a draw from the rest, not by a pass over the whole vocabulary.

At train start the base pass keeps, per counted token, the ``top`` largest logits (exact) and ``tail`` token ids
drawn from the rest in proportion to their base probability (stratified draws; self-normalised importance weights
correct the draw for the low-precision logits it was made from). A re-check computes only those logits and the
target's with the current weights (``top + tail + 1`` rows of the head instead of the vocabulary) and moves the
base log-sum-exp by

    lse' = lse + log1p( sum_top p_k (exp(dz_k) - 1) + P_tail * sum_draws w_s (exp(dz_s) - 1) ),

``dz`` the logit's change, ``p_k`` its base probability, ``P_tail`` the base mass outside the top. Exact for the
top; unbiased up to the log's curvature for the tail, whose estimate's noise is per token and so lands in the
paired change's interval like the texts' own spread. An unchanged model measures no change, exactly. Where the
base's mass nearly all leaves (a sum near -1, its probabilities underflowing), the same sum is read in log space.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .lm_head import HeadInPrecision, exact_logits, is_plain_linear, swap_exact

TAIL_DEFAULT = 32
# A re-check's sampled batch is checked against the whole head on every VERIFY_STRIDE-th counted row (at least
# VERIFY_MIN_ROWS of them): a mean gap beyond VERIFY_NATS and twice its standard error, or beyond VERIFY_MAX_NATS
# however noisy, measures the batch whole. Ordinary fine-tuning steps leave gaps of about 0.002 nats; a sample that
# missed where the mass went, 0.1 to 4.
VERIFY_STRIDE = 16
VERIFY_MIN_ROWS = 8
VERIFY_NATS = 0.01
VERIFY_MAX_NATS = 0.05


@dataclass
class HeadSample:
    """The base pass's view of the LM head at consecutive counted tokens (rows).

    ids: [rows, top + tail] int32, each row's top token ids then its tail draws; logits: their base logits (float32,
    exact); weights: [rows, tail] float32, each draw's self-normalised importance weight; lse: [rows] float64, the
    base log-sum-exp."""

    ids: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    lse: torch.Tensor

    @property
    def top(self) -> int:
        return self.ids.shape[1] - self.weights.shape[1]

    def __len__(self) -> int:
        return len(self.lse)

    def to(self, device: torch.device) -> "HeadSample":
        return HeadSample(*(t.to(device) for t in (self.ids, self.logits, self.weights, self.lse)))

    def split(self, sizes: list[int]) -> list["HeadSample"]:
        parts = [t.split(sizes) for t in (self.ids, self.logits, self.weights, self.lse)]
        return [HeadSample(*p) for p in zip(*parts)]

    @staticmethod
    def cat(samples: list["HeadSample"]) -> "HeadSample":
        return HeadSample(*(torch.cat([getattr(s, f) for s in samples]) for f in ("ids", "logits", "weights", "lse")))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids.contiguous(), "logits": self.logits.contiguous(), "weights": self.weights.contiguous(),
                "lse": self.lse.contiguous()}


class HeadSamples:
    """One domain's head samples, by each held-out sequence's index in its loss set.

    Args:
        tail: draws per token from outside the top logits.
        seed: seeds each sequence's draws (so a sequence draws the same on any rank layout).
    """

    def __init__(self, tail: int = TAIL_DEFAULT, seed: str = "0"):
        self.tail, self.seed = tail, seed
        self.by_sequence: dict[int, HeadSample] = {}
        self.recording = True  # the base pass records; re-checks use
        self.fallbacks = 0  # re-check batches the sample misread, measured with the whole head instead

    def uniforms(self, key: int, rows: int) -> torch.Tensor:
        """[rows, tail] stratified uniforms in [0, 1), seeded by the sequence's index: (s + U_s) / tail."""
        digest = hashlib.sha256(f"{self.seed}:head-sample:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return (torch.arange(self.tail, dtype=torch.float64) + torch.rand(rows, self.tail, generator=generator,
                                                                            dtype=torch.float64)) / self.tail

    def nll(self, keys: list[int], counts: list[int], precision: HeadInPrecision | None, head: nn.Module,
            softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
            tally: bool = True) -> torch.Tensor | None:
        """[rows] float32 NLL of a batch's counted rows (``counts`` of them for each of the sequences ``keys``, in
        order): recording, the base pass's NLL and each sequence's sample kept; else through the kept samples.
        ``None`` where the samples cannot serve (a head that is not a plain linear layer, a sequence not
        recorded): measure with the whole head. ``tally=False``: a batch of padded copies, whose fallback is
        not counted (another rank's count has the batch)."""
        if not is_plain_linear(head):
            return None
        if self.recording:
            uniforms = torch.cat([self.uniforms(key, count) for key, count in zip(keys, counts)])
            parts = [record(precision, head, softcap, h, t, u)
                     for h, t, u in zip(hidden.split(chunk), targets.split(chunk), uniforms.split(chunk))]
            whole = HeadSample.cat([sample for _, sample in parts]).to(torch.device("cpu"))
            self.by_sequence.update(zip(keys, whole.split(counts)))
            return torch.cat([nll for nll, _ in parts])
        if not all(key in self.by_sequence for key in keys):
            return None
        chunks = hidden.split(chunk)
        whole = HeadSample.cat([self.by_sequence[key] for key in keys])
        nll = torch.cat([sampled_nll(head, softcap, h, t, s) for h, t, s in
                         zip(chunks, targets.split(chunk), whole.split([len(h) for h in chunks]))])
        if not self.agrees_with_whole_head(nll, precision, head, softcap, hidden, targets):
            self.fallbacks += tally
            return None
        return nll

    def agrees_with_whole_head(self, nll: torch.Tensor, precision: HeadInPrecision | None, head: nn.Module,
                               softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> bool:
        """Whether the sampled NLL of a batch matches the whole head's on a spaced subset of its rows (every
        :data:`VERIFY_STRIDE`-th, at least :data:`VERIFY_MIN_ROWS`): when the model moves its mass onto tokens the
        base ranked low and never drew, the sample cannot see it and reads the loss far too low (a harmed domain
        measured as improved); then the batch is measured with the whole head."""
        rows = len(nll)
        stride = max(1, min(VERIFY_STRIDE, rows // VERIFY_MIN_ROWS))
        check = torch.arange(0, rows, stride, device=nll.device)
        precision = precision or HeadInPrecision(head.weight.dtype)
        exact = precision.nll(head, softcap, hidden[check], targets[check]).double()
        gap = exact - nll[check].double()
        mean = abs(float(gap.mean()))
        error = float(gap.std()) / len(check) ** 0.5 if len(check) > 1 else 0.0
        return mean <= VERIFY_NATS + 2 * error and mean <= VERIFY_MAX_NATS

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = sorted(self.by_sequence)
        if not keys:
            return {}
        out = HeadSample.cat([self.by_sequence[k] for k in keys]).state_dict()
        out["sequences"] = torch.tensor(keys, dtype=torch.int64)
        out["rows"] = torch.tensor([len(self.by_sequence[k]) for k in keys], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], seed: str = "0") -> "HeadSamples":
        samples = cls(tail=state["weights"].shape[1], seed=seed)
        samples.recording = False
        whole = HeadSample(state["ids"], state["logits"], state["weights"], state["lse"])
        for key, part in zip(state["sequences"].tolist(), whole.split(state["rows"].tolist())):
            samples.by_sequence[key] = part
        return samples


def record(precision: HeadInPrecision | None, head: nn.Linear, softcap: float | None, hidden: torch.Tensor,
           targets: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, HeadSample]:
    """[rows] float32 base NLL of ``targets`` and the rows' head sample. The NLL is the block pass's with the top
    and the target's logits exact (as :meth:`HeadInPrecision.nll`); a second block pass draws the tail."""
    precision = precision or HeadInPrecision(head.weight.dtype)
    lse, top_values, top_indices = precision.block_pass(head, softcap, hidden)
    draws, draw_values = _draw_tail(precision, head, softcap, hidden, lse, top_values, top_indices, uniforms)
    top = top_indices.shape[1]
    ids = torch.cat([top_indices, draws, targets[:, None]], 1)
    exact = exact_logits(head, softcap, hidden, ids)  # the same rows a re-check computes, in the same call shape
    approx = torch.cat([top_values, precision.approx_logits(head, softcap, hidden, targets)[:, None]], 1)
    counted = torch.ones(len(hidden), top + 1, dtype=torch.bool, device=hidden.device)
    counted[:, -1] = ~(top_indices == targets[:, None]).any(1)
    lse = swap_exact(lse, torch.cat([exact[:, :top], exact[:, -1:]], 1), approx, counted)
    # draws were made from the block pass's logits; weight each by exact / approximate probability
    weights = torch.softmax(exact[:, top:-1] - draw_values, dim=1)
    sample = HeadSample(ids=ids[:, :-1].to(torch.int32), logits=exact[:, :-1], weights=weights, lse=lse)
    return (lse - exact[:, -1].double()).float(), sample


def _draw_tail(precision: HeadInPrecision, head: nn.Linear, softcap: float | None, hidden: torch.Tensor,
               lse: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, uniforms: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, tail] token ids drawn outside each row's top in proportion to the block pass's probabilities (inverse
    CDF over the vocabulary, block by block; the tail's mass is what the top leaves of the block pass's softmax),
    and their block-pass logits."""
    rows, tail = uniforms.shape
    device = hidden.device
    mass = (1 - (top_values.double() - lse[:, None].double()).exp().sum(1)).clamp(min=0)
    targets = (uniforms.to(device) * mass[:, None]).float()  # where each draw falls in the tail's cumulative mass
    ids = torch.full((rows, tail), -1, dtype=torch.long, device=device)
    values = torch.zeros(rows, tail, device=device)
    before = torch.zeros(rows, 1, device=device)
    lse = lse.float()[:, None]
    for start, block in precision.blocks(head, softcap, hidden):
        width = block.shape[1]
        probability = (block - lse).exp_()
        inside = (top_indices >= start) & (top_indices < start + width)
        if inside.any():  # the top is not tail
            row, column = inside.nonzero(as_tuple=True)
            probability[row, top_indices[row, column] - start] = 0
        cdf = probability.cumsum_(1).add_(before)
        falls = (targets < cdf[:, -1:]) & (ids < 0)
        if falls.any():
            position = torch.searchsorted(cdf, targets, right=True).clamp_(max=width - 1)
            ids = ids.where(~falls, position + start)
            values = values.where(~falls, block.gather(1, position))
        before = cdf[:, -1:].clone()
    # draws past the cumulative sum's rounding (the last few, the draws are in increasing order): the last drawn
    missing = ids < 0
    if missing.any():
        last = ((~missing).sum(1, keepdim=True) - 1).clamp(min=0)
        fill_ids, fill_values = ids.gather(1, last).clamp(min=0), values.gather(1, last)
        ids, values = ids.where(~missing, fill_ids), values.where(~missing, fill_values)
    return ids, values


def sampled_nll(head: nn.Linear, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor,
                sample: HeadSample) -> torch.Tensor:
    """[rows] float32 NLL of ``targets`` with the current head, its log-sum-exp moved from the base by the
    sample's top logits and tail draws (module docstring)."""
    sample = sample.to(hidden.device)
    top = sample.top
    ids = torch.cat([sample.ids.long(), targets[:, None]], 1)
    current = exact_logits(head, softcap, hidden, ids)
    change = torch.expm1(current[:, :-1].double() - sample.logits.double())
    p_top = (sample.logits[:, :top].double() - sample.lse[:, None]).exp()
    p_tail = (1 - p_top.sum(1)).clamp(min=0)
    moved = (p_top * change[:, :top]).sum(1) + p_tail * (sample.weights.double() * change[:, top:]).sum(1)
    lse = sample.lse + torch.log1p(moved.clamp(min=-1 + 1e-12))
    collapsed = moved < -1 + 1e-6  # nearly all the base's mass left: its probabilities underflow, so in log space
    if bool(collapsed.any()):
        rows = collapsed.nonzero().squeeze(1)
        weights = sample.weights[rows].double()
        tail = torch.logsumexp((weights / weights.sum(1, keepdim=True)).log()
                               + current[rows, top:-1].double() - sample.logits[rows, top:].double(), dim=1)
        terms = torch.cat([current[rows, :top].double(),
                           (sample.lse[rows].double() + p_tail[rows].log() + tail)[:, None]], 1)
        lse[rows] = torch.logsumexp(terms, 1)
    return (lse - current[:, -1].double()).float()


__all__ = ["TAIL_DEFAULT", "HeadSample", "HeadSamples", "record", "sampled_nll"]
