"""What every student backend provides to the rollout engine, and the rule for when a row ends.

A ``StudentBackend`` lives as long as the engine (it may own an inference server); for each
``generate`` call it starts a ``StudentSampler`` over the batch's prompts. The engine asks the
sampler for one chunk of tokens at a time, then scores the chunk with the teacher and runs the
terminator; everything but the sampling itself is shared by all backends. Partial rollouts
(:mod:`kat_research.rollout.partial`) ask instead for a ``SlotSampler``, whose rows join and
leave between chunks, each at its own depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kat_research.rollout.types import SamplingConfig

BACKENDS = ("hf", "vllm")


def row_ends(
    last_token: torch.Tensor, count: torch.Tensor | int, cap: torch.Tensor, stop_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one rule for when a row stops sampling: ``(ended, at_stop)`` per row.

    A row whose latest token is ``last_token`` after ``count`` tokens (of at most ``cap``)
    ends when that token is a stop id (``at_stop``) or when it reached its cap.
    """
    at_stop = torch.isin(last_token, stop_ids)
    return at_stop | (count == cap), at_stop


@dataclass
class ChunkSample:
    """Up to C tokens sampled for each of n rows. Entries at index >= ``counts[i]`` are
    undefined. ``logits`` are the student's logits predicting each token (kept only when
    the engine computes the KL against a teacher), over at least ``max(counts)`` columns.
    ``ended`` rows stopped sampling (:func:`row_ends`) and were dropped by the sampler;
    ``at_stop`` says which of them ended on a stop token (the others reached their cap)."""

    tokens: torch.Tensor  # [n, C] long
    counts: torch.Tensor  # [n] long, tokens sampled per row (>= 1)
    logprobs: torch.Tensor  # [n, C] float, log p(y_t) at temperature 1
    logits: torch.Tensor | None  # [n, <= C, V]
    ended: torch.Tensor  # [n] bool
    at_stop: torch.Tensor  # [n] bool, implies ended


class StudentSampler(Protocol):
    """Sampling state of one batch. Its rows are the engine's active rows, in order."""

    def sample(
        self,
        start: int,
        n_steps: int,
        remaining: torch.Tensor,
        generator: torch.Generator | None,
    ) -> ChunkSample:
        """Sample generated positions [start, start + n_steps) of every row. Row i stops after
        a stop token or after ``remaining[i]`` tokens (its cap); such rows *end*, are reported
        in ``ChunkSample.ended`` and the sampler drops them itself. Every other row samples
        exactly ``n_steps`` tokens."""
        ...

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (positions in the current row order): rows stopped by
        the terminator."""
        ...


class SlotSampler(Protocol):
    """Sampling state of partial rollouts' live rows, in the driver's row order: rows join
    (``add``) and leave (``keep_rows``) between chunks, each at its own depth. It samples with
    the weights it was started with; after an optimizer step the driver starts a new one and
    adds the carried rows' contexts (prompt + tokens so far)."""

    def add(self, contexts: list[torch.Tensor]) -> None:
        """Append rows whose contexts so far are ``contexts`` (1-D token ids each)."""
        ...

    def sample(
        self, n_steps: int, remaining: torch.Tensor, generator: torch.Generator | None
    ) -> ChunkSample:
        """Sample up to ``n_steps`` tokens of every row, with the student's logits (the driver
        always has a teacher); as :meth:`StudentSampler.sample`, row i ends after a stop token
        or ``remaining[i]`` tokens and ended rows are dropped by the sampler."""
        ...

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (positions in the current row order)."""
        ...


class StudentBackend(Protocol):
    """Where the student's tokens come from; lives as long as the engine."""

    def begin(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        keep_logits: bool,
    ) -> StudentSampler:
        """Start sampling continuations of left-padded prompts [B, P]."""
        ...

    def begin_slots(self, sampling: SamplingConfig) -> SlotSampler:
        """Start sampling rows of partial rollouts (none yet) with the current weights."""
        ...

    def sync_weights(self) -> None:
        """Make the next rollouts use the student's current weights."""
        ...
