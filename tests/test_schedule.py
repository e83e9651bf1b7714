"""The planned learning rate of every step equals what the Trainer's own scheduler gives, for any schedule."""

import pytest
import torch
from test_callback import make_callback, make_trainer
from tiny import make_tokenizer
from transformers import TrainerCallback, TrainingArguments

from sts_callback.core.schedule import logged_learning_rates, planned_learning_rates, stepped_ahead


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


@pytest.mark.parametrize("build", ["step_lr", "hf_cosine_helper"])
def test_a_users_own_scheduler_is_followed_as_it_runs(tmp_path, build):
    """A scheduler the user built, of any class: a LambdaLR from transformers' own helper with settings other than
    TrainingArguments' was taken for the arguments' linear schedule (step 2 read as 42% of the area, not 6%)."""
    from tiny import make_model
    from transformers import get_cosine_schedule_with_warmup

    tokenizer = make_tokenizer()
    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if build == "step_lr" else \
        get_cosine_schedule_with_warmup(optimizer, 4, 8)
    callback = make_callback(recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, max_steps=8, save_steps=8,
                           optimizers=(optimizer, scheduler))
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert callback.schedule_source == "scheduler"
    assert callback.learning_rates == pytest.approx(logged)
    fractions = [r["lr_area_fraction"] for r in callback.history if "lr_area_fraction" in r]
    assert fractions == pytest.approx([sum(logged[:step]) / sum(logged) for step in (2, 4, 6, 8)])


@pytest.mark.parametrize("kind", ["reduce_lr_on_plateau", "greedy"])
def test_a_scheduler_that_steps_on_metrics_is_followed_through_the_logged_rates(tmp_path, kind):
    """greedy's step() needs the metrics: stepping it ahead stopped training at train start (TypeError)."""
    callback = make_callback(recheck_steps=2)
    tokenizer = make_tokenizer()
    from tiny import domain_texts

    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, save_steps=4, lr_scheduler_type=kind,
                           eval_strategy="steps", eval_steps=2, eval_texts=domain_texts("law", 8, seed=3))
    trainer.train()
    assert callback.schedule_source == "logged" and trainer.state.global_step == 4


def test_stepping_a_scheduler_ahead_puts_it_and_its_optimizer_back_exactly():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)  # moves betas too
    before = (scheduler.state_dict(), [dict(g) for g in optimizer.param_groups])
    rates = stepped_ahead(scheduler, 10)
    assert len(rates) == 10 and max(rates) == pytest.approx(1e-2, rel=1e-3)
    assert (scheduler.state_dict(), [dict(g) for g in optimizer.param_groups]) == before
    own = []
    for _ in range(10):
        own.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == own


def test_a_scheduler_that_cannot_be_read_ahead_says_why_and_does_not_stop_the_run_at_train_start():
    """A OneCycleLR of fewer total_steps than the run raised its ValueError from the callback's train start, with
    nothing saying it was the scheduler; a scheduler class keeping its optimizer under another name was said to
    step on metrics."""
    import types

    from sts_callback.core.schedule import why_not_stepped_ahead

    args = types.SimpleNamespace(learning_rate=1e-2, lr_scheduler_type="linear", lr_scheduler_kwargs={},
                                 get_warmup_steps=lambda steps: 0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
    short = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=6)
    before = (short.state_dict(), [dict(g) for g in optimizer.param_groups])
    assert planned_learning_rates(args, 8, short) == ([], "logged")
    assert "ValueError" in why_not_stepped_ahead(short, 8) and "OneCycleLR" in why_not_stepped_ahead(short, 8)
    assert (short.state_dict(), [dict(g) for g in optimizer.param_groups]) == before

    class Halving:  # steps, but keeps its optimizer as .opt
        def __init__(self, opt):
            self.opt = opt

        def step(self):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert "`optimizer` attribute" in why_not_stepped_ahead(Halving(optimizer), 8)
    assert why_not_stepped_ahead(torch.optim.lr_scheduler.StepLR(optimizer, 2), 8) is None


def test_logged_rates_hold_until_the_next_logged_step():
    history = [{"step": 1, "learning_rate": 1.0}, {"step": 3, "learning_rate": 0.5}, {"step": 2, "loss": 3.0}]
    assert logged_learning_rates(history, 5) == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert logged_learning_rates([], 3) == []


@pytest.mark.parametrize("recheck_at_end", [True, False])
def test_a_run_stopped_right_after_a_recheck_ends_there_with_nothing_projected(tmp_path, recheck_at_end):
    """Another callback (EarlyStoppingCallback at an eval that is also a save) stops at step 4 of 12 just after STS
    re-checked it: the record kept its projection to step 12 and the report never said where the run ended (with
    recheck_at_end=False too, though marking the end measures nothing)."""
    import json

    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    callback = make_callback(recheck_steps=2, recheck_at_end=recheck_at_end)
    trainer = make_trainer(tmp_path, make_tokenizer(), callback, max_steps=12, save_steps=12,
                           lr_scheduler_type="cosine", extra_callbacks=[StopAt4()])
    trainer.train()
    last = callback.history[-1]
    assert last["step"] == 4 and last["ended_early"] == {"max_steps": 12} and "early_forecast" not in last
    written = [json.loads(line) for line in (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()]
    assert written[-1] == last
    assert "Training ended at step 4" in (tmp_path / "run" / "sts" / "report.md").read_text()


def test_a_run_resumed_past_where_another_callback_stopped_it_reads_that_recheck_as_a_point(tmp_path):
    """A time limit stops (and saves) the run at step 4 right after a re-check, which becomes the run's end
    (ended_early, no schedule share). Resumed from checkpoint-4 to step 12, that record kept ended_early (the file
    said the run ended at 4) and no lr_area_fraction, so the early forecast left the measurement out of the course."""
    import json

    from transformers import TrainerCallback

    class TimeLimitAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = control.should_save = True

    def run(callbacks=(), resume=None):
        callback = make_callback(recheck_steps=2)
        trainer = make_trainer(tmp_path, make_tokenizer(), callback, max_steps=12, save_steps=100,
                               lr_scheduler_type="cosine", extra_callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return callback

    assert run([TimeLimitAt4()]).history[-1]["ended_early"] == {"max_steps": 12}
    callback = run(resume=str(tmp_path / "run" / "checkpoint-4"))
    written = [json.loads(line) for line in (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()]
    for history in (callback.history, written):
        assert [r["step"] for r in history] == [2, 4, 6, 8, 10, 12]
        assert not any("ended_early" in r for r in history)
        fractions = [r["lr_area_fraction"] for r in history]
        assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[1] < fractions[2]


def test_a_run_resumed_for_more_steps_places_its_earlier_rechecks_on_the_new_schedule_in_the_file_too(tmp_path):
    """Resumed with a larger max_steps, the earlier re-checks' shares of the schedule were read again in memory
    only: history.jsonl, which the report reads, kept the old plan's, so step 4 read later in the schedule than
    step 6."""
    import json

    def run(max_steps, resume=None):
        callback = make_callback(recheck_steps=2)
        trainer = make_trainer(tmp_path, make_tokenizer(), callback, max_steps=max_steps, save_steps=4,
                               lr_scheduler_type="cosine")
        trainer.train(resume_from_checkpoint=resume)
        return callback

    run(4)
    callback = run(8, resume=str(tmp_path / "run" / "checkpoint-4"))
    written = [json.loads(line) for line in (tmp_path / "run" / "sts" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [2, 4, 6, 8]
    fractions = [r["lr_area_fraction"] for r in written]
    assert fractions == pytest.approx([r["lr_area_fraction"] for r in callback.history])
    assert fractions == sorted(fractions) and fractions[1] < 0.9  # step 4 is no longer the end of the schedule


def test_a_recheck_before_any_learning_is_no_point_of_the_course(tmp_path):
    """A re-check at lr-area fraction 0 (step 1 of a warm-up from 0) let the next re-check warn and stop from a
    single-point extrapolation, which the rule "from the second measured re-check on" forbids."""
    import warnings

    from test_session import DOMAINS, HARMFUL, LR, session_for, train_steps
    from tiny import domain_texts, make_model

    from sts_callback.core.data import load_corpus, load_domains

    torch.manual_seed(0)
    tokenizer, model = make_tokenizer(), make_model("llama")
    session = session_for(tmp_path, tolerance=0.045, early_stop="projected")  # measured +2.3%, projected +7%
    session.learning_rates = [0.0] + [LR] * 15
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    session.start(model, load_corpus(HARMFUL), domains)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert session.recheck(model, 1, 16)[0]["lr_area_fraction"] == 0
        train_steps(model, tokenizer, HARMFUL[1:], 5, lr=LR)
        record, decision = session.recheck(model, 6, 16)
    assert record["early_forecast"] and not record.get("projected_warnings") and not decision.stop


def test_a_run_sts_stopped_itself_keeps_the_projection_that_stopped_it(tmp_path):
    """The end-of-run step took STS's own early stop for another callback's and erased the projection it cites."""
    import warnings

    from tiny import DOMAIN_WORDS

    harmful = [" ".join([DOMAIN_WORDS["law"][0]] * 12) + " ."] * 64
    callback = make_callback(recheck_steps=2, protected=["food"], tolerance=0.5, early_stop="projected")
    trainer = make_trainer(tmp_path, make_tokenizer(), callback, texts=harmful, max_steps=16, save_steps=16,
                           learning_rate=3e-2, lr_scheduler_type="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    last = callback.history[-1]
    assert trainer.state.global_step < 16 and last["early_stop"]
    assert last.get("projected_warnings") and "early_forecast" in last and "ended_early" not in last


def test_a_deepspeed_config_scheduler_is_read_ahead_and_its_steps_taken_counted():
    """A DeepSpeed config's scheduler (WarmupDecayLR) counts its steps in last_batch_iteration, not last_epoch."""
    import types

    pytest.importorskip("deepspeed")
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from sts_callback.core.schedule import steps_taken

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    scheduler = WarmupDecayLR(optimizer, total_num_steps=10, warmup_num_steps=3, warmup_max_lr=1e-2)
    args = types.SimpleNamespace(learning_rate=1e-2, lr_scheduler_type="linear", lr_scheduler_kwargs={},
                                 get_warmup_steps=lambda steps: 0)
    rates, source = planned_learning_rates(args, 10, scheduler)
    own = []
    for _ in range(10):
        own.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert source == "scheduler" and rates == own and steps_taken(scheduler) == 10


class RatesSpy(TrainerCallback):
    """Each optimizer step's learning rate as it ran (read when the step begins)."""

    def __init__(self):
        self.ran = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.ran.append(optimizer.param_groups[0]["lr"])


def test_a_metric_stepped_scheduler_is_read_at_each_steps_own_rate_whatever_the_logging(tmp_path):
    """reduce_lr_on_plateau was followed through the Trainer's log: a re-check at step s read step s at step s-1's
    rate (logged after the re-check), and with logging_steps=5 the steps before the first log took its rate."""
    from tiny import domain_texts

    callback, spy = make_callback(recheck_steps=3), RatesSpy()
    trainer = make_trainer(tmp_path, make_tokenizer(), callback, max_steps=9, save_steps=9, logging_steps=5,
                           lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2,
                           lr_scheduler_kwargs={"factor": 0.5, "patience": 0, "mode": "max"},  # halves at each eval
                           eval_texts=domain_texts("law", 8, seed=3), extra_callbacks=[spy])
    trainer.train()
    assert callback.schedule_source == "logged" and len(set(spy.ran)) > 2
    for record in callback.history:
        ran = spy.ran[:record["step"]]  # the rates so far, the last one held to the end (README)
        assert record["lr_area_fraction"] == pytest.approx(sum(ran) / (sum(ran) + ran[-1] * (9 - len(ran))))


@pytest.mark.parametrize("save_only_model", [False, True])
def test_a_resume_reads_the_steps_before_it_at_the_rates_they_ran(tmp_path, save_only_model):
    """Same max_steps, resumed from checkpoint-4: with a LambdaLR of the loop's own (logging_steps=500: nothing
    logged) the steps before the resume were read on the arguments' linear schedule (step 6 at 96% of the area, 88%
    as run); under save_only_model (the scheduler starts again) the kept re-checks stayed on the abandoned course,
    which the early forecast took for one (step 6's projection from a course going backwards)."""
    from tiny import make_model

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise RuntimeError("a crash after checkpoint-4")

    def parts():
        model = make_model("llama")
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        scheduler = None if save_only_model else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
        return model, (optimizer, scheduler)

    settings = dict(max_steps=8, save_steps=4, logging_steps=500, save_only_model=save_only_model)
    first, tokenizer = RatesSpy(), make_tokenizer()
    model, optimizers = parts()
    with pytest.raises(RuntimeError, match="a crash after checkpoint-4"):
        make_trainer(tmp_path, tokenizer, make_callback(recheck_steps=2), model=model, optimizers=optimizers,
                     extra_callbacks=[first, Crash()], **settings).train()
    model, optimizers = parts()
    second, callback = RatesSpy(), make_callback(recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=model, optimizers=optimizers, extra_callbacks=[second],
                           **settings)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    ran = first.ran[:4] + second.ran
    assert len(ran) == 8 and (save_only_model or ran[0] != ran[4])
    record = next(r for r in callback.history if r["step"] == 6)
    assert record["lr_area_fraction"] == pytest.approx(sum(ran[:6]) / sum(ran))
