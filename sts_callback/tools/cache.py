"""Build a cached folder once, safely when several processes start on a fresh cache at the same time.

Two ranks of one ``torchrun`` (or two benchmark runs) used to race on the same cache entry: one read a file the
other was still writing, and a crash mid-build left a partial entry that later runs took as finished. Here the
builder holds a file lock, builds into a private ``.partial`` folder and renames it into place, so a reader sees
either nothing or a finished folder; the partial folders a killed builder left are removed by the next one.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ..core.atomic import give_new_file_modes
from ..core.errors import STSInputError


def build_once(folder: Path, is_built: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Return ``folder``, first calling ``build(partial_folder)`` under a lock if ``is_built(folder)`` is false.

    A process that waits on the lock finds the folder built by the one that held it and returns at once."""
    folder = Path(folder)
    if is_built(folder):
        return folder
    try:
        return _build_locked(folder, is_built, build)
    except OSError as err:
        if not _writing_the_cache(err, folder):
            raise
        raise STSInputError(f"Cannot build {folder} in the cache ({err.strerror or err}"
                            f"{f': {err.filename}' if err.filename else ''}). Point STS_CACHE at a folder this user "
                            "can write, with space for the entry (about 1 GB for Gemma 3 270M), or fix this "
                            "one.") from err


def _writing_the_cache(err: OSError, folder: Path) -> bool:
    """Whether ``err`` comes from writing the cache (a read-only, full or foreign folder, or a file where a folder
    must be) rather than from the build's own inputs: the file it names is in the cache folder or above it."""
    if err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err.filename, (str, bytes, os.PathLike)):
        return False
    name, cache = Path(os.path.abspath(os.fsdecode(err.filename))), Path(os.path.abspath(folder.parent))
    return name == cache or cache in name.parents or name in cache.parents


def _build_locked(folder: Path, is_built: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if is_built(folder):
            return folder
        # A build killed outright (SIGKILL, the OOM killer: no `finally` runs) leaves its partial folder, about
        # 1 GB for Gemma; every builder holds this lock, so no partial folder of this entry is in use now.
        for stale in folder.parent.glob(f"{glob.escape(folder.name)}.partial-*"):
            if stale.name.removeprefix(f"{folder.name}.partial-").isdigit():
                shutil.rmtree(stale, ignore_errors=True)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        try:
            build(partial)
            give_new_file_modes(partial)  # safetensors writes 0600: a shared cache (STS_CACHE) hid it from others
            if folder.exists():  # an unfinished entry from before locking existed (e.g. a crash): replace it
                shutil.rmtree(folder)
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder
