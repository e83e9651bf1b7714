"""Which early forecast to trust, and from when: the three methods of ``sts_callback.scoring.early`` on the transfer
units' trajectories (``benchmarks/transfer/units/<recipe>-<source>-seed<seed>.json``).

    python benchmarks/transfer/early_compare.py [--units benchmarks/transfer/units] [--out benchmarks/transfer/early_compare.json]
    python benchmarks/transfer/early_compare.py --precise-truth [--step0 prior|icl]   # early_compare_precise[_<step0>].json
    python benchmarks/transfer/early_compare.py --measurement-se 0.01 [...]       # early_compare[...]_se1.json

For each unit and each share of training (re-checks at or before that share of the steps), every method forecasts
each domain's held-out NLL change at the end of training; against the change measured at the end: Pearson r over the
10 other domains, the share of them whose direction is right, and the mean absolute error. Lead time: for tolerances
1%, 2%, 5%, the steps between a method's first projected violation and the first measured one (a domain of the 10
others), the most any method could give (first re-check to the measured violation), and its false alarms (projected,
never measured); with a precise re-run, also with the violation decided by the precise final change
(``lead_precise``: a violation the re-checks never measured counts as measured at the end; a warning for a domain
that did not end above the tolerance is a false alarm). With every unit's run-level terms on disk, also the step-0
forecast first: the level + pattern calibration (``learned.py``) fitted on the other sources' units predicts each
domain's change before training, a domain predicted above the tolerance is warned about at step 0 (``step0+trend``:
the callback's rule, the predicted mean; ``step0_p75+trend``: its 75% one-sided lower bound, from the interval as a
normal; ``step0_interval+trend``: only when the whole 90% interval is above), and the trend rule takes over at the
re-checks. And the blend (``power+step0``, ``trend+step0``; ``sts_callback.scoring.early.blend``): at each re-check
the projection and the step-0 prediction weighted by a line fitted per share of training on the other sources' units
of the same recipe (leave-one-source-out; none for a recipe with fewer than 3 other sources), what the callback
does with a calibration that carries an ``early_blend`` table for the run's recipe. ``step0`` alone is scored beside
them. With ``--precise-truth`` the step-0 forecast and the blends are fitted on (and every method scored against)
each unit's precise final change where it has one (``precise.py``); ``--step0 prior``: the step-0 pattern from the
domain prior alone; ``--step0 icl``: from the prior, ``signed_usage`` and the in-context NLL change.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr

from sts_callback.scoring.early import METHODS, areas, blend, blend_coefficients, fit_blend, forecast, trend_interval

SHARES = (0.125, 0.25, 0.375, 0.5, 0.75)
TOLERANCES = (0.01, 0.02, 0.05)
# The units' trajectories keep no intervals; each change is a paired difference on 512 held-out tokens, whose
# relative standard error is about 0.3% (benchmarks/transfer/units.py): the callback's interval rule with it.
MEASUREMENT_SE = 0.003
DEFAULT_OUT = Path(__file__).parent / "early_compare.json"


def unit_series(unit: dict):
    result = unit["result"]
    steps = unit["training"]["steps"]
    log = result.get("log_history") or []
    rates = [e["learning_rate"] for e in sorted((e for e in log if "learning_rate" in e and "loss" in e),
                                                 key=lambda e: e["step"])]
    s1 = areas(rates) if len(rates) == steps else None
    trajectory = sorted(result["trajectory"], key=lambda r: r["step"])

    def share_at(step: int) -> float:
        if s1 is not None:
            return float(s1[step])
        return next((r["lr_area_fraction"] for r in trajectory if r["step"] == step), step / steps)

    train_loss = [(share_at(e["step"]), e["loss"]) for e in log if "loss" in e and "step" in e] if s1 is not None else []
    return steps, trajectory, share_at, train_loss


def learned_module():
    import sys

    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    import learned

    return learned


# The step-0 forecast's pattern, always with the domain prior and the level from the lookahead's own change: the
# callback's features (SAE scores and run-level terms), the prior alone (``level+pattern: domain prior only`` in
# learned.py), or the prior with the signed SAE score and the in-context NLL change (the built-in
# gemma3-270m-lora-lookahead-icl's pattern)
STEP0_PATTERNS = {"callback": "callback", "prior": "prior", "icl": ["signed_usage", "icl_loss_change"]}


def step0_predictions(units: list[dict], pattern: str | list[str] = "callback", level_feature: str = "lookahead_own",
                      ) -> dict[str, dict[str, tuple[float, float]]]:
    """unit -> domain -> (predicted mean, low of its 90% interval) from the level + pattern calibration with the
    domain prior (the exported calibration's kind) fitted on the other sources' units of the unit's recipe (of both
    recipes while it has fewer than 3 other sources: leave-one-source-out), on ``units`` as loaded by
    ``learned.load_units`` (their measured changes are what it is fitted on); empty until every unit has its
    run-level terms. ``pattern``: ``"callback"`` (the SAE features and the run-level terms), ``"prior"`` (the
    domain prior alone) or a list of pattern features (with the prior). ``level_feature``: the level's source feature (``learned.SOURCE_LEVEL`` / ``OWN_LEVEL``, e.g.
    ``lookahead_own_2steps``, the built-in ``gemma3-270m-lora-lookahead``'s)."""
    from sts_callback.scoring.calibration import Calibration

    learned = learned_module()
    runlevel = [f for f in learned.RUNLEVEL if units and all(u["runlevel"] and f in u["runlevel"] for u in units)]
    if not runlevel:
        return {}
    features = {"callback": [*learned.SAE_FEATURES, *runlevel], "prior": []}[pattern] if isinstance(pattern, str) \
        else list(pattern)
    level = [level_feature]
    out = {}
    for unit in units:
        train = [u for u in units if u["source"] != unit["source"]]
        same = [u for u in train if u["recipe"] == unit["recipe"]]
        if len({u["source"] for u in same}) >= 3:  # the unit's own recipe where it has enough sources
            train = same
        runs = learned.level_pattern_runs(train, level, features)
        if len({u["source"] for u in train}) < 3 or len(runs) < 3:
            continue
        calibration = Calibration.fit_level_pattern(runs, features, level, domain_prior=True)
        x, _, source, _ = learned.level_pattern_runs([unit], level, features)[0]
        predicted = calibration.predict_all({d: dict(zip(features, row)) for d, row in zip(unit["others"], x)},
                                            dict(zip(level, source)))
        out[unit["unit"]] = {d: (p.mean, p.low) for d, p in predicted.items()}
    return out


def projection_at(unit: dict, share: float, method: str) -> tuple[dict[str, float], float] | None:
    """``method``'s end-of-training projection of each other domain from the re-checks up to ``share`` of the
    steps, and the lr-area fraction of the last of them."""
    steps, trajectory, share_at, train_loss = unit_series(unit)
    seen = [r for r in trajectory if r["step"] <= share * steps and r["step"] < steps]
    if not seen:
        return None
    points = {d: [(share_at(r["step"]), r["nll_delta_rel"][d]) for r in seen] for d in unit["others"]}
    fraction = share_at(seen[-1]["step"])
    return forecast(method, points, [p for p in train_loss if p[0] <= fraction]), fraction


def blend_table(units: list[dict], step0: dict[str, dict[str, tuple[float, float]]], method: str) -> list[list[float]]:
    """Rows [mean lr-area fraction, intercept, early weight, step-0 weight] per share of training, each a least
    squares (``fit_blend``) of the final change on ``method``'s projection and the step-0 prediction over ``units``'
    other domains: the table ``Calibration.early_blend`` holds and the callback applies."""
    table = []
    for share in SHARES:
        rows, fractions = [], []
        for unit in units:
            at = projection_at(unit, share, method)
            if at is None or unit["unit"] not in step0:
                continue
            projected, fraction = at
            fractions.append(fraction)
            rows += [(projected[d], step0[unit["unit"]][d][0], unit["result"]["nll_delta_rel"][d])
                     for d in unit["others"] if math.isfinite(projected[d]) and d in step0[unit["unit"]]]
        if len(fractions) >= 3:  # a line across at least 3 runs' domains
            table.append([float(np.mean(fractions)), *fit_blend(rows)])
    return table


def evaluate(unit: dict, step0: dict[str, tuple[float, float]] | None = None,
             tables: dict[str, list[list[float]]] | None = None, se: float = MEASUREMENT_SE,
             precise: dict[str, float] | None = None, precise_intervals: dict[str, dict] | None = None) -> dict:
    """Each method's agreement with the final change per share of training; given ``precise`` (the unit's changes
    on 4,096 held-out tokens, ``precise.py``), also with those (``by_share_precise``): the projections still come
    from the 512-token trajectory, only the truth they are scored against is more precise."""
    steps, trajectory, share_at, train_loss = unit_series(unit)
    others = unit["others"]
    y = np.array([unit["result"]["nll_delta_rel"][d] for d in others])
    y_precise = None if precise is None else np.array([precise[d] for d in others])
    decided = learned_module().beyond_noise(precise_intervals, others)
    rows, rows_precise = {}, {}
    for share in SHARES:
        seen = [r for r in trajectory if r["step"] <= share * steps and r["step"] < steps]
        if not seen:
            continue
        points = {d: [(share_at(r["step"]), r["nll_delta_rel"][d]) for r in seen] for d in others}
        losses = [p for p in train_loss if p[0] <= share_at(seen[-1]["step"])]
        for method in METHODS:
            predicted = forecast(method, points, losses)
            x = np.array([predicted[d] for d in others])
            rows.setdefault(str(share), {})[method] = agreement(x, y, seen[-1]["step"])
            if y_precise is not None:
                rows_precise.setdefault(str(share), {})[method] = agreement(x, y_precise, seen[-1]["step"],
                                                                            decided)
            if step0 and (tables or {}).get(method):  # blended with the step-0 prediction (fitted on other sources)
                mixed = blend(predicted, {d: m for d, (m, _) in step0.items()}, share_at(seen[-1]["step"]),
                              tables[method])
                x_mixed = np.array([mixed[d] for d in others])
                rows[str(share)][f"{method}+step0"] = agreement(x_mixed, y, seen[-1]["step"])
                if y_precise is not None:
                    rows_precise[str(share)][f"{method}+step0"] = agreement(x_mixed, y_precise,
                                                                            seen[-1]["step"], decided)
        if step0:  # the step-0 prediction alone, beside the rules that add the re-checks to it
            x0 = np.array([step0[d][0] for d in others])
            rows[str(share)]["step0"] = agreement(x0, y, 0)
            if y_precise is not None:
                rows_precise[str(share)]["step0"] = agreement(x0, y_precise, 0, decided)
    return {"unit": unit["unit"], "source": unit["source"], "recipe": unit["recipe"], "seed": unit["seed"],
            "domains": len(others),
            "by_share": rows, **({"by_share_precise": rows_precise} if precise is not None else {}),
            "lead": lead_times(unit, trajectory, share_at, train_loss, steps),
            "lead_with_intervals": lead_times(unit, trajectory, share_at, train_loss, steps, se=se,
                                              step0=step0, tables=tables),
            **({"lead_precise": lead_times(unit, trajectory, share_at, train_loss, steps, se=se, step0=step0,
                                           tables=tables, final=precise)} if precise is not None else {})}


def agreement(x: np.ndarray, y: np.ndarray, at_step: int, decided: np.ndarray | None = None) -> dict:
    """Pearson r, right direction, MAE; given ``decided`` (domains whose precise change's 95% interval excludes
    zero), also the direction over those alone (``direction_decided``, a diagnostic beside the goal's)."""
    ok = np.isfinite(x)
    r = float(pearsonr(x[ok], y[ok])[0]) if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y) > 0 else None
    out = {"pearson": r, "direction": float(np.mean(np.sign(x[ok]) == np.sign(y[ok]))) if ok.any() else None,
           "mae": float(np.mean(np.abs(x[ok] - y[ok]))) if ok.any() else None, "at_step": at_step}
    if decided is not None:
        keep = ok & decided
        out["direction_decided"] = float(np.mean(np.sign(x[keep]) == np.sign(y[keep]))) if keep.any() else None
    return out


def half_width(method: str, fractions: list[float], se: float,
               intervals: list[tuple[float, float]] | None = None) -> float:
    """The projection's 95% half-width from measurements with standard error ``se`` each (or, given, the
    re-checks' own 95% ``intervals``, as a trajectory re-run keeps them), as the callback carries them: through
    the trend rule's weights, or scaled by 1 / f for the power rule (its exponent taken as 1); 0 for the laws,
    whose intervals the callback does not compute."""
    intervals = intervals or [(-1.96 * se, 1.96 * se)] * len(fractions)
    if method == "trend":
        return trend_interval(fractions, intervals)
    if method == "power":
        return (intervals[-1][1] - intervals[-1][0]) / 2 / fractions[-1]
    return 0.0


def lead_times(unit, trajectory, share_at, train_loss, steps, se: float = 0.0, step0=None, tables=None,
               final: dict | None = None) -> dict:
    """Per tolerance and method: lead over the measured violation, misses and false alarms. ``se`` > 0: the
    callback's rule, a warning only when the whole projected interval is above the tolerance. ``final``: each
    domain's precise final change (precise.py) decides whether it violated; a violation the re-checks never
    measured counts as measured at the end of the run, and a warning for a domain that did not end above the
    tolerance is a false alarm even where a re-check's noise crossed it. ``step0``: domain
    -> (predicted mean, interval low) at train start, for the step-0 forecast followed by the trend rule;
    ``tables``: method -> its blend with the step-0 prediction (``trend+step0``: the blend from the first
    re-check; ``step0_interval+trend+step0``: a step-0 warning first when the whole interval is above)."""
    out = {}
    methods = [*METHODS, *(("step0+trend", "step0_p75+trend", "step0_interval+trend") if step0 else ()),
               *(name for m in (tables or {}) if step0 and tables[m]
                 for name in (f"{m}+step0", f"step0_interval+{m}+step0"))]
    for tolerance in TOLERANCES:
        for method in methods:
            leads, possible, false_alarms, missed, violations = [], [], 0, 0, 0
            first_recheck = trajectory[0]["step"]
            for domain in unit["others"]:
                measured = next((r["step"] for r in trajectory if r["nll_delta_rel"][domain] > tolerance), None)
                if final is not None:
                    measured = (steps if measured is None else measured) if final[domain] > tolerance else None
                warned = None
                if method.startswith("step0_interval") or method in ("step0+trend", "step0_p75+trend"):
                    mean, low = step0.get(domain, (None, None))
                    # the predicted change surely enough above the tolerance: its mean (50%), its 75% one-sided
                    # bound (normal, from the 90% interval's low end), or the whole interval (95% one-sided)
                    bound = {"step0+trend": mean, "step0_p75+trend": None if mean is None else
                             mean - 0.6745 * (mean - low) / 1.6449}.get(method, low)
                    if bound is not None and bound > tolerance:
                        warned = 0
                for i, r in enumerate(trajectory):
                    if warned is not None:
                        break
                    if r["step"] >= steps:
                        break
                    seen = trajectory[: i + 1]
                    points = {domain: [(share_at(p["step"]), p["nll_delta_rel"][domain]) for p in seen]}
                    losses = [p for p in train_loss if p[0] <= share_at(r["step"])]
                    rule = next((m for m in METHODS if m in method), "trend")
                    own = [p.get("nll_delta_ci", {}).get(domain) for p in seen]  # a re-run keeps its intervals
                    own = [tuple(ci) for ci in own] if all(own) else None
                    margin = half_width(rule, [share_at(p["step"]) for p in seen], se, own) if se > 0 else 0.0
                    projected = forecast(rule, points, losses)[domain]
                    if method.endswith("+step0") and domain in step0:
                        table = tables[rule]
                        projected = blend({domain: projected}, {domain: step0[domain][0]}, share_at(r["step"]),
                                          table)[domain]
                        margin *= blend_coefficients(table, share_at(r["step"]))[1]
                    if projected - margin > tolerance:
                        warned = r["step"]
                        break
                if measured is not None:
                    violations += 1
                    # no warning can come before the first re-check, except a step-0 forecast's
                    possible.append(measured - (0 if method.startswith("step0") else first_recheck))
                    if warned is not None and warned <= measured:
                        leads.append(measured - warned)
                    else:
                        missed += 1
                elif warned is not None:
                    false_alarms += 1
            out[f"{tolerance}/{method}"] = {
                "violations": violations, "mean_lead_steps": float(np.mean(leads)) if leads else None,
                "mean_lead_share": float(np.mean(leads)) / steps if leads else None, "missed": missed,
                "mean_possible_lead_share": float(np.mean(possible)) / steps if possible else None,
                "false_alarms": false_alarms, "false_alarm_rate": false_alarms / len(unit["others"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=Path, default=Path(__file__).parent / "units")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measurement-se", type=float, default=MEASUREMENT_SE,
                        help="standard error of each re-check's measured change, for the callback's warning rule "
                             f"(default {MEASUREMENT_SE}: 512 paired tokens taken as independent; a measurement on 4 "
                             "texts is less precise: precise.py / learned.py say how much)")
    parser.add_argument("--precise-truth", action="store_true",
                        help="fit the step-0 forecast and the blends on each unit's precise final change (precise.py, "
                             "4,096 held-out tokens per domain) where it has one, as learned.py --precise-truth fits "
                             "the calibrations (default out: early_compare_precise.json)")
    parser.add_argument("--step0", choices=STEP0_PATTERNS, default="callback",
                        help="the step-0 forecast's pattern: the callback's features with the domain prior (default), "
                             "the domain prior alone, or the prior with signed_usage and the in-context NLL change "
                             "(icl); the level from the lookahead either way")
    args = parser.parse_args()
    learned = learned_module()
    units = learned.load_units(args.units)
    if not units:
        raise SystemExit(f"no finished transfer units in {args.units}; run benchmarks/transfer/units.py first")
    precise_runs = learned.precise_units(units, args.units)
    precise_changes = {p["unit"]: p["result"]["nll_delta_rel"] for p in precise_runs}
    precise_intervals = {p["unit"]: p["precise"].get("change") for p in precise_runs}
    if args.precise_truth:
        units = [{**u, "result": {**u["result"], "nll_delta_rel": precise_changes[u["unit"]]}}
                 if u["unit"] in precise_changes else u for u in units]
    if args.out == DEFAULT_OUT:
        args.out = args.out.with_name("early_compare" + "_precise" * args.precise_truth
                                      + ("" if args.step0 == "callback" else f"_{args.step0}")
                                      + ("" if args.measurement_se == MEASUREMENT_SE
                                         else f"_se{100 * args.measurement_se:g}") + ".json")
    step0 = step0_predictions(units, STEP0_PATTERNS[args.step0])
    results, tables = [], {}
    for unit in units:  # the blend's weights fitted on the other sources' units of its recipe
        others = [u for u in units if u["source"] != unit["source"] and u["recipe"] == unit["recipe"]]
        tables[unit["unit"]] = {m: blend_table(others, step0, m) for m in ("power", "trend")} if step0 else {}
        results.append(evaluate(unit, step0.get(unit["unit"]), tables[unit["unit"]], se=args.measurement_se,
                                precise=precise_changes.get(unit["unit"]),
                                precise_intervals=precise_intervals.get(unit["unit"])))
    trajectories = []  # units re-run with more precise re-checks (precise.py --recheck-steps): the same rules on them
    by_name = {u["unit"]: u for u in units}
    for path in sorted(args.units.glob("trajectory-*-seed*.json")):
        run = json.loads(path.read_text())
        unit = by_name.get(run["unit"])
        if unit is None:
            continue
        rerun = {**unit, "result": {**unit["result"], "trajectory": run["trajectory"],
                                    "log_history": run["log_history"], "nll_delta_rel": run["nll_delta_rel"]}}
        trajectories.append({**evaluate(rerun, step0.get(unit["unit"]), tables[unit["unit"]], se=args.measurement_se,
                                        precise=run["nll_delta_rel"], precise_intervals=run.get("change")),
                             "loss_tokens": run["loss_tokens"], "recheck_steps": run["recheck_steps"]})
    print(f"early forecast vs the change measured at the end ({len(results)} units; Pearson / direction / MAE "
          "over the 10 other domains)")
    print(f"{'unit':<32} {'share':>5}  " + "  ".join(f"{m:>22}" for m in METHODS))
    for r in results:
        for share, by_method in r["by_share"].items():
            cells = []
            for m in METHODS:
                c = by_method[m]
                pearson = "n/a" if c["pearson"] is None else f"{c['pearson']:+.2f}"
                cells.append(f"{pearson:>6} {c['direction']:>5.0%} {100 * c['mae']:>6.2f}%")
            print(f"{r['unit']:<32} {float(share):>5.0%}  " + "  ".join(f"{c:>22}" for c in cells))
    blends = [*METHODS, *(f"{m}+step0" for m in ("power", "trend") if step0), *(["step0"] if step0 else [])]
    summary = summarise(results, "by_share", blends)
    print("\nper share and method: mean Pearson, units with Pearson >= 0.85 and direction >= 80%")
    print_summary(summary)
    precise_summary = summarise(results, "by_share_precise", blends)
    if precise_summary:
        print("\nthe same, scored against the units' precise final change (4,096 held-out tokens, precise.py; units "
              "with a precise re-run)" + ("" if args.precise_truth else ", beside the 512-token final change on the "
                                          "same units"))
        print_summary(precise_summary, None if args.precise_truth else
                      summarise([r for r in results if "by_share_precise" in r], "by_share", blends))
    by_schedule = {}  # the re-runs grouped by how often they re-checked (every 16 steps; every 4: dense early)
    for t in trajectories:
        by_schedule.setdefault(str(t["recheck_steps"]), []).append(t)
    for every, group in sorted(by_schedule.items(), key=lambda kv: -int(kv[0])):
        names = {t["unit"] for t in group}
        print(f"\nunits re-run with re-checks every {every} steps on {sorted({t['loss_tokens'] for t in group})} "
              f"held-out tokens per domain (trajectory-*.json; {len(group)} units), against their precise final "
              "change; beside, the same units' 512-token trajectories")
        print_summary(summarise(group, "by_share_precise", blends),
                      summarise([r for r in results if r["unit"] in names and "by_share_precise" in r],
                                "by_share_precise", blends))
        for t in group:
            row = t["by_share_precise"].get("0.25", {})
            print(f"  {t['unit']:<30} at 25%: " + "  ".join(
                f"{m} {row[m]['pearson']:+.2f}/{row[m]['direction']:.0%}"
                for m in ("power", "trend", "power+step0", "trend+step0")
                if m in row and row[m]["pearson"] is not None))
    lead_summary = {}
    for lead_key, title in (("lead", "a warning when the projection is above the tolerance"),
                            ("lead_with_intervals", "the callback's rule: when the projection's whole interval is "
                             f"above it (measurement SE {args.measurement_se:.1%})"),
                            ("lead_precise", "the callback's rule as above, a violation decided by the precise "
                             "final change (units with a precise re-run)")):
        lead_summary[lead_key] = print_leads(results, lead_key, title)
    trajectory_leads = {every: print_leads(group, "lead_precise", f"re-runs re-checking every {every} steps: the "
                                           "callback's rule with each re-check's own 95% interval, a violation "
                                           "decided by the precise final change")
                        for every, group in sorted(by_schedule.items(), key=lambda kv: -int(kv[0]))}
    args.out.write_text(json.dumps({"args": {"units": str(args.units), "out": str(args.out),
                                             "measurement_se": args.measurement_se,
                                             "precise_truth": args.precise_truth, "step0": args.step0},
                                    "units": results,
                                    "summary": summary, "summary_precise": precise_summary,
                                    "summary_leads": lead_summary,
                                    **({"trajectories": trajectories,
                                        "summary_trajectories": summarise(by_schedule.get("16", []),
                                                                          "by_share_precise", blends),
                                        "summary_trajectory_leads": trajectory_leads,
                                        "summary_trajectories_by_recheck_steps": {
                                            every: summarise(group, "by_share_precise", blends)
                                            for every, group in by_schedule.items()}}
                                       if trajectories else {})}, indent=1,
                                   default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))


def summarise(results: list[dict], key: str, methods: list[str]) -> dict:
    """Per share and method over the units having ``key``: mean Pearson and the units meeting the goal."""
    summary = {}
    for share in SHARES:
        for m in methods:
            cells = [r[key][str(share)][m] for r in results if m in r.get(key, {}).get(str(share), {})]
            if not cells:
                continue
            rs = [c["pearson"] for c in cells if c["pearson"] is not None]
            summary[f"{share}/{m}"] = {
                "units": len(cells), "mean_pearson": float(np.mean(rs)) if rs else None,
                "units_meeting_goal": sum(1 for c in cells if (c["pearson"] or -1) >= 0.85 and c["direction"] >= 0.8)}
            if any("direction_decided" in c for c in cells):  # the diagnostic: direction beyond the noise only
                summary[f"{share}/{m}"]["units_meeting_goal_direction_decided"] = sum(
                    1 for c in cells if (c["pearson"] or -1) >= 0.85 and (c.get("direction_decided") or 0) >= 0.8)
    return summary


def print_summary(summary: dict, beside: dict | None = None) -> None:
    def cell(s: dict) -> str:
        mean = "n/a" if s["mean_pearson"] is None else f"{s['mean_pearson']:+.2f}"
        decided = s.get("units_meeting_goal_direction_decided")
        return f"{mean:>6}  {s['units_meeting_goal']}/{s['units']}" + ("" if decided is None else
                                                                       f" ({decided} over decided domains)")

    for key, s in summary.items():
        print(f"  {key:<22} {cell(s)}" + (f"   (512 tokens: {cell(beside[key])})" if beside and key in beside else ""))


def print_leads(results: list[dict], lead_key: str, title: str) -> dict:
    """Print, and return, per tolerance and rule: violations, misses, mean lead share, false-alarm rate."""
    out = {}
    print(f"\nlead time (steps before the measured violation) and false alarms, summed over units; {title}")
    keys = list(dict.fromkeys(k for r in results for k in r.get(lead_key, {})))
    for key in keys:
        having = [r for r in results if key in r.get(lead_key, {})]  # a blend: units whose recipe has one
        cells = [r[lead_key][key] for r in having]
        leads = [c["mean_lead_share"] for c in cells if c["mean_lead_share"] is not None]
        violations = sum(c["violations"] for c in cells)
        false = sum(c["false_alarms"] for c in cells)
        quiet = sum(r["domains"] for r in having) - violations
        possible = [c["mean_possible_lead_share"] for c in cells if c["mean_possible_lead_share"] is not None]
        lead = "n/a" if not leads else f"{np.mean(leads):.0%} of the run"
        most = "n/a" if not possible else f"{np.mean(possible):.0%}"
        missed = sum(c["missed"] for c in cells)
        # over every violation, a missed one giving no lead (the mean above is over the warned ones only)
        per_violation = sum((c["mean_lead_share"] or 0.0) * (c["violations"] - c["missed"]) for c in cells)
        per_violation = per_violation / violations if violations else None
        print(f"  tolerance {key:<36} violations {violations:>3} (missed {missed:>2}), mean lead {lead} (at most "
              f"{most}; {'n/a' if per_violation is None else f'{per_violation:.0%}'} counting a miss as 0), "
              f"false alarms {false} of {quiet} never violating ({false / max(quiet, 1):.0%})")
        out[key] = {"units": len(having), "violations": violations, "missed": missed,
                    "mean_lead_share": float(np.mean(leads)) if leads else None,
                    "mean_lead_share_per_violation": per_violation,
                    "most_possible_lead_share": float(np.mean(possible)) if possible else None,
                    "false_alarms": false, "never_violating": quiet, "false_alarm_rate": false / max(quiet, 1)}
    return out


if __name__ == "__main__":
    main()
