"""STSCallback beside the callbacks and Trainer features users combine it with: EarlyStoppingCallback and
load_best_model_at_end on an STS key, a callback that asks for a checkpoint, the same instance listed twice."""

import json
import math
import warnings

import pytest
from test_callback import FailingSAE, make_callback, make_trainer
from tiny import domain_texts, make_tokenizer
from transformers import EarlyStoppingCallback, TrainerCallback

from sts_callback import STSConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def history_steps(tmp_path):
    return [json.loads(line)["step"] for line in (tmp_path / "run" / "sts" / "history.jsonl").open()]


def test_an_sts_metric_for_the_best_model_with_greater_is_better_is_refused_at_train_start(tmp_path, tokenizer):
    # transformers guesses greater_is_better=True for a name not ending in "loss": the most harmed checkpoint
    trainer = make_trainer(tmp_path, tokenizer, make_callback(protected=["food"]), eval_strategy="steps",
                           eval_steps=2, eval_texts=domain_texts("law", 8, seed=4),
                           metric_for_best_model="eval_sts_protected_loss_delta", load_best_model_at_end=True)
    assert trainer.args.greater_is_better is True
    with pytest.raises(STSConfigError, match="greater_is_better=False"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("metric, callback_args, error", [
    ("eval_sts_protected_loss_delta", {}, "no domain is protected"),
    ("sts_loss_delta_sport", {"protected": ["food"]}, "names the domain 'sport', which this STSCallback does not"),
])
def test_an_sts_metric_for_the_best_model_that_no_evaluation_will_hold_is_refused_at_train_start(
        tmp_path, tokenizer, metric, callback_args, error):
    """transformers would raise its KeyError at the first evaluation, after the forecast and hours of training."""
    trainer = make_trainer(tmp_path, tokenizer, make_callback(**callback_args), eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4), metric_for_best_model=metric,
                           greater_is_better=False, load_best_model_at_end=True)
    with pytest.raises(STSConfigError, match=error):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("metric, refused", [
    ("eval_math_sts_loss_delta_sport", None),  # the second callback's own domain: no substring of another's
    ("eval_sts_law_protected_loss_delta", "no domain is protected there"),  # only the shared key is worst-of-all
    ("eval_sts_protected_loss_delta", None),
])
def test_the_metric_check_reads_each_callbacks_namespace_exactly(tmp_path, tokenizer, metric, refused):
    first = make_callback(protected=["food"])
    second = make_callback(output_subdir="math_sts" if "math" in metric else "sts_law",
                           target_domains={"sport": domain_texts("sport", 30)})
    trainer = make_trainer(tmp_path, tokenizer, first, extra_callbacks=[second], max_steps=2, eval_strategy="steps",
                           eval_steps=2, eval_texts=domain_texts("law", 8, seed=4), metric_for_best_model=metric,
                           greater_is_better=False, load_best_model_at_end=True)
    if refused is None:
        trainer.train()
        assert metric in trainer.state.log_history[-2]
    else:
        with pytest.raises(STSConfigError, match=refused):
            trainer.train()


def test_a_reward_models_trainer_is_refused_for_its_model_not_for_its_data(tmp_path, tokenizer):
    """RewardTrainer's pairs are no training text STS reads, but the model is what rules the run out: saying so
    first spares the user a fix (train_probe=) that leads only to the real refusal."""
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    law, food = domain_texts("law", 8), domain_texts("food", 8)
    trainer = RewardTrainer(model=model, processing_class=tokenizer, callbacks=[make_callback()],
                            train_dataset=Dataset.from_list([{"chosen": a, "rejected": b} for a, b in zip(law, food)]),
                            args=RewardConfig(output_dir=str(tmp_path / "run"), max_steps=2, use_cpu=True,
                                              report_to=[], per_device_train_batch_size=4))
    with pytest.raises(STSConfigError, match="no LM head.*RewardTrainer"):
        trainer.train()


def test_one_instance_listed_twice_forecasts_and_rechecks_once(tmp_path, tokenizer):
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[callback], max_steps=4)
    with pytest.warns(UserWarning, match="in the trainer's callbacks twice"):
        trainer.train()
    forecasts = [e for e in trainer.state.log_history if "sts/forecast/law" in e]
    assert len(forecasts) == 1 and history_steps(tmp_path) == [2, 4]
    assert not list((tmp_path / "run" / "sts").glob("forecast.*.json"))  # nothing archived as an earlier run


class SaveAt3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_save = True


def test_a_checkpoint_another_callback_asks_for_later_is_rechecked_too(tmp_path, tokenizer):
    make_trainer(tmp_path, tokenizer, make_callback(), extra_callbacks=[SaveAt3()], max_steps=6).train()
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and history_steps(tmp_path) == [2, 3, 4, 6]


class StopAt5(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            control.should_training_stop = True


def test_the_end_recheck_does_not_label_the_loaded_best_checkpoint_as_the_last_step(tmp_path, tokenizer, capsys):
    callback = make_callback()
    trainer = make_trainer(tmp_path, tokenizer, callback, extra_callbacks=[StopAt5()], max_steps=8,
                           eval_strategy="steps", eval_steps=2, eval_texts=domain_texts("law", 8, seed=4),
                           metric_for_best_model="eval_loss", load_best_model_at_end=True)
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert trainer.state.global_step == 5 and best != 5
    assert 5 not in history_steps(tmp_path) and best in history_steps(tmp_path)
    assert f"loaded its best checkpoint (step {best}" in capsys.readouterr().out


def test_after_loading_the_best_checkpoint_the_report_and_evaluate_describe_its_weights(tmp_path, tokenizer):
    """load_best_model_at_end: the run ends with an earlier checkpoint's weights. The report must lead with that
    step's changes, not the last re-check's, and an evaluate() after training must not pair the loaded weights'
    eval_loss with the last step's held-out changes."""
    trainer = make_trainer(tmp_path, tokenizer, make_callback(), learning_rate=5e-2, lr_scheduler_type="constant",
                           max_steps=8, eval_strategy="steps", eval_steps=2, eval_texts=domain_texts("food", 16),
                           metric_for_best_model="eval_loss", load_best_model_at_end=True)
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    history = [json.loads(line) for line in (tmp_path / "run" / "sts" / "history.jsonl").open()]
    assert best < 8 and [r["step"] for r in history] == [2, 4, 6, 8]  # training on law made food worse after best
    assert history[-1]["loaded_best_step"] == best
    at_best = next(r for r in history if r["step"] == best)
    report = (tmp_path / "run" / "sts" / "report.md").read_text()
    assert f"loaded its best checkpoint (step {best}, load_best_model_at_end): the run ends with step {best}'s" in report
    headline = next(line for line in report.splitlines() if line.startswith("**Re-checks:**"))
    assert f"of the weights the run ends with (step {best}, loaded at the end)" in headline
    assert all(f"{name} {100 * value:+.1f}%" in headline for name, value in at_best["loss_delta"].items())
    metrics = trainer.evaluate()
    assert {name: metrics[f"eval_sts_loss_delta_{name}"] for name in at_best["loss_delta"]} == \
        pytest.approx(at_best["loss_delta"])
    assert at_best["loss_delta"] != pytest.approx(history[-1]["loss_delta"])


class FailAt4(TrainerCallback):
    def __init__(self, sae):
        self.sae = sae

    def on_step_begin(self, args, state, control, **kwargs):
        self.sae.fail = state.global_step == 3  # the step that ends as step 4


def test_a_failed_recheck_at_an_evaluation_says_early_stopping_counts_its_nan(tmp_path, tokenizer):
    sae = FailingSAE(32, 64, hook_name="blocks.1.hook_resid_post")
    callback = make_callback(sae=sae, protected=["food"])
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=6, eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4), extra_callbacks=[FailAt4(sae),
                                                                                       EarlyStoppingCallback(3)],
                           metric_for_best_model="eval_sts_protected_loss_delta", greater_is_better=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("NaN there" in str(w.message) and "EarlyStoppingCallback" in str(w.message) for w in caught)
    assert [("error" in r) for r in callback.history] == [False, True, False]


class FinalEvalLoss(TrainerCallback):
    def __init__(self):
        self.per_trial = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == state.max_steps:
            self.per_trial.append(metrics["eval_loss"])


def test_a_hyperparameter_search_keeps_each_trials_results_apart_and_its_objective_its_own(tmp_path, tokenizer):
    """transformers' default objective sums every evaluation metric but the loss when there are any: the eval_sts_*
    keys must not become it (they picked the trial with the worse loss). Each trial's forecast, history, report and
    checkpoint state stay in its own run-<n> folder, as its checkpoints do, so its checkpoint can be resumed."""
    optuna = pytest.importorskip("optuna")
    from test_callback import tokenized
    from tiny import make_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evals = FinalEvalLoss()
    trainer = Trainer(model_init=lambda trial=None: make_model("llama"), processing_class=tokenizer,
                      args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                                             eval_strategy="steps", eval_steps=2, use_cpu=True, report_to=[],
                                             per_device_train_batch_size=4),
                      train_dataset=tokenized(tokenizer, domain_texts("law", 32)),
                      eval_dataset=tokenized(tokenizer, domain_texts("law", 8, seed=1)),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[make_callback(target_domains={d: domain_texts(d, 30) for d in ("food", "chem")}),
                                 evals])
    grid = [1e-3, 5e-2]
    best = trainer.hyperparameter_search(
        direction="minimize", backend="optuna", n_trials=2, sampler=optuna.samplers.GridSampler({"learning_rate": grid}),
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", grid)})
    assert best.objective == pytest.approx(min(evals.per_trial))  # the eval loss, as without the callback
    run = tmp_path / "run"
    assert not (run / "sts").exists()
    for trial in ("run-0", "run-1"):
        assert len((run / trial / "sts" / "history.jsonl").read_text().splitlines()) == 2
        assert (run / trial / "sts" / "report.md").is_file() and (run / trial / "checkpoint-2" / "sts").is_dir()


def test_the_domain_metric_for_best_model_reads_is_measured_at_every_evaluation_whatever_loss_domains(tmp_path,
                                                                                                     tokenizer):
    """loss_domains=1 measured law every third re-check, and the evaluations between reported its earlier value as
    this step's: EarlyStoppingCallback saw no improvement and stopped a run in which law kept improving."""
    callback = make_callback(loss_domains=1)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=8, eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4), metric_for_best_model="eval_sts_loss_delta_law",
                           greater_is_better=False, load_best_model_at_end=True)
    trainer.train()
    assert all("law" in record["loss_delta"] for record in callback.history)
    others = [name for record in callback.history for name in record["loss_delta"] if name != "law"]
    assert len(others) == len(callback.history)  # the other domains still take turns, one a re-check
    assert set(others) == {"food", "chem"}
    logged = [e["eval_sts_loss_delta_law"] for e in trainer.state.log_history if "eval_sts_loss_delta_law" in e]
    assert len(set(logged)) == len(logged)  # a new measurement at each evaluation
    # a domain a re-check left out (its turn not come) is NaN at that evaluation, not its earlier step's value
    evaluations = [e for e in trainer.state.log_history if "eval_sts_loss_delta_law" in e]
    for entry in evaluations:
        record = next(r for r in callback.history if r["step"] == entry["step"])
        for name in ("food", "chem"):
            value = entry[f"eval_sts_loss_delta_{name}"]
            assert value == record["loss_delta"][name] if name in record["loss_delta"] else math.isnan(value)


def test_an_evaluation_on_start_reads_the_train_start_weights_as_no_change_without_a_recheck(tmp_path, tokenizer):
    """eval_on_start=True ran a step-0 "re-check" (a whole held-out pass, counted in the report, charted as 0 scores):
    the weights are the train start's, whose changes are zero by definition."""
    callback = make_callback(protected=["law"], recheck_steps=2)
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, eval_strategy="steps", eval_steps=2,
                           eval_on_start=True, eval_texts=domain_texts("law", 8, seed=4))
    trainer.train()
    assert [r["step"] for r in callback.history if r.get("step", 0) > 0] == [2, 4]
    assert not [r for r in callback.history if r.get("step") == 0 and "loss_delta" in r]
    [start] = [e for e in trainer.state.log_history if e["step"] == 0 and "eval_loss" in e]
    assert start["eval_sts_loss_delta_law"] == 0.0 and start["eval_sts_protected_loss_delta"] == 0.0


def quiz(n: int = 12) -> list[dict]:
    """Multiple-choice items (question / choices / answer): a domain whose accuracy every re-check measures."""
    return [{"question": domain_texts("food", n, seed=3)[i], "choices": ["cook bake", "cell protein"], "answer": 0}
            for i in range(n)]


def test_a_multiple_choice_domains_accuracy_change_is_an_evaluation_key_best_checkpoints_can_be_chosen_by(
        tmp_path, tokenizer):
    """A protected multiple-choice domain had its accuracy in the history and trackers but no eval_sts_* key, so
    load_best_model_at_end / EarlyStoppingCallback could not choose by it."""
    callback = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": quiz()}, protected=["quiz"])
    trainer = make_trainer(tmp_path, tokenizer, callback, max_steps=4, eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4), load_best_model_at_end=True,
                           metric_for_best_model="eval_sts_accuracy_delta_quiz")
    assert trainer.args.greater_is_better is True  # transformers' guess for a name not ending in "loss": right here
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_sts_accuracy_delta_quiz" in e]
    assert [e["step"] for e in evaluations] == [2, 4]
    history = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "sts" / "history.jsonl").open())}
    for entry in evaluations:  # the key is the re-check's measured change at that step
        assert entry["eval_sts_accuracy_delta_quiz"] == pytest.approx(history[entry["step"]]["accuracy_delta"]["quiz"])
    assert "eval_sts_accuracy_delta_law" not in evaluations[0]  # law has no items: no accuracy key
    assert trainer.state.best_metric == max(e["eval_sts_accuracy_delta_quiz"] for e in evaluations)


@pytest.mark.parametrize("metric, greater, error", [
    ("eval_sts_accuracy_delta_law", None, "'law', which has no multiple-choice items"),
    ("eval_sts_accuracy_delta_quiz", False, "accuracy change \\(higher is better\\), but greater_is_better is False"),
])
def test_an_accuracy_metric_for_the_best_model_no_evaluation_holds_or_read_upside_down_is_refused_at_train_start(
        tmp_path, tokenizer, metric, greater, error):
    callback = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": quiz()})
    trainer = make_trainer(tmp_path, tokenizer, callback, eval_strategy="steps", eval_steps=2,
                           eval_texts=domain_texts("law", 8, seed=4), metric_for_best_model=metric,
                           greater_is_better=greater, load_best_model_at_end=True)
    with pytest.raises(STSConfigError, match=error):
        trainer.train()
    assert trainer.state.global_step == 0
