"""The ``hf`` teacher: the teacher model on the training rank, fed each chunk with its KV cache."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kat_research.rollout.cached_lm import ChunkScorer, chunk_inputs
from kat_research.rollout.teachers.base import TeacherChunk


class HFTeacher:
    """Full-vocabulary scores from a teacher model held by this process."""

    full_vocabulary = True
    topk = None

    def __init__(self, model: PreTrainedModel):
        self.model = model

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> _HFTeacherBatch:
        return _HFTeacherBatch(self.model, prompt_ids, prompt_mask)


class _HFTeacherBatch:
    def __init__(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.scorer = ChunkScorer(model)
        self.prompt_mask = prompt_mask.long()
        self.prompt_len = self.prompt_mask.sum(-1)
        self.scorer.prefill(prompt_ids, self.prompt_mask)

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, start: int) -> TeacherChunk:
        end = start + tokens.shape[1]
        lengths = start + valid.sum(-1)
        mask, pos, _ = chunk_inputs(self.prompt_mask, self.prompt_len, lengths, start, end)
        hidden = self.scorer.feed(tokens, mask, pos)
        return TeacherChunk(logits=self.scorer.head(hidden), hidden=hidden)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.scorer.keep_rows(index)
        self.prompt_mask, self.prompt_len = self.prompt_mask[index], self.prompt_len[index]
