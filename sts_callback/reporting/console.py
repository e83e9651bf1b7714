"""A re-check as the console shows it while training runs: one line a person can read between the trainer's logs.

The run's files (history, report) keep everything; the line keeps the protected domains and the largest changes,
so that it stays one line however many domains are measured."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


SHOWN_DOMAINS = 6  # protected domains first, then the largest changes; the rest counted


def with_interval(value: Any, interval: Any) -> str:
    """``-1.26±0.31%`` for a change with its (symmetric) 95% interval, ``-1.26%`` without one; ``n/a`` for none."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy's floats too
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    try:
        half = (float(interval[1]) - float(interval[0])) / 2
    except (TypeError, ValueError, IndexError):
        half = math.nan
    return f"{value * 100:+.2f}±{half * 100:.2f}%" if math.isfinite(half) else f"{value:+.2%}"


def recheck_status(record: dict[str, Any], steps: int | None = None, protected: Iterable[str] = (),
                   shown: int = SHOWN_DOMAINS) -> str:
    """One re-check in a line: the held-out loss change (95% interval) of the protected domains (marked *) and of
    the others that changed most, up to ``shown`` domains, the accuracy changes, and how many rules it broke."""
    protected = list(protected)
    at = f"STS re-check at step {record.get('step')}" + (f"/{steps}" if steps else "")
    if "error" in record:
        return f"{at}: failed ({record['error']})"
    measured = record.get("loss_delta") or {}
    changes = {name: value for name, value in measured.items() if value is not None or name in protected}
    intervals = record.get("loss_delta_ci") or {}  # a protected domain not measured shows as n/a, not dropped
    others = sorted((n for n in changes if n not in protected),
                    key=lambda n: -abs(float(changes[n])) if math.isfinite(changes[n]) else -math.inf)
    order = [n for n in protected if n in changes] + others
    parts = [f"{name}{'*' if name in protected else ''} {with_interval(changes[name], intervals.get(name))}"
             for name in order[:max(shown, sum(n in changes for n in protected))]]
    if len(order) > len(parts):
        parts.append(f"{len(order) - len(parts)} more in the history")
    line = f"{at}: held-out loss " + (", ".join(parts) if parts else "not measured")
    accuracy = {k: v for k, v in (record.get("accuracy_delta") or {}).items() if v is not None}
    if accuracy:
        line += "; accuracy " + ", ".join(f"{k} {v * 100:+.1f} points" for k, v in accuracy.items())
    broken = len(record.get("violations") or [])
    if broken:
        line += f"; {broken} rule(s) broken"
    return line


__all__ = ["SHOWN_DOMAINS", "recheck_status", "with_interval"]
