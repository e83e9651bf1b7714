"""The shift of the SAE latents a trainer's training pushes (the rule and the shifts:
:mod:`~sts_callback.pipelines.shifts`), read from the trainer: its reward functions, teacher, data and settings.

Under RL and distillation the policy's (student's) rollouts also become the re-check probe (:func:`rollout_probe`):
the shift is measured on what the policy writes, and each re-check samples the current policy's completions of fresh
prompts (:func:`fresh_rollout_probe`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.data import Corpus, TokenSequence, load_corpus
from ..core.distributed import warn_on_main
from ..core.errors import ForecastSkipped, STSDataWarning, STSInputError, first_line
from ..pipelines.forecast import ForecastRun, ForecastSetup, run_forecast
from ..pipelines.preference import Truncation, completion_sequence, run_preference_forecast
from ..pipelines.monitor import peft_model_of
from ..pipelines.distillation import (DISTILLATION_SHIFTS, distillation_settings, run_distillation_forecast,
                                     sample_teacher_and_student)
from ..pipelines.rollouts import (RewardModelFunction, RolloutSettings, Rollouts, completion_budget, draw_prompts,
                                  is_reward_model, prompt_records, reward_func_list, run_rollout_forecast,
                                  sample_rollouts)
from ..pipelines.shifts import RL_SHIFTS, SHIFTS, check_shift, choose_shift, data_columns


def resolve_shift(shift: str, trainer: Any, data: Any, has_demonstrations: bool) -> str:
    """The shift to forecast with for ``trainer`` (:func:`~sts_callback.pipelines.shifts.choose_shift`)."""
    return choose_shift(shift, data, rl=is_rl(trainer), teacher=teacher_of(trainer) is not None,
                        has_demonstrations=has_demonstrations, where=f"this is a {type(trainer).__name__}")


ROLLOUT_SHIFTS = (*RL_SHIFTS, *DISTILLATION_SHIFTS)  # sampled at train start; the policy's rollouts are the probe
# The re-check probe's rewards failing this many re-checks in a row are left out for the rest of the run.
REWARD_FAILURES_TO_GIVE_UP = 3


def teacher_of(trainer: Any) -> Any:
    """A distillation trainer's teacher (TRL's ``DistillationTrainer``, GKD: ``teacher_model``), else ``None``."""
    return getattr(trainer, "teacher_model", None)


def is_rl(trainer: Any) -> bool:
    """An RL trainer: one with reward functions (TRL's GRPO, RLOO, online DPO, ...)."""
    return getattr(trainer, "reward_funcs", None) is not None


def is_online(trainer: Any) -> bool:
    """The trainer samples completions from the policy as it trains (RL with reward functions, distillation)."""
    return is_rl(trainer) or teacher_of(trainer) is not None


def unreproduced_generation(trainer: Any) -> list[str]:
    """What an RL or distillation trainer generates with beyond sampling its prompts (TRL's ``tools``,
    ``environment_factory``, ``rollout_func``: tool calls, environment turns, custom rollouts; a teacher prompted
    with more than the student sees, e.g. SDFT's ``teacher_prompt_template`` with privileged context), which STS's
    rollouts do not reproduce."""
    found = [name for name, attribute in (("tools", "tools"), ("environment_factory", "environment_factories"),
                                          ("rollout_func", "rollout_func")) if getattr(trainer, attribute, None)]
    teacher, args = teacher_of(trainer), getattr(trainer, "args", None)
    if teacher is not None:
        if getattr(args, "teacher_prompt_template", None):
            found.append("a teacher_prompt_template (the teacher sees privileged context the student does not)")
        if getattr(args, "use_uld_loss", False) or getattr(args, "teacher_tokenizer_name_or_path", None):
            found.append("a teacher with its own tokenizer (STS would feed it the student's token ids)")
        if teacher is getattr(trainer, "model", None):
            found.append("the student as its own teacher (self-distillation)")
    return found


def likelihood_term(trainer: Any) -> str | None:
    """A preference trainer's loss term on the likelihood of given answers beside the preference (ORPO's; CPO's
    ``cpo_alpha``; TPO's ``tpo_alpha`` on the ``reference`` answers; DPO's ``"sft"`` loss type), which the
    chosen-minus-rejected shift leaves out; ``None`` without one."""
    args = getattr(trainer, "args", None)
    if any(cls.__name__.startswith("ORPO") for cls in type(trainer).__mro__):
        return "ORPO's log-likelihood of the chosen answers"
    for name, answers in (("cpo_alpha", "chosen"), ("tpo_alpha", "reference")):
        weight = getattr(args, name, None)
        if isinstance(weight, (int, float)) and weight > 0:
            return f"the log-likelihood of the {answers} answers ({name}={weight:g})"
    types = getattr(args, "loss_type", None) or []
    types = [types] if isinstance(types, str) else list(types)
    weights = list(getattr(args, "loss_weights", None) or [1.0] * len(types))
    if any(kind == "sft" and weight for kind, weight in zip(types, weights)):
        return "the log-likelihood of the chosen answers (loss_type 'sft')"
    # losses on each answer's own log-ratio to the reference, not only their margin: they move the likelihood of
    # the chosen (up) and rejected (down) answers themselves
    anchored = [kind for kind, weight in zip(types, weights) if kind in ANCHORED_LOSS_TYPES and weight]
    if anchored:
        return f"each answer's own likelihood against the reference (loss_type {', '.join(map(repr, anchored))})"
    return None


ANCHORED_LOSS_TYPES = ("apo_zero", "apo_down", "nca_pair", "bco_pair", "sppo_hard")


def rollout_data(train_probe: Any, trainer: Any) -> Any:
    """The prompts an RL run's rollouts are drawn from: ``train_probe`` when it holds prompts (a ``prompt`` column,
    with the columns the reward functions read), else the trainer's own train dataset."""
    if train_probe is not None and "prompt" in data_columns(train_probe):
        return train_probe
    return getattr(trainer, "train_dataset", None)


def trainer_reward_funcs(trainer: Any) -> list[Any]:
    """The trainer's reward functions, each reward model (GRPOTrainer loads a model id into one, beside its
    tokenizer in ``reward_processing_classes``) as a function scoring as the trainer does."""
    funcs = reward_func_list(trainer.reward_funcs)
    tokenizers = list(getattr(trainer, "reward_processing_classes", None) or [None] * len(funcs))
    kwargs = getattr(trainer, "chat_template_kwargs", None) or getattr(trainer.args, "chat_template_kwargs", None)
    return [RewardModelFunction(f, t, kwargs if isinstance(kwargs, dict) else None)
            if isinstance(f, nn.Module) and t is not None else f for f, t in zip(funcs, tokenizers)]


def trainer_rollouts(trainer: Any, data: Any, setup: ForecastSetup, state: Any = None,
                     progress: bool = False) -> Rollouts:
    """The policy's rollouts on a seeded sample of the training prompts, with the trainer's generation settings,
    reward functions (reward models scoring as the trainer does) and weights (the same on every rank)."""
    return sample_rollouts(setup.model, setup.builder.tokenizer, data, trainer_reward_funcs(trainer), setup.config,
                           _rollout_settings(trainer), trainer_state=state, progress=progress, builder=setup.builder,
                           async_loop=getattr(trainer, "async_loop", None))


def trainer_distillation_rollouts(trainer: Any, data: Any, setup: ForecastSetup, progress: bool = False,
                                  ) -> tuple[Rollouts, Rollouts]:
    """The teacher's and the student's completions of the forecast's seeded draw of the training prompts, with the
    trainer's generation settings (the same on every rank)."""
    return sample_teacher_and_student(setup, teacher_of(trainer), data, distillation_settings(trainer.args),
                                      progress=progress)


def rollout_probe(rollouts: Rollouts, setup: ForecastSetup, budget: int) -> list[TokenSequence]:
    """The re-check probe of an RL run: the rollouts' completions after their prompts (what the policy writes,
    not the bare prompts), a seeded sample of about ``budget`` completion tokens."""
    sequences = [completion_sequence(setup.builder, g.prompt_ids, ids) for g in rollouts.groups
                 for ids in g.completion_ids]
    sequences = [s for s in sequences if any(s[1])]
    random.Random(f"{setup.config.seed}:rollout-probe").shuffle(sequences)
    chosen, tokens = [], 0
    for sequence in sequences:
        if tokens >= budget:
            break
        chosen.append(sequence)
        tokens += sum(sequence[1])
    return chosen


@dataclass
class FreshProbe:
    """An RL or distillation run's re-check probe source (:func:`fresh_rollout_probe`): ``(model, step) ->
    (sequences, base model or None, what to record)``. ``from_disabled_adapters``: the base residuals come from
    the adapters-disabled model (a PEFT run without a reference model), the run's start only where the adapters
    start at zero (``Monitor.adapters_start_at_the_base`` decides at train start)."""

    draw: Callable[[Any, int], tuple[list[TokenSequence], Any, dict[str, Any]]]
    from_disabled_adapters: bool

    def __call__(self, model: Any, step: int) -> tuple[list[TokenSequence], Any, dict[str, Any]]:
        return self.draw(model, step)


def fresh_rollout_probe(trainer: Any, data: Any, setup: ForecastSetup, budget: int) -> FreshProbe | None:
    """An RL trainer's re-check probe source: at the re-check of step s, the current policy's completions (2 per
    prompt, the trainer's generation settings) of a seeded draw of fresh prompts (not the forecast's), about
    ``budget`` completion tokens, with the model that gives their base residuals: the trainer's ``ref_model``,
    or ``None`` for the adapters-disabled model of a PEFT run. ``None`` itself when there is no base to run (a
    full fine-tune without a reference model, e.g. GRPO with ``beta=0`` or a distillation) or the trainer samples
    nothing (not RL nor distillation). A reference synced to the policy (``sync_ref_model``) is none."""
    if not is_online(trainer):
        return None
    reference = getattr(trainer, "ref_model", None)
    if getattr(trainer.args, "sync_ref_model", False):
        reference = None  # TRL moves it toward the policy (every ref_model_sync_steps): not the train-start weights
    if reference is None and peft_model_of(trainer.model) is None:
        return None
    rl = is_rl(trainer)
    settings = _rollout_settings(trainer) if rl else distillation_settings(trainer.args)
    config = setup.config
    longest = completion_budget(settings, config)
    prompts = max(2, math.ceil(budget / (2 * longest)))
    two_each = dataclasses.replace(config, rollout_generations=2)
    records = prompt_records(data)  # each row read when a re-check first draws it, then kept
    # the probe needs the completions; their rewards are only a summary, which reward models cannot give here
    funcs = trainer_reward_funcs(trainer) if rl else []
    score = rl and not any(is_reward_model(f) for f in funcs)
    watched = weakref.ref(trainer)  # the probe outlives the run in the session: it must not keep the trainer alive

    def sample(model: Any, indices: list[int], scored: bool | None = None) -> Rollouts:
        trainer_now = watched()
        return sample_rollouts(model, setup.builder.tokenizer, records, funcs, two_each, settings,
                               trainer_state=getattr(trainer_now, "state", None), builder=setup.builder,
                               prompt_indices=indices, score=score if scored is None else scored,
                               async_loop=getattr(trainer_now, "async_loop", None))
    failed_in_a_row = 0

    def probe(model: Any, step: int) -> tuple[list[TokenSequence], Any, dict[str, Any]]:
        nonlocal score, failed_in_a_row
        indices = draw_prompts(len(records), config, f"recheck:{step}", prompts)
        reward_error = None
        try:
            rollouts = sample(model, indices)
            failed_in_a_row = 0
        except STSInputError as err:  # the rewards are only the probe's summary, not worth its measurement: a
            if not score:             # reward failing once (a reward API's timeout) leaves out this re-check's,
                raise                 # one failing every time (it reads whole groups of num_generations) the run's
            failed_in_a_row += 1
            reward_error = first_line(err)
            score = failed_in_a_row < REWARD_FAILURES_TO_GIVE_UP
            then = (f"the next re-check scores them again (after {REWARD_FAILURES_TO_GIVE_UP} failures in a row they "
                    "are left out for the rest of the run)" if score else
                    f"they failed {failed_in_a_row} re-checks in a row and are left out for the rest of the run")
            if failed_in_a_row == 1 or not score:
                warn_on_main(f"STS: the re-check probe's rewards at step {step} are left out (mean_reward None); "
                             f"{then}: {err}", STSDataWarning, stacklevel=2)
            rollouts = sample(model, indices, scored=False)
        sequences = rollout_probe(rollouts, setup, budget)
        rewards = rollouts.rewards[~torch.isnan(rollouts.rewards)]
        # the reward is the policy's on every completion sampled; the probe keeps those within its token budget
        return sequences, reference, {
            "prompts": indices, "sampled": int(rollouts.rewards.numel()), "completions": len(sequences),
            "tokens": sum(sum(flags) for _, flags in sequences),
            "mean_reward": float(rewards.mean()) if rewards.numel() else None,
            **({"reward_error": reward_error} if reward_error is not None else {})}
    return FreshProbe(probe, from_disabled_adapters=reference is None)


def forecast_runner(shift: str, data: Any, probe: Corpus, demonstrations: Corpus | None,
                    rollouts: Rollouts | None = None, truncation: Truncation | None = None,
                    teacher: Rollouts | None = None, left_out: str | None = None,
                    ) -> Callable[[ForecastSetup, dict[str, Corpus], bool], ForecastRun | None] | None:
    """A function ``(setup, domains, progress) -> ForecastRun | None`` computing the forecast of ``shift`` (``None``
    when the rollouts' rewards carry no signal, with a warning); ``None`` itself for the in-context shift of data
    without answers (nothing to forecast from). The RL shifts need the :func:`trainer_rollouts`, the distillation
    shifts the student's ``rollouts`` and the ``teacher``'s (:func:`trainer_distillation_rollouts`);
    ``truncation``: how a preference trainer cuts its pairs (:meth:`Truncation.from_args` of its args);
    ``left_out``: a term of the trainer's loss the shift does not cover (:func:`likelihood_term`), recorded in the
    forecast's settings."""
    if shift in DISTILLATION_SHIFTS:
        return lambda setup, domains, progress: run_distillation_forecast(setup, shift, probe, teacher, rollouts,
                                                                          domains, progress=progress)
    if shift == "chosen_vs_rejected":
        def preference(setup: ForecastSetup, domains: dict[str, Corpus], progress: bool) -> ForecastRun:
            run = run_preference_forecast(setup, data, domains, progress=progress, truncation=truncation)
            if left_out is not None:
                run.forecast.settings["left_out"] = left_out
            return run
        return preference
    if shift in RL_SHIFTS:
        def rl_forecast(setup: ForecastSetup, domains: dict[str, Corpus], progress: bool) -> ForecastRun | None:
            try:
                rollouts.check_signal(f"the {shift} forecast", one_sided=shift == "reward_filtered")
            except STSInputError as err:  # a sparse reward the base policy never earns: common, not fatal
                raise ForecastSkipped(f"{err} Re-checks still run; demonstrations=[...] would give a "
                                      "forecast.") from err
            if shift == "reward_weighted":
                return run_rollout_forecast(setup, rollouts, domains, progress=progress)
            demos = load_corpus(rollouts.demonstrations(), name="reward-filtered rollouts")
            run = run_forecast(setup, probe, domains, demos, progress=progress)
            run.forecast.settings.update({"shift": "reward_filtered", "rollouts": rollouts.summary()})
            return run
        return rl_forecast
    has_answers = demonstrations is not None or any(probe[i].can_demonstrate for i in range(min(len(probe), 64)))
    if not has_answers:
        return None
    return lambda setup, domains, progress: run_forecast(setup, probe, domains, demonstrations, progress=progress)


def _rollout_settings(trainer: Any) -> RolloutSettings:
    """The trainer's generation and reward settings; its reward weights as TRL extended them (a tensor)."""
    settings = RolloutSettings.from_args(trainer.args)
    if getattr(trainer.args, "num_generations", None) is None:  # online DPO / XPO / Nash-MD: a pair per prompt
        settings.num_generations = 2
    weights = getattr(trainer, "reward_weights", None)
    if weights is not None:
        weights = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
        given = getattr(trainer.args, "reward_weights", None)  # as typed: the tensor's float32 reads 0.30000001
        if isinstance(given, (list, tuple)) and len(given) == len(weights):
            weights = [float(w) for w in given]
        settings.reward_weights = weights
    return settings


__all__ = ["DISTILLATION_SHIFTS", "FreshProbe", "ROLLOUT_SHIFTS", "RL_SHIFTS", "SHIFTS", "check_shift",
           "forecast_runner", "fresh_rollout_probe", "is_online", "is_rl", "likelihood_term", "resolve_shift", "rollout_data",
           "rollout_probe", "teacher_of", "trainer_distillation_rollouts", "trainer_reward_funcs", "trainer_rollouts",
           "unreproduced_generation"]
