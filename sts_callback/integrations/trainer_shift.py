"""Which shift of the SAE latents a trainer's training pushes, read from the trainer: SFT, preference, or RL.

- ``"in_context"``: the data's answers as in-context demonstrations before its prompts (SFT; the default when the
  data have answers or ``demonstrations=`` is given);
- ``"chosen_vs_rejected"``: preference data (DPO and kin): chosen minus rejected completions of the same prompt;
- ``"reward_filtered"``: RL (GRPO and kin): the policy's own rollouts, scored by the trainer's reward functions,
  the above-mean ones as in-context demonstrations before the prompts;
- ``"reward_weighted"``: RL: the advantage-weighted difference of high- and low-reward rollouts' latents.

``"auto"`` picks by the trainer: reward functions -> ``reward_filtered`` (unless ``demonstrations=`` are given),
preference columns -> ``chosen_vs_rejected``, otherwise ``in_context``. Under RL the rollouts also become the
re-check probe (:func:`rollout_probe`): the shift is measured on what the policy writes.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

from ..core.data import Corpus, TokenSequence, load_corpus
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..pipelines.forecast import ForecastRun, ForecastSetup, run_forecast
from ..pipelines.preference import completion_sequence, run_preference_forecast
from ..pipelines.rollouts import RolloutSettings, Rollouts, run_rollout_forecast, sample_rollouts

SHIFTS = ("auto", "in_context", "chosen_vs_rejected", "reward_filtered", "reward_weighted")
PREFERENCE_COLUMNS = ({"chosen", "rejected"}, {"chosen_ids", "rejected_ids"})


def check_shift(shift: str) -> str:
    if shift not in SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {SHIFTS} ('auto' picks by the trainer).")
    return shift


def _columns(data: Any) -> set[str]:
    names = getattr(data, "column_names", None)
    if names is not None:
        return set(names)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        return set(data[0])
    return set()


def resolve_shift(shift: str, trainer: Any, data: Any, has_demonstrations: bool) -> str:
    """The shift to forecast with; an explicit choice the trainer or data cannot serve is an error now."""
    rl = getattr(trainer, "reward_funcs", None) is not None
    preference = any(columns <= _columns(data) for columns in PREFERENCE_COLUMNS)
    if shift == "auto":
        if rl and not has_demonstrations:
            return "reward_filtered"
        return "chosen_vs_rejected" if preference else "in_context"
    if shift in ("reward_filtered", "reward_weighted") and not rl:
        raise STSConfigError(f"shift={shift!r} needs an RL trainer with reward functions (trainer.reward_funcs, "
                             f"e.g. TRL's GRPOTrainer); this is a {type(trainer).__name__}. Use shift='auto'.")
    if shift == "chosen_vs_rejected" and not preference:
        raise STSConfigError(f"shift='chosen_vs_rejected' needs preference data with 'chosen' and 'rejected' "
                             f"columns; the training data has {sorted(_columns(data))}. Use shift='auto'.")
    return shift


RL_SHIFTS = ("reward_filtered", "reward_weighted")


def trainer_rollouts(trainer: Any, data: Any, setup: ForecastSetup, state: Any = None,
                     progress: bool = False) -> Rollouts:
    """The policy's rollouts on a seeded sample of the training prompts, with the trainer's generation settings,
    reward functions and weights (the same on every rank)."""
    return sample_rollouts(setup.model, setup.builder.tokenizer, data, trainer.reward_funcs, setup.config,
                           _rollout_settings(trainer), trainer_state=state, progress=progress, builder=setup.builder)


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


def forecast_runner(shift: str, data: Any, probe: Corpus, demonstrations: Corpus | None,
                    rollouts: Rollouts | None = None,
                    ) -> Callable[[ForecastSetup, dict[str, Corpus], bool], ForecastRun | None] | None:
    """A function ``(setup, domains, progress) -> ForecastRun | None`` computing the forecast of ``shift`` (``None``
    when the rollouts' rewards carry no signal, with a warning); ``None`` itself for the in-context shift of data
    without answers (nothing to forecast from). The RL shifts need the :func:`trainer_rollouts`."""
    if shift == "chosen_vs_rejected":
        return lambda setup, domains, progress: run_preference_forecast(setup, data, domains, progress=progress)
    if shift in RL_SHIFTS:
        def rl_forecast(setup: ForecastSetup, domains: dict[str, Corpus], progress: bool) -> ForecastRun | None:
            try:
                rollouts.check_signal(f"the {shift} forecast")
            except STSInputError as err:  # a sparse reward the base policy never earns: common, not fatal
                warnings.warn(f"STS forecast skipped: {err} Re-checks still run; demonstrations=[...] would give "
                              "a forecast.", STSDataWarning, stacklevel=2)
                return None
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
    weights = getattr(trainer, "reward_weights", None)
    if weights is not None:
        settings.reward_weights = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    return settings


__all__ = ["RL_SHIFTS", "SHIFTS", "check_shift", "forecast_runner", "resolve_shift", "rollout_probe", "trainer_rollouts"]
