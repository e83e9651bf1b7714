"""Each target domain's reward affinity for ``rl.py``'s GRPO runs: the mean reward the run's own reward functions give
to pieces of the domain's texts scored as completions of the run's prompts
(``sts_callback.pipelines.rollouts.reward_affinity``; no model, only the tokenizer). GRPO moves the policy toward its
high-reward completions, so a domain the reward favours should be hurt less: the feature carries which way the
reward points, which the rollouts' SAE shift has not been shown to (``rl_vs_sft.py``'s tables in the README).

One JSON per run in ``benchmarks/transfer/rl_affinity/`` (seconds a run); ``rl_vs_sft.py --affinity`` reads them.

    python benchmarks/transfer/rl_affinity.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl_affinity"
sys.path.insert(0, str(HERE))
import rl  # noqa: E402
import rl_icl  # noqa: E402
import units  # noqa: E402


def main() -> None:
    from sts_callback.core.config import STSConfig
    from sts_callback.core.data import load_domains
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.pipelines.rollouts import reward_affinity
    from sts_callback.tools.models import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    texts = units.domain_texts(units.UNITS)
    sz = rl.sizes(False)
    for name in rl_icl.planned():
        spec = rl.RUNS[name]
        s = sz["grpo"][spec.get("size", spec["task"])]
        train_texts, targets = units.split(spec["source"], texts)
        word_texts = texts[spec["reward_domain"]][0::2] if "reward_domain" in spec else None
        built = rl.keywords_task(tokenizer, train_texts, s, spec["rewards"], word_texts)
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
