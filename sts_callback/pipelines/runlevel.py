"""The run-level term (issue 13, item 2): before training, a signed estimate of how much each target domain's
held-out mean-token NLL will change, from the run's own optimizer and training data.

Two features, each with its cost in seconds:

- :func:`lookahead`: ``steps`` real optimizer steps (the run's optimizer class and hyper-parameters, the
  learning rate at the schedule's peak, the run's batches) on the run's trainable parameters (LoRA adapters
  or every weight), each domain's held-out NLL measured before and after, then parameters, buffers,
  gradients, optimizer state (step counts included) and the torch / CUDA / ``random`` / numpy RNG states
  restored bit-exactly (task-affinity lookahead, Fifty et al. 2021).
- a *compressed run* (``estimate_run_level(method="compressed")``): the same lookahead with every group's rate
  raised by ``RunLevelConfig.lr_factor`` so that its few steps hold the whole run's learning-rate area (a quarter
  of the run's steps at a constant rate: on the 11-source benchmark, the step-0 forecast that orders the other
  domains' final changes best; ``benchmarks/transfer/proxy.py``). It costs those steps before training.
- :func:`first_order`: ``dL_d ~ <grad L_d, delta>``, ``delta`` the update the optimizer would make in
  ``steps`` steps from the training batches' mean gradient held fixed (Adam: ``-lr * g / (|g| + eps)`` per
  step, as LESS preconditions gradients; SGD: ``-lr * g``; any ``torch.optim`` optimizer is simulated on a
  copy of each parameter). No parameter of the model changes.

Both return the relative change ``(after - before) / before`` of each domain (:class:`RunLevelEstimate`).

Inputs, shared by a ``transformers`` callback at ``on_train_begin`` (the Trainer creates its optimizer
before calling it) and by a benchmark that builds its own model and optimizer:

- ``model``: the model being trained (a DDP / DeepSpeed / ``torch.compile`` wrapper is looked through; PEFT
  models are used as they are, so only their adapters train).
- ``optimizer``: the run's optimizer (a ``torch.optim`` optimizer, also inside accelerate's wrapper, or a
  DeepSpeed ZeRO-1/2 optimizer, whose base optimizer class and hyper-parameters are used on a temporary
  copy), or a factory ``params -> optimizer``.
- ``batches``: this process's training micro-batches (dicts with ``input_ids``, ``attention_mask``,
  ``labels``; -100 labels are not trained on), ``accumulation`` of them per optimizer step;
  :func:`training_batches` draws them from a dataset and a collator the same way on every process count.
- ``targets``: domain -> held-out sequences ``(ids, counted flags for the last len(flags) ids)``, the same
  full lists on every process (as ``Monitor.loss_sets``); each process measures its shard.

From a ``TrainerCallback.on_train_begin(args, state, control, model=None, optimizer=None, train_dataloader=None,
...)`` (``model`` and ``optimizer`` are the Trainer's; never iterate ``train_dataloader`` itself, accelerate
tracks its iterations)::

    settings = RunLevelConfig(steps=k, accumulation=args.gradient_accumulation_steps,
                              max_grad_norm=args.max_grad_norm, pad=pad_id)
    batches = training_batches(train_dataloader.dataset, train_dataloader.collate_fn,
                               args.per_device_train_batch_size, k * settings.accumulation, seed=args.seed)
    estimate = lookahead(model, optimizer, batches, monitor.loss_sets, settings, autocast=self._autocast(),
                         before=self.base_losses)   # or first_order(...), without before=

Under ``torch.distributed`` gradients, token counts and NLL sums are summed over processes, so 1 and N
processes holding the same global batches give the same numbers. Parameters sharded by DeepSpeed ZeRO-3 or
FSDP cannot be stepped and put back exactly here: :func:`lookahead` refuses them; :func:`first_order` runs
under ZeRO-3 (each parameter gathered once for its update; gradients of the trainable parameters are held
whole on every process), not under FSDP.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.capture import input_vocabulary, parameters_are_sharded, token_beyond_vocabulary
from ..core.config import plain_numbers, settings_from_dict
from ..core.distributed import LocalFailure, rank, shard, sum_across_ranks, warn_on_main, world_size
from ..core.errors import STSConfigError, STSDataWarning, STSInputError, STSUsageError
from ..core.extract import batches_by_length, local_sequences
from ..core.data import TokenSequence
from ..core.heldout import HEAD_CHUNK, head_nll, split_head
from ..core.torch_utils import rng_state, set_rng_state
from ..scoring.calibration import RUN_LEVEL_METHODS
from .monitor import nll_sums

OptimizerLike = Any  # torch.optim.Optimizer, an accelerate / DeepSpeed wrapper, or a factory params -> optimizer

__all__ = ["RunLevelConfig", "RunLevelEstimate", "lookahead", "first_order", "estimate_run_level", "training_batches",
           "measure_losses", "not_trained_on", "compressed_lr_factor"]
OWN = "<the training data>"  # the loss set of the training data's own texts, beside the target domains


@dataclass
class RunLevelConfig:
    """How :func:`lookahead` and :func:`first_order` step and measure; checked when built.

    Args:
        steps: optimizer steps taken (lookahead) or simulated (first order); issue 13: at most 5% of the run's
            steps counts as step 0.
        accumulation: micro-batches per optimizer step (the Trainer's gradient accumulation).
        lr: the learning rate of every group; ``None``: each group's scheduler base rate (the schedule's peak).
        lr_factor: each group's rate (``lr`` or its peak) times this: a compressed run's ``area / (steps * peak)``,
            its steps holding the whole schedule's learning-rate area.
        max_grad_norm: clip each step's gradient as the run does (the Trainer's ``max_grad_norm``; ``None`` or
            0: no clipping).
        pad: padding id of the held-out batches; ``None``: the model config's ``pad_token_id``, else 0.
        batch_size: held-out sequences per forward.
    """

    steps: int = 3
    accumulation: int = 1
    lr: float | None = None
    lr_factor: float = 1.0
    max_grad_norm: float | None = None
    pad: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("steps", "accumulation", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise STSConfigError(f"RunLevelConfig.{name}={value!r} must be a positive integer; set {name}=1 or "
                                     "more.")
        for name, positive, default in (("lr", True, "the schedule's peak"), ("max_grad_norm", False, "no clipping")):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                kind = "positive" if positive else "non-negative"
                raise STSConfigError(f"RunLevelConfig.{name}={value!r} must be a {kind} number, or None ({default}).")
            setattr(self, name, float(value))
        if (isinstance(self.lr_factor, bool) or not isinstance(self.lr_factor, numbers.Real)
                or not math.isfinite(self.lr_factor) or self.lr_factor <= 0):
            raise STSConfigError(f"RunLevelConfig.lr_factor={self.lr_factor!r} must be a positive number (1: each "
                                 "group's own rate).")
        self.lr_factor = float(self.lr_factor)
        if self.pad is not None:
            if isinstance(self.pad, bool) or not isinstance(self.pad, numbers.Integral) or self.pad < 0:
                raise STSConfigError(f"RunLevelConfig.pad={self.pad!r} must be a token id (an integer >= 0), or None "
                                     "(the model's pad_token_id).")
            self.pad = int(self.pad)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RunLevelConfig:
        return settings_from_dict(cls, values, "run-level setting(s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunLevelEstimate:
    """One run-level feature: per target domain, the relative change of its held-out mean-token NLL.

    Attributes:
        method: ``"lookahead"`` (measured after real steps), ``"compressed"`` (a lookahead whose steps hold the
            whole run's learning-rate area) or ``"first_order"`` (predicted, no step taken).
        change: domain -> ``(after - before) / before`` (lookahead) or ``<grad L_d, delta> / L_d`` (first order).
        loss_before: domain -> held-out mean-token NLL before.
        loss_change: domain -> absolute change (``after - before``, or the predicted ``dL_d``).
        steps: optimizer steps taken (lookahead) or simulated (first order).
        learning_rates: the learning rate of each parameter group used (the schedule's peak, times
            ``lr_factor``).
        train_tokens: trained (label) tokens of the batches used, over all processes.
        seconds: wall time of the whole call.
        timings: its parts (``before`` / ``steps`` / ``after``; ``train_gradient`` / ``update`` / ``domains``)
            and ``step_seconds`` (lookahead: one optimizer step on one batch, the training-step cost here).
        own_change: the same relative change on texts of the training data itself (``None`` when not measured):
            how hard the run moves its own domain, which sets the level of a level + pattern calibration.
        own_tokens: the counted tokens ``own_change`` was measured on.
        run_share: ``steps`` over the run's steps, where the caller knew them (a compressed run's scale).
        batches: where the training batches came from, where a Trainer's run gave them: ``"run"`` (the run's own
            first micro-batches) or ``"draw"`` (a seeded draw of its training set); ``None``: the caller's.
    """

    method: str
    change: dict[str, float]
    loss_before: dict[str, float]
    loss_change: dict[str, float]
    steps: int
    learning_rates: list[float]
    train_tokens: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    own_change: float | None = None
    own_tokens: int | None = None
    run_share: float | None = None
    batches: str | None = None

    @property
    def mean_change(self) -> float:
        """The run-level term: mean relative change over the domains."""
        return sum(self.change.values()) / len(self.change) if self.change else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_change"] = self.mean_change
        return out


# --------------------------------------------------------------------------- model and optimizer
def _inner_model(model: nn.Module) -> nn.Module:
    """Look through DDP / DeepSpeed engines / torch.compile (their forward must not run here); keep PEFT."""
    current = model
    for _ in range(10):
        name = type(current).__name__
        if name in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine") or (
                name == "OptimizedModule"):
            current = getattr(current, "module", None) or getattr(current, "_orig_mod")
            continue
        return current
    return current


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _constructor_kwargs(cls: type, group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters that ``cls(...)`` accepts (``params`` and scheduler keys dropped)."""
    try:
        accepted = set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        accepted = set()
    return {k: v for k, v in group.items() if k != "params" and k in accepted}


@dataclass
class _Optimizer:
    """What the run's optimizer means here: its class, its groups of this model's trainable parameters with
    their hyper-parameters, and (for a plain torch optimizer) the object itself, stepped and then restored."""

    cls: type
    groups: list[tuple[list[nn.Parameter], dict[str, Any]]]
    own: torch.optim.Optimizer | None  # the run's optimizer, to step in place; None: build a temporary one
    state: Mapping[Any, dict[str, Any]]
    zero3: Any = None  # DeepSpeed ZeRO-3's parameter offload (releases what a backward outside the engine left)

    def after_backward(self) -> None:
        """ZeRO-3: a backward run outside the engine leaves parameters gathered (the embedding's post-backward
        hook never fires on integer inputs); release them all, as the engine does at the end of a step."""
        if self.zero3 is not None:
            self.zero3.partition_all_parameters()

    def build(self, lr: Sequence[float]) -> torch.optim.Optimizer:
        groups = [{"params": params, **_constructor_kwargs(self.cls, hp), "lr": group_lr}
                  for (params, hp), group_lr in zip(self.groups, lr)]
        try:
            return self.cls(groups)
        except TypeError as err:
            raise STSConfigError(f"Cannot build a {self.cls.__name__} from the run's parameter groups ({err}); "
                                 "pass optimizer= a factory params -> optimizer.") from err


def _resolve_optimizer(optimizer: OptimizerLike, model: nn.Module, what: str) -> _Optimizer:
    trainable = _trainable(model)
    if not trainable:
        raise STSInputError(f"{what}: the model has no trainable parameter (requires_grad); nothing would change.")
    if optimizer is None:
        raise STSConfigError(f"{what} needs the run's optimizer (or a factory params -> optimizer); got None. In a "
                             "transformers callback, on_train_begin receives optimizer= (the Trainer creates it "
                             "before training starts).")
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        built = optimizer(trainable)
        if not isinstance(built, torch.optim.Optimizer):
            raise STSConfigError(f"{what}: the optimizer factory returned {type(built).__name__}, not a "
                                 "torch.optim.Optimizer.")
        optimizer = built
    for _ in range(5):  # accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper
        if type(optimizer).__module__.startswith("accelerate") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
    wanted = {id(p) for p in trainable}
    module = type(optimizer).__module__
    if module.startswith("deepspeed"):
        base = getattr(optimizer, "optimizer", None)
        model_groups = next((getattr(optimizer, name) for name in ("bit16_groups", "bf16_groups", "fp16_groups")
                             if isinstance(getattr(optimizer, name, None), list)), None)
        if not isinstance(base, torch.optim.Optimizer) or model_groups is None:
            raise STSConfigError(f"{what}: unsupported DeepSpeed optimizer {type(optimizer).__name__}; pass "
                                 "optimizer= a factory params -> torch optimizer with the run's hyper-parameters.")
        groups = [([p for p in params if id(p) in wanted], dict(hp))
                  for params, hp in zip(model_groups, base.param_groups)]
        return _Optimizer(type(base), [g for g in groups if g[0]], None, {},
                          getattr(optimizer, "parameter_offload", None))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise STSConfigError(f"{what}: {type(optimizer).__name__} is not a torch.optim.Optimizer; pass the run's "
                             "optimizer or a factory params -> optimizer.")
    groups = [([p for p in g["params"] if id(p) in wanted], {k: v for k, v in g.items() if k != "params"})
              for g in optimizer.param_groups]
    groups = [g for g in groups if g[0]]
    if not groups:
        raise STSInputError(f"{what}: none of the model's trainable parameters is in the optimizer; pass the "
                            "optimizer of this model.")
    return _Optimizer(type(optimizer), groups, optimizer, optimizer.state)


def _is_zero3(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's shape; under ZeRO-3 the shape of the whole (partitioned) tensor."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


@contextmanager
def _gathered(p: nn.Parameter):
    """The whole parameter for the duration (ZeRO-3: gathered on every process, read-only; a collective)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield p
    else:
        yield p


def _peak_lrs(resolved: _Optimizer, lr: float | None, factor: float = 1.0) -> list[float]:
    """Each group's learning rate at the schedule's peak: ``lr`` when given, else the scheduler's base rate
    (``initial_lr``: the peak of warm-up / cosine / linear schedules) or the group's current rate; times
    ``factor``."""
    out = []
    for _, hp in resolved.groups:
        value = lr if lr is not None else hp.get("initial_lr", hp.get("lr"))
        if value is None:
            raise STSConfigError("The optimizer's parameter groups hold no learning rate; set RunLevelConfig(lr=...).")
        out.append(float(value) * factor)
    return out


# --------------------------------------------------------------------------- save / restore
def _clone_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


@contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer | None, parameters: bool = True):
    """Everything a lookahead touches comes back bit-exactly on exit: trainable parameters, buffers, their
    ``.grad``, train / eval flags, the optimizer's state, parameter groups and plain attributes, RNG states."""
    rng = rng_state()
    modes = {m: m.training for m in model.modules()}
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
              for p in _trainable(model)] if parameters else []
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if parameters else []
    opt_state = groups = attrs = None
    if optimizer is not None:
        opt_state = {p: {k: _clone_value(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        groups = [{k: _clone_value(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        attrs = {k: v for k, v in vars(optimizer).items() if isinstance(v, (bool, int, float, str, type(None)))}
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value, grad in params:
                p.copy_(value)
                p.grad = grad
            for b, value in buffers:
                b.copy_(value)
        for m, flag in modes.items():
            m.training = flag
        if optimizer is not None:
            optimizer.state.clear()
            optimizer.state.update(opt_state)
            for g, saved in zip(optimizer.param_groups, groups):
                for k in [k for k in g if k != "params" and k not in saved]:
                    del g[k]
                g.update(saved)
            for k in [k for k, v in vars(optimizer).items()
                      if k not in attrs and isinstance(v, (bool, int, float, str, type(None)))]:
                delattr(optimizer, k)
            for k, v in attrs.items():
                setattr(optimizer, k, v)
        set_rng_state(rng)


# --------------------------------------------------------------------------- losses
def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def _pad_id(model: nn.Module, pad: int | None) -> int:
    if pad is not None:
        return int(pad)
    config = getattr(model, "config", None)
    value = getattr(config, "pad_token_id", None) if config is not None else None
    return int(value) if isinstance(value, int) else 0


def _check_targets(targets: Mapping[str, Sequence[TokenSequence]], model: nn.Module) -> None:
    """Every process holds every target: a bad one is refused on all of them, before any collective."""
    if not targets:
        raise STSInputError("No target domain given: pass targets={name: held-out sequences}.")
    for name, sequences in targets.items():
        if len(sequences) == 0:
            raise STSInputError(f"Target domain {name!r} has no held-out sequence.")
    vocabulary = input_vocabulary(model)
    top = max((max(ids, default=0) for sequences in targets.values() for ids, _ in sequences), default=0)
    if vocabulary is not None and top >= vocabulary:
        raise token_beyond_vocabulary(int(top), vocabulary)


def measure_losses(model: nn.Module, targets: Mapping[str, Sequence[TokenSequence]], *, pad: int | None = None,
                   batch_size: int = 4, autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """Held-out mean-token NLL of each domain (eval mode, no grad; each process its shard, summed). An error on
    one process is raised on every one (:class:`LocalFailure`), not left to hang the others in the sum."""
    model = _inner_model(model)
    _check_targets(targets, model)
    pad_id = _pad_id(model, pad)
    sums = torch.zeros(len(targets), 2, dtype=torch.float64)
    was = {m: m.training for m in model.modules()}
    failed = LocalFailure.around_forwards(model)
    model.eval()
    try:
        with torch.no_grad(), (autocast() if autocast else nullcontext()):
            for i, everyone in enumerate(targets.values()):
                part = shard(len(everyone), [len(ids) for ids, _ in everyone])
                if not failed.skip:
                    with failed:
                        total, count = nll_sums(model, local_sequences(list(everyone), part), pad_id, batch_size)
                        sums[i] = torch.tensor([total, count], dtype=torch.float64)
    finally:
        for m, flag in was.items():
            m.training = flag
    failed.sum_across_ranks(sums)
    out = {}
    for i, name in enumerate(targets):
        if sums[i, 1] == 0:
            raise STSInputError(f"Target domain {name!r} has no counted token in its held-out sequences.")
        out[name] = float(sums[i, 0] / sums[i, 1])
    return out


def _token_nll(model: nn.Module, inputs: Mapping[str, Any], keep: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """NLL (with its graph) of ``targets`` (the next tokens, [batch, length - 1]) at the ``keep`` positions, the
    model run on ``inputs`` (its forward's keyword arguments): the LM head runs only there, in chunks, where the
    body and head can be run apart (as ``monitor.nll_sums``)."""
    split = split_head(model)
    if split is not None:
        body, head, softcap = split
        hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        wanted = targets[keep]
        if not len(wanted):
            return hidden.sum() * 0.0
        return torch.cat([head_nll(head, softcap, h, t) for h, t in zip(hidden.split(HEAD_CHUNK),
                                                                        wanted.split(HEAD_CHUNK))])
    logits = model(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")


def _train_nll(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed token NLL as a graph, trained token count) of one training micro-batch, the model given every
    key of the batch but the labels, as the trainer gives it (a padding-free or packed batch's ``position_ids``
    and sequence boundaries keep its examples apart)."""
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in batch.items() if key not in ("labels", "use_cache")}
    ids = inputs["input_ids"] = torch.as_tensor(batch["input_ids"]).to(device)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = inputs["attention_mask"] = torch.as_tensor(mask).to(device)
    labels = batch.get("labels")
    if labels is not None:
        labels = torch.as_tensor(labels).to(device)
    else:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    targets = labels[:, 1:]
    keep = targets != -100
    return _token_nll(model, inputs, keep, targets.clamp(min=0)).sum(), int(keep.sum())


def _take(batches: Iterable[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The first ``n`` batches (an iterable shorter than ``n`` is iterated again from its start)."""
    out: list[Mapping[str, Any]] = []
    iterator: Iterator = iter(batches)
    while len(out) < n:
        try:
            out.append(next(iterator))
        except StopIteration:
            if not out or iterator is batches:
                raise STSInputError(f"{n} training batches are needed and the iterable gave {len(out)}; pass a "
                                    "list or a re-iterable (a DataLoader) of batches.") from None
            iterator = iter(batches)
    return out


@contextmanager
def _non_reentrant_checkpointing(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing through ``torch.autograd.grad``: a model's reentrant checkpointing (transformers'
    ``use_reentrant=True``, common in recipes) gives no gradient to the parameters inside its blocks there (only
    ``.backward()`` reaches them), so its blocks checkpoint non-reentrantly meanwhile, with the same arguments
    otherwise: the same gradient, the same memory. Not on sharded weights (ZeRO-3 / FSDP, where TRL keeps it
    reentrant because a non-reentrant recomputation meets re-partitioned parameters): there the gradient that
    reaches nothing is an error (:func:`_mean_gradient`)."""
    from torch.utils.checkpoint import checkpoint

    if parameters_are_sharded(model):
        yield
        return
    swapped = []
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(func, "func", None) is checkpoint and func.keywords.get("use_reentrant", True):
            swapped.append((module, func))
            module._gradient_checkpointing_func = functools.partial(checkpoint, *func.args,
                                                                    **{**func.keywords, "use_reentrant": False})
    try:
        yield
    finally:
        for module, func in swapped:
            module._gradient_checkpointing_func = func


def _mean_gradient(model: nn.Module, params: list[nn.Parameter], micro_batches: Sequence[Mapping[str, Any]],
                   autocast, after_backward: Callable[[], None] = lambda: None) -> tuple[list[torch.Tensor], int]:
    """The token-weighted mean gradient of the training NLL over ``micro_batches`` of every process (train
    mode, as the run trains). ``torch.autograd.grad``: no ``.grad`` is written and no DDP / DeepSpeed gradient
    hook fires. A gradient that reaches no trainable parameter is an error, never a zero update."""
    device = _device(model)
    # summed in float32 at least: a bf16 / fp16 sum over micro-batches and processes would lose the low bits
    grads = [torch.zeros(_full_shape(p), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
             for p in params]
    tokens = 0
    reached = torch.zeros(1)
    failed = LocalFailure.around_forwards(model)  # one process's error raised on every one, none left waiting
    model.train()
    with _non_reentrant_checkpointing(model):
        for batch in micro_batches:
            if failed.skip:
                continue
            with failed:
                with autocast() if autocast else nullcontext():
                    nll, count = _train_nll(model, batch, device)
                parts = torch.autograd.grad(nll, params, allow_unused=True)
                after_backward()
                for total, part in zip(grads, parts):
                    if part is not None:
                        total.add_(part.to(total.dtype))
                        reached[0] = 1
                tokens += count
                del nll, parts
    failed.sum_across_ranks(reached)
    if not reached.item():
        raise STSUsageError("The run-level term's training gradient reached none of the trainable parameters: a "
                            "gradient checkpointing that only .backward() goes through (use_reentrant=True under "
                            "DeepSpeed ZeRO-3 / FSDP, or a checkpointing function of the user's own) would read as "
                            "no change. Run the term without that checkpointing, or without run_level.")
    for g in grads:
        sum_across_ranks(g)
    count = torch.tensor([float(tokens)], dtype=torch.float64)
    sum_across_ranks(count)
    total_tokens = int(count.item())
    if total_tokens == 0:
        raise STSInputError("The training batches hold no trained token (every label is -100).")
    for g in grads:
        g.div_(total_tokens)
    return grads, total_tokens


def _clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> None:
    """In place, as ``torch.nn.utils.clip_grad_norm_`` (the Trainer's ``max_grad_norm``)."""
    if not max_grad_norm or max_grad_norm <= 0:
        return
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    coefficient = float(max_grad_norm) / (float(norm) + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g.mul_(coefficient)


# --------------------------------------------------------------------------- the two features
def lookahead(model: nn.Module, optimizer: OptimizerLike, batches: Iterable[Mapping[str, Any]],
              targets: Mapping[str, Sequence[TokenSequence]], config: RunLevelConfig | dict | None = None, *,
              autocast: Callable[[], Any] | None = None,
              before: Mapping[str, float] | None = None) -> RunLevelEstimate:
    """Take ``steps`` real optimizer steps, measure each domain's held-out NLL change, put everything back.

    Args:
        model: the model being trained; only its trainable parameters move.
        optimizer: the run's optimizer (stepped, then its state restored) or a factory ``params -> optimizer``;
            a DeepSpeed ZeRO-1/2 optimizer is replaced by a temporary one of its base class and groups.
        batches: this process's training micro-batches; ``steps * accumulation`` are used.
        targets: domain -> held-out sequences (ids, counted flags), the same on every process.
        config: :class:`RunLevelConfig` (or a dict of its fields): ``steps``, ``accumulation``, ``lr``,
            ``max_grad_norm``, ``pad``, ``batch_size``; ``None``: the defaults (3 steps, no accumulation).
        autocast: the run's autocast factory (``None``: none).
        before: the held-out losses already measured on these targets (skips that pass).

    Raises:
        STSConfigError: under DeepSpeed ZeRO-3 / FSDP (sharded parameters cannot be restored exactly).
    """
    start = time.perf_counter()
    config = config if isinstance(config, RunLevelConfig) else RunLevelConfig.from_dict(config)
    steps, accumulation, lr, max_grad_norm = config.steps, config.accumulation, config.lr, config.max_grad_norm
    pad, batch_size = config.pad, config.batch_size
    inner = _inner_model(model)
    _check_targets(targets, inner)
    resolved = _resolve_optimizer(optimizer, inner, "lookahead")
    if parameters_are_sharded(inner):
        raise STSConfigError(
            "lookahead() cannot run under DeepSpeed ZeRO-3 or FSDP: the parameters and optimizer state are "
            "sharded across processes, so the steps cannot be undone bit-exactly here. Use "
            "sts_callback.pipelines.runlevel.first_order(...) instead (no parameter changes), or run the lookahead under "
            "DDP / ZeRO-2 / one process.")
    micro = _take(batches, steps * accumulation)
    lrs = _peak_lrs(resolved, lr, config.lr_factor)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    loss_before = dict(before) if before is not None else measure_losses(inner, targets, pad=pad,
                                                                         batch_size=batch_size, autocast=autocast)
    if set(loss_before) != set(targets):
        raise STSInputError(f"before= has domains {sorted(loss_before)}, targets has {sorted(targets)}.")
    timings["before"] = time.perf_counter() - t
    tokens = 0
    with _restored(inner, resolved.own):
        stepper = resolved.own if resolved.own is not None else resolved.build(lrs)
        if resolved.own is not None:
            for group, group_lr in zip(stepper.param_groups, _group_lrs(stepper, resolved, lrs)):
                group["lr"] = group_lr
        params = [p for group, _ in resolved.groups for p in group]
        t = time.perf_counter()
        for step in range(steps):
            grads, count = _mean_gradient(inner, params, micro[step * accumulation:(step + 1) * accumulation],
                                          autocast)
            tokens += count
            _clip(grads, max_grad_norm)
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            stepper.step()
            for p in params:
                p.grad = None
            del grads
        timings["steps"] = time.perf_counter() - t
        timings["step_seconds"] = timings["steps"] / steps
        t = time.perf_counter()
        after = measure_losses(inner, targets, pad=pad, batch_size=batch_size, autocast=autocast)
        timings["after"] = time.perf_counter() - t
        del stepper
    change = {d: (after[d] - loss_before[d]) / loss_before[d] for d in targets}
    return RunLevelEstimate("lookahead", change, {d: loss_before[d] for d in targets},
                            {d: after[d] - loss_before[d] for d in targets}, steps, lrs, tokens,
                            time.perf_counter() - start, timings)


def _group_lrs(optimizer: torch.optim.Optimizer, resolved: _Optimizer, lrs: list[float]) -> list[float]:
    """The peak rate of each of the optimizer's own groups (groups without trainable parameters keep theirs)."""
    by_param = {id(p): group_lr for (params, _), group_lr in zip(resolved.groups, lrs) for p in params}
    out = []
    for group in optimizer.param_groups:
        match = next((by_param[id(p)] for p in group["params"] if id(p) in by_param), None)
        out.append(group["lr"] if match is None else match)
    return out


# torch.optim classes whose update of an element depends on that element alone: a parameter can be simulated
# in slices (bounded float64 memory for a 170M-entry embedding)
ELEMENTWISE = {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop"}
SLICE = 1 << 22  # elements per slice (32 MiB per float64 tensor)


def _update(resolved: _Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor], lrs: list[float],
            steps: int) -> list[torch.Tensor]:
    """``delta`` of each parameter after ``steps`` steps of the run's optimizer with the gradient held at
    ``grads``: the optimizer class itself runs on a float64 copy of one parameter at a time (from the run's
    optimizer state of that parameter, if any), so Adam, AdamW, SGD, ... are reproduced exactly."""
    group_of = {id(p): (hp, group_lr) for (group, hp), group_lr in zip(resolved.groups, lrs) for p in group}
    sliceable = resolved.cls.__module__.startswith("torch.optim") and resolved.cls.__name__ in ELEMENTWISE
    deltas = []
    for p, g in zip(params, grads):
        hp, group_lr = group_of[id(p)]
        kwargs = {**_constructor_kwargs(resolved.cls, hp), "lr": group_lr}
        kwargs.pop("fused", None)  # fused kernels want the parameter's own dtype / device
        state = resolved.state[p] if p in resolved.state else {}
        delta = torch.empty_like(g)
        with _gathered(p):
            value = p.detach()
            n = value.numel()
            pieces = [(0, n)] if not sliceable or n <= SLICE else [(i, min(i + SLICE, n)) for i in range(0, n, SLICE)]
            for lo, hi in pieces:
                whole = (lo, hi) == (0, n)

                def part(t: torch.Tensor) -> torch.Tensor:
                    return t.detach().double().clone() if whole else t.detach().reshape(-1)[lo:hi].double().clone()

                start = part(value)  # float64: delta is a small difference of two large numbers
                shadow = start.clone()
                try:
                    opt = resolved.cls([{"params": [shadow], **kwargs}])
                except TypeError as err:
                    raise STSConfigError(f"Cannot build a {resolved.cls.__name__} for the first-order update ({err}); "
                                         "pass optimizer= a factory params -> optimizer.") from err
                if state:
                    opt.state[shadow] = {k: part(v) if torch.is_tensor(v) and v.shape == p.shape and
                                         v.is_floating_point() else _clone_value(v) for k, v in state.items()}
                grad = part(g)
                for _ in range(steps):
                    shadow.grad = grad
                    opt.step()
                delta.view(-1)[lo:hi] = (shadow - start).reshape(-1).to(g.dtype)
                del opt, shadow, start, grad
        deltas.append(delta)
    return deltas


def first_order(model: nn.Module, optimizer: OptimizerLike, batches: Iterable[Mapping[str, Any]],
                targets: Mapping[str, Sequence[TokenSequence]], config: RunLevelConfig | dict | None = None, *,
                autocast: Callable[[], Any] | None = None) -> RunLevelEstimate:
    """Predict each domain's relative held-out NLL change after ``steps`` steps: ``<grad L_d, delta> / L_d``.

    ``delta`` is what the run's optimizer does in ``steps`` steps with the mean gradient of all the
    ``steps * accumulation`` training micro-batches held fixed (clipped to ``max_grad_norm`` like a step).
    No parameter, optimizer state or RNG state changes (the RNG is restored after the train-mode forwards).
    Arguments as in :func:`lookahead`.
    """
    start = time.perf_counter()
    config = config if isinstance(config, RunLevelConfig) else RunLevelConfig.from_dict(config)
    steps, accumulation, lr, max_grad_norm = config.steps, config.accumulation, config.lr, config.max_grad_norm
    pad, batch_size = config.pad, config.batch_size
    inner = _inner_model(model)
    _check_targets(targets, inner)
    resolved = _resolve_optimizer(optimizer, inner, "first_order")
    if parameters_are_sharded(inner) and not _is_zero3(inner):
        raise STSConfigError(
            "first_order() does not support FSDP-sharded parameters yet; run the estimate under DDP, DeepSpeed "
            "ZeRO-2/3 or in one process before the sharded run.")
    if _is_zero3(inner) and resolved.zero3 is None:
        raise STSConfigError("first_order() under DeepSpeed ZeRO-3 needs the run's DeepSpeed optimizer (the "
                             "Trainer's optimizer=), not a factory.")
    micro = _take(batches, steps * accumulation)
    lrs = _peak_lrs(resolved, lr)
    params = [p for group, _ in resolved.groups for p in group]
    pad_id = _pad_id(inner, pad)
    timings: dict[str, float] = {}
    device = _device(inner)
    with _restored(inner, None, parameters=False):  # RNG (dropout) and modes; parameters are only read
        t = time.perf_counter()
        grads, tokens = _mean_gradient(inner, params, micro, autocast, resolved.after_backward)
        _clip(grads, max_grad_norm)
        timings["train_gradient"] = time.perf_counter() - t
        t = time.perf_counter()
        deltas = _update(resolved, params, grads, lrs, steps)
        del grads
        timings["update"] = time.perf_counter() - t
        t = time.perf_counter()
        sums = torch.zeros(len(targets), 3, dtype=torch.float64)  # NLL sum, token count, <grad NLL sum, delta>
        failed = LocalFailure.around_forwards(inner)
        inner.eval()
        for i, everyone in enumerate(targets.values()):
            part = shard(len(everyone), [len(ids) for ids, _ in everyone])
            local = local_sequences(list(everyone), part)
            for batch in batches_by_length([len(ids) for ids, _ in local], batch_size):
                if failed.skip:
                    continue
                with failed:
                    sums[i] += _held_out_term(inner, [local[j] for j in batch], pad_id, device, params, deltas,
                                              resolved.after_backward, autocast)
        timings["domains"] = time.perf_counter() - t
    failed.sum_across_ranks(sums)
    change, before, delta_loss = {}, {}, {}
    for i, name in enumerate(targets):
        if sums[i, 1] == 0:
            raise STSInputError(f"Target domain {name!r} has no counted token in its held-out sequences.")
        before[name] = float(sums[i, 0] / sums[i, 1])
        delta_loss[name] = float(sums[i, 2] / sums[i, 1])
        change[name] = float(sums[i, 2] / sums[i, 0])
    return RunLevelEstimate("first_order", change, before, delta_loss, steps, lrs, tokens,
                            time.perf_counter() - start, timings)


def _held_out_term(model: nn.Module, sequences: Sequence[TokenSequence], pad: int, device: torch.device,
                   params: list[nn.Parameter], deltas: list[torch.Tensor], after_backward: Callable[[], None],
                   autocast: Callable[[], Any] | None) -> torch.Tensor:
    """(NLL sum, token count, <grad of the NLL sum, the update>) of one batch of held-out sequences."""
    with autocast() if autocast else nullcontext():
        total, count = _held_out_nll(model, sequences, pad, device)
    dot = torch.zeros((), dtype=torch.float64)
    if total.requires_grad:
        parts = torch.autograd.grad(total, params, allow_unused=True)
        after_backward()
        for part, delta in zip(parts, deltas):
            if part is not None:
                dot += (part.double() * delta.double()).sum().cpu()
    return torch.stack([total.detach().double().cpu(), torch.tensor(float(count), dtype=torch.float64), dot])


def estimate_run_level(model: nn.Module, optimizer: OptimizerLike, batches: Iterable[Mapping[str, Any]],
                       targets: Mapping[str, Sequence[TokenSequence]], config: RunLevelConfig | dict | None = None,
                       *, method: str = "lookahead", own: Sequence[TokenSequence] | None = None,
                       before: Mapping[str, float] | None = None,
                       autocast: Callable[[], Any] | None = None) -> RunLevelEstimate:
    """The run-level term as a training loop wants it (the callback's, or any loop's through
    ``STSSession.start(..., run_level=lambda model, base: estimate_run_level(model, ..., before=base))``):
    :func:`lookahead` (``"lookahead"``; ``"compressed"``: the same, its rates raised by ``config.lr_factor``,
    :func:`compressed_lr_factor`) or :func:`first_order` (``method``) on ``targets``, and with ``own`` (sequences of the
    training data) the training data's own change as ``own_change``, the level a ``lookahead_own`` calibration
    reads; ``targets`` may be empty then (only the own change measured: a few steps' worth). A lookahead on
    sharded weights (ZeRO-3 / FSDP) falls back to first order, with a warning. ``before``: the targets' base
    losses already measured (a lookahead skips that pass; extra domains are ignored)."""
    if method not in RUN_LEVEL_METHODS:
        raise STSConfigError(f"method={method!r}: use one of {RUN_LEVEL_METHODS}.")
    if not targets and not own:
        raise STSInputError("Nothing to measure: give target domains, or own= (the training data's sequences).")
    if method == "compressed" and parameters_are_sharded(_inner_model(model)):
        raise STSConfigError(  # a first-order estimate is not what a compressed run's calibration reads
            "The compressed run (run_level='compressed') cannot run on weights sharded by DeepSpeed ZeRO-3 / FSDP: "
            "they cannot be put back exactly. Train under DDP or ZeRO-2 with it, or use run_level='first_order'.")
    if method == "lookahead" and parameters_are_sharded(_inner_model(model)):
        warn_on_main("STS run-level term: the weights are sharded (DeepSpeed ZeRO-3 / FSDP) and cannot be stepped "
                     "and put back exactly; using the first-order estimate instead.", STSDataWarning, stacklevel=2)
        method = "first_order"
    config = config if isinstance(config, RunLevelConfig) else RunLevelConfig.from_dict(config)
    measured = {**targets, OWN: list(own)} if own else dict(targets)
    if method in ("lookahead", "compressed"):
        known = None
        if before is not None:
            known = {name: before[name] for name in targets}
            if own:
                known.update(measure_losses(model, {OWN: measured[OWN]}, pad=config.pad,
                                            batch_size=config.batch_size, autocast=autocast))
        estimate = lookahead(model, optimizer, batches, measured, config, autocast=autocast, before=known)
        estimate.method = method
    else:
        estimate = first_order(model, optimizer, batches, measured, config, autocast=autocast)
    if own:
        estimate.own_change = estimate.change.pop(OWN)
        estimate.own_tokens = sum(sum(flags) for _, flags in measured[OWN])
        estimate.loss_before.pop(OWN), estimate.loss_change.pop(OWN)
    return estimate


def compressed_lr_factor(learning_rates: Sequence[float], steps: int, base_rate: float | None = None) -> float:
    """``RunLevelConfig.lr_factor`` of a compressed run: ``steps`` steps at a constant rate holding the whole
    schedule's learning-rate area (``learning_rates``: every step's rate, as ``core.schedule`` plans them), relative
    to ``base_rate``, the rate the factor multiplies: the optimizer's base rate (its first group's ``initial_lr``,
    what the lookahead's groups start from; default: the schedule's peak, the same for a schedule that reaches its
    base rate, not for a warm-up longer than the run or a LambdaLR whose multiplier stays below 1)."""
    rates = [float(r) for r in learning_rates]
    if not rates or max(rates) <= 0 or steps < 1:
        raise STSConfigError("A compressed run needs the run's learning-rate schedule (a positive rate at some step) "
                             f"and at least one step; got {len(rates)} rate(s), peak {max(rates, default=0.0)}, "
                             f"{steps} step(s). Use run_level='lookahead' for a run at a rate of 0.")
    base = max(rates) if base_rate is None else float(base_rate)
    if not math.isfinite(base) or base <= 0:
        raise STSConfigError(f"A compressed run's rates are a factor of the optimizer's base learning rate; got "
                             f"{base_rate!r}. Give the optimizer a positive learning rate.")
    return sum(rates) / (steps * base)


def _held_out_nll(model: nn.Module, sequences: Sequence[TokenSequence], pad: int,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed NLL (with its graph) and count of the counted tokens, as ``monitor.nll_sums`` computes them."""
    longest = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    counted = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, (seq, flags) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        counted[row, len(seq) - len(flags): len(seq)] = torch.tensor(flags, dtype=torch.bool)
    ids, mask = ids.to(device), mask.to(device)
    keep = counted[:, 1:].to(device)
    return _token_nll(model, {"input_ids": ids, "attention_mask": mask}, keep, ids[:, 1:]).sum(), int(keep.sum())


# --------------------------------------------------------------------------- data
def not_trained_on(sequences: Sequence[TokenSequence], batches: Iterable[Mapping[str, Any]],
                   n: int = 8) -> list[TokenSequence]:
    """The ``sequences`` that are not among the training examples of ``batches`` (every process's): a sequence
    counts as trained on when most of its ``n``-token windows occur in some batch row, so texts cut or tokenized
    with other special tokens still match. The training data's own change after a lookahead is then measured on
    texts the steps did not see, as held-out texts of the same data (how the benchmark fitted the level)."""
    seen: set[tuple[int, ...]] = set()
    rows: list[list[int]] = []
    for batch in batches:
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        for row, keep in zip(ids.tolist(), mask.tolist()):
            rows.append([t for t, k in zip(row, keep) if k])
            seen.update(tuple(rows[-1][i:i + n]) for i in range(max(len(rows[-1]) - n + 1, 0)))

    def trained(ids: list[int]) -> bool:
        if len(ids) < n:  # too short for a window: a contiguous part of some row
            return bool(ids) and any(row[i:i + len(ids)] == ids for row in rows for i in range(len(row)))
        windows = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        return sum(w in seen for w in windows) > len(windows) / 2

    return [sequence for sequence in sequences if not trained(list(sequence[0]))]


def training_batches(dataset: Sequence[Any], collate_fn: Callable[[list[Any]], Mapping[str, Any]],
                     batch_size: int, count: int, *, seed: int = 0, rank_: int | None = None,
                     world: int | None = None) -> list[Mapping[str, Any]]:
    """This process's ``count`` training micro-batches of ``batch_size`` examples each, drawn without touching
    any global RNG or the Trainer's dataloader: a seeded order of the examples is cut into global batches of
    ``batch_size * world_size`` and process ``r`` takes the examples ``r, r + world, ...`` of each, so one
    process with batch 4 and two with batch 2 train on the same examples.

    From a Trainer: ``training_batches(trainer.train_dataset, trainer.data_collator,
    args.per_device_train_batch_size, steps * args.gradient_accumulation_steps, seed=args.seed)``.
    """
    if len(dataset) == 0:
        raise STSInputError("The training dataset is empty.")
    world = world_size() if world is None else world
    me = rank() if rank_ is None else rank_
    needed = count * batch_size * world
    rng = random.Random(f"runlevel:{seed}")
    order: list[int] = []
    while len(order) < needed:
        epoch = list(range(len(dataset)))
        rng.shuffle(epoch)
        order += epoch
    out = []
    for b in range(count):
        chunk = order[b * batch_size * world:(b + 1) * batch_size * world]
        out.append(collate_fn([dataset[i] for i in chunk[me::world]]))
    return out
