"""Run by tests/test_distributed_session.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):

    python tests/distributed_session_worker.py MODE OUT     MODE: session | resume_elsewhere

session: ``STSSession`` in a hand-written DDP loop, constructed as the README shows (no ``is_main``).
resume_elsewhere: a run resumed from another run's checkpoint into a new ``output_dir`` while rank 0's copy of
the origin's files is slow (a shared file system), so that a rank reading them itself would read too early.
Each rank writes ``OUT/rank<r>.json``: its results and the files it wrote under an STS folder.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import TinySAE, domain_texts, make_model, make_tokenizer, record_sts_writes  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments  # noqa: E402

from sts_callback import GuardConfig, RecheckConfig, STSConfig, STSSession  # noqa: E402
from sts_callback.core import run_store  # noqa: E402
from sts_callback.core.data import load_corpus, load_domains  # noqa: E402
from sts_callback.integrations.callback import STSCallback  # noqa: E402

MODE, OUT = sys.argv[1], Path(sys.argv[2])
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
DOMAINS = {"law": domain_texts("law", 7), "food": domain_texts("food", 5), "chem": domain_texts("chem", 9)}
PROBE = domain_texts("law", 11, seed=3)
CONFIG = dict(n_shifted=8, shift_tokens=150, domain_tokens=60, n_domain_demonstrations=2, batch_size=3)
TRAIN_TEXT = "the court judge law contract statute appeal ."
written = record_sts_writes()


def session_loop() -> dict:
    dist.init_process_group("gloo")
    tokenizer, model = make_tokenizer(), make_model("llama")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    session = STSSession(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), STSConfig(**CONFIG),
                         GuardConfig(protected=["food"]), RecheckConfig(loss_tokens=50, recheck_tokens=90),
                         out=OUT / "run" / "sts")
    probe, domains = load_corpus(PROBE), load_domains(DOMAINS)
    session.prepare(ddp, tokenizer, probe, domains)
    session.start(ddp, probe, domains)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    batch = tokenizer([TRAIN_TEXT] * 2, return_tensors="pt")
    # rank 1 alone fails in its first forward of the step-2 re-check (a CUDA OOM there): through the DDP wrapper
    # (each forward a buffer broadcast) rank 0 waited in its next forward for the rank that had stopped
    failing = {"armed": False}

    def fail_once(module, inputs):
        if failing["armed"] and RANK == 1:
            failing["armed"] = False
            raise RuntimeError("CUDA out of memory (simulated)")

    model.model.layers[0].register_forward_pre_hook(fail_once)
    for step in range(1, 5):
        ddp(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            failing["armed"] = step == 2
            session.recheck(ddp, step, max_steps=4)
    history = OUT / "run" / "sts" / "history.jsonl"
    return {"is_main": session.is_main, "history": [r["step"] for r in session.history],
            "errors": [r.get("error") for r in session.history],
            "file": [json.loads(line)["step"] for line in history.read_text().splitlines()]}


def trainer(output_dir: Path, callback: STSCallback) -> Trainer:
    tokenizer = make_tokenizer()
    data = Dataset.from_dict({"text": [TRAIN_TEXT] * 32}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                                remove_columns=["text"])
    args = TrainingArguments(output_dir=str(output_dir), max_steps=4, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4 // WORLD, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], ddp_backend="gloo", seed=0)
    return Trainer(model=make_model("llama"), args=args, train_dataset=data, processing_class=tokenizer,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[callback])


def callback() -> STSCallback:
    return STSCallback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), target_domains=DOMAINS,
                       train_probe=PROBE, config=CONFIG, recheck_tokens=90, loss_tokens=50, protected=["food"])


def resume_elsewhere() -> dict:
    first = callback()
    trainer(OUT / "origin", first).train()
    adopt = run_store.RunStore.adopt

    def slow_adopt(self, origin, step):  # rank 0's copy lands after the other ranks would have read
        time.sleep(3)
        return adopt(self, origin, step)

    run_store.RunStore.adopt = slow_adopt
    resumed = callback()
    trainer(OUT / "resumed", resumed).train(resume_from_checkpoint=str(OUT / "origin" / "checkpoint-2"))
    return {"origin": [r["step"] for r in first.history], "history": [r["step"] for r in resumed.history],
            "forecast": resumed.forecast is not None, "errors": [r.get("error") for r in resumed.history]}


result = {"session": session_loop, "resume_elsewhere": resume_elsewhere}[MODE]()
result["written"] = sorted({Path(p).name for p in written})
OUT.mkdir(parents=True, exist_ok=True)
(OUT / f"rank{RANK}.json").write_text(json.dumps(result))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
