"""sts-callback: forecast which capabilities post-training will move (SAE-based Transferability Score)."""

from .calibration import Calibration
from .config import STSConfig
from .errors import STSConfigError, STSDataWarning, STSError, STSInputError, STSNumericalError
from .forecast import DomainForecast, Forecast, forecast
from .gate import GateDecision, filter_examples, gate_mixture
from .sae import SAEHandle, load_sae
from .validate import ValidationResult, multiple_choice_accuracy, validate

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "STSCallback":  # imported on first use: it pulls in transformers' Trainer machinery
        from .callback import STSCallback

        return STSCallback
    raise AttributeError(f"module 'sts_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Calibration",
    "STSCallback",
    "DomainForecast",
    "Forecast",
    "SAEHandle",
    "STSConfig",
    "STSConfigError",
    "STSDataWarning",
    "STSError",
    "STSInputError",
    "STSNumericalError",
    "filter_examples",
    "forecast",
    "gate_mixture",
    "GateDecision",
    "load_sae",
    "multiple_choice_accuracy",
    "validate",
    "ValidationResult",
]
