"""GRPOTrainer with a simple verifiable reward and STSCallback re-checking at checkpoints (Gemma 3 270M).

    python examples/grpo_trl.py [--steps 4] [--output outputs/grpo_trl]

Here the forecast uses explicit demonstrations (worked additions); without them the callback samples the
policy's own rollouts, scores them with the reward function and forecasts from the reward-weighted difference
of their high- and low-reward completions (``shift="auto"``: ``"reward_weighted"``; ``"reward_filtered"``
forecasts from the above-mean ones as demonstrations). The re-checks (actual shift, held-out losses) run either
way.
"""

import argparse
import random
import re
import time

from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from sts_callback.integrations.callback import STSCallback
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.tools.models import load_gemma3_270m


def addition_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"Question: what is {a} + {b}?\nAnswer:", "answer": str(a + b)})
    return rows


def sum_reward(completions, answer, **kwargs) -> list[float]:
    """A verifiable reward with partial credit: 1 when the first number in the completion is the right sum, less
    the further it is off, 0 without a number. All-or-nothing credit gives a base model that never adds right 0 for
    every completion of a prompt: no advantage, no gradient, nothing trained (the callback says so)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = re.search(r"-?\d+", completion)
        rewards.append(max(0.0, 1.0 - abs(int(found.group()) - int(expected)) / int(expected)) if found else 0.0)
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--output", default="outputs/grpo_trl")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m()
    sae_path = ensure_demo_sae(model, tokenizer)
    rows = addition_prompts(64)
    demonstrations = [{"prompt": r["prompt"], "completion": " " + r["answer"]} for r in addition_prompts(32, seed=1)]
    sts = STSCallback(
        sae=str(sae_path),
        target_domains=["math", "python_code", "legal"],
        protected=["legal"],
        demonstrations=demonstrations,
        config={"shift_tokens": 600, "domain_tokens": 400, "n_domain_demonstrations": 2,
                "max_query_tokens": 64, "max_demonstration_tokens": 64},
        recheck_tokens=256, loss_tokens=192,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=sum_reward,
        args=GRPOConfig(output_dir=args.output, max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
                        per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                        learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="steps",
                        activation_checkpointing=False),  # 270M: no memory to save (TRL's default calls old APIs)
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[sts],
    )
    start = time.perf_counter()
    trainer.train()
    print(f"\nGRPO with STS: {time.perf_counter() - start:.0f} s; results in {args.output}/sts/")


if __name__ == "__main__":
    main()
