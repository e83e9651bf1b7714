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
    return signed_percents([value], digits, apart_from)[0]


def signed_percents(values: list[float | None], digits: int = 1, apart_from: float | None = None) -> list[str]:
    """``values`` (a change and its interval's bounds) as signed percentages with one number of decimals: the
    fewest from ``digits`` on at which each reads as :func:`signed_percent` has it and different values read
    differently. Each with its own decimals, an interval of -0.051% .. -0.034% read [-0.1, -0.03], and
    -0.073% [-0.086, -0.060] read -0.1% [-0.1, -0.1]. A nonzero value below the last place :data:`MAX_DIGITS`
    reads "-<0.001%" (not "-0.000%", a zero with a sign). ``None`` reads "–", a non-finite value as itself."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    places = digits
    for places in range(digits, MAX_DIGITS + 1):
        shown = [round(v * 100, places) for v in finite]
        if any((s == 0) != (v == 0) for s, v in zip(shown, finite)):
            continue
        if apart_from is not None and any(v != apart_from and s == round(apart_from * 100, places)
                                          for s, v in zip(shown, finite)):
            continue
        if len(set(shown)) < len(set(finite)):
            continue
        break
    tiny = f"<{10.0 ** -places:.{places}f}%"

    def shown(v: float) -> str:
        text = f"{v:+.{places}%}"
        return text[0] + tiny if v != 0 and round(v * 100, places) == 0 else text

    return ["–" if v is None else f"{v}" if not math.isfinite(v) else shown(v) for v in values]


def percent(value: float | None, digits: int = 1, apart_from: float | None = None) -> str:
    """:func:`signed_percent` without the plus sign, for a magnitude ("rose by 5.02%") or a share of time."""
    return signed_percent(value, digits, apart_from).lstrip("+")


def data_value(value: Any) -> Any:
    """A data set's value ``json.dumps`` cannot write (``default=`` hook), as JSON readers and ``datasets`` take it
    back: a date or time as ISO 8601 text (numpy's and pandas' too; a missing one, ``NaT``, as null), a duration
    as its seconds, a ``Decimal`` as its exact text, bytes as base64, a numpy or torch scalar or array as its
    number or list (a non-finite number as null), anything else as its ``str()``."""
    import base64
    import datetime
    import decimal

    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if kind in ("M", "m"):  # numpy datetime64 / timedelta64 (their tolist() of nanoseconds is an integer)
        import numpy as np

        if getattr(value, "ndim", 0):
            return [data_value(v) for v in value]
        if np.isnat(value):
            return None
        return str(np.datetime_as_string(value)) if kind == "M" else float(value / np.timedelta64(1, "s"))
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)) and value != value:
        return None  # pandas' NaT, a datetime not equal to itself: missing
    if isinstance(value, datetime.timedelta):  # pandas' Timedelta too
        return value.total_seconds()
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "tolist"):  # numpy / torch: a scalar's tolist() is its Python number
        return json_safe(value.tolist())
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


__all__ = ["data_value", "json_safe", "percent", "signed_percent", "signed_percents"]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: strict JSON (``NaN`` / ``Infinity`` are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
