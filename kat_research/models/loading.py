"""Load students and teachers from a hub id or a local directory, the same way for both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` as a device; None = ``cuda`` when a GPU is visible, else ``cpu``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a config string (``bfloat16``, ``fp32`` …) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded from (for error messages)."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_tokenizer(
    name_or_path: str, *, gguf_file: str | None = None, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; prompts are left-padded for batched generation."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    trainable: bool = True,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """Load ``AutoModelForCausalLM`` + ``AutoTokenizer``.

    ``trainable=False`` (the teacher) freezes every parameter and puts the model in eval mode.
    ``gradient_checkpointing`` (trainable models) recomputes each decoder layer in the backward
    pass instead of keeping its activations: the training pass over long rollouts then holds
    one layer's activations plus every layer's input. Rollouts (eval mode) are unaffected.
    """
    kwargs: dict = {"dtype": resolve_dtype(dtype)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if device is not None:
        model.to(device)
    if not trainable:
        freeze(model)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return LoadedModel(
        name=name_or_path, model=model, tokenizer=load_tokenizer(name_or_path, gguf_file=gguf_file)
    )


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no gradients: how the teacher is always held."""
    model.eval()
    model.requires_grad_(False)
    return model
