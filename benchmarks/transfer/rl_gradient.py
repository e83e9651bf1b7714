"""The first-order change of each target domain under the GRPO update, read in weight space instead of through
the SAE: for the GRPO runs of ``rl.py``, from the same base model and the same seeded rollouts.

GRPO's first step is the advantage-weighted NLL gradient of the rollouts (the KL term's gradient is zero at the
base policy; ratio 1; TRL's token-level normalisation); plain SFT's is the token-mean NLL gradient of its texts.
For each demonstration kind, with the gradient ``G`` of the LoRA targets' weights (``q_proj`` / ``v_proj``, the
runs' ``rl.LORA``), each domain's predicted relative change is ``<grad L_d, delta> / L_d`` for three updates:

- ``adam_lora``: the runs' own first step, Adam on LoRA (B starts at zero, so only B moves: ``delta B = -sign(G A^T)``,
  ``delta W = delta B A``), averaged over ``LORA_SEEDS`` draws of A (peft's init, U(-1/sqrt(in), 1/sqrt(in)));
- ``adam_full``: Adam's first step on the full weights, ``delta W = -sign(G)``;
- ``sgd``: ``delta W = -G`` (the gradients' inner product, an influence-style score).

The lr only scales every domain alike, so it is left out (a pattern feature and the Pearson r do not see it). The
demonstration kinds are ``rl_icl.py``'s: ``reward_weighted`` (every rollout weighted by its trained advantage: the
GRPO gradient itself), ``reward_filtered`` (SFT on the rollouts above their group's mean), ``plain`` (SFT on the
same prompts' real continuations). Rollouts: ``rl.py``'s 8 prompts x 4 (checked equal to the run's stored summary,
``rollouts_match``) and, as ``prompts_32``, 32 prompts x 4. Each domain's gradient is taken once (the other
domains' texts do not depend on the run) on a seeded sample of ``DOMAIN_TOKENS`` tokens of its texts, as the
callback samples held-out texts. One JSON per run in ``benchmarks/transfer/rl_gradient/`` (resumable);
``rl_vs_sft.py --gradient UPDATE`` reads them.

    python benchmarks/transfer/rl_gradient.py [--only RUN ...] [--threads 1]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl_gradient"
sys.path.insert(0, str(HERE))
import rl  # noqa: E402
import rl_icl  # noqa: E402
import units  # noqa: E402

DOMAIN_TOKENS = 2048
LORA_SEEDS = 4
BUDGETS = {"prompts_8": 8, "prompts_32": 32}
KINDS = ("reward_weighted", "reward_filtered", "plain")
UPDATES = ("adam_lora", "adam_full", "sgd")
SEED = 0


def lora_weights(model) -> dict[str, Any]:
    """The weights ``rl.LORA`` adapts (by module-name suffix, as peft matches ``target_modules``)."""
    wanted = tuple(rl.LORA["target_modules"])
    return {name: module.weight for name, module in model.named_modules()
            if name.split(".")[-1] in wanted and hasattr(module, "weight")}


def weighted_gradient(model, weights: dict[str, Any], rows: list[tuple[list[int], list[int], float]],
                      pad: int, batch: int = 8) -> dict[str, Any]:
    """Gradient of ``sum_i w_i * sum_t NLL(completion_i,t | prompt_i, ...) / (completion tokens)`` (TRL's token-level
    normalisation) for rows ``(prompt_ids, completion_ids, w_i)``."""
    import torch

    from sts_callback.pipelines.runlevel import _token_nll

    total_tokens = sum(len(c) for _, c, w in rows if w != 0)
    params = list(weights.values())
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    live = [r for r in rows if r[2] != 0 and r[1]]
    for start in range(0, len(live), batch):
        chunk = live[start:start + batch]
        longest = max(len(p) + len(c) for p, c, _ in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        weight = torch.zeros((len(chunk), longest), dtype=torch.float32)
        for row, (p, c, w) in enumerate(chunk):
            ids[row, :len(p) + len(c)] = torch.tensor(p + c)
            mask[row, :len(p) + len(c)] = 1
            weight[row, len(p):len(p) + len(c)] = w
        targets, w_next = ids[:, 1:], weight[:, 1:]
        keep = w_next != 0
        nll = _token_nll(model, {"input_ids": ids, "attention_mask": mask}, keep, targets)
        loss = (nll * w_next[keep]).sum() / total_tokens
        for g, part in zip(grads, torch.autograd.grad(loss, params)):
            g.add_(part.float())
    return dict(zip(weights, grads))


def domain_gradients(model, tokenizer, weights, texts: dict[str, list[str]]) -> dict[str, dict]:
    """Each domain's mean held-out NLL and its gradient, on a seeded ``DOMAIN_TOKENS`` sample of its texts."""
    import torch

    from sts_callback.core.config import STSConfig
    from sts_callback.core.data import load_domains
    from sts_callback.core.extract import batches_by_length
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.pipelines.monitor import Monitor
    from sts_callback.pipelines.runlevel import _held_out_nll

    config = STSConfig(**units.FORECAST).replace(seed=SEED)
    setup = SimpleNamespace(builder=prompt_builder(model, tokenizer, config))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = list(weights.values())
    out = {}
    for name, corpus in load_domains(texts).items():
        t0 = time.perf_counter()
        sequences = Monitor.sample_sequences(corpus, setup, DOMAIN_TOKENS, seed=f"{SEED}:gradient:{name}")[0]
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        nll_sum, count = 0.0, 0
        for batch in batches_by_length([len(ids) for ids, _ in sequences], 4):
            total, n = _held_out_nll(model, [sequences[j] for j in batch], pad, torch.device("cpu"))
            for g, part in zip(grads, torch.autograd.grad(total, params)):
                g.add_(part.float())
            nll_sum, count = nll_sum + float(total.detach()), count + n
        out[name] = {"loss": nll_sum / count, "tokens": count,
                     "grad": {k: g / count for k, g in zip(weights, grads)}}
        print(f"   domain {name}: {count} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def lora_factors(weights) -> list[dict[str, Any]]:
    """``LORA_SEEDS`` draws of each adapted weight's A [r, in], peft's default init."""
    import torch

    draws = []
    for seed in range(LORA_SEEDS):
        generator = torch.Generator().manual_seed(seed)
        draws.append({k: (torch.rand(rl.LORA["r"], w.shape[1], generator=generator) * 2 - 1) / w.shape[1] ** 0.5
                      for k, w in weights.items()})
    return draws


def updates(grad: dict[str, Any], factors: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The three updates' ``delta W`` for a training gradient (each up to the lr)."""
    import torch

    lora = {}
    for k, g in grad.items():
        lora[k] = -sum(torch.sign(g @ f[k].T) @ f[k] for f in factors) / len(factors)
    return {"adam_lora": lora, "adam_full": {k: -torch.sign(g) for k, g in grad.items()},
            "sgd": {k: -g for k, g in grad.items()}}


def predicted_changes(deltas: dict[str, dict[str, Any]], domains: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {update: {name: float(sum((d["grad"][k] * delta[k]).sum() for k in delta) / d["loss"])
                     for name, d in domains.items()}
            for update, delta in deltas.items()}


def demonstration_rows(rollouts, references: list[dict], tokenizer) -> dict[str, list]:
    """(prompt ids, completion ids, weight) of each kind, on the rollouts' own prompts."""
    trained = rollouts.trained_advantages
    weighted, filtered, plain = [], [], []
    for g, group in enumerate(rollouts.groups):
        for j, ids in enumerate(group.completion_ids):
            advantage = float(trained[g, j])
            weighted.append((group.prompt_ids, list(ids), advantage))
            if advantage > 0:
                filtered.append((group.prompt_ids, list(ids), 1.0))
        answer = next(r["completion"] for r in references if r["prompt"] == group.prompt)
        plain.append((group.prompt_ids, tokenizer(answer, add_special_tokens=False)["input_ids"], 1.0))
    return {"reward_weighted": weighted, "reward_filtered": filtered, "plain": plain}


def run(name: str, model, tokenizer, weights, domains, factors, texts, sz) -> dict[str, Any]:
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.forecast import prompt_builder
    from sts_callback.pipelines.rollouts import prompt_records, sample_rollouts

    spec, s, targets, built = rl_icl.keyword_run(name, tokenizer, texts, sz)
    stored = json.loads((rl.OUT / f"{name}.json").read_text())
    trainer_args = {"num_generations": s["num_generations"], "max_completion_length": s["max_completion_length"],
                    "temperature": 1.0, "top_k": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: dict[str, Any] = {"format": "sts-rl-gradient/1", "run": name, "source": spec["source"],
                              "reward_domain": spec.get("reward_domain"), "domain_tokens": DOMAIN_TOKENS,
                              "lora_seeds": LORA_SEEDS, "first_order_change": {}, "rollouts": {}, "seconds": {}}
    keys = ("prompts", "completions", "completion_tokens", "reward_mean", "above_mean")
    for budget, prompts in BUDGETS.items():
        config = STSConfig(**sz["forecast"]).replace(rollout_prompts=prompts)
        t0 = time.perf_counter()
        rollouts = sample_rollouts(model, tokenizer, prompt_records(built["rows"]), built["reward_funcs"], config,
                                   settings=trainer_args, builder=prompt_builder(model, tokenizer, config))
        print(f"   {budget}: rollouts {time.perf_counter() - t0:.0f} s", flush=True)
        summary = {k: rollouts.summary().get(k) for k in keys}
        if prompts == sz["forecast"].get("rollout_prompts", 8):
            stored_summary = stored["forecasts"]["reward_filtered"]["settings"].get("rollouts", {})
            summary["matches_rl_py"] = all(summary.get(k) == stored_summary.get(k) for k in keys)
        result["rollouts"][budget] = summary
        changes = {}
        for kind, rows in demonstration_rows(rollouts, built["references"], tokenizer).items():
            t1 = time.perf_counter()
            grad = weighted_gradient(model, weights, rows, pad)
            print(f"   {budget} {kind}: {len(rows)} rows, gradient {time.perf_counter() - t1:.0f} s", flush=True)
            changes[kind] = predicted_changes(updates(grad, factors), domains)
        result["first_order_change"][budget] = changes
        result["seconds"][budget] = time.perf_counter() - t0
    result["domains"] = {n: {"loss": d["loss"], "tokens": d["tokens"]} for n, d in domains.items()}
    result["domains_fingerprint"] = units.fingerprint(texts)
    result["date"] = time.strftime("%Y-%m-%d")
    return result


def main() -> None:
    args, todo = rl_icl.runs_to_measure(__doc__, OUT)
    if not todo:
        return
    import torch

    model, tokenizer, texts, sz = rl_icl.base_model(args.threads)
    model.requires_grad_(False)
    weights = lora_weights(model)
    for w in weights.values():
        w.requires_grad_(True)
    model.eval()  # no dropout: a gradient of the function the forecast reads
    print(f"{len(weights)} adapted weights; each domain's gradient on {DOMAIN_TOKENS} tokens ...", flush=True)
    cache = args.out / "domains.pt"  # not kept in git: ~60 MB a domain
    if cache.exists() and torch.load(cache)["fingerprint"] == units.fingerprint(texts):
        domains = torch.load(cache)["domains"]
    else:
        domains = domain_gradients(model, tokenizer, weights, texts)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": units.fingerprint(texts), "domains": domains}, cache)
    factors = lora_factors(weights)
    for name in todo:
        if (args.out / f"{name}.json").exists():  # another process took it
            continue
        print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        data = run(name, model, tokenizer, weights, domains, factors, texts, sz)
        args.out.mkdir(parents=True, exist_ok=True)
        units.write_json(args.out / f"{name}.json", data)
        print(f"   rollouts match rl.py's: {data['rollouts']['prompts_8'].get('matches_rl_py')}; "
              f"{sum(data['seconds'].values()) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
