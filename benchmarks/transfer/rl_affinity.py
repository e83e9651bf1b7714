"""Each target domain's reward affinity for ``rl.py``'s GRPO runs: the mean reward the run's own reward functions give
to pieces of the domain's texts scored as completions of the run's prompts
(``reward_affinity`` below; no model, only the tokenizer). GRPO moves the policy toward its
high-reward completions, so a domain the reward favours should be hurt less: the feature carries which way the
reward points, which the rollouts' SAE shift has not been shown to (``rl_vs_sft.py``'s tables in the README).

One JSON per run in ``benchmarks/transfer/rl_affinity/`` (seconds a run); ``rl_vs_sft.py --affinity`` reads them.

    python benchmarks/transfer/rl_affinity.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl_affinity"
sys.path.insert(0, str(HERE))
import rl  # noqa: E402
import rl_icl  # noqa: E402
import units  # noqa: E402


def reward_affinity(tokenizer, prompts: Any, reward_funcs: Any, domains: dict, config, settings: Any = None, *,
                    builder) -> dict[str, float | None]:
    """Each target domain's mean reward when pieces of its own texts are scored as completions of the training
    prompts, the reward functions combined as GRPO combines them (weighted sum): how much the rewards favour what
    the domain's text reads like. GRPO moves the policy toward its high-reward completions, so a domain the rewards
    favour is one training should hurt less. Pieces of the rollouts' length (:func:`completion_budget`), up to
    ``config.domain_tokens`` tokens of each domain's texts (their first ``max_query_tokens``), each paired with a
    prompt of the forecast's draw (:func:`draw_prompts`, in turn); no model involved. ``None`` for a domain none of
    whose pieces every function scored (a function returning None)."""
    from sts_callback.core.data import is_messages
    from sts_callback.pipelines.rollouts import (RolloutSettings, check_reward_funcs, completion_budget, draw_prompts,
                                                 prompt_records, score_completions)

    settings = RolloutSettings.from_args(settings) if settings is not None else RolloutSettings()
    funcs = check_reward_funcs(reward_funcs)
    weights = [float(w) for w in settings.reward_weights] if settings.reward_weights is not None else [1.0] * len(funcs)
    records = prompt_records(prompts)
    chosen = [records[i] for i in draw_prompts(len(records), config)]
    length = completion_budget(settings, config)
    out: dict[str, float | None] = {}
    for name, corpus in domains.items():
        pieces: list[list[int]] = []
        for example in corpus:
            ids, counted = builder.single(example)
            text_ids = [t for t, c in zip(ids, counted) if c]
            pieces += [text_ids[i:i + length] for i in range(0, len(text_ids) - length + 1, length)]
            if len(pieces) * length >= config.domain_tokens:
                break
        pieces = pieces[:max(1, config.domain_tokens // length)]
        if not pieces:
            out[name] = None
            continue
        texts = tokenizer.batch_decode(pieces, skip_special_tokens=True)
        paired = [chosen[i % len(chosen)] for i in range(len(pieces))]
        completions = [[{"role": "assistant", "content": t}] if is_messages(r["prompt"]) else t
                       for t, r in zip(texts, paired)]
        columns = {k: [r.get(k) for r in paired] for k in {k for r in paired for k in r}
                   if k not in ("prompt", "completion", "completion_ids")}
        rewards = score_completions(funcs, [r["prompt"] for r in paired], completions, pieces, columns)
        totals = [sum(w * v for w, v in zip(weights, row)) for row in rewards if all(v is not None for v in row)]
        out[name] = sum(totals) / len(totals) if totals else None
    return out


def main() -> None:
    from sts_callback.core.config import STSConfig
    from sts_callback.core.data import load_domains
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.tools.models import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    texts = units.domain_texts(units.UNITS)
    sz = rl.sizes(False)
    for name in rl_icl.planned():
        spec, s, targets, built = rl_icl.keyword_run(name, tokenizer, texts, sz)
        config = STSConfig(**sz["forecast"])
        start = time.perf_counter()
        affinity = reward_affinity(tokenizer, built["rows"], built["reward_funcs"], load_domains(targets), config,
                                   {"num_generations": s["num_generations"],
                                    "max_completion_length": s["max_completion_length"]},
                                   builder=prompt_builder(model, tokenizer, config))
        units.write_json(OUT / f"{name}.json", {
            "format": "sts-rl-affinity/1", "run": name, "source": spec["source"],
            "reward_domain": spec.get("reward_domain"), "reward_affinity": affinity,
            "domain_tokens": config.domain_tokens, "piece_tokens": s["max_completion_length"],
            "domains_fingerprint": units.fingerprint(texts), "seconds": time.perf_counter() - start})
        print(f"{name}: " + ", ".join(f"{d} {v:.3f}" for d, v in sorted(affinity.items(), key=lambda kv: -kv[1])),
              flush=True)


if __name__ == "__main__":
    main()
