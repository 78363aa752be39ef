"""The ``vllm`` teacher: top-k log-probs of each new chunk from a vLLM engine, colocated in this
process (:mod:`~kat_research.rollout.teachers.vllm_engine`) or behind the project's teacher
server (:mod:`~kat_research.rollout.teachers.remote`); both are a :class:`TopKSource`.

Each chunk is sent as the row's whole sequence so far (prompt + every generated token) with
the index of its first new token; the engine reads the earlier tokens' keys/values from its
prefix cache, so a chunk costs the chunk (plus at most one cache block), not the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kat_research.rollout.teachers.base import TeacherChunk


@dataclass
class RowTopK:
    """Scores of positions [first, len) of one sequence (m positions)."""

    topk_logprobs: torch.Tensor  # [m, k] float, log q over the whole vocabulary, descending
    topk_ids: torch.Tensor  # [m, k] long
    token_logprobs: torch.Tensor  # [m] float, log q of the sequence's own token


class TopKSource(Protocol):
    """One client interface for a colocated engine and a teacher server."""

    def score(self, sequences: list[list[int]], first: list[int], k: int) -> list[RowTopK]:
        """Top-``k`` log-probs of positions [first[i], len(sequences[i])) of each sequence."""
        ...

    def info(self) -> dict[str, int]:
        """``vocab_size``, ``max_model_len`` and ``max_logprobs`` (the largest k) of the
        served teacher."""
        ...


class ServedTeacher:
    """Top-k scores of each chunk from a :class:`TopKSource`."""

    full_vocabulary = False

    def __init__(self, source: TopKSource, topk: int):
        if topk < 1:
            raise ValueError(f"teacher.topk must be >= 1, got {topk}")
        self.source = source
        self.topk = topk

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> _ServedBatch:
        return _ServedBatch(self, prompt_ids, prompt_mask)


class _ServedBatch:
    def __init__(self, teacher: ServedTeacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.teacher = teacher
        self.sequences = [
            ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ]

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, start: int) -> TeacherChunk:
        n, width = tokens.shape
        k = self.teacher.topk
        first = [len(seq) for seq in self.sequences]
        for i, row in enumerate(tokens.tolist()):
            self.sequences[i].extend(row[: int(valid[i].sum())])
        asked = [i for i in range(n) if len(self.sequences[i]) > first[i]]
        rows = self.teacher.source.score(
            [self.sequences[i] for i in asked], [first[i] for i in asked], k
        )
        device = tokens.device
        chunk = TeacherChunk(
            topk_logprobs=torch.zeros(n, width, k, device=device),
            topk_ids=torch.zeros(n, width, k, dtype=torch.long, device=device),
            token_logprobs=torch.zeros(n, width, device=device),
        )
        for i, row in zip(asked, rows, strict=True):
            m = row.token_logprobs.shape[0]
            chunk.topk_logprobs[i, :m] = row.topk_logprobs.to(device)
            chunk.topk_ids[i, :m] = row.topk_ids.to(device)
            chunk.token_logprobs[i, :m] = row.token_logprobs.to(device)
        return chunk

    def keep_rows(self, index: torch.Tensor) -> None:
        self.sequences = [self.sequences[i] for i in index.tolist()]
