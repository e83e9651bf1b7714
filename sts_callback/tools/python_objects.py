"""Python objects a config file names as text ("package.module:name" or "path/to/file.py:name"), e.g. the reward
functions of ``sts forecast``'s RL forecast, imported when the config is checked (before any model loads)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from ..core.errors import STSInputError, first_line

FORMS = "'package.module:name' (importable here) or 'path/to/file.py:name'"


def import_object(spec: Any, what: str) -> Any:
    """The object ``spec`` names; every way it cannot be had is an :class:`STSInputError` naming ``what``."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rpartition(":")[2].strip():
        raise STSInputError(f"{what} {spec!r}: name it as {FORMS}.")
    source, _, name = spec.rpartition(":")
    source, name = source.strip(), name.strip()
    if not all(part.isidentifier() for part in name.split(".")):  # 'C:\\x\\r.py': the drive's colon, no name
        raise STSInputError(f"{what} {spec!r}: {name!r} is not a Python name; name the object after the module or "
                            f"file, as {FORMS} (e.g. '{spec}:reward').")
    if source.endswith(".py") or os.sep in source or "/" in source:
        module = _module_from_file(Path(os.path.expanduser(source)), what, spec)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise STSInputError(f"{what} {spec!r}: module {source!r} cannot be imported ({first_line(err)}); install "
                                f"it, or name a file as 'path/to/file.py:{name}'.") from err
    found: Any = module
    for part in name.split("."):  # a class attribute too: module:Class.method
        if not hasattr(found, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise STSInputError(f"{what} {spec!r}: {source} has no {name!r}; it defines {public[:20]}.")
        found = getattr(found, part)
    return found


def _module_from_file(path: Path, what: str, spec: str) -> Any:
    if not path.is_file():
        raise STSInputError(f"{what} {spec!r}: the file {path} does not exist (a path is read from the folder "
                            f"the command runs in).")
    name = f"sts_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    # the file's own imports of its neighbours (`from utils import ...`) find them, not a module of that name
    # imported before (another reward file's neighbour, an installed package); the names go back afterwards
    neighbours = {p.stem for p in path.parent.glob("*.py")} | {p.parent.name for p in path.parent.glob("*/__init__.py")}
    hidden = {n: m for n, m in sys.modules.items() if n.split(".")[0] in neighbours}
    for n in hidden:
        del sys.modules[n]
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # registered before it runs, as importlib's recipe does (dataclasses look it up)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: named, its own error chained
        del sys.modules[name]
        raise STSInputError(f"{what} {spec!r}: running {path} raised {type(err).__name__}: {first_line(err)}") \
            from err
    finally:
        sys.path.remove(str(path.parent))
        for n in [n for n in sys.modules if n.split(".")[0] in neighbours]:
            del sys.modules[n]
        sys.modules.update(hidden)
        if str(path.parent) not in sys.path:  # a neighbour imported inside a function, when the rollouts call it
            sys.path.append(str(path.parent))
    return module


__all__ = ["import_object"]
