"""Errors raised on bad input. Each message names the problem and the fix."""


class STSError(Exception):
    """Base class of the library's errors."""


class STSConfigError(STSError, ValueError):
    """A setting has a value that cannot work."""


class STSInputError(STSError, ValueError):
    """Data, model or SAE given to the library cannot be used as given."""


class STSUsageError(STSError, RuntimeError):
    """A method was called out of order (e.g. a re-check before the session started)."""


class STSNumericalError(STSError, FloatingPointError):
    """NaN or inf appeared in activations."""


class STSOutOfMemoryError(STSError, MemoryError):
    """STS's own work (the forecast, a re-check) ran out of memory: its own settings are what to lower. Not a
    ``RuntimeError``, so that a batch-size finder (``auto_find_batch_size``) does not retry training on it."""


class ForecastSkipped(Exception):
    """Raised by a forecast that the data cannot give (a reward with no signal yet): not a failure. The run goes
    on without a forecast, and the reason is kept in its folder for the report."""


class STSNegativeTransferWarning(UserWarning):
    """A protected domain is forecast or measured to be harmed (``warnings.filterwarnings("error", category=...)``
    turns it into an error)."""


class STSDataWarning(UserWarning):
    """A result is still computed, but part of it means less than usual (the message names what and why)."""


def first_line(err: BaseException) -> str:
    """An error's first line (its type's name when it has no message): for a one-line message that names it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
