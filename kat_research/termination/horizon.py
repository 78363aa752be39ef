"""A progressive rollout horizon (progressive OPD, "Are Full Rollouts Necessary for On-Policy
Distillation?", arXiv 2605.31490): every rollout is capped at a horizon that grows over
training, from ``start`` tokens at the first optimizer step to ``end`` after ``ramp_steps``.

The cap of optimizer step ``s`` is ``start + floor((end - start) * min(s / ramp_steps, 1))``,
clipped to the rollout's ``max_new_tokens`` (``end`` None = ``max_new_tokens``). A row reaching
its cap stops and keeps all its tokens, as under :class:`~kat_research.termination.FixedPrefix`
(a fixed horizon, the paper's truncated OPD, is ``FixedPrefix``). What is taken from the paper
and what is a guess is in docs/paper.md ("Other termination rules").
"""

from __future__ import annotations

from typing import Any

import torch

from kat_research.termination.base import Terminator


class ProgressiveHorizon(Terminator):
    """Cap every rollout at a horizon grown linearly over optimizer steps (module docstring)."""

    def __init__(self, start: int, end: int | None = None, ramp_steps: int = 100) -> None:
        if start < 1:
            raise ValueError(f"start must be >= 1, got {start}")
        if end is not None and end < start:
            raise ValueError(f"end must be >= start = {start}, got {end}")
        if ramp_steps < 1:
            raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")
        self.start, self.end, self.ramp_steps = start, end, ramp_steps
        self._steps = 0
        self._cap = start

    def horizon(self, step: int, max_new_tokens: int) -> int:
        """The cap at optimizer step ``step`` for rollouts of at most ``max_new_tokens``."""
        end = max_new_tokens if self.end is None else self.end
        end = max(end, self.start)
        grown = (end - self.start) * min(step, self.ramp_steps) // self.ramp_steps
        return min(self.start + grown, max_new_tokens)

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._cap = self.horizon(self._steps, max_new_tokens)
        return torch.full((batch_size,), self._cap, dtype=torch.long)

    def end_batch(self) -> dict[str, float]:
        return {"horizon/cap": float(self._cap)}

    def on_optimizer_step(self) -> None:
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state["optimizer_steps"])

    def __repr__(self) -> str:
        return (
            f"ProgressiveHorizon(start={self.start}, end={self.end}, ramp_steps={self.ramp_steps})"
        )
