"""``STSCallback``: the forecast at train start, re-checks at checkpoints, warnings and early stop.

Thin glue: maps the Trainer's events to an :class:`~.session.STSSession` (forecast, re-check, guard, run folder)
and sends what it returns to the console, ``trainer.log`` metrics (W&B / TensorBoard) and the checkpoint's state.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..core.atomic import check_writable_folder
from ..core.capture import check_measurable, parameters_are_sharded
from ..core.config import STSConfig, json_serializable
from ..core.data import (anchored, check_data_spec, check_named_target, check_not_empty, load_corpus, named_items,
                         multiple_choice_items, text_tokenizer)
from ..core.distributed import raise_collectively
from ..core.head_sample import TAIL_DEFAULT
from ..core.sae import check_not_on_meta, missing_sae_folder
from ..core.errors import STSConfigError, STSDataWarning, STSInputError, STSOutOfMemoryError, first_line
from ..core.lm_eval_tasks import LmEvalTarget, is_lm_eval_target
from ..core.run_store import FORECAST_FILE, HISTORY_FILE, MONITOR_FILE, SETTINGS_FILE, RunStore  # noqa: F401 - re-exported
from ..core.run_store import checkpoint_folders
from ..core.schedule import planned_learning_rates, why_not_stepped_ahead
from ..pipelines.forecast import check_icl_loss_shift
from ..pipelines.guard import GuardConfig
from ..pipelines.preference import Truncation
from ..scoring.calibration import own_feature
from ..pipelines.recheck import RecheckConfig, RecheckSteps
from ..reporting import trackers
from .session import COUNTERS, STSNegativeTransferWarning, STSSession, check_not_predicted
from .trainer_shift import (DISTILLATION_SHIFTS, RL_SHIFTS, ROLLOUT_SHIFTS, check_shift, forecast_runner,
                            fresh_rollout_probe, is_online, is_rl, likelihood_term, resolve_shift, rollout_data,
                            rollout_probe, trainer_distillation_rollouts, trainer_rollouts, unreproduced_generation)
from .trainer_run_level import (COMPRESSED_SHARE, DEFAULT_RUN_LEVEL_STEPS, RUN_LEVEL_METHODS, check_run_level,
                                compressed_lr_factor, run_level_runner)
from .training_data import EVAL_DATASET, check_readable_columns, probe_corpus, target_corpora


def saved_in_trainer_state(checkpoint: Path, output_subdir: str) -> dict[str, Any] | None:
    """The counters this callback exported into the checkpoint's ``trainer_state.json`` (``stateful_callbacks``):
    the run's own state where the checkpoint's STS folder lacks it (its write failed, or the process was stopped
    between the Trainer's save and STS's)."""
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["stateful_callbacks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # several callbacks of one class are kept as a list that each save extends (transformers), the earliest
    # entries from before the train-start measurement: the latest entry that holds it is this run's
    for entries in saved.values():
        for entry in reversed(entries if isinstance(entries, list) else [entries]):
            args, attributes = (entry.get("args") or {}, entry.get("attributes") or {}) \
                if isinstance(entry, dict) else ({}, {})
            if args.get("output_subdir") == output_subdir and attributes.get("base_losses"):
                return {key: value for key, value in attributes.items() if key != "history"}
    return None


class STSCallback(TrainerCallback, ExportableState):
    """Forecast and monitor the side effects of post-training on other domains (Trainer glue around
    :class:`~sts_callback.integrations.session.STSSession`).

    Add it to any ``transformers.Trainer`` or TRL trainer: ``callbacks=[STSCallback(sae=..., target_domains=...)]``.

    Args:
        sae: sae-lens folder, ``{"release": ..., "sae_id": ...}``, ``"release::sae_id"``, or an SAE object.
        target_domains: dict name -> JSONL path / registered domain name / list of texts, or a list of names.
        protected: names of target domains that must not be harmed.
        train_probe: data whose shift is forecast and re-checked; default: the trainer's train dataset.
        demonstrations: in-context demonstrations (for prompt-only data; an RL trainer then uses these instead of
            its own rollouts).
        config: :class:`STSConfig` fields for the forecast (dict or STSConfig).
        recheck_steps: re-check every this many steps (``10``), every this fraction of the run (``0.1``, as
            ``TrainingArguments.eval_steps``), or at the listed steps or fractions (``[2, 4, 8, 16, 32, 64]``);
            default: at every checkpoint save.
        recheck_tokens: probe tokens for the actual shift in a re-check.
        loss_tokens: held-out tokens per domain for the loss measurement.
        forecast_top_k: warn when the forecast ranks a protected domain among the ``k`` most affected.
        tolerance: warn when a protected domain's held-out loss rises by more than this fraction.
        max_sts: warn when a protected domain's re-checked score exceeds this value (``None``: off).
        early_stop: stop training after ``patience`` consecutive re-checks with a violation; ``"projected"``: also
            when the early forecast projects a protected domain above ``tolerance`` by the end of training with its
            whole interval (the measured change's 95% interval, extrapolated), which stops before the violation.
        patience: see ``early_stop``.
        warn_confidence: how likely a protected domain's train-start predicted change must be to end above
            ``tolerance`` for a warning (0.5: its mean above it; 0.8: fewer warnings on domains that end just
            inside, later ones on those that do not; see :class:`~sts_callback.pipelines.guard.GuardConfig`).
        strict: re-raise exceptions inside re-checks instead of warning and going on.
        recheck_at_end: re-check at the end of training when the last step was not re-checked.
        output_subdir: folder under ``args.output_dir`` for forecast, history and monitor state.
        calibration: a :class:`~sts_callback.scoring.calibration.Calibration`, its JSON path (``sts calibrate``
            on your runs) or a built-in name (``"gemma3-270m-lora"``: Gemma 3 270M with the demo SAE;
            ``"gemma3-270m-lora-lookahead-icl"`` with ``run_level="lookahead"``: the benchmark's best step-0 forecast
            at 2.5% of the run, which also computes each domain's in-context NLL change;
            ``"gemma3-270m-lora-compressed"`` with ``run_level="compressed"``: its best-ordering one, at a quarter
            of the run): at train start every domain gets a predicted
            end-of-training change of its
            held-out NLL with an interval, and a protected domain predicted to rise above ``tolerance`` is warned
            about. Each re-check records the early forecast (the measured change extrapolated to the end of
            training by the learning-rate schedule), the start prediction beside it, and a calibration refitted
            on the early forecasts; only the measured changes count as violations (early stop).
        not_predicted: target domains the calibration does not predict (their scores and measured changes stand),
            e.g. a held-out part of the training data itself, which a calibration fitted on the other domains of its
            runs does not cover (a centred one would centre over it), as ``sts forecast --not-predicted`` does.
        accuracy_tolerance: a multiple-choice target domain (JSONL / records of ``{"question", "choices",
            "answer"}``) is also scored for accuracy at train start and at every re-check; a protected one that
            loses more than this (absolute, 0.02 = two points) is a violation.
        accuracy_items: items sampled per multiple-choice domain for the accuracy (one forward each).
        loss_precision: a re-check measures each domain's held-out loss change sequentially (same sequences
            before and after, in blocks) until the 95% interval is within +-``loss_precision * tolerance``, or a
            protected domain is surely above ``tolerance``, up to ``loss_tokens``; the interval is in the history
            (``loss_delta_ci``). ``None``: always all ``loss_tokens``.
        loss_sequence_tokens: held-out texts are cut to their first this many tokens (more, shorter sequences:
            the sequential measurement stops sooner, but it measures the texts' openings); ``None`` (default):
            the texts as the forecast reads them.
        loss_domains: held-out losses of at most this many unprotected domains per re-check, in turns
            (protected domains every time); ``None``: all at every re-check.
        overhead_budget: hold re-checks to this share of training time (``0.03``: 3%), timed on the run: the
            probe and the protected domains every time, the other domains' losses in turns as the budget affords;
            the share spent is in each history record (``overhead``) and logged as ``sts/recheck_stats/overhead``.
            ``None`` (default): every domain (or ``loss_domains``) at every re-check.
        early_method: how each re-check projects the changes to the end of training (``"trend"``: latest change
            plus the recent slope in the learning-rate area; ``"power"``: change ~ f^b; ``None``: the benchmark's
            best, ``"power"`` blended with the step-0 prediction when the calibration has that blend, else
            ``"trend"``); see ``RecheckConfig``.
        fresh_rollouts: under RL and distillation, each re-check's probe is the current policy's completions of
            fresh prompts (base residuals from the trainer's ``ref_model`` or the adapters-disabled model);
            ``False``: the train-start rollouts throughout.
        loss_head_dtype: the LM head's matmul precision for held-out losses (``"auto"``: bfloat16 for a float32
            head on hardware with native bf16 matmuls; ``"bfloat16"``; ``None``: the head's own); see
            ``RecheckConfig``.
        loss_body_dtype: the body's precision for held-out losses, as autocast (``"auto"``: bfloat16 for a float32
            body on such hardware; ``"bfloat16"``; ``None``: the body's own); see ``RecheckConfig``.
        loss_head_samples: the re-checks' LM head from a sample of the vocabulary (each held-out token's top 32
            logits from train start and this many draws from the rest; default 32); ``None``: the whole head at
            every re-check; see ``RecheckConfig``.
        run_level: the run-level term at train start (:mod:`~sts_callback.pipelines.runlevel`): ``"lookahead"``
            (``run_level_steps`` real steps of the trainer's optimizer at the schedule's peak (unset: the
            calibration's own step count where it was fitted on one, else 3) on the run's own first batches (a
            seeded draw of the training set where their order cannot be known beforehand), each domain's
            held-out NLL change measured, then weights, optimizer state and RNG put back exactly),
            ``"compressed"`` (the same, a quarter of the run's steps (unset ``run_level_steps``: the calibration's
            share where it was fitted on one) at a constant rate holding the whole schedule's learning-rate area:
            a compressed run, the best-ordering forecast before training on the benchmark, at the cost of those
            steps; with ``calibration="gemma3-270m-lora-compressed"``) or
            ``"first_order"`` (the same change predicted from gradients, nothing stepped); added to the forecast's
            scores (a calibration may use it) and logged as ``sts/run_level/<domain>``. With a calibration that
            uses only the training data's own change (``lookahead_own``), only that is measured: a few steps'
            worth in place of a pass over every domain. ``None``: none. Language-model trainers only (Trainer,
            SFTTrainer).
        shift: what the training pushes (:mod:`~sts_callback.integrations.trainer_shift`): ``"auto"`` (RL trainer
            -> the reward-weighted shift of the policy's rollouts; preference data -> chosen minus rejected; a
            distillation trainer's teacher -> the teacher's completions in context; else the data's answers in
            context), or one of ``"in_context"``, ``"chosen_vs_rejected"``, ``"reward_filtered"``,
            ``"reward_weighted"``, ``"teacher_completions"``, ``"teacher_vs_student"``. Rollouts follow
            ``STSConfig.rollout_*`` budgets and the trainer's generation settings and reward functions.
    """

    def __init__(self, sae: Any, target_domains: Any, protected: list[str] | tuple[str, ...] = (),
                 train_probe: Any = None, demonstrations: Any = None, config: dict | STSConfig | None = None,
                 recheck_steps: RecheckSteps = None, recheck_tokens: int = 2048, loss_tokens: int = 1024,
                 forecast_top_k: int = 1, tolerance: float = 0.05, max_sts: float | None = None,
                 early_stop: bool | str = False, patience: int = 1, strict: bool = False, recheck_at_end: bool = True,
                 output_subdir: str = "sts", calibration: Any = None, accuracy_tolerance: float = 0.02,
                 accuracy_items: int = 100, loss_precision: float | None = 0.25, shift: str = "auto",
                 loss_sequence_tokens: int | None = None, loss_domains: int | None = None, early_method: str | None = None, fresh_rollouts: bool = True,
                 overhead_budget: float | None = None, run_level: str | None = None, run_level_steps: int | None = None,
                 loss_head_dtype: str | None = "auto", loss_body_dtype: str | None = "auto",
                 loss_head_samples: int | None = TAIL_DEFAULT, not_predicted: list[str] | tuple[str, ...] = (),
                 warn_confidence: float = 0.5, _objects_from: list[str] | None = None):
        # One config per concern, each validated now (not at train start); the flat arguments are the Trainer-
        # callback convention (exported to trainer_state.json and passed back on resume).
        config = STSConfig.from_dict(config.to_dict() if isinstance(config, STSConfig) else config)
        if not isinstance(strict, bool):
            raise STSConfigError(f"strict must be True or False, got {strict!r}.")
        if not isinstance(output_subdir, (str, Path)) or not str(output_subdir).strip() or \
                Path(output_subdir).is_absolute() or ".." in Path(output_subdir).parts:
            raise STSConfigError(f"output_subdir must name a folder inside the run's output_dir (default 'sts'), "
                                 f"got {output_subdir!r}.")
        output_subdir = str(output_subdir)  # a Path too: exported to trainer_state.json, compared on resume
        guard = GuardConfig(protected=protected, tolerance=tolerance, max_sts=max_sts,
                            forecast_top_k=forecast_top_k, early_stop=early_stop, patience=patience,
                            warn_confidence=warn_confidence,
                            accuracy_tolerance=accuracy_tolerance)
        recheck = RecheckConfig(recheck_steps=recheck_steps, recheck_tokens=recheck_tokens, loss_tokens=loss_tokens,
                                loss_precision=loss_precision, accuracy_items=accuracy_items,
                                recheck_at_end=recheck_at_end, loss_sequence_tokens=loss_sequence_tokens,
                                loss_domains=loss_domains, overhead_budget=overhead_budget,
                                early_method=early_method, fresh_rollouts=fresh_rollouts,
                                loss_head_dtype=loss_head_dtype, loss_body_dtype=loss_body_dtype,
                                loss_head_samples=loss_head_samples)
        values = dict(sae=sae, target_domains=target_domains, train_probe=train_probe, demonstrations=demonstrations)
        replaced = _instance_being_restored(output_subdir)
        if _objects_from:  # rebuilt by the Trainer on resume: take back the objects of the user's instance
            live = replaced._objects if replaced is not None else {}
            missing = [name for name in _objects_from if name not in live]
            if missing:
                raise STSConfigError(
                    f"Resuming needs {missing} again: they were objects, not paths or names. Construct "
                    "STSCallback with the same objects before trainer.train(resume_from_checkpoint=...)."
                )
            values.update({name: live[name] for name in _objects_from})
        values.update(_anchored_paths(values))  # read at train start, maybe after a change of working folder
        _check_inputs(values["sae"], values["target_domains"], guard.protected,
                      {"train_probe": values["train_probe"], "demonstrations": values["demonstrations"]})
        self.target_domains, self.train_probe = values["target_domains"], values["train_probe"]
        self.demonstrations, self.output_subdir = values["demonstrations"], output_subdir
        self.shift = check_shift(shift)
        self.run_level = check_run_level(run_level)
        if run_level_steps is not None and (isinstance(run_level_steps, bool) or not isinstance(run_level_steps, int)
                                            or run_level_steps < 1):
            raise STSConfigError(f"run_level_steps must be an integer >= 1, got {run_level_steps!r}.")
        if isinstance(not_predicted, str) or not all(isinstance(name, str) for name in not_predicted):
            raise STSConfigError(f"not_predicted must be a list of target domain names, got {not_predicted!r}.")
        if not_predicted and calibration is None:
            raise STSConfigError("not_predicted only applies with a calibration: pass calibration=... (a JSON of "
                                 "`sts calibrate` or a built-in name), or leave not_predicted out.")
        self._not_predicted = list(not_predicted)
        if isinstance(target_domains, dict):  # known now: not after the train-start set-up
            check_not_predicted(self._not_predicted, list(target_domains))
        self._session_args = (values["sae"], config, guard, recheck, output_subdir, calibration)
        self.session = STSSession(*self._session_args, strict=strict, not_predicted=self._not_predicted)
        used = [*self.calibration.score_features, *self.calibration.source_features] if self.calibration is not None else []
        needs = self._run_level_needed = [m for m in RUN_LEVEL_METHODS if m in used or own_feature(m) in used]
        if len(needs) > 1:  # one run-level term per run: the other would be missing at train start, after the first
            raise STSConfigError(
                f"The calibration uses the run-level features of {needs}, but a callback run computes one run-level "
                "term (run_level=...): use a calibration fitted on one of them (sts calibrate --runs ... "
                "--features ...), or the built-in 'gemma3-270m-lora-lookahead'.")
        if needs and run_level not in needs:
            raise STSConfigError(f"The calibration uses the run-level feature {needs}; pass run_level={needs[0]!r}.")
        fitted_steps = self.calibration.fitted_run_level_steps if self.calibration is not None else None
        if fitted_steps is not None and run_level_steps not in (None, fitted_steps):  # the level's scale: its steps'
            raise STSConfigError(f"The calibration's run-level feature was measured after {fitted_steps} lookahead "
                                 f"step(s); pass run_level_steps={fitted_steps} or leave it unset "
                                 f"(got {run_level_steps}).")
        if guard.warn_confidence != 0.5 and (self.calibration is None or not guard.protected):
            missing = "no calibration (the train-start warning it sets reads calibrated predictions)" \
                if self.calibration is None else "no protected domain"
            warnings.warn(f"warn_confidence={guard.warn_confidence:g} has no effect with {missing}; give "
                          "calibration= and protected= for a train-start warning at that confidence.",
                          STSDataWarning, stacklevel=2)
        # a compressed run's steps are a share of the run's (known at train start) unless given
        self.run_level_share = (self.calibration.fitted_run_level_share if self.calibration is not None else None
                                ) or COMPRESSED_SHARE
        if run_level != "compressed":
            run_level_steps = run_level_steps or fitted_steps or DEFAULT_RUN_LEVEL_STEPS
        self.run_level_steps = run_level_steps
        # a calibration that takes only the training data's own change from the run-level term: measure that alone
        self._run_level_domains = self.calibration is None or any(m in used for m in RUN_LEVEL_METHODS)
        objects = self._objects = {k: v for k, v in values.items() if v is not None and not json_serializable(v)}
        self._export_args = {
            **{k: (None if k in objects else v) for k, v in values.items()}, **guard.to_dict(), **recheck.to_dict(),
            "config": config.to_dict(), "strict": strict, "output_subdir": output_subdir, "shift": shift,
            "run_level": run_level, "run_level_steps": run_level_steps, "not_predicted": self._not_predicted,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "_objects_from": sorted(objects) or None,
        }
        for unused in ("max_fvu", "fvu_rise"):  # not constructor arguments
            self._export_args.pop(unused)
        self.lm_eval_targets: dict[str, LmEvalTarget] = {}
        self.schedule_source = "constant"
        # each step's rate as the optimizer held it when the step began, for a scheduler that steps on metrics:
        # the Trainer logs a step's rate after the step (a re-check at it would read the one before) and only every
        # logging_steps (earlier steps read the first logged rate)
        self._rates_run: dict[int, float] = {}
        self._trainer_ref: Callable[[], Any] | None = None  # a weak reference to the watched trainer
        self._run_state: Callable[[], Any] = _no_run  # the TrainerState of the run being watched (weakly)
        self._ready = False
        self._ended = False  # on_train_end has run for the watched run
        self._attempt_batch_size: int | None = None  # the batch size the watched run started with
        if replaced is not None:
            changed = _changed_settings(self._export_args, replaced._export_args)
            if changed:  # the checkpoint restores counters and history; the settings are the ones given now
                warnings.warn(f"STS: resuming with restore_callback_states_from_checkpoint=True, this callback's "
                              f"settings differ from the checkpoint's ({'; '.join(changed)}): the run goes on with "
                              "this callback's, as without restoring.", STSDataWarning, stacklevel=3)
                self.__dict__.update({name: replaced.__dict__[name] for name in SETTINGS_ATTRIBUTES})
                self.session = STSSession(*self._session_args, strict=replaced.session.strict,
                                          not_predicted=self._not_predicted)
                self.session.rules_change_said = True  # said here: the session's resume need not say it again
            replaced.session = self.session  # the instance the user holds shows the resumed run's results too

    def __getstate__(self) -> dict[str, Any]:
        """A copy for another process (Ray, a spawn launcher, a sweep) or ``copy.deepcopy``: ready for a new run
        there. The handles of a run watched here (the trainer, its state, its accelerator's autocast, the model) are
        this process's and are left out; the results so far travel with the session."""
        state = dict(self.__dict__)
        state.update(_trainer_ref=None, _run_state=_no_run)  # the next run there starts clean, as here
        return state

    @property
    def _trainer(self) -> Any:
        """The trainer this callback watches, held weakly: a finished callback the user keeps (for its history)
        must not keep the trainer's model and optimizer alive."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    @_trainer.setter
    def _trainer(self, trainer: Any) -> None:
        try:
            self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        except TypeError:  # a trainer class with __slots__ and no __weakref__: held as it is
            self._trainer_ref = lambda: trainer

    @property
    def namespace(self) -> str:
        """The prefix of the keys this callback logs (``sts/...``, ``eval_sts_...``): ``sts``, or its own
        ``output_subdir`` (as a key-safe name), so that two STSCallbacks on one trainer log apart."""
        if Path(self.output_subdir) == Path("sts"):
            return "sts"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(Path(self.output_subdir).as_posix())).strip("_") or "sts"

    # The session's state under the callback's names (the Trainer restores the counters on resume).
    sae = property(lambda self: self.session.sae)
    config = property(lambda self: self.session.config)
    guard = property(lambda self: self.session.guard)
    calibration = property(lambda self: self.session.calibration)
    strict = property(lambda self: self.session.strict, lambda self, value: setattr(self.session, "strict", value))
    protected = property(lambda self: self.guard.config.protected)
    tolerance = property(lambda self: self.guard.config.tolerance)
    max_sts = property(lambda self: self.guard.config.max_sts)

    # ------------------------------------------------------------------ exported state
    def state(self) -> dict:
        return {"args": self._export_args, "attributes": {"history": self.history, **self.session.counters()}}

    def _bind(self, args, state) -> STSSession:
        """The session writes to this run's folder, and prints / warns / writes on the main process only; it
        prints tables and status lines unless the run asks for warnings only (``log_level``)."""
        self.session.store = RunStore(self._run_dir(args) / self.output_subdir)
        self.session.is_main = state.is_world_process_zero
        self.session.verbose = getattr(args, "log_level", "passive") not in QUIET_LOG_LEVELS
        return self.session

    @staticmethod
    def _check_writable(session: STSSession) -> None:
        """A run folder the main process cannot write would lose the forecast, history and report after the
        forecast's minutes (and a resume's state): refused before any work, on every rank at once."""
        error = None
        if session.is_main:
            try:
                check_writable_folder(session.store.root, "STS's forecast, history and report")
            except STSInputError as err:
                error = STSInputError(f"{err} (the STS folder is <output_dir>/<output_subdir>: give the Trainer a "
                                      "writable output_dir, or STSCallback another output_subdir.)")
        raise_collectively(error)

    def _run_dir(self, args) -> Path:
        """The folder the Trainer saves this run's checkpoints in: ``output_dir``, or under a hyperparameter search
        the trial's own (``run-<trial>``), so that trials keep their forecasts, histories and reports apart."""
        trainer = self._trainer
        if getattr(trainer, "hp_search_backend", None) is not None and getattr(trainer, "_trial", None) is not None:
            try:
                return Path(trainer._get_output_dir(trial=trainer._trial))
            except Exception:  # noqa: BLE001 - a backend's own lookup (Ray's, W&B's context) failing: output_dir
                pass
        return Path(args.output_dir)

    def _log(self, metrics: dict[str, float], control) -> None:
        """Log through the trainer (W&B / TensorBoard / log_history) without cancelling its own loss log."""
        if self._trainer is None or not metrics:
            return
        from transformers import Trainer

        should_log = control.should_log
        namespace = self.namespace
        if namespace != "sts":
            metrics = {f"{namespace}/{key[4:]}" if key.startswith("sts/") else key: value
                       for key, value in metrics.items()}
        try:  # the base method: TRL's overrides would flush their running metrics early
            Trainer.log(self._trainer, dict(metrics))
        except Exception as err:  # noqa: BLE001 - a tracker must never kill a training run (as for _export)
            if self.strict:
                raise
            step = getattr(self._trainer.state, "global_step", None)
            self.write_errors.append({"step": step, "what": "tracker log of the sts metrics",
                                      "error": f"{type(err).__name__}: {err}"})
            self.session.warn(f"tracker_log:{type(err).__name__}", f"STS could not log its metrics to a tracker "
                              f"({type(err).__name__}: {err}); training goes on and the history and report keep "
                              "them (domain names a tracker reads as paths, e.g. DVCLive's 'eval_' inside a name, "
                              "are a known cause: rename the domain).", RuntimeWarning)
        finally:
            control.should_log = should_log

    def _export(self, what: str, export, payload) -> None:
        """Tables for W&B / TensorBoard / MLflow (main process); a tracker's failure warns and is recorded, never
        raises."""
        if self._trainer is None or not self.session.is_main:
            return
        try:
            export(self._trainer, payload, namespace=self.namespace)
        except Exception as err:  # noqa: BLE001 - a tracker must never kill a training run
            if self.strict:
                raise
            self.write_errors.append({"what": f"tracker export of the {what}", "error": f"{type(err).__name__}: {err}"})
            warnings.warn(f"STS could not export the {what} to the trackers ({type(err).__name__}: {err}).",
                          RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ the trainer
    def attach(self, trainer) -> "STSCallback":
        """Bind to ``trainer`` (done at train start from the call stack when not called): the ``eval_sts_*``
        keys then join every evaluation's metrics before the trainer logs them, so W&B / TensorBoard,
        ``metric_for_best_model`` and ``EarlyStoppingCallback`` see them in any callback order."""
        self._trainer = trainer
        loop = trainer.evaluation_loop
        wrapped = loop
        while wrapped is not None:  # already wrapped by this callback (maybe under another STSCallback's wrapper)
            if getattr(wrapped, "_sts_callback", None) is self:
                return self
            wrapped = getattr(wrapped, "_sts_wrapped", None)
        signature = inspect.signature(loop)
        attached_to = self._trainer_ref

        def evaluation_loop(*args, **kwargs):
            output = loop(*args, **kwargs)
            if not self._watches(attached_to()):  # removed from the trainer (remove_callback in a notebook)
                return output
            prefix = signature.bind(*args, **kwargs).arguments.get("metric_key_prefix", "eval")
            for key, value in self.evaluation_metrics(prefix, attached_to()).items():
                if key.endswith(f"_sts{PROTECTED_KEY}") and key in output.metrics:
                    value = _worst(output.metrics[key], value)  # another STSCallback's protected domains too
                output.metrics[key] = value
            return output

        evaluation_loop._sts_callback = self  # type: ignore[attr-defined]
        evaluation_loop._sts_wrapped = loop  # type: ignore[attr-defined]
        trainer.evaluation_loop = evaluation_loop
        return self

    def _watches(self, trainer: Any) -> bool:
        """Whether this callback is still among ``trainer``'s callbacks: one removed (``remove_callback``, then
        another run) must add no keys and run no re-check in the trainer's later evaluations."""
        handler = getattr(trainer, "callback_handler", None)
        return handler is None or any(callback is self for callback in handler.callbacks)

    def evaluation_metrics(self, prefix: str = "eval", trainer: Any = None) -> dict[str, float]:
        """``<prefix>_sts_loss_delta_<domain>``, ``<prefix>_sts_protected_loss_delta`` and, for a multiple-choice or
        lm-eval domain, ``<prefix>_sts_accuracy_delta_<domain>`` (a fraction; higher is better) from a re-check at
        the current step (run now when none was); NaN where no measurement could be made. Under another
        :attr:`namespace` than ``sts`` the keys take it (``eval_<namespace>_loss_delta_<domain>``), and
        ``<prefix>_sts_protected_loss_delta`` is the worst over the trainer's STSCallbacks. ``trainer``: the one
        evaluating; none of the keys when this callback has since watched another trainer's run."""
        if not self._ready or self._trainer is None or (trainer is not None and trainer is not self._trainer):
            return {}
        trainer = self._trainer
        step = trainer.state.global_step
        loaded = self.session.loaded_best_step  # after the run: the best checkpoint's weights, not the last step's
        if loaded is not None:
            step = loaded
        elif step == 0 and not self.session.restarts:  # eval_on_start: the train-start weights, measured as the
            # base: no change, no re-check (after a restart, auto_find_batch_size's, step 0 holds trained weights)
            return self._eval_keys(prefix, {name: 0.0 for name in self.monitor.loss_sets} if self.monitor else {},
                                   {name: 0.0 for name in self._accuracy_domains()})
        elif not self._measured_at(step) and self._ended:  # recheck_at_end=False: the run is over, unmeasured
            self.session.warn(f"after_the_end:{step}", f"STS: an evaluation after training at step {step}, which "
                              "no re-check measured (recheck_at_end=False): its sts keys are NaN; keep "
                              "recheck_at_end=True to have the end measured.", RuntimeWarning)
        elif not self._measured_at(step):
            self.run_recheck(trainer.args, trainer.state, trainer.control, trainer.model)
        now = next((r for r in reversed(self.history) if r.get("step") == step), None)
        # this step's measurements only: a failed re-check measured nothing, and a domain a rotating re-check
        # (loss_domains=) left out was not measured now; an earlier step's values would pass for this step's
        measured = now if now is not None and "error" not in now else {}
        deltas = dict(measured.get("loss_delta") or {})
        if not deltas and _is_sts_change(getattr(trainer.args, "metric_for_best_model", None)):
            self.session.warn(f"nan_metric:{step}", f"STS: no measured change at step {step} (its re-check "
                              f"failed), so {trainer.args.metric_for_best_model} is NaN there, which "
                              "EarlyStoppingCallback counts as an evaluation without improvement.", RuntimeWarning)
        return self._eval_keys(prefix, deltas, measured.get("accuracy_delta") or {})

    def _eval_keys(self, prefix: str, deltas: dict[str, Any], accuracy_deltas: dict[str, Any]) -> dict[str, float]:
        """The evaluation keys of these measured changes (NaN for a domain without one)."""
        names = list(self.monitor.loss_sets) if self.monitor is not None else list(deltas)
        values = {name: _finite_or_nan(deltas.get(name)) for name in names}
        namespace = self.namespace
        keys = {f"{namespace}_loss_delta_{name}": value for name, value in values.items()}
        keys.update({f"{namespace}_accuracy_delta_{name}": _finite_or_nan(accuracy_deltas.get(name))
                     for name in self._accuracy_domains()})
        if self.protected:
            protected = [values.get(name, math.nan) for name in self.protected]
            keys[f"{namespace}{PROTECTED_KEY}"] = keys[f"sts{PROTECTED_KEY}"] = _worst(*protected)
        out = {f"{prefix}_{k}": v for k, v in keys.items()}
        if prefix != "eval" and prefix.startswith("eval_"):  # one of several eval sets: the plain keys too
            out.update({f"eval_{k}": v for k, v in keys.items()})
        return out

    def _accuracy_domains(self) -> list[str]:
        """The domains whose accuracy the re-checks measure (multiple-choice items, lm-eval tasks)."""
        monitor = self.monitor
        return [*monitor.accuracy_sets, *monitor.lm_eval_targets] if monitor is not None else []

    def _measured_at(self, step: int) -> bool:
        return any(r.get("step") == step and "error" not in r for r in self.history)

    # ------------------------------------------------------------------ train start
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       lr_scheduler=None, **kwargs):
        if self._ready and self._run_state() is state:  # listed twice on one trainer: this run has started
            warnings.warn("STS: this STSCallback is in the trainer's callbacks twice (e.g. add_callback run again in "
                          "a notebook); it forecasts and re-checks once.", STSDataWarning, stacklevel=2)
            return
        self._run_state = weakref.ref(state)  # each train() has its own TrainerState (a retry too)
        if self._ready and self._is_batch_size_retry(args, state):
            self._retry(args, state, lr_scheduler)
            return
        if self._ready:  # this instance watched a run before (a sweep, a notebook re-run): start clean
            self.session = STSSession(*self._session_args, strict=self.strict, not_predicted=self._not_predicted)
            self._ready, self._trainer = False, None
        self._ended, self._attempt_batch_size = False, state.train_batch_size
        with _own_memory_errors(args, "at train start", "STSConfig(shift_tokens=..., domain_tokens=...) or "
                                "batch_size, or run_level_steps"):
            self._begin(args, state, control, model, processing_class, train_dataloader, lr_scheduler)

    def _is_batch_size_retry(self, args, state) -> bool:
        """transformers' ``auto_find_batch_size`` runs the training loop again, from step 0 with a smaller batch,
        after an out-of-memory error: the same run, not a new one (its ``on_train_end`` never came)."""
        return (bool(getattr(args, "auto_find_batch_size", False)) and not self._ended and state.global_step == 0
                and self._attempt_batch_size is not None
                and state.train_batch_size is not None and state.train_batch_size < self._attempt_batch_size
                and _find_trainer(self)[0] is self._trainer)

    def _retry(self, args, state, lr_scheduler) -> None:
        session = self.session
        self._attempt_batch_size = state.train_batch_size
        self._rates_run = {}  # the abandoned attempt's rates are not this one's
        session.learning_rates, self.schedule_source = planned_learning_rates(args, state.max_steps, lr_scheduler)
        moved = session.restart()
        session.say(f"STS: the Trainer starts the run again at step 0 with batch size {state.train_batch_size} "
                    "(auto_find_batch_size, after running out of memory): the train-start forecast and held-out "
                    "losses stand" + (f"; the abandoned attempt's {moved} re-check(s) moved to the superseded "
                                      "history" if moved else "") + ". transformers keeps the weights that attempt "
                    "trained, so changes from here include its steps.")

    def _begin(self, args, state, control, model, processing_class, train_dataloader, lr_scheduler) -> None:
        found, resumed_from = _find_trainer(self)
        trainer = self._trainer or found
        if trainer is not None:
            self._check_own_folder(trainer)
            self.attach(trainer)
        session = self._bind(args, state)
        trackers.remember_runs(trainer)  # the run an MLflowCallback ends before our train-end logs
        self._check_writable(session)
        if getattr(trainer, "hp_search_backend", None) is not None:
            self._leave_out_of_the_objective(trainer)
        accelerator = getattr(trainer, "accelerator", None)
        session.autocast = _weak_autocast(accelerator) if accelerator is not None else session.autocast
        session.learning_rates, self.schedule_source = planned_learning_rates(
            args, state.max_steps, lr_scheduler, state.global_step, state.log_history)
        self._rates_run = {}
        _warn_about_the_schedule(session, args, state)
        if self.schedule_source == "logged":
            running = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
            why = (why_not_stepped_ahead(running, state.max_steps - state.global_step) if running is not None
                   else None) or "it steps on metrics"
            session.say(f"STS: this run's learning rates cannot be read ahead ({why}): the early forecast follows "
                        "each step's learning rate as the optimizer holds it when the step begins, each projection "
                        "holding the last one to the end.")
        _check_best_metric(args)
        tokenizer = text_tokenizer(processing_class)  # a VLM's processor: its tokenizer, with its chat template
        if tokenizer is None:
            raise STSInputError("STSCallback needs the trainer's processing_class (tokenizer); pass "
                                "processing_class=tokenizer to the trainer.")
        if "lookahead" in self._run_level_needed and model is not None and parameters_are_sharded(model):
            raise STSConfigError(  # before any work: the fallback (first order) is not what the calibration reads
                "The calibration's level comes from a lookahead, which cannot run on weights sharded by DeepSpeed "
                "ZeRO-3 / FSDP (they cannot be put back exactly). Train under DDP or ZeRO-2 with it, or use a "
                "calibration fitted on run_level='first_order' runs (sts calibrate --runs).")
        if self.run_level == "compressed" and model is not None and parameters_are_sharded(model):
            raise STSConfigError(
                "run_level='compressed' steps the model and puts it back, which cannot be done exactly on weights "
                "sharded by DeepSpeed ZeRO-3 / FSDP. Train under DDP or ZeRO-2 with it, or pass "
                "run_level='first_order'.")
        if self.run_level is not None and state.global_step == 0:  # before any work: steps, rate, refusals
            run_level_steps, run_level_factor = self._run_level_steps_and_factor(
                state.max_steps, session.learning_rates, _base_learning_rate(trainer), session)
        if model is not None:  # a reward model's refusal first: reading its data would fail with a wrong fix
            check_measurable(model)
        domains, self.lm_eval_targets = target_corpora(self.target_domains, self._trainer, tokenizer)
        self._check_best_metric_is_logged(args, domains)
        in_use = trackers.trackers_in_use(trainer, getattr(args, "report_to", None))
        for tracker, clash, fails in trackers.clashing_names(in_use, list(domains)):
            fix = "rename them to letters, digits and _ - . (the names are the target_domains keys)"
            if fails:  # DVCLive: the Trainer's own log of the eval_sts_* keys would stop the run; MLflow's file
                # store: each log holding them would be lost, other metrics with it
                what = ("each log holding them would be lost with every metric in it; " + fix
                        + ", or log MLflow to a database (MLFLOW_TRACKING_URI=sqlite:///mlflow.db)"
                        if tracker == "mlflow" else f"its log would fail and stop the run; {fix}")
                raise STSConfigError(f"{clash}: {what}.")
            session.warn(f"tracker_names:{clash}", f"STS: {clash}; {fix}.", STSDataWarning)
        probe = probe_corpus(self.train_probe, self._trainer, train_dataloader, tokenizer)
        demos = load_corpus(self.demonstrations, name="demonstrations") if self.demonstrations is not None else None
        session.prepare(model, tokenizer, probe, domains, self.lm_eval_targets)
        # the domain metric_for_best_model reads is measured at every evaluation, whatever loss_domains or the
        # overhead budget leave out (an earlier re-check's value would pass for this step's)
        session.monitor.always_measured = set(self._metric_domains(args))
        data = self.train_probe if self.train_probe is not None else getattr(trainer, "train_dataset", None)
        unreproduced = unreproduced_generation(trainer) if is_online(trainer) else []
        if not unreproduced:
            self._fresh_probe(trainer, rollout_data(self.train_probe, trainer))
        if state.global_step > 0:  # the checkpoint given to train(), which may be another run's folder
            checkpoint = (RunStore(Path(resumed_from) / self.output_subdir) if resumed_from is not None else
                          session.store.checkpoint(self._run_dir(args), state.global_step, self.output_subdir))
            # the STS save may have been cut after the Trainer's own, which holds the counters too
            session.resume(state.global_step, checkpoint, domains,
                           lambda: saved_in_trainer_state(checkpoint.root.parent, self.output_subdir))
            if session.forecast is not None:  # a resumed process often logs to a new tracker run (TensorBoard's new
                # folder, MLflow's new run): it gets the forecast its re-checks are read against, table and scalars
                # (at the step it resumes from; train start's accuracy is left out, it would read as a fall back)
                self._export("forecast", trackers.export_forecast, session.forecast)
                self._log(self._forecast_metrics(session.forecast), control)
        else:
            shift = resolve_shift(self.shift, trainer, data, demos is not None)
            check_icl_loss_shift(self.calibration, shift)  # before the rollouts and the forecast
            progress = session.is_main and not getattr(args, "disable_tqdm", False)
            rollouts = teacher = None
            if shift in ROLLOUT_SHIFTS and unreproduced:
                self._skip_rollouts(unreproduced)
                run = lambda setup, domains, progress: None  # noqa: E731 - no forecast, already said why
            else:
                prompts = rollout_data(self.train_probe, trainer)
                if shift in RL_SHIFTS:  # sampled once: the forecast's demonstrations and the re-check probe
                    rollouts = trainer_rollouts(trainer, prompts, session.setup, state, progress=progress)
                elif shift in DISTILLATION_SHIFTS:  # the student's completions are the probe, as under RL
                    teacher, rollouts = trainer_distillation_rollouts(trainer, prompts, session.setup,
                                                                      progress=progress)
                if rollouts is not None:
                    session.monitor.probe = rollout_probe(rollouts, session.setup, session.settings.recheck_tokens)
                cut, left_out = None, None
                if shift == "chosen_vs_rejected":
                    cut, left_out = Truncation.from_args(getattr(trainer, "args", None)), likelihood_term(trainer)
                if left_out is not None:
                    session.warn("likelihood_term", f"STS: this trainer's loss adds {left_out} to the preference; "
                                 "the chosen-minus-rejected forecast covers the preference only (recorded in the "
                                 "forecast's settings, left_out). Re-checks measure the whole effect.", STSDataWarning)
                run = forecast_runner(shift, data, probe, demos, rollouts, cut, teacher, left_out)
            level = None if self.run_level is None else run_level_runner(
                self.run_level, trainer, args, session.monitor.loss_sets, tokenizer, run_level_steps,
                session.autocast, own=session.monitor.probe, domains=self._run_level_domains,
                own_tokens=session.settings.loss_tokens, lr_factor=run_level_factor, run_steps=state.max_steps,
                train_dataloader=train_dataloader)
            forecast = session.start(model, probe, domains, demos, progress=progress, forecast_run=run,
                                     run_level=level)
            # one log call: a tracker that counts its own steps by calls (DVCLive) keeps the trainer's steps
            metrics = {}
            if session.run_level is not None:
                metrics.update({f"sts/run_level/{name}": value for name, value in session.run_level["change"].items()})
            if session.base_accuracy:  # each chart of sts/accuracy/<domain> starts from train start
                metrics.update({f"sts/accuracy/{name}": value for name, value in session.base_accuracy.items()})
            if forecast is not None:
                self._export("forecast", trackers.export_forecast, forecast)
                metrics.update(self._forecast_metrics(forecast))
            self._log(metrics, control)
        self._ready = True

    def _forecast_metrics(self, forecast: Any) -> dict[str, float]:
        """The forecast's scalars: each domain's score and, calibrated, its predicted change."""
        metrics = {f"sts/forecast/{name}": value for name, value in forecast.ranked() if value is not None}
        metrics.update({f"sts/predicted/{name}": p["mean"] for name, p in self.predicted.items()})
        return metrics

    def _run_level_steps_and_factor(self, max_steps: int, rates: list[float] | None, base_rate: float | None,
                                    session: STSSession) -> tuple[int, float]:
        """The run-level term's steps and learning-rate factor: as set for a lookahead; for a compressed run, its
        share of the run's steps at the factor (of the optimizer's ``base_rate``) that puts the schedule's whole
        area into them. A step count the user set far from the share its calibration was fitted on is refused (the
        change grows with it); a run too short to take that share in whole steps is warned about."""
        if self.run_level != "compressed":
            if self.run_level_steps > max_steps > 0:
                session.warn("run_level_steps", f"STS: run_level_steps={self.run_level_steps} is more than this run's "
                             f"{max_steps} steps: the {self.run_level} term steps further, at the schedule's peak, "
                             "than the run will. Set run_level_steps below the run's steps.", STSDataWarning)
            return self.run_level_steps, 1.0
        if self.run_level_steps is not None and self.run_level_steps >= max_steps > 0:
            raise STSConfigError(
                f"run_level_steps={self.run_level_steps} is not fewer than this run's {max_steps} steps: a compressed "
                "run puts the run's whole learning-rate area into fewer steps (a second run as long costs as much "
                f"as the run). Leave run_level_steps unset (a quarter of the run: "
                f"{max(1, round(self.run_level_share * max_steps))}) or set it below {max_steps}.")
        if self.schedule_source == "logged":
            raise STSConfigError(
                "run_level='compressed' puts the run's whole learning-rate area into its steps, so it needs the "
                "rates before the run takes them; this run's scheduler sets them from metrics as it goes "
                "(reduce_lr_on_plateau, greedy) or could not be read ahead. Use run_level='lookahead' (steps at "
                "the run's current rate) or a scheduler that plans its rates.")
        unset = max(1, round(self.run_level_share * max_steps))  # the calibration's share where it has one
        steps = self.run_level_steps or unset
        fitted = self.calibration.fitted_run_level_share if self.calibration is not None else None
        if fitted is not None and max_steps > 0 and abs(steps / max_steps - fitted) > 0.25 * fitted:
            if self.run_level_steps is not None:
                raise STSConfigError(
                    f"The calibration's compressed runs took {fitted:.0%} of their runs' steps; this one's {steps} "
                    f"of {max_steps} steps is {steps / max_steps:.0%}. Leave run_level_steps unset (it takes "
                    f"{unset}).")
            session.warn("compressed_share", f"STS: this run's {max_steps} steps cannot hold the calibration's "
                         f"share of compressed steps ({fitted:.0%}) in whole steps: its compressed run takes {steps} "
                         f"({steps / max_steps:.0%}), and the calibration's interval, measured at {fitted:.0%}, may "
                         "not hold.", STSDataWarning)
        return steps, compressed_lr_factor(rates or [], steps, base_rate)

    def _leave_out_of_the_objective(self, trainer: Any) -> None:
        """transformers' default hyperparameter-search objective sums every evaluation metric but the loss when
        there are any: the ``eval_sts_*`` keys would become the objective and pick another trial. Left out of the
        default one; a ``compute_objective`` the user gave sees them all."""
        from transformers.trainer_utils import default_compute_objective

        if getattr(trainer, "compute_objective", None) is not default_compute_objective:
            return
        callbacks = self._trainer_callbacks()

        def objective_without_sts(metrics: dict[str, float]) -> float:
            return default_compute_objective({key: value for key, value in metrics.items()
                                              if not _sts_key_readings(key, trainer, callbacks)})

        trainer.compute_objective = objective_without_sts
        self.session.say("STS: hyperparameter_search's default objective leaves out the eval_sts_* keys (it would sum "
                         "them in); pass compute_objective= to include them.")

    def _trainer_callbacks(self) -> list["STSCallback"]:
        """The STSCallbacks on this callback's trainer (itself among them)."""
        handler = getattr(self._trainer, "callback_handler", None)
        return [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, STSCallback)] or [self]

    def _check_best_metric_is_logged(self, args, corpora: dict[str, Any]) -> None:
        """``metric_for_best_model`` naming one of this callback's keys that no evaluation will hold (a domain it
        does not monitor, the accuracy of a domain with no multiple-choice items, or the protected change with no
        protected domain) fails with transformers' KeyError at the first evaluation, hours in: refused at train
        start."""
        metric = getattr(args, "metric_for_best_model", None) or ""
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        callbacks = self._trainer_callbacks()
        readings = _sts_key_readings(key, self._trainer, callbacks)
        domains = list(corpora)
        scored = [name for name, corpus in corpora.items() if multiple_choice_items(corpus) is not None] + list(
            self.lm_eval_targets or {}) if any(kind == "accuracy" for _, kind, _ in readings) else []
        if not readings or any(_may_hold(reading, self, domains, scored, callbacks) for reading in readings):
            return  # not an STS key, or one some evaluation holds (another callback's: its domains load later)
        if readings[0][1] == "protected":
            raise STSConfigError(
                f"metric_for_best_model={metric!r} is the worst protected domain's change, but no domain is "
                "protected there, so no evaluation will hold it: give STSCallback(protected=[...]), or name one "
                f"domain's change, e.g. 'eval_{self.namespace}_loss_delta_<domain>'.")
        if readings[0][1] == "accuracy" and readings[0][2] in domains:
            raise STSConfigError(
                f"metric_for_best_model={metric!r} is the accuracy of {readings[0][2]!r}, which has no "
                "multiple-choice items (question, choices, answer) and is no lm-eval task, so no re-check measures "
                f"its accuracy: name its held-out loss change, 'eval_{self.namespace}_loss_delta_{readings[0][2]}' "
                "(with greater_is_better=False)" + (f", or a scored domain's accuracy ({scored})" if scored else "")
                + ".")
        raise STSConfigError(
            f"metric_for_best_model={metric!r} names the domain {readings[0][2]!r}, which this STSCallback does "
            f"not monitor (its domains: {domains}); no evaluation will hold it. Name one of them, e.g. "
            f"'eval_{self.namespace}_loss_delta_{domains[0]}'.")

    def _metric_domains(self, args) -> list[str]:
        """The domains of this callback whose loss change ``metric_for_best_model`` reads."""
        metric = getattr(args, "metric_for_best_model", None) or ""
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        return [domain for owner, kind, domain in _sts_key_readings(key, self._trainer, self._trainer_callbacks())
                if owner is self and kind == "loss"]

    def _check_own_folder(self, trainer: Any) -> None:
        """Two STSCallbacks writing one folder would interleave their histories and overwrite each other's
        forecast and monitor state (a resume then reads the other's): refuse before any work."""
        handler = getattr(trainer, "callback_handler", None)
        same = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, STSCallback) and cb is not self
                and Path(cb.output_subdir) == Path(self.output_subdir)]
        if same:
            raise STSConfigError(
                f"{len(same) + 1} STSCallbacks on this trainer write to the same folder <output_dir>/"
                f"{self.output_subdir}; give each its own output_subdir (e.g. STSCallback(..., "
                "output_subdir='sts_math')), or monitor every domain with one callback.")

    def _skip_rollouts(self, unreproduced: list[str]) -> None:
        """An RL or distillation trainer that generates through tools, environments or its own rollout function:
        STS's rollouts would sample something else, so the rollout forecast is skipped (refused if asked for by
        name)."""
        what = " and ".join(unreproduced)
        if self.shift in ROLLOUT_SHIFTS:
            raise STSConfigError(
                f"shift={self.shift!r}: this trainer generates with {what}, which STS's rollouts do not reproduce "
                "(they sample the prompts alone, with no tool calls or environment turns). Give demonstrations= "
                "(e.g. good completions from earlier runs) for an in-context forecast, or leave shift='auto'.")
        self.session.warn("unreproduced_rollouts", f"STS: this trainer generates with {what}, which STS's rollouts "
                          "do not reproduce, so no forecast is made at train start; re-checks still run, on the "
                          "training prompts. Give demonstrations= (e.g. good completions from earlier runs) for an "
                          "in-context forecast.", STSDataWarning)

    def _fresh_probe(self, trainer: Any, data: Any) -> None:
        """Under RL and distillation, re-check on the current policy's completions of fresh prompts
        (RecheckConfig.fresh_rollouts)."""
        session = self.session
        if not session.settings.fresh_rollouts or not is_online(trainer):
            return
        session.probe_source = fresh_rollout_probe(trainer, data, session.setup, session.settings.recheck_tokens)
        if session.probe_source is None:
            if not is_rl(trainer):
                run, why, fix = ("distillation", "the trainer keeps no copy of the student's starting weights",
                                 "Train with PEFT")
            elif getattr(trainer.args, "sync_ref_model", False):
                run, why, fix = ("RL run", "sync_ref_model=True moves GRPO's ref_model toward the policy",
                                 "Train with PEFT, or sync_ref_model=False,")
            else:
                run, why, fix = "RL run", "e.g. GRPO with beta=0", "Train with PEFT, or beta > 0,"
            session.warn("fresh_probe", f"STS: this {run} is a full fine-tune without a reference model ({why}), so "
                         "the base residuals of new completions cannot be computed: re-checks use the train-start "
                         f"rollouts as their probe. {fix} for fresh completions at each re-check; "
                         "fresh_rollouts=False silences this.", STSDataWarning)

    # ------------------------------------------------------------------ during training
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._ready:
            self.session.step_began()
            groups = getattr(optimizer, "param_groups", None)
            if self.schedule_source == "logged" and groups:
                self._rates_run[state.global_step + 1] = float(groups[0]["lr"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._ready:
            self.session.step_ended()
        due = self.session.settings.recheck_due(state.global_step, state.max_steps)
        # the last step's re-check here rather than at train end: the trackers' callbacks end their runs in their
        # on_train_end, before ours (Trackio and Neptune then start new runs for later logs); where the Trainer
        # loads its best checkpoint at the end, the end is decided there
        last = (state.global_step >= state.max_steps > 0 and self.session.settings.recheck_at_end
                and not getattr(args, "load_best_model_at_end", False))
        if self._ready and (last or (control.should_save if due is None else due)):
            self.run_recheck(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # save_strategy="epoch": the Trainer decides to save at the epoch's end, after on_step_end
        if self._ready and control.should_save and self.session.settings.recheck_steps is None:
            self.run_recheck(args, state, control, model)

    def run_recheck(self, args, state, control, model, ended: bool = False) -> dict[str, Any] | None:
        """One re-check now (none when this step has one); failures are warned about and recorded unless strict.
        ``ended``: at train end (a run stopped before ``max_steps`` ends here, not at ``max_steps``)."""
        if self.session.has_recheck(state.global_step):
            return None
        log_history = None
        if self.schedule_source == "logged":  # the log where no step's rate was seen (before a resume), else as run
            logged = {int(e["step"]): float(e["learning_rate"]) for e in state.log_history
                      if "learning_rate" in e and "step" in e}
            log_history = [{"step": step, "learning_rate": rate}
                           for step, rate in sorted({**logged, **self._rates_run}.items())]
        with _own_memory_errors(args, f"in the re-check at step {state.global_step} (strict=True)",
                                "RecheckConfig's recheck_tokens or loss_tokens, or STSConfig.batch_size"):
            record, decision = self.session.recheck(model, state.global_step, state.max_steps, log_history,
                                                    ended=ended)
        if record is None:
            return None
        if decision.stop:
            control.should_training_stop = True
            if self.session.is_main:
                self.session.warn("stop_checkpoint", self._checkpoint_before_the_harm(args, state, control),
                                  STSNegativeTransferWarning)
        self._log(trackers.recheck_metrics(record, self.session.variant()), control)
        self._export("re-check", trackers.export_recheck, record)
        return record

    def _checkpoint_before_the_harm(self, args, state, control) -> str:
        """Where to go back to after an early stop at this step: the model in memory is the harmed one (unless the
        Trainer loads its best checkpoint at the end), and a stop on a step that is no save step leaves no checkpoint
        of it. The last re-check that broke no rule, and the latest checkpoint saved at or before it."""
        step = state.global_step
        safe, guard, variant = 0, self.session.guard, self.session.variant()  # 0: the train start
        for record in reversed(self.history):  # judged as the stop counted them (a resume may change the rules)
            step_of = record.get("step", 0)
            if 0 < step_of < step and "error" not in record and not guard.breaks_a_rule(record, variant):
                safe = step_of
                break
        saved = [folder for step_of, folder in checkpoint_folders(self._run_dir(args)) if step_of <= safe]
        where = (f"the latest checkpoint saved at or before it is {saved[-1]}" if saved else
                 "no checkpoint was saved at or before it")
        start = "the train start" if safe == 0 else f"step {safe}"
        # the Trainer swaps the weights at train end when it has a best checkpoint (this step's may be the first)
        best_ahead = getattr(state, "best_model_checkpoint", None) is not None or (
            control.should_evaluate and control.should_save)
        if getattr(args, "load_best_model_at_end", False) and best_ahead:
            metric = getattr(args, "metric_for_best_model", None) or "loss"
            key = metric if metric.startswith("eval_") else f"eval_{metric}"
            readings = _sts_key_readings(key, self._trainer, self._trainer_callbacks())
            on_protected = any(kind == "protected" or (owner is not None and domain in owner.protected)
                               for owner, kind, domain in readings)
            held = (f"the Trainer loads its best checkpoint by metric_for_best_model={metric!r} at train end (this "
                    "step's evaluation and save may still make it this one), chosen "
                    + ("by a protected domain's change" if on_protected else
                       f"without the protected domains (set metric_for_best_model='eval_{self.namespace}"
                       f"{PROTECTED_KEY}', with greater_is_better=False, to have them decide)"))
        else:
            held = "the model in memory (and a save_model() now) holds the harmed weights"
        return (f"STS: after the early stop at step {step} {held}; the last re-check that broke no rule was at "
                f"{start}, and {where}.")

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self._ready:
            return
        if self.session.settings.recheck_steps is None and not self.session.has_recheck(state.global_step):
            # a checkpoint another callback asked for after this one's on_step_end (on every rank: collective)
            self.run_recheck(args, state, control, model)
        if not state.is_world_process_zero:
            return
        if (self._run_dir(args) / f"checkpoint-{state.global_step}").is_dir():
            checkpoint = self.session.store.checkpoint(self._run_dir(args), state.global_step, self.output_subdir)
            self.session.save_checkpoint(checkpoint, state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Fallback when no trainer could be attached (see :meth:`attach`): add the ``eval_sts_*`` keys here."""
        if metrics is not None and self._trainer is None and self._ready:
            now = next((r for r in reversed(self.history) if r.get("step") == state.global_step), None)
            measured = now if now is not None and "error" not in now else {}
            keys = self._eval_keys("eval", measured.get("loss_delta") or {}, measured.get("accuracy_delta") or {})
            for key, value in keys.items():  # this step's measurements only, NaN
                metrics.setdefault(key, value)  # where none (a key metric_for_best_model reads must be there)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._ended = True
        if not self._ready:
            return
        # the trackers' callbacks have ended their runs (they run first): our last logs land in those runs
        with trackers.after_their_train_end(self._trainer):
            best = _loaded_best_step(args, state)
            if best is not None and best != state.global_step:  # the weights now are an earlier checkpoint's
                self.session.note_loaded_best(best)
                measured = f"the history's step {best} measured them" if self._measured_at(best) else (
                    f"no re-check measured step {best}'s weights (re-check at every save to have it)")
                self.session.say(f"STS: the run ended at step {state.global_step} and the Trainer loaded its best "
                                 f"checkpoint (step {best}, load_best_model_at_end): no re-check at the end, whose "
                                 f"weights are not step {state.global_step}'s; {measured}.")
            elif self.session.has_recheck(state.global_step):  # stopped right after a re-check: that is the end
                self.session.ended_at(state.global_step, state.max_steps)  # (measures nothing: recheck_at_end or not)
            elif self.session.settings.recheck_at_end:
                self.run_recheck(args, state, control, model, ended=True)
            self.write_report(args, state, export=True)
        self.session.release_models()  # a kept callback (a sweep's results) must not hold the trainer's models

    def write_report(self, args, state, export: bool = False) -> None:
        """``report.html`` / ``report.md`` in the STS folder (main process); a failure only warns unless strict."""
        html_path = self._bind(args, state).write_report(state.global_step)
        if export and html_path is not None:  # once, at the end: not an artifact per re-check
            self._export("report", trackers.export_report, html_path)


@contextlib.contextmanager
def _own_memory_errors(args: Any, where: str, what_to_lower: str) -> Any:
    """Under ``auto_find_batch_size``, STS's own out-of-memory error leaves as :class:`STSOutOfMemoryError`: as the
    RuntimeError it is, the batch-size finder would take it for training's and retry the run with ever smaller
    batches (and STS's work anew each time), ending in 'No executable batch size found' with the cause lost."""
    try:
        yield
    except RuntimeError as err:
        from accelerate.utils.memory import should_reduce_batch_size

        if not (getattr(args, "auto_find_batch_size", False) and should_reduce_batch_size(err)):
            raise
        raise STSOutOfMemoryError(f"STS ran out of memory {where} ({first_line(err)}). auto_find_batch_size lowers "
                                  f"the training batch size, which does not shrink STS's own work: lower "
                                  f"{what_to_lower}.") from err


def _no_run() -> None:
    """``_run_state`` before any run (a function of the module: a lambda could not be pickled)."""
    return None


def _weak_autocast(accelerator: Any) -> Any:
    """The accelerator's autocast, held weakly (the accelerator holds the model and optimizer); a plain context
    once the accelerator is gone."""
    method = weakref.WeakMethod(accelerator.autocast)

    def autocast(*args: Any, **kwargs: Any) -> Any:
        bound = method()
        return bound(*args, **kwargs) if bound is not None else contextlib.nullcontext()
    return autocast


QUIET_LOG_LEVELS = ("warning", "error", "critical")  # TrainingArguments.log_level asking for no info lines
PROTECTED_KEY = "_protected_loss_delta"  # eval_sts_protected_loss_delta: the worst protected domain's change


def _worst(*changes: float) -> float:
    """The worst of protected domains' changes (NaN when any could not be measured)."""
    return math.nan if any(math.isnan(v) for v in changes) else max(changes)


def _delegate(name: str) -> property:
    return property(lambda self: getattr(self.session, name), lambda self, value: setattr(self.session, name, value))


# The run's measurements live in the session; the Trainer sets the counters back by these names on resume.
for _name in ("history", "base_losses", "base_fit", "base_accuracy", "base_answers", "predicted", "forecast", "monitor",
              "setup", "learning_rates", "write_errors", "run_id", "adapters_start_at_the_base"):
    setattr(STSCallback, _name, _delegate(_name))
for _name in ("violations_in_a_row", "warned", "violating", "stop_reason"):
    setattr(STSCallback, _name, property(lambda self, n=_name: getattr(self.session.guard, n),
                                         lambda self, value, n=_name: setattr(self.session.guard, n, value)))
assert set(COUNTERS) <= set(dir(STSCallback))


def _find_trainer(callback: STSCallback) -> tuple[Any, str | None]:
    """The Trainer running ``callback`` (callbacks are not handed it) and the checkpoint its ``train()`` resumes
    from (``None`` for a fresh run): found on the call stack."""
    from transformers import Trainer

    frame = inspect.currentframe()
    trainer = None
    for _ in range(12):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and (trainer is candidate
                                               or callback in candidate.callback_handler.callbacks):
            trainer = candidate
            checkpoint = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(checkpoint, (str, Path)):
                return trainer, str(checkpoint)
    return trainer, None


# What STSCallback.__init__ sets from its arguments: taken from the user's instance on a restoring resume
SETTINGS_ATTRIBUTES = ("target_domains", "train_probe", "demonstrations", "shift", "run_level", "_not_predicted",
                       "_session_args", "_run_level_needed", "run_level_steps", "run_level_share", "_run_level_domains",
                       "_objects", "_export_args")


def _changed_settings(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``name: saved -> given`` for each exported argument that differs (objects are exported as None)."""
    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{name}: {shown(saved.get(name))} -> {shown(given[name])}" for name in given
            if name != "_objects_from" and saved.get(name) != given[name]]


def _instance_being_restored(output_subdir: Any) -> STSCallback | None:
    """The user's instance the Trainer replaces when it restores callback states from a checkpoint (it rebuilds the
    callback from its exported arguments in ``Trainer._load_callback_state``, where the instance is ``callback``):
    the objects (SAE, data) that could not be exported are taken back from it, not from another instance. The
    Trainer pairs saved states with instances by position; with several STSCallbacks the one writing the same
    ``output_subdir`` is taken (listed in another order, they would swap SAEs)."""
    frame = inspect.currentframe()
    for _ in range(4):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        candidate = frame.f_locals.get("callback")
        # only there: a user's own function holding an earlier instance as `callback` is not a restore
        if isinstance(candidate, STSCallback) and frame.f_code.co_name == "_load_callback_state":
            same = [cb for cb in frame.f_locals.get("duplicates") or () if isinstance(cb, STSCallback)
                    and Path(cb.output_subdir) == Path(output_subdir)]
            return same[0] if same else candidate
    return None


def _anchored_paths(values: dict[str, Any]) -> dict[str, Any]:
    """The SAE, targets, probe and demonstrations with every path among them absolute (:func:`anchored`)."""
    target = values["target_domains"]
    if isinstance(target, dict):
        target = {name: ({**value, "include_path": anchored(value["include_path"])}
                         if is_lm_eval_target(value) and value.get("include_path") else anchored(value))
                  for name, value in target.items()}
    elif isinstance(target, (list, tuple)):
        target = type(target)(anchored(value) for value in target)
    return {"sae": anchored(values["sae"]), "target_domains": target,
            **{name: anchored(values[name]) for name in ("train_probe", "demonstrations")}}


def _check_inputs(sae: Any, target: Any, protected: list[str], data: dict[str, Any]) -> None:
    """The SAE, target domains and other data (``data``: argument name -> value) as far as they can be checked
    before training starts, without reading files: a missing path or folder, a typo'd domain name, a value that
    is no data."""
    if sae is None:
        raise STSConfigError("STSCallback needs sae=: a sae-lens folder, {'release', 'sae_id'}, or an SAE object.")
    if not isinstance(sae, (str, Path, dict)) and not hasattr(sae, "encode"):
        raise STSConfigError(f"sae={type(sae).__name__} has no encode(); pass an SAE or its path.")
    check_not_on_meta(sae)
    missing = missing_sae_folder(sae)
    if missing:
        raise STSInputError(missing)
    for argument, value in data.items():
        if value is not None:
            check_not_empty(value, argument)
            check_data_spec(value, argument)
    if target is None or (hasattr(target, "__len__") and len(target) == 0):
        raise STSConfigError("STSCallback needs target_domains=: a dict name -> data, or a list of names.")
    if isinstance(target, (str, Path)) and str(target) != EVAL_DATASET:
        raise STSConfigError(f"target_domains={str(target)!r}: give a dict name -> data, a list of domain names "
                             f"or paths (e.g. [{str(target)!r}]), or {EVAL_DATASET!r} for the trainer's eval set(s).")
    if not isinstance(target, (str, Path, dict, list, tuple)):  # a Dataset, a generator, a DataFrame
        raise STSConfigError(f"target_domains is a {type(target).__name__}: give a dict name -> data, naming the "
                             "domain (target_domains={'law': data}), a list of domain names or data files, or "
                             f"{EVAL_DATASET!r} for the trainer's eval set(s).")
    if isinstance(target, dict):  # an lm-eval target's settings are checked now, the harness loads later
        for name, value in named_items(target, "target_domains").items():
            if is_lm_eval_target(value):
                LmEvalTarget.from_spec(value, name)
            else:
                check_not_empty(value, f"target {name!r}")
                check_data_spec(value, f"target {name!r}")
                check_readable_columns(value, f"target {name!r}")
    elif isinstance(target, (list, tuple)):
        for index, value in enumerate(target):
            check_named_target(value, f"target_domains[{index}]", "target_domains")
            check_data_spec(value, f"target_domains[{index}]")
    names = list(target) if isinstance(target, dict) else None
    if isinstance(target, (list, tuple)):
        names = [Path(t).stem if isinstance(t, (str, Path)) else None for t in target]
    unknown = [p for p in protected if names is not None and None not in names and p not in names]
    if unknown:
        raise STSConfigError(f"protected={unknown} are not among the target domains {names}; "
                             "protect only domains listed in target_domains.")


def _base_learning_rate(trainer: Any) -> float | None:
    """The rate a compressed run's factor multiplies: the optimizer's first group's base rate (``initial_lr``, set
    by its scheduler; else its ``lr``), as the run-level steps read it (``None``: no optimizer to read)."""
    groups = getattr(getattr(trainer, "optimizer", None), "param_groups", None)
    if not groups:
        return None
    value = groups[0].get("initial_lr", groups[0].get("lr"))
    return None if value is None else float(value)


def _warn_about_the_schedule(session: STSSession, args, state) -> None:
    """At train start: re-checks the settings ask for that this run will never make, and a run whose re-checks
    (following its checkpoints) come only at its end."""
    max_steps = state.max_steps
    steps = session.settings.recheck_steps
    beyond = session.settings.schedule_beyond(max_steps)
    if beyond:  # session.warn: on the main process only
        session.warn("schedule_beyond", f"STS: recheck_steps lists step(s) {beyond} beyond this run's {max_steps} "
                     "steps; they will not be re-checked (fractions of the run, e.g. [0.05, 0.1, 0.25], follow its "
                     "length).", STSDataWarning)
    elif isinstance(steps, int) and steps >= max_steps:
        session.warn("schedule_end_only", f"STS: recheck_steps={steps} is not shorter than this run's {max_steps} "
                     "steps: only the end is re-checked; a fraction (e.g. recheck_steps=0.1) follows the run's "
                     "length.", STSDataWarning)
    if steps is None and _evaluates_before_the_end(args, state):
        return  # every evaluation re-checks (evaluation_metrics): the run is re-checked during training
    saves = str(getattr(args.save_strategy, "value", args.save_strategy))
    at_end = ("re-checked only at its end" if session.settings.recheck_at_end else
              "never re-checked (recheck_at_end=False)")
    if steps is None and saves == "no":
        session.warn("schedule_no_saves", f"STS: save_strategy='no' and recheck_steps unset: the run is {at_end}, "
                     "so no warning or early stop can come during training; set recheck_steps (e.g. 0.1).",
                     STSDataWarning)
    # the Trainer has made save_steps absolute (a fraction of the run) and counted the epochs by now
    save_steps, epochs = getattr(state, "save_steps", None), getattr(state, "num_train_epochs", None)
    only_at_end = (f"save_steps={save_steps} is not shorter than this run's {max_steps} steps"
                   if saves == "steps" and isinstance(save_steps, int) and save_steps >= max_steps else
                   f"save_strategy='epoch' and this run has {epochs} epoch"
                   if saves == "epoch" and isinstance(epochs, int) and epochs <= 1 else None)
    if steps is None and only_at_end:
        session.warn("schedule_saves_at_end", f"STS: {only_at_end} and recheck_steps is unset: the re-checks follow "
                     f"the checkpoints, so the run is {at_end} and no warning or early stop can come during "
                     "training; set recheck_steps (e.g. 0.1) or save more often.", STSDataWarning)


def _evaluates_before_the_end(args, state) -> bool:
    """Whether the Trainer evaluates before its last step (``eval_strategy`` with ``eval_steps`` shorter than the
    run, or per epoch over more than one)."""
    evals = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    eval_steps, epochs = getattr(state, "eval_steps", None), getattr(state, "num_train_epochs", None)
    return (evals == "steps" and isinstance(eval_steps, int) and 0 < eval_steps < state.max_steps) or \
        (evals == "epoch" and isinstance(epochs, int) and epochs > 1)


def _loaded_best_step(args, state) -> int | None:
    """The step of the checkpoint the Trainer loaded at the end (``load_best_model_at_end``), else ``None``."""
    checkpoint = getattr(state, "best_model_checkpoint", None)
    if not getattr(args, "load_best_model_at_end", False) or not checkpoint:
        return None
    match = re.search(r"checkpoint-(\d+)$", str(checkpoint).rstrip("/"))
    return int(match.group(1)) if match else None


def _sts_key_readings(key: str, trainer: Any, callbacks: list[STSCallback]) -> list[tuple[Any, str, str]]:
    """What an evaluation metric can be among the keys ``callbacks`` add: ``(callback, "loss", domain)``,
    ``(callback, "accuracy", domain)``, ``(callback, "protected", "")``, or ``(None, "protected", "")`` for the shared
    worst protected change; none for a key of another kind. Read exactly: ``eval`` or ``eval_<eval set>`` (the
    trainer's eval sets by name), then ``<namespace>_loss_delta_<domain>``, ``<namespace>_accuracy_delta_<domain>``
    or ``<namespace>_protected_loss_delta``."""
    eval_sets = getattr(trainer, "eval_dataset", None)
    prefixes = ["eval", *(f"eval_{name}" for name in (eval_sets if isinstance(eval_sets, dict) else {}))]
    readings: list[tuple[Any, str, str]] = []
    for prefix in prefixes:
        if not key.startswith(prefix + "_"):
            continue
        rest = key[len(prefix) + 1:]
        if rest == f"sts{PROTECTED_KEY}":
            readings.append((None, "protected", ""))
        for callback in callbacks:
            if rest == f"{callback.namespace}{PROTECTED_KEY}" and callback.namespace != "sts":
                readings.append((callback, "protected", ""))
            for kind in ("loss", "accuracy"):
                if rest.startswith(f"{callback.namespace}_{kind}_delta_"):
                    readings.append((callback, kind, rest[len(f"{callback.namespace}_{kind}_delta_"):]))
    return readings


def _may_hold(reading: tuple[Any, str, str], callback: STSCallback, domains: list[str], scored: list[str],
              callbacks: list[STSCallback]) -> bool:
    """Whether an evaluation may hold the key ``reading`` reads, as ``callback`` (whose ``domains`` are loaded, and
    of them ``scored`` have their accuracy measured) knows at its train start."""
    owner, kind, domain = reading
    if kind == "protected":
        return any(cb.protected for cb in callbacks) if owner is None else bool(owner.protected)
    # another callback's domains are loaded at its own start
    return owner is not callback or domain in (scored if kind == "accuracy" else domains)


def _is_loss_change(metric: str | None) -> bool:
    """Whether a metric name is one of the ``eval_sts_*`` held-out loss changes (lower is better)."""
    return "_loss_delta" in (metric or "")


def _is_sts_change(metric: str | None) -> bool:
    """Whether a metric name is one of the ``eval_sts_*`` changes (held-out loss or accuracy)."""
    return _is_loss_change(metric) or "_accuracy_delta_" in (metric or "")


def _check_best_metric(args) -> None:
    """``metric_for_best_model`` an STS change (a loss change: lower is better) with ``greater_is_better`` unset or
    True: transformers guesses "greater" for a name not ending in "loss", and would keep the most harmed checkpoint
    and stop when the domain improves. Refused at train start, naming the fix."""
    metric = getattr(args, "metric_for_best_model", None)
    if "_accuracy_delta_" in (metric or "") and getattr(args, "greater_is_better", None) is False:
        raise STSConfigError(
            f"metric_for_best_model={metric!r} is an accuracy change (higher is better), but greater_is_better is "
            "False (transformers' guess for a name ending in 'loss'), so the best checkpoint would be the most "
            "harmed: set TrainingArguments(greater_is_better=True).")
    if _is_loss_change(metric) and getattr(args, "greater_is_better", None) is not False:
        raise STSConfigError(
            f"metric_for_best_model={metric!r} is a held-out loss change (lower is better), but greater_is_better is "
            f"{getattr(args, 'greater_is_better', None)!r}, so the best checkpoint would be the most harmed and "
            "EarlyStoppingCallback would stop as the domain improves: set TrainingArguments(greater_is_better=False).")


def _finite_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


__all__ = ["EVAL_DATASET", "STSCallback", "STSNegativeTransferWarning"]
