"""Numbers as people and strict readers take them: a signed percentage that never rounds a nonzero change to
``+0.0%`` or a change past a threshold to the threshold itself; values made strict JSON."""

from __future__ import annotations

import math
from typing import Any

MAX_DIGITS = 3  # beyond a thousandth of a percent the difference is noise in every number STS shows


def signed_percent(value: float | None, digits: int = 1, apart_from: float | None = None) -> str:
    """``value`` (a fraction) as a signed percentage with ``digits`` decimals, more where fewer would print a
    nonzero value as zero (``+0.04%``, not ``+0.0%``: an interval bound whose sign decides a label) or, given
    ``apart_from`` (e.g. a tolerance), print ``value`` equal to it (``5.02%`` against a tolerance of ``5.0%``)."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return f"{value}"
    for places in range(digits, MAX_DIGITS + 1):
        shown = round(value * 100, places)
        if (shown == 0) != (value == 0):
            continue
        if apart_from is not None and value != apart_from and shown == round(apart_from * 100, places):
            continue
        break
    return f"{value:+.{places}%}"


def percent(value: float | None, digits: int = 1, apart_from: float | None = None) -> str:
    """:func:`signed_percent` without the plus sign, for a magnitude ("rose by 5.02%") or a share of time."""
    return signed_percent(value, digits, apart_from).lstrip("+")


__all__ = ["json_safe", "percent", "signed_percent"]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: strict JSON (``NaN`` / ``Infinity`` are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
