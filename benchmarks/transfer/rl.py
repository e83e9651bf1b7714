"""RL and preference forecasts on a real model (issue 17, point 3): GRPO and DPO runs, each domain's measured change.

    python benchmarks/transfer/rl.py                  # every run not yet on disk, in plan order
    python benchmarks/transfer/rl.py --list           # the plan and which runs are done
    python benchmarks/transfer/rl.py --only grpo-arithmetic
    python benchmarks/transfer/rl.py --smoke --out /tmp/rl-smoke   # every size shrunk: checks the script works
    python benchmarks/transfer/rl.py --reforecast benchmarks/transfer/rl_reforecast --only 'grpo-*-kl-long'
        # the runs' before-training forecasts made again by the package as it is now, scored on their measured changes

Model: Gemma 3 270M (offline GGUF package), the demo SAE (layer 12, TopK width 4096, k=32), as the SFT benchmark
(units.py). Targets: the 11 frozen built-in domains (``units/domains.json.gz``, read through ``units.domain_texts``);
a source that is a built-in domain trains on its even-indexed texts and is its own target on the odd-indexed ones
(``units.split``). Four runs, LoRA r=8 on q_proj/v_proj as the units' recipe, fp32, constant lr, seed 0 (sizes in
``GRPO`` / ``DPO`` / ``CALLBACK`` / ``ROLLOUT`` below):

- ``grpo-python_code-keywords``: 16 GRPO steps (2 prompts x 4 completions of 16 tokens, lr 1e-3) on the first 32
  tokens of python_code texts; rewards: "def " in the completion (1/0) plus the share of the completion's words
  among the 50 most frequent words of the training texts (a trial: mean reward 0.46 -> 1.0 over 20 steps).
- ``grpo-arithmetic``: 16 GRPO steps (4 prompts x 4 completions of 4 tokens, lr 3e-4) on "a + b =" after three
  worked examples (a, b in 2..12); reward 1 for the right first number, else 0.5 x max(0, 1 - |error| / 10) when the
  completion starts with a number (partial credit, so that the base policy's groups differ). Every built-in domain
  is an "other" target.
- ``dpo-legal-shuffled``: 12 DPO steps (2 pairs, lr 5e-4, beta 0.1; a trial: margin > 0.4 from step 3, accuracy 1)
  on legal texts: prompt = the first ~32 tokens (cut on a token boundary), chosen = the next 48, rejected = the same
  words shuffled (seeded).
- ``dpo-python_code-vs-cpp_code``: the same DPO on python_code: chosen = the real continuation, rejected = 48 tokens
  from a cpp_code text (its texts in a seeded order).
- second round, so that each family has runs to calibrate on leave-one-run-out: ``dpo-<source>-shuffled`` for
  markup, math, chat_templates and ml_docs (as ``dpo-legal-shuffled``), and ``grpo-<source>-keywords`` for legal
  and markup (the frequent-word share alone as the reward); third round: ``grpo-<source>-keywords`` for math,
  chat_templates, ml_docs and cpp_code (as the second round's). Their held-out texts are measured up to 128 tokens
  (the callback's default since 2026-12-02), the first four runs' up to 64; each run is compared with itself.
  Fourth round: ``grpo-<source>-keywords-long`` for legal, cpp_code, math and chat_templates (the runs whose
  512-token changes were the noisiest): 48 steps instead of 16, and after training every domain also measured on
  precise.py's fixed 4,096-token sample (``measured_precise`` / ``agreement_precise``; the base NLL is read from
  ``units/precise-base.json``). Fifth round: the same long runs for markup, ml_docs and python_code.
  Sixth round: ``grpo-<source>-to-<reward_domain>-long``, the long runs' sizes with the reward for ANOTHER
  domain's 100 most frequent words (python_code prompts -> legal's words, legal prompts -> python_code's).
  Seventh round: ``grpo-<source>-to-<reward_domain>-kl-long``, the sixth round's runs with a KL term (beta 0.1) and
  lr 5e-4, so that the policy need not collapse; eighth round: the same for markup -> legal and math -> python_code;
  ninth round: cpp_code -> legal, ml_docs -> legal and chat_templates -> python_code; tenth round: changelog ->
  legal, readme_prose -> python_code, nlp_tutorials -> legal, python_reference -> legal.
- Distillation (2026-12-05, evening): ``distill-<source>-from-<teacher_domain>``: the teacher is the base model after
  LoRA SFT on another domain's training texts (merged), the student the base model, distilled on-policy (TRL's
  DistillationTrainer, LoRA) on the source's prompts, so that it learns to continue them as the other domain's
  specialist would. Forecasts: ``distillation_forecast`` with the teacher's completions as demonstrations
  (``teacher_completions``) and the teacher's minus the student's completions (``teacher_vs_student``), and the
  plain-demonstrations baseline (the prompts' real continuations).

Per run, before training, on the base model (``STSConfig(**units.FORECAST, **ROLLOUT)``): distillation: the two
teacher variants and the plain demonstrations (above); GRPO:
``rollout_forecast(shift="reward_weighted")``, ``rollout_forecast(shift="demonstrations")`` (reward-filtered rollouts
as demonstrations) and the plain-demonstrations baseline, the SFT ``forecast`` with the reference answers (the right
sums; the real continuations); DPO: ``preference_forecast(shift="chosen_vs_rejected")`` and ``(shift="in_context")``.
Then training with ``STSCallback`` (shift "auto": its own train-start forecast, variant ``callback``; re-checks at the
middle and the end; 512 held-out tokens per domain, no sequential stop). The JSON ``<out>/<run>.json``,
written the moment a run ends: settings, seconds per phase, the reward trajectory (GRPO's logged ``reward`` and
``rewards/<func>/mean``; DPO's ``rewards/margins`` and ``rewards/accuracies``), each domain's measured relative held-out
NLL change with its 95% interval (and at each re-check), every variant's scores, and per variant and feature the
Pearson r with the signed change over the other domains (and with its magnitude), the share of them whose sign the
signed features get right (raw sign: forgetting_minus_transfer > 0 read as "loss rises"; the others' orientation is
the calibration's business, see the README), and, where ``units/lora-<source>-seed0.json`` exists, the same for the
SFT unit of that source and the correlation of the two runs' measured changes. A table ends the run.

Cost control (all base-model work, no number changes): every forecast variant and the callback's train-start
forecast sample the same target texts (seeded per domain), so the base model's statistics of a domain's sampled
token ids are computed once per process and reused (``DomainCache``: keyed by the exact token ids; only used while
the weights are the base model's, i.e. before training and in the callback's train start, LoRA B = 0); the scores
are those of the library's functions. ``--no-domain-cache`` turns it off. Torch runs on ``--threads`` threads
(default 1: on this 2-core machine shared with another benchmark, 2 threads oversubscribe the cores and generation
ran ~10x slower; pass 2 on an idle machine).

Expected time of the whole real run (4 runs, 1 thread), from the pieces timed here on 2026-12-02 (trial steps: GRPO
keywords ~18 s, arithmetic ~22 s, DPO ~14 s; a held-out measurement of 11 x 512 tokens ~1 min; the domains' base pass
~3-4 min once; in-context shift passes ~0.5-1 min each; rollouts ~40 s per keywords sampling) at a load average of
~5 (the units benchmark and other jobs beside it): ~42 min (training ~16 min, 12 held-out measurements ~14 min,
forecasts ~12 min); ~30 min with only the units benchmark beside it (load ~2.5). The smoke: 4.3 min at load ~5.
The second round's 6 runs took 88 min beside the units benchmark on 2026-12-03 (DPO 10-15 min, GRPO 15-17 min).
The third round's 4 GRPO runs took 94 min beside another benchmark (20-31 min each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "rl"
sys.path.insert(0, str(HERE))
import units  # benchmarks/transfer/units.py: the frozen domains, split(), write_json, FORECAST
from learned import SAE_FEATURES  # noqa: E402

from sts_callback.core.config import SIGNED_VARIANTS  # noqa: E402

PRECISE_TOKENS = 4096  # precise.py's TOKENS: its cached base NLL (units/precise-base.json) is reused
RUNS = {
    "grpo-python_code-keywords": {"kind": "grpo", "source": "python_code", "task": "keywords",
                                  "rewards": ("has_def", "frequent_word_share")},
    "grpo-arithmetic": {"kind": "grpo", "source": "arithmetic", "task": "arithmetic"},
    "dpo-legal-shuffled": {"kind": "dpo", "source": "legal", "rejected": "shuffled"},
    "dpo-python_code-vs-cpp_code": {"kind": "dpo", "source": "python_code", "rejected": "cpp_code"},
    # Second round (2026-12-03): more sources per family, so that a forecast can be calibrated on the family's
    # other runs (leave-one-run-out) as the SFT forecast is on the other sources' units.
    **{f"dpo-{source}-shuffled": {"kind": "dpo", "source": source, "rejected": "shuffled"}
       for source in ("markup", "math", "chat_templates", "ml_docs")},
    # GRPO: legal and markup in the second round; math, chat_templates, ml_docs and cpp_code in the third
    # (2026-12-03, later), so that the GRPO family has as many runs to calibrate on as the DPO family (plus two).
    **{f"grpo-{source}-keywords": {"kind": "grpo", "source": source, "task": "keywords",
                                   "rewards": ("frequent_word_share",)}
       for source in ("legal", "markup", "math", "chat_templates", "ml_docs", "cpp_code")},
    # Fourth round (2026-12-03, evening): the GRPO sources whose measured changes were the noisiest (noise ceilings
    # 0.0-0.8 over 512 tokens), 3x longer so that the reward can rise and the changes outgrow the noise, and each
    # also measured on precise.py's fixed 4,096-token sample (``measured_precise``).
    **{f"grpo-{source}-keywords-long": {"kind": "grpo", "source": source, "task": "keywords", "size": "keywords_long",
                                        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source in ("legal", "cpp_code", "math", "chat_templates")},
    # Fifth round (2026-12-04): the same long runs for the other GRPO sources, so that each long run is calibrated
    # on six others rather than three (the reward-weighted vs reward-filtered lead flipped with the family's runs).
    **{f"grpo-{source}-keywords-long": {"kind": "grpo", "source": source, "task": "keywords", "size": "keywords_long",
                                        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source in ("markup", "ml_docs", "python_code")},
    # Sixth round (2026-12-04, late): the reward asks for ANOTHER domain's frequent words (``reward_domain``), so that
    # the policy moves away from the prompts' own text: the case where plain demonstrations (the prompts' real
    # continuations) describe the wrong shift and the rollouts should not. Python prompts rewarded for license
    # prose's words, license prompts for Python's (base reward ~0.16 and ~0.29 in a 32-rollout trial).
    **{f"grpo-{source}-to-{reward_domain}-long": {
        "kind": "grpo", "source": source, "task": "keywords", "size": "cross_long", "reward_domain": reward_domain,
        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source, reward_domain in (("python_code", "legal"), ("legal", "python_code"))},
    # Seventh round (2026-12-05): the sixth round's rewards with a KL term to the base policy (beta 0.1) and half the
    # lr, so that the policy moves toward the other domain's words without collapsing; the case that could
    # separate the rollout variants from plain demonstrations (every earlier GRPO run collapsed).
    **{f"grpo-{source}-to-{reward_domain}-kl-long": {
        "kind": "grpo", "source": source, "task": "keywords", "size": "cross_kl_long", "reward_domain": reward_domain,
        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source, reward_domain in (("python_code", "legal"), ("legal", "python_code"))},
    # Eighth round (2026-12-05, later): more KL-held runs, so that such runs can be calibrated on each other rather
    # than on the collapsed ones: the cross reward for markup prompts (legal's words) and math prompts (python's).
    **{f"grpo-{source}-to-{reward_domain}-kl-long": {
        "kind": "grpo", "source": source, "task": "keywords", "size": "cross_kl_long", "reward_domain": reward_domain,
        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source, reward_domain in (("markup", "legal"), ("math", "python_code"))},
    # Ninth round (2026-12-05, morning): three more, so that each KL-held run is calibrated on six others: the cross
    # reward for cpp_code and ml_docs prompts (legal's words) and chat_templates prompts (python's).
    **{f"grpo-{source}-to-{reward_domain}-kl-long": {
        "kind": "grpo", "source": source, "task": "keywords", "size": "cross_kl_long", "reward_domain": reward_domain,
        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source, reward_domain in (("cpp_code", "legal"), ("ml_docs", "legal"), ("chat_templates", "python_code"))},
    # Tenth round (2026-12-05, midday): four KL-held runs on the sources no KL-held run had, made AFTER the
    # within-run forecast (rl_vs_sft.py's "within-run" rows) was chosen on the first seven, to test it on runs it
    # was not chosen on.
    **{f"grpo-{source}-to-{reward_domain}-kl-long": {
        "kind": "grpo", "source": source, "task": "keywords", "size": "cross_kl_long", "reward_domain": reward_domain,
        "rewards": ("frequent_word_share",), "precise_tokens": PRECISE_TOKENS}
       for source, reward_domain in (("changelog", "legal"), ("readme_prose", "python_code"),
                                     ("nlp_tutorials", "legal"), ("python_reference", "legal"))},
    # Distillation (2026-12-05, evening): a specialist teacher of another domain distilled into the base model on
    # the source's prompts (the cross pairs of the sixth round).
    **{f"distill-{source}-from-{teacher}": {"kind": "distill", "source": source, "teacher_domain": teacher}
       for source, teacher in (("legal", "python_code"), ("python_code", "legal"))},
    # The same with 48-token completions after 16-token prompts (registered before running: in the first two the
    # teacher's 16 tokens after 32-token prompts forecast as the plain demonstrations did; with the completions
    # three times the prompts, the teacher's forecasts should part from the plain demonstrations and order better).
    **{f"distill-{source}-from-{teacher}-long": {"kind": "distill", "source": source, "teacher_domain": teacher,
                                                 "size": "long"}
       for source, teacher in (("legal", "python_code"), ("python_code", "legal"))},
}
# LoRA as the units' recipe (r=8, alpha 16, q/v). GRPO: 2 prompts x 4 completions a step (TRL's batch counts
# completions), temperature 1, no KL term (TRL's default beta=0), constant lr.
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
GRPO = {
    "keywords": {"steps": 16, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16,
                 "learning_rate": 1e-3, "prompt_tokens": 32, "reference_tokens": 48, "prompts": 256,
                 "frequent_words": 50},
    "keywords_long": {"steps": 48, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16,
                      "learning_rate": 1e-3, "prompt_tokens": 32, "reference_tokens": 48, "prompts": 256,
                      "frequent_words": 50},
    # another domain's words are rarer in the prompts' continuations: its 100 most frequent, for a reward to rise from
    "cross_long": {"steps": 48, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16,
                   "learning_rate": 1e-3, "prompt_tokens": 32, "reference_tokens": 48, "prompts": 256,
                   "frequent_words": 100},
    "cross_kl_long": {"steps": 48, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16,
                      "learning_rate": 5e-4, "beta": 0.1, "prompt_tokens": 32, "reference_tokens": 48, "prompts": 256,
                      "frequent_words": 100},
    # lr 1e-3 made this reward fall (0.73 -> 0.40 over 20 steps in a trial); 3e-4 raised it (0.71 -> 0.87 in 16)
    "arithmetic": {"steps": 16, "per_device_train_batch_size": 16, "num_generations": 4, "max_completion_length": 4,
                   "learning_rate": 3e-4, "prompts": 256, "low": 2, "high": 12},
}
# Distillation: the teacher's SFT (LoRA, merged) on the teacher domain's training texts, then on-policy distillation
# of the student (LoRA) on the source's prompts with TRL's DistillationTrainer (its default divergence, beta 1).
DISTILL = {"teacher_steps": 24, "teacher_batch": 4, "teacher_lr": 1e-3, "teacher_tokens": 128, "steps": 24,
           "per_device_train_batch_size": 8, "max_completion_length": 16, "learning_rate": 1e-3, "temperature": 1.0,
           "prompt_tokens": 32, "reference_tokens": 48, "prompts": 256}
DISTILL_SIZES = {"default": DISTILL, "long": {**DISTILL, "max_completion_length": 48, "prompt_tokens": 16}}
DPO = {"steps": 12, "per_device_train_batch_size": 2, "learning_rate": 5e-4, "beta": 0.1, "prompt_tokens": 32,
       "completion_tokens": 48, "pairs": 256}
# The callback: the units' held-out budget; re-checks at the middle and the end (each measures 11 x 512 held-out
# tokens through the 262k-word LM head: ~1 min here, the largest cost after training).
CALLBACK = {"loss_tokens": 512, "recheck_tokens": 1024, "rechecks": 2}
ROLLOUT = {"rollout_prompts": 8, "rollout_generations": 4, "rollout_max_tokens": 16}
FEATURES = SAE_FEATURES  # the SFT benchmark's step-0 features (learned.py), so the two compare like for like
SIGNED = SIGNED_VARIANTS

# --smoke: every size shrunk (the whole script in a few minutes with the real model; numbers mean nothing).
SMOKE = {
    "grpo": {"steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "prompts": 16},
    "grpo_keywords": {"max_completion_length": 6},
    "precise_tokens": 256,
    "dpo": {"steps": 2, "per_device_train_batch_size": 2, "pairs": 16, "prompt_tokens": 16, "completion_tokens": 16},
    "distill": {"teacher_steps": 2, "teacher_tokens": 32, "steps": 2, "per_device_train_batch_size": 4,
                "max_completion_length": 6, "prompts": 16},
    "callback": {"loss_tokens": 48, "recheck_tokens": 64, "rechecks": 2},
    "forecast": {"n_shifted": 20, "shift_tokens": 96, "domain_tokens": 48, "n_domain_demonstrations": 1,
                 "max_query_tokens": 32, "max_demonstration_tokens": 32, "batch_size": 8},
    "rollout": {"rollout_prompts": 2, "rollout_generations": 4, "rollout_max_tokens": 6},
}
ARITHMETIC_PREFIX = "2 + 3 = 5\n6 + 1 = 7\n4 + 4 = 8\n"


def sizes(smoke: bool) -> dict[str, Any]:
    grpo = {task: dict(values) for task, values in GRPO.items()}
    dpo, callback = dict(DPO), dict(CALLBACK)
    distill = {size: dict(values) for size, values in DISTILL_SIZES.items()}
    forecast = {**units.FORECAST, **ROLLOUT}
    if smoke:
        for values in distill.values():
            values.update(SMOKE["distill"])
        for values in grpo.values():
            values.update(SMOKE["grpo"])
        for task in ("keywords", "keywords_long"):
            grpo[task].update(SMOKE["grpo_keywords"])
        dpo.update(SMOKE["dpo"])
        callback.update(SMOKE["callback"])
        forecast.update({**SMOKE["forecast"], **SMOKE["rollout"]})
    return {"grpo": grpo, "dpo": dpo, "distill": distill, "callback": callback, "forecast": forecast,
            "precise_tokens": SMOKE["precise_tokens"] if smoke else None}


# ----------------------------------------------------------------------------------------------- tasks (offline)

def token_slice(tokenizer, text: str, start: int, stop: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[start:stop])


def keeps_prefix(tokenizer, prompt: str, completion: str) -> bool:
    """Whether the prompt's own tokens are a prefix of prompt + completion's (TRL's DPO tokenization needs it; else
    it drops the prompt's last token and warns)."""
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + completion, add_special_tokens=False)["input_ids"][:len(alone)] == alone


def split_on_token_boundary(tokenizer, text: str, prompt_tokens: int, completion_tokens: int) -> tuple[str, str]:
    """(prompt, continuation) of about ``prompt_tokens`` and ``completion_tokens`` tokens, cut where
    :func:`keeps_prefix` holds (the cut moves back up to 12 tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = prompt_tokens
    for k in range(prompt_tokens, max(prompt_tokens - 12, 1), -1):
        if keeps_prefix(tokenizer, tokenizer.decode(ids[:k]), tokenizer.decode(ids[k:k + completion_tokens])):
            cut = k
            break
    return tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:cut + completion_tokens])


def frequent_words(texts: list[str], n: int) -> list[str]:
    counts = Counter(w for t in texts for w in re.findall(r"[A-Za-z_]+", t))
    return [w for w, _ in counts.most_common(n)]


def keywords_task(tokenizer, train: list[str], s: dict[str, Any], rewards: tuple[str, ...],
                  word_texts: list[str] | None = None) -> dict[str, Any]:
    """Prompts: the first ``prompt_tokens`` tokens of the source's training texts; reference answers (for the plain
    demonstrations baseline): the real next ``reference_tokens`` tokens; ``rewards``: names of the reward
    functions below (``has_def`` only makes sense for code). The frequent words are ``word_texts``' (default: the
    training texts')."""
    top = set(frequent_words(train if word_texts is None else word_texts, s["frequent_words"]))

    def has_def(completions, **kwargs):
        return [1.0 if "def " in c else 0.0 for c in completions]

    def frequent_word_share(completions, **kwargs):
        out = []
        for c in completions:
            words = re.findall(r"[A-Za-z_]+", c)
            out.append(sum(w in top for w in words) / len(words) if words else 0.0)
        return out

    rows, references = [], []
    for text in train:
        prompt = token_slice(tokenizer, text, 0, s["prompt_tokens"])
        answer = token_slice(tokenizer, text, s["prompt_tokens"], s["prompt_tokens"] + s["reference_tokens"])
        if prompt.strip() and answer.strip():
            rows.append({"prompt": prompt})
            references.append({"prompt": prompt, "completion": answer})
        if len(rows) >= s["prompts"]:
            break
    functions = {"has_def": has_def, "frequent_word_share": frequent_word_share}
    return {"rows": rows, "references": references, "reward_funcs": [functions[name] for name in rewards],
            "frequent_words": sorted(top)}


def arithmetic_task(s: dict[str, Any]) -> dict[str, Any]:
    """Prompts "a + b =" after three worked examples; the column ``solution`` (not "answer": a record's answer
    field would become the example's answer in the library's readers) is the right sum."""
    rng = random.Random("rl:arithmetic")

    def arithmetic(completions, solution, **kwargs):
        out = []
        for c, right in zip(completions, solution):
            m = re.match(r"\s*(-?\d+)", c)
            if m is None:
                out.append(0.0)
            elif int(m.group(1)) == int(right):
                out.append(1.0)
            else:
                out.append(0.5 * max(0.0, 1.0 - abs(int(m.group(1)) - int(right)) / 10))
        return out

    rows, references = [], []
    for _ in range(s["prompts"]):
        a, b = rng.randint(s["low"], s["high"]), rng.randint(s["low"], s["high"])
        prompt = f"{ARITHMETIC_PREFIX}{a} + {b} ="
        rows.append({"prompt": prompt, "solution": str(a + b)})
        references.append({"prompt": prompt, "completion": f" {a + b}\n"})
    return {"rows": rows, "references": references, "reward_funcs": [arithmetic]}


def preference_pairs(tokenizer, texts: dict[str, list[str]], train: list[str], rejected: str,
                     s: dict[str, Any]) -> list[dict[str, str]]:
    """prompt = the first ``prompt_tokens`` tokens of a training text, chosen = its next ``completion_tokens``;
    rejected = the chosen words shuffled, or ``completion_tokens`` tokens from the middle of a text of the domain
    ``rejected`` (its texts in a seeded order). A pair whose prompt tokens would merge into a completion's first
    token (:func:`keeps_prefix`) is left out."""
    rng = random.Random(f"rl:dpo:{rejected}")
    p, c = s["prompt_tokens"], s["completion_tokens"]
    others = list(texts[rejected]) if rejected != "shuffled" else []
    rng.shuffle(others)
    pairs = []
    for i, text in enumerate(train):
        prompt, chosen = split_on_token_boundary(tokenizer, text, p, c)
        if not prompt.strip() or len(chosen.split()) < 4:
            continue
        if rejected == "shuffled":
            words = chosen.split()
            while True:
                rng.shuffle(words)
                if " ".join(words) != " ".join(chosen.split()):
                    break
            bad = " " + " ".join(words)
        else:
            other = others[i % len(others)]
            bad = next((b for b in (token_slice(tokenizer, other, p + k, p + k + c) for k in range(8))
                        if keeps_prefix(tokenizer, prompt, b)), None)
        if bad is None or not keeps_prefix(tokenizer, prompt, chosen) or not keeps_prefix(tokenizer, prompt, bad):
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": bad})
        if len(pairs) >= s["pairs"]:
            break
    return pairs


# ----------------------------------------------------------------------------------------------- the domain cache

class DomainCache:
    """The base model's statistics of a target domain's sampled token ids, computed once: while ``active()``, the
    library's ``DomainInput.statistics`` is memoized by the exact ids (pairs or single texts) and the SAE layer.
    Use it only while the weights are the base model's."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.store: dict[str, tuple[Any, Any]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(domain_input, extractor, name: str) -> str:
        ids = ([(p.base, p.context, p.counted) for p in domain_input.pairs] if domain_input.pairs is not None
               else domain_input.singles)
        payload = json.dumps([name, getattr(extractor, "layer", None), ids], default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    @contextlib.contextmanager
    def active(self):
        if not self.enabled:
            yield
            return
        from sts_callback.core.stats import TopActivations
        from sts_callback.pipelines.forecast import DomainInput

        original = DomainInput.statistics
        cache = self

        def statistics(domain_input, extractor, name, reservoir=None):
            key = cache.key(domain_input, extractor, name)
            if key not in cache.store:
                cache.misses += 1
                own = TopActivations(reservoir.width, reservoir.k) if reservoir is not None else None
                stats = original(domain_input, extractor, name, own)
                cache.store[key] = (copy.deepcopy(stats), own)
            else:
                cache.hits += 1
            stats, own = cache.store[key]
            if reservoir is not None and own is not None and own.k == reservoir.k:
                reservoir.merge(own)
            return copy.deepcopy(stats)

        DomainInput.statistics = statistics
        try:
            yield
        finally:
            DomainInput.statistics = original


def cached_callback_class(cache: DomainCache):
    """STSCallback whose train-start forecast reads the domain cache (the weights are still the base model's then)."""
    from sts_callback.integrations.callback import STSCallback

    class CachedDomainsSTSCallback(STSCallback):
        def on_train_begin(self, *args, **kwargs):
            with cache.active():
                return super().on_train_begin(*args, **kwargs)

    return CachedDomainsSTSCallback


# ----------------------------------------------------------------------------------------------- precise measurement

class PreciseSample:
    """precise.py's fixed held-out sample (every domain's odd-indexed texts, ``tokens`` per domain, one sample for
    every run) and the base model's per-text NLL on it, read from ``<cache>/precise-base.json`` (computed and written
    there if absent): a run measured on it compares with the SFT units' precise re-runs, text for text."""

    def __init__(self, model, tokenizer, texts, tokens: int, cache: Path):
        from precise import CHEAP_FORECAST, base_nll, precise_sample

        from sts_callback.core.config import STSConfig
        from sts_callback.pipelines.forecast import prompt_builder

        self.tokens = tokens
        self.sample = precise_sample(texts, prompt_builder(model, tokenizer, STSConfig(**CHEAP_FORECAST)), tokens)
        self.before = base_nll(model, tokenizer, self.sample, f"{units.fingerprint(texts)}-{tokens}", cache)

    def measure(self, model, tokenizer) -> dict[str, Any]:
        """Each domain's relative held-out NLL change of ``model`` (the trained policy) with its 95% interval."""
        import torch

        from sts_callback.core.heldout import paired_change, sequence_nll
        from sts_callback.core.torch_utils import pad_token_id
        from sts_callback.pipelines.forecast import inference_mode

        start = time.perf_counter()
        changes = {}
        with inference_mode(model):
            for name, sequences in self.sample.items():
                after = sequence_nll(model, sequences, pad_token_id(tokenizer), 8)
                changes[name] = paired_change(torch.tensor(self.before[name], dtype=torch.float64), after)
        return {"tokens": self.tokens, "loss_delta": {n: c.delta for n, c in changes.items()},
                "loss_delta_ci": {n: [c.low, c.high] for n, c in changes.items()},
                "sequences": {n: c.sequences for n, c in changes.items()}, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- scoring

def forecast_record(forecast, seconds: float) -> dict[str, Any]:
    settings = forecast.settings
    keep = ("shift", "rollouts", "preference_pairs", "identical_pairs_skipped", "demonstrations")
    return {"scores": {d: {f: forecast.domains[d].scores.get(f) for f in FEATURES} for d in forecast.domains},
            "settings": {k: settings[k] for k in keep if k in settings},
            "shifted_latents": list(forecast.shifted_latents), "shift_tokens": forecast.shift_tokens,
            "shift_queries": forecast.shift_queries, "seconds": seconds,
            "forecast_seconds": forecast.timings.get("total")}


def agreement(scores: dict[str, dict[str, Any]], measured: dict[str, float], others: list[str]) -> dict[str, Any]:
    """Per feature over the other domains: Pearson r with the signed change and with its magnitude; for signed
    features the share of domains whose raw sign matches the change's."""
    from sts_callback.scoring.agreement import correlation

    out = {}
    names = [d for d in others if d in scores and measured.get(d) is not None and math.isfinite(measured[d])]
    y = [measured[d] for d in names]
    for feature in FEATURES:
        if any(scores[d].get(feature) is None for d in names):
            continue
        x = [scores[d][feature] for d in names]
        entry = {"r": correlation(x, y, "pearson", n_resamples=0)["r"],
                 "r_abs": correlation(x, [abs(v) for v in y], "pearson", n_resamples=0)["r"], "n": len(names)}
        if feature in SIGNED:
            entry["sign_share"] = sum((a > 0) == (b > 0) for a, b in zip(x, y)) / len(names) if names else None
        out[feature] = entry
    return out


def agreements(forecasts: dict[str, dict[str, Any]], measured: dict[str, float], others: list[str]) -> dict[str, Any]:
    """:func:`agreement` of each forecast variant that has scores (a refused one has none) with ``measured``."""
    return {v: agreement(f["scores"], measured, others) for v, f in forecasts.items() if "scores" in f}


def best_feature(agree: dict[str, Any]) -> tuple[str | None, float | None]:
    rs = [(f, a["r"]) for f, a in agree.items() if a.get("r") is not None]
    return max(rs, key=lambda item: abs(item[1])) if rs else (None, None)


def quarters(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"first_quarter": None, "last_quarter": None, "rise": None, "n": 0}
    q = max(1, len(values) // 4)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    return {"first_quarter": first, "last_quarter": last, "rise": last - first, "n": len(values)}


def sft_unit_comparison(source: str, measured: dict[str, float], others: list[str], unit_dir: Path) -> dict | None:
    path = unit_dir / f"lora-{source}-seed0.json"
    if not path.exists():
        return None
    from sts_callback.scoring.agreement import correlation

    unit = json.loads(path.read_text())
    result = unit["result"]
    names = [d for d in others if d in result["nll_delta_rel"] and d in measured]
    return {"unit": unit["unit"], "nll_delta_rel": result["nll_delta_rel"],
            "sft_agreement": agreement(result["scores"], result["nll_delta_rel"], names),
            "measured_vs_sft_measured_r": correlation([measured[d] for d in names],
                                                      [result["nll_delta_rel"][d] for d in names], "pearson",
                                                      n_resamples=0)["r"]}


# ----------------------------------------------------------------------------------------------- runs

def measured_effect(cb) -> dict[str, Any]:
    last = cb.history[-1]
    if "error" in last:
        raise RuntimeError(f"the final re-check failed: {last['error']}")
    keep = ("step", "loss_delta", "loss_delta_ci", "overlap_with_forecast", "seconds")
    return {"loss_delta": dict(last["loss_delta"]), "loss_delta_ci": dict(last.get("loss_delta_ci") or {}),
            "base_losses": {d: float(v) for d, v in (cb.base_losses or {}).items()},
            "trajectory": [{k: r[k] for k in keep if k in r} for r in cb.history]}


def log_rows(log_history: list[dict], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"step": e.get("step"), **{k: e[k] for k in keys if k in e}} for e in log_history
            if any(k in e for k in keys)]


def train(kind: str, model, tokenizer, sae_path, data, targets, config, callback_sizes, trainer_args: dict,
          reward_funcs, cache: DomainCache, work: Path, seed: int = 0, precise: PreciseSample | None = None,
          teacher=None):
    """Train a LoRA copy of ``model`` with the callback; returns (callback, trainer log, seconds, the trained
    policy measured on ``precise`` or None)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    set_seed(seed)
    steps = trainer_args["max_steps"]
    every = max(1, steps // callback_sizes["rechecks"])
    cb = cached_callback_class(cache)(
        sae=str(sae_path), target_domains=targets, config=config, recheck_steps=every, recheck_at_end=True,
        recheck_tokens=callback_sizes["recheck_tokens"], loss_tokens=callback_sizes["loss_tokens"],
        loss_precision=None, strict=True)
    # fp32 without gradient checkpointing, as the SFT units: TRL's configs default to bf16=True (even on CPU; accelerate
    # then wraps model.forward in bf16 autocast, so the callback's own forecast would not run in the precision of
    # the forecasts made before training) and to gradient checkpointing (slower; memory is no constraint here).
    common = {"output_dir": str(work), "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no",
              "lr_scheduler_type": "constant", "seed": seed, "data_seed": seed, "disable_tqdm": True, "bf16": False,
              "gradient_checkpointing": False}
    peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    policy = copy.deepcopy(model)  # the base model stays untouched for the next run
    tokenizer = copy.deepcopy(tokenizer)  # the trainers set padding sides and pad tokens on theirs
    dataset = Dataset.from_list(data)
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, **trainer_args)
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[cb], peft_config=peft_config)
    elif kind == "distill":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, **trainer_args)
        trainer = DistillationTrainer(model=policy, teacher_model=teacher, args=args, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[cb], peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **trainer_args)
        trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[cb], peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    log = list(trainer.state.log_history)
    measured_precise = precise.measure(trainer.model, tokenizer) if precise is not None else None
    del trainer, policy
    return cb, log, seconds, measured_precise


def run_grpo(name: str, spec: dict, model, tokenizer, sae_path, texts, sz, cache: DomainCache, work: Path,
             precise: PreciseSample | None = None, forecast_only: bool = False) -> dict:
    from sts_callback import forecast as sft_forecast
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.rollouts import rollout_forecast

    t_start = time.perf_counter()
    source, task = spec["source"], spec["task"]
    s = sz["grpo"][spec.get("size", task)]
    if source in texts:
        train_texts, targets = units.split(source, texts)
    else:
        train_texts, targets = [], {d: texts[d] for d in sorted(texts)}
    word_texts = texts[spec["reward_domain"]][0::2] if "reward_domain" in spec else None  # its training half
    built = (keywords_task(tokenizer, train_texts, s, spec["rewards"], word_texts) if task == "keywords"
             else arithmetic_task(s))
    rows, funcs = built["rows"], built["reward_funcs"]
    trainer_args = {"max_steps": s["steps"], "per_device_train_batch_size": s["per_device_train_batch_size"],
                    "num_generations": s["num_generations"], "max_completion_length": s["max_completion_length"],
                    "learning_rate": s["learning_rate"], "temperature": 1.0, "top_k": 0,
                    **({"beta": s["beta"]} if "beta" in s else {})}  # TRL's default beta=0: no KL term
    config = STSConfig(**sz["forecast"])
    seconds = {"data": time.perf_counter() - t_start}
    forecasts = forecasts_before_training(cache, (
        ("reward_weighted", lambda: rollout_forecast(model, tokenizer, sae_path, rows, funcs, targets, config,
                                                     settings=trainer_args_settings(trainer_args),
                                                     shift="reward_weighted")),
        ("reward_filtered", lambda: rollout_forecast(model, tokenizer, sae_path, rows, funcs, targets, config,
                                                     settings=trainer_args_settings(trainer_args),
                                                     shift="demonstrations")),
        ("plain_demonstrations", lambda: sft_forecast(model, tokenizer, sae_path, built["references"], targets,
                                                      config))), seconds)
    if forecast_only:
        return {"forecasts": forecasts, "seconds": seconds}
    print(f"   training {trainer_args['max_steps']} GRPO steps ...", flush=True)
    cb, log, seconds["train_with_callback"], measured_precise = train(
        "grpo", model, tokenizer, sae_path, rows, targets, config, sz["callback"], trainer_args, funcs, cache,
        work / name, precise=precise)
    if cb.forecast is not None:
        forecasts["callback"] = forecast_record(cb.forecast, cb.forecast.timings.get("total", 0.0))
    reward_keys = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "loss", "kl",
                   *(f"rewards/{f.__name__}/mean" for f in funcs))
    trajectory = log_rows(log, reward_keys)
    rewards = [e["reward"] for e in trajectory if "reward" in e]
    extra = {"task": task, "reward_funcs": [f.__name__ for f in funcs], "prompts": len(rows),
             "example_prompt": rows[0]["prompt"], **({"frequent_words": built["frequent_words"]}
                                                     if "frequent_words" in built else {})}
    return finish(name, spec, source, targets, trainer_args, sz, forecasts, cb, trajectory,
                  {"reward": quarters(rewards)}, seconds, t_start, extra, measured_precise)


def make_teacher(model, tokenizer, texts: list[str], s: dict[str, Any], work: Path, seed: int = 0):
    """The base model after LoRA SFT on ``texts`` (``teacher_steps`` steps), the adapters merged: a specialist of
    their domain that shares the student's tokenizer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=s["teacher_tokens"]), batched=True,
        remove_columns=["text"])
    teacher = get_peft_model(copy.deepcopy(model), LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(output_dir=str(work), max_steps=s["teacher_steps"], learning_rate=s["teacher_lr"],
                             per_device_train_batch_size=s["teacher_batch"], lr_scheduler_type="constant",
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=seed,
                             disable_tqdm=True, bf16=False)
    trainer = Trainer(model=teacher, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    merged = trainer.model.merge_and_unload()
    merged.eval()
    return merged, {"steps": s["teacher_steps"], "loss": quarters(losses)}


def run_distill(name: str, spec: dict, model, tokenizer, sae_path, texts, sz, cache: DomainCache, work: Path,
                precise: PreciseSample | None = None) -> dict:
    from sts_callback import forecast as sft_forecast
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.distillation import distillation_forecast

    t_start = time.perf_counter()
    source, s = spec["source"], sz["distill"][spec.get("size", "default")]
    train_texts, targets = units.split(source, texts)
    print(f"   teacher: {s['teacher_steps']} SFT steps on {spec['teacher_domain']} ...", flush=True)
    teacher, teacher_info = make_teacher(model, tokenizer, texts[spec["teacher_domain"]][0::2], s,
                                         work / name / "teacher")
    built = keywords_task(tokenizer, train_texts, {**s, "frequent_words": 0}, ())
    rows = built["rows"]
    trainer_args = {"max_steps": s["steps"], "per_device_train_batch_size": s["per_device_train_batch_size"],
                    "max_completion_length": s["max_completion_length"], "learning_rate": s["learning_rate"],
                    "temperature": s["temperature"], "top_k": 0}
    settings = {k: trainer_args[k] for k in ("max_completion_length", "temperature", "top_k")}
    # STS samples completions as long as the trainer's (ROLLOUT's 16-token cap would cut the long runs')
    config = STSConfig(**{**sz["forecast"], "rollout_max_tokens": max(sz["forecast"]["rollout_max_tokens"],
                                                                       s["max_completion_length"])})
    seconds = {"data_and_teacher": time.perf_counter() - t_start}
    forecasts = forecasts_before_training(cache, (
        *((shift, lambda shift=shift: distillation_forecast(model, teacher, tokenizer, sae_path, rows, targets, config,
                                                             settings=settings, shift=shift))
          for shift in ("teacher_completions", "teacher_vs_student")),
        ("plain_demonstrations", lambda: sft_forecast(model, tokenizer, sae_path, built["references"], targets,
                                                      config))), seconds)
    print(f"   training {trainer_args['max_steps']} distillation steps ...", flush=True)
    cb, log, seconds["train_with_callback"], measured_precise = train(
        "distill", model, tokenizer, sae_path, rows, targets, config, sz["callback"], trainer_args, None, cache,
        work / name, precise=precise, teacher=teacher)
    if cb.forecast is not None:
        forecasts["callback"] = forecast_record(cb.forecast, cb.forecast.timings.get("total", 0.0))
    trajectory = log_rows(log, ("loss", "completions/mean_length", "entropy"))
    losses = [e["loss"] for e in trajectory if "loss" in e]
    extra = {"teacher": {"domain": spec["teacher_domain"], **teacher_info}, "prompts": len(rows),
             "example_prompt": rows[0]["prompt"]}
    return finish(name, spec, source, targets, trainer_args, sz, forecasts, cb, trajectory,
                  {"distillation_loss": quarters(losses)}, seconds, t_start, extra, measured_precise)


def forecasts_before_training(cache: DomainCache, calls, seconds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each ``(variant, call)`` forecast of the base model, timed (:func:`timed_forecast`) with the domain cache on;
    its seconds go into ``seconds`` as ``forecast/<variant>``."""
    forecasts = {}
    with cache.active():
        for variant, call in calls:
            forecasts[variant] = timed_forecast(variant, call)
            seconds[f"forecast/{variant}"] = forecasts[variant]["seconds"]
    return forecasts


def timed_forecast(variant: str, call) -> dict[str, Any]:
    """One forecast variant, timed; a refusal (e.g. rewards without signal: STSInputError; a teacher that writes as
    the student: STSNumericalError) is recorded, not raised."""
    from sts_callback import STSInputError, STSNumericalError

    print(f"   forecast {variant} ...", flush=True)
    t0 = time.perf_counter()
    try:
        return forecast_record(call(), time.perf_counter() - t0)
    except (STSInputError, STSNumericalError) as err:
        print(f"   forecast {variant} refused: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - t0}


def trainer_args_settings(trainer_args: dict) -> dict:
    """The GRPOConfig fields the rollouts follow (RolloutSettings' names), as the trainer will use them."""
    return {k: trainer_args[k] for k in ("num_generations", "max_completion_length", "temperature", "top_k")}


def run_dpo(name: str, spec: dict, model, tokenizer, sae_path, texts, sz, cache: DomainCache, work: Path,
            precise: PreciseSample | None = None, forecast_only: bool = False) -> dict:
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.preference import preference_forecast

    t_start = time.perf_counter()
    source, s = spec["source"], sz["dpo"]
    train_texts, targets = units.split(source, texts)
    pairs = preference_pairs(tokenizer, texts, train_texts, spec["rejected"], s)
    trainer_args = {"max_steps": s["steps"], "per_device_train_batch_size": s["per_device_train_batch_size"],
                    "learning_rate": s["learning_rate"], "beta": s["beta"],
                    "max_length": s["prompt_tokens"] + s["completion_tokens"] + 16}
    config = STSConfig(**sz["forecast"])
    seconds = {"data": time.perf_counter() - t_start}
    forecasts = forecasts_before_training(cache, (
        (shift, lambda shift=shift: preference_forecast(model, tokenizer, sae_path, pairs, targets, config,
                                                        shift=shift))
        for shift in ("chosen_vs_rejected", "in_context")), seconds)
    if forecast_only:
        return {"forecasts": forecasts, "seconds": seconds}
    print(f"   training {trainer_args['max_steps']} DPO steps ...", flush=True)
    cb, log, seconds["train_with_callback"], measured_precise = train(
        "dpo", model, tokenizer, sae_path, pairs, targets, config, sz["callback"], trainer_args, None, cache,
        work / name, precise=precise)
    if cb.forecast is not None:
        forecasts["callback"] = forecast_record(cb.forecast, cb.forecast.timings.get("total", 0.0))
    trajectory = log_rows(log, ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"))
    extra = {"rejected": spec["rejected"], "pairs": len(pairs), "example_pair": pairs[0]}
    return finish(name, spec, source, targets, trainer_args, sz, forecasts, cb, trajectory,
                  {"margin": quarters([e["rewards/margins"] for e in trajectory if "rewards/margins" in e]),
                   "accuracy": quarters([e["rewards/accuracies"] for e in trajectory if "rewards/accuracies" in e])},
                  seconds, t_start, extra, measured_precise)


def finish(name, spec, source, targets, trainer_args, sz, forecasts, cb, trajectory, rise, seconds, t_start,
           extra, measured_precise=None) -> dict:
    measured = measured_effect(cb)
    others = [d for d in sorted(targets) if d != source]
    agree = agreements(forecasts, measured["loss_delta"], others)
    precise = {}
    if measured_precise is not None:
        seconds["precise_measure"] = measured_precise["seconds"]
        precise = {"measured_precise": measured_precise,
                   "agreement_precise": agreements(forecasts, measured_precise["loss_delta"], others)}
    checks = {}
    twin = {"grpo": "reward_filtered", "distill": "teacher_completions"}.get(spec["kind"], "chosen_vs_rejected")
    # the callback's own (shift "auto") forecast vs the same variant made before training: equal in fp32
    if "scores" in forecasts.get("callback", {}) and "scores" in forecasts.get(twin, {}):
        mine, theirs = forecasts[twin]["scores"], forecasts["callback"]["scores"]
        diffs = {}
        for f in FEATURES:  # largest difference over the domains, relative to the feature's largest |value|
            pairs = [(mine[d][f], theirs[d][f]) for d in mine if mine[d][f] is not None and theirs[d][f] is not None]
            scale = max((abs(a) for a, _ in pairs), default=0.0)
            if pairs and scale > 0:
                diffs[f] = max(abs(a - b) for a, b in pairs) / scale
        checks["callback_vs_" + twin] = {
            "max_scaled_difference": diffs, "shift": forecasts["callback"]["settings"].get("shift"),
            "same_shifted_latents": forecasts["callback"]["shifted_latents"] == forecasts[twin]["shifted_latents"]}
    seconds["total"] = time.perf_counter() - t_start
    return {"format": "sts-rl-run/1", "run": name, **spec, "others": others, "training": {
                "method": "lora", "lora": LORA, **trainer_args},
            "callback": {k: v for k, v in sz["callback"].items()}, "config": dict(sz["forecast"]),
            "reward_rise": rise, "trajectory": trajectory, "measured": measured, **precise, "forecasts": forecasts,
            "agreement": agree, "checks": checks,
            "sft_unit": sft_unit_comparison(source, measured["loss_delta"], others, units.UNITS),
            "task": extra, "seconds": seconds, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU"}


def reforecast(run: dict, fresh: dict, commit: str) -> dict:
    """``run`` (a finished run's record) with its before-training forecasts made again by the package at ``commit``
    and scored on the same measured changes: what a change in how the forecast reads the data does to the run's
    numbers, with no training again. The run's own forecasts and agreements are kept under ``forecasts_before`` /
    ``agreement_before`` / ``agreement_precise_before``; the callback's train-start forecast is the run's."""
    others = run["others"]
    forecasts = {**fresh["forecasts"], **({"callback": run["forecasts"]["callback"]}
                                          if "callback" in run["forecasts"] else {})}
    out = {**run, "forecasts": forecasts,
           "forecasts_before": {v: f for v, f in run["forecasts"].items() if v != "callback"},
           "agreement_before": run["agreement"],
           "agreement": agreements(forecasts, run["measured"]["loss_delta"], others),
           "reforecast": {"commit": commit, "date": time.strftime("%Y-%m-%d"), "seconds": fresh["seconds"],
                          "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU"}}
    if "measured_precise" in run:
        out["agreement_precise_before"] = run["agreement_precise"]
        out["agreement_precise"] = agreements(forecasts, run["measured_precise"]["loss_delta"], others)
    return out


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------- table

def fmt(value, spec="+.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    print(f"\n{'run':<30} {'variant':<21} {'best feature':<26} {'r':>6} {'r_icl':>6} {'sign fmt':>8} "
          f"{'reward / margin / loss: first -> last quarter':>30}")
    for data in results:
        rise = data["reward_rise"]
        key = next(k for k in ("reward", "margin", "distillation_loss") if k in rise)
        q = rise[key]
        reward = f"{key} {fmt(q['first_quarter'])} -> {fmt(q['last_quarter'])}"
        for variant, agree in data["agreement"].items():
            feature, r = best_feature(agree)
            icl = agree.get("sts_icl", {}).get("r")
            share = agree.get("forgetting_minus_transfer", {}).get("sign_share")
            print(f"{data['run']:<30} {variant:<21} {feature or 'n/a':<26} {fmt(r):>6} {fmt(icl):>6} "
                  f"{fmt(share, '.0%'):>8} {reward:>30}")
        m = data["measured"]["loss_delta"]
        own = m.get(data["source"])
        spread = [m[d] for d in data["others"] if m.get(d) is not None]
        print(f"{'':<30} measured: own {fmt(own, '+.2%')}, others {fmt(min(spread), '+.2%')} .. "
              f"{fmt(max(spread), '+.2%')}; {data['seconds']['total'] / 60:.1f} min"
              + (f"; vs SFT unit measured r {fmt(data['sft_unit']['measured_vs_sft_measured_r'])}"
                 if data.get("sft_unit") else ""))
        if "measured_precise" in data:
            p = data["measured_precise"]["loss_delta"]
            cells = ", ".join(f"{variant} {fmt(agree.get('sts_icl', {}).get('r'))}"
                              for variant, agree in data["agreement_precise"].items())
            print(f"{'':<30} precise ({data['measured_precise']['tokens']} tokens): own {fmt(p.get(data['source']), '+.2%')}"
                  f", others {fmt(min(p[d] for d in data['others']), '+.2%')} .. "
                  f"{fmt(max(p[d] for d in data['others']), '+.2%')}; r_icl {cells}")
    print("r: Pearson with the signed measured change over the other domains (best feature by |r|; r_icl: sts_icl);"
          " sign fmt: share of those domains where forgetting_minus_transfer > 0 <=> the loss rose.")


# ----------------------------------------------------------------------------------------------- main

def only_these(parser: argparse.ArgumentParser, names: list[str], only: list[str] | None, unknown: str) -> list[str]:
    """``names`` kept to those ``--only`` lists, by name or shell pattern (all without it); one that matches none
    is a usage error, ``unknown`` formatted with them."""
    from fnmatch import fnmatch

    if not only:
        return names
    missing = sorted(p for p in only if not any(fnmatch(n, p) for n in names))
    if missing:
        parser.error(unknown.format(missing))
    return [n for n in names if any(fnmatch(n, p) for p in only)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--only", nargs="+", help="run only these runs (names as --list prints them)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=Path("outputs/transfer-rl"))
    parser.add_argument("--smoke", action="store_true", help="shrink every size (checks the script, ~4 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the docstring)")
    parser.add_argument("--no-domain-cache", action="store_true", help="recompute every domain pass")
    parser.add_argument("--reforecast", type=Path, metavar="DIR",
                        help="make the before-training forecasts of the runs in --out again (GRPO and DPO; no "
                             "training) and write each run, scored on its measured changes, to DIR (resumable)")
    args = parser.parse_args()

    names = list(RUNS)
    if args.list:
        for name in names:
            print(f"{name:<36} {'done' if (args.out / f'{name}.json').exists() else 'todo'}")
        return
    names = only_these(parser, names, args.only, "unknown run(s) {}; --list prints the plan")
    if args.reforecast:
        names = [n for n in names if RUNS[n]["kind"] in ("grpo", "dpo") and (args.out / f"{n}.json").exists()]
        todo = [n for n in names if not (args.reforecast / f"{n}.json").exists()]
        print(f"{len(todo)} of {len(names)} runs to forecast again", flush=True)
        results = [json.loads((args.reforecast / f"{n}.json").read_text()) for n in names if n not in todo]
    else:
        todo = [n for n in names if not (args.out / f"{n}.json").exists()]
        print(f"{len(todo)} of {len(names)} runs to run", flush=True)
        results = [json.loads((args.out / f"{n}.json").read_text()) for n in names if n not in todo]

    if todo:
        import torch

        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", message=".*(padding_side|generation flags|use_cache).*")
        from sts_callback.tools.demo import ensure_demo_sae
        from sts_callback.tools.models import load_gemma3_270m

        t0 = time.perf_counter()
        model, tokenizer = load_gemma3_270m()
        sae_path = ensure_demo_sae(model, tokenizer)
        texts = units.domain_texts(units.UNITS)  # the frozen snapshot (never --out's folder)
        print(f"domains {units.fingerprint(texts)}; model and SAE in {time.perf_counter() - t0:.0f} s; "
              f"{torch.get_num_threads()} thread(s)", flush=True)
        sz = sizes(args.smoke)
        cache = DomainCache(enabled=not args.no_domain_cache)
        precise = None
        wanted = [] if args.reforecast else [RUNS[n]["precise_tokens"] for n in todo if RUNS[n].get("precise_tokens")]
        if wanted:  # the smoke measures a small sample, cached in its own --out (never the units' cache)
            precise = PreciseSample(model, tokenizer, texts, sz["precise_tokens"] or max(wanted),
                                    args.out if args.smoke else units.UNITS)
            print(f"precise sample: {precise.tokens} tokens per domain", flush=True)
        for name in todo:
            spec = RUNS[name]
            print(f"== {name} ({time.strftime('%H:%M:%S')}) ==", flush=True)
            runner = {"grpo": run_grpo, "distill": run_distill}.get(spec["kind"], run_dpo)
            if args.reforecast:
                run = json.loads((args.out / f"{name}.json").read_text())
                if bool(run.get("smoke")) != args.smoke:  # its measured changes are of other sizes
                    parser.error(f"{name} was run {'with' if run.get('smoke') else 'without'} --smoke; forecast it "
                                 "again the same way")
                fresh = runner(name, spec, model, tokenizer, sae_path, texts, sz, cache, args.work, forecast_only=True)
                data = reforecast(run, fresh, git_commit())
                units.write_json(args.reforecast / f"{name}.json", data)
                results.append(data)
                print(f"   forecast again in {sum(fresh['seconds'].values()) / 60:.1f} min", flush=True)
                continue
            data = runner(name, spec, model, tokenizer, sae_path, texts, sz, cache, args.work,
                          precise if spec.get("precise_tokens") else None)
            data.update({"smoke": args.smoke, "threads": torch.get_num_threads(),
                         "domains_fingerprint": units.fingerprint(texts),
                         "domain_cache": {"enabled": cache.enabled, "hits": cache.hits, "misses": cache.misses}})
            units.write_json(args.out / f"{name}.json", data)
            results.append(data)
            print(f"   done in {data['seconds']['total'] / 60:.1f} min", flush=True)
    results.sort(key=lambda d: names.index(d["run"]) if d["run"] in names else len(names))
    if results:
        print_table(results)


if __name__ == "__main__":
    main()
