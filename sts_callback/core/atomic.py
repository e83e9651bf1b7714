"""Writes that never leave half a file: every file the package writes goes through here.

A whole file is written to a temporary sibling and moved into place (``os.replace`` is atomic on POSIX and
Windows); on any failure the temporary file is removed and the old file, if any, is untouched. A JSON-lines
record is appended and, when the write fails (a full disk), the file is cut back to its previous length, so a
reader never meets a cut line.

The target must be a regular file or not exist yet: moving a file onto a device, a FIFO or a socket would
replace that node (as root, ``-o /dev/null`` would destroy /dev/null), so such a target is an
:class:`~sts_callback.core.errors.STSInputError`. A symbolic link is written through: the file it points at
gets the new contents and the link stays. A new file gets the usual ``0o666`` less the umask, an overwritten
file keeps its mode.

Files that other libraries write themselves (``save_pretrained``, sae-lens' ``save_inference_model``: safetensors
makes them 0600) are given the same mode afterwards by :func:`give_new_file_modes`, so a cache folder shared by a
team (``STS_CACHE``) can be read by the others.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import STSInputError

# No write takes this long: an older temporary was left by a process killed mid-write (SIGTERM, SIGKILL, power loss:
# no cleanup ran), and the next write of the same file removes it.
STALE_TEMPORARY_SECONDS = 3600.0

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def output_target(path: str | Path, what: str = "") -> tuple[Path, os.stat_result | None]:
    """(the file a write to ``path`` lands in, its stat or None when it does not exist yet).

    A symbolic link leads to the file it points at. An existing target that is not a regular file (a folder,
    a device, a FIFO, a socket) or a link that loops is an :class:`STSInputError` naming the path (after
    ``what``, e.g. "the forecast output") and the fix.
    """
    path = Path(path)
    real = Path(os.path.realpath(path)) if path.is_symlink() else path
    shown = (f"{what} " if what else "") + (f"{path} (a link to {real})" if real != path else str(path))
    try:
        info = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file as a folder: mkdir names it)
        return real, None
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise STSInputError(f"Cannot write {shown}: it is a symbolic link that loops; point it at a file or give "
                            "another path.") from err
    if stat.S_ISDIR(info.st_mode):
        raise STSInputError(f"Cannot write {shown}: it is a folder; give a file path, e.g. {real / 'out.json'}.")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise STSInputError(f"Cannot write {shown}: it is {kind}, and writing would replace it with a regular "
                            "file; give the path of a regular file (a new one, or one to overwrite).")
    return real, info


def _new_sibling(path: Path, mode: int) -> Path:
    """A new empty file next to ``path`` created with ``mode``, less the umask (and as a folder's default ACL
    says) as for any new file: mkstemp's fixed 0600 hid every output from the group."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, f"No free temporary name next to {path}")


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` that a killed process left (see ``STALE_TEMPORARY_SECONDS``)."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{'[0-9a-f]' * 8}.tmp"):  # _new_sibling's names only
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink()
        except OSError:  # gone already, or not ours to remove: it only takes space
            pass


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; the temporary file never survives a failure.

    ``path`` must be a regular file or new (see :func:`output_target`); a link is written through. Returns
    ``path`` as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    real, existing = output_target(path)
    # In the target's own folder (os.replace cannot cross file systems). Overwriting, never more open than the old
    # file while it is written (a 0600 file stays private), plus the owner's read / write that the write needs.
    tmp = _new_sibling(real, 0o666 if existing is None else existing.st_mode & 0o777 | 0o600)
    created = os.stat(tmp).st_mode & 0o777  # as the umask (or the folder's ACL) left it
    try:
        write(tmp)
        if existing is not None:  # after the write: a read-only mode must not stop it; no set-id bits, as a
            os.chmod(tmp, existing.st_mode & 0o777)  # write to the file itself would clear them
        elif os.stat(tmp).st_mode & 0o777 != created:  # a writer that made its own file (safetensors: 0600)
            os.chmod(tmp, created)
        os.replace(tmp, real)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temporaries(real)
    return path


def new_file_modes(folder: str | Path) -> tuple[int, int]:
    """(file mode, folder mode) that a new file and a new folder in ``folder`` get: ``0o666`` / ``0o777`` less the
    umask, or as the folder's default ACL says (read from probes: the umask cannot be read without setting it)."""
    folder = Path(folder)
    probe = _new_sibling(folder / ".sts-mode-probe", 0o666)
    try:
        file_mode = os.stat(probe).st_mode & 0o777
    finally:
        probe.unlink()
    probe_dir = folder / f".sts-mode-probe.{secrets.token_hex(4)}.tmp"
    os.mkdir(probe_dir, 0o777)
    try:
        return file_mode, os.stat(probe_dir).st_mode & 0o777
    finally:
        os.rmdir(probe_dir)


def give_new_file_modes(folder: str | Path, names: Iterable[str] | None = None) -> None:
    """Give the files and folders that another library wrote into ``folder`` (``names`` in it, default: the folder
    and everything under it) the mode a new file or folder gets there (see :func:`new_file_modes`); links are
    left alone. safetensors writes 0600, which hid a shared cache's weights from everyone else."""
    folder = Path(folder)
    file_mode, folder_mode = new_file_modes(folder)
    if names is None:
        paths = [folder, *folder.rglob("*")]
    else:
        paths = [folder / name for name in names]
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        mode = folder_mode if stat.S_ISDIR(info.st_mode) else file_mode if stat.S_ISREG(info.st_mode) else None
        if mode is not None and info.st_mode & 0o777 != mode:
            os.chmod(path, mode)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path, what: str) -> Any:
    """The JSON at ``path``; a missing, cut or non-UTF-8 file is an :class:`STSInputError` naming ``what``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise STSInputError(f"Cannot read {what} {path}: {type(err).__name__}: {err}") from err


def check_format(data: Any, expected: str, what: str, file: str) -> dict[str, Any]:
    """``data`` (a JSON file's contents) when it is an object whose ``format`` is ``expected``; otherwise an
    :class:`STSInputError` naming what was found (a list, another format) instead of a bare AttributeError."""
    if not isinstance(data, dict):
        raise STSInputError(f"Not {what}: the file holds a JSON {type(data).__name__}, where {file} holds an object "
                            f"with \"format\": {expected!r}. Pass the file sts-callback wrote.")
    if data.get("format") != expected:
        found = (f"its \"format\" is {data['format']!r}" if "format" in data
                 else "it has no \"format\" field (written by hand or by another tool?)")
        raise STSInputError(f"Not {what}: {found}, where {file} has \"format\": {expected!r}. Pass the file "
                            "sts-callback wrote.")
    return data


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    text = json.dumps(data, indent=indent)  # serialise first: a bad value never touches the disk
    return atomic_write_text(path, text)


def append_json_line(path: str | Path, record: dict[str, Any]) -> Path:
    """Append one JSON line; on failure the file is cut back to its length before the call.

    ``path`` must be a regular file or new, as for :func:`atomic_write` (opening a FIFO would block)."""
    path = Path(path)
    line = json.dumps(record) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    output_target(path)
    # Unbuffered: a buffered file's truncate() flushes its unwritten bytes first, fails again on a full disk, and
    # leaves the cut line it was to remove.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path) != b"\n":  # a line cut by a crash: this record starts on its own line
            line = "\n" + line
        try:
            data = memoryview(line.encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    return path


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def parse_json_lines(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every complete JSON line of ``path``, and the lines that are not JSON (a write cut by a crash) as they are."""
    path = Path(path)
    if not path.exists():
        return [], []
    records, bad = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(line)
    return records, bad


def read_json_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete JSON line of ``path`` and the number of unreadable lines skipped (0 for a sound file)."""
    records, bad = parse_json_lines(path)
    return records, len(bad)


def check_writable_folder(folder: Path, label: str) -> None:
    """``folder`` exists and can be written, or can be created: checked by writing a probe file into it or
    into its nearest existing parent. ``label`` names what is to be written there."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise STSInputError(f"Cannot write {label}: {existing} is a file, not a folder. Choose another path.")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".sts-write-check-")
    except OSError as err:
        raise STSInputError(f"Cannot write {label}: {existing} is not writable ({err.strerror}). Choose a "
                            "writable path or fix the folder's permissions.") from err
    os.close(handle)
    os.unlink(probe)


__all__ = ["append_json_line", "atomic_write", "atomic_write_json", "atomic_write_text", "check_writable_folder",
           "give_new_file_modes", "new_file_modes", "output_target", "parse_json_lines", "read_json_lines"]
