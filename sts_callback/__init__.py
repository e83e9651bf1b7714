"""sts-callback: forecast which capabilities post-training will move (SAE-based Transferability Score)."""

from .core.config import STSConfig
from .core.errors import (STSConfigError, STSDataWarning, STSError, STSInputError, STSNegativeTransferWarning,
                          STSNumericalError, STSOutOfMemoryError, STSUsageError)
from .core.sae import SAEHandle, load_sae
from .pipelines.forecast import DomainForecast, Forecast, forecast
from .pipelines.gate import GateDecision, GateRules, filter_examples, gate_mixture
from .pipelines.guard import Decision, Guard, GuardConfig
from .pipelines.recheck import Recheck, RecheckConfig
from .scoring.calibration import Calibration, load_calibration
from .validation.validate import ValidationConfig, ValidationResult, multiple_choice_accuracy, validate

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "STSCallback":  # imported on first use: it pulls in transformers' Trainer machinery
        from .integrations.callback import STSCallback

        return STSCallback
    if name == "STSSession":  # the callback's loop-agnostic core, for a training loop without a Trainer
        from .integrations.session import STSSession

        return STSSession
    raise AttributeError(f"module 'sts_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Calibration",
    "Decision",
    "Guard",
    "GuardConfig",
    "Recheck",
    "RecheckConfig",
    "STSCallback",
    "STSSession",
    "DomainForecast",
    "Forecast",
    "SAEHandle",
    "STSConfig",
    "STSConfigError",
    "STSDataWarning",
    "STSError",
    "STSInputError",
    "STSNegativeTransferWarning",
    "STSNumericalError",
    "STSOutOfMemoryError",
    "STSUsageError",
    "filter_examples",
    "forecast",
    "gate_mixture",
    "GateDecision",
    "GateRules",
    "load_calibration",
    "load_sae",
    "multiple_choice_accuracy",
    "validate",
    "ValidationConfig",
    "ValidationResult",
]
