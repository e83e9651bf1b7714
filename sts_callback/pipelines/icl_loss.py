"""A non-SAE baseline for the signed forecast: each target domain's NLL with training demonstrations in context.

In-context learning as a proxy for fine-tuning, read directly as a loss change: the relative change of the
mean token NLL of a domain's texts when demonstrations drawn from the training data precede them (same query
tokens with and without the context, full forwards with the language-model head). Negative = the training
data helps the domain in context. No SAE is involved. A forecast computes the same number as its
``icl_loss_change`` score (``STSConfig.icl_loss_tokens``), for a calibration that reads it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.config import STSConfig
from ..core.data import load_corpus, load_domains
from .forecast import in_context_loss, prompt_builder


def icl_loss_change(model: nn.Module, tokenizer, train_data: Any, targets: Any, config: STSConfig | dict | None = None,
                    *, tokens: int = 1024, n_demonstrations: int | None = None,
                    batch_size: int | None = None) -> dict[str, float | None]:
    """Relative change of each target domain's NLL when ``n_demonstrations`` training examples are in context.

    ``tokens``: query tokens per domain; ``config``: the forecast's settings (seed, truncation lengths, and by
    default ``n_demonstrations`` and ``batch_size``). Under ``torch.distributed`` each process measures its share.
    """
    config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    config = config.replace(n_demonstrations=n_demonstrations or config.n_demonstrations,
                            batch_size=batch_size or config.batch_size)
    builder = prompt_builder(model, tokenizer, config)
    changes, _ = in_context_loss(model, builder, config, load_corpus(train_data, name="train"),
                                 load_domains(targets), tokens)
    return changes
