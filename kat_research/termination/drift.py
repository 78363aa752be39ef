"""Divergence-triggered truncation (Prune-OPD's idea, arXiv 2605.07804): stop a rollout once
the student's and the teacher's top-k candidate sets stop overlapping.

At every generated position the engine records the overlap ``o_t = |top-k(p_t) & top-k(q_t)|
/ k`` of the student's and the teacher's next-token logits (:func:`topk_overlap`). The rule
scans ``o_t`` with KAT's window scan (``kat._scan``): window means over ``window`` tokens every
``stride`` tokens, and the rollout stops at ``patience`` consecutive windows whose mean is
below ``threshold``; the tokens before the first window of that run are kept. This is KAT's
opposite trigger: KAT cuts where the two models agree (KL persistently low), this rule where
they drift apart (overlap persistently low). On a finished rollout the same rule is
``kat_cut(overlap, drift.scan.with_fixed_threshold(drift.threshold))``. What is taken from the
paper and what is a guess is in docs/paper.md ("Other termination rules").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from kat_research.termination.base import Terminator, signal
from kat_research.termination.kat import _own_rank_only, _scan, _ScanState
from kat_research.termination.kat_rule import KATRule


def topk_overlap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int
) -> torch.Tensor:
    """Share of the teacher's top-``k`` tokens that are also in the student's top-``k`` [N],
    for logits [N, V] (``k`` is capped at V; ties are broken by ``torch.topk``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, student_logits.shape[-1])
    return topk_overlap_with(student_logits, teacher_logits.float().topk(k, dim=-1).indices)


def topk_overlap_with(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """Share of the teacher's top tokens ``teacher_topk_ids`` [N, k] (a served teacher's, or
    :func:`topk_overlap`'s) that are also in the student's top-``k`` of its logits [N, V]."""
    k = teacher_topk_ids.shape[-1]
    s = student_logits.float().topk(k, dim=-1).indices
    return (s[:, :, None] == teacher_topk_ids[:, None, :]).any(-1).sum(-1).float() / k


class OverlapDriftTerminator(Terminator):
    """Stop a rollout once its windowed top-k overlap stays below ``threshold``.

    Args:
        k: size of each model's candidate set.
        threshold: a window whose mean overlap is below this (strict) counts as drifted.
        window, stride, patience, exempt: the window scan, a :class:`KATRule` value as KAT's
            (its threshold policy unused: the threshold here is fixed).
    """

    needs_kl = False
    signals = ("topk_overlap",)

    def __init__(
        self,
        k: int = 8,
        threshold: float = 0.5,
        window: int = 64,
        stride: int | None = None,
        patience: int = 1,
        exempt: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.scan = KATRule(window, stride, patience, exempt)  # type: ignore[arg-type]
        self.overlap_k, self.threshold = k, float(threshold)
        self.window, self.stride = self.scan.window, self.scan.stride
        self.patience, self.exempt = patience, exempt
        self._batch: _ScanState | None = None
        self._gather: Callable[[torch.Tensor], torch.Tensor] = _own_rank_only

    @property
    def chunk_hint(self) -> int:
        """Score in chunks of the stride: every evaluation point is a chunk boundary."""
        return self.stride

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._batch = _ScanState.fresh(batch_size, stride=self.stride, exempt=self.exempt)
        return super().begin_batch(batch_size, max_new_tokens, generator)

    def observe(
        self,
        rows: torch.Tensor,
        kl: torch.Tensor,
        lengths: torch.Tensor,
        signals: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return _scan(
            self._current_batch(),
            rows,
            signal(self, signals, "topk_overlap"),
            lengths,
            threshold=self.threshold,
            rule=self.scan,
        )

    def end_batch(self) -> dict[str, float]:
        batch = self._current_batch()
        minimum, cut = self._gather(batch.minimum), self._gather(batch.cut)
        finite = minimum[minimum.isfinite()]
        self._batch = None
        return {
            "drift/cut_rows": float((cut >= 0).sum()),
            "drift/min_window_overlap": float(finite.mean()) if finite.numel() else math.nan,
        }

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._gather = gather

    def _current_batch(self) -> _ScanState:
        if self._batch is None:
            raise RuntimeError(
                "OverlapDriftTerminator: begin_batch must be called before observe/end_batch"
            )
        return self._batch

    def __repr__(self) -> str:
        return (
            f"OverlapDriftTerminator(k={self.overlap_k}, threshold={self.threshold}, "
            f"window={self.window}, stride={self.stride}, patience={self.patience}, "
            f"exempt={self.exempt})"
        )
