"""Capturing the residual stream (output of decoder block L) of Hugging Face decoder-only models.

Layer L is TransformerLens' ``blocks.L.hook_resid_post``: the output of ``layers[L]``, which for the last
layer is *before* the final norm (unlike ``hidden_states[-1]``). Works through DDP / DeepSpeed / FSDP /
PEFT wrappers. When parameters are not sharded the forward is stopped right after block L.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import STSConfigError, STSInputError


class _CaptureDone(Exception):
    """Raised from the hook to end a truncated forward (never under ZeRO-3 / FSDP)."""


def input_vocabulary(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``None`` where the model does not say: custom code)."""
    try:
        embeddings = unwrap_model(model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def token_beyond_vocabulary(top: int, vocabulary: int) -> STSInputError:
    """The error for a token id the embedding has no row for (its bare IndexError, or a device assert on a GPU,
    said nothing of the cause)."""
    return STSInputError(f"The tokenizer gave token id {top}, but the model's input embedding has {vocabulary} rows: "
                         "tokens were added to the tokenizer and the model was not resized. Call "
                         "model.resize_token_embeddings(len(tokenizer)) (as training on them needs too), or use the "
                         "tokenizer the model was made with.")


def clamped_to_vocabulary(ids: torch.Tensor, vocabulary: int | None) -> tuple[torch.Tensor, STSInputError | None]:
    """``ids`` with any id beyond the embedding's ``vocabulary`` rows clamped, and the error to raise once the
    forward has run (None when every id has its row): under ZeRO-3 / FSDP each forward is a collective, so the
    process that found it still runs its forward, then raises (the embedding's bare IndexError otherwise)."""
    top = int(ids.max())
    if vocabulary is None or top < vocabulary:
        return ids, None
    return ids.clamp(max=vocabulary - 1), token_beyond_vocabulary(top, vocabulary)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / FSDP1 / torch.compile wrappers and PEFT's wrapper, down to the HF model."""
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel",
                                     "FullyShardedDataParallel") and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        else:
            break
    return model


DATA_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def without_data_parallel(model: Any) -> Any:
    """The model inside a DDP / DataParallel / DeepSpeed engine wrapper (``accelerator.prepare``'s), as a Trainer
    hands it to callbacks: each forward of a DDP model with buffers begins with their broadcast, a collective, so a
    rank that skips its remaining forwards after a local failure would leave the others waiting in theirs. FSDP and
    PEFT stay (their forwards are the model's)."""
    while type(model).__name__ in DATA_PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def check_measurable(model: nn.Module) -> None:
    """Refuse, before any work, a model whose held-out language-model loss STS cannot measure: one without an LM
    head (a reward or classification model), an encoder-decoder or masked LM, one whose text attends both ways
    (``use_bidirectional_attention``), or one with PEFT prompt learning (:func:`check_no_prompt_learning`)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise STSConfigError(
            f"STS needs a causal language model (a ...ForCausalLM with an LM head); {type(inner).__name__} has no LM "
            "head, so no held-out language-model loss or in-context shift can be measured (a reward or "
            "classification model, as RewardTrainer trains). Leave the callback out of this run, or monitor the "
            "policy model that the reward model will train.")
    encoder_decoder = getattr(getattr(inner, "config", None), "is_encoder_decoder", False)
    if encoder_decoder or _is_masked_lm(inner):
        kind = "an encoder-decoder" if encoder_decoder else "a masked (bidirectional)"
        raise STSConfigError(
            f"STS needs a decoder-only causal language model; {type(inner).__name__} is {kind} language model, "
            "whose next-token held-out loss and residual stream at the decoder layers are not what STS measures "
            "(an encoder's or decoder's layers alone would be read silently). Use a ...ForCausalLM model, or leave "
            "the callback out of this run.")
    setting = _bidirectional_setting(inner)
    if setting is not None:
        raise STSConfigError(
            f"STS measures causal next-token loss; {type(inner).__name__} sets {setting}, so its text tokens attend "
            "to later ones (a prefix-LM such as PaliGemma, or a bidirectional encoder): a held-out token's loss would "
            "read the tokens it predicts and change with the batch's padding. Use a causal language model (that "
            "setting off), or leave the callback out of this run.")
    check_no_prompt_learning(model)


def _bidirectional_setting(model: nn.Module) -> str | None:
    """The model's ``use_bidirectional_attention`` where it makes text attend both ways (``config.`` or
    ``text_config.``), else ``None``. Gemma 4's ``"vision"`` is bidirectional among image tokens only: text stays
    causal."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    for where, part in (("config", config), ("config.text_config", text)):
        value = getattr(part, "use_bidirectional_attention", None)
        if value and value != "vision":
            return f"{where}.use_bidirectional_attention={value!r}"
    return None


def _is_masked_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a masked-LM class (BERT, RoBERTa, ...: transformers' masked-LM auto mapping) that is
    not also a causal one."""
    from transformers.models.auto import modeling_auto

    def names(mapping: dict[str, Any]) -> set[str]:
        return {name for value in mapping.values() for name in (value if isinstance(value, (list, tuple)) else [value])}

    name = type(model).__name__
    return name in names(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) \
        and name not in names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_no_prompt_learning(model: nn.Module) -> None:
    """Refuse PEFT's prompt-learning methods (prompt / prefix / P-tuning): their virtual tokens exist only inside
    the PEFT wrapper's forward, which STS's passes go around (the LM head apart from the body, the decoder block
    hooked, token positions counted on the text), so every change would read as exactly 0 or at the wrong tokens."""
    current = model
    for _ in range(10):
        configs = getattr(current, "peft_config", None)
        if isinstance(configs, dict) and hasattr(current, "get_base_model"):
            adapter = getattr(current, "active_adapter", None)
            config = configs.get(adapter) if isinstance(adapter, str) else next(iter(configs.values()), None)
            if getattr(config, "is_prompt_learning", False):
                raise STSConfigError(
                    f"STS cannot measure a {type(config).__name__} model: PEFT's prompt-learning methods (prompt, "
                    "prefix and P-tuning) add virtual tokens inside the wrapper's forward, which STS's passes do not "
                    "run through, so every change would read as 0. Train with LoRA (peft.LoraConfig), IA3 or a full "
                    "fine-tune to monitor the run, or leave the callback out of this one.")
            if getattr(config, "alora_invocation_tokens", None):
                raise STSConfigError(
                    "STS cannot measure an activated LoRA (LoraConfig(alora_invocation_tokens=...)): its adapters "
                    "switch on after the invocation tokens inside the PEFT wrapper's forward, which STS's passes do "
                    "not run through (its held-out loss would be measured wrongly, or crash). Train a plain LoRA to "
                    "monitor the run, or leave the callback out of this one.")
            return
        current = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        if current is None:
            return


def text_config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_hidden_size(config: Any) -> int | None:
    """The residual width a (text) model config names, or None."""
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def config_num_layers(config: Any) -> int | None:
    """The decoder layer count a (text) model config names, or None."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def hidden_size(model: nn.Module) -> int:
    config = text_config(model)
    size = config_hidden_size(config)
    if size is None:
        raise STSInputError(f"Cannot read the hidden size from {type(config).__name__}.")
    return size


def num_layers(model: nn.Module) -> int:
    n = config_num_layers(text_config(model))
    return n if n is not None else len(decoder_layers(model))


def check_layer_runs_on_text(model: nn.Module, layer: int) -> None:
    """Refuse a decoder layer that text-only input skips: Mllama's (Llama 3.2 Vision's) cross-attention layers
    (``text_config.cross_attention_layers``) run only on an image's states, and STS feeds text only."""
    skipped = getattr(text_config(model), "cross_attention_layers", None) or []
    if layer in skipped:
        raise STSConfigError(
            f"Decoder layer {layer} is one of {type(unwrap_model(model)).__name__}'s cross-attention layers "
            f"(text_config.cross_attention_layers={list(skipped)}), which the model skips on text-only input, as "
            "STS's passes are: an SAE there reads nothing. Use an SAE trained at another layer (one not in "
            "cross_attention_layers).")


def max_positions(model: nn.Module) -> int | None:
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.layers``, ``language_model.layers``, ``transformer.h``)."""
    base = unwrap_model(model)
    candidates = []
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for holder in (decoder, getattr(base, "model", None), getattr(base, "transformer", None), base,
                   getattr(getattr(base, "model", None), "language_model", None)):
        if holder is None:
            continue
        holder = unwrap_model(holder)
        for name in ("layers", "h", "blocks"):
            layers = getattr(holder, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                candidates.append(layers)
    if candidates:
        return candidates[0]
    config = text_config(model)
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in base.modules():  # last resort: the ModuleList as long as the layer count
        if isinstance(module, nn.ModuleList) and expected and len(module) == expected:
            return module
    raise STSInputError(
        f"Cannot find the decoder layers of {type(base).__name__}; expected `model.layers` or `transformer.h`."
    )


def decoder_layer_name(model: nn.Module, layer: int) -> str:
    """The module path of decoder block ``layer`` in the Hugging Face model (``model.layers.12``,
    ``transformer.h.12``, ``gpt_neox.layers.12``): what sae-lens records as an SAE's ``hf_hook_name``."""
    block = decoder_layers(model)[layer]
    return next(name for name, module in unwrap_model(model).named_modules() if module is block)


def parameters_are_sharded(model: nn.Module) -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP, where every rank must run the full forward in lockstep."""
    for module in model.modules():
        if type(module).__name__.startswith(("FullyShardedDataParallel", "FSDP")):
            return True
    for parameter in model.parameters():
        if hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor":
            return True
    return False


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(unwrap_model(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


# Config fields counting how many times a looped decoder runs its (looped) blocks a forward (Dory's
# n_recurrent_loops, Inkling2-Loop's loop_num_passes)
LOOP_FIELDS = ("n_recurrent_loops", "loop_num_passes")


def runs_its_layers_again(model: nn.Module) -> bool:
    """Whether ``model`` is a looped decoder, running some blocks more than once a forward."""
    config = text_config(model)
    return any(isinstance(value := getattr(config, name, None), int) and value > 1 for name in LOOP_FIELDS)


class ResidualCapture:
    """Run forwards and return the residual stream after block ``layer``.

    Args:
        model: any Hugging Face decoder-only model, possibly wrapped.
        layer: decoder block index, 0-based.
        truncate: stop after block ``layer`` (skipped automatically when parameters are sharded).
    """

    def __init__(self, model: nn.Module, layer: int, *, truncate: bool = True):
        self.model = model
        n = num_layers(model)
        if not 0 <= layer < n:
            raise STSInputError(
                f"Layer {layer} does not exist: {type(unwrap_model(model)).__name__} has {n} decoder layers "
                f"(0..{n - 1}); pick a layer in that range or an SAE trained for this model."
            )
        check_layer_runs_on_text(model, layer)
        self.layer = layer
        self.block = decoder_layers(model)[layer]
        # A looped decoder runs its blocks several times a forward: truncated, the read would be the first pass,
        # untruncated (ZeRO-3, truncate_forward=False) the last. The last pass is read everywhere, as the model's
        # own hidden_states give it.
        self.truncate = truncate and not parameters_are_sharded(model) and not runs_its_layers_again(model)
        self._logits_to_keep = _accepts(model, "logits_to_keep")
        self._captured: torch.Tensor | None = None
        self.forward_calls = 0

    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self._captured = hidden
        if self.truncate:
            raise _CaptureDone

    @contextmanager
    def _hooked(self):
        handle = self.block.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Residual stream ``[batch, seq, hidden]`` for one batch."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._logits_to_keep and not self.truncate:
            kwargs["logits_to_keep"] = 1  # the LM head is not needed; only its last position is computed
        self._captured = None
        self.forward_calls += 1
        with self._hooked():
            try:
                self.model(**kwargs)
            except _CaptureDone:
                pass
        if self._captured is None:
            raise RuntimeError(
                f"The hook on decoder layer {self.layer} did not fire during the forward: the model skipped the layer "
                "(a model may skip a layer for text-only input, as Mllama does its cross-attention layers). Use an SAE "
                "trained at a layer that the model runs on text.")
        captured, self._captured = self._captured, None
        return self._residual(captured, tuple(input_ids.shape))

    def _residual(self, captured: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``[batch, seq, hidden]``: a block of Gemma 3n's AltUp returns its stacked streams ``[streams, batch, seq,
        hidden]``, of which the active one (``altup_active_idx``) is the stream the block computes on."""
        if captured.dim() == 3 and tuple(captured.shape[:2]) == shape:
            return captured
        active = getattr(text_config(self.model), "altup_active_idx", None)
        if captured.dim() == 4 and tuple(captured.shape[1:3]) == shape and isinstance(active, int):
            return captured[active]
        raise STSInputError(
            f"Decoder layer {self.layer} of {type(unwrap_model(self.model)).__name__} returns a tensor of shape "
            f"{tuple(captured.shape)}, not the residual stream [batch, seq, hidden] for inputs of shape {shape}: this "
            "architecture keeps its residual stream in another form, which STS cannot read.")
