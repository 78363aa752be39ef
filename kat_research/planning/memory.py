"""GPU memory of an OPD rank, in bytes, by component (data-parallel: every rank holds both
models and the whole optimizer state).

- weights, gradients, AdamW's two moments: N x bytes each (torch keeps gradients and moments in
  the parameter dtype); with an fp32 master copy (mixed-precision training of 16-bit weights)
  add 4 N and keep the moments in fp32: the usual 16 bytes per parameter for bf16.
- KV cache: layers x 2 x kv_heads x head_dim x bytes per cached token, for each model.
- activations of the student's training pass, saved for backward: per token and layer, with a
  fused (SDPA / flash) attention that stores no [ctx, ctx] matrix,
  4 hidden (norm inputs and outputs) + 3 attn_dim (q before and after its norm, attention
  output) + 3 kv_dim (k before and after its norm, v) + 4 intermediate (gate, up, silu(gate),
  their product) elements; with gradient checkpointing, each layer's input (hidden elements)
  plus one layer's full set, recomputed during backward.
- the chunked loss: a few [chunk, vocab] float32 blocks (logits, log-probabilities and their
  gradients, for student and teacher).
"""

from __future__ import annotations

from kat_research.models.loading import resolve_dtype
from kat_research.planning.params import ModelShape

GIB = 2**30


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a config dtype name (``bfloat16``, ``fp32`` ...)."""
    return resolve_dtype(dtype).itemsize


def training_state_bytes(n_params: int, weight_bytes: int, fp32_master: bool) -> dict[str, int]:
    """Weights, gradients, AdamW moments and the fp32 master copy of a trained model."""
    moment_bytes = 4 if fp32_master else weight_bytes
    return {
        "weights": n_params * weight_bytes,
        "grads": n_params * weight_bytes,
        "adamw": 2 * n_params * moment_bytes,
        "fp32_master": 4 * n_params if fp32_master else 0,
    }


def kv_cache_bytes(shape: ModelShape, tokens: int, element_bytes: int) -> int:
    """KV cache holding ``tokens`` tokens (summed over rows)."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * element_bytes * tokens


def activation_bytes(
    shape: ModelShape, tokens: int, element_bytes: int, checkpointed: bool = False
) -> int:
    """Activations a training forward over ``tokens`` tokens saves for backward."""
    kv_dim = shape.kv_heads * shape.head_dim
    per_layer = 4 * shape.hidden + 3 * shape.attn_dim + 3 * kv_dim + 4 * shape.intermediate
    if checkpointed:
        return (shape.layers * shape.hidden + per_layer) * element_bytes * tokens
    return shape.layers * per_layer * element_bytes * tokens


def loss_chunk_bytes(chunk_size: int, vocab: int, blocks: int) -> int:
    """``blocks`` float32 [chunk_size, vocab] tensors of the chunked loss."""
    return blocks * chunk_size * vocab * 4


def teacher_target_bytes(keep: str, tokens: int, hidden: int, element_bytes: int, k: int) -> int:
    """What the rollout keeps of the teacher for the loss over ``tokens`` generated tokens:
    final hidden states (``hidden``), top-k float32 log-probs + int64 ids (``topk``) or nothing."""
    per_token = {"hidden": hidden * element_bytes, "topk": k * (4 + 8), "none": 0}[keep]
    return per_token * tokens
