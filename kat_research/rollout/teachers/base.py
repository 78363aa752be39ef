"""What the rollout engine asks of a teacher: scores of each new chunk of the student's rollout.

A ``TeacherScorer`` lives as long as the engine (it may own an inference engine or a server
connection); for each ``generate`` call it starts a ``TeacherBatch`` over the batch's prompts,
which is fed each chunk of generated tokens once and keeps its own state (a KV cache, or the
sequences a served teacher has seen), so scoring a chunk costs the chunk.

Two kinds of scores: the full-vocabulary logits (``hf``: the teacher model on the training
rank), or the top-k log-probs at every position plus log q of the sampled token (``vllm``: a
served teacher, :mod:`kat_research.rollout.teachers.served`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TeacherChunk:
    """The teacher's scores of a chunk [n, C] (values at invalid positions are undefined).

    Full vocabulary: ``logits`` [n, C, V] (and ``hidden`` [n, C, H], the final hidden states
    they come from). Top-k: ``topk_logprobs`` / ``topk_ids`` [n, C, k], most probable first,
    log q over the whole vocabulary, and ``token_logprobs`` [n, C] = log q(y_t).
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None


class TeacherBatch(Protocol):
    """Teacher state of one batch; its rows are the engine's active rows, in order."""

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, start: int) -> TeacherChunk:
        """Consume generated positions [start, start + C) of every row (``tokens`` [n, C];
        ``valid`` [n, C] marks the positions each row generated) and score them."""
        ...

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (positions in the current row order)."""
        ...


class TeacherScorer(Protocol):
    """Where the teacher's scores come from; lives as long as the engine."""

    full_vocabulary: bool  # True: chunks carry logits (and hidden states); False: top-k only
    topk: int | None  # top-k scorers: log-probs returned per position

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> TeacherBatch:
        """Start scoring continuations of left-padded prompts [B, P]."""
        ...
