"""A non-SAE baseline for the signed forecast: each target domain's NLL with training demonstrations in context.

In-context learning as a proxy for fine-tuning, read directly as a loss change: the relative change of the
mean token NLL of a domain's texts when demonstrations drawn from the training data precede them (same query
tokens with and without the context, full forwards with the language-model head). Negative = the training
data helps the domain in context. No SAE is involved.
"""

from __future__ import annotations

import random
from typing import Any

from torch import nn

from ..core.config import STSConfig
from ..core.data import load_corpus, load_domains
from .forecast import build_shift_pairs, inference_mode, prompt_builder
from .monitor import nll_sums
from ..core.torch_utils import pad_token_id


def icl_loss_change(model: nn.Module, tokenizer, train_data: Any, targets: Any, config: STSConfig | dict | None = None,
                    *, tokens: int = 1024, n_demonstrations: int | None = None, batch_size: int = 4) -> dict[str, float]:
    """Relative change of each target domain's NLL when ``n_demonstrations`` training examples are in context.

    ``tokens``: query tokens per domain; ``config``: the forecast's settings (seed, truncation lengths).
    """
    config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    train = load_corpus(train_data, name="train")
    domains = load_domains(targets)
    builder = prompt_builder(model, tokenizer, config)
    pad = pad_token_id(builder.tokenizer)  # a processor's tokenizer
    out = {}
    with inference_mode(model):
        for name, corpus in domains.items():
            rng = random.Random(f"{config.seed}:icl-loss:{name}")
            pairs, _ = build_shift_pairs(corpus, builder, config, rng, tokens,
                                         n_demonstrations or config.n_demonstrations, demonstrations=train)
            # p.counted flags the query, the last n_query tokens of both sequences
            alone, n_alone = nll_sums(model, [(p.base, p.counted) for p in pairs], pad, batch_size)
            context, n_context = nll_sums(model, [(p.context, p.counted) for p in pairs], pad, batch_size)
            before = alone / max(n_alone, 1)
            out[name] = (context / max(n_context, 1) - before) / before if before else 0.0
    return out
