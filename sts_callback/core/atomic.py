"""Writes that never leave half a file: every file the package writes goes through here.

A whole file is written to a temporary sibling and moved into place (``os.replace`` is atomic on POSIX and
Windows); on any failure the temporary file is removed and the old file, if any, is untouched. A JSON-lines
record is appended and, when the write fails (a full disk), the file is cut back to its previous length, so a
reader never meets a cut line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; the temporary file never survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    text = json.dumps(data, indent=indent)  # serialise first: a bad value never touches the disk
    return atomic_write_text(path, text)


def append_json_line(path: str | Path, record: dict[str, Any]) -> Path:
    """Append one JSON line; on failure the file is cut back to its length before the call."""
    path = Path(path)
    line = json.dumps(record) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        size = handle.tell()
        try:
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            try:
                handle.truncate(size)
            except OSError:
                pass
            raise
    return path


def read_json_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete JSON line of ``path`` and the number of unreadable lines skipped (0 for a sound file)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


__all__ = ["append_json_line", "atomic_write", "atomic_write_json", "atomic_write_text", "read_json_lines"]
