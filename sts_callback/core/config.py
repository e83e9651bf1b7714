"""Every knob of a forecast in one JSON-serializable dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import STSConfigError

SCORE_VARIANTS = ("sts_icl", "sts_act", "sts_sq", "raw_icl", "raw_act", "raw_sq")


def recheck_variant(ranking: str | None, compute_icl: bool = True) -> str:
    """The score re-checks rank by for a forecast ranked by ``ranking``: re-checks score the SAE's latents only, so a
    raw residual-dimension variant is read as its SAE counterpart (``raw_sq`` -> ``sts_sq``); without the in-context
    pass, STS_act."""
    variant = (ranking or "sts_act").replace("raw_", "sts_", 1)
    return "sts_act" if variant == "sts_icl" and not compute_icl else variant


SIGNED_VARIANTS = ("signed_usage", "forgetting_minus_transfer", "decoder_projection")  # signed.py
# The signed feature calibrations and the callback's online refit use unless told otherwise: chosen on the
# transfer benchmark (README, "Which way will a domain move?").
DEFAULT_SIGNED = "forgetting_minus_transfer"
# The in-context NLL change of each target domain with training demonstrations before it (forecast.in_context_loss):
# a forecast score computed when asked, or when a calibration reads it (with its fitted budget, else this one).
ICL_LOSS_FEATURE = "icl_loss_change"
DEFAULT_ICL_LOSS_TOKENS = 384
ICL_LOSS_SETTINGS = ("n_demonstrations", "max_query_tokens", "max_demonstration_tokens")  # they set its scale
MIN_BUDGET_TOKENS = 16  # the fewest tokens of a shift or a domain the forecast reads (one short query)


@dataclass
class STSConfig:
    """Settings of an STS forecast (defaults follow the paper, see the README, "What is computed").

    Args:
        layer: decoder block whose output (``resid_post``) the SAE reads. ``None``: taken from the
            SAE's hook name.
        n_shifted: N, the number of most-shifted latents that define the transfer set D_N.
        shift_tokens: query-token budget for estimating the shift from the training data.
        domain_tokens: token budget per target domain.
        n_demonstrations: in-context demonstrations drawn from the training data per query.
        n_domain_demonstrations: demonstrations drawn from the target domain itself for STS_icl.
        compute_icl: compute STS_icl (one extra forward with context per domain text).
        max_query_tokens: a query (or domain text) longer than this is cut to its first tokens.
        max_demonstration_tokens: one demonstration longer than this is cut to its first tokens.
        max_length: longest sequence fed to the model; ``None``: the model's maximum (capped at 4096).
            Longer contexts lose demonstration tokens from the left, never query tokens.
        batch_size: sequences per forward pass.
        exclude_special_tokens: drop BOS / EOS / chat-template special tokens from the statistics.
        chat_fallback: for chat data and a tokenizer without a chat template, join turns as
            ``role: content`` lines instead of raising an error.
        truncate_forward: stop the forward after the hooked layer when parameters are not sharded.
        seed: seed of every sampling step (queries, demonstrations, domain texts).
        top_contexts: top-activating contexts kept per shifted latent and source (0: none), from a
            bounded reservoir filled during extraction (no second pass). Which latents are shifted is known only
            after the pass, so the reservoir holds this many for *every* latent: about 20 x top_contexts x d_sae
            bytes per source, and time with it (a 65k-latent SAE: 6.5 MB at 5, 0.65 GB and ~10x the forecast's time
            at 500).
        ranking: the score variant tables are ranked by.
        sae_dtype: dtype the SAE is cast to ("float32", "bfloat16", "float16"); ``None`` keeps it.
        device: device for the model inputs and the SAE ("cpu", "cuda:1", a ``torch.device``); a name torch
            cannot read, or a backend this torch is built without, is refused here. ``None``: the model's device.
        icl_loss_tokens: query tokens per target domain for ``icl_loss_change``, each domain's relative NLL change
            when ``n_demonstrations`` training examples precede its texts (full forwards with the LM head; no
            SAE). ``None``: computed only when the calibration reads it, with the budget it was fitted with
            (384 for the built-in); ``0``: never (a calibration reading it is refused); a number: always, with
            that many tokens.
        rollout_prompts: RL forecasts (pipelines/rollouts.py): training prompts sampled for rollouts.
        rollout_generations: completions sampled per prompt, at most (the trainer's ``num_generations``
            when smaller); at least 2, since the high / low split is relative to the prompt's group.
        rollout_max_tokens: longest completion sampled, in tokens (the trainer's ``max_completion_length``
            when smaller).
    """

    layer: int | None = None
    n_shifted: int = 100
    shift_tokens: int = 20_000
    domain_tokens: int = 10_000
    n_demonstrations: int = 2
    n_domain_demonstrations: int = 5
    compute_icl: bool = True
    max_query_tokens: int = 256
    max_demonstration_tokens: int = 384
    max_length: int | None = None
    batch_size: int = 8
    exclude_special_tokens: bool = True
    chat_fallback: bool = False
    truncate_forward: bool = True
    seed: int = 0
    top_contexts: int = 5
    ranking: str = "sts_icl"
    sae_dtype: str | None = None
    device: str | None = None
    icl_loss_tokens: int | None = None
    rollout_prompts: int = 16
    rollout_generations: int = 8
    rollout_max_tokens: int = 256

    def __post_init__(self) -> None:
        plain_numbers(self)

        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise STSConfigError(
                    f"STSConfig.{name} must be an integer >= {minimum}, got {value!r}; "
                    f"set {name}={minimum} or more."
                )

        if self.layer is not None:
            positive("layer", 0)
        for name in ("shift_tokens", "domain_tokens"):  # below it the forecast would blame the data, at train start
            positive(name, MIN_BUDGET_TOKENS)
        for name in ("n_shifted", "n_demonstrations", "max_query_tokens", "max_demonstration_tokens", "batch_size",
                     "rollout_prompts", "rollout_max_tokens"):
            positive(name)
        positive("rollout_generations", 2)
        positive("n_domain_demonstrations", 0)
        positive("top_contexts", 0)
        if self.icl_loss_tokens is not None:
            positive("icl_loss_tokens", 0)
            if 0 < self.icl_loss_tokens < MIN_BUDGET_TOKENS:
                raise STSConfigError(f"STSConfig.icl_loss_tokens={self.icl_loss_tokens} is below one short query "
                                     f"({MIN_BUDGET_TOKENS} tokens); set 0 (never), None (when a calibration "
                                     f"reads it) or {DEFAULT_ICL_LOSS_TOKENS}.")
        if self.compute_icl and self.n_domain_demonstrations == 0:
            raise STSConfigError(
                "STSConfig.n_domain_demonstrations is 0 but compute_icl=True: STS_icl needs "
                "demonstrations from each domain; set n_domain_demonstrations>=1 or compute_icl=False."
            )
        if self.max_length is not None:
            positive("max_length", 8)
            if self.max_length <= self.max_query_tokens:
                raise STSConfigError(
                    f"STSConfig.max_length={self.max_length} leaves no room for demonstrations before a "
                    f"query of up to max_query_tokens={self.max_query_tokens} tokens; raise max_length "
                    "or lower max_query_tokens."
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise STSConfigError(f"STSConfig.seed must be an integer, got {self.seed!r}.")
        if self.ranking not in SCORE_VARIANTS:
            raise STSConfigError(
                f"STSConfig.ranking={self.ranking!r} is not a score variant; use one of {SCORE_VARIANTS}."
            )
        if self.ranking in ("sts_icl", "raw_icl") and not self.compute_icl:
            raise STSConfigError(
                f"STSConfig.ranking={self.ranking!r} needs compute_icl=True; set compute_icl=True or "
                "ranking='sts_act'."
            )
        if self.sae_dtype not in (None, "float32", "bfloat16", "float16"):
            raise STSConfigError(
                f"STSConfig.sae_dtype={self.sae_dtype!r}: use None, 'float32', 'bfloat16' or 'float16'."
            )
        for name in ("compute_icl", "exclude_special_tokens", "chat_fallback", "truncate_forward"):
            if not isinstance(getattr(self, name), bool):
                raise STSConfigError(f"STSConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.device is not None:
            import torch

            if isinstance(self.device, torch.device):  # kept as its name: the settings are written as JSON
                self.device = str(self.device)
            problem = device_problem(self.device)
            if problem:  # now, not as a raw torch error once the forecast runs
                raise STSConfigError(f"STSConfig.device={self.device!r}: {problem}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "STSConfig":
        return settings_from_dict(cls, values, "STSConfig field(s)", "valid fields are")

    def replace(self, **changes: Any) -> "STSConfig":
        return dataclasses.replace(self, **changes)


def device_problem(value: Any, available: bool = False) -> str | None:
    """Why ``value`` cannot be the device a model runs on, with the fix, or None when it can.

    Always checked: the name parses (``torch.device``) and this torch is built for it. ``available=True`` also
    asks the machine (a GPU visible, the index among them); that can initialise CUDA, so only the CLI does it,
    right before it loads the model."""
    if not isinstance(value, str):
        return f"give a device name such as 'cpu', 'cuda', 'cuda:1' or 'mps', not {type(value).__name__}."
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):  # torch's message lists every backend it knows: too long for one line
        return "not a device name torch reads; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps' (lower case)."
    if device.type == "meta":
        return "the meta device holds no weights; use 'cpu' or a GPU."
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            return f"this torch ({torch.__version__}) is built without CUDA; use 'cpu' or install a CUDA build."
        if available:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                return "no CUDA GPU is visible here (check CUDA_VISIBLE_DEVICES and the driver); use 'cpu'."
            if device.index is not None and device.index >= count:
                return f"only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}); pick one of them."
    elif device.type == "mps":
        if not torch.backends.mps.is_built() or available and not torch.backends.mps.is_available():
            return "MPS (Apple GPU) is not available here; use 'cpu'."
    elif available and device.type != "cpu":
        is_available = getattr(getattr(torch, device.type, None), "is_available", None)
        if callable(is_available) and not is_available():
            return f"no {device.type} device is available here; use 'cpu'."
    return None


def settings_from_dict(cls: Any, values: dict[str, Any] | None, what: str, valid: str = "valid:") -> Any:
    """``cls(**values)`` for a settings dataclass, an unknown key named with the valid ones (a config file's typo
    must not run with defaults)."""
    import difflib

    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        hints = [f"Did you mean {close[0]!r} (not {key!r})?" for key in unknown
                 for close in [difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)] if close]
        listed = f"{valid[0].upper() + valid[1:] if hints else valid} {sorted(known)}"
        raise STSConfigError(f"Unknown {what} {unknown}{'. ' + ' '.join(hints) + ' ' if hints else '; '}{listed}.")
    return cls(**values)


def plain_numbers(settings: Any) -> None:
    """A settings dataclass's numpy (or torch) scalars and arrays as Python numbers and lists, in place: a value
    from ``np.arange`` or a sweep's array is a number to the user, and the checks and JSON need plain ones."""
    def plain(value: Any) -> Any:
        return value.tolist() if hasattr(value, "dtype") and hasattr(value, "tolist") else value

    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, (list, tuple)):
            setattr(settings, f.name, type(value)(plain(v) for v in value))
        else:
            setattr(settings, f.name, plain(value))


def json_serializable(value: Any) -> bool:
    """Whether ``value`` can be written to JSON as is (settings files, exported callback state)."""
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
