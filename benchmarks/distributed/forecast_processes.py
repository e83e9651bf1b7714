"""One process against two: does the callback's train-start forecast on the real model come out the same?

    python benchmarks/distributed/forecast_processes.py [--out benchmarks/distributed/forecast_processes.json]

Runs ``examples/sft_trl.py --steps 2 --save-steps 2`` (Gemma 3 270M, LoRA, the demo SAE) in one process, then under
``torchrun --nproc_per_node 2`` with DDP and with DeepSpeed ZeRO-2 (``examples/ds_zero2.json``), on CPU (gloo), and
compares each two-process ``sts/forecast.json`` with the one-process one: shifted latents in common, the largest
relative difference of any score, each domain's STS_icl, and the SAE's fit on the training rows (the residuals
themselves). Writes a JSON with the commands run and the comparisons, and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sft_trl.py"
RUNS = {"one process": [], "DDP, 2 processes": ["torchrun"],
        "ZeRO-2, 2 processes": ["torchrun", "--deepspeed", str(ROOT / "examples" / "ds_zero2.json")]}


def command(kind: list[str], output: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                if kind[:1] == ["torchrun"] else [sys.executable])
    return [*launcher, str(EXAMPLE), "--steps", "2", "--save-steps", "2", "--output", str(output), *kind[1:]]


def compare(reference: dict, other: dict) -> dict:
    worst = max(abs(other["domains"][d]["scores"][k] - v) / abs(v) for d in reference["domains"]
                for k, v in reference["domains"][d]["scores"].items()
                if isinstance(v, float) and v and isinstance(other["domains"][d]["scores"].get(k), float))
    return {"shifted_latents_in_common": len(set(reference["shifted_latents"]) & set(other["shifted_latents"])),
            "shifted_latents": len(reference["shifted_latents"]),
            "largest_relative_score_difference": worst,
            "sts_icl": {d: [reference["domains"][d]["scores"]["sts_icl"], other["domains"][d]["scores"]["sts_icl"]]
                        for d in reference["domains"]},
            "sae_fit_fvu": [reference["settings"].get("sae_fit", {}).get("fvu"),
                            other["settings"].get("sae_fit", {}).get("fvu")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "distributed" / "forecast_processes.json")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    forecasts, commands, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        for label, kind in RUNS.items():
            output = Path(work) / label.split(",")[0].replace(" ", "_")
            commands[label] = command(kind, output)
            began = time.perf_counter()
            done = subprocess.run(commands[label], env=env, capture_output=True, text=True)
            seconds[label] = time.perf_counter() - began
            if done.returncode != 0:
                raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
            forecasts[label] = json.loads((output / "sts" / "forecast.json").read_text())
    reference = forecasts["one process"]
    comparisons = {label: compare(reference, forecasts[label]) for label in RUNS if label != "one process"}
    print(f"{'against one process':<22}{'latents in common':>18}{'largest score diff':>20}{'SAE FVU':>22}")
    for label, found in comparisons.items():
        fvu = found["sae_fit_fvu"]
        print(f"{label:<22}{found['shifted_latents_in_common']:>12} of {found['shifted_latents']:<3}"
              f"{found['largest_relative_score_difference']:>20.2e}{fvu[1]:>14.5f} ({fvu[0]:.5f})")
    command_line = "python benchmarks/distributed/forecast_processes.py" + (
        f" --out {args.out}" if args.out != parser.get_default("out") else "")
    args.out.write_text(json.dumps({"command": command_line, "runs": commands, "seconds": seconds,
                                    "comparisons": comparisons, "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
