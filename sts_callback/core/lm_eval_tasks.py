"""lm-evaluation-harness tasks as target domains: ``{"lm_eval": "<task>", "include_path": "<folder of task
YAMLs>", "limit": 100, "metric": "acc"}`` in ``target_domains``.

The task's documents (its prompt and the right answer) are the domain's texts for the forecast and the
held-out loss; the task's own metric, computed by the harness on the model being trained, is the domain's
accuracy at train start and at every re-check. The harness is an optional dependency
(``pip install 'sts-callback[lm-eval]'``), imported only when such a target is used.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import STSConfigError, STSInputError, first_line
from .torch_utils import rng_kept

KEY = "lm_eval"
FIELDS = (KEY, "include_path", "limit", "metric", "batch_size")


def is_lm_eval_target(value: Any) -> bool:
    return isinstance(value, dict) and KEY in value


@contextmanager
def lm_eval_logging_kept():
    """lm-eval's own INFO lines stay out of the run's log meanwhile, and its ``lm_eval`` logger is left as the user
    had it: lm-eval, asked for a verbosity, gives that logger a level, its own handler and no propagation."""
    logger = logging.getLogger("lm_eval")
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


def _quiet(lm_class):
    """``lm_class`` with its progress bars off: each re-check would print them into the training's console."""

    class Quiet(lm_class):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return Quiet


@dataclass
class LmEvalTarget:
    """One lm-evaluation-harness task scored on the model being trained."""

    task: str
    include_path: str | None = None
    limit: int | None = 100
    metric: str = "acc"
    batch_size: int | str = 4  # or "auto", as lm-eval takes it
    # the harness's task index (indexing its ~15k task files took 6 s), built once and kept for every re-check
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)
    _tokenizer_copy: Any = field(default=None, init=False, repr=False, compare=False)  # (the run's, its copy)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], name: str) -> "LmEvalTarget":
        unknown = sorted(set(spec) - set(FIELDS))
        if unknown:
            raise STSConfigError(f"Target domain {name!r}: unknown lm_eval key(s) {unknown}; valid: {list(FIELDS)}.")
        if not isinstance(spec[KEY], str) or not spec[KEY]:
            raise STSConfigError(f"Target domain {name!r}: lm_eval must name a task, got {spec[KEY]!r}.")
        limit = spec.get("limit", 100)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise STSConfigError(f"Target domain {name!r}: limit must be a positive number of documents or None.")
        batch_size = spec.get("batch_size", 4)
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise STSConfigError(f"Target domain {name!r}: batch_size must be a positive number or 'auto', got "
                                 f"{batch_size!r}.")
        metric = spec.get("metric", "acc")
        if not isinstance(metric, str) or not metric:
            raise STSConfigError(f"Target domain {name!r}: metric must name one of the task's metrics (e.g. 'acc', "
                                 f"'acc_norm'), got {metric!r}.")
        include_path = spec.get("include_path")
        if include_path is not None:
            include_path = os.path.expanduser(str(include_path))
        return cls(task=spec[KEY], include_path=include_path, limit=limit, metric=metric,
                   batch_size=batch_size)

    def _task(self):
        if self._loaded is None:
            self._loaded = self._load_task()
        return self._loaded

    def _load_task(self):
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as err:
            raise STSInputError("lm-evaluation-harness targets need the lm-eval package: pip install "
                                "'sts-callback[lm-eval]'.") from err
        with lm_eval_logging_kept():
            manager = TaskManager(include_path=self.include_path)
        if self.task not in manager.all_tasks:
            raise STSInputError(f"lm-eval task {self.task!r} is not known (include_path={self.include_path!r}); "
                                "give the folder of its YAML as include_path, or a task lm-eval ships.")
        if self.task in set(manager.all_groups) | set(getattr(manager, "all_tags", [])):
            raise STSInputError(f"lm-eval name {self.task!r} is a group of tasks (as mmlu is): a target domain is one "
                                "task; give each of its tasks a domain of its own, e.g. {'anatomy': {'lm_eval': "
                                "'mmlu_anatomy'}}.")
        try:
            with lm_eval_logging_kept():
                task = manager.load_task_or_group([self.task])[self.task]
        except (OSError, ConnectionError) as err:  # its dataset not cached, and no network (HF_HUB_OFFLINE)
            raise STSInputError(f"lm-eval task {self.task!r}: its documents could not be loaded ({type(err).__name__}: "
                                f"{first_line(err)}). Load the task once with network access (its dataset is then "
                                "cached), or give a task whose YAML reads local files (include_path).") from err
        # the metric named now, at train start, not when the first re-check has evaluated the task
        named = [m.get("metric") for m in (getattr(getattr(task, "config", None), "metric_list", None) or [])
                 if isinstance(m, dict) and isinstance(m.get("metric"), str)]
        if named and self.metric not in named:
            raise STSConfigError(f"lm-eval task {self.task!r} reports the metric(s) {named}, not {self.metric!r}; set "
                                 f"metric to one of them (e.g. {{'lm_eval': {self.task!r}, 'metric': {named[0]!r}}}).")
        try:
            higher = (task.higher_is_better() or {}).get(self.metric)
        except Exception:  # noqa: BLE001 - a task without the method says nothing either way
            higher = None
        if higher is False:  # the guard reads a fall as harm: perplexity's rise would read as a gain
            raise STSConfigError(f"lm-eval task {self.task!r}: its metric {self.metric!r} is better lower; the "
                                 "accuracy rule needs a share of items right, higher better (acc, acc_norm, "
                                 "exact_match). Pick one, or leave this domain's rise to its held-out loss.")
        return manager, task

    def texts(self) -> list[dict[str, str]]:
        """Each document as ``{"prompt", "completion"}``: the task's prompt and its right answer."""
        with rng_kept():  # loading a task draws from Python's random
            _, task = self._task()
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        if self.limit is not None:
            docs = docs[: self.limit]
        out = []
        for doc in docs:
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
            text = task.doc_to_text(doc)
            if choices is not None and isinstance(text, int) and not isinstance(text, bool):
                # several contexts, one continuation (Winogrande): the text is the right context's index
                out.append({"prompt": str(choices[text]), "completion": " " + str(target).strip()})
                continue
            answer = choices[target] if choices is not None and isinstance(target, int) else str(target)
            out.append({"prompt": str(text), "completion": " " + str(answer).strip()})
        if not out:
            raise STSInputError(f"lm-eval task {self.task!r} has no documents to use as a target domain.")
        return out

    def _own_copy(self, tokenizer):
        """The tokenizer copied once per run's tokenizer (the harness may change the one it is given)."""
        if self._tokenizer_copy is None or self._tokenizer_copy[0] is not tokenizer:
            self._tokenizer_copy = (tokenizer, copy.deepcopy(tokenizer))
        return self._tokenizer_copy[1]

    def evaluate(self, model: nn.Module, tokenizer) -> float:
        """The task's metric on ``model`` (the first ``limit`` documents), as the harness computes it. The harness
        seeds random, numpy and torch (0, 1234, 1234): the run's generators are put back as they were."""
        with rng_kept():
            return self._evaluate(model, tokenizer)

    def _evaluate(self, model: nn.Module, tokenizer) -> float:
        # lm-eval's evaluate(), not simple_evaluate(): the latter also runs `git describe` (which prints "fatal: not
        # a git repository" outside one) and collects torch's environment report, at every re-check
        import lm_eval.api.task
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from tqdm import tqdm

        from .capture import unwrap_model

        manager, _ = self._task()
        inner = unwrap_model(model)  # the transformers model (with a PEFT model's adapters active in it)
        device = str(next(iter(inner.parameters())).device)
        with lm_eval_logging_kept():
            # a copy: the harness sets a pad token on the tokenizer it is given, the run's own would change
            lm = _quiet(HFLM)(pretrained=inner, tokenizer=self._own_copy(tokenizer), batch_size=self.batch_size,
                              device=device)
            task = manager.load_task_or_group([self.task])[self.task]  # afresh: a run keeps its requests in it
            # what simple_evaluate does with its defaults: no few-shot unless the task asks, its seeds
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
            random.seed(0), np.random.seed(1234), torch.manual_seed(1234)
            # building the requests draws a progress bar that has no switch
            real_tqdm = lm_eval.api.task.tqdm
            lm_eval.api.task.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})
            try:
                result = evaluate(lm=lm, task_dict={self.task: task}, limit=self.limit, log_samples=False,
                                  bootstrap_iters=0)
            finally:
                lm_eval.api.task.tqdm = real_tqdm
        metrics = result["results"][self.task]
        key = next((k for k in metrics if k.split(",")[0] == self.metric), None)
        if key is None or not isinstance(metrics[key], (int, float)):
            reported = sorted({k.split(",")[0] for k, v in metrics.items() if isinstance(v, (int, float))
                               and not isinstance(v, bool) and not k.split(",")[0].endswith("_stderr")
                               and k.split(",")[0] != "sample_len"})
            raise STSConfigError(f"lm-eval task {self.task!r} reports the metric(s) {reported}, not {self.metric!r}; "
                                 "set metric to one of them (e.g. {'lm_eval': ..., 'metric': "
                                 f"{reported[0] if reported else 'exact_match'!r}}}).")
        value = float(metrics[key])
        if not 0.0 <= value <= 1.0:  # the guard and the report read it as a share of items, in points
            raise STSConfigError(f"lm-eval task {self.task!r}: its metric {self.metric!r} is {value:g}, not a share "
                                 "of items between 0 and 1; the accuracy rule needs one (acc, acc_norm, "
                                 "exact_match).")
        return value


__all__ = ["LmEvalTarget", "is_lm_eval_target"]
