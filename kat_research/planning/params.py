"""Parameter counts and the shape facts memory and FLOPs need, from a transformers config.

The model is instantiated on the ``meta`` device (``AutoModelForCausalLM.from_config``): no
weights are allocated or downloaded, and the count is the real module tree's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a causal LM; ``embedding`` is the input embedding plus an untied LM head."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


@dataclass(frozen=True)
class ModelShape:
    """What KV cache, activations and attention FLOPs depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def attn_dim(self) -> int:
        """Width of the attention (query heads x head dim)."""
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def count_params(config: PretrainedConfig) -> ParamCounts:
    """Count the parameters of ``config``'s causal LM, built on the meta device (tied weights
    once)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None and head.weight is not embed else 0
    return ParamCounts(total=total, embedding=embed.numel() + head_params)
