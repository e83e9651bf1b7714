"""Peak memory of the callback with a wide SAE: a tiny model (d_in 32) read by a 65,536-latent SAE, an 8k-token
re-check probe, two training steps with a re-check at the end. One latent tensor of the whole probe would be
8,194 x 65,536 x 4 bytes = 2.1 GB; the encodes run in chunks sized by the width (core.extract.encode_chunk_rows),
so the peak should stay far below that.

    python benchmarks/perf/wide_sae_memory.py            # prints a table, writes wide_sae_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the tests' tiny model, tokenizer and SAE


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--recheck-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(HERE / "wide_sae_memory.json"))
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from tiny import TinySAE, domain_texts, make_model, make_tokenizer
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from sts_callback.integrations.callback import STSCallback

    torch.set_num_threads(1)

    class DecodingSAE(TinySAE):  # sae-lens SAEs decode, so the re-check measures their fit too
        def decode(self, latents):
            return latents @ self.W_dec + self.b_dec

    peaks: dict[str, float] = {"before": peak_rss_mb()}

    class Peaks(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):  # runs after the STS callback's train start
            peaks["train_start"] = peak_rss_mb()

    tokenizer = make_tokenizer()
    data = Dataset.from_dict({"text": domain_texts("law", 3000, length=24)}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    callback = STSCallback(sae=DecodingSAE(32, args.width, hook_name="blocks.1.hook_resid_post"),
                           target_domains={d: domain_texts(d, 300, length=24) for d in ("law", "food")},
                           config=dict(n_shifted=100, shift_tokens=500, domain_tokens=300, n_domain_demonstrations=2),
                           recheck_tokens=args.recheck_tokens, loss_tokens=200, recheck_steps=2)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=make_model("llama"), train_dataset=data, processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          args=TrainingArguments(output_dir=out, max_steps=2, use_cpu=True, report_to=[],
                                                 per_device_train_batch_size=4, save_strategy="no",
                                                 disable_tqdm=True),
                          callbacks=[callback, Peaks()])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    record = callback.history[-1]
    probe = int(record["sae_fit"]["tokens"]) if record.get("sae_fit") else None
    result = {"width": args.width, "recheck_tokens": args.recheck_tokens, "probe_tokens": probe,
              "whole_probe_latents_mb": probe * args.width * 4 / 2 ** 20 if probe else None,
              "peak_rss_mb": {**peaks, "end": peak_rss_mb()}, "seconds": seconds,
              "recheck_seconds": record.get("seconds"), "torch": torch.__version__}
    print(f"{'width':>7} {'probe tokens':>13} {'one [probe x width] tensor':>27} {'peak RSS start':>15} "
          f"{'peak RSS end':>13} {'run':>7}")
    print(f"{args.width:>7} {probe:>13} {result['whole_probe_latents_mb']:>24.0f} MB "
          f"{result['peak_rss_mb']['train_start']:>12.0f} MB {result['peak_rss_mb']['end']:>10.0f} MB "
          f"{seconds:>6.1f}s")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
