"""A benchmark script of benchmarks/transfer/ loaded as a module for its tests (its folder on sys.path: the scripts
import their neighbours, some only when called)."""

import importlib.util
import sys
from pathlib import Path

TRANSFER = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer"


def load_transfer_script(name: str):
    if str(TRANSFER) not in sys.path:
        sys.path.insert(0, str(TRANSFER))
    spec = importlib.util.spec_from_file_location(name, TRANSFER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
