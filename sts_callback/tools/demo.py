"""The end-to-end demo: a real model (Gemma 3 270M, offline), an SAE trained once and cached, real text
domains, a forecast, and (when training is requested) a short fine-tuning run with the callback."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .models import default_cache_dir

DEMO_LAYER = 12  # 2/3 of Gemma 3 270M's 18 layers
DEMO_SAE_TOKENS = 60_000  # ~3 min of activation collection on 2 CPU cores; FVU ~0.36
DEMO_SOURCE = "python_code"
DEMO_TARGETS = ("python_code", "cpp_code", "ml_docs", "math", "python_reference", "legal", "readme_prose",
                "changelog", "markup")
SAE_DOMAINS = ("python_code", "cpp_code", "python_reference", "legal", "math", "ml_docs", "readme_prose",
               "changelog", "nlp_tutorials", "chat_templates", "markup")


def demo_sae_path(d_sae: int, k: int, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "sae" / f"gemma-3-270m-L{DEMO_LAYER}-w{d_sae}-k{k}"


def ensure_demo_sae(model, tokenizer, *, d_sae: int = 4096, k: int = 32, tokens: int = DEMO_SAE_TOKENS,
                    log=print) -> Path:
    """Train the demo SAE on a mix of the built-in domains once; later runs reuse the cached folder."""
    from ..core.corpora import load_domain
    from .train_sae import train_sae

    path = demo_sae_path(d_sae, k)
    if (path / "cfg.json").exists():
        log(f"SAE: cached at {path}")
        return path
    texts: list[str] = []
    per_domain = [load_domain(name) for name in SAE_DOMAINS]
    for i in range(max(len(d) for d in per_domain)):  # interleave so every domain is represented
        texts.extend(d[i] for d in per_domain if i < len(d))
    log(f"SAE: training a TopK SAE (width {d_sae}, k={k}) at layer {DEMO_LAYER} on {tokens} tokens of "
        f"{len(SAE_DOMAINS)} domains (once; cached in {path})")
    trained = train_sae(model, tokenizer, texts, DEMO_LAYER, d_sae=d_sae, k=k, training_tokens=tokens,
                        max_length=128, output_dir=path, progress=True)
    log(f"SAE: fraction of variance unexplained {trained.fvu:.3f}, dead latents {trained.dead_fraction:.1%}, "
        f"{trained.seconds:.0f} s")
    return path


def run_demo(output_dir: Path = Path("outputs/demo"), quick: bool = False, train_steps: int | None = None,
             log=print) -> dict:
    """Run the demo and return a summary dict (also written to ``output_dir/demo_summary.json``)."""
    from ..core.config import STSConfig
    from ..core.corpora import load_domain
    from ..pipelines.forecast import forecast
    from .models import load_gemma3_270m

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"quick": quick}
    t0 = time.perf_counter()
    log("== sts-callback demo: Gemma 3 270M (offline), real text domains ==")
    model, tokenizer = load_gemma3_270m()
    summary["model_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"model: Gemma 3 270M loaded in {summary['model_seconds']} s")

    t0 = time.perf_counter()
    sae_path = ensure_demo_sae(model, tokenizer, log=log)
    summary["sae_seconds"] = round(time.perf_counter() - t0, 1)
    summary["sae"] = str(sae_path)

    # The "training set": half of the Python code domain; its other half is a target (a sanity check:
    # the domain a model is trained on should be among the most affected).
    source = load_domain(DEMO_SOURCE)
    train_texts = source[0::2]
    targets = {name: (source[1::2] if name == DEMO_SOURCE else load_domain(name)) for name in DEMO_TARGETS}
    config = STSConfig(
        n_shifted=100,
        shift_tokens=2_000 if quick else 4_000,
        domain_tokens=800 if quick else 1_500,
        n_domain_demonstrations=3,
        max_query_tokens=128,
        max_demonstration_tokens=128,
        batch_size=8,
    )
    log(f"forecast: training on {DEMO_SOURCE!r} ({len(train_texts)} texts); {len(targets)} target domains; "
        f"{config.shift_tokens} shift tokens, {config.domain_tokens} tokens per domain")
    result = forecast(model, tokenizer, sae_path, train_texts, targets, config, progress=True)
    log("")
    log(result.table())
    path = result.save(output_dir / "forecast.json")
    summary["forecast_seconds"] = round(result.timings["total"], 1)
    summary["forecast_tokens_per_second"] = round(result.tokens_per_second, 1)
    summary["forecast_ranking"] = result.ranked()
    log(f"\nforecast: {result.timings['total']:.0f} s, {result.tokens_per_second:.0f} tokens/s through layer "
        f"{DEMO_LAYER} + SAE; written to {path}")

    if train_steps != 0:
        summary["training"] = run_training_demo(model, tokenizer, sae_path, train_texts, output_dir,
                                                steps=train_steps or (2 if quick else 4), log=log)
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_training_demo(model, tokenizer, sae_path: Path, train_texts: list[str], output_dir: Path, *, steps: int,
                      log=print) -> dict:
    """A short LoRA SFT run (TRL) with STSCallback: forecast at start, re-checks at the checkpoints."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..integrations.callback import STSCallback

    log(f"\n== training: {steps} LoRA SFT steps on {DEMO_SOURCE!r} with STSCallback (re-check every "
        f"{max(steps // 2, 1)} steps) ==")
    sts = STSCallback(
        sae=str(sae_path),
        target_domains=["python_code", "math", "legal", "readme_prose"],
        protected=["legal"],
        config={"shift_tokens": 1500, "domain_tokens": 600, "n_domain_demonstrations": 2,
                "max_query_tokens": 96, "max_demonstration_tokens": 96},
        recheck_tokens=512, loss_tokens=256, tolerance=0.05,
    )
    run_dir = output_dir / "sft"
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(run_dir), max_steps=steps, save_steps=max(steps // 2, 1), logging_steps=1,
                       per_device_train_batch_size=4, max_length=64, learning_rate=1e-3, use_cpu=True,
                       report_to=[], save_strategy="steps", disable_tqdm=True),
        train_dataset=Dataset.from_dict({"text": train_texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[sts],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    recheck_seconds = sum(r.get("seconds", 0.0) for r in sts.history)
    for record in sts.history:
        if "error" in record:
            log(f"step {record['step']}: re-check failed: {record['error']}")
            continue
        deltas = ", ".join(f"{k} {v:+.2%}" for k, v in record["loss_delta"].items())
        log(f"step {record['step']}: {record['overlap_with_forecast']}/100 shifted latents as forecast; "
            f"held-out loss change: {deltas}")
    log(f"training: {seconds:.0f} s in all, of which re-checks {recheck_seconds:.0f} s; history in "
        f"{run_dir / 'sts' / 'history.jsonl'}")
    return {"seconds": round(seconds, 1), "recheck_seconds": round(recheck_seconds, 1),
            "history": [{k: v for k, v in r.items() if k in ("step", "overlap_with_forecast", "loss_delta", "error")}
                        for r in sts.history]}
