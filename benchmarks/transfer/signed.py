"""Signed forecasts on the transfer benchmark: every variant and baseline against the measured signed change.

    python benchmarks/transfer/signed.py [--transfer benchmarks/transfer/transfer.json [more.json ...]]
                                         [--out benchmarks/transfer/signed.json]

Several transfer files (e.g. one per seed) are merged source by source.

Reads what ``benchmarks/transfer/run.py`` measured (per source and seed: forecast scores, the in-context NLL
baseline, held-out NLL change of every target domain, the re-check trajectory) and reports, per source and
variant, over all target domains (the source's own held-out text included; values averaged over seeds):
Pearson and Spearman with the signed change and with its magnitude (bootstrap 95% intervals), the share of
domains whose direction is right, and the mean absolute error of the predicted change. A variant's direction comes from a calibration fitted on the *other* sources
only (leave-one-source-out), so no number is judged on the runs it was fitted on; the early forecast's direction
is its own sign. Correlations with the signed change use that out-of-sample prediction; correlations with the
magnitude use each score as it is (the paper's claim: higher score, larger change). The learned predictor combines the features (z-scored within each forecast) by ridge
regression, also leave-one-source-out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sts_callback.scoring.calibration import fitted_exponent as fitted_exponent_from_points
from sts_callback.scoring.calibration import leave_one_group_out
from sts_callback.validation.validate import correlation

FEATURES = ("sts_icl", "sts_act", "sts_sq", "raw_act", "signed_usage", "forgetting_minus_transfer",
            "decoder_projection", "icl_loss")
LEARNED = ("sts_icl", "signed_usage", "forgetting_minus_transfer", "decoder_projection", "icl_loss")


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def table_rows(transfer: dict) -> tuple[list[dict], list[float]]:
    """One row per (source, target): seed-averaged features and measured change; the early forecasts too."""
    rows = []
    for run in transfer["runs"]:
        seeds = run["per_seed"]
        for domain in seeds[0]["nll_delta_rel"]:
            row = {"source": run["source"], "domain": domain,
                   "delta": _mean([s["nll_delta_rel"][domain] for s in seeds]),
                   "delta_by_seed": [s["nll_delta_rel"][domain] for s in seeds]}
            for feature in FEATURES[:-1]:
                row[feature] = _mean([s["scores"][domain].get(feature) for s in seeds])
            row["icl_loss"] = (run.get("icl_loss_change") or {}).get(domain)
            for i, point in enumerate(seeds[0]["trajectory"][:-1]):  # the last re-check is the end itself
                label = f"{point['lr_area_fraction']:.0%}"
                row[f"measured@{label}"] = _mean([s["trajectory"][i]["nll_delta_rel"][domain] for s in seeds])
                row[f"fraction@{label}"] = _mean([s["trajectory"][i]["lr_area_fraction"] for s in seeds])
            rows.append(row)
    return rows


def merge(transfers: list[dict]) -> dict:
    """One transfer record whose runs hold every seed measured for each source."""
    merged = {"seeds": [], "runs": []}
    by_source: dict[str, dict] = {}
    for transfer in transfers:
        merged["seeds"] += [s for s in transfer.get("seeds", []) if s not in merged["seeds"]]
        for run in transfer["runs"]:
            if run["source"] in by_source:
                by_source[run["source"]]["per_seed"] += run["per_seed"]
            else:
                by_source[run["source"]] = {**run, "per_seed": list(run["per_seed"])}
                merged["runs"].append(by_source[run["source"]])
    return merged


def fitted_exponent_from_run(points) -> float:
    return fitted_exponent_from_points(points) or 1.0


def fitted_exponent(rows: list[dict], label: str, min_change: float = 0.005) -> float:
    """b in  final = measured_at_f / f^b, from domains whose change is clear and keeps its sign."""
    ratios = []
    for r in rows:
        m, f = r[f"measured@{label}"], r[f"fraction@{label}"]
        if abs(r["delta"]) > min_change and abs(m) > min_change and np.sign(m) == np.sign(r["delta"]) and 0 < f < 1:
            ratios.append(np.log(abs(r["delta"]) / abs(m)) / np.log(1 / f))
    return float(np.median(ratios)) if ratios else 1.0


def zscore_within(rows: list[dict], feature: str) -> list[float]:
    out = []
    for row in rows:
        same = [r[feature] for r in rows if r["source"] == row["source"]]
        sd = float(np.std(same)) or 1.0
        out.append((row[feature] - float(np.mean(same))) / sd)
    return out


def direction_share(predicted: list[float], measured: list[float], seed: int = 0) -> dict:
    from scipy.stats import bootstrap

    right = np.array([np.sign(p) == np.sign(m) for p, m in zip(predicted, measured)], dtype=float)
    share = float(right.mean())
    if len(right) < 3 or right.min() == right.max():
        return {"share": share, "ci": [share, share], "n": len(right)}
    ci = bootstrap((right,), np.mean, n_resamples=2000, method="percentile", random_state=seed).confidence_interval
    return {"share": share, "ci": [float(ci.low), float(ci.high)], "n": len(right)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfer", nargs="+", default=["benchmarks/transfer/transfer.json"])
    parser.add_argument("--out", default="benchmarks/transfer/signed.json")
    args = parser.parse_args()
    transfer = merge([json.loads(Path(path).read_text()) for path in args.transfer])
    rows = table_rows(transfer)
    sources = list(dict.fromkeys(r["source"] for r in rows))
    early = sorted({k[len("measured@"):] for r in rows for k in r if k.startswith("measured@")},
                   key=lambda k: float(k[:-1]))
    variants = [f for f in FEATURES if all(r.get(f) is not None for r in rows)]
    measured = [r["delta"] for r in rows]
    groups = [r["source"] for r in rows]

    predictions: dict[str, list[float]] = {}
    for v in variants:  # leave-one-source-out linear calibration of each single feature
        predictions[v] = [p.mean for p in leave_one_group_out([[r[v]] for r in rows], measured, groups, [v])]
    learned = [f for f in LEARNED if f in variants]
    if len(sources) >= 3 and learned:
        z = np.column_stack([zscore_within(rows, f) for f in learned])
        predictions["learned"] = [p.mean for p in leave_one_group_out(z.tolist(), measured, groups, learned,
                                                                      ridge=0.1)]
    exponents: dict[str, dict[str, float]] = {}
    for i, label in enumerate(early):  # its own scale: no calibration needed
        predictions[f"early@{label} linear (b=1)"] = [r[f"measured@{label}"] / r[f"fraction@{label}"] for r in rows]
        if i > 0:  # what the callback does: b from this run's own re-checks so far
            own = {}
            for source in sources:
                mine = [r for r in rows if r["source"] == source]
                points = [(mine[0][f"fraction@{lab}"], {r["domain"]: r[f"measured@{lab}"] for r in mine})
                          for lab in early[: i + 1]]
                own[source] = fitted_exponent_from_run(points)
            predictions[f"early@{label} b from own re-checks"] = [
                r[f"measured@{label}"] / r[f"fraction@{label}"] ** own[r["source"]] for r in rows]
        exponents[label] = {s: fitted_exponent([r for r in rows if r["source"] != s], label) for s in sources}
        predictions[f"early@{label} b from other sources"] = [
            r[f"measured@{label}"] / r[f"fraction@{label}"] ** exponents[label][r["source"]] for r in rows]

    result: dict = {"date": time.strftime("%Y-%m-%d"), "transfer": args.transfer, "sources": sources,
                    "early_exponents": exponents,
                    "seeds": transfer.get("seeds"), "seed_agreement": {}, "own_delta": {}}
    for source in sources:
        seeds = [r["delta_by_seed"] for r in rows if r["source"] == source]
        if len(seeds[0]) > 1:
            a, b = [s[0] for s in seeds], [s[1] for s in seeds]
            result["seed_agreement"][source] = correlation(a, b, "pearson", n_resamples=0)["r"]
        result["own_delta"][source] = next(r["delta"] for r in rows if r["source"] == source and r["domain"] == source)
    for scope in ("all", "others"):  # every target / the source's own domain left out
        result[f"variants_{scope}"] = {}
        for name, predicted in predictions.items():
            per_source = {}
            for source in sources:
                idx = [i for i, r in enumerate(rows) if r["source"] == source
                       and (scope == "all" or r["domain"] != source)]
                x = [predicted[i] for i in idx]  # the out-of-sample prediction: orientation learned elsewhere
                raw = [rows[i][name] for i in idx] if name in FEATURES else x  # |Δ|: the score itself (paper)
                y = [measured[i] for i in idx]
                per_source[source] = {
                    "signed": {s: correlation(x, y, s) for s in ("pearson", "spearman")},
                    "abs": {s: correlation(raw, [abs(v) for v in y], s) for s in ("pearson", "spearman")},
                    "direction": direction_share(x, y),
                    "mae": float(np.mean([abs(a - b) for a, b in zip(x, y)])),
                }
            result[f"variants_{scope}"][name] = per_source

    print(f"signed forecast on the transfer benchmark ({len(sources)} sources x "
          f"{len(rows) // len(sources)} targets x {len(transfer.get('seeds', [0]))} seed(s); changes averaged over seeds)")
    print("own held-out NLL change per source: " + ", ".join(f"{s} {v:+.1%}" for s, v in result["own_delta"].items()))
    if result["seed_agreement"]:
        print("seed-to-seed Pearson of the measured changes (all targets): " + ", ".join(
            f"{s} {v:+.2f}" for s, v in result["seed_agreement"].items() if v is not None))
    fmt = lambda v: " n/a" if v is None else f"{v:+.2f}"  # noqa: E731
    for scope, title in (("all", "all targets (the source's own held-out text included)"),
                         ("others", "the other domains only (the source's own left out)")):
        header = f"{'variant':<40}" + "".join(f"{s[:14]:>38}" for s in sources)
        print(f"\n{title}: Pearson r with signed Δ / Spearman ρ with signed Δ / Pearson with |Δ| / direction "
              "right / mean absolute error (NLL %)")
        print(header)
        print("-" * len(header))
        for name, per_source in result[f"variants_{scope}"].items():
            cells = []
            for source in sources:
                c = per_source[source]
                r, rho, ra = (c["signed"]["pearson"]["r"], c["signed"]["spearman"]["r"], c["abs"]["pearson"]["r"])
                cells.append(f"{fmt(r)} / {fmt(rho)} / {fmt(ra)} / {c['direction']['share']:.0%} / "
                             f"{100 * c['mae']:.1f}")
            print(f"{name[:40]:<40}" + "".join(f"{c:>38}" for c in cells))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
