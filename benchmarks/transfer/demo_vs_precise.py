"""The demo's calibrated predictions against what the benchmark's own LoRA run on python_code measured.

    python benchmarks/transfer/demo_vs_precise.py [outputs/demo/forecast.json]

Prints, over the domains the demo predicts, the precise final change (4,096 held-out tokens per domain,
``units/precise-lora-python_code-seed0.json``), the prediction, and Pearson r of the two (and against the unit's own
512-token measurement): the numbers the README gives beside the demo's console output.
"""

import json
import sys
from pathlib import Path

from scipy.stats import pearsonr

UNITS = Path(__file__).resolve().parent / "units"


def main() -> None:
    forecast = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo/forecast.json").read_text())
    predicted = {name: p["mean"] for name, p in forecast["predictions"].items()}
    precise = json.loads((UNITS / "precise-lora-python_code-seed0.json").read_text())["nll_delta_rel"]
    short = json.loads((UNITS / "lora-python_code-seed0.json").read_text())["result"]["nll_delta_rel"]
    domains = sorted(name for name in predicted if name in precise)
    print(f"{'domain':<18}{'precise':>9}{'predicted':>11}")
    for name in domains:
        print(f"{name:<18}{100 * precise[name]:>+8.1f}%{100 * predicted[name]:>+10.1f}%")
    mean = [predicted[name] for name in domains]
    print(f"Pearson r over {len(domains)} domains: {pearsonr(mean, [precise[n] for n in domains])[0]:+.2f} "
          f"(against the unit's 512-token measurement: {pearsonr(mean, [short[n] for n in domains])[0]:+.2f})")


if __name__ == "__main__":
    main()
