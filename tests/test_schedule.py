"""The planned learning rate of every step equals what the Trainer's own scheduler gives, for any schedule."""

import pytest
import torch
from test_callback import make_callback, make_trainer
from tiny import make_tokenizer
from transformers import TrainingArguments

from sts_callback.core.schedule import logged_learning_rates, planned_learning_rates


@pytest.mark.parametrize("kind, kwargs", [
    ("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 2}), ("polynomial", {"power": 2.0}),
    ("constant", {}), ("constant_with_warmup", {}), ("inverse_sqrt", {}),
    ("warmup_stable_decay", {"num_decay_steps": 4}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
])
def test_planned_rates_match_the_trainers_scheduler(tmp_path, kind, kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, lr_scheduler_type=kind,
                             lr_scheduler_kwargs=kwargs, warmup_steps=0.2, max_steps=12, use_cpu=True, report_to=[])
    rates, source = planned_learning_rates(args, 12)
    assert source == "arguments" and len(rates) == 12
    # the Trainer's scheduler, as create_scheduler builds it, stepped after each optimizer step
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=args.get_warmup_steps(12), num_training_steps=12,
                              scheduler_specific_kwargs=kwargs)
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)


def test_a_real_run_logs_the_planned_rates(tmp_path):
    tokenizer = make_tokenizer()
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, save_steps=6, lr_scheduler_type="cosine",
                           warmup_steps=2)
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert callback.schedule_source == "arguments"
    assert callback.learning_rates == pytest.approx(logged)  # the Trainer logs the lr each step ran with


def test_a_users_own_scheduler_is_followed_through_the_logged_rates(tmp_path):
    from tiny import make_model

    tokenizer = make_tokenizer()
    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    callback = make_callback(recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, max_steps=6, save_steps=6,
                           optimizers=(optimizer, scheduler))
    trainer.train()
    assert callback.schedule_source == "logged"
    fractions = [r["lr_area_fraction"] for r in callback.history if "lr_area_fraction" in r]
    assert fractions and fractions[-1] == pytest.approx(1.0)
    assert 0 < fractions[0] < fractions[1] < 1


def test_logged_rates_hold_until_the_next_logged_step():
    history = [{"step": 1, "learning_rate": 1.0}, {"step": 3, "learning_rate": 0.5}, {"step": 2, "loss": 3.0}]
    assert logged_learning_rates(history, 5) == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert logged_learning_rates([], 3) == []
