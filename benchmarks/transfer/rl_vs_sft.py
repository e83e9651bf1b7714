"""Does the RL / preference forecast order the other domains as well as the SFT forecast does on SFT runs?

    python benchmarks/transfer/rl_vs_sft.py [--out benchmarks/transfer/rl_vs_sft.json]
    python benchmarks/transfer/rl_vs_sft.py --precise-truth      # rl_vs_sft_precise.json
    python benchmarks/transfer/rl_vs_sft.py --exclude '*-long' --out benchmarks/transfer/rl_vs_sft_short.json
    python benchmarks/transfer/rl_vs_sft.py --precise-truth --only 'grpo-*-kl-long' --out ...

Issue 17's goal, on what is on disk: the RL runs (``rl/*.json``, ``rl.py``) and the SFT LoRA units
(``units/lora-*-seed0.json``, ``units.py``), both on Gemma 3 270M with the same 11 frozen domains. For each run
and forecast variant, the STS_icl score is calibrated by a line (change ~ a + b * score) fitted on the OTHER runs
of the same family only (leave-one-run-out: SFT units on SFT units; GRPO and DPO runs on the other RL runs with
the same variant), and scored on the run's 10 other domains: Pearson r with the measured signed change of their
held-out NLL (the raw r with the sign of the fitted slope), and the share with the right direction. The variants:
GRPO reward-filtered rollouts (the callback's default), reward-weighted, plain demonstrations; DPO chosen minus
rejected (the callback's default) and the SFT-style in-context forecast from the chosen completions. Beside them,
no forecast at all: the domain prior fitted on the SFT units of the other sources (how each domain usually moves
relative to the others, ``Calibration.fit_level_pattern(domain_prior=True)``), scored on every run. And the SFT
benchmark's forecast for a run without training, level + pattern + domain prior on the SAE features, fitted on
the family's other runs, on the SFT units of the other sources, and on both (``level_pattern_rows``). (The first
four RL runs measure each held-out text's first 64 tokens, the second round and the SFT units up to 128 tokens.)
A run is calibrated on runs of other sources only (``rl.py``'s fourth round repeats sources with longer runs).
``--precise-truth`` scores against the 4,096-token measurements (precise.py's sample) where a run or unit has one;
``--exclude`` leaves runs out by name, ``--only`` keeps just the runs it names (``--only 'grpo-*-kl-long'``:
the KL-held GRPO runs calibrated on each other, not on the collapsed runs). The within-run rows
(``within_run_rows``) read each run's scores as z-scores over its own domains, alone and beside the domain prior.
``--icl`` adds the in-context NLL change as a score (``icl_loss_change``: ``units/icl-<source>.json`` for the SFT
units, ``rl_icl/<run>.json`` for the GRPO runs: reward-filtered = the high-reward rollouts in context, reward-weighted
= high minus low, plain demonstrations = the prompts' real continuations; ``rl_icl.py``), ``--features`` chooses
the level + pattern rows' features and ``--line-feature`` the one score of the line rows. ``--gradient UPDATE``
adds each GRPO run's first-order change (``first_order_change``, ``rl_gradient.py``: each variant's training
gradient, reward-weighted = the GRPO gradient itself, under ``UPDATE``, on ``--gradient-budget``'s rollouts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from sts_callback.scoring.agreement import correlation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from learned import SAE_FEATURES  # noqa: E402  (benchmarks/transfer/learned.py: the SFT benchmark's features)

FEATURE = "sts_icl"  # the line rows' score (--line-feature)
FEATURES = list(SAE_FEATURES)  # the level + pattern rows' features (--features)
ICL = "icl_loss_change"
# rl_icl.py's demonstrations -> each GRPO variant's in-context change: the variant's own reading of the rollouts
ICL_OF_VARIANT = {"reward_filtered": lambda c: c["high"], "plain_demonstrations": lambda c: c["plain"],
                  "reward_weighted": lambda c: {d: c["high"][d] - c["low"][d] for d in c["high"]}}
# Calibration.fit_level_pattern's pattern_scale -> the suffix of its rows
RL_RUNS = HERE / "rl"  # the RL / DPO runs (--runs-dir: e.g. rl.py --reforecast's folder)
PATTERN_SCALE_ROWS = {"absolute": "", "run": ", pattern over each run's spread"}


def points(scores: dict, changes: dict, others: list[str]) -> tuple[np.ndarray, np.ndarray]:
    names = [n for n in others if scores.get(n, {}).get(FEATURE) is not None and changes.get(n) is not None]
    return (np.array([scores[n][FEATURE] for n in names], dtype=float),
            np.array([changes[n] for n in names], dtype=float))


def leave_one_out(runs: dict[str, tuple[np.ndarray, np.ndarray]], sources: dict[str, str]) -> dict[str, dict]:
    """Per run: raw Pearson, the slope's sign from the pooled line of the runs of the other sources, and the
    calibrated r / direction."""
    out = {}
    for name, (x, y) in runs.items():
        rest = [runs[o] for o in runs if sources[o] != sources[name]]
        row = {"pearson_raw": correlation(x, y, n_resamples=0)["r"], "domains": len(x)}
        if rest:
            xs, ys = np.concatenate([r[0] for r in rest]), np.concatenate([r[1] for r in rest])
            slope, intercept = np.polyfit(xs, ys, 1)
            predicted = intercept + slope * x
            row.update(pearson=None if row["pearson_raw"] is None else row["pearson_raw"] * float(np.sign(slope)),
                       direction=float(np.mean(np.sign(predicted) == np.sign(y))),
                       mae=float(np.mean(np.abs(predicted - y))))
        out[name] = row
    return out


def unit_changes(unit: dict, precise: bool) -> dict[str, float]:
    """An SFT unit's measured changes: its own 512-token ones, or with ``precise`` its re-run's on precise.py's
    4,096-token sample where that exists (``units/precise-<unit>.json``)."""
    path = HERE / "units" / f"precise-{unit['unit']}.json"
    if precise and path.exists():
        return json.loads(path.read_text())["nll_delta_rel"]
    return unit["result"]["nll_delta_rel"]


def run_measurement(run: dict, precise: bool) -> dict:
    """An RL / DPO run's measured changes and 95% intervals: the callback's final re-check, or with ``precise``
    the run's measurement on precise.py's 4,096-token sample where it has one (``rl.py``'s fourth round)."""
    return run["measured_precise"] if precise and "measured_precise" in run else run["measured"]


def rl_runs(exclude: Sequence[str], only: Sequence[str] = ()) -> list[Path]:
    """The RL / DPO runs on disk (``rl/*.json``, or ``--runs-dir``) but those whose names match a pattern of
    ``exclude``, and with ``only`` just those whose names match one of its patterns."""
    return [p for p in sorted(RL_RUNS.glob("*.json")) if not any(fnmatch(p.stem, x) for x in exclude)
            and (not only or any(fnmatch(p.stem, x) for x in only))]


def domain_prior_rows(precise: bool = False, exclude: Sequence[str] = (), only: Sequence[str] = ()) -> dict[str, dict]:
    """Per RL / DPO run (and, for comparison, per SFT unit): Pearson r of the measured changes with the domain
    prior (``Calibration.fit_level_pattern(domain_prior=True)``'s additive run + domain model) fitted on the SFT
    units of the OTHER sources: what the team's earlier SFT runs say about how each domain moves relative to the
    others, with no forecast of this run at all. Centred, so it orders domains but has no level (no direction)."""
    from sts_callback.scoring.calibration import _domain_effects

    units = {}
    for path in sorted((HERE / "units").glob("lora-*-seed0.json")):
        unit = json.loads(path.read_text())
        measured = unit_changes(unit, precise)
        changes = np.array([measured[d] for d in unit["others"]])
        units[unit["source"]] = (unit["others"], changes - changes.mean())
    runs = {f"sft {source}": (source, others, changes) for source, (others, changes) in units.items()}
    for path in rl_runs(exclude, only):
        run = json.loads(path.read_text())
        measured = run_measurement(run, precise)["loss_delta"]
        runs[run["run"]] = (run["source"], run["others"], np.array([measured[d] for d in run["others"]]))
    out = {}
    for name, (source, others, changes) in runs.items():
        fitted = [(o, c) for s, (o, c) in units.items() if s != source]
        prior = _domain_effects([o for o, _ in fitted], [c for _, c in fitted])
        x = np.array([prior.get(d, 0.0) for d in others])
        out[name] = {"pearson": correlation(x, changes, n_resamples=0)["r"], "pearson_raw": None,
                     "direction": None, "domains": len(others)}
    return out


def with_score(scores: dict, feature: str, values: dict | None) -> dict:
    """``scores`` with each domain's ``values[domain]`` added as ``feature`` (``scores`` itself without values)."""
    if values is None:
        return scores
    return {d: {**domain, feature: values.get(d)} for d, domain in scores.items()}


def run_icl(run: dict, variant: str) -> dict | None:
    """A GRPO run's in-context changes as ``variant`` reads them (``ICL_OF_VARIANT``), from ``rl_icl/<run>.json``;
    ``None`` where the run has none (not measured, or a DPO / distillation run)."""
    path = HERE / "rl_icl" / f"{run['run']}.json"
    if variant not in ICL_OF_VARIANT or not path.exists():
        return None
    return ICL_OF_VARIANT[variant](json.loads(path.read_text())["icl_loss_change"])


AFFINITY = "reward_affinity"


def run_affinity(run: dict) -> dict | None:
    """A GRPO run's reward affinity per domain (``rl_affinity/<run>.json``, ``rl_affinity.py``), the same for
    every variant (it reads the reward functions, not the rollouts); ``None`` where the run has none."""
    path = HERE / "rl_affinity" / f"{run['run']}.json"
    return json.loads(path.read_text())["reward_affinity"] if path.exists() else None


GRADIENT = "first_order_change"
GRADIENT_OF_VARIANT = {"reward_filtered": "reward_filtered", "reward_weighted": "reward_weighted",
                       "plain_demonstrations": "plain"}


def run_gradient(run: dict, variant: str, update: str, budget: str) -> dict | None:
    """A GRPO run's first-order change per domain under ``variant``'s gradient and ``update``
    (``rl_gradient/<run>.json``, ``rl_gradient.py``)."""
    path = HERE / "rl_gradient" / f"{run['run']}.json"
    if not path.exists() or variant not in GRADIENT_OF_VARIANT:
        return None
    return json.loads(path.read_text())["first_order_change"][budget][GRADIENT_OF_VARIANT[variant]][update]


def unit_icl(source: str) -> dict | None:
    """An SFT unit's in-context change with its training texts in context (``units.py``'s ``icl-<source>.json``)."""
    path = HERE / "units" / f"icl-{source}.json"
    return json.loads(path.read_text())["icl_loss_change"] if path.exists() else None


def learned_runs(scores: dict, changes: dict, others: list[str]) -> tuple | None:
    """A run as ``Calibration.fit_level_pattern`` takes it, (x, y, s, names): its other domains' features
    (``FEATURES``), the measured changes, no source-level value, the names; ``None`` if a domain lacks a feature."""
    names = [n for n in others if changes.get(n) is not None]
    x = [[scores.get(n, {}).get(f) for f in FEATURES] for n in names]
    if not names or any(v is None for row in x for v in row):
        return None
    return (np.array(x, dtype=float), np.array([changes[n] for n in names], dtype=float), [], names)


def learned_agreement(calibration, run: tuple) -> dict:
    x, y, _, names = run
    predicted = calibration.predict_all({n: dict(zip(FEATURES, row)) for n, row in zip(names, x)})
    p = np.array([predicted[n].mean for n in names])
    return {"pearson": correlation(p, y, n_resamples=0)["r"], "pearson_raw": None,
            "direction": float(np.mean(np.sign(p) == np.sign(y))), "mae": float(np.mean(np.abs(p - y))),
            "domains": len(y)}


def level_pattern_rows(families: dict[str, dict[str, tuple]], sources: dict[str, str]) -> dict[str, dict]:
    """The SFT benchmark's forecast (level + pattern + domain prior on the SAE features, no run-level term: the RL
    runs have none) per family: each run scored by the calibration fitted on the family's OTHER runs (for the SFT
    units: the other sources'), and each RL / DPO run also by the one fitted on the SFT units of the other sources
    (what a team's SFT runs teach about the RL run's features), and by the one fitted on both. Each also with the
    pattern fitted over each run's spread (``pattern_scale="run"``), and per kind of training the domain prior of
    the family's other runs alone (no forecast of the run at all: what any variant must beat)."""
    from sts_callback.scoring.calibration import Calibration

    def scored(runs: dict[str, tuple], training, features=None, pattern_scale="absolute") -> dict[str, dict]:
        """Each run scored by the calibration fitted on ``training(name)`` (needs at least 2 runs)."""
        rows = {}
        for name, run in runs.items():
            rest = training(name)
            if len(rest) >= 2:
                rows[name] = learned_agreement(Calibration.fit_level_pattern(
                    rest, FEATURES if features is None else features, [], domain_prior=True,
                    pattern_scale=pattern_scale), run)
        return rows

    out: dict[str, dict] = {}
    sft = families["sft in_context"]
    prior_only_done: set[str] = set()
    for family, runs in families.items():
        others = lambda name, runs=runs: [r for o, r in runs.items() if o != name and sources[o] != sources[name]]  # noqa: E731
        units = lambda name: [r for o, r in sft.items() if sources[o] != sources[name]]  # noqa: E731
        for pattern_scale, suffix in PATTERN_SCALE_ROWS.items():
            out[f"{family} (level + pattern + prior, family's other runs{suffix})"] = scored(
                runs, others, pattern_scale=pattern_scale)
            if family != "sft in_context":
                out[f"{family} (level + pattern + prior, fitted on SFT units{suffix})"] = scored(
                    runs, units, pattern_scale=pattern_scale)
                out[f"{family} (level + pattern + prior, SFT units + family's other runs{suffix})"] = scored(
                    runs, lambda name, runs=runs: units(name) + others(name), pattern_scale=pattern_scale)
        kind = family.split()[0]
        if kind not in prior_only_done:  # the measured changes are the family's whatever the variant
            prior_only_done.add(kind)
            bare = {name: (np.zeros((len(run[1]), 0)), *run[1:]) for name, run in runs.items()}
            for pattern_scale, suffix in PATTERN_SCALE_ROWS.items():
                out[f"{kind} domain prior alone (family's other runs{suffix})"] = scored(
                    bare, lambda name, bare=bare: [r for o, r in bare.items()
                                                   if o != name and sources[o] != sources[name]],
                    features=[], pattern_scale=pattern_scale)
    return out


def _standardized(values: np.ndarray) -> np.ndarray:
    """Values as z-scores over the run's domains (all zero where they do not vary)."""
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def within_run_rows(families: dict[str, dict[str, tuple]], names: dict[str, list[str]],
                    sources: dict[str, str]) -> dict[str, dict]:
    """The within-run forecast (chosen on the first seven KL-held GRPO runs, before rl.py's tenth round): each
    run's STS_icl scores as z-scores over its own other domains (a run's scores have their own scale, which a line
    pooled over runs mixes up), beside the domain prior fitted on the family's other runs (centred changes,
    ``_domain_effects``), also as z-scores; the two weighted by least squares of the runs' standardized changes,
    pooled over the family's other runs of other sources (each of those with the prior fitted without it). The
    level (the mean change of the other runs) and spread (their mean standard deviation) only give it a
    direction. Rows per RL / DPO family: STS_icl alone, and prior + STS_icl."""
    from sts_callback.scoring.calibration import _domain_effects

    def prior(run: str, without: set[str], runs: dict[str, tuple]) -> np.ndarray:
        fitted = [o for o in runs if o not in without and sources[o] != sources[run]]
        effects = _domain_effects([names[o] for o in fitted], [runs[o][1] - runs[o][1].mean() for o in fitted])
        return np.array([effects.get(d, 0.0) for d in names[run]])

    out: dict[str, dict] = {}
    for family, runs in families.items():
        if family.startswith("sft"):
            continue
        alone, blended = {}, {}
        for name, (x, y) in runs.items():
            rest = [o for o in runs if o != name and sources[o] != sources[name]]
            if len(rest) < 2:
                continue
            design = np.concatenate([np.c_[_standardized(prior(o, {name, o}, runs)), _standardized(runs[o][0])]
                                     for o in rest])
            target = np.concatenate([_standardized(runs[o][1]) for o in rest])
            level = float(np.mean([runs[o][1].mean() for o in rest]))
            spread = float(np.mean([runs[o][1].std() for o in rest]))
            own = np.c_[_standardized(prior(name, {name}, runs)), _standardized(x)]
            for columns, rows in (([1], alone), ([0, 1], blended)):
                weights, *_ = np.linalg.lstsq(design[:, columns], target, rcond=None)
                predicted = level + spread * (own[:, columns] @ weights)
                rows[name] = {"pearson": correlation(predicted, y, n_resamples=0)["r"], "pearson_raw": None,
                              "direction": float(np.mean(np.sign(predicted) == np.sign(y))),
                              "weights": dict(zip(["prior", FEATURE] if len(columns) == 2 else [FEATURE],
                                                  weights.tolist())),
                              "domains": len(y)}
        out[f"{family} (within-run: {FEATURE} alone, family's other runs)"] = alone
        out[f"{family} (within-run: prior + {FEATURE}, family's other runs)"] = blended
    return out


def noise_ceiling_range(measured: dict, others: list[str]) -> tuple[float | None, float | None]:
    """The noise ceiling (``scoring.agreement.noise_ceiling``: the r a perfect forecast could expect) of a run's
    measured changes over its other domains, from their 95% intervals. Where the measurement keeps its sequence
    counts (the precise one), the standard error is the interval over Student's t with n - 1 degrees of freedom
    (one value); the callback's re-checks keep none, so it is bracketed: the interval over the normal quantile
    (the most error: the lower bound) and over t with 3 degrees of freedom (4 texts, the fewest 512 tokens hold:
    the upper bound)."""
    from scipy.stats import t

    from sts_callback.scoring.agreement import noise_ceiling

    changes = [measured["loss_delta"][d] for d in others]
    halves = [(measured["loss_delta_ci"][d][1] - measured["loss_delta_ci"][d][0]) / 2 for d in others]
    if "sequences" in measured:
        value = noise_ceiling(changes, [h / float(t.ppf(0.975, measured["sequences"][d] - 1))
                                        for h, d in zip(halves, others)])
        return value, value
    return (noise_ceiling(changes, [h / 1.96 for h in halves]),
            noise_ceiling(changes, [h / float(t.ppf(0.975, 3)) for h in halves]))


def main() -> None:
    global FEATURE, FEATURES, RL_RUNS  # the rows' functions read them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: rl_vs_sft.json, with --precise-truth rl_vs_sft_precise.json")
    parser.add_argument("--precise-truth", action="store_true",
                        help="score against the 4,096-token measurements where a run or unit has one")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="leave out the RL / DPO runs whose names match (shell-style, e.g. '*-long')")
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                        help="keep only the RL / DPO runs whose names match (e.g. 'grpo-*-kl-long': the runs held by a "
                             "KL term, calibrated on each other only)")
    parser.add_argument("--icl", action="store_true",
                        help=f"add the in-context NLL change ({ICL}) to every score (rl_icl.py's, units.py's)")
    parser.add_argument("--affinity", action="store_true",
                        help=f"add each GRPO run's {AFFINITY} to its scores (rl_affinity.py's)")
    parser.add_argument("--gradient", choices=("adam_lora", "adam_full", "sgd"),
                        help=f"add each GRPO run's {GRADIENT} under this update to its scores (rl_gradient.py's)")
    parser.add_argument("--gradient-budget", default="prompts_8", choices=("prompts_8", "prompts_32"),
                        help="the rollouts the gradient was taken on (rl_gradient.py's budgets)")
    parser.add_argument("--features", nargs="+", default=list(SAE_FEATURES),
                        help="the level + pattern rows' features (default: the SAE features)")
    parser.add_argument("--line-feature", default=FEATURE, help=f"the line rows' score (default {FEATURE})")
    parser.add_argument("--runs-dir", type=Path, default=RL_RUNS,
                        help="the RL / DPO runs' folder (default rl/; rl.py --reforecast writes another)")
    args = parser.parse_args()
    FEATURE, FEATURES, RL_RUNS = args.line_feature, list(args.features), args.runs_dir
    if ICL in {FEATURE, *FEATURES} and not args.icl:
        parser.error(f"{ICL} is a score only with --icl")
    if AFFINITY in {FEATURE, *FEATURES} and not args.affinity:
        parser.error(f"{AFFINITY} is a score only with --affinity")
    if GRADIENT in {FEATURE, *FEATURES} and not args.gradient:
        parser.error(f"{GRADIENT} is a score only with --gradient")
    suffix = "" if RL_RUNS.resolve() == (HERE / "rl").resolve() else f"_{RL_RUNS.name}"  # never the rl/ runs' file
    out = args.out or HERE / (f"rl_vs_sft_precise{suffix}.json" if args.precise_truth else f"rl_vs_sft{suffix}.json")
    sft, sft_learned, sources = {}, {}, {}
    for path in sorted((HERE / "units").glob("lora-*-seed0.json")):
        unit = json.loads(path.read_text())
        changes = unit_changes(unit, args.precise_truth)
        scores = with_score(unit["result"]["scores"], ICL, unit_icl(unit["source"]) if args.icl else None)
        sft[unit["source"]] = points(scores, changes, unit["others"])
        sft_learned[unit["source"]] = learned_runs(scores, changes, unit["others"])
        sources[unit["source"]] = unit["source"]
    families: dict[str, dict[str, tuple]] = {"sft in_context": sft}
    ceilings: dict[str, tuple] = {}
    precise_runs: list[str] = []
    run_domains: dict[str, list[str]] = {}  # the domains of each RL / DPO run's points, in their order
    learned: dict[str, dict[str, tuple]] = {"sft in_context": sft_learned}
    for path in rl_runs(args.exclude, args.only):
        run = json.loads(path.read_text())
        sources[run["run"]] = run["source"]
        measured = run_measurement(run, args.precise_truth)
        if "sequences" in measured:
            precise_runs.append(run["run"])
        ceilings[run["run"]] = noise_ceiling_range(measured, run["others"])
        for variant, forecast in run["forecasts"].items():
            if variant == "callback" or "scores" not in forecast:  # the callback's equals its default variant's
                continue
            family = f"{run['kind']} {variant}"
            added = {ICL: run_icl(run, variant) if args.icl else None,
                     AFFINITY: run_affinity(run) if args.affinity else None,
                     GRADIENT: run_gradient(run, variant, args.gradient, args.gradient_budget) if args.gradient
                     else None}
            if any(added[f] is None for f in (ICL, AFFINITY, GRADIENT) if f in {FEATURE, *FEATURES}):
                continue  # a run without a score these rows read is no point of them
            scores = forecast["scores"]
            for feature, values in added.items():
                scores = with_score(scores, feature, values)
            families.setdefault(family, {})[run["run"]] = points(scores, measured["loss_delta"], run["others"])
            run_domains[run["run"]] = [d for d in run["others"] if scores.get(d, {}).get(FEATURE)
                                       is not None and measured["loss_delta"].get(d) is not None]
            learned.setdefault(family, {})[run["run"]] = learned_runs(scores, measured["loss_delta"], run["others"])
    # a run without the line's score (the SFT units have no reward affinity) is no point of the line rows
    families = {f: {n: r for n, r in runs.items() if len(r[0])} for f, runs in families.items()}
    result = {family: leave_one_out(runs, sources) for family, runs in families.items() if runs}
    result.update(within_run_rows(families, run_domains, sources))
    result.update(level_pattern_rows({f: {n: r for n, r in runs.items() if r is not None}
                                      for f, runs in learned.items()}, sources))
    prior = domain_prior_rows(args.precise_truth, args.exclude, args.only)
    result["domain prior -> SFT units"] = {n[4:]: r for n, r in prior.items() if n.startswith("sft ")}
    result["domain prior -> RL / DPO runs"] = {n: r for n, r in prior.items() if not n.startswith("sft ")}
    print(f"Pearson r / right direction over each run's other domains; {FEATURE} alone calibrated by a line, "
          f"or level + pattern + prior on {', '.join(FEATURES)}, fitted leave-one-run-out")
    def summary(rows: list[dict]) -> str:
        scored = [r for r in rows if r.get("pearson") is not None]
        dirs = [r["direction"] for r in scored if r.get("direction") is not None]
        met = sum(1 for r in scored if r["pearson"] >= 0.85 and (r.get("direction") or 0) >= 0.8)
        mean_r = f"{np.mean([r['pearson'] for r in scored]):+.2f}" if scored else "n/a"
        mean_dir = f"{np.mean(dirs):.0%}" if dirs else "-"
        return f"{len(scored):>4} {mean_r:>7} {mean_dir:>8} {met:>4}"

    subset = f" | {'runs measured on 4,096 tokens':>29}" if precise_runs else ""
    width = max(len(family) for family in result)
    print(f"{'forecast':<{width}} {'runs':>4} {'mean r':>7} {'mean dir':>8} {'goal':>4}{subset}")
    for family, rows in result.items():
        line = f"{family:<{width}} {summary(list(rows.values()))}"
        if precise_runs and any(n in rows for n in precise_runs):
            line += f" | {summary([rows[n] for n in precise_runs if n in rows]):>29}"
        print(line)
    print("\nper run:")
    for family, rows in result.items():
        cells = [f"{name} {r['pearson']:+.2f}" + (f" / {r['direction']:.0%}" if r.get("direction") is not None else "")
                 for name, r in rows.items() if r.get("pearson") is not None]
        if cells:
            print(f"  {family}: " + "; ".join(cells))
    print("\nnoise ceiling of each run's measured changes (the r even a perfect forecast could expect; a range where "
          "the measurement keeps no sequence counts): " + "; ".join(
              f"{name} {low:.2f}" + (f"-{high:.2f}" if high != low else "") for name, (low, high) in ceilings.items()
              if low is not None and high is not None))
    runs_dir = RL_RUNS.resolve()
    runs_dir = runs_dir.relative_to(HERE) if runs_dir.is_relative_to(HERE) else runs_dir
    out.write_text(json.dumps({"runs_dir": str(runs_dir), "feature": FEATURE, "features": FEATURES, "icl": args.icl,
                               "affinity": args.affinity,
                               "gradient": args.gradient, "gradient_budget": args.gradient_budget,
                               "precise_truth": args.precise_truth, "excluded": args.exclude,
                               "only": args.only,
                               "runs_measured_precisely": precise_runs, "families": result,
                               "noise_ceiling": {n: list(c) for n, c in ceilings.items()}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
