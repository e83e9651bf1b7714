"""An lm-evaluation-harness task as a target domain: a local task config and data file, no hub."""

import json
import warnings

import pytest
from test_callback import make_callback, make_trainer, pretrained_tiny_model
from tiny import domain_texts, make_tokenizer

from sts_callback import STSConfigError
from sts_callback.integrations.callback import STSNegativeTransferWarning

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'sts-callback[lm-eval]'")

TASK = """task: tiny_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    words = {d: domain_texts(d, 20, seed=11) for d in ("food", "chem")}
    folder = tmp_path / "tasks"
    folder.mkdir()
    with (folder / "quiz.jsonl").open("w") as handle:
        for i in range(20):
            domain = ("food", "chem")[i % 2]
            handle.write(json.dumps({"question": words[domain][i], "choices": ["cook bake", "cell protein"],
                                     "answer": 0 if domain == "food" else 1}) + "\n")
    (folder / "quiz.yaml").write_text(TASK.format(data=folder / "quiz.jsonl"))
    return folder


def test_lm_eval_task_is_forecast_measured_and_guarded(tmp_path, task_folder):
    tokenizer = make_tokenizer()
    target = {"lm_eval": "tiny_quiz", "include_path": str(task_folder), "limit": 12}
    callback = make_callback(target_domains={"law": domain_texts("law", 30), "quiz": target,
                                             "chem": domain_texts("chem", 30)},
                             protected=["quiz"], tolerance=10.0, accuracy_tolerance=0.0)
    trainer = make_trainer(tmp_path, tokenizer, callback, model=pretrained_tiny_model(tokenizer),
                           texts=domain_texts("law", 64, seed=8), learning_rate=3e-2, max_steps=4, save_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    base = callback.base_accuracy["quiz"]
    assert 0.0 <= base <= 1.0 and "quiz" in callback.forecast.domains
    for record in callback.history:
        assert record["accuracy_delta"]["quiz"] == pytest.approx(record["accuracy"]["quiz"] - base)
        fell = record["accuracy_delta"]["quiz"] < 0
        assert any("accuracy of protected domain 'quiz' fell" in v for v in record["violations"]) == fell
    if any(r["accuracy_delta"]["quiz"] < 0 for r in callback.history):
        assert any(issubclass(w.category, STSNegativeTransferWarning) for w in caught)


def test_bad_lm_eval_settings_fail_at_construction():
    with pytest.raises(STSConfigError, match=r"unknown lm_eval key\(s\) \['limt'\]"):
        make_callback(target_domains={"quiz": {"lm_eval": "tiny_quiz", "limt": 5}, "law": domain_texts("law", 9)})
    with pytest.raises(STSConfigError, match="limit must be a positive"):
        make_callback(target_domains={"quiz": {"lm_eval": "tiny_quiz", "limit": 0}, "law": domain_texts("law", 9)})
    with pytest.raises(STSConfigError, match="batch_size must be a positive number or 'auto'"):
        make_callback(target_domains={"quiz": {"lm_eval": "tiny_quiz", "batch_size": 0}, "law": domain_texts("law", 9)})
    with pytest.raises(STSConfigError, match="metric must name"):
        make_callback(target_domains={"quiz": {"lm_eval": "tiny_quiz", "metric": 5}, "law": domain_texts("law", 9)})
    make_callback(target_domains={"quiz": {"lm_eval": "tiny_quiz", "batch_size": "auto"},
                                  "law": domain_texts("law", 9)})


def test_an_lm_eval_reckeck_leaves_the_runs_random_generators_and_indexes_the_tasks_once(task_folder, monkeypatch):
    """simple_evaluate seeds random, numpy and torch: every re-check replayed the same dropout masks and draws after
    it. And its TaskManager re-indexed every task lm-eval ships (6 s) at every re-check."""
    import random

    import numpy as np
    import torch
    import lm_eval.tasks
    from tiny import make_model

    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    managers = []
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: managers.append(1) or real(*a, **k))
    target = LmEvalTarget.from_spec({"lm_eval": "tiny_quiz", "include_path": str(task_folder), "limit": 4}, "quiz")
    tokenizer, model = make_tokenizer(), make_model("llama")
    draws = []
    for _ in range(2):
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        target.evaluate(model, tokenizer)
        draws.append((float(torch.rand(1)), random.random(), float(np.random.rand())))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert draws[0] == draws[1] == (float(torch.rand(1)), random.random(), float(np.random.rand()))
    assert len(managers) == 1


def test_an_lm_eval_recheck_leaves_the_users_lm_eval_logger_and_the_console_alone(task_folder, tmp_path, monkeypatch,
                                                                                   capfd):
    """simple_evaluate(verbosity="ERROR") left lm-eval's logger at ERROR with its own handler and no propagation (the
    user's later lm_eval lines were lost), and each re-check printed its progress bars and, outside a git
    repository, "fatal: not a git repository" (its `git describe` for the results' metadata)."""
    import logging

    from tiny import make_model

    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    monkeypatch.chdir(tmp_path)  # not a git repository
    logger = logging.getLogger("lm_eval")
    saved = logger.level, logger.propagate, list(logger.handlers)
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.setLevel(logging.INFO), logger.handlers.clear(), logger.addHandler(handler)
    logger.propagate = True
    try:
        target = LmEvalTarget.from_spec({"lm_eval": "tiny_quiz", "include_path": str(task_folder), "limit": 4}, "quiz")
        target.texts()
        capfd.readouterr()
        assert 0.0 <= target.evaluate(make_model("llama"), make_tokenizer()) <= 1.0
        assert (logger.level, logger.propagate, logger.handlers) == (logging.INFO, True, [handler])
        logging.getLogger("lm_eval.evaluator").info("the user's line")
        assert [r.getMessage() for r in seen][-1:] == ["the user's line"]
    finally:
        logger.setLevel(saved[0]), logger.handlers.clear(), [logger.addHandler(h) for h in saved[2]]
        logger.propagate = saved[1]
    err = capfd.readouterr().err
    assert "not a git repository" not in err and "Running loglikelihood requests" not in err and "%|" not in err, err


def test_an_lm_eval_task_is_a_target_of_the_offline_forecast_too(task_folder, tmp_path):
    """forecast() (and so `sts forecast`, the gate and validate) read an lm-eval task's documents as the callback
    does; it had told a user passing {'quiz': {'lm_eval': ...}} to pass a dict of name -> data, which they had."""
    from tiny import TinySAE, make_model

    from sts_callback import STSConfig, forecast
    from sts_callback.core.data import load_corpus
    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    tokenizer = make_tokenizer()
    spec = {"lm_eval": "tiny_quiz", "include_path": str(task_folder), "limit": 12}
    config = STSConfig(n_shifted=8, shift_tokens=300, domain_tokens=150, batch_size=4, n_domain_demonstrations=3)
    result = forecast(make_model("llama"), tokenizer, TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), domain_texts("law", 30),
                      {"quiz": spec, "law": domain_texts("law", 30, seed=5), "chem": domain_texts("chem", 30)}, config)
    assert set(result.domains) == {"quiz", "law", "chem"}
    assert result.domains["quiz"].tokens > 0
    documents = LmEvalTarget.from_spec(spec, "quiz").texts()
    assert len(documents) == 12 and documents[0]["completion"] in (" cook bake", " cell protein")
    with pytest.raises(Exception, match=r"lm-eval task \('tiny_quiz'\).*is a target domain, not data to train on"):
        load_corpus(spec, name="train")


def test_a_group_a_metric_the_task_lacks_and_an_uncached_dataset_are_named_before_any_work(task_folder):
    """A group (as mmlu is) raised a bare KeyError; a metric the task does not compute was named only after the
    first re-check's evaluation, among non-metrics ('alias', 'sample_len'); an uncached hub dataset offline raised
    datasets' ConnectionError, naming neither the task nor a fix."""
    from sts_callback import STSInputError
    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    (task_folder / "quizzes.yaml").write_text("group: quizzes\ntask:\n  - tiny_quiz\n")
    with pytest.raises(STSInputError, match="'quizzes' is a group of tasks"):
        LmEvalTarget.from_spec({"lm_eval": "quizzes", "include_path": str(task_folder)}, "q").texts()
    with pytest.raises(STSConfigError, match=r"reports the metric\(s\) \['acc'\], not 'exact_match'"):
        LmEvalTarget.from_spec({"lm_eval": "tiny_quiz", "include_path": str(task_folder), "metric": "exact_match"},
                               "q").texts()
    hub = TASK.replace("dataset_path: json", "dataset_path: someone/not_cached").replace("task: tiny_quiz",
                                                                                       "task: hub_quiz")
    (task_folder / "hub.yaml").write_text(hub.format(data="unused"))
    with pytest.raises(STSInputError, match="'hub_quiz': its documents could not be loaded"):
        LmEvalTarget.from_spec({"lm_eval": "hub_quiz", "include_path": str(task_folder)}, "q").texts()


def test_a_better_lower_metric_is_refused_and_a_winogrande_task_reads_its_right_context(task_folder):
    """word_perplexity was taken as an accuracy: it rose 6x unwarned, and the report called it a share in points.
    A Winogrande-style task (several contexts, one continuation) gave the forecast '0' + the sentence's tail."""
    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    (task_folder / "ppl.yaml").write_text(TASK.replace("task: tiny_quiz", "task: tiny_ppl").replace(
        "output_type: multiple_choice", "output_type: loglikelihood_rolling").replace(
        'doc_to_text: "{{{{question}}}}\\nAnswer:"', 'doc_to_text: ""').replace(
        'doc_to_choice: "{{{{choices}}}}"\n', "").replace("doc_to_target: answer", 'doc_to_target: "{{{{question}}}}"')
        .replace("metric: acc", "metric: word_perplexity").format(data=task_folder / "quiz.jsonl"))
    with pytest.raises(STSConfigError, match="its metric 'word_perplexity' is better lower"):
        LmEvalTarget.from_spec({"lm_eval": "tiny_ppl", "include_path": str(task_folder),
                                "metric": "word_perplexity"}, "q").texts()
    (task_folder / "wg_functions.py").write_text(
        "def doc_to_text(doc):\n    return {'1': 0, '2': 1}[doc['answer']]\n\n\n"
        "def doc_to_target(doc):\n    return doc['sentence'][doc['sentence'].index('_') + 1:].strip()\n\n\n"
        "def doc_to_choice(doc):\n    i = doc['sentence'].index('_')\n"
        "    return [doc['sentence'][:i] + o for o in (doc['option1'], doc['option2'])]\n")
    (task_folder / "wg.jsonl").write_text(json.dumps({"sentence": "the cook bakes the _ in the oven .",
                                                      "option1": "law", "option2": "bread", "answer": "2"}) + "\n")
    (task_folder / "wg.yaml").write_text(
        f"task: tiny_wg\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task_folder / 'wg.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: !function wg_functions.doc_to_text\n"
        "doc_to_target: !function wg_functions.doc_to_target\ndoc_to_choice: !function wg_functions.doc_to_choice\n"
        "metric_list:\n  - metric: acc\n")
    texts = LmEvalTarget.from_spec({"lm_eval": "tiny_wg", "include_path": str(task_folder)}, "wg").texts()
    assert texts == [{"prompt": "the cook bakes the bread", "completion": " in the oven ."}]


def test_an_lm_eval_recheck_leaves_the_runs_tokenizer_as_it_was(task_folder):
    """The harness sets a pad token on the tokenizer it is given: the run's own (saved with the model) changed."""
    from sts_callback.core.lm_eval_tasks import LmEvalTarget

    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    target = LmEvalTarget.from_spec({"lm_eval": "tiny_quiz", "include_path": str(task_folder), "limit": 4}, "quiz")
    value = target.evaluate(pretrained_tiny_model(make_tokenizer()), tokenizer)
    assert 0.0 <= value <= 1.0 and tokenizer.pad_token is None

