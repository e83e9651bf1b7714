"""Which shift of the SAE latents a training run pushes, from what it trains with, and the offline forecast of it.

One rule for the callback (which reads a trainer: its reward functions, its teacher, its data) and for the offline
:func:`training_forecast` / ``sts forecast`` (which read the same things from their arguments), so that a forecast
made before a run answers as the run's own train-start forecast does:

- ``"in_context"``: the data's answers as in-context demonstrations before its prompts (SFT);
- ``"chosen_vs_rejected"``: preference data (DPO and kin): chosen minus rejected completions of the same prompt;
- ``"reward_filtered"`` / ``"reward_weighted"``: RL (GRPO and kin): the policy's rollouts scored by the reward
  functions (:mod:`~sts_callback.pipelines.rollouts`);
- ``"teacher_completions"`` / ``"teacher_vs_student"``: distillation (:mod:`~sts_callback.pipelines.distillation`).

``"auto"``: reward functions -> ``reward_weighted`` (unless demonstrations are given), preference columns ->
``chosen_vs_rejected``, a teacher -> ``teacher_completions`` (unless demonstrations are given), else ``in_context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..core.data import Corpus, load_corpus, take_streamed
from ..core.errors import STSConfigError
from .distillation import DISTILLATION_SHIFTS, distillation_forecast, distillation_settings
from .forecast import Forecast, forecast
from .preference import Truncation, preference_forecast
from .rollouts import RolloutSettings, rollout_forecast

RL_SHIFTS = ("reward_filtered", "reward_weighted")
SHIFTS = ("auto", "in_context", "chosen_vs_rejected", *RL_SHIFTS, *DISTILLATION_SHIFTS)
PREFERENCE_COLUMNS = ({"chosen", "rejected"}, {"chosen_ids", "rejected_ids"})


def check_shift(shift: str) -> str:
    if shift not in SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {SHIFTS} ('auto' picks by what the training uses).")
    return shift


def data_columns(data: Any) -> set[str]:
    """The columns of a dataset, a list of records or a :class:`Corpus` of them (its first record's keys)."""
    if isinstance(data, Corpus):  # its items as given: a wrapped dataset is not listed (it may hold millions)
        data = getattr(data, "_items", None) or []
    names = getattr(data, "column_names", None)
    if names is not None:
        return set(names)
    indexable = isinstance(data, Sequence) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                              and not isinstance(data, (dict, str)))  # a torch map-style dataset
    first = data[0] if indexable and len(data) else None
    if first is None and _is_stream(data):  # a stream TRL has mapped lists no columns: its first record's keys
        first = next(iter(take_streamed(data, 1)), None)
    return set(first) if isinstance(first, dict) else set()


def _is_stream(data: Any) -> bool:
    """A re-iterable stream (``datasets.IterableDataset``, a torch ``IterableDataset``), not a one-shot iterator
    (reading its first record would take it from the trainer)."""
    try:
        return not isinstance(data, (dict, str, bytes)) and iter(data) is not data
    except TypeError:
        return False


def is_preference_data(data: Any) -> bool:
    present = data_columns(data)  # once: a stream's first record is read anew each time
    return any(columns <= present for columns in PREFERENCE_COLUMNS)


def choose_shift(shift: str, data: Any, *, rl: bool, teacher: bool, has_demonstrations: bool,
                 where: str) -> str:
    """The shift to forecast with; an explicit choice the run cannot serve is an error now. ``rl``: the run has
    reward functions; ``teacher``: it distils a teacher; ``where`` names the run in errors (e.g. "this is a
    Trainer")."""
    check_shift(shift)
    preference = is_preference_data(data)
    if shift == "auto":
        if rl and not has_demonstrations:
            return "reward_weighted"
        if preference:
            return "chosen_vs_rejected"
        return "teacher_completions" if teacher and not has_demonstrations else "in_context"
    if shift in DISTILLATION_SHIFTS and not teacher:
        raise STSConfigError(f"shift={shift!r} needs a teacher model (a distillation trainer's teacher_model, e.g. "
                             f"TRL's DistillationTrainer, or teacher= offline); {where}. Use shift='auto'.")
    if shift in RL_SHIFTS and not rl:
        raise STSConfigError(f"shift={shift!r} needs reward functions (an RL trainer's reward_funcs, e.g. TRL's "
                             f"GRPOTrainer, or reward_funcs= offline); {where}. Use shift='auto'.")
    if shift == "chosen_vs_rejected" and not preference:
        raise STSConfigError(f"shift='chosen_vs_rejected' needs preference data with 'chosen' and 'rejected' "
                             f"columns; the training data has {sorted(data_columns(data))}. Use shift='auto'.")
    return shift


def training_forecast(model: nn.Module, tokenizer, sae: Any, train_data: Any, targets: Any, config: Any = None, *,
                      shift: str = "auto", demonstrations: Any = None, teacher: nn.Module | None = None,
                      reward_funcs: Any = None, settings: Any = None, progress: bool = False,
                      calibration: Any = None) -> Forecast:
    """The forecast of the training ``train_data`` is for, with the shift the callback would forecast at the run's
    start: preference pairs -> :func:`~sts_callback.pipelines.preference.preference_forecast`; ``reward_funcs``
    (GRPO) -> :func:`~sts_callback.pipelines.rollouts.rollout_forecast` on the data's prompts; a ``teacher``
    (distillation) -> :func:`~sts_callback.pipelines.distillation.distillation_forecast`; else
    :func:`~sts_callback.pipelines.forecast.forecast`. ``settings``: the generation (and, under RL, reward) settings
    of the rollouts, as :class:`~sts_callback.pipelines.rollouts.RolloutSettings` fields or the trainer's config.
    Other arguments as those functions."""
    train = load_corpus(train_data, name="train")  # read once: its columns decide 'auto'
    shift = choose_shift(shift, train, rl=reward_funcs is not None, teacher=teacher is not None,
                         has_demonstrations=demonstrations is not None, where="none was given")
    check_training_inputs(shift, reward_funcs=reward_funcs is not None, teacher=teacher is not None,
                          settings=settings)
    common = {"progress": progress, "calibration": calibration}
    if shift in RL_SHIFTS:
        return rollout_forecast(model, tokenizer, sae, train, reward_funcs, targets, config, settings=settings,
                                shift=shift, **common)
    if shift in DISTILLATION_SHIFTS:
        return distillation_forecast(model, teacher, tokenizer, sae, train, targets, config, settings=settings,
                                     shift=shift, **common)
    if shift == "chosen_vs_rejected":
        cut = preference_truncation(settings)
        return preference_forecast(model, tokenizer, sae, train, targets, config, max_length=cut.max_length,
                                   truncation_mode=cut.mode, **common)
    return forecast(model, tokenizer, sae, train, targets, config, demonstrations=demonstrations, **common)


def check_training_inputs(shift: str, *, reward_funcs: bool, teacher: bool, settings: Any) -> None:
    """Before any work: the inputs the chosen ``shift`` reads, and none it would leave unused (reward functions
    or a teacher the forecast does not sample with: preference data, demonstrations or the shift named decided
    otherwise); ``settings`` checked against that shift's fields."""
    if reward_funcs and teacher:
        raise STSConfigError("Give reward functions (RL) or a teacher (distillation), not both: STS forecasts one "
                             "kind of training at a time.")
    for given, what, them, used_by in ((reward_funcs, "Reward functions", "them", RL_SHIFTS),
                                       (teacher, "A teacher", "it", DISTILLATION_SHIFTS)):
        if given and shift not in used_by:
            raise STSConfigError(f"{what} given, but the forecast is the {shift} one, which does not use {them} "
                                 f"(preference data, demonstrations or the shift named chose it): drop {them}, or "
                                 f"ask for {' / '.join(used_by)} without demonstrations.")
    if shift in RL_SHIFTS:
        RolloutSettings.from_args(settings or {})
    elif shift in DISTILLATION_SHIFTS:
        distillation_settings(settings)
    elif shift == "chosen_vs_rejected":
        preference_truncation(settings)
    elif isinstance(settings, dict) and settings:
        raise STSConfigError(f"settings {sorted(settings)} apply to the preference, RL and distillation forecasts; "
                             f"this is the {shift} forecast, which reads none. Leave them out.")


PREFERENCE_SETTINGS = ("max_length", "truncation_mode")


def dpo_defaults() -> dict[str, Any]:
    """TRL ``DPOConfig``'s defaults of :data:`PREFERENCE_SETTINGS` ({} without TRL)."""
    try:
        from trl import DPOConfig
    except ImportError:
        return {}
    return {name: DPOConfig.__dataclass_fields__[name].default for name in PREFERENCE_SETTINGS}


def preference_truncation(settings: Any) -> Truncation:
    """How the preference trainer cuts its pairs, from its config (``DPOConfig``) or a dict of
    ``PREFERENCE_SETTINGS`` (those left out: DPOConfig's defaults, as the trainer would cut them)."""
    if settings is None or isinstance(settings, dict):
        settings = {**dpo_defaults(), **(settings or {})}
    if isinstance(settings, dict):
        unknown = sorted(set(settings) - set(PREFERENCE_SETTINGS))
        if unknown:
            raise STSConfigError(f"Unknown preference setting(s) {unknown}; valid: {list(PREFERENCE_SETTINGS)} "
                                 "(DPOConfig's names).")
        settings = SimpleNamespace(**settings)
    return Truncation.from_args(settings)


__all__ = ["PREFERENCE_COLUMNS", "PREFERENCE_SETTINGS", "RL_SHIFTS", "SHIFTS", "check_shift", "check_training_inputs",
           "choose_shift", "data_columns", "is_preference_data", "preference_truncation", "training_forecast"]
