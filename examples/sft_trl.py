"""SFTTrainer + LoRA + STSCallback on Gemma 3 270M (offline), small enough for a CPU in minutes.

    python examples/sft_trl.py [--steps 6] [--output outputs/sft_trl] [--full]

Distributed, unchanged script (see the README's "Distributed training" section):
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/sft_trl.py
    torchrun --nproc_per_node 2 examples/sft_trl.py --deepspeed examples/ds_zero2.json
    torchrun --nproc_per_node 2 examples/sft_trl.py --deepspeed examples/ds_zero3.json --full
    accelerate launch --config_file examples/fsdp.yaml examples/sft_trl.py --full

The only STS-specific lines are the STSCallback construction and `callbacks=[...]`.
"""

import argparse
import time

import torch

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sts_callback.integrations.callback import STSCallback
from sts_callback.core.corpora import load_domain
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.tools.models import load_gemma3_270m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--output", default="outputs/sft_trl")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (examples/ds_zero2.json, ds_zero3.json)")
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m()
    training_args = SFTConfig(
        output_dir=args.output, max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
        per_device_train_batch_size=4, max_length=64, learning_rate=1e-5 if args.full else 1e-3,
        use_cpu=not torch.cuda.is_available(), ddp_backend=None if torch.cuda.is_available() else "gloo",
        deepspeed=args.deepspeed, report_to=[], save_strategy="steps",
    )
    with training_args.main_process_first(desc="demo SAE"):  # rank 0 trains and caches it, the others read it
        sae_path = ensure_demo_sae(model, tokenizer)
    train = Dataset.from_dict({"text": load_domain("python_code")[0::2]})

    sts = STSCallback(
        sae=str(sae_path),
        target_domains=["python_code", "math", "legal", "readme_prose"],  # built-in offline domains
        protected=["legal"],
        config={"shift_tokens": 1500, "domain_tokens": 600, "n_domain_demonstrations": 2,
                "max_query_tokens": 96, "max_demonstration_tokens": 96},
        recheck_tokens=512, loss_tokens=256, tolerance=0.05, early_stop=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=None if args.full else LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[sts],
    )
    start = time.perf_counter()
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    print(f"\ntraining with STS: {time.perf_counter() - start:.0f} s; results in {args.output}/sts/")
    for record in sts.history:
        deltas = ", ".join(f"{k} {v:+.2%}" for k, v in record.get("loss_delta", {}).items())
        print(f"step {record['step']}: overlap with forecast {record.get('overlap_with_forecast')}/100; "
              f"held-out loss change: {deltas}")


if __name__ == "__main__":
    main()
