"""How early does the callback's early forecast become reliable? One row per re-check of a transfer run.

    python benchmarks/transfer/run.py --sources chat_templates --seeds 0 --recheck-every 2 --loss-tokens 512 \
        --icl-tokens 0 --work outputs/transfer-early --out benchmarks/transfer/early_trajectory.json
    python benchmarks/transfer/early.py --transfer benchmarks/transfer/early_trajectory.json

For every re-check (share f of the learning-rate schedule's area spent): the measured changes extrapolated to
the end of training, linearly (change / f) and with the exponent fitted on the run's own re-checks so far (as
the callback does), against the change measured at the end: Pearson r over the other domains and over all
targets, share of the other domains whose direction is right, mean absolute error (NLL %).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sts_callback.scoring.calibration import early_forecast, fitted_exponent
from sts_callback.validation.validate import correlation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfer", default="benchmarks/transfer/early_trajectory.json")
    parser.add_argument("--out", default="benchmarks/transfer/early.json")
    args = parser.parse_args()
    transfer = json.loads(Path(args.transfer).read_text())
    out = []
    for run in transfer["runs"]:
        for seed in run["per_seed"]:
            final = seed["nll_delta_rel"]
            others = [d for d in final if d != run["source"]]
            points = []
            print(f"\n{run['source']} (seed {seed['seed']}): early forecast vs the change measured at the end")
            print(f"{'step':>5} {'lr area':>8} {'b':>5}  {'r others':>9} {'r all':>7} {'direction':>10} "
                  f"{'MAE %':>6}   {'r others (b=1)':>15} {'MAE % (b=1)':>12}")
            for point in seed["trajectory"][:-1]:
                f, measured = point["lr_area_fraction"], point["nll_delta_rel"]
                points.append((f, measured))
                b = fitted_exponent(points) or 1.0
                rows = {}
                for label, exponent in (("fitted", b), ("linear", 1.0)):
                    early = early_forecast(measured, f, exponent)
                    rows[label] = {
                        "r_others": correlation([early[d] for d in others], [final[d] for d in others], "pearson",
                                                n_resamples=0)["r"],
                        "r_all": correlation([early[d] for d in final], [final[d] for d in final], "pearson",
                                             n_resamples=0)["r"],
                        "direction": float(np.mean([np.sign(early[d]) == np.sign(final[d]) for d in others])),
                        "mae": float(np.mean([abs(early[d] - final[d]) for d in final])),
                    }
                out.append({"source": run["source"], "seed": seed["seed"], "step": point["step"], "fraction": f,
                            "exponent": b, **rows})
                fit, lin = rows["fitted"], rows["linear"]
                print(f"{point['step']:>5} {f:>8.0%} {b:>5.2f}  {fit['r_others']:>+9.2f} {fit['r_all']:>+7.2f} "
                      f"{fit['direction']:>10.0%} {100 * fit['mae']:>6.2f}   {lin['r_others']:>+15.2f} "
                      f"{100 * lin['mae']:>12.2f}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
