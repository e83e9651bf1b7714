"""The learning rate of every optimizer step of a run, known before it takes them: the basis of the early
forecast (how much of the schedule's area a re-check has seen).

Read from ``TrainingArguments`` with transformers' own ``get_scheduler`` (the run's scheduler type, warm-up and
``lr_scheduler_kwargs``), stepped on a throw-away optimizer, so every built-in schedule works; a scheduler the
user built (``Trainer(optimizers=(opt, sched))``) of another class is read from the learning rates the Trainer
logs, the last one held for the steps not yet taken.
"""

from __future__ import annotations

from typing import Any

import torch


def planned_learning_rates(args: Any, max_steps: int, lr_scheduler: Any = None) -> tuple[list[float], str]:
    """(learning rate of optimizer steps 1..``max_steps``, its source: ``"arguments"`` / ``"constant"``)."""
    from transformers import get_scheduler

    if max_steps <= 0:
        return [], "constant"
    base = float(getattr(args, "learning_rate", 1.0) or 1.0)
    name = str(getattr(getattr(args, "lr_scheduler_type", None), "value", getattr(args, "lr_scheduler_type", "")))
    if name == "reduce_lr_on_plateau":  # depends on future metrics: constant until it reacts
        return [base] * max_steps, "constant"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
                              num_training_steps=max_steps,
                              scheduler_specific_kwargs=getattr(args, "lr_scheduler_kwargs", None) or {})
    if lr_scheduler is not None and type(lr_scheduler) is not type(scheduler):
        return [], "logged"  # a scheduler of the user's own: follow what the Trainer logs
    rates = []
    for _ in range(max_steps):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return rates, "arguments"


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


__all__ = ["logged_learning_rates", "planned_learning_rates"]
