"""Forecasts for distillation (TRL's ``DistillationTrainer``, GKD and kin): the teacher's completions of the prompts.

Distillation trains the student to match the teacher's next-token distribution, on-policy on the student's own
completions (TRL's ``DistillationTrainer``) or on a mix with the data's; either way training moves the student
toward what the teacher writes for the training prompts. The data are prompts only, so the in-context forecast has
no answers to use; the teacher supplies them. For a seeded sample of training prompts the teacher samples
completions with the trainer's generation settings (as the student's rollouts are sampled for RL,
:func:`~sts_callback.pipelines.rollouts.sample_rollouts`, unscored), and two forecasts follow:

- ``"teacher_completions"``: the teacher's completions as ``demonstrations=`` of the usual in-context forecast,
  the prompts as queries (the SFT forecast of sequence-level distillation);
- ``"teacher_vs_student"``: per prompt, the mean latents of the teacher's completions minus those of the student's
  own (the direction from what the student writes to what the teacher writes), paired over prompts as the
  chosen-vs-rejected shift is (preference.py).

The student's completions are sampled either way: they are what on-policy distillation trains on, so they are the
re-check probe.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import nn

from ..core.config import STSConfig
from ..core.data import Corpus, PromptBuilder, load_corpus, load_domains
from ..core.errors import STSConfigError, STSInputError
from .forecast import Forecast, ForecastRun, ForecastSetup, prepare_forecast, run_forecast
from .preference import ContrastUnit, completion_sequence, contrast_forecast
from .rollouts import RolloutSettings, Rollouts, prompt_records, sample_rollouts

DISTILLATION_SHIFTS = ("teacher_completions", "teacher_vs_student")


def distillation_settings(args: Any) -> RolloutSettings:
    """The trainer's generation settings (a ``DistillationConfig``, a dict, ...). Distillation compares no
    completions within a prompt's group, so at least two a prompt are drawn (GOLD's and IW-OPD's default
    ``num_generations=1`` included), more where ``num_generations`` says so."""
    if args is None:
        return RolloutSettings(num_generations=2)
    given = args.get("num_generations") if isinstance(args, dict) else getattr(args, "num_generations", None)
    generations = max(2, given) if isinstance(given, int) and not isinstance(given, bool) else 2
    if isinstance(args, dict):
        return RolloutSettings.from_args({**args, "num_generations": generations})
    return RolloutSettings.from_args(SimpleNamespace(**{**vars(args), "num_generations": generations}))


def sample_teacher_and_student(setup: ForecastSetup, teacher: nn.Module, prompts: Any, settings: RolloutSettings,
                               *, progress: bool = False) -> tuple[Rollouts, Rollouts]:
    """The teacher's and the student's (``setup.model``) unscored completions of the forecast's seeded draw of
    ``prompts``, with the same settings (the same on every rank)."""
    teacher_rollouts, student_rollouts = (
        sample_rollouts(model, setup.builder.tokenizer, prompts, None, setup.config, settings, progress=progress,
                        builder=setup.builder, score=False, desc=f"STS {who} completions")
        for model, who in ((teacher, "teacher"), (setup.model, "student")))
    return teacher_rollouts, student_rollouts


def teacher_demonstrations(teacher: Rollouts) -> list[dict[str, Any]]:
    """Every completion the teacher sampled, as ``{"prompt", "completion"}`` records for ``demonstrations=``."""
    return [{"prompt": g.prompt, "completion": completion} for g in teacher.groups for completion in g.completions]


def teacher_contrast_units(teacher: Rollouts, student: Rollouts, builder: PromptBuilder) -> list[ContrastUnit]:
    """One unit per prompt: the teacher's completions (weight +1 each) against the student's (-1 each)."""
    students = {g.index: g for g in student.groups}
    units = []
    for group in teacher.groups:
        own = students.get(group.index)
        if own is None:
            continue
        sequences = [completion_sequence(builder, group.prompt_ids, ids) for ids in group.completion_ids]
        sequences += [completion_sequence(builder, own.prompt_ids, ids) for ids in own.completion_ids]
        if any(any(flags) for _, flags in sequences):
            units.append(ContrastUnit(sequences, [1.0] * len(group.completion_ids) + [-1.0] * len(own.completion_ids)))
    if not units:
        raise STSInputError("The teacher and the student sampled no counted completion token for any prompt (every "
                            "completion empty or special tokens only): raise STSConfig.rollout_max_tokens or check "
                            "the generation settings.")
    return units


NOTHING_MOVED = ("The teacher's and the student's completions differ in no SAE latent, so there is no direction to "
                 "forecast: is the teacher another model than the student, and is the SAE for this model and layer?")


def summary(teacher: Rollouts, student: Rollouts) -> dict[str, Any]:
    """What the forecast's ``settings["distillation"]`` records."""
    def counts(rollouts: Rollouts) -> dict[str, int]:
        return {"completions": sum(len(g.completion_ids) for g in rollouts.groups),
                "completion_tokens": sum(len(ids) for g in rollouts.groups for ids in g.completion_ids)}
    rewards_only = ("scale_rewards", "multi_objective_aggregation", "mask_truncated_completions")
    settings = {k: v for k, v in teacher.settings.items()
                if k not in ("generation_kwargs", "chat_template_kwargs", *rewards_only)}
    return {"prompts": len(teacher.groups), "teacher": counts(teacher), "student": counts(student), **settings}


def run_distillation_forecast(setup: ForecastSetup, shift: str, prompts: Corpus, teacher: Rollouts,
                              student: Rollouts, domains: dict[str, Corpus], *, progress: bool = False,
                              start: float | None = None) -> ForecastRun:
    """The forecast of ``shift`` from the teacher's and the student's sampled completions."""
    if shift not in DISTILLATION_SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {DISTILLATION_SHIFTS}.")
    recorded = {"shift": shift, "distillation": summary(teacher, student)}
    if shift == "teacher_vs_student":
        return contrast_forecast(setup, teacher_contrast_units(teacher, student, setup.builder), domains,
                                 kind="teacher_vs_student", what="teacher and student completions",
                                 nothing_moved=NOTHING_MOVED, settings=recorded, progress=progress, start=start)
    demonstrations = load_corpus(teacher_demonstrations(teacher), name="teacher completions")
    run = run_forecast(setup, prompts, domains, demonstrations, progress=progress, start=start)
    run.forecast.settings.update({**recorded, "demonstrations": "teacher_completions"})
    return run


def distillation_forecast(model: nn.Module, teacher: nn.Module, tokenizer, sae: Any, prompts: Any, targets: Any,
                          config: STSConfig | dict | None = None, *, settings: Any = None,
                          shift: str = "teacher_completions", progress: bool = False, calibration: Any = None,
                          ) -> Forecast:
    """Forecast how distilling ``teacher`` into ``model`` (the student) on ``prompts`` moves each target domain.

    ``shift="teacher_completions"`` (the callback's default for a trainer with a ``teacher_model``): the in-context
    forecast with the prompts as queries and the teacher's sampled completions as demonstrations;
    ``"teacher_vs_student"``: the teacher's completions' latents minus the student's, per prompt. ``settings``:
    the trainer's ``DistillationConfig`` (or a dict of :class:`~sts_callback.pipelines.rollouts.RolloutSettings`
    fields): temperature, top-p/k, ``max_completion_length`` (capped by ``STSConfig.rollout_max_tokens``);
    ``STSConfig.rollout_prompts`` prompts are sampled, ``rollout_generations`` completions each at most. The
    teacher must share the student's tokenizer: it is fed the student's token ids (a teacher with its own, as
    GOLD's ULD loss allows, is not supported). Other arguments as
    :func:`~sts_callback.pipelines.forecast.forecast`.
    """
    if shift not in DISTILLATION_SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {DISTILLATION_SHIFTS}.")
    if teacher is None or teacher is model:
        raise STSInputError("distillation_forecast needs a teacher model other than the student.")
    setup, calibration, start = prepare_forecast(model, tokenizer, sae, config, calibration, shift)
    domains = load_domains(targets)
    records = prompt_records(prompts)
    teacher_rollouts, student_rollouts = sample_teacher_and_student(setup, teacher, records,
                                                                    distillation_settings(settings), progress=progress)
    result = run_distillation_forecast(setup, shift, load_corpus(records, name="train"), teacher_rollouts,
                                       student_rollouts, domains, progress=progress, start=start).forecast
    return result.apply_calibration(calibration) if calibration is not None else result


__all__ = ["DISTILLATION_SHIFTS", "distillation_forecast", "distillation_settings", "run_distillation_forecast",
           "sample_teacher_and_student", "teacher_contrast_units", "teacher_demonstrations"]
