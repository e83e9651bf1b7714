"""Training a TopK sparse autoencoder on a model's residual stream, for models without a public SAE.

Residual activations after decoder block ``layer`` are collected once into a float32 buffer, a held-out
slice is kept aside, and sae-lens' ``TopKTrainingSAE`` is trained with its ``SAETrainer`` on shuffled
batches of the rest. The result is a sae-lens inference SAE that encodes raw residuals (the activation
scaling used during training is folded into its weights), loadable with :func:`sts_callback.core.sae.load_sae`.
sae-lens is imported only inside :func:`train_sae` (it is slow to import).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import give_new_file_modes, output_target
from ..core.capture import ResidualCapture, decoder_layer_name, max_positions, num_layers, unwrap_model
from ..core.config import settings_from_dict
from ..core.data import special_prefix, special_token_ids, text_tokenizer
from ..core.errors import STSConfigError, STSDataWarning, STSInputError
from ..core.sae import SAE_FOLDER_FILES
from ..core.torch_utils import model_device

REPORT_FILENAME = "training_report.json"
# Fewest tokens the FVU is measured on: it divides by their variance around their own mean, which fewer rows
# estimate too poorly (1 row: 0, so NaN).
MIN_EVAL_TOKENS = 10
# More passes than this over the collected tokens: the data are far below the token budget, and the SAE fits
# these tokens rather than the model's residual stream (the held-out FVU then says how far).
MAX_PASSES = 10
# Sequences per model forward while collecting activations.
FORWARD_BATCH_SEQUENCES = 8
# Rows per SAE encode during evaluation, bounding the [rows x d_sae] latent matrix.
EVAL_CHUNK_ROWS = 4096


@dataclass
class SAETrainingConfig:
    """How :func:`train_sae` trains (and :func:`collect_activations` collects); checked when built.

    Args:
        d_sae: number of latents.
        k: active latents per token (TopK), ``1 <= k < d_sae``.
        training_tokens: activations collected (at most) and samples trained on; fewer collected tokens are
            cycled over.
        max_length: a text is cut to its first ``max_length`` tokens (and to the model's context).
        batch_size_tokens: activations per optimizer step.
        lr: Adam learning rate; ``None``: :func:`default_lr` for ``d_sae`` and the number of steps.
        seed: seed of the text order, the SAE's initial weights and the batches.
        held_out_fraction: fraction of the collected tokens (the last texts) kept aside for the evaluation.
        exclude_special_tokens: do not train on (or count) the tokenizer's special tokens.
    """

    d_sae: int = 4096
    k: int = 32
    training_tokens: int = 200_000
    max_length: int = 256
    batch_size_tokens: int = 1024
    lr: float | None = None
    seed: int = 0
    held_out_fraction: float = 0.1
    exclude_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, example in (("d_sae", "4096"), ("k", "32"), ("training_tokens", "200_000"), ("max_length", "256"),
                              ("batch_size_tokens", "1024")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise STSConfigError(f"SAETrainingConfig.{name}={value!r} must be a positive integer; use e.g. "
                                     f"{name}={example}.")
        if not self.k < self.d_sae:
            raise STSConfigError(f"SAETrainingConfig.k={self.k} must satisfy 1 <= k < d_sae={self.d_sae}; use e.g. "
                                 "k=32 (or raise d_sae).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise STSConfigError(f"SAETrainingConfig.seed={self.seed!r} must be an integer.")
        fraction = self.held_out_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise STSConfigError(f"SAETrainingConfig.held_out_fraction={fraction!r} must be in [0, 1); use e.g. "
                                 "held_out_fraction=0.1.")
        self.held_out_fraction = float(fraction)
        lr = self.lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0
                               or not math.isfinite(lr)):
            raise STSConfigError(f"SAETrainingConfig.lr={lr!r} must be a positive number; leave lr=None for the "
                                 "default.")
        if not isinstance(self.exclude_special_tokens, bool):
            raise STSConfigError(f"SAETrainingConfig.exclude_special_tokens={self.exclude_special_tokens!r} must be "
                                 "True or False.")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SAETrainingConfig:
        return settings_from_dict(cls, values, "SAE training setting(s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CollectedActivations:
    """Residual activations of the counted tokens, in collection order (texts shuffled by the seed)."""

    acts: torch.Tensor  # [tokens, d_in] float32
    sequences: int  # texts that contributed at least one token
    texts_seen: int
    truncated: bool  # the buffer filled up (later texts, or the end of the last one, were not used)


@dataclass
class TrainedSAE:
    """A trained SAE with its held-out evaluation (FVU, mean L0, dead-latent fraction) and settings."""

    sae: Any
    path: str | None
    layer: int
    d_in: int
    d_sae: int
    k: int
    fvu: float
    mean_l0: float
    dead_fraction: float
    training_tokens: int
    unique_tokens: int
    seconds: float
    held_out_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the SAE object): a NaN or infinite number is written as null, with
        a note in ``notes`` saying why (strict JSON has no NaN)."""
        out = {name: getattr(self, name) for name in (
            "path", "layer", "d_in", "d_sae", "k", "fvu", "mean_l0", "dead_fraction", "training_tokens",
            "unique_tokens", "held_out_tokens", "seconds")}
        out.update(self.details)
        notes = list(out.get("notes") or [])
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
                notes.append(UNDEFINED.get(key, f"{key} is null: it came out {value} (not a number)."))
        if notes:
            out["notes"] = notes
        return out


# Why a metric came out NaN, for the report that writes it as null.
UNDEFINED = {
    "fvu": "fvu is null: the evaluation activations do not vary (zero variance), so the fraction of variance "
           "unexplained is undefined; evaluate on more, different texts.",
}


def _as_text_list(texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or not isinstance(texts, Iterable):
        raise STSInputError("`texts` must be a list of strings: pass the documents to train the SAE on.")
    out = []
    for text in texts:
        if not isinstance(text, str):
            raise STSInputError(f"`texts` must contain strings, got {type(text).__name__}; decode or extract the "
                                "text field of your dataset first.")
        if text.strip():
            out.append(text)
    if not out:
        raise STSInputError("No texts to train the SAE on: pass a non-empty list of non-empty strings.")
    return out


@torch.no_grad()
def collect_activations(model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int,
                        config: SAETrainingConfig | dict | None = None, *, max_tokens: int | None = None,
                        progress: bool = False) -> CollectedActivations:
    """Residual stream after block ``layer`` at every counted token of ``texts``, up to ``max_tokens`` rows
    (default: the config's ``training_tokens``).

    Texts are shuffled with the config's ``seed``, each truncated to its ``max_length`` tokens and
    right-padded within a batch; padding (and, with ``exclude_special_tokens``, the tokenizer's special
    tokens) is not counted. The model runs in eval mode under ``no_grad``; its training mode is restored
    afterwards.
    """
    config = config if isinstance(config, SAETrainingConfig) else SAETrainingConfig.from_dict(config)
    if max_tokens is None:
        max_tokens = config.training_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise STSConfigError(f"max_tokens={max_tokens!r} must be a positive integer (None: training_tokens).")
    max_length, exclude_special_tokens, seed = config.max_length, config.exclude_special_tokens, config.seed
    texts = _as_text_list(texts)
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor: its tokenizer (and its special ids)
    capture = ResidualCapture(model, layer, truncate=True)
    limit = max_positions(model)
    if limit:
        max_length = min(max_length, limit)
    special = torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    device = model_device(model)

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chunks: list[torch.Tensor] = []
    rows = sequences = texts_seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, unit="tok", desc="Collecting activations")
    was_training = model.training
    model.eval()
    try:
        for input_ids, attention_mask, consumed in _padded_batches(tokenizer, [texts[i] for i in order],
                                                                   max_length, pad_id):
            if rows >= max_tokens:
                break
            texts_seen += consumed
            counted = attention_mask.bool()
            if exclude_special_tokens and special.numel():
                counted &= ~torch.isin(input_ids, special)
            if not counted.any():
                continue
            hidden = capture(input_ids.to(device), attention_mask.to(device))
            acts = hidden[counted.to(hidden.device)].float().cpu()
            if not torch.isfinite(acts).all():
                raise STSInputError(f"The residual stream at layer {layer} contains NaN/inf; check the model's "
                                    "dtype (use float32 or bfloat16, not float16) and weights.")
            sequences += int(counted.any(dim=1).sum())
            acts = acts[:max_tokens - rows]
            chunks.append(acts)
            rows += acts.shape[0]
            if bar is not None:
                bar.update(acts.shape[0])
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if rows == 0:
        what = "non-special, non-padding" if exclude_special_tokens else "non-padding"
        raise STSInputError(f"The texts give no {what} tokens to train on: pass longer texts"
                            + (" or set exclude_special_tokens=False." if exclude_special_tokens else "."))
    return CollectedActivations(acts=torch.cat(chunks), sequences=sequences, texts_seen=texts_seen,
                                truncated=rows >= max_tokens)


def _padded_batches(tokenizer: Any, texts: list[str], max_length: int,
                    pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Right-padded (input_ids, attention_mask, texts consumed) batches, in the order of ``texts`` up to
    a window of a few batches, within which sequences of similar length are grouped to save padding."""
    window = FORWARD_BATCH_SEQUENCES * 8
    for start in range(0, len(texts), window):
        chunk = texts[start:start + window]
        ids = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        ids = sorted((list(seq[:max_length]) for seq in ids if len(seq) > 0), key=len, reverse=True)
        consumed = len(chunk)
        for first in range(0, len(ids), FORWARD_BATCH_SEQUENCES):
            group = ids[first:first + FORWARD_BATCH_SEQUENCES]
            width = len(group[0])
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, seq in enumerate(group):
                input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, :len(seq)] = 1
            yield input_ids, attention_mask, consumed
            consumed = 0


def _batch_stream(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches; each epoch is a fresh permutation, batches may span two epochs."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(acts.shape[0], generator=generator)])
        index, pending = pending[:batch_size], pending[batch_size:]
        yield acts[index.to(acts.device)]


@torch.no_grad()
def evaluate_sae(sae: Any, acts: torch.Tensor) -> dict[str, float]:
    """FVU, mean L0 and dead-latent fraction of ``sae`` (``encode``/``decode``) on raw activations ``acts``.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2; a latent is dead if it never fires on ``acts``.
    """
    param = next(iter(sae.parameters()))
    acts = acts.float()
    mean = acts.mean(dim=0)
    error = total = l0 = 0.0
    fired = None
    for start in range(0, acts.shape[0], EVAL_CHUNK_ROWS):
        x = acts[start:start + EVAL_CHUNK_ROWS].to(device=param.device, dtype=param.dtype)
        latents = sae.encode(x)
        x_hat = sae.decode(latents).float()
        active = latents != 0
        error += float((x.float() - x_hat).pow(2).sum())
        total += float((x.float() - mean.to(x.device)).pow(2).sum())
        l0 += float(active.sum())
        fired = active.any(dim=0) if fired is None else fired | active.any(dim=0)
    rows = acts.shape[0]
    return {"fvu": error / total if total > 0 else float("nan"), "mean_l0": l0 / rows,
            "dead_fraction": float((~fired).float().mean())}


def _model_name(model: nn.Module) -> str:
    base = unwrap_model(model)
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else type(base).__name__


def _prepends_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    try:
        return bos is not None and special_prefix(tokenizer)[:1] == [bos]
    except Exception:
        return False


def _check_layer(layer: int, n_layers: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise STSInputError(f"Layer {layer} does not exist: the model has {n_layers} decoder layers; pass a layer "
                            f"in 0..{n_layers - 1}.")


def configured_layers(model: str | Path) -> int | None:
    """Decoder layers of the model named by ``model`` (a Hugging Face folder, a hub name in the cache, or the
    built-in gemma-3-270m once built), read from its config.json without loading weights; ``None`` when that
    cannot be read here (the model loader then says what is wrong)."""
    from .models import GEMMA3_270M, default_cache_dir

    spec = str(model)
    if spec in (GEMMA3_270M, "gemma3-270m"):
        spec = str(default_cache_dir() / GEMMA3_270M)
        if not (Path(spec) / "config.json").is_file():
            return None
    try:
        from transformers import AutoConfig

        local = Path(spec).expanduser()
        # a hub name: only what is cached (a check must not wait on the network)
        config = AutoConfig.from_pretrained(str(local) if local.exists() else spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not readable here: the loader reports it
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_training_inputs(model: str | Path, layer: int, data: Iterable[Any]) -> list[str]:
    """What ``sts train-sae`` can check before the model's weights load; returns the texts to train on.

    ``layer`` against the number of decoder layers in the model's config.json (:func:`configured_layers`), and
    ``data`` (JSONL paths, registered domain names, ...: what :func:`~sts_callback.core.data.load_corpus`
    reads): an error when none of them holds text, a warning naming each one that holds none.
    """
    import warnings

    from ..core.data import example_text, load_corpus

    n_layers = configured_layers(model)
    if n_layers is not None:
        _check_layer(layer, n_layers)
    elif isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise STSInputError(f"Layer {layer!r} does not exist: layers are numbered from 0; pass a layer in "
                            "0..(decoder layers - 1).")
    data = [data] if isinstance(data, (str, Path)) else list(data)
    named = [str(Path(os.path.expanduser(str(d))).resolve()) if isinstance(d, (str, Path))
             and Path(os.path.expanduser(str(d))).exists() else d for d in data]
    repeated = [str(d) for i, d in enumerate(data) if isinstance(named[i], str) and named[i] in named[:i]]
    if repeated:  # read twice, its texts would be trained on twice and land in the held-out share too
        raise STSInputError(f"The SAE's data names {repeated} more than once; give each file or domain once.")
    texts: list[str] = []
    empty = []
    for spec in data:
        corpus = load_corpus(spec)
        found = [t for t in (example_text(corpus[i]) for i in range(len(corpus))) if t.strip()]
        if not found:
            empty.append(str(spec))
        texts += found
    if not texts:
        raise STSInputError(f"No texts to train the SAE on: {', '.join(empty) or 'no data given'} hold(s) none; pass "
                            "JSONL files of {\"text\": ...} (or prompt/answer) records, or registered domain names.")
    if empty:
        warnings.warn(f"{', '.join(empty)} hold(s) no text; the SAE trains on the other data given.", STSDataWarning,
                      stacklevel=2)
    return texts


def default_lr(d_sae: int, steps: int) -> float:
    """Adam learning rate for a TopK SAE on inputs of mean norm sqrt(d_in).

    Long runs use the EleutherAI heuristic 2e-4 * sqrt(16384 / d_sae). Short runs (a few hundred steps,
    the usual budget here) need more: on Gemma 3 270M layer 12 with 200k tokens / 195 steps, 3e-3..4e-3
    gave the lowest FVU and fewest dead latents for d_sae 4096..8192, 3e-4 left FVU twice as high and
    1e-2 was unstable; so 4e-3 at 200 steps, shrinking as 1/sqrt(steps), never below the heuristic.
    """
    long_run = 2e-4 * math.sqrt(2 ** 14 / d_sae)
    return min(8e-3, max(long_run, 4e-3 * math.sqrt(200 / max(steps, 1))))


def train_sae(model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int,
              config: SAETrainingConfig | dict | None = None, *, device: torch.device | str | None = None,
              output_dir: str | Path | None = None, progress: bool = False) -> TrainedSAE:
    """Train a TopK SAE (sae-lens) on the residual stream after decoder block ``layer``.

    Collects up to ``training_tokens`` activations from ``texts`` (stopping the model early once the
    buffer is full), holds out ``held_out_fraction`` of them (the last texts in shuffled order), and
    trains for ``training_tokens`` samples in batches of ``batch_size_tokens``; if the texts give fewer
    tokens, training makes several passes over them (``unique_tokens`` says how many there were).
    Inputs are scaled to mean norm sqrt(d_in) during training and the scale is folded into the weights,
    so the returned SAE (and the one saved in ``output_dir``, with ``training_report.json``) reads raw
    residuals. Metrics are measured on the held-out activations (on the training ones if
    ``held_out_fraction`` is 0).

    Args:
        config: :class:`SAETrainingConfig` (or a dict of its fields): width, k, token budget, learning rate,
            seed, ...; ``None``: the defaults.
        device: where the SAE trains; ``None``: the model's device.
        output_dir: folder to save the SAE (sae-lens format) and ``training_report.json`` to; ``None``: none.
        progress: show progress bars.
    """
    config = config if isinstance(config, SAETrainingConfig) else SAETrainingConfig.from_dict(config)
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor: its tokenizer
    _check_layer(layer, num_layers(model))
    d_sae, k, training_tokens, max_length = config.d_sae, config.k, config.training_tokens, config.max_length
    batch_size_tokens, lr, seed = config.batch_size_tokens, config.lr, config.seed
    held_out_fraction, exclude_special_tokens = config.held_out_fraction, config.exclude_special_tokens
    texts = _as_text_list(texts)
    started = time.perf_counter()
    collected = collect_activations(model, tokenizer, texts, layer, config, progress=progress)
    acts = collected.acts
    total_rows, d_in = acts.shape
    held_out_rows = 0
    if held_out_fraction > 0 and total_rows >= 2:  # fewer: _check_data_amount says so
        held_out_rows = min(total_rows - 1, max(1, round(held_out_fraction * total_rows)))
    batch_size = min(batch_size_tokens, training_tokens)
    steps = max(1, training_tokens // batch_size)
    data_warnings = _check_data_amount(total_rows, held_out_rows, held_out_fraction, steps * batch_size)
    train_acts = acts[:total_rows - held_out_rows]
    eval_acts = acts[total_rows - held_out_rows:] if held_out_rows else train_acts
    collect_seconds = time.perf_counter() - started

    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    device = str(torch.device(device) if device is not None else model_device(model))
    lr = lr if lr is not None else default_lr(d_sae, steps)
    warm_up_steps = min(100, steps // 20) if steps >= 40 else 0
    decay_steps = steps // 5
    # sae-lens counts a latent dead after this many steps without firing, and then trains it with the
    # TopK auxiliary loss; its default (1000 steps) would never trigger in a short run.
    dead_window = max(10, min(1000, steps // 10))
    hook_name = f"blocks.{layer}.hook_resid_post"
    model_name = _model_name(model)

    train_acts = train_acts.to(device)
    mean_norm = float(train_acts.norm(dim=-1).mean())
    if not mean_norm > 0:
        raise STSInputError(f"The residual stream at layer {layer} is all zeros on these texts; check the model.")
    # As sae-lens' "expected_average_only_in": inputs scaled to mean norm sqrt(d_in), which keeps the
    # learning rate meaningful whatever the residual norm; computed exactly on the buffer.
    scale = math.sqrt(d_in) / mean_norm

    hf_hook_name = decoder_layer_name(model, layer)
    metadata = SAEMetadata(
        model_name=model_name, model_class_name=type(unwrap_model(model)).__name__, hook_name=hook_name,
        hf_hook_name=hf_hook_name, hook_head_index=None, context_size=max_length,
        prepend_bos=_prepends_bos(tokenizer),
        exclude_special_tokens=exclude_special_tokens, dataset_path=None, trained_with="sts_callback.tools.train_sae",
        training_tokens=steps * batch_size, unique_training_tokens=int(train_acts.shape[0]),
    )
    # The weights are drawn on the CPU from a forked generator: the caller's RNG streams (a training
    # run's) are left untouched, and a seed gives the same SAE on any device.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device="cpu", dtype="float32",
                                    normalize_activations="expected_average_only_in", metadata=metadata)
        training_sae = TopKTrainingSAE(cfg)
    training_sae.to(device)
    with torch.no_grad():
        # Starting b_dec at the mean centres the inputs from step 0; residual means are large.
        training_sae.b_dec.data.copy_(train_acts.mean(dim=0) * scale)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_warm_up_steps=warm_up_steps, lr_decay_steps=decay_steps,
        device=device, dead_feature_window=dead_window, feature_sampling_window=steps + 1,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae,
                         data_provider=_batch_stream(train_acts, batch_size, seed))
    trainer.activation_scaler.scaling_factor = scale
    train_started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc="Training SAE")
    # SAETrainer.fit() would do the same through its public step() seam, but always draws a
    # progress bar; this loop keeps it silent unless progress=True.
    for _ in range(steps):
        trainer.maybe_reset_sparsity()
        output = trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
        if bar is not None:
            bar.update(1)
            if trainer.n_training_steps % 20 == 0:
                bar.set_postfix(mse=f"{torch.as_tensor(output.losses['mse_loss']).detach().item():.4g}")
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_started
    if not torch.isfinite(training_sae.W_enc).all():
        raise STSConfigError(f"SAE training diverged (NaN weights) with lr={lr:g}; pass a smaller lr.")
    trainer.set_final_sae_metadata()
    training_sae.fold_activation_norm_scaling_factor(scale)
    trainer.activation_scaler.scaling_factor = None
    del train_acts

    # The inference SAE is produced by sae-lens' own save/load round trip, so the returned object is
    # exactly what load_sae(output_dir) gives. Its files and report are staged beside output_dir and moved in only
    # once all are written: an interrupted re-train leaves the folder's earlier SAE and report as they were.
    staging = Path(output_dir) if output_dir is not None else None
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(staging)
    with tempfile.TemporaryDirectory(dir=staging, prefix=STAGING_PREFIX) as tmp:
        folder = Path(tmp)
        training_sae.save_inference_model(folder)
        sae = SAE.load_from_disk(str(folder), device=device)
        sae.eval()
        metrics = evaluate_sae(sae, eval_acts.to(device))
        data_warnings += _fit_note(metrics, steps, held_out_rows > 0)
        seconds = time.perf_counter() - started
        result = TrainedSAE(
            sae=sae, path=str(Path(output_dir).resolve()) if output_dir is not None else None, layer=layer,
            d_in=d_in, d_sae=d_sae, k=k, fvu=metrics["fvu"], mean_l0=metrics["mean_l0"],
            dead_fraction=metrics["dead_fraction"], training_tokens=steps * batch_size,
            unique_tokens=int(total_rows - held_out_rows), seconds=seconds, held_out_tokens=held_out_rows,
            details={
                "hook_name": hook_name, "hf_hook_name": hf_hook_name, "model_name": model_name,
                "architecture": "topk", "evaluated_on": "held_out" if held_out_rows else "train",
                "lr": lr, "batch_size_tokens": batch_size, "steps": steps, "lr_warm_up_steps": warm_up_steps,
                "lr_decay_steps": decay_steps, "dead_feature_window": dead_window, "max_length": max_length,
                "exclude_special_tokens": exclude_special_tokens, "held_out_fraction": held_out_fraction,
                "seed": seed, "device": device, "input_scale": scale, "mean_input_norm": mean_norm,
                "sequences": collected.sequences, "texts": len(texts), "texts_used": collected.texts_seen,
                "passes": steps * batch_size / max(1, total_rows - held_out_rows),
                "collect_seconds": collect_seconds, "train_seconds": train_seconds,
                "train_tokens_per_second": steps * batch_size / train_seconds if train_seconds > 0 else None,
                "training_dead_latents": int(trainer.dead_neurons.sum()),
                **({"notes": data_warnings} if data_warnings else {}),
            },
        )
        if staging is not None:
            (folder / REPORT_FILENAME).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False))
            give_new_file_modes(folder, (*SAE_FOLDER_FILES, REPORT_FILENAME))  # safetensors writes 0600
            targets = {name: output_target(staging / name)[0]  # a link: written through to its file
                       for name in (*SAE_FOLDER_FILES, REPORT_FILENAME)}
            targets[REPORT_FILENAME].unlink(missing_ok=True)  # never beside another SAE, even for a moment
            for name, target in targets.items():  # the report last: present only with its SAE
                shutil.move(folder / name, target)
    return result


STAGING_PREFIX = ".sts-train-sae-"
STALE_STAGING_SECONDS = 24 * 3600  # no training stages its files that long: a folder this old was left by a kill


def _remove_stale_staging(folder: Path) -> None:
    """Staging folders a killed run left (SIGKILL, the OOM killer: no cleanup ran), possibly gigabytes."""
    for stale in folder.glob(f"{STAGING_PREFIX}*"):
        try:
            if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _fit_note(metrics: dict[str, float], steps: int, held_out: bool) -> list[str]:
    """A warning (returned too, for the report) when the trained SAE explains too little of the residual stream
    for a forecast: above the FVU at which the callback warns at train start."""
    from ..pipelines.guard import GuardConfig

    limit = GuardConfig.max_fvu
    if not metrics["fvu"] > limit:
        return []
    import warnings

    message = (f"The SAE explains little of the residual stream: fraction of variance unexplained "
               f"{metrics['fvu']:.2f} on {'held-out' if held_out else 'its training'} tokens (above {limit:g}, where "
               f"STSCallback warns that its forecast means little; {metrics['dead_fraction']:.0%} of latents dead) "
               f"after {steps} training step(s). Train on more tokens (--tokens / training_tokens) and texts, or a "
               "larger k.")
    warnings.warn(message, STSDataWarning, stacklevel=3)
    return [message]


def _check_data_amount(total_rows: int, held_out_rows: int, held_out_fraction: float,
                       samples: int) -> list[str]:
    """Before training: an error when the tokens cannot give the evaluation, a warning (returned too, for the
    report) when they are far below the token budget."""
    eval_rows = held_out_rows or total_rows
    if eval_rows < MIN_EVAL_TOKENS:
        if held_out_rows:
            need = math.ceil(MIN_EVAL_TOKENS / held_out_fraction)
            raise STSInputError(
                f"The texts gave {total_rows} token(s), so the held-out {held_out_fraction:.0%} is {held_out_rows} "
                f"token(s): too few to measure the SAE's fraction of variance unexplained on (at least "
                f"{MIN_EVAL_TOKENS}). Pass more or longer texts (about {need} tokens or more), or set "
                "held_out_fraction=0 to evaluate on the training tokens.")
        raise STSInputError(f"The texts gave {total_rows} token(s): too few to train an SAE and measure its fraction "
                            f"of variance unexplained (at least {MIN_EVAL_TOKENS}); pass more or longer texts.")
    unique = total_rows - held_out_rows
    passes = samples / unique
    if passes <= MAX_PASSES:
        return []
    import warnings

    message = (f"The texts gave only {unique} training token(s) for a budget of {samples}: training passes "
               f"{passes:.0f} times over them, so the SAE fits these tokens rather than the model's residual stream. "
               f"Pass more texts (about {samples} tokens), or lower training_tokens (--tokens) to "
               f"{unique * MAX_PASSES} or less.")
    warnings.warn(message, STSDataWarning, stacklevel=3)
    return [message]
