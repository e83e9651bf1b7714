"""Forecast, re-checks and the report as tables in the experiment trackers the Trainer already reports to
(W&B, TensorBoard), beside the scalar ``sts/...`` metrics that go through ``trainer.log``.

Each function is a no-op for a tracker the run does not use (``args.report_to``) or whose callback is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_forecast(trainer: Any, forecast: Any) -> None:
    """The step-0 forecast as a table (one row per domain)."""


def export_recheck(trainer: Any, record: dict[str, Any]) -> None:
    """One re-check as a table (one row per domain: loss change, scores)."""


def export_report(trainer: Any, html_path: Path) -> None:
    """``report.html``: a W&B artifact (and ``wandb.Html``), TensorBoard text."""


__all__ = ["export_forecast", "export_recheck", "export_report"]
