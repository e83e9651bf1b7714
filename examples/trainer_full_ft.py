"""Plain transformers.Trainer, full fine-tune, with STSCallback (Gemma 3 270M, offline, CPU-sized).

    python examples/trainer_full_ft.py [--steps 4] [--output outputs/trainer_full_ft]

For a full fine-tune the callback keeps the base model's residuals of its small training probe (a few MB)
taken at train start, so re-checks compare base and current weights without a second model copy.
"""

import argparse
import time

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from sts_callback.integrations.callback import STSCallback
from sts_callback.core.corpora import load_domain
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.tools.models import load_gemma3_270m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--output", default="outputs/trainer_full_ft")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m()
    sae_path = ensure_demo_sae(model, tokenizer)
    texts = load_domain("legal")
    train = Dataset.from_dict({"text": texts[0::2]}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])

    sts = STSCallback(
        sae=str(sae_path),
        target_domains={"legal_heldout": texts[1::2], "python_code": "python_code", "math": "math"},
        protected=["python_code"],
        train_probe=texts[0::2],  # the raw texts (the trainer's dataset is tokenized)
        config={"shift_tokens": 1500, "domain_tokens": 600, "n_domain_demonstrations": 2,
                "max_query_tokens": 96, "max_demonstration_tokens": 96},
        recheck_tokens=512, loss_tokens=256, early_stop=True, patience=2,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output, max_steps=args.steps, save_steps=args.save_steps,
                               logging_steps=1, per_device_train_batch_size=2, learning_rate=2e-5, use_cpu=True,
                               report_to=[], save_strategy="steps"),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[sts],
    )
    start = time.perf_counter()
    trainer.train()
    print(f"\ntraining with STS: {time.perf_counter() - start:.0f} s; results in {args.output}/sts/")
    if sts.stop_reason:
        print(sts.stop_reason)


if __name__ == "__main__":
    main()
