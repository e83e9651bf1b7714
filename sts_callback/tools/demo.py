"""The end-to-end demo: a real model (Gemma 3 270M, offline), an SAE trained once and cached, real text
domains, a forecast, and (when training is requested) a short fine-tuning run with the callback.

The console gets a short story: what is run, the forecast, what training measured at each re-check, what was
warned and where the files are. Everything else (progress bars, the trainers' dict logs, the full forecast
tables, library logging, the warnings in full) goes to ``<output_dir>/demo.log``; see :class:`DemoConsole`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .cache import build_once
from .models import default_cache_dir
from ..core.errors import STSConfigError
from ..reporting.console import with_interval

if TYPE_CHECKING:
    from typing_extensions import Self

DEMO_LAYER = 12  # 2/3 of Gemma 3 270M's 18 layers
DEMO_SAE_TOKENS = 60_000  # ~3 min of activation collection on 2 CPU cores; FVU ~0.36
DEMO_SOURCE = "python_code"
DEMO_TARGETS = ("python_code", "cpp_code", "ml_docs", "math", "python_reference", "legal", "readme_prose",
                "changelog", "markup")
SAE_DOMAINS = ("python_code", "cpp_code", "python_reference", "legal", "math", "ml_docs", "readme_prose",
               "changelog", "nlp_tutorials", "chat_templates", "markup")
DEMO_LOG = "demo.log"
# The forecast's default calibration: fitted on benchmarks/transfer's 64-step LoRA runs of this model and SAE
DEMO_CALIBRATION = "gemma3-270m-lora"


# ---------------------------------------------------------------------------------------------- console / log
class _LogStream(io.TextIOBase):
    """A text stream into the log file. A line redrawn in place with ``\\r`` (a progress bar) is written once,
    in its last state, plus a snapshot every ``interval`` seconds while it is redrawn: the log keeps every
    bar's progress without its thousands of redraws."""

    encoding = "utf-8"  # tqdm draws Unicode bars only on streams that declare an encoding

    def __init__(self, file: TextIO, interval: float = 30.0):
        self._file, self._interval = file, interval
        self._line, self._redraw, self._since = "", False, None
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            if self._file.closed:
                return len(text)
            for i, part in enumerate(text.split("\n")):
                if i:
                    self._file.write(self._line + "\n")
                    self._line, self._redraw, self._since = "", False, None
                for j, piece in enumerate(part.split("\r")):
                    if j:
                        self._carriage_return()
                    if piece:
                        self._line = piece if self._redraw else self._line + piece
                        self._redraw = False
        return len(text)

    def _carriage_return(self) -> None:
        if self._line.strip():
            now = time.monotonic()
            if self._since is None:
                self._since = now
            elif now - self._since >= self._interval:
                self._file.write(self._line.rstrip() + "\n")
                self._since = now
        self._redraw = True

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def finish(self) -> None:
        """Write the line in progress, if any."""
        with self._lock:
            if self._line.strip() and not self._file.closed:
                self._file.write(self._line.rstrip() + "\n")
            self._line, self._redraw, self._since = "", False, None


# Libraries that give their root logger a console handler of their own (bound to the stderr of the moment).
_LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "trl", "peft", "accelerate", "sae_lens",
                    "sts_callback")


def _stream_handlers(streams: Iterable[Any], libraries: Iterable[str] = ()) -> list[logging.StreamHandler]:
    """Every logging handler (any logger) that writes to one of ``streams``, and the plain stream handlers of
    the ``libraries``' loggers; not files, not handlers that follow ``sys.stderr`` by themselves."""
    streams = [s for s in streams if s is not None]
    libraries = set(libraries)
    loggers = [logging.getLogger()] + [item for item in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(item, logging.Logger)]
    found: list[logging.StreamHandler] = []
    for logger in loggers:
        for handler in list(logger.handlers):
            if (not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler)
                    or isinstance(getattr(type(handler), "stream", None), property) or handler in found):
                continue  # _StderrHandler (logging.lastResort's kind) writes to the sys.stderr of the moment
            # a library's own console handler is a plain StreamHandler (a subclass is someone else's: pytest's)
            if (logger.name in libraries and type(handler) is logging.StreamHandler) or any(
                    handler.stream is s for s in streams):
                found.append(handler)
    return found


class DemoConsole:
    """The demo's two outputs: a short story on the console, everything else in a log file.

    ``with DemoConsole(path) as console:``: inside, whatever is written to ``sys.stdout`` / ``sys.stderr``
    (progress bars, the Trainer's ``PrinterCallback`` / ``ProgressCallback`` dict logs, TRL's and the
    callback's prints), logged through ``logging`` (the library loggers' console handlers, ``transformers``
    included, are pointed at the log file) or warned goes to the log file only; :meth:`say` writes a line of
    the story to the console (the stdout found on entry) and to the log. Warnings are collected in
    :attr:`warnings` (and written to the log as they happen). Output written straight to the file
    descriptors by native code is not redirected.
    """

    def __init__(self, log_path: str | Path, console: TextIO | None = None, interval: float = 30.0):
        self.log_path = Path(log_path)
        self.console = console
        self.interval = interval
        self.warnings: list[warnings.WarningMessage] = []
        self._stream: _LogStream | None = None
        self._file: TextIO | None = None
        self._stack: ExitStack | None = None

    # -------------------------------------------------------------- the story
    def say(self, line: str = "") -> None:
        console = self.console if self.console is not None else sys.stdout
        console.write(line + "\n")
        console.flush()
        self.note(line)

    def note(self, line: str) -> None:
        """A line for the log only."""
        if self._stream is not None:
            self._stream.write(line + "\n")

    # -------------------------------------------------------------- routing
    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_path, "w", encoding="utf-8", buffering=1)  # line-buffered: `tail -f` works
        self._stream = _LogStream(self._file, self.interval)
        if self.console is None:
            self.console = sys.stdout
        self._stderr = sys.stderr
        consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, self.console)
        self._moved = [(handler, handler.stream) for handler in _stream_handlers(consoles, _LIBRARY_LOGGERS)]
        stack = self._stack = ExitStack()
        try:
            stack.enter_context(warnings.catch_warnings())  # restores the filters and showwarning on exit
            warnings.showwarning = self._warned
            stack.enter_context(redirect_stdout(self._stream))
            stack.enter_context(redirect_stderr(self._stream))
            self._handler = logging.StreamHandler(self._stream)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(self._handler)
            stack.callback(logging.getLogger().removeHandler, self._handler)
            for handler, _ in self._moved:
                handler.setStream(self._stream)
        except BaseException:
            self._restore()
            raise
        return self

    def _warned(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.warnings.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
        if self._stream is not None:
            self._stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self._stream is not None:
            self._stream.write("".join(traceback.format_exception(exc_type, exc, tb)))
        self._restore()
        if exc_type is not None:
            self.say(f"The demo stopped ({exc_type.__name__}); the full log is in {self.log_path}")
        return False

    def _restore(self) -> None:
        for handler, stream in self._moved:
            handler.setStream(stream)
        # Handlers created inside (a library configured its logging on import) point at the log: send them to
        # the console, as they would have been without the demo.
        for handler in _stream_handlers([self._stream]):
            handler.setStream(self._stderr)
        if self._stack is not None:
            self._stack.close()
        if self._stream is not None:
            self._stream.finish()
            self._stream = None
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------- the story
def percent(value: Any, digits: int = 2) -> str:
    """A relative change as a signed percentage; ``n/a`` for a missing or non-finite value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.{digits}%}"


def signed_in_words(feature: str, value: float | None) -> str:
    """The default signed feature of a domain, described in words."""
    from ..scoring.signed import DEFAULT_SIGNED

    if value is None or not math.isfinite(value):
        return f"{feature}: n/a"
    if feature == "forgetting_minus_transfer":
        share = (1.0 - value) / 2.0
        kind = "transfer" if share >= 0.5 else "generic forgetting"
        return f"{share:.0%} of the shift on latents it uses (mostly {kind})"
    if feature == "signed_usage":
        return f"signed usage {value:+.3g} ({'raises' if value > 0 else 'suppresses'} the latents it uses)"
    if feature == "decoder_projection":
        return f"shift {'towards' if value > 0 else 'away from'} its own direction (cosine {value:+.2f})"
    return f"{feature} {value:+.3g}" + (" (default signed feature)" if feature == DEFAULT_SIGNED else "")


def forecast_story(forecast, predicted: dict[str, dict[str, float]] | None = None,
                   protected: Iterable[str] = (), top: int | None = None) -> list[str]:
    """The forecast as a short ranked list. With a calibrated prediction (``predicted``: domain -> {mean, low,
    high, level[, label]}, e.g. ``Forecast.predictions`` or ``STSCallback.predicted``): each domain's predicted
    held-out loss change in %, its interval and a gain / loss / flat label, the most harmed first, the raw score
    after it; domains without one follow. Otherwise the ranking and the default signed feature in words."""
    from ..pipelines.forecast import SCORE_LABELS
    from ..scoring.calibration import change_label
    from ..scoring.signed import DEFAULT_SIGNED

    predicted = predicted or {}
    protected = set(protected)
    scores = dict(forecast.ranked())
    ranked = ([(n, scores.get(n)) for n in sorted(predicted, key=lambda n: -predicted[n]["mean"])]
              + [(n, v) for n, v in scores.items() if n not in predicted])
    label = SCORE_LABELS.get(forecast.ranking, forecast.ranking)
    width = max(len(name) + (12 if name in protected else 0) for name, _ in ranked)
    lines = []
    for rank, (name, score) in enumerate(ranked[:top] if top else ranked, 1):
        shown = name + (" (protected)" if name in protected else "")
        score_text = f"{label} {score:.3g}" if score is not None else f"{label} n/a"
        if name in predicted:
            p = predicted[name]
            verdict = p.get("label") or change_label(p["low"], p["high"])
            what = (f"held-out loss {percent(p['mean'], 1)} [{percent(p['low'], 1)}, {percent(p['high'], 1)}] "
                    f"{verdict:<4}  ({score_text})")
        else:
            what = f"{score_text:<18}  " + signed_in_words(DEFAULT_SIGNED,
                                                             forecast.domains[name].scores.get(DEFAULT_SIGNED))
        lines.append(f"  {rank:>2}. {shown:<{width}}  {what}")
    if top and len(ranked) > top:
        lines.append(f"      ... {len(ranked) - top} more in the log")
    if predicted:
        level = next(iter(predicted.values())).get("level", 0.9)
        lines.append(f"  (predicted end-of-training change of the held-out loss, + = worse, {level:.0%} interval; "
                     "loss / gain: the whole interval above / below 0)")
    return lines


def recheck_line(record: dict[str, Any], steps: int | None = None, protected: Iterable[str] = (),
                 n_shifted: int | None = None) -> str:
    """One re-check from the callback's history: held-out loss change per domain in % (with its 95% interval
    where recorded), the SAE fit, the overlap with the forecast, violations."""
    protected = set(protected)
    at = f"step {record.get('step')}" + (f"/{steps}" if steps else "")
    if "error" in record:
        return f"  {at}: the re-check failed: {record['error']}"
    intervals = record.get("loss_delta_ci") or {}
    deltas = ", ".join(f"{name}{'*' if name in protected else ''} {with_interval(value, intervals.get(name))}"
                       for name, value in (record.get("loss_delta") or {}).items())
    line = f"  {at}: " + (f"held-out loss {deltas}" if deltas else "no held-out loss")
    parts = []  # on a second line, under the first
    accuracy = {k: v for k, v in (record.get("accuracy_delta") or {}).items() if v is not None}
    if accuracy:
        parts.append("accuracy " + ", ".join(f"{k} {v * 100:+.1f} pt" for k, v in accuracy.items()))
    fit = record.get("sae_fit")
    if fit:
        parts.append(f"SAE fit: FVU {fit.get('fvu', float('nan')):.3f}, L0 {fit.get('l0', float('nan')):.1f}")
    if record.get("overlap_with_forecast") is not None:
        total = n_shifted or len(record.get("shifted_latents") or []) or "?"
        parts.append(f"{record['overlap_with_forecast']}/{total} shifted latents as forecast")
    if parts:
        line += "\n" + " " * (len(at) + 4) + "; ".join(parts)
    for violation in record.get("violations") or []:
        line += f"\n      violation: {violation}"
    if record.get("early_stop"):
        line += f"\n      early stop: {record['early_stop']}"
    return line


def training_story(history: list[dict[str, Any]], *, steps: int | None = None, protected: Iterable[str] = (),
                   base_fit: dict[str, float] | None = None, n_shifted: int | None = None) -> list[str]:
    """What training measured: the SAE fit at start, then each re-check (one or two lines; more for
    violations)."""
    lines = []
    if base_fit:
        lines.append(f"  at start: SAE fit on the training probe: FVU {base_fit['fvu']:.3f}, L0 {base_fit['l0']:.1f}")
    if not history:
        lines.append("  no re-check was recorded")
    lines.extend(recheck_line(r, steps, protected, n_shifted) for r in history)
    notes = []
    if any(r.get("loss_delta_ci") for r in history):
        notes.append("±: 95% interval")
    if any(name in set(protected) for r in history for name in (r.get("loss_delta") or {})):
        notes.append("*: protected domain")
    if notes:
        lines.append(f"  ({'; '.join(notes)})")
    return lines


def warning_lines(caught: Iterable[warnings.WarningMessage], limit: int = 160) -> list[str]:
    """Each distinct warning as one line (category: message, whitespace collapsed, cut at ``limit``)."""
    seen: dict[str, int] = {}
    for w in caught:
        text = f"{w.category.__name__}: {' '.join(str(w.message).split())}"
        if len(text) > limit:
            text = text[: limit - 1] + "…"
        seen[text] = seen.get(text, 0) + 1
    return [f"  {text}" + (f" (x{count})" if count > 1 else "") for text, count in seen.items()]


def _sae_description(sae_path: Path) -> str:
    try:
        cfg = json.loads((sae_path / "cfg.json").read_text())
    except (OSError, ValueError):
        return f"SAE at layer {DEMO_LAYER}"
    text = (f"{cfg.get('architecture', '').replace('topk', 'TopK')} SAE on "
            f"{cfg.get('metadata', {}).get('hook_name', f'layer {DEMO_LAYER}')}, width {cfg.get('d_sae')}"
            + (f", k={cfg['k']}" if cfg.get("k") else ""))
    try:
        report = json.loads((sae_path / "training_report.json").read_text())
        text += f" (held-out FVU {report['fvu']:.2f} when trained)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return text


# ---------------------------------------------------------------------------------------------- the demo
def demo_sae_path(d_sae: int, k: int, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "sae" / f"gemma-3-270m-L{DEMO_LAYER}-w{d_sae}-k{k}"


def ensure_demo_sae(model, tokenizer, *, d_sae: int = 4096, k: int = 32, tokens: int = DEMO_SAE_TOKENS,
                    log=print) -> Path:
    """Train the demo SAE on a mix of the built-in domains once; later runs reuse the cached folder."""
    from ..core.corpora import load_domain
    from .train_sae import REPORT_FILENAME, SAETrainingConfig, train_sae

    path = demo_sae_path(d_sae, k)
    if _sae_is_built(path):
        log(f"SAE: cached at {path}")
        return path

    def build(folder: Path) -> None:
        texts: list[str] = []
        per_domain = [load_domain(name) for name in SAE_DOMAINS]
        for i in range(max(len(d) for d in per_domain)):  # interleave so every domain is represented
            texts.extend(d[i] for d in per_domain if i < len(d))
        log(f"SAE: training a TopK SAE (width {d_sae}, k={k}) at layer {DEMO_LAYER} on {tokens} tokens of "
            f"{len(SAE_DOMAINS)} domains (once; cached in {path})")
        trained = train_sae(model, tokenizer, texts, DEMO_LAYER,
                            SAETrainingConfig(d_sae=d_sae, k=k, training_tokens=tokens, max_length=128),
                            output_dir=folder, progress=True)
        log(f"SAE: fraction of variance unexplained {trained.fvu:.3f}, dead latents {trained.dead_fraction:.1%}, "
            f"{trained.seconds:.0f} s")
        report = folder / REPORT_FILENAME  # written in the private folder: name the one it is renamed to
        report.write_text(json.dumps({**json.loads(report.read_text()), "path": str(path.resolve())}, indent=2))

    return build_once(path, _sae_is_built, build)


def _sae_is_built(path: Path) -> bool:
    # training_report.json is written last: a folder with cfg.json but no report is an interrupted save
    from .train_sae import REPORT_FILENAME

    return (path / "cfg.json").exists() and (path / REPORT_FILENAME).exists()


def _load_calibration(calibration):
    if calibration is None:
        return None
    from ..scoring.calibration import load_calibration

    return load_calibration(calibration)


def run_demo(output_dir: Path = Path("outputs/demo"), quick: bool = False, train_steps: int | None = None,
             calibration: Any = DEMO_CALIBRATION, console: TextIO | None = None) -> dict:
    """Run the demo and return a summary dict (also written to ``output_dir/demo_summary.json``).

    The story goes to ``console`` (default: stdout), everything else to ``output_dir/demo.log``.
    ``calibration`` (a :class:`~sts_callback.scoring.calibration.Calibration`, its JSON path, e.g. from
    ``sts calibrate``, or a built-in name; default the built-in ``"gemma3-270m-lora"``; ``None``: raw scores
    only) turns the forecast into predicted held-out loss changes in % with intervals. The short training run
    applies a calibration only when one is given: the built-in one predicts the end of a 64-step run, not of
    the demo's few steps."""
    if train_steps is not None and (isinstance(train_steps, bool) or not isinstance(train_steps, int)
                                    or train_steps < 0):  # -1 reads as three epochs to SFTConfig: hours here
        raise STSConfigError(f"train_steps={train_steps!r}: give a number of training steps >= 1, 0 to skip the "
                             "training run, or None for the default (4; 2 with quick).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    builtin = isinstance(calibration, str) and calibration == DEMO_CALIBRATION
    calibration = _load_calibration(calibration)
    started = time.perf_counter()
    with DemoConsole(output_dir / DEMO_LOG, console) as out:
        summary = _run(out, output_dir, quick, train_steps, calibration, builtin)
        summary["warnings"] = [line.strip() for line in warning_lines(out.warnings, limit=10_000)]
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["log"] = str(output_dir / DEMO_LOG)
        (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        out.say("")
        lines = warning_lines(out.warnings)
        out.say(f"Warnings: {len(lines)}" + (" (in full in the log)" if lines else ""))
        for line in lines:
            out.say(line)
        out.say("")
        out.say(f"Files ({summary['seconds']:.0f} s in all):")
        for line in _files_story(output_dir):
            out.say(line)
    return summary


def _files_story(output_dir: Path) -> list[str]:
    entries = [("forecast.json", "the forecast: every score, the shifted latents, settings"),
               ("sft/sts/report.html", "the callback's report: forecast, re-checks, held-out losses"),
               ("sft/sts/history.jsonl", "the callback's re-checks, one JSON record each"),
               ("demo_summary.json", "timings and results of this run"),
               (DEMO_LOG, "everything else: progress bars, the trainer's logs, full tables, warnings")]
    shown = [(name, what) for name, what in entries if name == DEMO_LOG or (output_dir / name).exists()]
    width = max(len(str(output_dir / name)) for name, _ in shown)
    return [f"  {output_dir / name!s:<{width}}  {what}" for name, what in shown]


def _run(out: DemoConsole, output_dir: Path, quick: bool, train_steps: int | None, calibration,
         builtin: bool = False) -> dict:
    from ..core.config import STSConfig
    from ..core.corpora import load_domain
    from ..core.sae import check_sae_folder
    from ..pipelines.forecast import forecast, with_icl_loss
    from .models import load_gemma3_270m

    if train_steps != 0:  # fail now rather than after the forecast when the training stack cannot be imported
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401

        from ..integrations import callback  # noqa: F401
    summary: dict = {"quick": quick}
    out.say("sts-callback demo: which text domains will fine-tuning Gemma 3 270M on Python code move?")
    out.say(f"(offline; progress bars and the trainer's logs go to {out.log_path})")
    out.say("")
    if _sae_is_built(demo_sae_path(4096, 32)):  # a damaged cached SAE: named now, not after the model loads
        check_sae_folder(demo_sae_path(4096, 32))
    t0 = time.perf_counter()
    model, tokenizer = load_gemma3_270m()
    summary["model_seconds"] = round(time.perf_counter() - t0, 1)
    out.say(f"model   Gemma 3 270M (fp32, CPU), loaded in {summary['model_seconds']} s")

    t0 = time.perf_counter()
    if not (demo_sae_path(4096, 32) / "cfg.json").exists():
        out.say("SAE     none cached yet: training one (a few minutes, once) ...")
    sae_path = ensure_demo_sae(model, tokenizer, log=out.note)
    summary["sae_seconds"] = round(time.perf_counter() - t0, 1)
    summary["sae"] = str(sae_path)
    out.say(f"SAE     {_sae_description(sae_path)}")
    out.say(f"        {sae_path}")

    # The "training set": half of the Python code domain; its other half is a target (a sanity check:
    # the domain a model is trained on should be among the most affected).
    source = load_domain(DEMO_SOURCE)
    train_texts = source[0::2]
    targets = {name: (source[1::2] if name == DEMO_SOURCE else load_domain(name)) for name in DEMO_TARGETS}
    config = STSConfig(
        n_shifted=100,
        shift_tokens=2_000 if quick else 4_000,
        domain_tokens=800 if quick else 1_500,
        n_domain_demonstrations=3,
        max_query_tokens=128,
        max_demonstration_tokens=128,
        batch_size=8,
    )
    out.say(f"data    training set: {len(train_texts)} texts of {DEMO_SOURCE!r} (every other one of the built-in "
            "domain)")
    out.say(f"        {len(targets)} target domains: {', '.join(targets)}")
    out.say(f"        ({DEMO_SOURCE!r} as a target is its other half: a sanity check, it should move most)")
    out.say("")
    out.say(f"Forecast before any training ({config.shift_tokens} shift tokens, {config.domain_tokens} tokens "
            "per domain) ...")
    out.note(f"forecast: training on {DEMO_SOURCE!r} ({len(train_texts)} texts); {len(targets)} target domains; "
             f"{config.shift_tokens} shift tokens, {config.domain_tokens} tokens per domain")
    # a calibration reading the in-context NLL change has it computed (applied below, with an exclusion)
    result = forecast(model, tokenizer, sae_path, train_texts, targets, with_icl_loss(config, calibration),
                      progress=True)
    if calibration is not None:  # the training data's own held-out half is a sanity check, not a prediction
        result.apply_calibration(calibration, exclude=[DEMO_SOURCE])
    out.note(result.table())
    if result.predictions:
        out.note(result.table(view="scores"))
    path = result.save(output_dir / "forecast.json")
    summary["forecast_seconds"] = round(result.timings["total"], 1)
    summary["forecast_tokens_per_second"] = round(result.tokens_per_second, 1)
    summary["forecast_ranking"] = result.ranked()
    predicted = result.predictions
    if predicted:
        summary["forecast_predicted"] = predicted
    out.say(f"  {result.timings['total']:.0f} s, {result.tokens_per_second:.0f} tokens/s through layer {DEMO_LAYER} "
            f"+ SAE. " + ("Predicted change of each domain's held-out loss, most harmed first:" if predicted
                          else "Most affected first:"))
    for line in forecast_story(result, predicted):
        out.say(line)
    if predicted and builtin:
        fitted = calibration.fitted_on.get("leave_one_source_out", {})
        out.say(f"  (built-in calibration {DEMO_CALIBRATION!r}: a 64-step LoRA run of this model on one built-in "
                f"domain, fitted on benchmarks/transfer's {len(calibration.fitted_on.get('units', []))} runs; on a "
                f"source it was not fitted on it ordered the other domains at mean r "
                f"{fitted.get('mean_r', float('nan')):+.2f} with the direction right for "
                f"{fitted.get('mean_direction', float('nan')):.0%}; {DEMO_SOURCE!r} itself is not predicted)")
    elif not predicted:
        out.say("  No calibrated prediction in % for this setup (fit one with `sts calibrate` on your runs and pass "
                "--calibration).")
    out.note(f"forecast: {result.timings['total']:.0f} s, {result.tokens_per_second:.0f} tokens/s through layer "
             f"{DEMO_LAYER} + SAE; written to {path}")

    if train_steps != 0:
        summary["training"] = run_training_demo(model, tokenizer, sae_path, train_texts, output_dir,
                                                steps=train_steps or (2 if quick else 4), out=out,
                                                calibration=None if builtin else calibration)
    return summary


def run_training_demo(model, tokenizer, sae_path: Path, train_texts: list[str], output_dir: Path, *, steps: int,
                      out: DemoConsole | None = None, calibration: Any = None) -> dict:
    """A short LoRA SFT run (TRL) with STSCallback: forecast at start, re-checks at the checkpoints."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..integrations.callback import STSCallback

    say = out.say if out is not None else print
    every = max(steps // 2, 1)
    protected = ["legal"]
    say("")
    say(f"Training: {steps} LoRA SFT steps (TRL SFTTrainer) on {DEMO_SOURCE!r} with STSCallback: it forecasts "
        f"at train start and re-checks every {every} steps ...")
    sts = STSCallback(
        sae=str(sae_path),
        target_domains=["python_code", "math", "legal", "readme_prose"],
        protected=protected,
        config={"shift_tokens": 1500, "domain_tokens": 600, "n_domain_demonstrations": 2,
                "max_query_tokens": 96, "max_demonstration_tokens": 96},
        recheck_tokens=512, loss_tokens=256, tolerance=0.05, calibration=_load_calibration(calibration),
    )
    run_dir = output_dir / "sft"
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(run_dir), max_steps=steps, save_steps=every, logging_steps=1,
                       per_device_train_batch_size=4, max_length=64, learning_rate=1e-3, use_cpu=True,
                       report_to=[], save_strategy="steps", disable_tqdm=True,
                       activation_checkpointing=False),  # 270M on CPU: no memory to save, recomputing costs time
        train_dataset=Dataset.from_dict({"text": train_texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[sts],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    recheck_seconds = sum(r.get("seconds", 0.0) for r in sts.history)
    if sts.forecast is not None:
        say(f"  the callback's own forecast at train start ({sts.forecast.shift_tokens} query tokens, "
            f"{len(sts.forecast.domains)} domains), most affected first:")
        for line in forecast_story(sts.forecast, sts.predicted, protected):
            say("  " + line)
    for line in training_story(sts.history, steps=steps, protected=protected, base_fit=sts.base_fit,
                               n_shifted=sts.config.n_shifted):
        say(line)
    say(f"  {seconds:.0f} s in all, of which re-checks {recheck_seconds:.0f} s")
    return {"seconds": round(seconds, 1), "recheck_seconds": round(recheck_seconds, 1),
            "history": [{k: v for k, v in r.items()
                         if k in ("step", "overlap_with_forecast", "loss_delta", "sae_fit", "violations", "error")}
                        for r in sts.history]}
