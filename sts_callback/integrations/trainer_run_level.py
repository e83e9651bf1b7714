"""The run-level term at train start from a Trainer: how far, and which way, the run's first optimizer steps move
each target domain's held-out NLL (:mod:`sts_callback.pipelines.runlevel`), with the Trainer's own optimizer,
learning-rate peak, batch size, gradient accumulation and clipping, on the very loss sets the re-checks measure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.data import take_streamed
from ..core.distributed import world_size
from ..core.errors import STSConfigError
from ..core.torch_utils import pad_token_id
from ..pipelines.runlevel import (RunLevelConfig, RunLevelEstimate, compressed_lr_factor, estimate_run_level,
                                  not_trained_on, training_batches)
from ..scoring.calibration import RUN_LEVEL_METHODS
from .first_batches import run_first_batches

DEFAULT_RUN_LEVEL_STEPS = RunLevelConfig.steps  # when neither the user nor the calibration says how many
COMPRESSED_SHARE = 0.25  # a compressed run's steps, as a share of the run's: what the benchmark measured


def check_run_level(method: str | None) -> str | None:
    if method is not None and method not in RUN_LEVEL_METHODS:
        raise STSConfigError(f"run_level={method!r}: use one of {RUN_LEVEL_METHODS}, or None (no run-level term).")
    return method


def run_level_runner(method: str, trainer: Any, args: Any, loss_sets: dict[str, list], tokenizer: Any, steps: int,
                     autocast: Callable[[], Any] | None = None, own: list | None = None, domains: bool = True,
                     own_tokens: int | None = None, lr_factor: float = 1.0, run_steps: int | None = None,
                     train_dataloader: Any = None) -> Callable[[Any, dict[str, float]], RunLevelEstimate]:
    """``(model, base_losses) -> RunLevelEstimate`` for ``trainer``: ``steps`` steps of its optimizer on the run's
    own first micro-batches, read from ``train_dataloader`` (the Trainer's, as ``on_train_begin`` gets it) without
    touching the run (:func:`~sts_callback.integrations.first_batches.run_first_batches`), or, where they cannot
    be known (a streamed dataset, an order drawn from the process's random generators), a seeded draw of its
    training set (the same examples on any number of processes); the estimate's ``batches`` says which. The
    batches must be language-
    model batches (``input_ids``, ``labels``): a preference or RL trainer's are refused now, with the fix. Under
    DeepSpeed ZeRO-3 / FSDP, where sharded weights cannot be put back exactly, a lookahead falls back to the
    first-order estimate, with a warning. ``own``: sequences of the training data (the re-check probe), whose
    change becomes the estimate's ``own_change``, measured on those the steps do not train on (all of them when
    the steps cover every one), their first ``own_tokens`` counted tokens (``None``: all; the callback passes its
    ``loss_tokens``, a domain's held-out budget). ``domains=False`` (with ``own``):
    measure the training data's own change alone, not each target domain's (a calibration whose level is the own
    change and whose pattern uses no per-domain run-level feature needs nothing else; most of a lookahead's cost is
    those measurements). ``lr_factor``: the steps' rates over the schedule's peak (a compressed run's
    :func:`compressed_lr_factor`); ``run_steps``: the run's steps, whose share the estimate records
    (``run_share``)."""
    dataset, collate = getattr(trainer, "train_dataset", None), getattr(trainer, "data_collator", None)
    if dataset is None or collate is None:
        raise STSConfigError("run_level needs the trainer's train_dataset and data_collator; pass run_level=None.")
    config = RunLevelConfig(steps=steps, accumulation=args.gradient_accumulation_steps, lr_factor=lr_factor,
                            max_grad_norm=args.max_grad_norm or None, pad=pad_token_id(tokenizer))
    if not hasattr(dataset, "__len__"):  # a stream: its head, as many examples as the steps take
        dataset = take_streamed(dataset, steps * config.accumulation * args.per_device_train_batch_size
                                * world_size())
    dataset, collate = _as_the_trainer_loads(trainer, dataset, collate)
    world = world_size()
    the_runs = None if train_dataloader is None else run_first_batches(train_dataloader, steps * config.accumulation,
                                                                       world)
    if the_runs is not None:
        batches, every = the_runs
    else:
        batches = training_batches(dataset, collate, args.per_device_train_batch_size, steps * config.accumulation,
                                   seed=args.seed)
        every = batches if world == 1 else training_batches(
            dataset, collate, args.per_device_train_batch_size * world, len(batches), seed=args.seed, rank_=0, world=1)
    missing = {"input_ids", "labels"} - set(batches[0])
    if missing:
        raise STSConfigError(f"run_level={method!r} steps the model on language-model batches, but "
                             f"{type(trainer).__name__}'s batches have no {sorted(missing)} (keys: {sorted(batches[0])}"
                             "): preference and RL losses are not supported yet. Pass run_level=None.")

    if own:  # the own change on texts the steps do not train on (every process's batches: the same on all)
        held_out = not_trained_on(own, every)
        own = held_out or own  # a training set the steps cover whole (tiny data): its texts as they are
    own = _within_tokens(own, own_tokens) if own and own_tokens is not None else own

    def run(model: Any, base_losses: dict[str, float]) -> RunLevelEstimate:
        measured = loss_sets if domains or not own else {}
        estimate = estimate_run_level(model, trainer.optimizer, batches, measured, config, method=method, own=own,
                                      before=base_losses, autocast=autocast)
        estimate.run_share = steps / run_steps if run_steps else None
        estimate.batches = "draw" if the_runs is None else "run"
        return estimate
    return run


def _as_the_trainer_loads(trainer: Any, dataset: Any, collate: Any) -> tuple[Any, Any]:
    """The dataset and collator as the Trainer's own dataloader uses them: columns the model's forward does not
    take are dropped first (``remove_unused_columns``; a raw text column beside the ids fails the collator)."""
    import datasets

    if isinstance(dataset, datasets.Dataset) and hasattr(trainer, "_remove_unused_columns"):
        return trainer._remove_unused_columns(dataset, description="training"), collate
    if hasattr(trainer, "_get_collator_with_removed_columns"):
        return dataset, trainer._get_collator_with_removed_columns(collate, description="training")
    return dataset, collate


def _within_tokens(sequences: list, budget: int) -> list:
    """The first sequences of ``sequences`` ((ids, counted flags) pairs) up to ``budget`` counted tokens (at least
    one sequence): the own change is a paired difference after a few steps, precise on a domain's budget."""
    out, counted = [], 0
    for sequence in sequences:
        if out and counted >= budget:
            break
        out.append(sequence)
        counted += sum(sequence[1])
    return out


__all__ = ["COMPRESSED_SHARE", "DEFAULT_RUN_LEVEL_STEPS", "RUN_LEVEL_METHODS", "check_run_level",
           "compressed_lr_factor", "run_level_runner"]
