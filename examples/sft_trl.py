"""SFTTrainer + LoRA + STSCallback on Gemma 3 270M (offline), small enough for a CPU in minutes.

    python examples/sft_trl.py [--steps 6] [--output outputs/sft_trl] [--full] [--lookahead]

--lookahead adds the run-level term (1 real optimizer step at train start, put back exactly) and the built-in
calibration `gemma3-270m-lora-lookahead-icl`, the benchmark's best step-0 forecast: a predicted change of each
domain's held-out loss before training, from how far that step moves the training data's own texts, each domain's
usual departure, a signed SAE score and each domain's loss with training texts in context (LoRA runs only).

Distributed, unchanged script (see the README's "Distributed training" section):
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/sft_trl.py
    torchrun --nproc_per_node 2 examples/sft_trl.py --deepspeed examples/ds_zero2.json
    torchrun --nproc_per_node 2 examples/sft_trl.py --deepspeed examples/ds_zero3.json --full
    accelerate launch --config_file examples/fsdp.yaml examples/sft_trl.py --full

The only STS-specific lines are the STSCallback construction and `callbacks=[...]`.
"""

import argparse
import os
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
    parser.add_argument("--lookahead", action="store_true",
                        help="run-level term + the built-in calibration gemma3-270m-lora-lookahead-icl (LoRA)")
    # the `deepspeed` launcher passes each process its --local_rank (torchrun and accelerate set LOCAL_RANK instead)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lookahead and args.full:  # before the model and the SAE (minutes the first time)
        parser.error("--lookahead: the built-in calibration is fitted on LoRA runs; drop --full")

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch / deepspeed
    model, tokenizer = load_gemma3_270m()
    training_args = SFTConfig(
        output_dir=args.output, max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
        per_device_train_batch_size=4, max_length=64, learning_rate=1e-5 if args.full else 1e-3,
        # gloo only under a launcher on CPU: set for one plain process, accelerate asks for a process group
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if launched and not torch.cuda.is_available() else None,
        deepspeed=args.deepspeed, report_to=[], save_strategy="steps",
        activation_checkpointing=False,  # 270M: no memory to save (TRL's default calls deprecated APIs)
    )
    with training_args.main_process_first(desc="demo SAE"):  # rank 0 trains and caches it, the others read it
        sae_path = ensure_demo_sae(model, tokenizer)
    train = Dataset.from_dict({"text": load_domain("python_code")[0::2]})

    # with the calibration, the training data's own domain stays out of the targets (as it was fitted)
    domains = ["math", "legal", "readme_prose", "nlp_tutorials"] if args.lookahead else [
        "python_code", "math", "legal", "readme_prose"]  # built-in offline domains
    calibrated = dict(run_level="lookahead", calibration="gemma3-270m-lora-lookahead-icl") if args.lookahead else {}
    sts = STSCallback(
        sae=str(sae_path),
        target_domains=domains,
        protected=["legal"],
        # the lengths the built-in calibration's in-context change was measured with (another is warned about)
        config={"shift_tokens": 1500, "domain_tokens": 600, "n_domain_demonstrations": 2,
                "max_query_tokens": 128, "max_demonstration_tokens": 128},
        recheck_tokens=512, loss_tokens=256, tolerance=0.05, early_stop=False, **calibrated,
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
    if sts.session.run_level is not None:
        level = sts.session.run_level
        print(f"run-level term: {level['steps']} lookahead step{'s' * (level['steps'] != 1)} moved the training "
              "data's own texts "
              f"{level['own_change']:+.2%} ({level['seconds']:.0f} s); predicted before training: "
              + ", ".join(f"{name} {p['mean']:+.1%}" for name, p in sts.predicted.items()))
    for record in sts.history:
        deltas = ", ".join(f"{k} {v:+.2%}" for k, v in record.get("loss_delta", {}).items())
        print(f"step {record['step']}: overlap with forecast {record.get('overlap_with_forecast')}/100; "
              f"held-out loss change: {deltas}")


if __name__ == "__main__":
    main()
