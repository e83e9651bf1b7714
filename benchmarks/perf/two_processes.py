"""Forecast extraction with 2 processes vs 1 on the same tokens (Gemma 3 270M, demo SAE, CPU or GPU).

    python benchmarks/perf/two_processes.py [--shift-tokens 2000] [--domain-tokens 500]

Launches itself once plainly and once under ``torchrun --nproc_per_node 2``; prints a table (seconds,
tokens/s, speedup, largest relative score difference) and writes ``benchmarks/perf/two_processes.json``.
On CPU each of the two processes gets half the cores (OMP_NUM_THREADS), so the speedup shows the
overhead of splitting rather than extra hardware.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DOMAINS = ["python_code", "math", "legal", "readme_prose"]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from sts_callback.core.corpora import load_domain
    from sts_callback.tools.demo import demo_sae_path
    from sts_callback.pipelines.forecast import forecast
    from sts_callback.tools.models import load_gemma3_270m

    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    model, tokenizer = load_gemma3_270m()
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    config = {"shift_tokens": args.shift_tokens, "domain_tokens": args.domain_tokens, "n_domain_demonstrations": 2,
              "max_query_tokens": 128, "max_demonstration_tokens": 128, "top_contexts": 0}
    start = time.perf_counter()
    result = forecast(model, tokenizer, str(demo_sae_path(4096, 32)), load_domain("python_code")[1::2],
                      {name: name for name in DOMAINS}, config)
    seconds = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "forward_tokens": result.timings["forward_tokens"],
                                              "forecast": result.to_dict()}))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shift-tokens", type=int, default=2000)
    parser.add_argument("--domain-tokens", type=int, default=500)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from sts_callback.core.corpora import load_domain  # noqa: F401 - fail early when the package is missing
    from sts_callback.tools.demo import ensure_demo_sae
    from sts_callback.tools.models import load_gemma3_270m

    ensure_demo_sae(*load_gemma3_270m())  # cached once, outside the timed runs
    cores = os.cpu_count() or 2
    runs = {}
    common = [str(HERE), "--worker", "--shift-tokens", str(args.shift_tokens), "--domain-tokens", str(args.domain_tokens)]
    for processes in (1, 2):
        out = HERE.with_name(f".two_processes_{processes}.json")
        launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes)), "HF_HUB_OFFLINE": "1"}
        subprocess.run([*launcher, *common, "--out", str(out)], check=True, env=env)
        runs[processes] = json.loads(out.read_text())
        out.unlink()
    one, two = runs[1], runs[2]
    worst = 0.0
    for name, domain in one["forecast"]["domains"].items():
        for variant, value in domain["scores"].items():
            if value is not None:
                other = two["forecast"]["domains"][name]["scores"][variant]
                worst = max(worst, abs(value - other) / max(abs(value), 1e-12))
    same_latents = one["forecast"]["shifted_latents"] == two["forecast"]["shifted_latents"]
    table = {
        "processes_1_seconds": round(one["seconds"], 2), "processes_2_seconds": round(two["seconds"], 2),
        "forward_tokens": one["forward_tokens"], "tokens_per_s_1": round(one["forward_tokens"] / one["seconds"], 1),
        "tokens_per_s_2": round(two["forward_tokens"] / two["seconds"], 1),
        "speedup": round(one["seconds"] / two["seconds"], 3), "max_relative_score_difference": worst,
        "same_shifted_latents": same_latents, "cores": cores,
        "device": "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu", "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'processes':>9}  {'seconds':>8}  {'tokens/s':>9}")
    print(f"{1:>9}  {one['seconds']:>8.1f}  {table['tokens_per_s_1']:>9}")
    print(f"{2:>9}  {two['seconds']:>8.1f}  {table['tokens_per_s_2']:>9}")
    print(f"speedup {table['speedup']}x; largest relative score difference {worst:.2e}; "
          f"same shifted latents: {same_latents}")
    HERE.with_suffix(".json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
