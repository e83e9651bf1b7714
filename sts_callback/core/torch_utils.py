"""Small facts about a model and its tokenizer that every pass needs, written once."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live; the CPU for a model without parameters."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS (never counted), else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def rng_state() -> dict[str, Any]:
    """The process's random generators: torch (and CUDA's, once initialised), Python's ``random``, numpy's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_kept() -> Iterator[None]:
    """The random generators as they were on entry, whatever the block draws or seeds: a measurement must not
    change the training run's dropout masks or data order."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


__all__ = ["model_device", "pad_token_id", "rng_kept", "rng_state", "set_rng_state"]
