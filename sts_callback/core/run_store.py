"""The callback's run folder, ``<output_dir>/sts/``: its file names, formats, atomic writes and read-back.

    forecast.json          the step-0 forecast (``Forecast.save``)
    history.jsonl          one JSON record per re-check (keyed by ``step``), appended; records a resumed run
                           redoes move to ``history.superseded.jsonl``, a fresh run's old history to
                           ``history.<time>.jsonl``: nothing is deleted
    settings.json          the guard's rules (protected domains, tolerance, max_sts) for ``sts report``
    monitor.safetensors    base statistics for re-checks (also in each ``checkpoint-N/sts/``)
    callback_state.json    the callback's counters and base losses (also in each ``checkpoint-N/sts/``), so a
                           resume works without ``restore_callback_states_from_checkpoint``

Nothing here decides anything; every write is atomic (:mod:`sts_callback.core.atomic`).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from .atomic import append_json_line, atomic_write_json, atomic_write_text, parse_json_lines

FORECAST_FILE = "forecast.json"
FORECAST_FORMAT = "sts-forecast/1"  # the "format" field of a forecast.json
HISTORY_FILE = "history.jsonl"
SUPERSEDED_FILE = "history.superseded.jsonl"
CUT_FILE = "history.cut.txt"  # lines a crash cut, moved out of the history on resume
SETTINGS_FILE = "settings.json"
REPORT_HTML_FILE, REPORT_MD_FILE = "report.html", "report.md"  # written by reporting.report
MONITOR_FILE = "monitor.safetensors"
STATE_FILE = "callback_state.json"
STATE_FORMAT = "sts-callback-state/1"


def step_of(record: Any) -> int:
    """A history record's step (0 for a line that is not a record, or a step that is not a number)."""
    step = record.get("step", 0) if isinstance(record, dict) else 0
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The Trainer's ``checkpoint-<step>`` folders in ``output_dir``, as ``(step, folder)`` in step order."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if step.isdigit():
            found.append((int(step), folder))
    return sorted(found)


def in_step_order(records: list[Any]) -> list[Any]:
    """``records`` in step order (a record whose first write failed is written after later ones); as they are when
    a line is not a record, so that whoever refuses it names its line."""
    if all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in records):
        return sorted(records, key=step_of)
    return records


class RunStore:
    """Reads and writes one run's STS folder; ``checkpoint(step)`` is the store inside ``checkpoint-<step>``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def checkpoint(self, output_dir: str | Path, step: int, subdir: str) -> "RunStore":
        return RunStore(Path(output_dir) / f"checkpoint-{step}" / subdir)

    # ---------------------------------------------------------------- history
    def read_history(self) -> list[dict[str, Any]]:
        """The re-check records in step order (a record whose first write failed is written later, after newer ones)."""
        return in_step_order(self._history()[0])

    def _history(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The history's records and its unreadable lines (warned about)."""
        records, cut = parse_json_lines(self.path(HISTORY_FILE))
        if cut:
            warnings.warn(f"{self.path(HISTORY_FILE)}: {len(cut)} unreadable line(s) skipped (a cut write?).",
                          RuntimeWarning, stacklevel=3)
        return records, cut

    def append_history(self, record: dict[str, Any]) -> None:
        append_json_line(self.path(HISTORY_FILE), record)

    def replace_history_record(self, record: dict[str, Any]) -> None:
        """The history with its record of ``record["step"]`` replaced (the whole file rewritten atomically; cut
        lines move to ``history.cut.txt``)."""
        self.replace_history_records([record])

    def replace_history_records(self, replacements: list[dict[str, Any]]) -> None:
        """The history with its record of each replacement's step replaced, in one rewrite."""
        records, cut = self._history()
        replaced = False
        for record in replacements:
            for index in reversed(range(len(records))):
                if step_of(records[index]) == record.get("step"):
                    records[index], replaced = record, True
                    break
        if replaced:
            self._rewrite_history(records, cut)

    def _rewrite_history(self, records: list[Any], cut: list[str]) -> None:
        """The history file as ``records``, whole lines only (atomically); lines a crash cut move to
        ``history.cut.txt``."""
        if cut:
            with self.path(CUT_FILE).open("a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in cut))
        atomic_write_text(self.path(HISTORY_FILE), "".join(json.dumps(r) + "\n" for r in records))

    def keep_history_until(self, step: int) -> list[dict[str, Any]]:
        """Resume at ``step``: records after it (the resumed run redoes them) move to the superseded file; lines a
        crash cut (unreadable) move to ``history.cut.txt``, so that the history is whole lines again."""
        records, cut = self._history()
        records = in_step_order(records)
        kept = [r for r in records if step_of(r) <= step]
        dropped = [r for r in records if step_of(r) > step]
        for record in dropped:
            append_json_line(self.path(SUPERSEDED_FILE), {**record, "superseded_at": time.time()})
        # a re-check recorded as the run's end (another callback stopped it there) is not its end once resumed
        carried_on = [r for r in kept if isinstance(r, dict) and r.pop("ended_early", None) is not None]
        if dropped or cut or carried_on or not self.path(HISTORY_FILE).exists():
            self._rewrite_history(kept, cut)
        return kept

    def adopt(self, origin: "RunStore", step: int) -> None:
        """A run resumed into a new folder from another run's checkpoint: that run's forecast, settings and history
        up to ``step`` are copied here, so this folder holds the whole run (the origin is left as it was)."""
        for name in (FORECAST_FILE, SETTINGS_FILE):
            if origin.path(name).exists() and not self.path(name).exists():
                atomic_write_text(self.path(name), origin.path(name).read_text(encoding="utf-8"))
        if not self.path(HISTORY_FILE).exists():
            kept = [r for r in origin.read_history() if r.get("step", 0) <= step]
            atomic_write_text(self.path(HISTORY_FILE), "".join(json.dumps(r) + "\n" for r in kept))

    def archive_previous_run(self) -> list[Path]:
        """A fresh run (step 0) in a folder an earlier run wrote: its history, superseded re-checks and forecast
        move to dated names (``history.<time>.jsonl``, ``forecast.<time>.json``), so that neither the report nor
        a resume of this run reads them as this run's (a run whose forecast is skipped writes no forecast.json); its
        report too, which would otherwise stand beside this run's forecast until its first re-check."""
        names = [name.partition(".")[::2] for name in (HISTORY_FILE, SUPERSEDED_FILE, FORECAST_FILE, REPORT_HTML_FILE,
                                                       REPORT_MD_FILE)]
        stamp = base = time.strftime("%Y%m%d-%H%M%S")
        number = 1  # runs that start within one second (quick trials, smoke tests): one numbered stamp for all
        while any(self.path(f"{stem}.{stamp}.{suffix}").exists() for stem, suffix in names):
            number += 1
            stamp = f"{base}-{number}"
        moved = []
        for stem, suffix in names:
            path = self.path(f"{stem}.{suffix}")
            if not path.exists():
                continue
            if path.stat().st_size == 0:
                path.unlink(missing_ok=True)
                continue
            target = self.path(f"{stem}.{stamp}.{suffix}")
            path.replace(target)
            moved.append(target)
        return moved

    # ---------------------------------------------------------------- small JSON files
    def write_settings(self, settings: dict[str, Any]) -> Path:
        return atomic_write_json(self.path(SETTINGS_FILE), settings)

    def read_settings(self) -> dict[str, Any]:
        """What the train start recorded in the settings file; {} where it is missing or unreadable."""
        try:
            saved = json.loads(self.path(SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def write_state(self, state: dict[str, Any]) -> Path:
        return atomic_write_json(self.path(STATE_FILE), {"format": STATE_FORMAT, **state})

    def read_state(self) -> dict[str, Any] | None:
        """The saved counters, or ``None`` when there are none or the file cannot be read (cut by a crash or a
        full disk: warned, naming the file)."""
        path = self.path(STATE_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            warnings.warn(f"{path} is unreadable ({type(err).__name__}: {err}; a write cut by a crash?): read as "
                          "absent.", RuntimeWarning, stacklevel=2)
            return None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            return None
        return {k: v for k, v in data.items() if k != "format"}

    # ---------------------------------------------------------------- the forecast and monitor state
    @property
    def forecast_path(self) -> Path:
        return self.path(FORECAST_FILE)

    @property
    def monitor_path(self) -> Path:
        return self.path(MONITOR_FILE)

    def has_results(self) -> bool:
        return self.forecast_path.exists() or self.path(HISTORY_FILE).exists()


__all__ = ["CUT_FILE", "checkpoint_folders", "FORECAST_FILE", "FORECAST_FORMAT", "HISTORY_FILE", "MONITOR_FILE", "RunStore", "SETTINGS_FILE",
           "STATE_FILE", "SUPERSEDED_FILE"]
