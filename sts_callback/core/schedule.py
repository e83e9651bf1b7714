"""The learning rate of every optimizer step of a run, known before it takes them: the basis of the early
forecast (how much of the schedule's area a re-check has seen).

Read from ``TrainingArguments`` with transformers' own ``get_scheduler`` (the run's scheduler type, warm-up and
``lr_scheduler_kwargs``), stepped on a throw-away optimizer, so every built-in schedule works; a scheduler the
user built (``Trainer(optimizers=(opt, sched))``, of any class) that does not follow them is stepped ahead itself
and put back; one that steps on metrics is read from the learning rates the Trainer logs, the last one held for
the steps not yet taken.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from .errors import first_line


def planned_learning_rates(args: Any, max_steps: int, lr_scheduler: Any = None, global_step: int = 0,
                           log_history: list[dict[str, Any]] | None = None) -> tuple[list[float], str]:
    """(learning rate of optimizer steps 1..``max_steps``, its source: ``"arguments"``, ``"scheduler"`` (the run's
    own scheduler stepped ahead and put back) or ``"logged"`` (follow the rates the Trainer logs)).

    The schedule ``TrainingArguments`` describe, unless the run's scheduler does not follow it (one the user built,
    of any class: a LambdaLR or transformers' ``get_cosine_schedule_with_warmup`` with other settings): then that
    scheduler's own rates, read by stepping it ahead and restoring it exactly. A scheduler that steps on metrics
    (``reduce_lr_on_plateau``, ``greedy``) is followed from the logged rates. A run resumed at ``global_step``
    whose scheduler does not go on as the arguments plan (another ``max_steps`` than the checkpoint's, or a
    scheduler not restored: ``save_only_model``) runs its remaining steps at what its scheduler gives from where it
    stands; the steps before it are read from ``log_history`` (else the plan)."""
    from transformers import get_scheduler

    if max_steps <= 0:
        return [], "constant"
    base = float(getattr(args, "learning_rate", 1.0) or 1.0)
    name = str(getattr(getattr(args, "lr_scheduler_type", None), "value", getattr(args, "lr_scheduler_type", "")))
    running = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    resumed = 0 < global_step < max_steps
    ahead = (stepped_ahead(running, max_steps - (global_step if resumed else steps_taken(running)))
             if running is not None else None)
    if running is not None and ahead is None:
        return [], "logged"  # it steps on metrics (or cannot be stepped apart from training)
    try:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
                                  num_training_steps=max_steps,
                                  scheduler_specific_kwargs=getattr(args, "lr_scheduler_kwargs", None) or {})
        rates = stepped_ahead(scheduler, max_steps)
    except (TypeError, ValueError):  # a type that needs more than these arguments
        rates = None
    if ahead is not None and resumed and (rates is None or not _same(rates[global_step:], ahead)):
        logged = logged_learning_rates(log_history or [], global_step)
        before = logged or (rates[:global_step] if rates is not None else [ahead[0]] * global_step)
        return before + ahead, "scheduler"
    if rates is None:
        return ([], "logged") if ahead is None else (ahead, "scheduler")
    if ahead is not None and not _same(rates[len(rates) - len(ahead):], ahead):
        if len(ahead) == max_steps:
            return ahead, "scheduler"
        return [], "logged"  # a scheduler part-way through with no step count to place it by: the log
    return rates, "arguments"


def stepped_ahead(scheduler: Any, steps: int) -> list[float] | None:
    """The learning rate of each of the scheduler's next ``steps`` optimizer steps (its first parameter group's),
    read by stepping it and then putting it and its optimizer's parameter groups back as they were; ``None`` for
    a scheduler that steps on metrics (ReduceLROnPlateau, transformers' GreedyLR) or cannot be stepped so
    (:func:`why_not_stepped_ahead` says why)."""
    return _step_ahead(scheduler, steps)[0]


def why_not_stepped_ahead(scheduler: Any, steps: int) -> str | None:
    """Why :func:`stepped_ahead` cannot read ``scheduler`` (None when it can), for the user to read."""
    return _step_ahead(scheduler, steps)[1]


def _step_ahead(scheduler: Any, steps: int) -> tuple[list[float] | None, str | None]:
    kind = type(scheduler).__name__
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is None or not hasattr(scheduler, "state_dict") or not hasattr(scheduler, "load_state_dict"):
        return None, (f"{kind} has no `optimizer` attribute" if optimizer is None else
                      f"{kind} has no state_dict() / load_state_dict()") + \
            " (as torch's LRScheduler has), so it cannot be stepped ahead and put back"
    if steps < 0:
        return None, f"{kind} has taken {-steps} step(s) more than the run has"
    state = copy.deepcopy(scheduler.state_dict())
    groups = [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]
    rates = []
    try:
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no optimizer step is taken
            warnings.simplefilter("ignore")
            for _ in range(steps):
                rates.append(float(optimizer.param_groups[0]["lr"]))
                scheduler.step()
    except TypeError:  # step(metrics) required
        return None, f"{kind} steps on metrics"
    except Exception as err:  # e.g. a OneCycleLR of fewer total_steps than the run: the run meets it there too
        return None, f"stepping {kind} through the run's {steps} steps raised {type(err).__name__}: {first_line(err)}"
    finally:
        scheduler.load_state_dict(state)
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
    return rates, None


def steps_taken(scheduler: Any) -> int:
    """How many steps ``scheduler`` has taken: torch's ``last_epoch``, DeepSpeed's ``last_batch_iteration`` + 1."""
    taken = getattr(scheduler, "last_epoch", None)
    if taken is None and getattr(scheduler, "last_batch_iteration", None) is not None:
        taken = scheduler.last_batch_iteration + 1
    return int(taken or 0)


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def logged_learning_rates(log_history: list[dict[str, Any]], max_steps: int) -> list[float]:
    """Learning rates of steps 1..``max_steps`` from the Trainer's log (each logged value holds until the next
    logged step; the last one for the steps not yet taken); empty when none was logged."""
    logged = sorted((int(e["step"]), float(e["learning_rate"])) for e in log_history
                    if "learning_rate" in e and "step" in e)
    if not logged:
        return []
    rates, index = [], 0
    for step in range(1, max_steps + 1):
        while index + 1 < len(logged) and logged[index + 1][0] <= step:
            index += 1
        rates.append(logged[index][1])
    return rates


__all__ = ["logged_learning_rates", "planned_learning_rates", "stepped_ahead", "why_not_stepped_ahead"]
