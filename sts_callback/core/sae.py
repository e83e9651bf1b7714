"""Loading sparse autoencoders and mapping their hook names to Hugging Face decoder layers.

Accepted: a sae-lens ``SAE`` object; ``{"release": ..., "sae_id": ...}`` (or the string
``"release::sae_id"``); a local sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``); or any
``nn.Module`` with ``encode(x) -> latents``. sae-lens is imported only when needed (it is slow to import).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import STSConfigError, STSInputError, first_line

_LAYER_PATTERNS = (  # a model or release prefix before the name ("model.", "gpt2-small/") is allowed
    (re.compile(r"(?:^|[./])blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"(?:^|[./])blocks\.(\d+)\.hook_resid_pre$"), -1),  # resid_pre of L is resid_post of L-1
    (re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.input$"), -1),  # a block's input is the previous one's output
)


# TransformerLens hooks that are inside a block, not its output: never the residual stream STS reads. Any other
# unrecognised name (a descriptive one such as "gemma-l12-res") is accepted once STSConfig(layer=) says the layer.
_NOT_RESIDUAL = re.compile(r"hook_(?:resid_mid|mlp_out|attn_out|mlp_in|attn_in|[qkv]_input|z|q|k|v|pattern|scores|"
                           r"result|pre|post|normalized|scale|embed|pos_embed)$|\.(?:attn|mlp|ln\d?|ln_final)\."
                           # the embeddings, before any block
                           r"|(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|embed_positions)$"
                           # Hugging Face sub-modules of a block (its attention, MLP, norms, dropouts), as a name or
                           # a prefix
                           r"|\.(?:self_attn|self_attention|attn|attention|cross_attn|mlp|feed_forward|ffn|experts|"
                           r"norm|\w*layernorm|\w*_norm|ln_\d|ln_f|\w*dropout)(?:\.|$)"
                           # another modality's tower of a multimodal model, whose layers are no text decoder's
                           r"|(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder|image_encoder|audio_tower|"
                           r"audio_model|audio_encoder|multi_modal_projector)\.")


def not_residual_error(reads: str) -> STSInputError:
    """The error for an SAE whose hook (``reads``: which SAE reads which hook) is not the residual stream."""
    return STSInputError(f"{reads}, which is not the residual stream after a decoder block (so STSConfig(layer=) "
                         "cannot make it one); STS needs a resid_post SAE (e.g. 'blocks.12.hook_resid_post' or "
                         "'model.layers.12').")


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """Decoder block whose output a hook name denotes, or ``None`` if it is not a residual-stream hook."""
    if not hook_name:
        return None
    for pattern, offset in _LAYER_PATTERNS:
        match = pattern.search(hook_name)
        if match:
            layer = int(match.group(1)) + offset
            if layer < 0:
                raise STSInputError(
                    f"Hook {hook_name!r} reads the embeddings, not a decoder block's output; STS needs a "
                    "residual-stream SAE at a decoder layer."
                )
            return layer
    return None


def weights_of(module: Any) -> torch.Tensor | None:
    """A floating tensor of the SAE's weights, whose device and dtype its input takes: a parameter, else a buffer,
    else a plain ``W_enc`` tensor (an SAE held as tensors, not parameters)."""
    held = [*module.parameters(), *module.buffers()] if isinstance(module, nn.Module) else []
    return next((t for t in [*held, getattr(module, "W_enc", None)]
                 if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


@contextmanager
def eval_mode(module: Any):
    """``module`` in eval mode (no dropout, BatchNorm's running statistics) for the block, each submodule's own
    training flag put back after: the caller's SAE, mid-training perhaps, is read, not changed."""
    training = [m for m in module.modules() if m.training] if isinstance(module, nn.Module) else []
    try:
        for m in training:  # none for an SAE in eval mode already
            m.training = False
        yield module
    finally:
        for m in training:
            m.training = True


@dataclass
class SAEHandle:
    """A loaded SAE with what the library needs to know about it."""

    module: Any
    d_in: int
    d_sae: int
    hook_name: str | None
    layer: int | None
    source: dict[str, Any] = field(default_factory=dict)
    neuronpedia_id: str | None = None
    # (the weights' identity and in-place version, their hash): the hash is read at every checkpoint save
    _fingerprint: tuple[Any, str] | None = field(default=None, init=False, repr=False, compare=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents at the SAE's own dtype, also inside a trainer's autocast (TRL's bf16 default would otherwise
        run the encoder in bf16 and blur TopK and the fit)."""
        reference = weights_of(self.module)
        if reference is not None:
            x = x.to(device=reference.device, dtype=reference.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False), eval_mode(self.module):
            latents = self.module.encode(x)
        # a sparse result (sae-lens' TopK(use_sparse_activations=True), a COO tensor): the dense rows STS reads
        return latents.to_dense() if isinstance(latents, torch.Tensor) and latents.layout != torch.strided \
            else latents

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SAEHandle":
        if isinstance(self.module, nn.Module):
            self.module.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict[str, Any]:
        return {**self.source, "d_in": self.d_in, "d_sae": self.d_sae, "hook_name": self.hook_name,
                "layer": self.layer, "neuronpedia_id": self.neuronpedia_id, "sae_fingerprint": self.fingerprint()}

    def fingerprint(self) -> str | None:
        """A short hash of the SAE's weights (as float32): two SAEs of the same shape and hook, e.g. trained with
        other seeds, differ here, so a calibration fitted with one can tell it is applied with another."""
        if not isinstance(self.module, nn.Module):
            return None
        weights = [(name, tensor) for name, tensor in sorted(self.module.state_dict().items())
                   if torch.is_tensor(tensor) and tensor.is_floating_point()]
        # the same storage, unchanged in place (the version counter), hashes the same: computed once a run
        key = tuple((name, t.data_ptr(), t._version, t.dtype, str(t.device), tuple(t.shape)) for name, t in weights)
        if self._fingerprint is not None and self._fingerprint[0] == key:
            return self._fingerprint[1]
        digest = hashlib.sha256()
        for name, tensor in weights:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self._fingerprint = (key, digest.hexdigest()[:16])
        return self._fingerprint[1]

    @property
    def can_decode(self) -> bool:
        return callable(getattr(self.module, "decode", None))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        reference = weights_of(self.module)
        if reference is not None:  # latents read as float32 (Extractor.encode) go back at the SAE's own dtype
            latents = latents.to(device=reference.device, dtype=reference.dtype)
        with torch.autocast(device_type=latents.device.type, enabled=False), eval_mode(self.module):
            return self.module.decode(latents)

    def checksum_parts(self) -> list[Any]:
        """Cheap identity of the SAE for comparing ranks: sizes, hook and a few moments of the encoder."""
        parts: list[Any] = [self.d_in, self.d_sae, self.hook_name]
        weight = getattr(self.module, "W_enc", None)
        if isinstance(weight, torch.Tensor):
            flat = weight.detach().float().reshape(-1)
            parts += [float(flat.double().sum()), float(flat.double().square().sum()),
                      flat[:: max(1, flat.numel() // 4096)]]
        return parts

    def decoder_weight(self) -> torch.Tensor | None:
        """[d_sae, d_in] decoder directions when the SAE exposes them (sae-lens ``W_dec``)."""
        weight = getattr(self.module, "W_dec", None)
        return weight.detach() if isinstance(weight, torch.Tensor) else None


def _sae_lens_handle(sae: Any, source: dict[str, Any]) -> SAEHandle:
    cfg = sae.cfg
    metadata = getattr(cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None) if metadata is not None else None
    hook_name = hook_name or getattr(cfg, "hook_name", None)  # older sae-lens, or an SAE of one's own with a cfg
    hf_hook_name = getattr(metadata, "hf_hook_name", None) if metadata is not None else None
    if getattr(cfg, "d_out", None) is not None or getattr(metadata, "hook_name_out", None) is not None:
        raise STSInputError(
            f"{type(sae).__name__} is a transcoder (it maps {hook_name or 'a hook'} to "
            f"{getattr(metadata, 'hook_name_out', None) or 'another'}), not a sparse autoencoder of the residual "
            "stream; STS needs a resid_post SAE (e.g. 'blocks.12.hook_resid_post' or 'model.layers.12').")
    layer = layer_from_hook_name(hook_name)
    if layer is None:
        layer = layer_from_hook_name(hf_hook_name)
    return SAEHandle(
        module=sae, d_in=int(cfg.d_in), d_sae=int(cfg.d_sae), hook_name=hook_name or hf_hook_name, layer=layer,
        source=source, neuronpedia_id=getattr(metadata, "neuronpedia_id", None) if metadata is not None else None,
    )


def _generic_handle(module: Any) -> SAEHandle:
    def size(*names: str) -> int | None:
        cfg = getattr(module, "cfg", None)
        for name in names:
            for owner in (module, cfg):
                value = getattr(owner, name, None) if owner is not None else None
                if isinstance(value, int):
                    return value
        return None

    d_in = size("d_in", "d_model", "input_dim")
    d_sae = size("d_sae", "d_hidden", "dict_size", "num_latents")
    weight = getattr(module, "W_enc", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        d_in, d_sae = d_in or weight.shape[0], d_sae or weight.shape[1]
    if d_in is None:
        raise STSInputError(
            f"Cannot tell the input width of {type(module).__name__}: give it a `d_in` attribute (or `cfg.d_in`, "
            "or a `W_enc` of shape [d_in, d_sae])."
        )
    hook_name = getattr(module, "hook_name", None)
    handle = SAEHandle(module=module, d_in=int(d_in), d_sae=int(d_sae or 0), hook_name=hook_name,
                       layer=layer_from_hook_name(hook_name), source={"kind": type(module).__name__})
    handle.d_sae = d_sae or int(check_encode(handle).shape[-1])  # unknown (0): the width encode returns
    return handle


def check_encode(handle: SAEHandle) -> torch.Tensor:
    """The SAE's latents of one zero row, at load time: an ``encode()`` STS cannot read (another shape, a tuple,
    integer top-k indices, a sequence-level SAE wanting [batch, seq, d_in]) would fail mid-pass with a bare error,
    or give meaningless scores, after the model's forwards. Run as STS runs it (in eval mode, without gradients);
    the module's own training flags are put back. The latents' width is checked where ``handle.d_sae`` is known."""
    module, d_in = handle.module, handle.d_in
    width = handle.d_sae or None
    reference = weights_of(module)  # a row on the SAE's own device and dtype, as SAEHandle.encode passes rows
    probe = torch.zeros(1, d_in, device=reference.device if reference is not None else None,
                        dtype=reference.dtype if reference is not None else torch.float32)
    try:
        with torch.no_grad():
            latents = handle.encode(probe)  # in eval mode, the module's own flags put back (SAEHandle.encode)
    except Exception as err:
        raise STSInputError(f"{type(module).__name__}.encode(x) failed on one zero row of shape [1, {d_in}] "
                            f"({type(err).__name__}: {err}); STS calls encode on [n, d_in] residual rows (a "
                            "sequence-level SAE is not one it can read).") from err
    if not isinstance(latents, torch.Tensor) or latents.dim() != 2 or latents.shape[0] != 1 or \
            not latents.is_floating_point() or (width is not None and latents.shape[-1] != width):
        shown = f"a {latents.dtype} tensor of shape {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) \
            else f"a {type(latents).__name__}"
        raise STSInputError(
            f"{type(module).__name__}.encode(x) returned {shown} for x of shape [1, {d_in}]; STS needs dense "
            f"floating-point latents of shape [n, d_sae]{f' (d_sae={width})' if width else ''}. Wrap it so that "
            "encode returns them (e.g. scatter sparse top-k activations and indices into a zero tensor).")
    return latents


def missing_sae_folder(spec: Any) -> str | None:
    """The error for an SAE path that names no folder (a string that is neither a folder nor 'release::sae_id'),
    else None: checkable before any model loads. A dict names its ``path``, or ``release`` and ``sae_id``."""
    if isinstance(spec, dict):
        if "path" in spec:
            return missing_sae_folder(spec["path"])
        if "release" not in spec or "sae_id" not in spec:
            return (f"SAE spec {spec} needs 'release' and 'sae_id' (sae-lens' names for a pretrained SAE) or "
                    "'path' (a sae-lens folder).")
        return None
    if isinstance(spec, str) and not spec.strip():  # Path("") is the current folder: said before it is read
        return (f"The SAE path is empty ({spec!r}: an unset variable?); pass a sae-lens folder, "
                "{'release': ..., 'sae_id': ...}, 'release::sae_id', a sae-lens SAE, or a module with encode().")
    if isinstance(spec, (str, Path)) and not Path(os.path.expanduser(str(spec))).is_dir() and not (
            isinstance(spec, str) and "::" in spec):
        where = "" if os.path.isabs(os.path.expanduser(str(spec))) else \
            f" (a relative path is read from the working folder, {Path.cwd()})"
        return (f"SAE {str(spec)!r} is not a folder{where}; pass a sae-lens folder, {{'release': ..., 'sae_id': ...}}, "
                "'release::sae_id', a sae-lens SAE, or a module with encode().")
    return None


SAE_FOLDER_FILES = ("cfg.json", "sae_weights.safetensors")  # what sae-lens reads from a folder
SHARED_FOLDER_FIX = ("Ask its owner to run `chmod -R a+rX` on the folder (files written before sts-callback gave them "
                     "the umask's mode were 0600), or use a copy of your own.")


def check_readable(folder: str | Path, what: str, fix: str = SHARED_FOLDER_FIX,
                   names: tuple[str, ...] | None = None) -> None:
    """Every file of ``folder`` (``names`` in it, default all) can be read by this user, else an
    :class:`STSInputError` naming the file: safetensors' own error for a 0600 file of another user (a shared
    cache) named a missing file instead, after the model had loaded."""
    folder = Path(folder)
    if not os.access(folder, os.R_OK | os.X_OK):
        raise STSInputError(f"Cannot read {what} folder {folder}: this user may not list it. {fix}")
    paths = sorted(folder.iterdir()) if names is None else [folder / name for name in names]
    for path in paths:
        if path.is_file() and not os.access(path, os.R_OK):
            info = path.stat()
            raise STSInputError(f"Cannot read {path} ({what}): this user lacks read permission (mode "
                                f"{stat.filemode(info.st_mode)}, owner uid {info.st_uid}). {fix}")


SAE_REBUILD_HINT = ("Save it again (SAE.save_model, or sts train-sae); the demo's SAE in the cache (STS_CACHE) is "
                    "rebuilt on the next run when its folder is deleted.")


def check_sae_folder(folder: str | Path) -> None:
    """A sae-lens folder that cannot load is an :class:`STSInputError` naming the file, found cheaply (cfg.json
    parsed, the weights' header read) so that the CLI reports it before the model loads: a folder cut short by a
    full disk or a killed copy failed in sae-lens with safetensors' or json's bare error."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    check_readable(folder, "the SAE", names=SAE_FOLDER_FILES)
    cfg = folder / "cfg.json"
    if not cfg.exists():
        raise STSInputError(f"{folder} has no cfg.json: it is not a sae-lens SAE folder (expected cfg.json and "
                            "sae_weights.safetensors, as written by SAE.save_model).")
    try:
        parsed = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise STSInputError(f"The SAE's {cfg} is not valid JSON ({err}): the folder is damaged. "
                            f"{SAE_REBUILD_HINT}") from err
    if not isinstance(parsed, dict):
        raise STSInputError(f"The SAE's {cfg} holds a {type(parsed).__name__}, not sae-lens' settings object. "
                            f"{SAE_REBUILD_HINT}")
    hook, _ = _cfg_hook_names(parsed)
    if hook is not None and _NOT_RESIDUAL.search(hook):  # said now, not once the model has loaded
        raise not_residual_error(f"The SAE in {folder} reads hook {hook!r} (its cfg.json)")
    weights = folder / "sae_weights.safetensors"
    if not weights.exists():
        if (folder / "sae.safetensors").exists():  # EleutherAI sparsify's layout: a format sae-lens does not read
            raise STSInputError(f"{folder} holds sae.safetensors, not sae_weights.safetensors: an EleutherAI "
                                "sparsify SAE, which sae-lens cannot load from a folder. Load it with sparsify "
                                "(Sae.load_from_disk) and pass a module whose encode(x) returns dense latents "
                                "[n, d_sae], or convert it to a sae-lens SAE and save_model it.")
        raise STSInputError(f"{folder} has cfg.json but no sae_weights.safetensors (a copy cut short?). "
                            f"{SAE_REBUILD_HINT}")
    try:
        with safe_open(str(weights), framework="pt"):  # reads and checks the header only
            pass
    except (SafetensorError, OSError) as err:
        raise STSInputError(f"The SAE's weights {weights} cannot be read ({err}): the file is damaged (cut "
                            f"short?). {SAE_REBUILD_HINT}") from err


def check_not_on_meta(sae: Any) -> None:
    """An SAE object whose weights are on the meta device (built under ``init_empty_weights`` or
    ``torch.device("meta")``, never loaded) is refused now: it failed at train start with torch's advice to call
    ``to_empty()``, which would give it uninitialised weights."""
    module = getattr(sae, "module", sae)  # an SAEHandle's
    if isinstance(module, nn.Module) and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise STSInputError("The SAE's weights are on the meta device (never loaded: built under init_empty_weights "
                            "or torch.device('meta')); load its weights before passing it, or pass its folder.")


def load_sae(spec: Any, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAEHandle:
    """Load an SAE from any accepted form (see module docstring) and return an :class:`SAEHandle`."""
    check_not_on_meta(spec)
    if isinstance(getattr(spec, "_orig_mod", None), nn.Module):  # torch.compile's wrapper: the SAE it compiled
        spec = spec._orig_mod
    if isinstance(spec, str) and not spec.strip():  # Path("") is the working folder: an unset variable, said so
        raise STSInputError(missing_sae_folder(spec))
    if isinstance(spec, (str, Path)) and "::" not in str(spec):  # a folder, `~` as the shell reads it
        spec = Path(os.path.expanduser(str(spec))) if isinstance(spec, Path) else os.path.expanduser(spec)
    if isinstance(spec, SAEHandle):
        handle = spec
    elif isinstance(spec, (str, Path)) and Path(spec).is_dir():
        check_sae_folder(spec)
        from safetensors import SafetensorError
        from sae_lens import SAE

        try:
            loaded = SAE.load_from_disk(str(spec), device=str(device or "cpu"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # what the checks above miss
            raise STSInputError(f"sae-lens cannot load the SAE folder {spec} ({type(err).__name__}: "
                                f"{first_line(err)}). {SAE_REBUILD_HINT}") from err
        handle = _sae_lens_handle(loaded, {"kind": "sae_lens_folder", "path": str(Path(spec).resolve())})
    elif isinstance(spec, dict) or (isinstance(spec, str) and "::" in spec):
        if isinstance(spec, str):
            release, sae_id = spec.split("::", 1)
            spec = {"release": release, "sae_id": sae_id}
        if "path" in spec:
            return load_sae(spec["path"], device=device, dtype=dtype)
        if "release" not in spec or "sae_id" not in spec:
            raise STSInputError(f"SAE spec {spec} needs 'release' and 'sae_id' (sae-lens names) or 'path'.")
        from sae_lens import SAE

        try:
            sae = SAE.from_pretrained(spec["release"], spec["sae_id"], device=str(device or "cpu"))
        except Exception as err:
            raise STSInputError(
                f"Could not load SAE {spec['release']}::{spec['sae_id']} with sae-lens ({err}). Check the names "
                "in sae-lens' pretrained_saes.yaml; offline, the weights must already be in the Hugging Face cache."
            ) from err
        handle = _sae_lens_handle(sae, {"kind": "sae_lens_release", "release": spec["release"], "sae_id": spec["sae_id"]})
    elif isinstance(spec, (str, Path)):
        raise STSInputError(missing_sae_folder(spec))
    elif _is_sae_lens_training_sae(spec):
        handle = _sae_lens_handle(_inference_sae(spec, device),
                                  {"kind": "sae_lens_training_object", "class": type(spec).__name__})
    elif hasattr(spec, "cfg") and hasattr(getattr(spec, "cfg"), "d_sae") and hasattr(spec, "encode"):
        handle = _sae_lens_handle(_own_copy_if_moved(spec, device, dtype),
                                  {"kind": "sae_lens_object", "class": type(spec).__name__})
        check_encode(handle)  # not only sae-lens' own classes carry a cfg with d_sae
    elif hasattr(spec, "encode") and callable(spec.encode):
        handle = _generic_handle(_own_copy_if_moved(spec, device, dtype))
    else:
        raise STSInputError(
            f"Cannot use {type(spec).__name__} as an SAE: it needs an encode(x) method, or pass a sae-lens SAE, "
            "folder or release/id."
        )
    if device is not None or dtype is not None:
        handle.to(device=device, dtype=dtype)
    if handle.hook_name and _NOT_RESIDUAL.search(handle.hook_name):  # whatever another name says (hf_hook_name)
        raise not_residual_error(f"The SAE reads hook {handle.hook_name!r}")
    if isinstance(handle.module, nn.Module):  # its training flags are the caller's: encode reads in eval mode
        check_finite_weights(handle)
    return handle


def _is_sae_lens_training_sae(spec: Any) -> bool:
    sae_lens = sys.modules.get("sae_lens")  # a sae-lens object means sae-lens is imported already
    training_sae = getattr(sae_lens, "TrainingSAE", None) if sae_lens is not None else None
    return training_sae is not None and isinstance(spec, training_sae)


def _inference_sae(training_sae: Any, device: torch.device | str | None) -> Any:
    """A sae-lens ``TrainingSAE`` as the inference SAE it saves: its training encode can depend on the batch
    (BatchTopK keeps the top k x batch latents of the whole batch), so scores would change with batch_size."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory(prefix="sts-sae-") as folder:
        training_sae.save_inference_model(folder)
        return SAE.load_from_disk(folder, device=str(device or "cpu"))


def _own_copy_if_moved(module: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    """``module``, or a copy of it when STSConfig(sae_dtype=) casts it or it must move to the model's device: the
    caller's SAE object keeps its dtype and device."""
    param = weights_of(module) if isinstance(module, nn.Module) else None  # a parameter, else a buffer
    if param is None:
        return module
    cast = dtype is not None and param.dtype != dtype
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())  # "cuda" is the current one, not any
    moved = target is not None and (param.device.type != target.type
                                    or target.index is not None and param.device.index != target.index)
    return copy.deepcopy(module) if cast or moved else module


def check_finite_weights(handle: SAEHandle) -> None:
    """A NaN or inf in the SAE's weights makes every score NaN: refuse it, naming the tensors."""
    bad = [name for name, tensor in handle.module.state_dict().items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise STSInputError(f"The SAE's weights {bad} hold NaN or inf (a corrupt file or a diverged training run); "
                            "every score would be NaN. Reload the SAE, or retrain it (sts train-sae).")


def check_sae_for_model(d_in: int, hook_name: str | None, model_hidden_size: int, model_layers: int,
                        layer: int) -> None:
    """Fail early when an SAE of width ``d_in`` (reading ``hook_name``) cannot read this model's residual stream
    at ``layer``."""
    if d_in != model_hidden_size:
        raise STSInputError(
            f"SAE d_in={d_in} does not match the model's hidden size {model_hidden_size}: this SAE was "
            "trained for another model. Use an SAE for this model (or train one with sts_callback.tools.train_sae)."
        )
    if not 0 <= layer < model_layers:
        hook = f" (the SAE reads {hook_name!r})" if hook_name else ""
        raise STSInputError(
            f"Layer {layer} does not exist: the model has {model_layers} decoder layers (0..{model_layers - 1})"
            f"{hook}. Use an SAE trained on this model's residual stream (sts train-sae trains one), or set "
            "STSConfig(layer=) to the layer the SAE was trained on."
        )


def layer_to_read(config_layer: int | None, sae_layer: int | None, hook_name: str | None) -> int:
    """The decoder layer STS reads: ``STSConfig.layer`` where set, else the SAE's own; they must agree."""
    if config_layer is not None and sae_layer is not None and config_layer != sae_layer:
        raise STSConfigError(
            f"STSConfig.layer={config_layer} but the SAE was trained on layer {sae_layer} ({hook_name}); "
            "drop STSConfig.layer or use an SAE for that layer."
        )
    layer = config_layer if config_layer is not None else sae_layer
    if layer is None:
        named = f"its hook name {hook_name!r} names no decoder layer" if hook_name else "it has no hook name"
        raise STSConfigError(f"The SAE does not say which layer it reads ({named}); set STSConfig(layer=...) to "
                             "the decoder layer whose output it was trained on.")
    return layer


def _cfg_hook_names(parsed: dict[str, Any]) -> tuple[str | None, str | None]:
    """(hook name, Hugging Face hook name) a sae-lens cfg.json names (its metadata's, or an older file's top-level
    hook name); None where it names none."""
    metadata = parsed.get("metadata") if isinstance(parsed.get("metadata"), dict) else {}
    hook, hf_hook = metadata.get("hook_name") or parsed.get("hook_name"), metadata.get("hf_hook_name")
    return (hook if isinstance(hook, str) and hook else None, hf_hook if isinstance(hf_hook, str) and hf_hook else None)


def sae_folder_reads(folder: str | Path) -> tuple[int | None, str | None, int | None, int | None]:
    """(d_in, hook name, layer, d_sae) a sae-lens folder's cfg.json names, read without loading the SAE (as
    :func:`_sae_lens_handle` reads them from the loaded one); None where it does not say."""
    try:
        parsed = json.loads((Path(folder) / "cfg.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, None, None, None
    if not isinstance(parsed, dict):
        return None, None, None, None
    hooks = [h for h in _cfg_hook_names(parsed) if h is not None]
    layers = [layer for layer in map(layer_from_hook_name, hooks) if layer is not None]
    d_in, d_sae = parsed.get("d_in"), parsed.get("d_sae")
    return (int(d_in) if type(d_in) is int else None, hooks[0] if hooks else None, layers[0] if layers else None,
            int(d_sae) if type(d_sae) is int else None)
