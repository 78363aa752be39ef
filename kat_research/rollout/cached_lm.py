"""Causal LMs advanced incrementally over a shrinking set of rows, each with its own KV cache."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts: 0 at each row's first real token."""
    return (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)


def chunk_inputs(
    prompt_mask: torch.Tensor, prompt_len: torch.Tensor, lengths: torch.Tensor, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention mask [n, P+end], position ids [n, end-start] and validity [n, end-start] for
    feeding generated tokens [start, end) of rows that generated ``lengths`` tokens; positions
    at or past a row's length are padding (masked out, not valid)."""
    device = prompt_mask.device
    steps = torch.arange(start, end, device=device)
    valid = steps[None, :] < lengths[:, None]
    generated = torch.arange(end, device=device)[None, :] < lengths[:, None]
    mask = torch.cat([prompt_mask, generated.long()], dim=1)
    return mask, prompt_len[:, None] + steps[None, :], valid


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` in recent
    transformers 5.x (5.24 deprecates the old name) or ``past_key_values`` in earlier releases
    (5.17 on the GPU machine, 5.19 in the vLLM venv). Chosen from the signature, not the version."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class CachedLM:
    """A causal LM fed new tokens of its rows; rows can be dropped from its cache.

    Logits are computed from the final hidden states through the output embedding, only
    where they are needed (``check_head_reproduces_logits`` verifies this equals the
    model's own logits).
    """

    def __init__(self, model: PreTrainedModel):
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.cache = DynamicCache()
        self.cache_arg = cache_argument(self.body)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Feed new tokens [n, L]; return final hidden states [n, L, H]. The cache object
        (``cache``, default the model's own) is updated in place."""
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache if cache is None else cache},
        )
        return out.last_hidden_state

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only cache rows ``index`` (positions in the current row order)."""
        if index.numel():  # an emptied cache is never fed again
            self.cache.batch_select_indices(index)


class ChunkScorer(CachedLM):
    """Follows given sequences chunk by chunk and returns, for each fed token, the hidden
    state that predicts it (the teacher online, or the student re-scoring tokens that
    another engine sampled)."""

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Consume left-padded prompts; keep the state predicting each row's first token."""
        hidden = self.forward(prompt_ids, prompt_mask, prompt_positions(prompt_mask))
        self.next_hidden = hidden[:, -1]

    def feed(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Consume a chunk [n, C]; return the hidden states [n, C, H] predicting its tokens."""
        hidden = self.forward(tokens, attention_mask, position_ids)
        predicting = torch.cat([self.next_hidden[:, None], hidden[:, :-1]], dim=1)
        self.next_hidden = hidden[:, -1]
        return predicting

    def keep_rows(self, index: torch.Tensor) -> None:
        super().keep_rows(index)
        self.next_hidden = self.next_hidden[index]
