"""The demo's calibrated predictions against what the benchmark's own LoRA run on python_code measured.

    python benchmarks/transfer/demo_vs_precise.py [outputs/demo/forecast.json] [--out benchmarks/transfer/demo_vs_precise.json]

Prints, over the domains the demo predicts, the precise final change (4,096 held-out tokens per domain,
``units/precise-lora-python_code-seed0.json``), the prediction, and Pearson r of the two (and against the unit's own
512-token measurement): the numbers the README gives beside the demo's console output. Writes them, with the
predictions read and the command, to a JSON.
"""

import argparse
import json
import time
from pathlib import Path

from scipy.stats import pearsonr

UNITS = Path(__file__).resolve().parent / "units"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("forecast", nargs="?", default="outputs/demo/forecast.json")
    parser.add_argument("--out", type=Path, default=UNITS.parent / "demo_vs_precise.json")
    args = parser.parse_args()
    forecast = json.loads(Path(args.forecast).read_text())
    predicted = {name: p["mean"] for name, p in forecast["predictions"].items()}
    precise = json.loads((UNITS / "precise-lora-python_code-seed0.json").read_text())["nll_delta_rel"]
    short = json.loads((UNITS / "lora-python_code-seed0.json").read_text())["result"]["nll_delta_rel"]
    domains = sorted(name for name in predicted if name in precise)
    print(f"{'domain':<18}{'precise':>9}{'predicted':>11}")
    for name in domains:
        print(f"{name:<18}{100 * precise[name]:>+8.1f}%{100 * predicted[name]:>+10.1f}%")
    mean = [predicted[name] for name in domains]
    r_precise = float(pearsonr(mean, [precise[n] for n in domains])[0])
    r_short = float(pearsonr(mean, [short[n] for n in domains])[0])
    print(f"Pearson r over {len(domains)} domains: {r_precise:+.2f} (against the unit's 512-token measurement: "
          f"{r_short:+.2f})")
    args.out.write_text(json.dumps({
        "command": f"python benchmarks/transfer/demo_vs_precise.py {args.forecast} --out {args.out}",
        "forecast": args.forecast, "predicted": {n: predicted[n] for n in domains},
        "precise": {n: precise[n] for n in domains}, "pearson_precise": r_precise, "pearson_512": r_short,
        "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
