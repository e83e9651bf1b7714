"""Re-checks held to a share of training time: the run's accounting of seconds spent training and re-checking,
and which unprotected domains' held-out losses the next re-check can afford.

A re-check always measures the probe's shift and every protected domain; the unprotected domains' losses are
the part that scales with how many there are, so a budget decides how many of them the next re-check measures
(the least recently measured first). Credit carries over: a re-check that measured few leaves seconds for the
next one. Costs are the seconds each part took last time. A domain not yet measured at a re-check is priced at
the last re-check's seconds per token read, times the share of their sets its domains read, times its own set's
tokens (a sequential re-check reads a few texts, not the whole set, and a re-check's pass can cost less per token
than the train-start pass, which also records the sampled head: priced at that pass over the whole set, a domain
first in turn could wait for credit all run, with the others behind it). Before any re-check: its train-start
seconds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OverheadBudget:
    """Seconds of training and of re-checks so far, and the share the re-checks may take.

    Args:
        share: the most re-checks may cost as a fraction of training time (``0.03``: 3%); ``None``: no limit
            (the accounting is still kept and recorded).
    """

    share: float | None = None
    train_seconds: float = 0.0
    recheck_seconds: float = 0.0
    domain_seconds: dict[str, float] = field(default_factory=dict)  # each domain's loss, last time measured
    fixed_seconds: float | None = None  # the probe and the protected domains, last re-check
    set_tokens: dict[str, int] = field(default_factory=dict)  # the tokens of those sets
    measured: set[str] = field(default_factory=set)  # domains measured at a re-check (priced by their own cost)
    bookkeeping_seconds: float = 0.0  # the last re-check's files, projection and report, around its measurement

    def add_training(self, seconds: float) -> None:
        self.train_seconds += max(seconds, 0.0)

    def add_recheck(self, seconds: float, fixed_seconds: float, domain_seconds: dict[str, float],
                    tokens_read: dict[str, int] | None = None) -> None:
        """Account for one re-check: its total, the part it always pays, each measured domain's loss time and
        (``tokens_read``) the tokens it read, which re-price the domains not measured yet."""
        self.recheck_seconds += seconds
        self.fixed_seconds = fixed_seconds
        self.domain_seconds.update(domain_seconds)
        self.measured.update(domain_seconds)
        read = {name: tokens for name, tokens in (tokens_read or {}).items()
                if self.set_tokens.get(name) and tokens and name in domain_seconds}
        if read:
            share = min(1.0, statistics.median(tokens / self.set_tokens[name] for name, tokens in read.items()))
            per_token = sum(domain_seconds[name] for name in read) / sum(read.values())
            for name, tokens in self.set_tokens.items():
                if name not in self.measured:
                    self.domain_seconds[name] = tokens * share * per_token

    def add_bookkeeping(self, seconds: float) -> None:
        """Account for what a re-check spends around its measurement (the history, the report's figures): part
        of its cost, paid at every re-check."""
        self.bookkeeping_seconds = max(seconds, 0.0)
        self.recheck_seconds += self.bookkeeping_seconds

    @property
    def spent_share(self) -> float | None:
        return self.recheck_seconds / self.train_seconds if self.train_seconds > 0 else None

    def credit(self) -> float:
        """Seconds the next re-check may spend and stay within the share (infinite without a limit)."""
        if self.share is None:
            return math.inf
        return self.share * self.train_seconds - self.recheck_seconds

    def affordable(self, in_turn: Sequence[str]) -> list[str]:
        """The longest prefix of ``in_turn`` (unprotected domains, least recently measured first) whose loss
        times fit in the credit left after the fixed part of the next re-check."""
        left = self.credit() - (self.fixed_seconds or 0.0) - self.bookkeeping_seconds
        chosen: list[str] = []
        for name in in_turn:
            cost = self.domain_seconds.get(name, 0.0)
            if cost > left:
                break
            chosen.append(name)
            left -= cost
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.share, "train_seconds": self.train_seconds, "recheck_seconds": self.recheck_seconds,
                "share": self.spent_share, "fixed_seconds": self.fixed_seconds,
                "domain_seconds": dict(self.domain_seconds), "measured": sorted(self.measured),
                "bookkeeping_seconds": self.bookkeeping_seconds}

    def restore(self, saved: dict[str, Any]) -> None:
        """The accounting a re-check recorded (:meth:`to_dict`), for a resumed run: its seconds so far and what
        each part cost (older records hold the seconds only: the parts are priced again as they are measured)."""
        self.train_seconds, self.recheck_seconds = float(saved["train_seconds"]), float(saved["recheck_seconds"])
        if isinstance(saved.get("fixed_seconds"), (int, float)):
            self.fixed_seconds = float(saved["fixed_seconds"])
        if isinstance(saved.get("domain_seconds"), dict):
            self.domain_seconds = {str(k): float(v) for k, v in saved["domain_seconds"].items()
                                   if isinstance(v, (int, float))}
        self.measured = {str(name) for name in saved.get("measured") or []}
        if isinstance(saved.get("bookkeeping_seconds"), (int, float)):
            self.bookkeeping_seconds = float(saved["bookkeeping_seconds"])


__all__ = ["OverheadBudget"]
