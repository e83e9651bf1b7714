"""Forecasts for online RL (GRPO and kin): the model's own rollouts, scored by the trainer's reward functions.

RL has no gold answers to use as demonstrations, and the method's paper reports that its forecast built from plain
demonstrations fails for RL. Here the demonstrations come from the policy itself: for a seeded sample of training
prompts the model samples ``num_generations`` completions with the trainer's generation settings, the trainer's
reward functions score them, and the rewards are normalised per prompt as GRPO does (advantage = reward minus the
group mean, over the group's standard deviation). Two forecasts follow:

- **reward-filtered demonstrations**: the completions above their group's mean (:meth:`Rollouts.demonstrations`)
  serve as ``demonstrations=`` of the usual in-context forecast;
- **reward-weighted shift** (``settings["shift"] == "reward_weighted"``): per prompt, the advantage-weighted mean
  latents of the high-reward completions minus those of the low-reward ones (the direction GRPO's gradient pushes
  the policy), paired over prompts as the chosen-vs-rejected shift is (preference.py).

Sampling is seeded per prompt (the completions of a prompt do not depend on the batch or the number of processes),
prompts are split across ranks and the scored rollouts gathered, so that every rank holds the same rollouts.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..core.config import STSConfig
from ..core.data import Corpus, PromptBuilder, is_messages, load_corpus, load_domains, text_tokenizer
from ..core.distributed import LocalFailure, gather_objects, is_main_process, shard, warn_on_main
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.torch_utils import model_device
from .forecast import (Forecast, ForecastRun, ForecastSetup, inference_mode, prepare_forecast, prompt_builder,
                       run_forecast)
from .preference import ContrastUnit, DatasetRows, completion_sequence, contrast_forecast, raw_records

# the callback's names; "demonstrations" is this function's earlier name for "reward_filtered"
ROLLOUT_SHIFTS = ("reward_filtered", "reward_weighted", "demonstrations")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class RolloutSettings:
    """How the trainer samples and scores completions, with TRL ``GRPOConfig``'s field names and defaults.
    ``num_generations`` and ``max_completion_length`` are capped by ``STSConfig.rollout_generations`` and
    ``rollout_max_tokens``."""

    num_generations: int = 8
    max_completion_length: int | None = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reward_weights: list[float] | None = None
    scale_rewards: str = "group"
    multi_objective_aggregation: str = "sum_then_normalize"
    mask_truncated_completions: bool = False  # a completion cut at max_completion_length is left out of the loss

    def __post_init__(self) -> None:
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)  # as TRL
        for name in ("generation_kwargs", "chat_template_kwargs"):  # GRPOConfig accepts them as JSON strings
            if isinstance(getattr(self, name), str):
                setattr(self, name, json.loads(getattr(self, name)))
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise STSConfigError(f"num_generations={self.num_generations!r}: GRPO compares the completions of a "
                                 "prompt with each other, so it needs at least 2 per prompt.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise STSConfigError(f"max_completion_length={self.max_completion_length!r} must be >= 1 (or None).")
        if not self.temperature > 0:
            raise STSConfigError(f"temperature={self.temperature!r} must be > 0 (rollouts are sampled).")
        if self.scale_rewards not in SCALE_REWARDS:
            raise STSConfigError(f"scale_rewards={self.scale_rewards!r}: use one of {SCALE_REWARDS} (or True/False).")
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise STSConfigError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}: use one of "
                                 f"{AGGREGATIONS}.")

    @classmethod
    def from_args(cls, args: Any) -> "RolloutSettings":
        """From a TRL ``GRPOConfig`` (e.g. ``trainer.args``; an ``OnlineDPOConfig``'s ``max_new_tokens`` too), a
        dict, or any object with those attribute names; what it lacks keeps the default."""
        if isinstance(args, cls):
            return args
        names = [f.name for f in fields(cls)]
        if isinstance(args, dict):
            unknown = sorted(set(args) - set(names))
            if unknown:
                raise STSConfigError(f"Unknown rollout setting(s) {unknown}; valid: {names}.")
            return cls(**args)
        values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
        if "max_completion_length" not in values and getattr(args, "max_new_tokens", None) is not None:
            values["max_completion_length"] = args.max_new_tokens  # OnlineDPOConfig's name for it
        if "scale_rewards" not in values and isinstance(getattr(args, "normalize_advantages", None), bool):
            # RLOOConfig: leave-one-out advantages, unscaled unless normalised over the generation batch
            values["scale_rewards"] = "batch" if args.normalize_advantages else "none"
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reward_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def reward_func_list(reward_funcs: Any) -> list[Any]:
    """One reward function or a list of them, as a list (as GRPOTrainer takes them)."""
    return list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]


def is_reward_model(func: Any) -> bool:
    """A reward model (a module, or a model id TRL loads) rather than a function STS can call."""
    return isinstance(func, (nn.Module, str))


class RewardModelFunction:
    """A reward model (a sequence-classification model and its tokenizer, as GRPOTrainer holds them in
    ``reward_funcs`` and ``reward_processing_classes``) called as a reward function, scoring as GRPOTrainer does:
    prompt and completion joined (a conversation through the reward tokenizer's chat template), tokenized with
    right padding and no special tokens added, the first logit of each row."""

    def __init__(self, model: nn.Module, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.__name__ = str(name).rstrip("/").split("/")[-1]  # TRL's name for it in its logs

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        if prompts and is_messages(prompts[0]):
            from trl.data_utils import apply_chat_template

            texts = [apply_chat_template({"messages": p + c}, self.tokenizer, **self.chat_template_kwargs)["text"]
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False).to(model_device(self.model))
        with torch.inference_mode():
            return self.model(**inputs).logits[:, 0].float().tolist()


def check_reward_funcs(reward_funcs: Any) -> list[Callable]:
    """The trainer's reward functions as a list of plain callables; reward models are refused with what to do."""
    funcs = reward_func_list(reward_funcs)
    if not funcs or any(f is None for f in funcs):
        raise STSInputError("No reward function given: pass the trainer's reward functions (GRPOTrainer's "
                            "reward_funcs), each called as reward_func(prompts=..., completions=..., "
                            "completion_ids=..., **dataset_columns) -> list[float | None].")
    for i, func in enumerate(funcs):
        if is_reward_model(func):
            what = f"the model id {func!r}" if isinstance(func, str) else f"a {type(func).__name__} model"
            raise STSInputError(
                f"Reward function {i} is {what}: the STS rollout forecast calls plain reward functions only. Wrap the "
                "reward model in a function that scores the texts itself (def reward(prompts, completions, **kw): "
                "... return [float(score) for score in ...]) and pass that, or give the forecast demonstrations= "
                "(e.g. high-reward completions you have) instead of rollouts.")
        if not callable(func):
            raise STSInputError(f"Reward function {i} is a {type(func).__name__}, not callable; pass functions "
                                "reward_func(prompts=..., completions=..., completion_ids=..., **columns).")
    return funcs


def _not_scored(completions: list[Any], **kwargs: Any) -> list[None]:
    """The reward of a draw that needs the completions only: none."""
    return [None] * len(completions)


_not_scored.__name__ = "not scored"


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


_reward_loop: asyncio.AbstractEventLoop | None = None


def reward_event_loop() -> asyncio.AbstractEventLoop:
    """STS's one event loop for async reward functions, running in a daemon thread for the process's life (as
    GRPOTrainer's ``async_loop``): a reward that keeps a loop-bound resource between calls (an HTTP client, a
    semaphore) meets the same loop at every call, which a fresh ``asyncio.run`` per call broke."""
    global _reward_loop
    if _reward_loop is None or _reward_loop.is_closed():
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="STS-reward-loop", daemon=True).start()
        _reward_loop = loop
    return _reward_loop


def _call_reward(func: Callable, index: int, kwargs: dict[str, Any], n: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> list[float | None]:
    name = _reward_name(func)
    try:
        out = func(**kwargs)
        if inspect.isawaitable(out):  # an async reward function (TRL runs those too): on one long-lived loop
            async def wait():
                return await out

            out = asyncio.run_coroutine_threadsafe(wait(), loop or reward_event_loop()).result()
    except Exception as err:  # noqa: BLE001 - named with what STS passed, the user's own error chained
        columns = sorted(k for k in kwargs if k not in TRL_REWARD_ARGUMENTS)
        raise STSInputError(
            f"Reward function {index} ({name!r}) raised {type(err).__name__}: {err}, when STS scored its rollouts "
            f"with it. STS calls it as GRPOTrainer does: prompts, completions, completion_ids, trainer_state, "
            f"log_extra, log_metric, and the prompts' other columns: {columns or 'none'}. If it needs a column the "
            "prompts STS sampled lack, give prompts (or the callback's train_probe) as records with that column, "
            "e.g. the trainer's train_dataset.") from err
    try:
        values = list(out)
    except TypeError:
        raise STSInputError(f"Reward function {index} ({name!r}) returned a {type(out).__name__}; it must return a "
                            "list with one float (or None) per completion.") from None
    if len(values) != n:
        raise STSInputError(f"Reward function {index} ({name!r}) returned {len(values)} rewards for {n} completions; "
                            "it must return one per completion.")
    rewards: list[float | None] = []
    for value in values:
        if value is None:
            rewards.append(None)
            continue
        try:
            rewards.append(float(value))
        except (TypeError, ValueError):
            raise STSInputError(f"Reward function {index} ({name!r}) returned {value!r}; rewards must be numbers "
                                "or None.") from None
    return rewards


# what GRPOTrainer passes every reward function besides the dataset's columns
TRL_REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def score_completions(reward_funcs: Sequence[Callable], prompts: list[Any], completions: list[Any],
                      completion_ids: list[list[int]], columns: dict[str, list[Any]],
                      trainer_state: Any = None,
                      async_loop: asyncio.AbstractEventLoop | None = None) -> list[list[float | None]]:
    """``[completion][function]`` rewards, each function called as TRL's GRPOTrainer calls it: ``prompts``,
    ``completions``, ``completion_ids``, the dataset's other columns (one entry per completion), ``trainer_state``,
    and no-op ``log_extra`` / ``log_metric``; an async one awaited on ``async_loop`` (the trainer's, where it has
    one) or :func:`reward_event_loop`."""
    kwargs = {**columns, "trainer_state": trainer_state, "log_extra": _noop, "log_metric": _noop,
              "prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    per_func = [_call_reward(func, i, kwargs, len(completions), async_loop) for i, func in enumerate(reward_funcs)]
    return [list(row) for row in zip(*per_func)]


def _nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation over the non-NaN values with Bessel's correction (NaN below 2 values), as TRL's."""
    dims = dim if dim is not None else tuple(range(values.dim()))
    mean = torch.nanmean(values, dim=dims, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dims, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, scale_rewards: str = "group",
                     aggregation: str = "sum_then_normalize") -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's rewards and advantages, as TRL computes them. ``rewards_per_func``: [prompts, generations,
    functions] (NaN where a function returned None). Returns (rewards [prompts, generations], NaN for a completion
    no function scored; advantages, 0 for those)."""
    groups, generations, _ = rewards_per_func.shape
    flat = rewards_per_func.reshape(groups * generations, -1).double()
    weights = weights.double()
    unscorable = torch.isnan(flat).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (flat * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        grouped = rewards.view(groups, generations)
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        if scale_rewards == "batch":
            std = _nanstd(rewards).expand(groups, 1)
        else:
            std = _nanstd(grouped, dim=1, keepdim=True)
        advantages = grouped - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:  # normalize_then_sum (GDPO): each function normalised within the group, then weighted, then batch-normalised
        grouped = flat.view(groups, generations, -1)
        normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            _nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalised.reshape(groups * generations, -1) * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        advantages = ((rewards - torch.nanmean(rewards)) / (_nanstd(rewards) + 1e-4)).view(groups, generations)
        rewards = (flat * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
    return rewards.view(groups, generations), torch.nan_to_num(advantages, nan=0.0)


def _both_sides(advantages: torch.Tensor) -> torch.Tensor:
    """Per prompt: a completion above its group's mean and one below (what separates high from low reward)."""
    return (advantages > 0).any(dim=1) & (advantages < 0).any(dim=1)


@dataclass
class RolloutGroup:
    """One prompt's sampled completions and their rewards (``rewards[generation][function]``, None: not scored)."""

    index: int  # of the prompt in the given prompts
    prompt: Any  # a string or chat messages, as given
    columns: dict[str, Any]  # the prompt record's other columns
    prompt_ids: list[int]
    completions: list[Any]  # as the reward functions saw them: strings, or [{"role": "assistant", ...}]
    completion_ids: list[list[int]]
    rewards: list[list[float | None]]
    truncated: list[bool] = field(default_factory=list)  # cut at the length limit before an EOS


@dataclass
class Rollouts:
    """Scored rollouts, the same on every rank; ``rewards`` / ``advantages`` as GRPO computes them, [prompts,
    generations]."""

    groups: list[RolloutGroup]
    reward_names: list[str]
    reward_weights: list[float]
    settings: dict[str, Any]
    rewards: torch.Tensor = field(init=False)
    advantages: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise STSInputError("No rollouts to score: give at least one prompt.")
        per_func = torch.tensor([[[math.nan if r is None else r for r in row] for row in g.rewards]
                                 for g in self.groups], dtype=torch.float64)
        self.rewards, self.advantages = group_advantages(
            per_func, torch.tensor(self.reward_weights, dtype=torch.float64),
            self.settings.get("scale_rewards", "group"),
            self.settings.get("multi_objective_aggregation", "sum_then_normalize"))

    @property
    def num_generations(self) -> int:
        return len(self.groups[0].completions)

    @property
    def trained_advantages(self) -> torch.Tensor:
        """The advantages the loss applies: 0 for a completion cut at the trainer's length limit when the trainer
        masks those (``mask_truncated_completions``); the group's statistics still count it, as in TRL."""
        if not self.settings.get("mask_truncated_completions"):
            return self.advantages
        cut = torch.tensor([[bool(t) for t in g.truncated] if g.truncated else [False] * len(g.completions)
                            for g in self.groups], dtype=torch.bool)
        return self.advantages.masked_fill(cut, 0.0)

    def signal(self) -> torch.Tensor:
        """Which prompts' trained completions differ in reward (a completion above the group's mean and one
        below)."""
        return _both_sides(self.trained_advantages)

    def check_signal(self, use: str, one_sided: bool = False) -> None:
        """Raise when no prompt's rewards separate its completions: nothing to select or weight by. ``one_sided``:
        a trained completion above its group's mean suffices (demonstrations need no low side)."""
        if bool(self.signal().any()) or (one_sided and bool((self.trained_advantages > 0).any())):
            return
        if bool(_both_sides(self.advantages).any()):  # they do, before the trainer's mask
            cut = sum(sum(bool(t) for t in g.truncated) for g in self.groups)
            raise STSInputError(
                f"The rewards separate completions, but {cut} of the {self.rewards.numel()} sampled were cut at "
                "max_completion_length before an EOS, and the trainer leaves those out of its loss "
                "(mask_truncated_completions=True): no group keeps the trained completions that "
                f"{use} needs (one above its group's mean{'' if one_sided else ' and one below'}). Raise "
                "max_completion_length.")
        scored = self.rewards[~torch.isnan(self.rewards)]
        n = self.rewards.numel()
        if scored.numel() == 0:
            raise STSInputError(
                f"Every reward function returned None (or NaN) for all {n} sampled completions, so there are no "
                "rewards to "
                f"build {use} from. Check the reward functions on the rollouts (Rollouts.groups) and the dataset "
                "columns they expect.")
        values = sorted({round(float(v), 6) for v in scored})[:5]
        raise STSInputError(
            f"The rewards carry no signal: within every prompt's group the scored completions all got the same reward "
            f"(or only one was scored; values seen: {values}), so no completion is above its group's mean and there "
            f"is nothing to build {use} from; "
            "GRPO itself gets zero advantage from such groups. Raise the temperature, STSConfig.rollout_generations "
            "or rollout_max_tokens, sample more prompts (rollout_prompts), or check the reward functions.")

    def demonstrations(self, top_fraction: float | None = None) -> list[dict[str, Any]]:
        """The completions above their group's mean reward (positive advantage), as ``{"prompt", "completion"}``
        records for ``demonstrations=``; ``top_fraction`` keeps at most that share of each group (the best ones)."""
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise STSConfigError(f"top_fraction={top_fraction!r} must be in (0, 1].")
        self.check_signal("demonstrations", one_sided=True)  # the cut ones below the mean may be masked
        trained = self.trained_advantages
        records = []
        for g, group in enumerate(self.groups):
            order = sorted(range(len(group.completions)), key=lambda j: (-float(trained[g, j]), j))
            best = set(order[: math.ceil(top_fraction * len(order))] if top_fraction is not None else order)
            records += [{"prompt": group.prompt, "completion": completion} for j, completion in
                        enumerate(group.completions) if j in best and float(trained[g, j]) > 0]
        return records

    def contrast_units(self, builder: PromptBuilder) -> list[ContrastUnit]:
        """One unit per prompt whose rewards separate its completions: each completion after its prompt, weighted
        by its advantage (the high side and the low side each averaged with their weights)."""
        self.check_signal("a reward-weighted shift")
        units = []
        trained, signal = self.trained_advantages, self.signal()
        for g, group in enumerate(self.groups):
            if bool(signal[g]):
                units.append(ContrastUnit([completion_sequence(builder, group.prompt_ids, ids)
                                           for ids in group.completion_ids], trained[g].tolist()))
        return units

    def summary(self) -> dict[str, Any]:
        """Counts and reward statistics (JSON-serializable; recorded in the forecast's settings)."""
        scored = self.rewards[~torch.isnan(self.rewards)]
        signal = self.signal()
        return {
            "prompts": len(self.groups), "num_generations": self.num_generations,
            "completions": int(self.rewards.numel()), "unscorable": int(torch.isnan(self.rewards).sum()),
            "completion_tokens": sum(len(ids) for g in self.groups for ids in g.completion_ids),
            "reward_mean": float(scored.mean()) if scored.numel() else None,
            "reward_std": float(_nanstd(scored)) if scored.numel() > 1 else None,
            "frac_reward_zero_std": 1.0 - float(signal.double().mean()),
            "above_mean": int((self.advantages > 0).sum()),
            "reward_funcs": list(self.reward_names), "reward_weights": list(self.reward_weights),
            **{k: v for k, v in self.settings.items() if k not in ("generation_kwargs", "chat_template_kwargs")},
        }


def prompt_record(item: Any, index: int, name: str = "prompts") -> dict[str, Any]:
    """One training prompt as a record ``{"prompt": ..., **other columns}``."""
    if isinstance(item, str) or is_messages(item):
        return {"prompt": item}
    if isinstance(item, dict) and (isinstance(item.get("prompt"), str) or is_messages(item.get("prompt"))):
        return dict(item)
    if isinstance(item, dict) and is_messages(item.get("messages")):  # a chat (GKD): its turns before the answer
        turns = item["messages"]
        prompt = turns[:-1] if len(turns) > 1 and turns[-1].get("role") == "assistant" else turns
        return {"prompt": prompt, **{k: v for k, v in item.items() if k != "messages"}}
    keys = sorted(item) if isinstance(item, dict) else type(item).__name__
    raise STSInputError(f"Prompt {index} of {name} is {keys}; each must be a string, chat messages, or a record "
                        "with 'prompt' (a string or chat messages) as GRPOTrainer's dataset has, or with "
                        "'messages' (the turns before the last assistant turn are the prompt).")


class PromptRecords(DatasetRows):
    """Training prompts as records (:func:`prompt_record`), each converted (and checked) when first indexed: the
    rollouts read the prompts they draw, not the whole dataset."""

    def __init__(self, items: Sequence[Any], name: str):
        super().__init__(items, lambda data, index: prompt_record(data[index], index, name))


def prompt_records(prompts: Any, name: str = "prompts") -> PromptRecords:
    """Training prompts as records ``{"prompt": ..., **other columns}`` (strings, chat messages, TRL prompt
    records, a ``datasets.Dataset``), read as they are drawn (:class:`PromptRecords`); ``list(...)`` reads all."""
    if isinstance(prompts, PromptRecords):  # a re-check's probe passes the records it drew from before
        return prompts
    prompts = raw_records(prompts, name)
    if len(prompts) == 0:
        raise STSInputError(f"No {name} given: the rollout forecast needs training prompts to sample completions for.")
    return PromptRecords(prompts, name)


def _generation_model(model: nn.Module) -> nn.Module:
    """Strip data-parallel wrappers (they have no ``generate``); PEFT wrappers stay (their adapters generate)."""
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel") \
            and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "generate"):
        raise STSInputError(f"{type(model).__name__} has no generate(); pass the causal language model itself.")
    return model


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's generation config's and the tokenizer's EOS (as TRL)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def _prompt_ids(builder: PromptBuilder, prompt: Any, settings: RolloutSettings, name: str) -> list[int]:
    """The prompt's ids as GRPOTrainer feeds them to generate: chat prompts through the chat template with the
    generation prompt, text prompts tokenized with the tokenizer's special tokens."""
    tokenizer = builder.tokenizer
    if is_messages(prompt):
        builder.check_chat(name)
        if builder.has_chat_template:
            text = builder.apply_template(prompt, add_generation_prompt=True, **(settings.chat_template_kwargs or {}))
            return builder.encode_text(text)
        return builder.prefix + builder.encode_text(builder.render_chat(prompt) + "assistant: ")
    return list(tokenizer(prompt)["input_ids"])


def trainer_completion_length(settings: RolloutSettings) -> int | None:
    """The trainer's longest completion: its ``generation_kwargs``' ``max_new_tokens`` wins over
    ``max_completion_length``, as in GRPOTrainer (``None``: no limit)."""
    return (settings.generation_kwargs or {}).get("max_new_tokens") or settings.max_completion_length


def completion_budget(settings: RolloutSettings, config: STSConfig) -> int:
    """The longest completion sampled: the trainer's, capped by ``config.rollout_max_tokens``."""
    wanted = trainer_completion_length(settings)
    return min(wanted or config.rollout_max_tokens, config.rollout_max_tokens)


def draw_prompts(count: int, config: STSConfig, draw: str | None = None, prompts: int | None = None) -> list[int]:
    """Indices of prompts among ``count``, seeded: the forecast's draw of ``config.rollout_prompts`` (``draw=None``),
    or a named draw (e.g. ``"recheck:100"``) of ``prompts`` fresh ones, outside the forecast's draw (from all
    prompts when too few remain)."""
    if draw is None:
        return random.Random(f"{config.seed}:rollouts").sample(range(count), min(config.rollout_prompts, count))
    wanted = min(prompts or config.rollout_prompts, count)
    forecast = set(draw_prompts(count, config))
    pool = [i for i in range(count) if i not in forecast]
    if len(pool) < wanted:
        pool = list(range(count))
    return random.Random(f"{config.seed}:rollouts:{draw}").sample(pool, wanted)


def _seed_of(seed: int, index: int) -> int:
    return random.Random(f"{seed}:rollout:{index}").getrandbits(63)


def _generate_group(model: nn.Module, prompt_ids: list[int], generations: int, generation_config, eos: list[int],
                    seed: int, device: torch.device) -> list[list[int]]:
    """``generations`` completions of one prompt, sampled under a private RNG seeded for this prompt (the global
    RNG state is restored), each cut after its first EOS (kept, as TRL keeps it)."""
    ids = torch.tensor([prompt_ids] * generations, dtype=torch.long, device=device)
    # every GPU's state: manual_seed reseeds them all (a model spread over several by device_map included)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config)
    completions = []
    for row in out[:, len(prompt_ids):].tolist():
        end = next((k for k, token in enumerate(row) if token in eos), None)
        completions.append(row[: end + 1] if end is not None else row)
    return completions


def sample_rollouts(model: nn.Module, tokenizer, prompts: Any, reward_funcs: Any,
                    config: STSConfig | dict | None = None, settings: Any = None, *, trainer_state: Any = None,
                    progress: bool = False, builder: PromptBuilder | None = None,
                    prompt_indices: Sequence[int] | None = None, score: bool = True,
                    desc: str = "STS rollouts", async_loop: asyncio.AbstractEventLoop | None = None) -> Rollouts:
    """Sample and score rollouts of the model for a seeded sample of training prompts, as GRPO would.

    Args:
        model: the policy (plain, PEFT- or DDP-wrapped); put in eval mode without gradients for the duration, its
            training mode restored after.
        tokenizer: its tokenizer (chat template for chat prompts).
        prompts: training prompts: strings, chat messages, or records with ``prompt`` and other columns (passed to
            the reward functions as lists, as GRPOTrainer does), or a ``datasets.Dataset``.
        reward_funcs: a callable or list of callables ``reward_func(prompts=..., completions=..., completion_ids=...,
            **columns) -> list[float | None]`` (TRL's signature; async functions too). Reward models are refused.
        config: :class:`STSConfig`: ``rollout_prompts`` prompts, ``min(num_generations, rollout_generations)``
            completions each, of at most ``min(max_completion_length, rollout_max_tokens)`` tokens; ``seed``.
        settings: :class:`RolloutSettings`, a dict of its fields, or the trainer's ``GRPOConfig`` (``trainer.args``);
            its ``reward_weights``: one weight per reward function (default 1 each).
        trainer_state: passed to the reward functions as ``trainer_state`` (TRL passes the TrainerState).
        progress: a progress bar over this rank's prompts on the main process.
        builder: the forecast's prompt builder (default: one from ``config``), for sequence limits and chat checks.
        prompt_indices: the prompts to roll out (indices into ``prompts``); default: the forecast's seeded draw
            of ``rollout_prompts`` (:func:`draw_prompts`). Only that draw warns about prompts whose rewards carry
            no signal (other draws, such as a re-check's probe, use the completions, not their rewards).
        score: ``False`` samples without calling the reward functions (every reward None): for a probe that
            needs the completions only, under reward models this function cannot call, or a distillation's.
        desc: the progress bar's label.
        async_loop: the event loop async reward functions are awaited on: the trainer's (GRPOTrainer's
            ``async_loop``), so that a reward's loop-bound resources serve STS's calls and the trainer's alike;
            default :func:`reward_event_loop`.

    Under ``torch.distributed`` each rank samples and scores a padded share of the prompts; the rollouts are
    gathered, so every rank returns the same :class:`Rollouts`.
    """
    config = config if isinstance(config, STSConfig) else STSConfig.from_dict(config)
    settings = RolloutSettings.from_args(settings) if settings is not None else RolloutSettings()
    funcs = check_reward_funcs(reward_funcs) if score else [_not_scored]
    weights = settings.reward_weights if score else None
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise STSConfigError(f"{len(weights)} reward weights for {len(funcs)} reward functions; give one weight per "
                             "function (GRPOConfig.reward_weights).")
    records = prompt_records(prompts)
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor: its tokenizer, with its chat template
    builder = builder if builder is not None else prompt_builder(model, tokenizer, config)
    generations = min(settings.num_generations, config.rollout_generations)
    max_new = completion_budget(settings, config)
    if max_new >= builder.max_length:
        raise STSConfigError(f"Completions of up to {max_new} tokens leave no room for a prompt in the sequence limit "
                             f"of {builder.max_length} tokens; lower STSConfig.rollout_max_tokens.")
    forecast_draw = prompt_indices is None
    chosen = draw_prompts(len(records), config) if forecast_draw else [int(i) for i in prompt_indices]
    from transformers import GenerationConfig

    gen_model = _generation_model(model)
    eos = _eos_ids(gen_model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    generation_config = GenerationConfig(**{
        "do_sample": True, "pad_token_id": pad, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
        "min_p": settings.min_p, "repetition_penalty": settings.repetition_penalty, "use_cache": True,
        "disable_compile": True, **(settings.generation_kwargs or {}),
        # the budget holds over the user's generation_kwargs (a longer max_new_tokens / min_new_tokens there)
        "max_new_tokens": max_new, "min_new_tokens": min((settings.generation_kwargs or {}).get("min_new_tokens") or 0,
                                                         max_new)})
    device = model_device(gen_model)
    part = shard(len(chosen))
    bar = None
    if progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(part.indices), unit="prompt", desc=desc)
    local: list[RolloutGroup] = []
    # a failure (a reward function's, a prompt's) is raised on every rank after the loop; under ZeRO-3 every
    # generate is a collective, so a failed rank keeps generating (scoring nothing) until the others are done
    failure = LocalFailure.around_forwards(gen_model)
    try:
        with inference_mode(model):
            for position, counted in zip(part.indices, part.counted):
                if failure.skip:
                    break
                # a padded duplicate still generates (ZeRO-3 ranks must run the same forwards) and is dropped
                index = chosen[position]
                record = records[index]
                prompt = record["prompt"]
                ids = None
                with failure:
                    ids = _prompt_ids(builder, prompt, settings, "prompts")
                    ids = ids[max(0, len(ids) - (builder.max_length - max_new)):]
                if ids is None:  # this rank failed on the prompt: a token stands in, to keep the forwards in step
                    ids = [pad]
                with failure:
                    completion_ids = _generate_group(gen_model, ids, generations, generation_config, eos,
                                                     _seed_of(config.seed, index), device)
                if counted and failure.error is None:
                    with failure:
                        local.append(_scored_group(position, record, ids, completion_ids, funcs, tokenizer, eos,
                                                   generations, settings, trainer_state, async_loop))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    failure.raise_everywhere()
    groups = sorted((g for rank_groups in gather_objects(local) for g in rank_groups), key=lambda g: g.index)
    for g in groups:
        g.index = chosen[g.index]
    recorded = {"seed": config.seed, "num_generations": generations, "max_completion_length": max_new,
                **{k: v for k, v in settings.to_dict().items()
                   if k not in ("num_generations", "max_completion_length", "reward_weights")}}
    wanted = trainer_completion_length(settings)
    if settings.mask_truncated_completions and (wanted is None or max_new < wanted):
        # cut at STS's limit where the trainer's is longer (or none), a completion may end within the trainer's
        recorded["mask_truncated_completions"] = False
        warn_on_main(f"mask_truncated_completions: STS's rollouts stop at {max_new} tokens (rollout_max_tokens), "
                     f"before the trainer's {wanted or 'unlimited'} length, so which completions training leaves out "
                     "is unknown; all are used. Raise STSConfig.rollout_max_tokens to the trainer's length (and set "
                     "max_completion_length) to mirror it.", STSDataWarning, stacklevel=2)
    rollouts = Rollouts(groups=groups, reward_names=[_reward_name(f) for f in funcs], reward_weights=weights,
                        settings=recorded)
    signal = rollouts.signal()
    if forecast_draw and score and not bool(signal.all()):
        then = ("the rollout forecasts use the other prompts only" if bool(signal.any()) else
                "no rollout forecast can be made from them (check the reward functions on Rollouts.groups)")
        separated = _both_sides(rollouts.advantages)  # before the trainer's mask of cut completions
        same, masked = int((~signal & ~separated).sum()), int((~signal & separated).sum())
        why = [f"{same} got the same reward for all their scored completions" if same else "",
               f"{masked} keep no trained completion on one side of their group's mean reward (the trainer leaves "
               "out completions cut at max_completion_length: mask_truncated_completions)" if masked else ""]
        warn_on_main(f"Of {len(groups)} prompts ({generations} completions sampled each), "
                     f"{'; '.join(w for w in why if w)}: no signal to separate high from low reward there; {then}.",
                     STSDataWarning, stacklevel=2)
    return rollouts


def _scored_group(position: int, record: dict[str, Any], ids: list[int], completion_ids: list[list[int]], funcs,
                  tokenizer, eos: list[int], generations: int, settings: RolloutSettings, trainer_state: Any,
                  async_loop: asyncio.AbstractEventLoop | None) -> RolloutGroup:
    """One prompt's sampled completions, decoded and scored by the reward functions as GRPOTrainer calls them."""
    prompt = record["prompt"]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_messages(prompt) else texts
    columns = {k: v for k, v in record.items() if k not in ("prompt", "completion", "completion_ids")}
    try:
        rewards = score_completions(funcs, [prompt] * generations, completions, completion_ids,
                                    {k: [v] * generations for k, v in columns.items()}, trainer_state, async_loop)
    except STSInputError as err:
        if generations >= settings.num_generations:
            raise
        raise STSInputError(
            f"{err} Or: STS scored groups of {generations} completions a prompt where the trainer scores "
            f"{settings.num_generations} (num_generations); a reward that reads whole groups needs "
            f"STSConfig(rollout_generations={settings.num_generations}).") from err.__cause__
    return RolloutGroup(position, prompt, columns, ids, completions, completion_ids, rewards,
                        [not c or c[-1] not in eos for c in completion_ids])


NOTHING_MOVED = ("The high- and low-reward rollouts differ in no SAE latent (every reward-weighted difference is 0), "
                 "so there is no direction to forecast: check that the completions differ (temperature, "
                 "rollout_max_tokens) and that the SAE is for this model and layer.")


def run_rollout_forecast(setup: ForecastSetup, rollouts: Rollouts, domains: dict[str, Corpus], *, progress: bool = False,
                         start: float | None = None) -> ForecastRun:
    """The reward-weighted forecast (``settings["shift"] == "reward_weighted"``) from scored rollouts: per prompt,
    the advantage-weighted mean latents of its above-mean completions minus those of its below-mean ones."""
    units = rollouts.contrast_units(setup.builder)
    return contrast_forecast(setup, units, domains, kind="reward_weighted", what="rollout groups",
                             nothing_moved=NOTHING_MOVED, settings={"rollouts": rollouts.summary()},
                             progress=progress, start=start)


def rollout_forecast(model: nn.Module, tokenizer, sae: Any, prompts: Any, reward_funcs: Any, targets: Any,
                     config: STSConfig | dict | None = None, *, settings: Any = None, shift: str = "reward_weighted",
                     top_fraction: float | None = None, progress: bool = False, calibration: Any = None,
                     ) -> Forecast:
    """Forecast how RL (GRPO) on ``prompts`` with ``reward_funcs`` moves each target domain, from the model's own
    scored rollouts (:func:`sample_rollouts`).

    ``shift="reward_weighted"`` (the callback's default for GRPO): the advantage-weighted high-minus-low difference
    of the rollouts' latents. ``shift="reward_filtered"`` (``"demonstrations"`` is the same): the in-context
    forecast with the prompts as queries and the above-mean completions as demonstrations
    (``settings["demonstrations"] == "reward_filtered_rollouts"``). Either way
    ``settings["rollouts"]`` summarises the rollouts. Other arguments as :func:`sample_rollouts` and
    :func:`~sts_callback.pipelines.forecast.forecast`.
    """
    if shift not in ROLLOUT_SHIFTS:
        raise STSConfigError(f"shift={shift!r}: use one of {ROLLOUT_SHIFTS}.")
    setup, calibration, start = prepare_forecast(model, tokenizer, sae, config, calibration, shift)
    domains = load_domains(targets)
    records = prompt_records(prompts)
    rollouts = sample_rollouts(model, tokenizer, records, reward_funcs, setup.config, settings, progress=progress,
                               builder=setup.builder)
    if shift == "reward_weighted":
        result = run_rollout_forecast(setup, rollouts, domains, progress=progress, start=start).forecast
    else:
        demos = load_corpus(rollouts.demonstrations(top_fraction), name="rollout demonstrations")
        result = run_forecast(setup, load_corpus(records, name="train"), domains, demos, progress=progress,
                              start=start).forecast
        result.settings.update({"shift": "reward_filtered", "demonstrations": "reward_filtered_rollouts",
                                "rollouts": rollouts.summary()})
    return result.apply_calibration(calibration) if calibration is not None else result
