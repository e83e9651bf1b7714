"""``STSSession``: forecast at train start, then "re-check, then decide", for any training loop.

The Trainer callback (:mod:`.callback`) is glue around it; a Lightning or plain-accelerate loop drives it directly::

    session = STSSession(sae, STSConfig(...), GuardConfig(protected=["legal"]), RecheckConfig(), "out/sts")
    probe, domains = load_corpus(train_texts), load_domains(targets)
    session.prepare(model, tokenizer, probe, domains)  # samples the held-out and probe sets; no model call
    session.start(model, probe, domains)               # the forecast and the base measurements
    for step in range(1, max_steps + 1):
        ...
        if step % 100 == 0:
            record, decision = session.recheck(model, step, max_steps=max_steps)
            if decision is not None and decision.stop:
                break
    session.write_report()

It owns the run's measurements (history, base losses, predictions) and the guard's counters, writes them through
a :class:`RunStore`, and warns; it never logs to a tracker (the caller does, from the returned record).
"""

from __future__ import annotations

import copy
import logging
import operator
import math
import os
import random
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..core.capture import without_data_parallel
from ..core.data import Corpus, is_dataset, load_corpus, load_domains, multiple_choice_items
from ..core.distributed import (check_ranks_agree, fingerprint, from_main_process, gather_objects, is_main_process,
                                require_at_least_world, warn_on_main, world_size)
from ..core.errors import (ForecastSkipped, STSConfigError, STSDataWarning, STSError, STSInputError,
                           STSNegativeTransferWarning, STSUsageError, first_line)
from ..core.heldout import resolve_body_dtype, resolve_head_dtype, resolve_head_samples
from ..core.config import STSConfig, recheck_variant
from ..core.run_store import HISTORY_FILE, REPORT_MD_FILE, STATE_FILE, RunStore, checkpoint_folders
from ..core.sae import missing_sae_folder
from ..core.schedule import logged_learning_rates
from ..core.stats import ActivationStats
from ..pipelines.budget import OverheadBudget
from ..pipelines.forecast import (Forecast, ForecastSetup, check_calibration_config, check_calibration_features,
                                  domain_statistics, icl_loss_mismatch, inference_mode, run_forecast, with_icl_loss)
from ..pipelines.guard import Decision, Guard, GuardConfig
from ..pipelines.monitor import (DomainBaseline, Monitor, active_adapters, base_parameters_trained,
                                 domain_baselines_from, is_peft)
from ..pipelines.recheck import RecheckConfig
from ..pipelines.prediction import best_early_method, calibrated_predictions, early_projection
from ..reporting.console import recheck_status
from ..scoring.calibration import load_calibration, lr_area_fraction, own_feature
from .trainer_run_level import RUN_LEVEL_METHODS

logger = logging.getLogger("sts_callback")


# what a re-check projects to the end of training: dropped from its record when training ends at it
PROJECTION_KEYS = ("early_forecast", "early_forecast_ci", "early_projection", "early_blend", "projected_warnings")
NOTHING_TRAINED = ("the model is exactly as it was at train start (no SAE latent moved on the probe, no held-out loss "
                   "changed), after learning steps: nothing has trained. Check that parameters are trainable and "
                   "the learning rate is not 0; under GRPO, a reward that gives every completion of a prompt the "
                   "same value gives no advantage, hence no gradient (see the trainer's frac_reward_zero_std).")


def _nothing_trained(record: dict[str, Any]) -> bool:
    """A re-check after learning steps (some of the schedule's area spent) that measured no change at all: the
    probe's residuals identical and every measured held-out loss identical to train start's."""
    changes = [v for v in (record.get("loss_delta") or {}).values() if v is not None]
    return (record.get("step", 0) > 0 and record.get("lr_area_fraction") != 0 and record.get("shift_total") == 0.0
            and bool(changes) and all(v == 0.0 for v in changes))


WRITE_ATTEMPTS = 3  # a history record's writes at re-checks (its own and the next two); then at saves and reports


def log_warning(message: str, *args: Any) -> None:
    """A warning into the user's logs, where they keep any beyond the console (a file or other handler on this
    logger or above it). A console handler alone would print it a second time beside the warning already shown,
    as would Python's last-resort handler with none; ``logging.captureWarnings`` sends the warning there itself."""
    if _logs_beyond_the_console():
        logger.warning(message, *args)


def _logs_beyond_the_console() -> bool:
    if logging.getLogger("py.warnings").handlers or _captures_warnings():
        return False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            console = type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
                sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
            if not console:
                return True
        current = current.parent if current.propagate else None
    return False


def _captures_warnings() -> bool:
    return getattr(warnings.showwarning, "__module__", None) == "logging"  # logging.captureWarnings(True)


# A re-check rewrites the report (read from the whole history) at most this often unless it has news (a violation,
# a stop, a projected warning, the run's end) or the time since is ten times what the last one took: at a re-check
# every step its cost would grow with the run, and at a re-check every few minutes it costs next to nothing.
REPORT_INTERVAL_SECONDS = 60.0
REPORT_COST_SHARE = 0.1
# The guard settings a resume compares with the run's (settings.json): changed, the kept re-checks are judged again.
RULE_SETTINGS = ("protected", "tolerance", "accuracy_tolerance", "max_sts", "early_stop")
# Re-checks failing this many times in a row leave the protected domains unwatched: said once, whatever the errors.
BLIND_AFTER_FAILED_RECHECKS = 3
COUNTERS = ("violations_in_a_row", "warned", "violating", "stop_reason", "base_losses", "predicted", "base_fit",
            "base_accuracy", "base_answers", "run_id", "adapters_start_at_the_base")


def check_not_predicted(not_predicted: list[str], domains: list[str], calibrated: bool = True) -> None:
    """``not_predicted`` names target domains, and (with a calibration) not all of them: the calibration would
    predict none, and the table fall back to raw scores unsaid."""
    unknown = [p for p in not_predicted if p not in domains]
    if unknown:
        raise STSConfigError(f"not_predicted={unknown} are not among the target domains {sorted(domains)}.")
    if calibrated and domains and set(domains) <= set(not_predicted):
        raise STSConfigError(f"not_predicted={not_predicted} holds every target domain, so the calibration predicts "
                             "none of them: leave out only the domains it does not cover (e.g. the training data's "
                             "own), or pass no calibration.")


def _rule_value(value: Any) -> Any:
    """A guard setting as compared across a resume: the protected domains as a set (their order is no rule)."""
    return frozenset(value) if isinstance(value, list) else value


def _run_store(folder: RunStore | str | Path, call: str) -> RunStore:
    """A checkpoint's STS folder as given: its path or its :class:`RunStore`."""
    if isinstance(folder, RunStore):
        return folder
    if isinstance(folder, (str, Path)) and str(folder).strip():
        return RunStore(Path(folder).expanduser())
    raise STSUsageError(f"STSSession.{call}() takes the checkpoint's STS folder as a path or RunStore, got "
                        f"{folder!r}.")


def _report_up_to_date(store: RunStore) -> None:
    """An earlier run's report redrawn from its files where its history is newer (the run was stopped between a
    re-check and the next report, or an evaluation re-checked after it): archived beside its history, it says what
    that history holds."""
    history, report = store.path(HISTORY_FILE), store.path(REPORT_MD_FILE)
    if history.exists() and history.stat().st_size and (
            not report.exists() or report.stat().st_mtime_ns < history.stat().st_mtime_ns):
        from ..reporting.report import write_report

        write_report(store.root)


class STSSession:
    """One training run's STS state: its forecast, base measurements, re-check history and guard.

    Args:
        sae: as for :func:`~sts_callback.pipelines.forecast.forecast`.
        config: the forecast's settings; guard: the rules for the protected domains; recheck: re-check budgets.
        out: the run's STS folder (``<output_dir>/sts`` under the Trainer).
        calibration: a :class:`Calibration` (or its JSON path) turning forecast scores into predicted changes.
        strict: re-raise failures inside re-checks and file writes instead of warning and going on.
        not_predicted: target domains the calibration does not predict (as :class:`STSCallback`'s).
        is_main: whether this process prints, warns and writes files (default: rank 0 of ``torch.distributed``, or
            the one process).
    """

    def __init__(self, sae: Any, config: STSConfig, guard: GuardConfig, recheck: RecheckConfig, out: str | Path,
                 calibration: Any = None, *, strict: bool = False, is_main: bool | None = None,
                 not_predicted: Sequence[str] = ()):
        config, guard = settings_of(config, STSConfig, "config"), settings_of(guard, GuardConfig, "guard")
        recheck = settings_of(recheck, RecheckConfig, "recheck")
        if sae is None or (missing := missing_sae_folder(sae)):
            raise STSConfigError("STSSession needs sae=: a sae-lens folder, {'release', 'sae_id'}, or an SAE object."
                                 if sae is None else missing)
        if not isinstance(out, (str, Path)) or not str(out).strip():  # Path("") is the current folder
            raise STSConfigError(f"out={out!r} must name the run's STS folder (e.g. '<output_dir>/sts'); an empty "
                                 "path would write the run's files into the current folder (an unset variable?).")
        if not isinstance(strict, bool):
            raise STSConfigError(f"strict must be True or False, got {strict!r}.")
        self.sae, self.settings = sae, recheck
        # target domains the calibration does not predict (the training data's own held-out part: a calibration
        # fitted on the other domains of its runs does not cover it, and a centred one would centre over it)
        self.not_predicted = list(not_predicted)
        self.guard = Guard(guard)
        unguarded = [name for name in self.not_predicted if name in self.guard.config.protected]
        if unguarded:  # its re-checks guard it; the train-start prediction cannot
            warn_on_main(f"protected domain(s) {unguarded} are in not_predicted: the calibrated forecast makes no "
                         "prediction for them, so no warning at train start can name them (the re-checks still "
                         "guard them); leave them out of not_predicted to have one.", STSDataWarning, stacklevel=3)
        self.store = RunStore(Path(os.path.expanduser(str(out))).absolute())  # the folder named when it was built
        self.no_forecast: str | None = None  # why start() made no forecast, for the report
        self.start_warnings: list[str] = []  # the forecast's warnings at train start, for the report
        self.calibration = load_calibration(calibration) if calibration is not None else None
        if self.calibration is not None:
            check_calibration_features(self.calibration)
            check_calibration_config(self.calibration, config)  # known now: the train-start forecast would be wasted
            own = [own_feature(method) for method in RUN_LEVEL_METHODS]
            unknown = [f for f in self.calibration.source_features if f not in own]
            if unknown:
                raise STSConfigError(f"The calibration takes its level from {unknown}, which the run does not "
                                     f"measure; use {own}.")
        self.config = with_icl_loss(config, self.calibration, warn=False)  # said at prepare(), on rank 0 alone
        # None: decided at each use, so that a session built before init_process_group() / Accelerator() knows
        # its rank once the group exists
        self.strict, self._is_main = strict, is_main
        self.verbose = True  # print tables and status lines (the callback follows TrainingArguments.log_level)
        self.history: list[dict[str, Any]] = []
        self.base_losses: dict[str, float] = {}
        self.base_fit: dict[str, float] | None = None  # the SAE's FVU and L0 on the probe at train start
        self.base_accuracy: dict[str, float] = {}  # multiple-choice domains at train start
        self.base_answers: dict[str, list[bool]] = {}  # and which of their items were answered right then
        self.predicted: dict[str, dict[str, float]] = {}  # calibrated end-of-training change per domain
        self.run_level: dict[str, Any] | None = None  # the run-level term at train start (RunLevelEstimate.to_dict)
        self.learning_rates = None  # the planned schedule, for the early forecast
        self._start_adapters: tuple[str, ...] | None = None  # a PEFT model's active adapters at train start
        self._base_trained: list[str] = []  # base parameters a PEFT run trains beside its adapters (prepare)
        self.setup: ForecastSetup | None = None
        self.forecast: Forecast | None = None
        self.monitor: Monitor | None = None
        self.write_errors: list[dict[str, Any]] = []  # files that could not be written (the data stays here)
        self.loaded_best_step: int | None = None  # the loop ended on an earlier checkpoint's weights (load best)
        self.autocast: Callable[[], Any] = nullcontext
        # (model, step) -> (probe sequences, base model or None, what to record): a new probe before each
        # re-check (an RL run's fresh completions of the current policy); None: the train-start probe throughout
        self.probe_source: Callable[[Any, int], tuple[list, Any, dict[str, Any]]] | None = None
        # whether the adapters-disabled model is the train-start one (checked at start where a fresh probe reads
        # it; None: not checked)
        self.adapters_start_at_the_base: bool | None = None
        self.budget = OverheadBudget(recheck.overhead_budget)  # seconds training vs re-checking
        self._clock: float | None = None  # when the last STS work ended (the time since is training)
        self._step_began: float | None = None  # the Trainer's current step, when it began
        self._steps_timed = False  # the budget's training time is the steps' own (step_began / step_ended)
        self.recipe: str | None = None  # "lora" (adapters) or "full", known at start: a calibration's scope
        self.run_id: str | None = None  # drawn at start(): which run a checkpoint's state and a folder's files are
        self._started = False  # start() or resume() since the last prepare(): re-checks have a base to compare with
        self._resumed_at: int | None = None  # the step resumed from, until the schedule is read as run (see below)
        self._resume_step: int | None = None  # the step this process resumed at (its re-check is kept from before)
        self._report_written_at: float | None = None  # when a re-check last wrote the report
        self._report_seconds = 0.0  # what writing it took
        self._unwritten: list[list[Any]] = []  # [record, failed writes]: history a failed write left out, retried
        self._held_warnings: list[tuple[str, type[Warning]]] | None = None  # said once a re-check's record is kept
        self._pending_stop: str | None = None  # an early stop's message, said after the re-check's held warnings
        self.rules_change_said = False  # a resume under other guard rules was already said by the caller
        self.restarts = 0  # restart()s: step 0 then holds trained weights, not the train start's
        self.loop_raised: str | None = None  # the exception that left a `with session:` block, for the report
        self._stopped_at: int | None = None  # the step this process's run decided its early stop at

    def __getstate__(self) -> dict[str, Any]:
        """For another process or ``copy.deepcopy``: the autocast of this process's accelerator and the run's
        model stay here (the next run's start sets both)."""
        state = dict(self.__dict__)
        state["autocast"] = nullcontext
        if self.setup is not None and self.setup.model is not None:
            state["setup"] = copy.copy(self.setup)
            state["setup"].model = None
        return state

    @property
    def is_main(self) -> bool:
        """Whether this process prints, warns and writes files."""
        return is_main_process() if self._is_main is None else self._is_main

    @is_main.setter
    def is_main(self, value: bool | None) -> None:
        self._is_main = value

    @property
    def learning_rates(self) -> list[float] | None:
        """Each optimizer step's learning rate (steps 1..max_steps), for the early forecast; ``None``: unknown."""
        return self._learning_rates

    @learning_rates.setter
    def learning_rates(self, rates: Any) -> None:
        self._learning_rates = None if rates is None else schedule_rates(rates)

    # ------------------------------------------------------------------ state
    def counters(self) -> dict[str, Any]:
        """What a resume needs besides the history (``callback_state.json``), and the run folder that wrote it (a
        resume into another folder copies the forecast and history from there)."""
        return {"base_losses": self.base_losses, "predicted": self.predicted, "base_fit": self.base_fit,
                "base_accuracy": self.base_accuracy, "base_answers": self.base_answers,
                "run_folder": str(self.store.root.resolve()),
                "run_id": self.run_id, "adapters_start_at_the_base": self.adapters_start_at_the_base,
                **self.guard.state()}

    def load_counters(self, saved: dict[str, Any]) -> None:
        self.guard.load_state(saved)
        for key in ("base_losses", "predicted", "base_fit", "base_accuracy", "base_answers", "run_id",
                    "adapters_start_at_the_base"):
            if key in saved:
                setattr(self, key, saved[key])

    def write(self, what: str, write: Callable[[], Any], step: int | None = None, retry: bool = False) -> bool:
        """Run one file write; a failure (full disk, read-only folder) warns and is recorded, unless strict.
        ``retry``: a write that failed before and was said then: a failure again is only returned."""
        try:
            write()
            return True
        except Exception as err:  # noqa: BLE001 - losing a file must not kill a long run
            if self.strict:
                raise
            if retry:
                return False
            self.write_errors.append({"step": step, "what": what, "error": f"{type(err).__name__}: {err}"})
            message = (f"STS could not write {what} ({type(err).__name__}: {err}); training goes on and the data "
                       "stays in memory (the callback's or session's history and write_errors).")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log_warning(message)
            return False

    def release_models(self) -> None:
        """Drop the references to the run's models (the setup's, and an RL probe's reference model) once training
        has ended: results stay, and a later re-check takes the model it is given, on the train-start probe."""
        if self.setup is not None:
            self.setup.model = None
        self.probe_source = None

    def say(self, text: str, always: bool = False) -> None:
        """A line for the person watching the run: on the main process when ``verbose`` (or ``always``: an early
        stop is said at any log level), above any progress bar (``tqdm.write`` keeps the Trainer's bar whole)."""
        if self.is_main and (self.verbose or always):
            from tqdm.auto import tqdm

            tqdm.write(text)

    def warn(self, key: str, message: str, category: type[Warning] = STSNegativeTransferWarning) -> None:
        if self.guard.first_time(key) and self.is_main:
            self._say(message, category)

    def _say(self, message: str, category: type[Warning], stacklevel: int = 5) -> None:
        """Warn now, or, during a re-check, once its record is in the history: a warning the user turned into an
        error (``filterwarnings("error", ...)``, ``python -W error``) must not cost the record that raised it."""
        if self._held_warnings is not None:
            self._held_warnings.append((message, category))
            return
        warnings.warn(message, category, stacklevel=stacklevel)
        log_warning(message)

    def _append_history(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and append it to the history file, with the records earlier failed writes left out (a
        disk full for a while): the file gets every re-check once writes work again (read back in step order)."""
        self.history.append(record)
        if not self.is_main:
            return
        self._unwritten.append([record, 0])
        self.flush_history()

    def flush_history(self, counted: bool = True) -> None:
        """Write the history records earlier writes failed for (main process). ``counted``: a re-check's flush,
        which tries a record :data:`WRITE_ATTEMPTS` times at most (each try costs a write that may wait on a
        failing disk); checkpoint saves and reports try every record left, so that each reaches the file once the
        folder takes writes again, in whatever order (read back in step order)."""
        for entry in list(self._unwritten):
            pending, tries = entry
            if counted and tries >= WRITE_ATTEMPTS:
                continue
            # warned about and recorded (write_errors) once, at its first failure
            if self.write(f"the re-check of step {pending.get('step')} to {self.store.path(HISTORY_FILE)}",
                          lambda: self.store.append_history(pending), pending.get("step"), retry=tries > 0):
                self._unwritten.remove(entry)
            elif counted:
                entry[1] += 1
                if entry[1] == WRITE_ATTEMPTS and self.guard.first_time("history_retries_spent"):
                    self._say(f"STS: the re-check of step {pending.get('step')} could not be written to "
                              f"{self.store.path(HISTORY_FILE)} in {WRITE_ATTEMPTS} tries; it is kept in memory "
                              "(history) and written at the next checkpoint save or report once the folder takes "
                              "writes again (said once for all such records).", RuntimeWarning)

    def __enter__(self) -> "STSSession":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        """Leaving a ``with session:`` block, also when the loop raised: the report is brought up to date with every
        re-check the history holds (between re-checks it is rewritten only now and then), and says that the loop
        raised (the settings file keeps it: ``loop_raised``)."""
        if kind is not None and self._started and self.is_main:
            self.loop_raised = f"{kind.__name__}: {first_line(error)}" if str(error) else kind.__name__
            last = max((r.get("step", 0) for r in self.history), default=0)
            self._write_settings(last)
        self.write_report()

    # ------------------------------------------------------------------ train start
    def prepare(self, model, tokenizer, probe: Corpus, domains: dict[str, Corpus],
                lm_eval_targets: dict[str, Any] | None = None) -> None:
        """Sample the held-out, accuracy and probe sets (seeded) and build the monitor; no model call. ``probe``
        and ``domains`` take what :func:`load_corpus` / :func:`load_domains` take (texts, records, paths, built-in
        domain names) as well as their results."""
        if not callable(getattr(model, "parameters", None)):  # prepare(tokenizer, ...): named, not a TypeError
            raise STSUsageError(f"STSSession.prepare(model, tokenizer, probe, domains): model is a "
                                f"{type(model).__name__}, not a torch model; pass the model first, then its tokenizer.")
        if tokenizer is None or not callable(tokenizer):
            raise STSUsageError(f"STSSession.prepare(model, tokenizer, probe, domains): tokenizer is "
                                f"{type(tokenizer).__name__}; pass the model's tokenizer (AutoTokenizer.from_pretrained"
                                "(...)) second.")
        model = without_data_parallel(model)  # every forward of the session: the model's own (see there)
        self._start_adapters = active_adapters(model)  # what start() and resume() measure with
        # base weights the run trains beside its adapters, which disabling them keeps (no forward: named only)
        self._base_trained = base_parameters_trained(model)
        probe, domains = load_corpus(_decoded_probe(probe, tokenizer), "probe", what="STSSession's probe"), \
            load_domains(_decoded_datasets(domains, tokenizer))
        unknown = [p for p in self.guard.config.protected if p not in domains]
        if unknown:
            raise STSConfigError(f"protected={unknown} are not among the target domains {sorted(domains)}.")
        check_not_predicted(self.not_predicted, list(domains), calibrated=self.calibration is not None)
        if self._started and self.is_main:
            warnings.warn("STSSession.prepare() after start(): the run's base measurements belong to the monitor it "
                          "replaces; call start(...) (a new run) or resume(...) before the next re-check.",
                          RuntimeWarning, stacklevel=2)
        self._started = False
        if problem := icl_loss_mismatch(self.config, self.calibration):  # the process group is up by now
            warn_on_main(problem, STSDataWarning, stacklevel=3)
        self.setup = ForecastSetup.create(model, tokenizer, self.sae, self.config)
        self.setup.check_fit = False  # the session checks the SAE's fit on its own probe (and warns once)
        seed, settings = self.config.seed, self.settings
        loss_sets = {name: self._loss_set(name, corpus) for name, corpus in domains.items()}
        single = sorted(name for name, sequences in loss_sets.items() if len(sequences) == 1)
        if single:  # a change of one sequence has no spread: no interval, so no violation can ever be sure
            warn_on_main(f"The held-out loss of {single} is measured on one sequence (loss_tokens="
                         f"{settings.loss_tokens}): its change gets no interval, so the guard can never judge it "
                         "surely past the tolerance. Raise loss_tokens (or give the domain more texts).",
                         STSDataWarning, stacklevel=3)
        accuracy_sets = _accuracy_sample(domains, seed, settings.accuracy_items)
        probe_sequences, _ = Monitor.sample_sequences(probe, self.setup, settings.recheck_tokens, seed=f"{seed}:probe")
        check_inputs_agree(self.setup, domains, loss_sets, probe_sequences)
        require_at_least_world(len(probe_sequences), "The re-check probe of the training data",
                               "Give train_probe= (or training data) with at least one distinct text per process "
                               "(repeated texts are sampled once, so raising recheck_tokens helps only where the data "
                               "has more distinct texts than were sampled), or run on fewer processes.")
        tolerance = self.guard.config.tolerance
        half_width = settings.loss_precision * tolerance if settings.loss_precision is not None else None
        self.monitor = Monitor(setup=self.setup, probe=probe_sequences, domains={}, loss_sets=loss_sets,
                               accuracy_sets=accuracy_sets, lm_eval_targets=lm_eval_targets or {},
                               loss_half_width=half_width or None,
                               loss_tolerances={name: tolerance for name in self.guard.config.protected},
                               seed=str(seed), loss_domains=settings.loss_domains,
                               loss_head_dtype=resolve_head_dtype(settings.loss_head_dtype, model),
                               loss_body_dtype=resolve_body_dtype(settings.loss_body_dtype, model),
                               loss_head_samples=resolve_head_samples(settings.loss_head_samples, model),
                               sampled_with={"seed": seed, "recheck_tokens": settings.recheck_tokens,
                                             "loss_tokens": settings.loss_tokens,
                                             "loss_sequence_tokens": settings.loss_sequence_tokens,
                                             "loss_head_samples": settings.loss_head_samples,
                                             "accuracy_items": settings.accuracy_items})

    def start(self, model, probe: Corpus, domains: dict[str, Corpus], demonstrations: Corpus | None = None,
              progress: bool = False, forecast_run: Callable[..., Any] | None = None,
              run_level: Callable[[Any, dict[str, float]], Any] | None = None) -> Forecast | None:
        """The forecast and the base measurements. ``forecast_run(setup, domains, progress) -> ForecastRun``
        computes the forecast (see :mod:`.trainer_shift`: preference or RL shifts); default: the in-context shift
        of ``probe`` with ``demonstrations``, skipped when neither has answers. ``run_level(model, base_losses)
        -> RunLevelEstimate`` (:mod:`.trainer_run_level`): the run-level term, measured after the base losses;
        its change per domain joins the forecast's scores under its method's name, for a calibration to use."""
        given, model = model, without_data_parallel(model)  # the run-level steps train as the loop does: wrapped
        if self.monitor is None:
            raise STSUsageError("STSSession.start() before prepare(): call prepare(model, tokenizer, probe, domains) "
                                "first.")
        tokenizer = self.setup.builder.tokenizer
        probe, domains = load_corpus(_decoded_probe(probe, tokenizer), "probe", what="STSSession's probe"), \
            load_domains(_decoded_datasets(domains, tokenizer))
        demonstrations = None if demonstrations is None else load_corpus(demonstrations, "demonstrations",
                                                                         what="STSSession's demonstrations")
        self._check_prepared_domains(domains, "start")
        if self._start_adapters is None and (adapters := active_adapters(model)) is not None:
            # wrapped in its adapters after prepare(): the re-checks compare with these, not with none
            self._start_adapters, self._base_trained = adapters, base_parameters_trained(model)
        self.recipe = "lora" if is_peft(model) else "full"
        # a new run: an earlier start's forecast, predictions and seconds are not this run's
        self.forecast, self.predicted, self.run_level = None, {}, None
        self.budget = OverheadBudget(self.budget.share)
        self.run_id = uuid.uuid4().hex[:12]
        self._unwritten = []
        if forecast_run is None:
            has_answers = demonstrations is not None or any(probe[i].can_demonstrate
                                                            for i in range(min(len(probe), 64)))
            if has_answers:
                def forecast_run(setup, domains, progress):
                    return run_forecast(setup, probe, domains, demonstrations, progress=progress)
        self.no_forecast, self.start_warnings = None, []
        try:
            run = forecast_run(self.setup, domains, progress and self.is_main) if forecast_run is not None else None
        except ForecastSkipped as skipped:
            run, self.no_forecast = None, str(skipped)
            warn_on_main(f"STS forecast skipped: {skipped}", STSDataWarning, stacklevel=2)
        except Exception as err:
            if not isinstance(err, STSError) and hasattr(err, "add_note"):  # a bare error from deep in a forward
                err.add_note(f"(Raised in STS's step-0 forecast at train start, before any training step. Out of "
                             f"memory: lower STSConfig(shift_tokens={self.setup.config.shift_tokens}, domain_tokens="
                             f"{self.setup.config.domain_tokens}) or batch_size. A shape error: an SAE for another "
                             "model or layer.)")
            raise
        if run is not None:
            self.forecast = run.forecast
            self.forecast.settings["recipe"] = self.recipe  # a calibration's scope: LoRA and full runs differ
            self.monitor.domains = domain_baselines_from(run.domains)
        else:
            if forecast_run is None:
                self.no_forecast = ("the training data has no answers to use as in-context demonstrations "
                                    "(prompt-only data); pass demonstrations=[...] to forecast. Re-checks still run.")
                self.say(f"STS forecast skipped: {self.no_forecast}")
            with inference_mode(model):
                self.monitor.domains = domain_baselines_from(domain_statistics(self.setup, domains))
        self._measure_base(model)
        if run_level is not None:
            self._run_level(given, run_level)
        if self.forecast is not None:
            self._publish_forecast()
        self.write_report(0)  # a run that fails before its first re-check still leaves one
        self._report_written_at = None  # and the first re-check's report is written whatever this one took
        self._clock, self._started, self._resumed_at = time.perf_counter(), True, None
        self._resume_step = None
        self._stopped_at = None
        return self.forecast

    def _run_level(self, model, run_level: Callable[[Any, dict[str, float]], Any]) -> None:
        """The run-level term into ``self.run_level`` and the forecast's scores; a failure warns unless strict."""
        try:
            estimate = run_level(model, self.base_losses)
        except Exception as err:  # noqa: BLE001 - an extra feature must not stop the run from starting
            if self.strict:
                raise
            message = f"STS run-level term skipped ({type(err).__name__}: {err})"
            if self.is_main:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                log_warning(message)
            return
        self.run_level = estimate.to_dict()
        if self.forecast is not None:
            for name, domain in self.forecast.domains.items():
                domain.scores[estimate.method] = estimate.change.get(name)
            self.forecast.settings["run_level"] = self.run_level
        if self.is_main:
            parts = [f"{name} {change:+.2%}" for name, change in estimate.change.items()]
            if estimate.own_change is not None:
                parts.append(f"the training data itself {estimate.own_change:+.2%}"
                             + ("" if estimate.change else " (the target domains not measured: the calibration "
                                                            "needs only this)"))
            steps = f"{estimate.steps} step{'s' * (estimate.steps != 1)}"
            if estimate.method == "compressed":  # the rate that puts the schedule's area into the steps
                steps += f" at {estimate.learning_rates[0]:.3g}, holding the whole schedule's learning-rate area"
            else:
                steps += " at the peak learning rate"
            self.say(f"STS run-level term ({estimate.method}, {steps}, "
                     f"{estimate.seconds:.1f} s): held-out NLL change " + "; ".join(parts))

    def _publish_forecast(self) -> None:
        """Calibrate, save, print and warn about the forecast (main process writes and prints)."""
        self.predicted = calibrated_predictions(self.forecast, self.calibration, self.not_predicted)
        fitted, steps = (self.calibration.fitted_run_steps if self.calibration is not None else []), \
            len(self.learning_rates or [])
        if self.predicted and fitted and steps and not min(fitted) / 2 <= steps <= max(fitted) * 2:
            span = f"{min(fitted)}" if min(fitted) == max(fitted) else f"{min(fitted)}-{max(fitted)}"
            self.warn("calibration_run_steps", f"STS: the calibration was fitted on runs of {span} steps and this "
                      f"run takes {steps}: how far training moves a domain grows with the run's length, so its "
                      "predicted changes (their level above all) do not carry over to this run; fit one on runs "
                      "of about this length (`sts calibrate --runs`).", STSDataWarning)
        if self.is_main:
            forecast, store = self.forecast, self.store
            self.write(f"the forecast to {store.forecast_path}", lambda: forecast.save(store.forecast_path), 0)
            # the calibrated prediction first when there is one, else the scores; protected domains marked
            self.say(self.forecast.table(protected=self.guard.config.protected))
        if self.predicted:  # the calibrated prediction leads, as in the table and the report
            ranked = sorted(((n, p["mean"]) for n, p in self.predicted.items()), key=lambda item: -item[1])
            warned = self.guard.forecast_warnings(ranked, "predicted change", predicted=True)
        else:
            warned = self.guard.forecast_warnings(self.forecast.ranked(), self.forecast.ranking)
        if self.calibration is not None:
            warned.update(self.guard.predicted_warnings(self.predicted, self.calibration.level))
        for key, message in warned.items():
            self.warn(key, message)
        self.start_warnings += list(warned.values())
        if self.is_main:  # the predictions are counters: saved again now that they exist
            self.write(f"the callback state to {self.store.root}", lambda: self.store.write_state(self.counters()), 0)
            if self.start_warnings:  # for the report, which reads the run's files
                self._write_settings(0)

    def _measure_base(self, model) -> None:
        monitor, store = self.monitor, self.store
        self.history, self.guard = [], Guard(self.guard.config)  # a new run: nothing of an earlier start carries over
        began = time.perf_counter()
        monitor.capture_base(model, self.autocast)
        self.adapters_start_at_the_base = None
        if getattr(self.probe_source, "from_disabled_adapters", False):
            self.adapters_start_at_the_base = (not self._base_trained and
                                               monitor.adapters_start_at_the_base(model, autocast=self.autocast))
            self._fresh_probe_from_the_start()
        self.base_fit = monitor.sae_fit(model, self.autocast)
        probe_seconds = time.perf_counter() - began
        if self.base_fit is not None:
            self.say(f"STS: SAE fit on the training probe: fraction of variance unexplained "
                     f"{self.base_fit['fvu']:.3f}, mean L0 {self.base_fit['l0']:.1f}")
        for key, message in self.guard.fit_warnings(None, self.base_fit).items():
            self.warn(key, message, STSDataWarning)
            self.start_warnings.append(message)  # the report says it too: every score rests on the SAE
        self.base_losses = monitor.base_losses = monitor.measure_losses(model, self.autocast)
        began = time.perf_counter()
        self.base_accuracy = monitor.base_accuracy = monitor.measure_accuracy(model, self.autocast)
        self.base_answers = monitor.base_answers = {name: list(a) for name, a in monitor.answers.items()}
        self._warn_about_items_coarser_than_the_tolerance(monitor)
        # the first re-check's costs, until it measures its own: the train-start passes (whole loss sets: high)
        self.budget.domain_seconds = dict(monitor.base_loss_seconds)
        self.budget.set_tokens = monitor.loss_set_tokens
        self.budget.fixed_seconds = probe_seconds + time.perf_counter() - began + sum(
            monitor.base_loss_seconds[name] for name in self.guard.config.protected)
        if self.is_main:
            self.write(f"the monitor state to {store.monitor_path}", lambda: monitor.save(store.monitor_path), 0)
            self.write(f"the earlier run's report in {store.root}", lambda: _report_up_to_date(store), 0)
            self.write(f"the earlier run's results in {store.root}", store.archive_previous_run, 0)
            self._write_settings(0)
            self.write(f"the callback state to {store.root}", lambda: store.write_state(self.counters()), 0)

    def _loss_set(self, name: str, corpus: Corpus) -> list:
        """The held-out sequences of a domain its loss is measured on (seeded by the domain's name)."""
        return Monitor.sample_sequences(corpus, self.setup, self.settings.loss_tokens,
                                        f"{self.config.seed}:heldout:{name}", self.settings.loss_sequence_tokens)[0]

    def _check_prepared_domains(self, domains: dict[str, Corpus], call: str) -> None:
        """``start`` / ``resume`` measure the domains ``prepare`` sampled (the monitor's loss sets): another set
        would leave a domain with a forecast and no loss, or a loss and no forecast."""
        prepared = sorted(self.monitor.loss_sets)
        if sorted(domains) != prepared:
            raise STSUsageError(f"STSSession.{call}() got the target domains {sorted(domains)}, prepare() "
                                f"{prepared}: pass the same domains to both.")
        if call != "start":  # a resume measures the held-out texts its checkpoint kept, whatever is given now
            return
        other = [name for name, corpus in domains.items()
                 if self._loss_set(name, corpus) != self.monitor.loss_sets[name]]
        if other:  # the forecast would read these texts, the re-checks prepare()'s
            raise STSUsageError(f"STSSession.start() got other texts for {other} than prepare() sampled: the forecast "
                                "would read these and the re-checks those. Pass the same domains to both.")

    def _warn_about_items_coarser_than_the_tolerance(self, monitor: Monitor) -> None:
        """A protected multiple-choice domain of so few items that one item flipping moves its accuracy by more than
        accuracy_tolerance: any re-check's noise breaks the rule (5 items: 20 points a flip, 2 points allowed)."""
        tolerance = self.guard.config.accuracy_tolerance
        counts = {**{n: t.limit for n, t in monitor.lm_eval_targets.items() if t.limit}, **monitor.accuracy_items}
        for name in self.guard.config.protected:
            items = counts.get(name)
            if items and tolerance > 0 and 1 / items > tolerance + 1e-12:  # 0: any fall, by the user's choice
                self.warn(f"accuracy_items:{name}", f"STS: protected domain {name!r} is scored on {items} "
                          f"multiple-choice item(s), so one item flipping moves its accuracy by {100 / items:.1f} "
                          f"points, more than accuracy_tolerance ({100 * tolerance:.1f} points): a single item's "
                          "change breaks the rule. Give it more items, or a larger accuracy_tolerance.",
                          STSDataWarning)

    def _write_settings(self, step: int) -> None:
        """The guard's settings, which ``sts report`` reads back (protected domains, tolerances): at train start, and
        again on a resume, whose settings the rest of the run is judged by."""
        guard, store = self.guard.config, self.store
        self.write(f"the settings to {store.root}", lambda: store.write_settings(
            {"protected": guard.protected, "tolerance": guard.tolerance, "max_sts": guard.max_sts,
             "accuracy_tolerance": guard.accuracy_tolerance, "warn_confidence": guard.warn_confidence,
             "early_stop": guard.early_stop, "patience": guard.patience,
             **({"no_forecast": self.no_forecast} if self.no_forecast else {}),
             **({"recheck_at_end": False} if not self.settings.recheck_at_end else {}),  # the report says so
             **({"train_start_warnings": self.start_warnings} if self.start_warnings else {}),
             **({"loop_raised": self.loop_raised} if self.loop_raised else {})}), step)

    def resume(self, step: int, checkpoint: RunStore | str | Path, domains: dict[str, Corpus],
               saved_elsewhere: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Pick up at ``step`` from ``checkpoint`` (the checkpoint's STS folder, a path or its
        :class:`RunStore`) and the run folder: what the
        caller did not restore (history, counters) is read back from them. ``saved_elsewhere``: the counters as
        the caller's framework saved them with that checkpoint (the Trainer's ``trainer_state.json``), read when
        the checkpoint's STS folder has none, before the run folder's train-start ones."""
        checkpoint = _run_store(checkpoint, "resume")
        if self.monitor is None:
            raise STSUsageError("STSSession.resume() before prepare(): call prepare(model, tokenizer, probe, domains) "
                                "first, then resume(step, checkpoint, domains).")
        self._check_prepared_domains(domains, "resume")
        if self._started:  # start() has measured the trained weights as the base and archived the run's files
            raise STSUsageError("STSSession.resume() after start() (or a second resume()): call prepare(...) then "
                                "resume(step, checkpoint, domains) alone; start() begins a new run.")
        if not checkpoint.root.is_dir() and not checkpoint.root.parent.is_dir():  # (a cut save keeps its parent)
            raise STSInputError(f"Resuming: neither the checkpoint folder {checkpoint.root.parent} nor "
                                f"{checkpoint.root} exists (a typo in its step?); pass the STS folder of a checkpoint "
                                "the run saved.")
        store, self._unwritten = self.store, []
        origin = RunStore(self._origin(checkpoint))  # the run folder that saved the checkpoint
        if self.is_main and origin.root.resolve() != store.root.resolve() and not store.has_results():
            self.write(f"the run folder {store.root} (from {origin.root})", lambda: store.adopt(origin, step), step)
        if is_main_process() and store.forecast_path.exists():
            try:
                self.forecast = Forecast.load(store.forecast_path)
            except Exception as err:  # noqa: BLE001 - a cut file: the run goes on without its forecast, said
                if self.strict:
                    raise
                warnings.warn(f"Resuming: the forecast {store.forecast_path} is unreadable ({type(err).__name__}: "
                              f"{err}); the run goes on without it (re-checks and the guard need none).",
                              RuntimeWarning, stacklevel=2)
        self.forecast = from_main_process(self.forecast)  # as rank 0 read it, after it adopted the origin's files
        paths = [p for p in (checkpoint.monitor_path, store.monitor_path) if p.exists()]
        if not paths:
            raise STSInputError(f"Resuming: no STS monitor state at {checkpoint.monitor_path} or "
                                f"{store.monitor_path}; the base statistics are lost (start a new run, or delete "
                                "the checkpoint's STS state).")
        if not self.base_losses:  # restore_callback_states_from_checkpoint=False (the default)
            read = None
            if is_main_process():
                read = checkpoint.read_state() or (saved_elsewhere() if saved_elsewhere is not None else None)
                if read is not None and not read.get("base_losses"):  # saved before the train-start measurement
                    read = None
                if read is None and (read := store.read_state()) is not None:  # the train start's counters
                    warnings.warn(
                        f"Resuming: {checkpoint.root} holds no readable STS state ({STATE_FILE}; the save was cut, "
                        f"or it is another kind of checkpoint): the warnings given restart from {store.root}'s, "
                        "written at train start, and the run of consecutive violations is read from the history.",
                        RuntimeWarning, stacklevel=2)
            read = from_main_process(read)
            self.load_counters(read or {})
        else:  # restored from trainer_state.json, which the Trainer writes before on_save: a re-check made in
            # on_save (a save another callback asked for) is in the checkpoint's own STS state, written after it
            read = from_main_process(checkpoint.read_state() if is_main_process() else None)
            if isinstance(read, dict) and read.get("step") == step:
                self.guard.load_state(read)
        if self._base_trained:  # a checkpoint of before this was checked may say the adapters start at the base
            self.adapters_start_at_the_base = False
        self._fresh_probe_from_the_start()
        if not self.base_losses:
            raise STSInputError(f"Resuming: the train-start held-out losses are in neither {checkpoint.root} nor "
                                f"{store.root} ({STATE_FILE}); loss changes cannot be measured. Start a new run, "
                                "or resume with TrainingArguments(restore_callback_states_from_checkpoint=True).")
        self._check_same_run(checkpoint, step)
        saved_step = from_main_process((checkpoint.read_state() or {}).get("step") if is_main_process() else None)
        if isinstance(saved_step, int) and saved_step != step:
            raise STSUsageError(f"STSSession.resume({step}, ...) from {checkpoint.root}, which was saved at step "
                                f"{saved_step}: resume at the step the checkpoint holds (the weights and re-checks "
                                "are that step's).")
        monitor = self.monitor
        monitor.domains = {name: DomainBaseline(latents=ActivationStats(self.setup.sae.d_sae)) for name in domains}
        self._load_monitor(monitor, paths)
        self._keep_the_train_start_samples(monitor, domains)
        monitor.base_losses, monitor.base_accuracy = dict(self.base_losses), dict(self.base_accuracy)
        monitor.base_answers = dict(self.base_answers)
        self._leave_out_domains_added_since_the_start(monitor)
        self._say_domains_dropped_since_the_start(monitor, domains)
        if self.calibration is not None and not self.predicted:  # the start's forecast was made without it
            self.warn("resume_calibration", "STS: resuming with a calibration but no train-start prediction (the "
                      "run started without this calibration, or its forecast was skipped): that prediction is made "
                      "before the first step, so this run has none; the re-checks' early forecast reads the "
                      "calibration. Give it from the start of a new run for a prediction.", STSDataWarning)
        # Re-checks after the checkpoint are redone by the resumed run: they move to the superseded file.
        if self.is_main:
            kept: list[dict[str, Any]] = []
            self.write(f"the history in {store.root}", lambda: kept.extend(store.keep_history_until(step)), step)
            # the file's records win: a restored history (trainer_state.json) lacks a re-check made in on_save
            if kept:
                merged = {r.get("step"): r for r in [*self.history, *kept]}
                self.history = [merged[k] for k in sorted(merged, key=lambda k: k if isinstance(k, int) else 0)]
            saved = store.read_settings()
            rules_changed = {key: (saved[key], getattr(self.guard.config, key)) for key in RULE_SETTINGS
                             if key in saved and _rule_value(saved[key]) != _rule_value(getattr(self.guard.config,
                                                                                                  key))}
            self.no_forecast = saved.get("no_forecast") if isinstance(saved.get("no_forecast"), str) else None
            kept_warnings = saved.get("train_start_warnings")
            self.start_warnings = [w for w in kept_warnings if isinstance(w, str)] \
                if isinstance(kept_warnings, list) else []
            self._write_settings(step)
            self.say(f"STS: resumed at step {step}" + (f"; forecast read back from {store.forecast_path}."
                                                       if self.forecast is not None else "; the run has no forecast."))
            if not self.history:  # the folder could not be rewritten: read as it is
                self.history = store.read_history()
        self.history = from_main_process(self.history)
        rules_changed = from_main_process(rules_changed if self.is_main else None) or {}
        self.history = [r for r in self.history if r.get("step", 0) <= step]
        for record in self.history:  # the run goes on past a re-check recorded as its end (keep_history_until)
            if isinstance(record, dict):
                record.pop("ended_early", None)
        said, self.rules_change_said = self.rules_change_said, False
        if rules_changed and self.is_main and not said:  # each resume's own (a once-per-run key would be restored
            # from the checkpoint and silence a later resume under yet other rules)
            changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in rules_changed.items())
            self._say(f"STS: resuming under other rules than the run's ({changes}): the kept "
                      "re-checks are judged again by them for the early stop's count of consecutive violations; "
                      "their records keep the violations found then.", STSDataWarning, stacklevel=3)
        if any(r.get("step", 0) > 0 for r in self.history):  # the early stop's patience counts the kept
            # re-checks as judged now: not none (counters read from the train start), nor the old rules' count, nor
            # that of a checkpoint saved before its own step's re-check (a loop that saves first: the stop came a
            # re-check late, or never); a violation lasting across the resume is not new
            self.guard.violations_in_a_row = self.guard.violations_at_the_end_of(self.history, self.variant())
            self.guard.violating = self.guard.violating_at_the_end_of(self.history, self.variant())
        spent = next((r["overhead"] for r in reversed(self.history) if r.get("overhead")), None)
        if spent is not None:  # the share is the run's, across resumes, and so is what each part costs
            self.budget.restore(spent)
        self.budget.set_tokens = monitor.loss_set_tokens
        # the rotation of unprotected domains (loss_domains) goes on where the kept re-checks left it, counted as
        # the run counted it (a domain measured every time is outside it)
        monitor.turn = sum(not monitor.measured_every_time(name) for r in self.history if "error" not in r
                           for name in r.get("loss_delta") or {})
        self._clock, self._started, self._resumed_at = time.perf_counter(), True, step
        self._resume_step = step
        self._stopped_at = None  # a resumed run may stop again

    def restart(self) -> int:
        """The loop runs this run again from step 0 (transformers' ``auto_find_batch_size`` after running out of
        memory): the forecast, base measurements and run id stand (measured before any training step); the
        abandoned attempt's re-checks move to the superseded file and the guard's run of violations starts again.
        Returns how many re-checks moved."""
        if not self._started:
            raise STSUsageError("STSSession.restart() before the run started: call start(...) first.")
        abandoned = [r for r in self.history if r.get("step", 0) > 0]
        if self.is_main and abandoned:
            self.write(f"the history in {self.store.root}", lambda: self.store.keep_history_until(0), 0)
        self.history = [r for r in self.history if r.get("step", 0) <= 0]
        # the abandoned attempt's records a failed write left out stay out (written now, they would follow it)
        self._unwritten = [entry for entry in self._unwritten if entry[0].get("step", 0) <= 0]
        self.guard.load_state({"warned": self.guard.warned})
        self.monitor.turn = 0
        self.restarts += 1
        self._clock, self._resumed_at, self._stopped_at = time.perf_counter(), None, None
        return len(abandoned)

    def _leave_out_domains_added_since_the_start(self, monitor: Monitor) -> None:
        """Target domains given now that the run did not measure at train start have no base to compare with (the
        weights it started from are gone): every later re-check failed on them, the protected domains' too. A
        protected one is refused (it cannot be guarded); the others are left out of this run, said once."""
        added = [n for n in monitor.loss_sets if n not in monitor.base_sequence_nll]
        added += [n for n in monitor.accuracy_sets if n not in monitor.base_accuracy and n not in added]
        if not added:
            return
        protected = [n for n in added if n in self.guard.config.protected]
        if protected:
            raise STSInputError(f"Resuming: protected domain(s) {protected} were not target domains when this run "
                                "started, so there is no train-start loss to guard them against; resume with the "
                                "target domains the run started with (add these in a new run).")
        for name in added:
            monitor.loss_sets.pop(name, None)
            monitor.accuracy_sets.pop(name, None)
            monitor.domains.pop(name, None)
        self.warn("resume_added_domains", f"STS: resuming, target domain(s) {added} were not measured at train "
                  "start and have no base to compare with: they are left out of this run (add them in a new run).",
                  STSDataWarning)

    def _say_domains_dropped_since_the_start(self, monitor: Monitor, domains: dict[str, Corpus]) -> None:
        """Target domains the run measured at train start and not given now: no longer re-checked, said once (the
        history keeps their earlier changes)."""
        dropped = sorted(name for name in monitor.base_sequence_nll if name not in domains)
        if not dropped:
            return
        for name in dropped:
            monitor.base_sequence_nll.pop(name, None)
            monitor.loss_sets.pop(name, None)
            monitor.head_samples.pop(name, None)
        self.warn("resume_dropped_domains", f"STS: resuming without target domain(s) {dropped}, which the run "
                  "measured at train start: they are not re-checked from here (the history keeps their earlier "
                  "changes); give them again to keep measuring them.", STSDataWarning)

    @staticmethod
    def _load_monitor(monitor: Monitor, paths: list[Path]) -> None:
        """The checkpoint's monitor state, else the run folder's (the same train-start statistics); one cut by a
        crash is skipped, and none readable is an error naming them."""
        errors = []
        for path in paths:
            try:
                monitor.load(path)
                return
            except STSError:  # readable, and not this run's (named there)
                raise
            except Exception as err:  # noqa: BLE001 - a cut file: safetensors' own error types
                errors.append(f"{path}: {type(err).__name__}: {err}")
        raise STSInputError(f"Resuming: the STS monitor state cannot be read ({'; '.join(errors)}); the train-start "
                            "statistics are lost. Resume from an earlier checkpoint, or start a new run.")

    def _keep_the_train_start_samples(self, monitor: Monitor, domains: dict[str, Corpus]) -> None:
        """A resume with other sampling settings than the run started with measures the train-start samples all the
        same (the probe and held-out sets come back from the monitor state, the multiple-choice items are drawn as
        at train start): their base statistics were measured on them. Said, naming each setting."""
        now = monitor.sampled_with
        drawn = {**now, **(monitor.saved_sampled_with or {})}  # an older file's missing keys: as now
        changed = [f"{name}: {drawn[name]!r} -> {value!r}" for name, value in now.items() if drawn[name] != value]
        if not changed:
            return
        if (drawn["seed"], drawn["accuracy_items"]) != (now["seed"], now["accuracy_items"]):
            monitor.accuracy_sets = _accuracy_sample(domains, drawn["seed"], drawn["accuracy_items"])
        self.warn("resume_sampling", f"STS: resuming with other sampling settings than the run started with "
                  f"({'; '.join(changed)}): the re-checks keep measuring the train-start samples, on which the base "
                  "losses, residuals and accuracies were measured; the new values apply from the next run.",
                  STSDataWarning)

    def _check_same_run(self, checkpoint: RunStore, step: int) -> None:
        """A checkpoint an earlier run left in the folder (a later run in the same output_dir rewrote fewer
        checkpoints, and the Trainer resumes from the highest number) must not be read with the later run's
        forecast and history: refused before anything is rewritten."""
        folder_run = (self.store.read_state() or {}).get("run_id") if is_main_process() else None
        folder_run = from_main_process(folder_run)
        if self.run_id is None or folder_run is None or folder_run == self.run_id:
            return
        own = from_main_process(_latest_checkpoint_of(checkpoint, folder_run) if is_main_process() else None)
        raise STSInputError(
            f"Resuming from {checkpoint.root.parent} (step {step}): that checkpoint belongs to another run (STS run "
            f"{self.run_id}) than the forecast and history in {self.store.root} (STS run {folder_run}); e.g. a later, "
            "shorter run in the same output_dir left an earlier run's higher-numbered checkpoints, and the Trainer "
            "resumes from the highest. Resume from the run's own checkpoint "
            f"(train(resume_from_checkpoint={str(own) if own else '<output_dir>/checkpoint-<step>'!r})"
            f"{'' if own else ': it has none saved with STS state'}), delete the other run's checkpoints, "
            "or give each run its own output_dir.")

    def _origin(self, checkpoint: RunStore) -> Path:
        """The run folder that saved ``checkpoint`` (as rank 0 finds it): the Trainer's layout
        (``<output_dir>/checkpoint-<step>/<subdir>`` of ``<output_dir>/<subdir>``, which holds when the whole folder
        was moved) where it holds the run's results, else the folder the checkpoint's state records (a loop's own
        layout)."""
        guess = checkpoint.root.parent.parent / checkpoint.root.name
        found = None
        if is_main_process():
            saved = (checkpoint.read_state() or {}).get("run_folder")
            if not RunStore(guess).has_results() and saved and RunStore(Path(saved)).has_results():
                found = saved
        found = from_main_process(found)
        return Path(found) if found else guess

    # ------------------------------------------------------------------ during training
    def metrics(self, record: dict[str, Any] | None = None) -> dict[str, float]:
        """A re-check's record (default: the last) as flat ``sts/...`` scalars for a tracker, as the callback logs
        them (``wandb.log(session.metrics(record), step=step)``, TensorBoard's ``add_scalar`` per key); empty for a
        failed re-check or none yet."""
        from ..reporting.trackers import recheck_metrics

        record = record if record is not None else (self.history[-1] if self.history else None)
        if not record or "error" in record or record.get("step", 0) <= 0:
            return {}
        return recheck_metrics(record, self.variant())

    def variant(self) -> str:
        # the forecast's own ranking: it falls back to STS_act when no target could be scored in context
        ranking = self.forecast.ranking if self.forecast is not None else self.config.ranking
        return recheck_variant(ranking, self.config.compute_icl)

    def has_recheck(self, step: int) -> bool:
        return any(r.get("step") == step for r in self.history)

    def ended_at(self, step: int, max_steps: int) -> None:
        """Training ended at ``step`` (before ``max_steps``: another callback stopped it) right after a re-check at
        that step: the re-check's record becomes the run's end, as a re-check at the end would have recorded it
        (``ended_early``, nothing projected), in memory and in the history file."""
        record = self.history[-1] if self.history else None
        if record is None or record.get("step") != step or not max_steps or step >= max_steps or \
                "error" in record or record.get("ended_early") or record.get("early_stop"):
            return  # (STS's own stop keeps the projection that stopped it)
        for key in PROJECTION_KEYS:
            record.pop(key, None)
        record["ended_early"] = {"max_steps": max_steps}
        if self.is_main:
            self.write(f"the end of the run in {self.store.path(HISTORY_FILE)}",
                       lambda: self.store.replace_history_record(record), step)

    def note_loaded_best(self, step: int) -> None:
        """The loop loaded an earlier checkpoint's weights at its end (step ``step``: the Trainer's
        ``load_best_model_at_end``): the last record says so (``loaded_best_step``), in memory and in the history
        file, so that the report and later evaluations describe the weights the run ends with."""
        self.loaded_best_step = step
        record = self.history[-1] if self.history else None
        if record is None or record.get("step") == step:
            return
        record["loaded_best_step"] = step
        if self.is_main:
            self.write(f"the loaded checkpoint in {self.store.path(HISTORY_FILE)}",
                       lambda: self.store.replace_history_record(record), record["step"])

    def step_began(self) -> None:
        self._step_began = time.perf_counter()

    def step_ended(self) -> None:
        """Count the step that began at :meth:`step_began` as training time for the overhead budget. A loop that
        reports its steps is timed by them (data loading, logging, saving and evaluation are left out: the budget
        is a share of what the steps themselves take); one that does not, by the wall time between re-checks."""
        if self._step_began is not None:
            self.budget.add_training(time.perf_counter() - self._step_began)
            self._steps_timed, self._step_began = True, None

    def recheck(self, model, step: int, max_steps: int = 0, log_history: list[dict] | None = None,
                ended: bool = False) -> tuple[dict[str, Any] | None, Decision | None]:
        """One re-check at ``step`` of ``max_steps``: the history record and the guard's decision; a failure is
        warned about and recorded (``(None, None)``) unless ``strict``. ``log_history``: the loop's logged
        learning rates, for a schedule the session could not plan. ``ended``: training has ended at ``step``
        (the last re-check); before ``max_steps`` (another callback or the user stopped it) the record says so
        (``ended_early``) and projects nothing, the run's end being now."""
        if self.monitor is None or not self.base_losses or not self._started:
            raise STSUsageError(f"STSSession.recheck(step={step}) before the run started: call prepare(...) and "
                                "start(...) (or resume(...)) first.")
        if not callable(getattr(model, "parameters", None)):
            raise STSUsageError(f"STSSession.recheck(model, step, ...): model is a {type(model).__name__}, not a "
                                "torch model; pass the model being trained.")
        model = without_data_parallel(model)
        step, max_steps = whole_steps(step, "step"), whole_steps(max_steps, "max_steps")
        if step < 0:
            raise STSUsageError(f"STSSession.recheck(step={step}): a step is the optimizer steps taken so far, >= 0.")
        last = max((r.get("step", 0) for r in self.history), default=None)
        if ended and step == last:  # the loop's last periodic re-check was at its end: that record is the end
            self.ended_at(step, max_steps)
            return self.history[-1], None
        if step == last == self._resume_step:  # a loop resumed at step N that re-checks N again: the kept record
            self.warn(f"recheck_at_resume:{step}", f"STS: the re-check of step {step}, the step resumed at, is "
                      "already in the history (kept from before the resume); this call measures nothing again.",
                      RuntimeWarning)
            return self.history[-1], None
        if last is not None and step <= last:
            raise STSUsageError(f"STSSession.recheck(step={step}) after a re-check at step {last}: steps must "
                                "increase (pass the training step, e.g. the optimizer steps taken so far).")
        now = active_adapters(model)
        start = self._start_adapters
        if now is not None and start is not None and now != start:  # the re-check measures other weights than trained
            self.warn(f"adapters:{step}", f"STS re-check at step {step}: "
                      + ("the model runs with its adapters disabled (inside disable_adapter()), so the base model's "
                         "weights are measured, not the run's; re-check outside that context."
                         if now == () else
                         f"the model runs the adapter(s) {list(now)}, not the run's {list(start)}, so other weights "
                         f"are measured; set_adapter({start[0]!r}) before re-checking."
                         if start else
                         f"the model runs the adapter(s) {list(now)}, which the run did not start with, so other "
                         "weights are measured; switch back to the run's adapters before re-checking."),
                      STSDataWarning)
        if max_steps and step > max_steps:
            self.warn("beyond_max_steps", f"STS re-check at step {step} of a run of max_steps={max_steps}: the "
                      "learning-rate schedule ends at max_steps, so the early forecast reads the step as its end; "
                      "pass the run's real length.", STSDataWarning)
        if self._clock is not None and not self._steps_timed:
            self.budget.add_training(time.perf_counter() - self._clock)
        began, measured_before = time.perf_counter(), self.budget.recheck_seconds
        self._held_warnings, self._pending_stop = [], None
        try:
            outcome = self._recheck(model, step, max_steps, log_history, ended)
        except BaseException:
            held, self._held_warnings = self._held_warnings, None
            for message, category in held:  # said before the error goes on (each key is warned about once only)
                try:
                    self._say(message, category, stacklevel=3)
                except Exception:  # noqa: BLE001 - a warning turned error: the first error is the one to raise
                    pass
            self._say_stop()
            raise
        finally:  # the files, projection and report around the measurement cost the run too
            self.budget.add_bookkeeping(time.perf_counter() - began - (self.budget.recheck_seconds - measured_before))
            self._clock = time.perf_counter()
        held, self._held_warnings = self._held_warnings, None
        for message, category in held:  # the record is written: now the warnings, which may raise
            self._say(message, category, stacklevel=3)
        self._say_stop()
        return outcome

    def _say_stop(self) -> None:
        reason, self._pending_stop = self._pending_stop, None
        if reason is None:
            return
        # a warning (and the logs'), as the violations that led to it: an alert on STS warnings sees the stop too,
        # at any log level, a resumed process's included; filtered away ("ignore"), it is said on the console
        message = f"STS: {reason}"
        with warnings.catch_warnings(record=True) as shown:  # the filters stay the user's; only the display waits
            warnings.warn(message, STSNegativeTransferWarning, stacklevel=3)
        if shown:
            warnings.warn_explicit(message, STSNegativeTransferWarning, shown[0].filename, shown[0].lineno)
        else:
            self.say(message, always=True)
        log_warning(message)

    def _recheck(self, model, step: int, max_steps: int, log_history: list[dict] | None, ended: bool = False,
                 ) -> tuple[dict[str, Any] | None, Decision | None]:
        was_training = model.training
        try:
            result, probe_info, skipped = self._measure(model, step)
        except Exception as err:  # noqa: BLE001 - a monitoring failure must not kill a long run
            model.train(was_training)
            if self.strict:
                raise
            trace = traceback.format_exc()
            # the guard's run of violations holds: a failed re-check neither counts nor ends it
            self._append_history({"step": step, "error": f"{type(err).__name__}: {err}", "traceback": trace})
            guarded = self.guard.config.protected
            if self.is_main and self.guard.first_time(f"recheck_failed:{type(err).__name__}"):
                # once per kind of error: a re-check that keeps failing would repeat its traceback at every one
                if logger.hasHandlers():  # the traceback is in no warning: every log that has handlers gets it
                    logger.warning("STS re-check at step %s failed:\n%s", step, trace)
                held = (f" The early stop's count of consecutive violating re-checks holds across failed ones "
                        f"({self.guard.violations_in_a_row} now)." if self.guard.config.early_stop else "")
                self._say(f"STS re-check at step {step} failed and was skipped ({type(err).__name__}: {err}); "
                          f"later re-checks failing with a {type(err).__name__} are recorded in the history "
                          f"(error, traceback) without a warning.{held}", RuntimeWarning)
            failed = 0
            for record in reversed(self.history):
                if record.get("step", 0) <= 0 or "error" not in record:
                    break
                failed += 1
            if failed >= BLIND_AFTER_FAILED_RECHECKS and guarded:
                stop = ", and no early stop can come while this lasts" if self.guard.config.early_stop else ""
                self.warn("recheck_blind", f"STS: the last {failed} re-checks (to step {step}) all failed: the "
                          f"protected domains {guarded} are not being checked{stop} (the errors are in the "
                          "history).", RuntimeWarning)
            return None, None
        record = {"step": step, **result.to_dict(), "overhead": {**self.budget.to_dict(), "skipped": skipped}}
        if result.probe_error is not None:
            self.warn("probe_error", f"STS re-check at step {step}: the probe could not be read "
                      f"({result.probe_error}); only the held-out losses were measured (later re-checks' probe "
                      "errors are in the history, not warned about).", RuntimeWarning)
        if probe_info is not None:
            record["fresh_probe"] = probe_info
        if self.budget.share is not None and (self.budget.spent_share or 0) > self.budget.share and not \
                any(name not in self.guard.config.protected for name in result.loss_delta):
            self.warn("overhead", f"STS re-checks have cost {self.budget.spent_share:.1%} of training time, above "
                      f"overhead_budget={self.budget.share:g}, with only the probe and the protected domains "
                      f"({self.budget.fixed_seconds:.1f} s a re-check): raise recheck_steps, or lower recheck_tokens "
                      "or loss_tokens, or loosen loss_precision.", RuntimeWarning)
        ended_early = ended and bool(max_steps) and step < max_steps
        if ended_early:  # the measured change is the run's end result: nothing is left to project
            record["ended_early"] = {"max_steps": max_steps}
        try:
            if log_history is not None:  # a scheduler of the user's own: the rates logged so far
                self.learning_rates = logged_learning_rates(log_history, max_steps)
            if not ended_early:
                record.update(self._early_forecast(step, max_steps, result.loss_delta, result.loss_delta_ci))
        except Exception as err:  # noqa: BLE001 - a projection must not cost the measurement
            if self.strict:
                raise
            record["early_forecast_error"] = f"{type(err).__name__}: {err}"
            self.warn("early_forecast_error", f"STS early forecast at step {step} failed and was skipped "
                      f"({record['early_forecast_error']}); the measured changes stand.", RuntimeWarning)
        for key, message in self.guard.fit_warnings(self.base_fit, result.sae_fit).items():
            if key not in self.guard.warned:  # the report lists it where it began, as the console does
                record["sae_fit_warning"] = message
            self.warn(key, f"STS re-check at step {step}: {message}", STSDataWarning)
        if _nothing_trained(record) and "model_unchanged" not in self.guard.warned:
            record["model_unchanged"] = NOTHING_TRAINED  # zeros that look like results: said, and in the report
            self.warn("model_unchanged", f"STS re-check at step {step}: {NOTHING_TRAINED}", STSDataWarning)
        earlier_reason = self.guard.stop_reason
        decision = self.guard.check(step, result, self.variant(), record.get("projected_warnings"),
                                    finished=ended or (bool(max_steps) and step >= max_steps))  # nothing to stop
        record["violations"] = decision.violations
        if self.is_main:  # a rule broken at re-check after re-check is warned about when it starts, not each time
            for violation in decision.new_violations:
                self._say(f"STS re-check at step {step}: {violation} (while it lasts, later re-checks record it in "
                          "the history without a warning)", STSNegativeTransferWarning)
        if decision.stop and self._stopped_at is not None:  # the loop went on after this run's stop: no second one
            decision.stop, decision.reason, self.guard.stop_reason = False, None, earlier_reason
            self.warn("stop_ignored", f"STS: the loop went on after the early stop at step {self._stopped_at} "
                      "(decision.stop was not acted on); re-checks go on and decide no further stop.", RuntimeWarning)
        if decision.stop:
            self._stopped_at = step
            record["early_stop"] = decision.reason
            if self.is_main:  # after the warnings that led to it (held until the record is written)
                self._pending_stop = decision.reason
        before = self.history[-1] if self.history else {}
        self._append_history(record)
        self.say(recheck_status(record, max_steps, self.guard.config.protected))  # the trainer logs only numbers
        # news: what the report does not say yet (a violation that lasts was news when it began: rewriting the
        # whole report at each re-check it lasts cost more than the re-checks themselves on a long run)
        news = decision.new_violations or decision.stop or ended or (bool(max_steps) and step >= max_steps) or (
            bool(record.get("projected_warnings")) and not before.get("projected_warnings"))
        since = None if self._report_written_at is None else time.perf_counter() - self._report_written_at
        if news or since is None or since >= min(REPORT_INTERVAL_SECONDS, self._report_seconds / REPORT_COST_SHARE):
            self.write_report(step)
        return record, decision

    def _fresh_probe_from_the_start(self) -> None:
        """A fresh probe whose base is the adapters-disabled model is dropped where that is not the run's start."""
        if self.adapters_start_at_the_base is False and getattr(self.probe_source, "from_disabled_adapters", False):
            self.probe_source = None
            trained = self._base_trained
            why = (f"this run trains base weights beside its PEFT adapters ({', '.join(trained[:3])}"
                   f"{', ...' if len(trained) > 3 else ''}: bias='all' or 'lora_only', unfrozen norms), which "
                   "disabling the adapters keeps as trained" if trained else
                   "this run's PEFT adapters do not start at zero (an adapter trained before, or initialised "
                   "non-zero)")
            self.warn("fresh_probe", f"STS: {why}, so the adapters-disabled model is not the train-start one and the "
                      "base residuals of new completions cannot be computed: re-checks use the train-start probe "
                      "throughout. fresh_rollouts=False silences this.", STSDataWarning)

    def _measure(self, model, step: int) -> tuple[Any, dict[str, Any] | None, list[str]]:
        """The monitor's re-check, on a fresh probe first when there is a :attr:`probe_source` (its draw returned
        beside the result, its time in ``timings["fresh_probe"]``), measuring as many unprotected domains' losses
        as the overhead budget affords (the ones it left out returned third)."""
        began, probe_info = time.perf_counter(), None
        in_turn = self.monitor.in_turn()
        unprotected = None
        if self.budget.share is not None:  # rank 0's choice: every rank must measure the same domains
            unprotected = gather_objects(len(self.budget.affordable(in_turn)))[0]
        if self.probe_source is not None:
            sequences, base_model, probe_info = self.probe_source(model, step)
            with self.autocast():
                self.monitor.refresh_probe(model, sequences, base_model)
        probe_seconds = time.perf_counter() - began
        result = self.monitor.recheck(model, self.forecast.shifted_latents if self.forecast else None, self.autocast,
                                      unprotected)
        if probe_info is not None:
            result.timings["fresh_probe"] = probe_seconds
            result.seconds += probe_seconds
        # what the next re-check pays whatever the budget: the probe, the protected domains and a domain measured
        # every time (metric_for_best_model's)
        optional = {name: seconds for name, seconds in result.loss_seconds.items()
                    if name not in self.guard.config.protected and not self.monitor.measured_every_time(name)}
        self.budget.add_recheck(result.seconds, result.seconds - sum(optional.values()), result.loss_seconds,
                                result.loss_tokens)
        return result, probe_info, in_turn[unprotected:] if unprotected is not None else []

    def _early_forecast(self, step: int, max_steps: int, measured: dict[str, float | None],
                        intervals: dict[str, list[float]]) -> dict[str, Any]:
        """The measured changes extrapolated to the end of training with their intervals; projected violations
        (whole interval above the tolerance) warned about."""
        if self.learning_rates and max_steps <= 0:
            self.warn("no_max_steps", "STS early forecast skipped: session.learning_rates is set but recheck(...) "
                      "got no max_steps, so the schedule's share spent is unknown; pass recheck(..., max_steps=...).",
                      RuntimeWarning)
        if not self.learning_rates or max_steps <= 0:
            why = "max_steps was not given" if max_steps <= 0 else "no learning-rate schedule is known"
            if self.guard.config.early_stop == "projected":
                self.warn("projected_without_schedule", f"STS: early_stop='projected' cannot project ({why}): "
                          "the run stops only on measured violations. In your own loop: pass recheck(..., "
                          "max_steps=...) and set session.learning_rates (each step's rate) or pass log_history.",
                          RuntimeWarning)
            elif self.guard.first_time("no_schedule"):  # said once: the records carry no projection, and why
                self.say(f"STS: re-checks make no early forecast ({why}); pass recheck(..., max_steps=...) and set "
                         "session.learning_rates (each step's rate) for one.")
            return {}
        if not any(self.learning_rates[:max_steps]):  # read step 1 as the whole schedule spent
            self.warn("zero_schedule", "STS early forecast skipped: every learning rate of the schedule is 0, so no "
                      "share of it is ever spent (a run at learning_rate=0 trains nothing; in your own loop, set "
                      "session.learning_rates to the rates the optimizer steps with).", RuntimeWarning)
            return {}
        if len(self.learning_rates) > max_steps:  # one a micro-batch under gradient accumulation, or another plan
            self.warn("long_schedule", f"STS: {len(self.learning_rates)} learning rates for max_steps={max_steps}: "
                      f"the early forecast reads the first {max_steps} as the run's schedule. Give one rate per "
                      "optimizer step (with gradient accumulation, not one per micro-batch).", RuntimeWarning)
        if len(self.learning_rates) < max_steps:
            self.warn("short_schedule", f"STS early forecast skipped: {len(self.learning_rates)} learning rates for "
                      f"max_steps={max_steps}; set session.learning_rates to one rate per optimizer step.",
                      RuntimeWarning)
            return {}
        if self._resumed_at is not None:
            self.learning_rates = self._rates_as_run(self._resumed_at, max_steps)
            self._place_on_the_schedule(self._resumed_at, max_steps)
            self._resumed_at = None
        fraction = lr_area_fraction(step, max_steps, self.learning_rates)
        method = self.settings.early_method or best_early_method(self.calibration, self.recipe)
        out = early_projection(self.history, measured, fraction, self.forecast, self.calibration, intervals, method,
                               self.recipe)
        # the schedule's area so far and the plan it is a share of: what a resume under another plan reads back
        out["lr_area"], out["max_steps"] = float(sum(self.learning_rates[:step])), max_steps
        if self.predicted:
            out["predicted"] = {name: p["mean"] for name, p in self.predicted.items()}
        # one re-check is a point, not a course: its extrapolation (change / share of the schedule) reads an early
        # transient rise as a trend, so a projection warns (or stops) from the second measured re-check on
        measured_before = any(r.get("loss_delta") and "error" not in r and r.get("lr_area_fraction") != 0
                              for r in self.history)  # a re-check before any learning (lr 0) is no point of the course
        projected = self.guard.projected(out["early_forecast"], measured, fraction, out["early_forecast_ci"]) \
            if measured_before else {}
        for name, message in projected.items():
            self.warn(f"early:{name}", f"STS early forecast at step {step}: {message}.")
        if projected:
            out["projected_warnings"] = list(projected.values())
        return out

    def _rates_as_run(self, resumed_at: int, max_steps: int) -> list[float]:
        """Each step's learning rate as this run has had them, after a resume from ``resumed_at``: the steps before
        the resume keep the area they ran (the last kept re-check's ``lr_area``, spread evenly over them) and the
        rest follow the plan now; the kept re-checks' ``lr_area_fraction`` are read again on it, so that the early
        forecast does not take two plans' fractions for one course. The plan now can differ from the one the
        earlier re-checks ran on: another ``max_steps``, a scheduler that restarted (``save_only_model``), or the
        rates before the resume read from the arguments or the log where the loop's own scheduler ran others
        (records of older versions, without ``lr_area``, are read on the plan now)."""
        rates = [float(r) for r in self.learning_rates[:max_steps]]
        kept = [r for r in self.history if r.get("lr_area_fraction") is not None and 0 < r.get("step", 0)
                <= resumed_at]
        if not kept:
            return rates
        last = kept[-1]
        if last.get("lr_area") is not None and 0 < resumed_at <= max_steps:
            ran = last["lr_area"] + sum(rates[last["step"]:resumed_at])  # after the last re-check: as planned now
            rates[:resumed_at] = [ran / resumed_at] * resumed_at
        total = sum(rates)
        changed = False
        for record in kept:
            fraction = (record["lr_area"] / total if record.get("lr_area") is not None and total > 0
                        else lr_area_fraction(min(record["step"], max_steps), max_steps, rates))
            changed = changed or abs(fraction - record["lr_area_fraction"]) > 1e-6
            record["lr_area_fraction"] = fraction
        if changed:
            self.say(f"STS: resumed on another schedule than the earlier re-checks planned (max_steps={max_steps}, "
                     f"they planned {last.get('max_steps', 'another')}; or the steps before the resume ran at other "
                     f"rates than the plan now says): the early forecast reads the steps before {resumed_at} as they "
                     "ran.")
            if self.is_main:  # the history file (which the report reads) places them so too
                self.write(f"the history in {self.store.path(HISTORY_FILE)}",
                           lambda: self.store.replace_history_records(kept), resumed_at)
        return rates

    def _place_on_the_schedule(self, resumed_at: int, max_steps: int) -> None:
        """A kept re-check recorded as the run's end (the run stopped there, then was resumed past it) was never
        placed on the schedule: it gets the share it ran at, so that the early forecast reads it as a point of the
        course (the trend and power rules skip a record without ``lr_area_fraction``)."""
        for record in self.history:
            step = record.get("step", 0)
            if record.get("lr_area_fraction") is None and record.get("loss_delta") and \
                    0 < step <= min(resumed_at, max_steps):
                record["lr_area_fraction"] = lr_area_fraction(step, max_steps, self.learning_rates)
                record["lr_area"], record["max_steps"] = float(sum(self.learning_rates[:step])), max_steps
                if self.is_main:
                    self.write(f"the history in {self.store.path(HISTORY_FILE)}",
                               lambda record=record: self.store.replace_history_record(record), step)

    def save_checkpoint(self, checkpoint: RunStore | str | Path, step: int) -> None:
        """The monitor state and counters into a checkpoint's STS folder (a path or its :class:`RunStore`; main
        process)."""
        checkpoint = _run_store(checkpoint, "save_checkpoint")
        if not self._started:
            raise STSUsageError("STSSession.save_checkpoint() before start(): there is no run state to save yet; "
                                "call prepare(...) and start(...) (or resume(...)) first.")
        if not self.is_main:
            return
        self.flush_history(counted=False)  # a resume from this checkpoint reads the history file up to its step
        self.write(f"the monitor state to {checkpoint.root}", lambda: self.monitor.save(checkpoint.monitor_path), step)
        self.write(f"the callback state to {checkpoint.root}",
                   lambda: checkpoint.write_state({**self.counters(), "step": step}), step)

    def write_report(self, step: int | None = None) -> Path | None:
        """``report.html`` / ``report.md`` in the STS folder (main process); a failure only warns unless strict."""
        if not self.is_main:
            return None
        self.flush_history(counted=False)  # the report reads the folder: the records a failed write left out first
        if not self.store.has_results():
            return None
        try:
            from ..reporting.report import write_report

            began = time.perf_counter()
            html_path, _ = write_report(self.store.root, protected=self.guard.config.protected)
            self._report_written_at = time.perf_counter()
            self._report_seconds = self._report_written_at - began
            return html_path
        except Exception as err:  # noqa: BLE001 - a report must never kill a training run
            if self.strict:
                raise
            message = (f"STS report at step {step} was not written ({type(err).__name__}: {err}); later failures of "
                       "the report are recorded in write_errors without a warning.")
            self.write_errors.append({"step": step, "what": f"the report in {self.store.root}",
                                      "error": f"{type(err).__name__}: {err}"})
            if self.guard.first_time(f"report_failed:{type(err).__name__}"):  # rewritten at each re-check and the end
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                log_warning(message)
            return None


def settings_of(value: Any, kind: type, name: str) -> Any:
    """``value`` as a ``kind`` (one, or a dict of its fields); anything else refused, naming ``name``."""
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        return kind.from_dict(value)
    raise STSConfigError(f"{name}= must be a {kind.__name__} or a dict of its fields, got {value!r}.")


def whole_steps(value: Any, name: str) -> int:
    """A step count as an ``int``: an int-like value (numpy, a 0-d tensor) or a float with no fraction (micro-steps
    / accumulation); anything else is refused, before it reaches the history file."""
    if value is None and name == "max_steps":
        return 0
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise STSUsageError(f"STSSession.recheck({name}={value!r}): pass a whole number of optimizer steps (e.g. the "
                        "optimizer steps taken so far: micro-batches // gradient_accumulation_steps).")


def _is_tokenized(value: Any) -> bool:
    """A ``datasets.Dataset`` of token ids (``input_ids``), as a trainer or a loop holds its data."""
    return is_dataset(value) and "input_ids" in (getattr(value, "column_names", None) or [])


def _decoded_probe(probe: Any, tokenizer) -> Any:
    """A tokenized training set (``input_ids``, as a loop of run_clm_no_trainer's kind holds it) read through the
    tokenizer, as the callback reads the Trainer's; anything else as given."""
    if _is_tokenized(probe):
        from .training_data import corpus_from_training_dataset

        return corpus_from_training_dataset(probe, tokenizer, name="probe")
    return probe


def _decoded_datasets(domains: Any, tokenizer) -> Any:
    """Target domains given as tokenized datasets (``input_ids``, as a Trainer's eval sets are) read through the
    tokenizer, as the callback reads them; everything else as given (:func:`load_domains` reads it)."""
    if not isinstance(domains, Mapping):
        return domains
    from .training_data import corpus_from_training_dataset

    return {name: corpus_from_training_dataset(value, tokenizer, name=str(name), target=True)
            if _is_tokenized(value) else value
            for name, value in domains.items()}


def schedule_rates(rates: Any) -> list[float]:
    """``STSSession.learning_rates`` as a list of floats: a list, numpy array or 1-d tensor of each step's rate."""
    if isinstance(rates, (str, bytes)) or not hasattr(rates, "__iter__") or getattr(rates, "ndim", 1) != 1:
        raise STSUsageError(f"STSSession.learning_rates: got {type(rates).__name__}; give each optimizer step's "
                            "learning rate (a list, array or 1-d tensor of max_steps numbers). For a scheduler "
                            "object, list its rates ahead, or pass recheck(..., log_history=[{'step': s, "
                            "'learning_rate': lr}, ...]).")
    try:
        values = [float(rate) for rate in rates]
    except (TypeError, ValueError) as err:
        raise STSUsageError(f"STSSession.learning_rates: not numbers ({err}); give each optimizer step's learning "
                            "rate.") from err
    bad = next((i for i, rate in enumerate(values) if not math.isfinite(rate) or rate < 0), None)
    if bad is not None:  # a NaN spoils every share of the schedule; a negative rate has no area to share
        raise STSUsageError(f"STSSession.learning_rates[{bad}] is {values[bad]}: each step's learning rate must be a "
                            "finite number >= 0.")
    return values


def check_inputs_agree(setup: ForecastSetup, domains: dict[str, Corpus], loss_sets, probe_sequences) -> None:
    """Cheap checksum exchange before the first collective: every rank must see the same inputs."""
    if world_size() == 1:
        return
    sae = setup.sae
    sae_summary = sae.checksum_parts()
    config = {k: v for k, v in setup.config.to_dict().items() if k != "device"}
    check_ranks_agree(
        {"target domains": fingerprint(sorted(domains), loss_sets), "SAE": fingerprint(sae_summary),
         "training probe": fingerprint(probe_sequences), "STS config": fingerprint(config),
         **{f"target domain {name!r}'s held-out texts": fingerprint(texts) for name, texts in loss_sets.items()}},
        {"target domains": f"{sorted(domains)} ({fingerprint(sorted(domains), loss_sets)})",
         "SAE": f"{sae.hook_name} d_sae={sae.d_sae} ({fingerprint(sae_summary)})"},
    )


def _accuracy_sample(domains: dict[str, Corpus], seed: Any, items: int) -> dict[str, list[dict[str, Any]]]:
    """Each multiple-choice domain's seeded sample of ``items`` items, scored beside its held-out NLL."""
    out = {}
    for name, corpus in domains.items():
        chosen = multiple_choice_items(corpus)
        if chosen is not None:
            random.Random(f"{seed}:accuracy:{name}").shuffle(chosen)
            out[name] = chosen[:items]
    return out


def _latest_checkpoint_of(checkpoint: RunStore, run_id: str) -> Path | None:
    """The highest-numbered ``checkpoint-<step>`` beside ``checkpoint``'s (the Trainer's layout,
    ``<output_dir>/checkpoint-<step>/<subdir>``) whose STS state is run ``run_id``'s, else ``None``."""
    output_dir, subdir = checkpoint.root.parent.parent, checkpoint.root.name
    ours = [folder for _, folder in checkpoint_folders(output_dir)
            if (RunStore(folder / subdir).read_state() or {}).get("run_id") == run_id]
    return ours[-1] if ours else None


__all__ = ["COUNTERS", "STSNegativeTransferWarning", "STSSession", "check_inputs_agree", "check_not_predicted"]
