"""Small facts about a model and its tokenizer that every pass needs, written once."""

from __future__ import annotations

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


__all__ = ["model_device", "pad_token_id"]
