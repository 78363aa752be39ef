"""A student-only repetition filter (prime-rl's ``RepetitionFilter``, after MiniMax-M1, arXiv
2506.13585 §3.2): a rollout whose student sampled ``window`` consecutive tokens each with
probability above ``prob_threshold`` is taken to be stuck in a loop.

prime-rl applies it to finished rollouts and masks a flagged rollout whole; here it runs online
at every teacher-scoring chunk, stops the rollout when the run reaches ``window`` tokens, and
keeps the tokens before the run (``keep_prefix``; false keeps none, prime-rl's masking). The
probability is the student's at temperature 1 of the sampled token (the engine's
``student_logprob`` signal); the teacher is not consulted. What is taken from the sources and
what is a guess is in docs/paper.md ("Other termination rules").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from kat_research.termination.base import Terminator, signal
from kat_research.termination.kat import _own_rank_only


class _RunState:
    """Per-row state of the run scan: current run length and start, tokens scanned, cut."""

    def __init__(self, n: int) -> None:
        self.run = torch.zeros(n, dtype=torch.long)
        self.run_start = torch.zeros(n, dtype=torch.long)
        self.scanned = torch.zeros(n, dtype=torch.long)
        self.cut = torch.full((n,), -1, dtype=torch.long)


def _scan_runs(
    state: _RunState,
    rows: torch.Tensor,
    logprobs: torch.Tensor,
    lengths: torch.Tensor,
    *,
    log_threshold: float,
    window: int,
    keep_prefix: bool,
) -> torch.Tensor:
    """Advance the run scan of ``rows`` over their tokens not scanned yet; return the cut of rows
    whose run reaches ``window`` in this call, -1 elsewhere. A token counts when its log-prob is
    above ``log_threshold`` (strict; NaN never counts)."""
    rows, lengths = rows.cpu().long(), lengths.cpu().long()
    lp = logprobs.detach().to(torch.float64).cpu()
    run, start = state.run[rows], state.run_start[rows]
    scanned, done = state.scanned[rows], state.cut[rows] >= 0
    cut = torch.full((rows.numel(),), -1, dtype=torch.long)
    lo = int(scanned.min()) if rows.numel() else 0
    for t in range(lo, int(lengths.max()) if rows.numel() else 0):
        live = ~done & (scanned <= t) & (t < lengths)
        high = live & (lp[:, t] > log_threshold)
        run = torch.where(high, run + 1, torch.where(live, 0, run))
        start = torch.where(high & (run == 1), t, start)
        now = live & (run >= window)
        cut = torch.where(now, start if keep_prefix else torch.zeros_like(start), cut)
        done |= now
    index = (rows,)  # state replaced out of place, as KAT's (safe across inference mode)
    state.run = state.run.index_put(index, run)
    state.run_start = state.run_start.index_put(index, start)
    state.scanned = state.scanned.index_put(index, torch.maximum(scanned, lengths))
    state.cut = state.cut.index_put(index, torch.where(cut >= 0, cut, state.cut[rows]))
    return cut


def repetition_cut(
    logprobs: Sequence[float] | torch.Tensor,
    *,
    window: int,
    prob_threshold: float,
    keep_prefix: bool = True,
) -> int | None:
    """The rule on one finished rollout's student log-probs: the cut, or None if it never fires."""
    seq = torch.as_tensor(logprobs, dtype=torch.float64)
    rule = RepetitionFilter(window, prob_threshold, keep_prefix)
    state = _RunState(1)
    cut = _scan_runs(
        state,
        torch.zeros(1, dtype=torch.long),
        seq[None],
        torch.tensor([seq.numel()]),
        log_threshold=rule.log_threshold,
        window=window,
        keep_prefix=keep_prefix,
    )
    return int(cut[0]) if cut[0] >= 0 else None


class RepetitionFilter(Terminator):
    """Stop a rollout after ``window`` consecutive student tokens of probability > threshold."""

    needs_kl = False
    signals = ("student_logprob",)

    def __init__(
        self, window: int = 3000, prob_threshold: float = 0.99, keep_prefix: bool = True
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 < prob_threshold <= 1:
            raise ValueError(f"prob_threshold must be in (0, 1], got {prob_threshold}")
        self.window, self.prob_threshold, self.keep_prefix = window, prob_threshold, keep_prefix
        self.log_threshold = math.log(prob_threshold)
        self._batch: _RunState | None = None
        self._gather: Callable[[torch.Tensor], torch.Tensor] = _own_rank_only

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._batch = _RunState(batch_size)
        return super().begin_batch(batch_size, max_new_tokens, generator)

    def observe(
        self,
        rows: torch.Tensor,
        kl: torch.Tensor,
        lengths: torch.Tensor,
        signals: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return _scan_runs(
            self._current_batch(),
            rows,
            signal(self, signals, "student_logprob"),
            lengths,
            log_threshold=self.log_threshold,
            window=self.window,
            keep_prefix=self.keep_prefix,
        )

    def end_batch(self) -> dict[str, float]:
        cut = self._gather(self._current_batch().cut)
        self._batch = None
        return {"repetition/cut_rows": float((cut >= 0).sum())}

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._gather = gather

    def _current_batch(self) -> _RunState:
        if self._batch is None:
            raise RuntimeError("RepetitionFilter: begin_batch must be called before observe")
        return self._batch

    def __repr__(self) -> str:
        return (
            f"RepetitionFilter(window={self.window}, prob_threshold={self.prob_threshold}, "
            f"keep_prefix={self.keep_prefix})"
        )
