"""``STSCallback``: the forecast at train start, re-checks at checkpoints, warnings and early stop.

Thin glue: the library (forecast, monitor) does the work; the callback decides when, and where results
go (console table, ``trainer.log`` metrics, ``<output_dir>/sts/``, the checkpoint's state).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..scoring.calibration import Calibration, early_forecast, fitted_exponent, load_calibration, lr_area_fraction
from ..core.config import SCORE_VARIANTS, STSConfig, json_serializable
from ..core.data import Corpus, is_dataset, load_corpus, load_domains, multiple_choice_items
from ..core.distributed import (
    check_ranks_agree,
    fingerprint,
    require_at_least_world,
    world_size,
)
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.lm_eval_tasks import LmEvalTarget, is_lm_eval_target
from ..pipelines.forecast import Forecast, Setup, domain_statistics, inference_mode, run_forecast
from ..pipelines.guard import Guard, GuardConfig
from ..pipelines.monitor import DomainBase, Monitor, domain_bases_from
from ..core.run_store import FORECAST_FILE, HISTORY_FILE, MONITOR_FILE, SETTINGS_FILE, RunStore  # noqa: F401 - re-exported
from ..core.schedule import logged_learning_rates, planned_learning_rates
from ..scoring.signed import DEFAULT_SIGNED, SIGNED_VARIANTS
from ..core.stats import ActivationStats
from ..reporting import trackers
from .training_data import corpus_from_training_dataset

logger = logging.getLogger("sts_callback")

EVAL_DATASET = "eval_dataset"  # target_domains= value: the trainer's own eval set(s), by name


class STSNegativeTransferWarning(UserWarning):
    """A protected domain is forecast or measured to be harmed."""


class STSCallback(TrainerCallback, ExportableState):
    """Forecast and monitor the side effects of post-training on other domains.

    Add it to any ``transformers.Trainer`` or TRL trainer: ``callbacks=[STSCallback(sae=..., target_domains=...)]``.

    Args:
        sae: sae-lens folder, ``{"release": ..., "sae_id": ...}``, ``"release::sae_id"``, or an SAE object.
        target_domains: dict name -> JSONL path / registered domain name / list of texts, or a list of names.
        protected: names of target domains that must not be harmed.
        train_probe: data whose shift is forecast and re-checked; default: the trainer's train dataset.
        demonstrations: in-context demonstrations when the training data has no answers (GRPO prompts).
        config: :class:`STSConfig` fields for the forecast (dict or STSConfig).
        recheck_steps: re-check every this many steps; default: at every checkpoint save.
        recheck_tokens: probe tokens for the actual shift in a re-check.
        loss_tokens: held-out tokens per domain for the loss measurement.
        forecast_top_k: warn when the forecast ranks a protected domain among the ``k`` most affected.
        tolerance: warn when a protected domain's held-out loss rises by more than this fraction.
        max_sts: warn when a protected domain's re-checked score exceeds this value (``None``: off).
        early_stop: stop training after ``patience`` consecutive re-checks with a violation.
        patience: see ``early_stop``.
        strict: re-raise exceptions inside re-checks instead of warning and going on.
        recheck_at_end: re-check at the end of training when the last step was not re-checked.
        output_subdir: folder under ``args.output_dir`` for forecast, history and monitor state.
        calibration: a :class:`~sts_callback.scoring.calibration.Calibration` (or its JSON path), e.g. fitted on
            ``sts validate`` runs: at train start every domain gets a predicted end-of-training change of its
            held-out NLL with an interval, and a protected domain predicted to rise above ``tolerance`` is warned
            about. Each re-check records the early forecast (the measured change extrapolated to the end of
            training by the learning-rate schedule), the start prediction beside it, and a calibration refitted
            on the early forecasts; only the measured changes count as violations (early stop).
        accuracy_tolerance: a multiple-choice target domain (JSONL / records of ``{"question", "choices",
            "answer"}``) is also scored for accuracy at train start and at every re-check; a protected one that
            loses more than this (absolute, 0.02 = two points) is a violation.
        accuracy_items: items sampled per multiple-choice domain for the accuracy (one forward each).
        loss_precision: a re-check measures each domain's held-out loss change sequentially (same sequences
            before and after, in blocks) until the 95% interval is within +-``loss_precision * tolerance``, or a
            protected domain is surely above ``tolerance``, up to ``loss_tokens``; the interval is in the history
            (``loss_delta_ci``). ``None``: always all ``loss_tokens``.
    """

    def __init__(self, sae: Any, target_domains: Any, protected: list[str] | tuple[str, ...] = (),
                 train_probe: Any = None, demonstrations: Any = None, config: dict | STSConfig | None = None,
                 recheck_steps: int | None = None, recheck_tokens: int = 2048, loss_tokens: int = 1024,
                 forecast_top_k: int = 1, tolerance: float = 0.05, max_sts: float | None = None,
                 early_stop: bool = False, patience: int = 1, strict: bool = False, recheck_at_end: bool = True,
                 output_subdir: str = "sts", calibration: Any = None, accuracy_tolerance: float = 0.02,
                 accuracy_items: int = 100, loss_precision: float | None = 0.25,
                 _objects_from: list[str] | None = None):
        if isinstance(config, STSConfig):
            config = config.to_dict()
        self.config = STSConfig.from_dict(config)  # validated now, not at train start
        values = dict(sae=sae, target_domains=target_domains, train_probe=train_probe,
                      demonstrations=demonstrations)
        if _objects_from:  # rebuilt by the Trainer on resume: take back the objects of the user's instance
            live = STSCallback._live_objects
            missing = [name for name in _objects_from if name not in live]
            if missing:
                raise STSConfigError(
                    f"Resuming needs {missing} again: they were objects, not paths or names. Construct "
                    "STSCallback with the same objects before trainer.train(resume_from_checkpoint=...)."
                )
            values.update({name: live[name] for name in _objects_from})
        if values["sae"] is None:
            raise STSConfigError("STSCallback needs sae=: a sae-lens folder, {'release', 'sae_id'}, or an SAE object.")
        if not isinstance(values["sae"], (str, Path, dict)) and not hasattr(values["sae"], "encode"):
            raise STSConfigError(f"sae={type(values['sae']).__name__} has no encode(); pass an SAE or its path.")
        target = values["target_domains"]
        if target is None or (hasattr(target, "__len__") and len(target) == 0):
            raise STSConfigError("STSCallback needs target_domains=: a dict name -> data, or a list of names.")
        if isinstance(target, (str, Path)) and str(target) != EVAL_DATASET:
            raise STSConfigError(f"target_domains={str(target)!r}: give a dict name -> data, a list of domain names "
                                 f"or paths (e.g. [{str(target)!r}]), or {EVAL_DATASET!r} for the trainer's eval "
                                 "set(s).")
        if isinstance(target, dict):  # an lm-eval target's settings are checked now, the harness loads later
            for name, value in target.items():
                if is_lm_eval_target(value):
                    LmEvalTarget.from_spec(value, str(name))
        names = list(target) if isinstance(target, (dict, list, tuple)) else None
        if isinstance(target, (list, tuple)):
            names = [Path(t).stem if isinstance(t, (str, Path)) else None for t in target]
        self.guard = Guard(GuardConfig(protected=list(protected), tolerance=tolerance, max_sts=max_sts,
                                       forecast_top_k=forecast_top_k, early_stop=early_stop, patience=patience,
                                       accuracy_tolerance=accuracy_tolerance))
        protected = self.guard.config.protected
        if names is not None and None not in names:
            unknown = [p for p in protected if p not in names]
            if unknown:
                raise STSConfigError(f"protected={unknown} are not among the target domains {names}; "
                                     "protect only domains listed in target_domains.")
        for name, value, low in (("recheck_tokens", recheck_tokens, 1), ("loss_tokens", loss_tokens, 1),
                                 ("accuracy_items", accuracy_items, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise STSConfigError(f"STSCallback {name} must be an integer >= {low}, got {value!r}.")
        if recheck_steps is not None and (not isinstance(recheck_steps, int) or recheck_steps < 1):
            raise STSConfigError(f"recheck_steps must be None (at every save) or an integer >= 1, got {recheck_steps!r}.")

        self.sae, self.target_domains = values["sae"], values["target_domains"]
        self.train_probe, self.demonstrations = values["train_probe"], values["demonstrations"]
        self.recheck_steps, self.recheck_tokens, self.loss_tokens = recheck_steps, recheck_tokens, loss_tokens
        self.accuracy_items = accuracy_items
        self.lm_eval_targets: dict[str, LmEvalTarget] = {}
        if loss_precision is not None and (isinstance(loss_precision, bool) or not isinstance(loss_precision, (int, float))
                                           or not loss_precision > 0):
            raise STSConfigError(f"loss_precision must be a positive fraction of the tolerance (0.25: the 95% "
                                 f"interval of a loss change is at most +-tolerance/4) or None, got {loss_precision!r}.")
        self.loss_precision = loss_precision
        self.strict = strict
        self.recheck_at_end, self.output_subdir = recheck_at_end, output_subdir
        self.calibration = load_calibration(calibration) if calibration is not None else None
        if self.calibration is not None:
            unknown = [f for f in self.calibration.features if f not in SCORE_VARIANTS + SIGNED_VARIANTS]
            if unknown:
                raise STSConfigError(f"The calibration uses {unknown}, which are not forecast scores; use "
                                     f"{list(SCORE_VARIANTS + SIGNED_VARIANTS)}.")

        objects = {k: v for k, v in values.items() if v is not None and not json_serializable(v)}
        if objects:
            STSCallback._live_objects = {**STSCallback._live_objects, **objects}
        self._export_args = {
            **{k: (None if k in objects else v) for k, v in values.items()},
            "protected": protected, "config": self.config.to_dict(), "recheck_steps": recheck_steps,
            "recheck_tokens": recheck_tokens, "loss_tokens": loss_tokens, "forecast_top_k": forecast_top_k,
            "tolerance": self.guard.config.tolerance, "max_sts": max_sts, "early_stop": early_stop,
            "patience": patience, "accuracy_tolerance": accuracy_tolerance, "accuracy_items": accuracy_items,
            "loss_precision": loss_precision,
            "strict": strict, "recheck_at_end": recheck_at_end, "output_subdir": output_subdir,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "_objects_from": sorted(objects) or None,
        }
        # Restored from the checkpoint's trainer_state.json on resume (see state()).
        self.history: list[dict[str, Any]] = []
        self.base_losses: dict[str, float] = {}
        self.base_fit: dict[str, float] | None = None  # the SAE's FVU and L0 on the probe at train start
        self.base_accuracy: dict[str, float] = {}  # multiple-choice domains at train start
        self.predicted: dict[str, dict[str, float]] = {}  # calibrated end-of-training change per domain
        # Runtime only.
        self.learning_rates: list[float] | None = None
        self.schedule_source = "constant"
        self.forecast: Forecast | None = None
        self.monitor: Monitor | None = None
        self.write_errors: list[dict[str, Any]] = []  # files that could not be written (the data stays here)
        self._trainer = None
        self._ready = False

    _live_objects: dict[str, Any] = {}

    # The guard's rules and counters, under the names the Trainer restores on resume (trainer_state.json).
    protected = property(lambda self: self.guard.config.protected)
    tolerance = property(lambda self: self.guard.config.tolerance)
    max_sts = property(lambda self: self.guard.config.max_sts)
    violations_in_a_row = property(lambda self: self.guard.violations_in_a_row,
                                   lambda self, value: setattr(self.guard, "violations_in_a_row", value))
    warned = property(lambda self: self.guard.warned, lambda self, value: setattr(self.guard, "warned", list(value)))
    stop_reason = property(lambda self: self.guard.stop_reason,
                           lambda self, value: setattr(self.guard, "stop_reason", value))

    # ------------------------------------------------------------------ exported state
    def state(self) -> dict:
        return {"args": self._export_args, "attributes": {"history": self.history, **self._counters()}}

    def _counters(self) -> dict[str, Any]:
        """What a resume needs besides the history (also written to ``checkpoint-N/sts/callback_state.json``)."""
        return {"violations_in_a_row": self.violations_in_a_row, "warned": self.warned,
                "stop_reason": self.stop_reason, "base_losses": self.base_losses, "predicted": self.predicted,
                "base_fit": self.base_fit, "base_accuracy": self.base_accuracy}

    # ------------------------------------------------------------------ helpers
    def _out(self, args) -> Path:
        return Path(args.output_dir) / self.output_subdir

    def _store(self, args) -> RunStore:
        return RunStore(self._out(args))

    def _write(self, what: str, write, state=None) -> bool:
        """Run one file write; a failure (full disk, read-only folder) warns and is recorded, unless strict."""
        try:
            write()
            return True
        except Exception as err:  # noqa: BLE001 - losing a file must not kill a long run
            if self.strict:
                raise
            step = getattr(state, "global_step", None)
            self.write_errors.append({"step": step, "what": what, "error": f"{type(err).__name__}: {err}"})
            message = (f"STS could not write {what} ({type(err).__name__}: {err}); training goes on and the data "
                       "stays in memory (callback.history, callback.write_errors).")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
            return False

    @staticmethod
    def _find_trainer(callback: "STSCallback"):
        """The Trainer running this callback (callbacks are not handed it): found on the call stack."""
        from transformers import Trainer

        frame = inspect.currentframe()
        for _ in range(12):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
        return None

    def _autocast(self):
        """A factory of the trainer's autocast context (a context manager can be entered only once)."""
        accelerator = getattr(self._trainer, "accelerator", None)
        return accelerator.autocast if accelerator is not None else nullcontext

    def _log(self, metrics: dict[str, float], control) -> None:
        """Log through the trainer (W&B / TensorBoard / log_history) without cancelling its own loss log."""
        if self._trainer is None or not metrics:
            return
        from transformers import Trainer

        should_log = control.should_log
        # The base method: TRL's overrides would flush their running metrics early.
        Trainer.log(self._trainer, dict(metrics))
        control.should_log = should_log

    def _export(self, what: str, export, payload) -> None:
        """Tables for W&B / TensorBoard (main process); a tracker's failure warns and is recorded, never raises."""
        if self._trainer is None:
            return
        try:
            export(self._trainer, payload)
        except Exception as err:  # noqa: BLE001 - a tracker must never kill a training run
            if self.strict:
                raise
            self.write_errors.append({"what": f"tracker export of the {what}", "error": f"{type(err).__name__}: {err}"})
            warnings.warn(f"STS could not export the {what} to the trackers ({type(err).__name__}: {err}).",
                          RuntimeWarning, stacklevel=2)

    def _warn(self, key: str, message: str, state, category: type[Warning] | None = None) -> None:
        if not self.guard.first_time(key):
            return
        if state.is_world_process_zero:
            warnings.warn(message, category or STSNegativeTransferWarning, stacklevel=2)
            logger.warning(message)

    def _append_history(self, args, state, record: dict[str, Any]) -> None:
        self.history.append(record)
        if state.is_world_process_zero:
            store = self._store(args)
            self._write(f"the re-check of step {record.get('step')} to {store.path(HISTORY_FILE)}",
                        lambda: store.append_history(record), state)

    # ------------------------------------------------------------------ train start
    def attach(self, trainer) -> "STSCallback":
        """Bind to ``trainer`` (done at train start from the call stack when not called): the ``eval_sts_*``
        keys then join every evaluation's metrics before the trainer logs them, so W&B / TensorBoard,
        ``metric_for_best_model`` and ``EarlyStoppingCallback`` see them in any callback order."""
        self._trainer = trainer
        loop = trainer.evaluation_loop
        if getattr(loop, "_sts_callback", None) is self:
            return self
        signature = inspect.signature(loop)

        def evaluation_loop(*args, **kwargs):
            output = loop(*args, **kwargs)
            prefix = signature.bind(*args, **kwargs).arguments.get("metric_key_prefix", "eval")
            output.metrics.update(self.evaluation_metrics(prefix))
            return output

        evaluation_loop._sts_callback = self  # type: ignore[attr-defined]
        trainer.evaluation_loop = evaluation_loop
        return self

    def evaluation_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``<prefix>_sts_loss_delta_<domain>`` and ``<prefix>_sts_protected_loss_delta`` from a re-check at the
        current step (run now when none was); NaN where no measurement could be made."""
        if not self._ready or self._trainer is None:
            return {}
        trainer = self._trainer
        step = trainer.state.global_step
        if not any(r.get("step") == step and "error" not in r for r in self.history):
            self.run_recheck(trainer.args, trainer.state, trainer.control, trainer.model)
        last = next((r for r in reversed(self.history) if "error" not in r), None)
        deltas = dict(last["loss_delta"]) if last is not None else {}
        names = list(self.monitor.loss_sets) if self.monitor is not None else list(deltas)
        values = {name: _finite_or_nan(deltas.get(name)) for name in names}
        keys = {f"sts_loss_delta_{name}": value for name, value in values.items()}
        if self.protected:
            protected = [values.get(name, math.nan) for name in self.protected]
            keys["sts_protected_loss_delta"] = math.nan if any(math.isnan(v) for v in protected) else max(protected)
        out = {f"{prefix}_{k}": v for k, v in keys.items()}
        if prefix != "eval" and prefix.startswith("eval_"):  # one of several eval sets: the plain keys too
            out.update({f"eval_{k}": v for k, v in keys.items()})
        return out

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       lr_scheduler=None, **kwargs):
        trainer = self._trainer or self._find_trainer(self)
        if trainer is not None:
            self.attach(trainer)
        self.learning_rates, self.schedule_source = planned_learning_rates(args, state.max_steps, lr_scheduler)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise STSInputError("STSCallback needs the trainer's processing_class (tokenizer); pass "
                                "processing_class=tokenizer to the trainer.")
        self.setup = Setup.create(model, tokenizer, self.sae, self.config)
        domains = self._domains(tokenizer)
        unknown = [p for p in self.protected if p not in domains]
        if unknown:
            raise STSConfigError(f"protected={unknown} are not among the target domains {sorted(domains)}.")
        probe = self._probe_corpus(train_dataloader, tokenizer)
        demos = load_corpus(self.demonstrations, name="demonstrations") if self.demonstrations is not None else None
        loss_sets = {}
        for name, corpus in domains.items():
            sequences, _ = Monitor.sample_sequences(corpus, self.setup, self.loss_tokens,
                                                    seed=f"{self.config.seed}:heldout:{name}")
            loss_sets[name] = sequences
        accuracy_sets = {}
        for name, corpus in domains.items():
            items = multiple_choice_items(corpus)
            if items is not None:  # scored on a seeded sample of its items, beside the held-out NLL
                random.Random(f"{self.config.seed}:accuracy:{name}").shuffle(items)
                accuracy_sets[name] = items[: self.accuracy_items]
        probe_sequences, _ = Monitor.sample_sequences(probe, self.setup, self.recheck_tokens,
                                                      seed=f"{self.config.seed}:probe")
        self._check_ranks_agree(domains, loss_sets, probe_sequences)
        require_at_least_world(len(probe_sequences), "The re-check probe of the training data",
                               "Give more training texts, raise recheck_tokens, or run on fewer processes.")
        resumed = state.global_step > 0
        half_width = self.loss_precision * self.tolerance if self.loss_precision is not None else None
        self.monitor = Monitor(setup=self.setup, probe=probe_sequences, domains={}, loss_sets=loss_sets,
                               accuracy_sets=accuracy_sets, lm_eval_targets=self.lm_eval_targets, loss_half_width=half_width or None,
                               loss_tolerances={name: self.tolerance for name in self.protected},
                               seed=str(self.config.seed))
        if resumed:
            self._resume(args, state, domains)
        else:
            self._start(args, state, control, model, probe, domains, demos)
        self._ready = True

    def _check_ranks_agree(self, domains, loss_sets, probe_sequences) -> None:
        """Cheap checksum exchange before the first collective: every rank must see the same inputs."""
        if world_size() == 1:
            return
        sae = self.setup.sae
        sae_summary = sae.checksum_parts()
        check_ranks_agree(
            {"target domains": fingerprint(sorted(domains), loss_sets), "SAE": fingerprint(sae_summary),
             "training probe": fingerprint(probe_sequences), "STS config": fingerprint({k: v for k, v in self.config.to_dict().items() if k != "device"})},
            {"target domains": f"{sorted(domains)} ({fingerprint(sorted(domains), loss_sets)})",
             "SAE": f"{sae.hook_name} d_sae={sae.d_sae} ({fingerprint(sae_summary)})"},
        )

    def _domains(self, tokenizer) -> dict[str, Corpus]:
        """The target domains; the trainer's eval set(s) for ``"eval_dataset"``; datasets raw or tokenized."""
        target = self.target_domains
        if isinstance(target, (str, Path)) and str(target) == EVAL_DATASET:
            eval_sets = getattr(self._trainer, "eval_dataset", None)
            if eval_sets is None:
                raise STSConfigError(f"target_domains={EVAL_DATASET!r} but the trainer has no eval_dataset; pass "
                                     "eval_dataset= (a dataset or a dict name -> dataset) to the trainer, or give "
                                     "target_domains explicitly.")
            target = dict(eval_sets) if isinstance(eval_sets, dict) else {"eval": eval_sets}
        self.lm_eval_targets = {}
        if isinstance(target, dict):
            self.lm_eval_targets = {str(name): LmEvalTarget.from_spec(value, str(name))
                                    for name, value in target.items() if is_lm_eval_target(value)}
            target = {str(name): self.lm_eval_targets[str(name)].texts() if str(name) in self.lm_eval_targets
                      else corpus_from_training_dataset(value, tokenizer, name=str(name)) if is_dataset(value)
                      else value for name, value in target.items()}
        return load_domains(target)

    def _probe_corpus(self, train_dataloader, tokenizer) -> Corpus:
        if self.train_probe is not None:
            return load_corpus(self.train_probe, name="train_probe")
        dataset = getattr(self._trainer, "train_dataset", None)
        if dataset is None and train_dataloader is not None:
            dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:
            raise STSInputError("No training data found for the forecast: pass train_probe= to STSCallback.")
        return corpus_from_training_dataset(dataset, tokenizer)

    def _start(self, args, state, control, model, probe: Corpus, domains: dict[str, Corpus], demos) -> None:
        store = self._store(args)
        has_answers = demos is not None or any(probe[i].can_demonstrate for i in range(min(len(probe), 64)))
        if has_answers:
            run = run_forecast(self.setup, probe, domains, demos, progress=state.is_world_process_zero)
            self.forecast = run.forecast
            self.monitor.domains = domain_bases_from(run.domains)
            self._predict()
            if state.is_world_process_zero:
                forecast = self.forecast
                self._write(f"the forecast to {store.forecast_path}", lambda: forecast.save(store.forecast_path), state)
                print(self.forecast.table())  # the calibrated prediction first when there is one, else the scores
                self._export("forecast", trackers.export_forecast, self.forecast)
            self._log({f"sts/forecast/{name}": value for name, value in self.forecast.ranked() if value is not None},
                      control)
            self._log({f"sts/predicted/{name}": p["mean"] for name, p in self.predicted.items()}, control)
            for key, message in self.guard.forecast_warnings(self.forecast.ranked(), self.forecast.ranking).items():
                self._warn(key, message, state)
            if self.calibration is not None:
                for key, message in self.guard.predicted_warnings(self.predicted, self.calibration.level).items():
                    self._warn(key, message, state)
        else:
            if state.is_world_process_zero:
                print("STS forecast skipped: the training data has no answers to use as in-context demonstrations "
                      "(prompt-only data); pass demonstrations=[...] to forecast. Re-checks still run.")
            with inference_mode(model):
                self.monitor.domains = domain_bases_from(domain_statistics(self.setup, domains))
        self.monitor.capture_base(model)
        self.base_fit = self.monitor.sae_fit(model, self._autocast())
        if self.base_fit is not None and state.is_world_process_zero:
            print(f"STS: SAE fit on the training probe: fraction of variance unexplained {self.base_fit['fvu']:.3f}, "
                  f"mean L0 {self.base_fit['l0']:.1f}")
        for key, message in self.guard.fit_warnings(None, self.base_fit).items():
            self._warn(key, message, state, STSDataWarning)
        self.base_losses = self.monitor.measure_losses(model, self._autocast())
        self.monitor.base_losses = dict(self.base_losses)
        self.base_accuracy = self.monitor.measure_accuracy(model, self._autocast())
        self.monitor.base_accuracy = dict(self.base_accuracy)
        if state.is_world_process_zero:
            self._write(f"the monitor state to {store.monitor_path}", lambda: self.monitor.save(store.monitor_path),
                        state)
            self._write(f"the old history in {store.root}", store.archive_history, state)
            self._write(f"the settings to {store.root}", lambda: store.write_settings(
                {"protected": self.protected, "tolerance": self.tolerance, "max_sts": self.max_sts}), state)
            self._write(f"the callback state to {store.root}", lambda: store.write_state(self._counters()), state)

    def _predict(self) -> None:
        """The calibrated end-of-training change of every domain (``forecast.predictions``)."""
        if self.calibration is None or self.forecast is None:
            return
        for name, domain in self.forecast.domains.items():
            missing = [f for f in self.calibration.features if domain.scores.get(f) is None]
            if missing:
                raise STSConfigError(f"The calibration uses {missing}, which this forecast did not compute for "
                                     f"{name!r} (compute_icl=False? no SAE decoder?); fit it on other features.")
        self.forecast.apply_calibration(self.calibration)
        self.predicted = {name: {k: p[k] for k in ("mean", "low", "high", "level")}
                          for name, p in self.forecast.predictions.items()}

    def _early_forecast(self, state, result: dict[str, Any]) -> dict[str, Any]:
        """The measured changes extrapolated to the end of training, and the calibration refitted on them."""
        if self.schedule_source == "logged":  # a scheduler of the user's own: the rates logged so far
            self.learning_rates = logged_learning_rates(state.log_history, state.max_steps)
        if not self.learning_rates or state.max_steps <= 0:
            return {}
        fraction = lr_area_fraction(state.global_step, state.max_steps, self.learning_rates)
        # The exponent of change ~ f^b from this run's own earlier re-checks (linear until there are two).
        points = [(r["lr_area_fraction"], r["loss_delta"]) for r in self.history if r.get("lr_area_fraction")]
        exponent = fitted_exponent(points + [(fraction, result["loss_delta"])]) or 1.0
        early = early_forecast(result["loss_delta"], fraction, exponent)
        out: dict[str, Any] = {"lr_area_fraction": fraction, "early_exponent": exponent, "early_forecast": early}
        if self.predicted:
            out["predicted"] = {name: p["mean"] for name, p in self.predicted.items()}
        features = self.calibration.features if self.calibration is not None else [DEFAULT_SIGNED]
        if self.forecast is not None:
            names = [n for n, v in early.items() if v is not None and n in self.forecast.domains
                     and all(self.forecast.domains[n].scores.get(f) is not None for f in features)]
            if len(names) >= len(features) + 2:
                x = [[self.forecast.domains[n].scores[f] for f in features] for n in names]
                refit = Calibration.fit(x, [early[n] for n in names], features,
                                        level=self.calibration.level if self.calibration is not None else 0.9)
                out["calibration"] = {"features": features, "coef": refit.coef, "intercept": refit.intercept,
                                      "center": refit.center, "scale": refit.scale, "sigma": refit.sigma, "n": refit.n}
        projected = self.guard.projected(early, result["loss_delta"], fraction)
        for name, message in projected.items():
            self._warn(f"early:{name}", f"STS early forecast at step {state.global_step}: {message}.", state)
        if projected:
            out["projected_warnings"] = list(projected.values())
        return out

    def _variant(self) -> str:
        return self.config.ranking if self.config.compute_icl else "sts_act"

    def _resume(self, args, state, domains) -> None:
        """Pick up where the checkpoint left off, whether or not the Trainer restored this callback's state:
        what it did not restore is read back from the run folder and the checkpoint."""
        store = self._store(args)
        checkpoint = store.checkpoint(args.output_dir, state.global_step, self.output_subdir)
        if store.forecast_path.exists():
            self.forecast = Forecast.load(store.forecast_path)
        path = checkpoint.monitor_path if checkpoint.monitor_path.exists() else store.monitor_path
        if not path.exists():
            raise STSInputError(f"Resuming: no STS monitor state at {checkpoint.monitor_path} or "
                                f"{store.monitor_path}; the base statistics are lost (start a new run, or delete "
                                "the checkpoint's STS state).")
        if not self.base_losses:  # restore_callback_states_from_checkpoint=False (the default)
            saved = checkpoint.read_state() or store.read_state() or {}
            for key, value in saved.items():
                if key in self._counters():
                    setattr(self, key, value)
        if not self.base_losses:
            raise STSInputError(f"Resuming: the train-start held-out losses are in neither {checkpoint.root} nor "
                                f"{store.root} ({checkpoint.path('callback_state.json').name}); loss changes cannot "
                                "be measured. Start a new run, or resume with "
                                "TrainingArguments(restore_callback_states_from_checkpoint=True).")
        self.monitor.domains = {name: DomainBase(latents=ActivationStats(self.setup.sae.d_sae)) for name in domains}
        self.monitor.load(path)
        self.monitor.base_losses = dict(self.base_losses)
        self.monitor.base_accuracy = dict(self.base_accuracy)
        # Re-checks after the checkpoint are redone by the resumed run: they move to the superseded file.
        if state.is_world_process_zero:
            kept: list[dict[str, Any]] = []
            self._write(f"the history in {store.root}",
                        lambda: kept.extend(store.keep_history_until(state.global_step)), state)
            if not self.history:
                self.history = kept
            print(f"STS: resumed at step {state.global_step}; forecast read back from {store.forecast_path}.")
        if not self.history:  # other ranks, or the main one when the folder could not be read
            self.history = [r for r in store.read_history() if r.get("step", 0) <= state.global_step]
        self.history = [r for r in self.history if r.get("step", 0) <= state.global_step]

    # ------------------------------------------------------------------ during training
    def _recheck_due(self, args, state, control) -> bool:
        if self.recheck_steps is not None:
            return state.global_step % self.recheck_steps == 0
        return bool(control.should_save)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._ready and self._recheck_due(args, state, control):
            self.run_recheck(args, state, control, model)

    def run_recheck(self, args, state, control, model) -> dict[str, Any] | None:
        """One re-check now; failures are warned about and recorded unless ``strict``."""
        if any(r.get("step") == state.global_step for r in self.history):
            return None
        try:
            result = self.monitor.recheck(model, self.forecast.shifted_latents if self.forecast else None,
                                          self._autocast())
        except Exception as err:  # noqa: BLE001 - a monitoring failure must not kill a long run
            model.train()
            if self.strict:
                raise
            trace = traceback.format_exc()
            message = f"STS re-check at step {state.global_step} failed and was skipped ({type(err).__name__}: {err})"
            if state.is_world_process_zero:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                logger.warning("%s\n%s", message, trace)
            self._append_history(args, state, {"step": state.global_step, "error": f"{type(err).__name__}: {err}",
                                               "traceback": trace})
            return None
        record = {"step": state.global_step, **result}
        try:
            record.update(self._early_forecast(state, result))
        except Exception as err:  # noqa: BLE001 - a projection must not cost the measurement
            if self.strict:
                raise
            record["early_forecast_error"] = f"{type(err).__name__}: {err}"
        for key, message in self.guard.fit_warnings(self.base_fit, result.get("sae_fit")).items():
            self._warn(key, f"STS re-check at step {state.global_step}: {message}", state, STSDataWarning)
        decision = self.guard.check(state.global_step, result, self._variant())
        record["violations"] = decision.violations
        for violation in decision.violations:
            self._warn(f"step{state.global_step}:{violation}", f"STS re-check at step {state.global_step}: {violation}",
                       state)
        if decision.stop:
            record["early_stop"] = decision.reason
            control.should_training_stop = True
            if state.is_world_process_zero:
                logger.warning(decision.reason)
                print(f"STS: {decision.reason}")
        self._append_history(args, state, record)
        self.write_report(args, state)
        metrics = {f"sts/early_forecast/{name}": value for name, value in record.get("early_forecast", {}).items()
                   if value is not None}
        variant = self._variant()
        for name, scores in result["scores"].items():
            value = scores.get(variant, scores["sts_act"])
            metrics[f"sts/recheck/{name}"] = value
        for name, delta in result["loss_delta"].items():
            if delta is not None:
                metrics[f"sts/loss_delta/{name}"] = delta
        for name, value in result.get("accuracy", {}).items():
            metrics[f"sts/accuracy/{name}"] = value
        if result["overlap_with_forecast"] is not None:
            metrics["sts/recheck/overlap_with_forecast"] = result["overlap_with_forecast"]
        metrics["sts/recheck/seconds"] = result["seconds"]
        if result.get("sae_fit"):
            metrics["sts/sae_fit/fvu"], metrics["sts/sae_fit/l0"] = result["sae_fit"]["fvu"], result["sae_fit"]["l0"]
        self._log(metrics, control)
        if state.is_world_process_zero:
            self._export("re-check", trackers.export_recheck, record)
        return record

    def on_save(self, args, state, control, **kwargs):
        if not self._ready or not state.is_world_process_zero:
            return
        if (Path(args.output_dir) / f"checkpoint-{state.global_step}").is_dir():
            checkpoint = self._store(args).checkpoint(args.output_dir, state.global_step, self.output_subdir)
            self._write(f"the monitor state to {checkpoint.root}", lambda: self.monitor.save(checkpoint.monitor_path),
                        state)
            self._write(f"the callback state to {checkpoint.root}", lambda: checkpoint.write_state(self._counters()),
                        state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Fallback when no trainer could be attached (see :meth:`attach`): add the ``eval_sts_*`` keys here."""
        if metrics is not None and self._trainer is None and self.history:
            last = next((r for r in reversed(self.history) if "error" not in r), None)
            for name, delta in (last or {}).get("loss_delta", {}).items():
                metrics.setdefault(f"eval_sts_loss_delta_{name}", _finite_or_nan(delta))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._ready:
            return
        if self.recheck_at_end and not any(r.get("step") == state.global_step for r in self.history):
            self.run_recheck(args, state, control, model)
        self.write_report(args, state, export=True)

    def write_report(self, args, state, export: bool = False) -> None:
        """``report.html`` / ``report.md`` in the STS folder (main process); a failure only warns unless strict."""
        out = self._out(args)
        if not state.is_world_process_zero or not self._store(args).has_results():
            return
        try:
            from ..reporting.report import write_report

            html_path, _ = write_report(out, protected=self.protected)
            if export:  # once, at the end: not an artifact per re-check
                self._export("report", trackers.export_report, html_path)
        except Exception as err:  # noqa: BLE001 - a report must never kill a training run
            if self.strict:
                raise
            message = f"STS report at step {state.global_step} was not written ({type(err).__name__}: {err})"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)


def _finite_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan
