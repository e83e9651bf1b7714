"""Relative changes as people read them: a signed percentage that never rounds a nonzero change to ``+0.0%``
or a change past a threshold to the threshold itself."""

from __future__ import annotations

import math

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


__all__ = ["percent", "signed_percent"]
