"""One-token decode steps of Llama-family models (Llama, Qwen2, Qwen3) without transformers'
per-call machinery.

A decode step feeds one token per row. For small models most of its time is not arithmetic but
the layers around it: module calls and hooks, a 4-D mask built per forward, a cache object that
concatenates every step. :class:`LeanModel` runs the same tensor operations as transformers'
modules, in the same order and on the model's own weights (RMSNorm in float32, the model's
rotary embedding module, ``scaled_dot_product_attention`` with grouped key/value heads as the
installed transformers handles them) over cache tensors it is given; :class:`LeanDecoder`
keeps a batch's KV cache for it, grown a block of columns at a time (partial rollouts'
``RowCache`` keeps its own). On CPU its logits equal transformers' bit for bit, in float32 and
under bfloat16 autocast (``tests/test_lean_decode.py``); :func:`lean_decode_mismatch` checks a
model once before the rollout engine relies on it.

The prompt is prefilled by transformers' own forward (one call per rollout); the decoder takes
over the cache it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.integrations import sdpa_attention as transformers_sdpa

from kat_research.rollout.cached_lm import CachedLM, prompt_positions

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# how the installed transformers runs one query token against grouped key/value heads with a mask
_TRANSFORMERS_PACKS_GQA = hasattr(transformers_sdpa, "pack_gqa")
CACHE_BLOCK = 64  # columns the cache grows by when it is full (at least)


def lean_unsupported(model: PreTrainedModel) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return (
            f"model type {config.model_type!r} (lean decoding knows {', '.join(LEAN_MODEL_TYPES)})"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp}"
    for layer in model.base_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        projections += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        odd = next((p for p in projections if type(p) is not nn.Linear), None)
        if odd is not None:
            return f"{type(odd).__name__} projections (adapters or quantised layers)"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen RMSNorm: normalised in float32, cast back, then scaled (torch's
    fused ``rms_norm`` returns the same bits as its pow / mean / rsqrt on CPU)."""
    if x.dtype == torch.float32:  # the casts are no-ops; skipping their calls saves time
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one tensor."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query token per row over the cache: q [n, heads, 1, d], k and v [n, kv_heads, L, d],
    mask [n, 1, 1, L] or None; returns [n, 1, heads * d]. Grouped key/value heads are handled as
    the installed transformers' sdpa integration handles them, so that the kernels (and the
    bits) are the same: ``enable_gqa`` without a mask (head size <= 256); otherwise each group's
    query heads folded into query positions of its key/value head (transformers >= 5.2x,
    ``pack_gqa``) or the key/value heads repeated (earlier releases, ``repeat_kv``)."""
    n, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    native = groups > 1 and mask is None and dim <= 256
    if groups > 1 and not native:  # transformers' own helpers, so the shapes are theirs
        if _TRANSFORMERS_PACKS_GQA:
            q = transformers_sdpa.pack_gqa(q, groups)
        else:
            k, v = transformers_sdpa.repeat_kv(k, groups), transformers_sdpa.repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=native)
    return out.reshape(n, heads, 1, dim).transpose(1, 2).reshape(n, 1, heads * dim)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's weights (read once per decoder: attribute lookups through
    ``nn.Module`` cost more than the small matmuls of a decode step)."""

    eps: float
    input_norm: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: torch.Tensor | None  # Qwen3 normalises each head's queries and keys
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qk_norm = hasattr(attn, "q_norm")
        return cls(
            eps=layer.input_layernorm.variance_epsilon,
            input_norm=layer.input_layernorm.weight,
            q=(attn.q_proj.weight, attn.q_proj.bias),
            k=(attn.k_proj.weight, attn.k_proj.bias),
            v=(attn.v_proj.weight, attn.v_proj.bias),
            o=(attn.o_proj.weight, attn.o_proj.bias),
            q_norm=attn.q_norm.weight if qk_norm else None,
            k_norm=attn.k_norm.weight if qk_norm else None,
            post_norm=layer.post_attention_layernorm.weight,
            gate=(mlp.gate_proj.weight, mlp.gate_proj.bias),
            up=(mlp.up_proj.weight, mlp.up_proj.bias),
            down=(mlp.down_proj.weight, mlp.down_proj.bias),
        )


class LeanModel:
    """A Llama-family model's weights for one-token decode steps over a given KV cache. Weights
    are read when this is built, so build one per rollout or chunk (under FSDP the gathered
    weights are other tensors than the sharded ones)."""

    def __init__(self, model: PreTrainedModel):
        body = model.base_model
        self.embed, self.rotary = body.embed_tokens, body.rotary_emb
        self.norm, self.norm_eps = body.norm.weight, body.norm.variance_epsilon
        self.layers = [_Layer.of(layer) for layer in body.layers]
        attn = body.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling

    def step(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        column: int,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Feed ``tokens`` [n] at rotary ``positions`` [n]: each layer's key and value are written
        into column ``column`` of its cache tensors ``keys[i]``, ``values[i]`` [n, kv_heads, >=
        column + 1, d], and the query attends to columns [0, column] where ``mask`` [n, 1, 1,
        column + 1] (bool; None: all) allows. Returns the final hidden states [n, H] predicting
        each row's next token."""
        n, end = tokens.shape[0], column + 1
        hidden = self.embed(tokens[:, None])  # [n, 1, H]
        cos, sin = self.rotary(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        shape = (n, 1, -1, self.head_dim)
        for i, w in enumerate(self.layers):
            x = _rms_norm(hidden, w.input_norm, w.eps)
            q, k = F.linear(x, *w.q).view(shape), F.linear(x, *w.k).view(shape)
            if w.q_norm is not None:
                q, k = _rms_norm(q, w.q_norm, w.eps), _rms_norm(k, w.k_norm, w.eps)
            q = _rotate(q.transpose(1, 2), cos, sin)
            keys[i][:, :, column] = _rotate(k.transpose(1, 2), cos, sin)[:, :, 0]
            values[i][:, :, column] = F.linear(x, *w.v).view(shape).transpose(1, 2)[:, :, 0]
            out = _attention(q, keys[i][:, :, :end], values[i][:, :, :end], mask, self.scaling)
            hidden = hidden + F.linear(out, *w.o)
            x = _rms_norm(hidden, w.post_norm, w.eps)
            gated = F.silu(F.linear(x, *w.gate)) * F.linear(x, *w.up)
            hidden = hidden + F.linear(gated, *w.down)
        return _rms_norm(hidden, self.norm, self.norm_eps)[:, 0]


class LeanDecoder:
    """The KV cache of a batch of rows, advanced one token per row per :meth:`step`.

    Built from a transformers :class:`DynamicCache` after the prompt's prefill; every row sits at
    the same column (left-padded prompts), ``attention_mask`` [n, P + max_new] says which
    columns each row attends to. Weights are read from ``model`` when the decoder is built, so
    build one per rollout (the student's weights change between rollouts).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefilled: DynamicCache,
        attention_mask: torch.Tensor,
        max_length: int,
    ):
        self.model = LeanModel(model)
        self.length = prefilled.layers[0].keys.shape[2]
        self.max_length = max_length
        self.keys = [layer.keys for layer in prefilled.layers]
        self.values = [layer.values for layer in prefilled.layers]
        self.mask = attention_mask.bool()[:, None, None, :]  # [n, 1, 1, P + max_new]
        self.padded = not bool(self.mask.all())  # no padding: attention needs no mask

    def _reserve(self, length: int) -> None:
        """Make room for ``length`` columns (grown by at least CACHE_BLOCK at a time)."""
        capacity = self.keys[0].shape[2]
        if length <= capacity:
            return
        grown = min(self.max_length, max(length, capacity + CACHE_BLOCK))
        pad = (0, 0, 0, grown - capacity)
        self.keys = [F.pad(k, pad) for k in self.keys]
        self.values = [F.pad(v, pad) for v in self.values]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [n] at rotary ``positions`` [n]; return the final hidden states [n, H]
        predicting each row's next token."""
        column = self.length
        self._reserve(column + 1)
        self.length += 1
        mask = self.mask[..., : column + 1] if self.padded else None
        return self.model.step(self.keys, self.values, column, tokens, positions, mask)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (positions in the current row order)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.mask = self.mask[index]
        self.padded = not bool(self.mask.all())


@torch.inference_mode()
def lean_decode_mismatch(
    model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int = 4
) -> float:
    """Largest |logit difference| between :class:`LeanDecoder` and transformers' forward over
    ``steps`` greedy decode steps of the given (left-padded) prompts, relative to the largest
    |logit|; 0.0 when they agree bit for bit."""
    head = model.get_output_embeddings()
    reference = CachedLM(model)
    positions = prompt_positions(prompt_mask)
    hidden = reference.forward(prompt_ids, prompt_mask, positions)[:, -1]
    lean_cache = DynamicCache()
    CachedLM(model).forward(prompt_ids, prompt_mask, positions, lean_cache)
    width = prompt_ids.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompt_mask), steps)], 1)
    lean = LeanDecoder(model, lean_cache, mask, width + steps)
    next_position = prompt_mask.sum(-1)
    worst, scale = 0.0, 1.0
    for t in range(steps):
        logits = head(hidden)
        tokens = logits.argmax(-1)
        hidden = reference.forward(
            tokens[:, None], mask[:, : width + t + 1], (next_position + t)[:, None]
        )[:, -1]
        lean_logits = head(lean.step(tokens, next_position + t)).float()
        ref_logits = head(hidden).float()
        worst = max(worst, (lean_logits - ref_logits).abs().max().item())
        scale = max(scale, ref_logits.abs().max().item())
    return worst / scale
