"""KAT: stop a rollout once its windowed reverse KL stays persistently low.

Window k covers generated tokens ``[k*stride, k*stride + W)`` and is evaluated once
``t = k*stride + W`` tokens exist, with ``z_t`` the mean KL over it; only windows starting at
or after ``exempt`` are evaluated. A counter increments while ``z_t < s`` (strict) and
resets otherwise; at ``patience`` consecutive low windows the rollout stops and the cut
(tokens kept) is the first token of the first window of that run, so the detection point is
``cut + W + (patience - 1) * stride``. A window whose mean is not finite (NaN/inf KL, e.g.
from a non-finite teacher) resets the counter and does not count towards the rollout's
minimum. The adaptive threshold ``s`` is a quantile of a FIFO buffer of per-rollout minima.

The rule's settings are one value, :class:`~kat_research.termination.kat_rule.KATRule`. The
same scan (:func:`_scan`) serves the online :class:`KATTerminator` and the offline
:func:`kat_cuts` / :func:`kat_window_minima` (and their one-rollout forms), so both give
identical cuts; :func:`kat_calibrated` fixes an adaptive rule's threshold on finished rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kat_research.termination.base import Terminator
from kat_research.termination.kat_rule import KATRule


@dataclass
class _ScanState:
    """Per-row scan state: O(1) per row, indexed by original row."""

    counter: torch.Tensor  # long: consecutive low windows
    run_start: torch.Tensor  # long: first token of the current low run
    minimum: torch.Tensor  # float64: min counted window mean, +inf before any
    next_k: torch.Tensor  # long: index of the next window to evaluate
    cut: torch.Tensor  # long: tokens kept once fired, -1 before

    @classmethod
    def fresh(cls, n: int, *, stride: int, exempt: int) -> _ScanState:
        first_k = -(-exempt // stride)  # first window starting at or after ``exempt``
        return cls(
            counter=torch.zeros(n, dtype=torch.long),
            run_start=torch.zeros(n, dtype=torch.long),
            minimum=torch.full((n,), math.inf, dtype=torch.float64),
            next_k=torch.full((n,), first_k, dtype=torch.long),
            cut=torch.full((n,), -1, dtype=torch.long),
        )


def _scan(
    state: _ScanState,
    rows: torch.Tensor,
    kl: torch.Tensor,
    lengths: torch.Tensor,
    *,
    threshold: float,
    rule: KATRule,
) -> torch.Tensor:
    """Evaluate every pending window ending at or before ``lengths`` for ``rows``.

    ``kl`` is [n, t] per-token KL from the first generated token; entries at index >= a row's
    length are never read into a counted window. Rows that already fired are skipped.
    Returns the cut for rows that fire in this call, -1 elsewhere. State is replaced
    out of place (safe across inference-mode boundaries).
    """
    window, stride, patience = rule.window, rule.stride, rule.patience
    rows, lengths = rows.cpu().long(), lengths.cpu().long()
    cut = torch.full((rows.numel(),), -1, dtype=torch.long)
    next_k = state.next_k[rows]
    last_k = torch.div(lengths - window, stride, rounding_mode="floor")
    pending = (state.cut[rows] < 0) & (last_k >= next_k)
    if not bool(pending.any()):
        return cut
    k_lo, k_hi = int(next_k[pending].min()), int(last_k[pending].max())
    span = kl[:, k_lo * stride : k_hi * stride + window].to(torch.float64)
    means = span.unfold(1, window, stride).mean(-1).cpu()  # [n, k_hi - k_lo + 1]

    counter, run_start, minimum = state.counter[rows], state.run_start[rows], state.minimum[rows]
    fired = torch.zeros_like(pending)
    for k in range(k_lo, k_hi + 1):
        live = pending & ~fired & (next_k <= k) & (last_k >= k)
        z = means[:, k - k_lo]
        counted = live & z.isfinite()
        low = counted & (z < threshold)
        counter = torch.where(low, counter + 1, torch.where(live, 0, counter))
        run_start = torch.where(low & (counter == 1), k * stride, run_start)
        minimum = torch.where(counted, torch.minimum(minimum, z), minimum)
        now = live & (counter >= patience)
        cut = torch.where(now, run_start, cut)
        fired |= now

    index = (rows,)
    state.counter = state.counter.index_put(index, counter)
    state.run_start = state.run_start.index_put(index, run_start)
    state.minimum = state.minimum.index_put(index, minimum)
    state.next_k = state.next_k.index_put(index, torch.maximum(next_k, last_k + 1))
    state.cut = state.cut.index_put(index, torch.where(fired, cut, state.cut[rows]))
    return cut


def _padded(traces: Sequence[Sequence[float] | torch.Tensor] | torch.Tensor):
    """[n, T] float64 KL (NaN past each length) and the lengths [n] of ``traces``: a [n, T]
    tensor or a sequence of 1-D traces."""
    if isinstance(traces, torch.Tensor) and traces.ndim == 2:
        kl = traces.to(torch.float64).cpu()
        return kl, torch.full((kl.shape[0],), kl.shape[1], dtype=torch.long)
    seqs = [torch.as_tensor(t, dtype=torch.float64).cpu() for t in traces]
    for seq in seqs:
        if seq.ndim != 1:
            raise ValueError(f"kl must be 1-D, got shape {tuple(seq.shape)}")
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
    kl = torch.full((len(seqs), int(lengths.max()) if seqs else 0), math.nan, dtype=torch.float64)
    for row, seq in enumerate(seqs):
        kl[row, : seq.numel()] = seq
    return kl, lengths


def _scan_all(traces, rule: KATRule, threshold: float) -> _ScanState:
    """The scan over whole finished traces at one fixed ``threshold``; its final state."""
    kl, lengths = _padded(traces)
    state = _ScanState.fresh(kl.shape[0], stride=rule.stride, exempt=rule.exempt)
    _scan(state, torch.arange(kl.shape[0]), kl, lengths, threshold=threshold, rule=rule)
    return state


def _fixed(rule: KATRule, threshold: float | None) -> float:
    threshold = rule.threshold.fixed if threshold is None else threshold
    if threshold is None:
        raise ValueError(
            "an offline KAT scan needs a threshold: pass one, or fix the rule's "
            "(kat_calibrated, or termination.kat.threshold)"
        )
    return float(threshold)


def kat_cuts(traces, rule: KATRule, threshold: float | None = None) -> torch.Tensor:
    """The KAT rule on finished rollouts' KL (a [n, T] tensor or n 1-D traces) at a fixed
    threshold (default: the rule's own fixed one): the cut per trace [n], -1 where it never
    fires."""
    return _scan_all(traces, rule, _fixed(rule, threshold)).cut


def kat_cut(
    kl: Sequence[float] | torch.Tensor, rule: KATRule, threshold: float | None = None
) -> int | None:
    """:func:`kat_cuts` of one rollout: the cut (tokens kept), or None if the rule never fires."""
    cut = int(kat_cuts([kl], rule, threshold)[0])
    return cut if cut >= 0 else None


def kat_window_minima(traces, rule: KATRule) -> torch.Tensor:
    """Each trace's minimum finite window mean [n] (+inf where no window was counted): what a
    finished rollout pushes into KAT's buffer when the rule never fired."""
    return _scan_all(traces, rule, -math.inf).minimum


def kat_window_minimum(
    kl: Sequence[float] | torch.Tensor, rule: KATRule, stop: int | None = None
) -> float | None:
    """Min finite window mean over evaluation points ``t <= stop`` (default: the whole sequence).

    This is what a rollout pushes into the KAT buffer; for a rollout stopped by KAT pass
    ``stop = cut + rule.detection_lag``. None if no window was counted.
    """
    if stop is not None and stop < 0:
        raise ValueError(f"stop must be >= 0, got {stop}")
    minimum = float(kat_window_minima([torch.as_tensor(kl, dtype=torch.float64)[:stop]], rule)[0])
    return minimum if math.isfinite(minimum) else None


def kat_calibrated(rule: KATRule, traces) -> KATRule:
    """``rule`` with a fixed threshold: its own fixed one, else its quantile of the traces'
    minimum window means (a full buffer of these rollouts, as the online rule computes it)."""
    if rule.threshold.fixed is not None:
        return rule
    minima = kat_window_minima(traces, rule)
    minima = minima[minima.isfinite()]
    if not minima.numel():
        raise ValueError(
            f"no window of {rule.window} tokens fits any rollout: lower the window or set a "
            "fixed threshold"
        )
    return rule.with_fixed_threshold(rule.threshold.of(minima))


def _own_rank_only(x: torch.Tensor) -> torch.Tensor:
    """The gather of a single process: its own values."""
    return x


class KATTerminator(Terminator):
    """Online KAT: the scan of ``rule`` at every chunk boundary, with its threshold policy.

    Adaptive policy: threshold = ``torch.quantile(buffer, quantile)`` snapshotted at
    ``begin_batch``; the rule cuts only once the buffer holds >= ``min_buffer`` minima and
    >= ``warmup_steps`` optimizer steps were counted. Minima are collected in every mode
    (pushed in row order at ``end_batch``). With a fixed threshold the rule is always active
    with that threshold and the buffer does not affect it.

    Under data parallelism (``set_gather``) every rank pushes the minima of all ranks' rows,
    in rank order, so buffers and thresholds are identical on every rank and equal to a
    single process's on the union of the ranks' batches.
    """

    needs_kl = True
    supports_partial = True

    def __init__(self, rule: KATRule) -> None:
        if not isinstance(rule, KATRule):
            raise TypeError(f"KATTerminator takes a KATRule (kat_rule(...)), got {rule!r}")
        self.rule = rule
        self._buffer = torch.empty(0, dtype=torch.float64)
        self._steps = 0
        self._batch: _ScanState | None = None
        self._batch_threshold = math.nan
        self._batch_active = False
        self._gather: Callable[[torch.Tensor], torch.Tensor] = _own_rank_only

    @property
    def chunk_hint(self) -> int:
        """Score in chunks of the stride: every evaluation point is a chunk boundary."""
        return self.rule.stride

    @property
    def buffer(self) -> torch.Tensor:
        """The FIFO buffer of per-rollout minima (oldest first); a copy."""
        return self._buffer.clone()

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._snapshot_threshold()
        self._batch = _ScanState.fresh(batch_size, stride=self.rule.stride, exempt=self.rule.exempt)
        return super().begin_batch(batch_size, max_new_tokens, generator)

    def _snapshot_threshold(self) -> None:
        """The threshold and whether the rule is active, from the buffer as it is now."""
        policy = self.rule.threshold
        self._batch_threshold = policy.of(self._buffer)
        self._batch_active = policy.active(self._buffer.numel(), self._steps)

    # partial rollouts: the scan state is per slot and persists across steps; the threshold
    # is snapshotted once per step (as per batch in sync mode) and the minima of the rows that
    # finished during a step enter the buffer at its end, before the next snapshot
    def begin_slots(self, n_slots: int, max_new_tokens: int) -> None:
        self._batch = _ScanState.fresh(n_slots, stride=self.rule.stride, exempt=self.rule.exempt)
        self._finished: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_step(self) -> None:
        self._snapshot_threshold()

    def admit(
        self, slots: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        state = self._current_batch()
        fresh = _ScanState.fresh(slots.numel(), stride=self.rule.stride, exempt=self.rule.exempt)
        index = (slots.cpu().long(),)
        for name in ("counter", "run_start", "minimum", "next_k", "cut"):
            setattr(state, name, getattr(state, name).index_put(index, getattr(fresh, name)))
        return torch.full((slots.numel(),), max_new_tokens, dtype=torch.long)

    def finish(
        self, slots: torch.Tensor, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        state, slots = self._current_batch(), slots.cpu().long()
        self._finished.append((state.minimum[slots].clone(), state.cut[slots].clone()))
        return cut

    def end_step(self) -> dict[str, float]:
        done = self._finished or [(torch.empty(0, dtype=torch.float64), torch.empty(0).long())]
        minimum = self._gather(torch.cat([m for m, _ in done]))
        cut = self._gather(torch.cat([c for _, c in done]))
        self._finished = []
        self._buffer = torch.cat([self._buffer, minimum[minimum.isfinite()]])[
            -self.rule.threshold.buffer_size :
        ]
        return {
            "kat/threshold": self._batch_threshold,
            "kat/buffer_size": float(self._buffer.numel()),
            "kat/active": float(self._batch_active),
            "kat/cut_rows": float((cut >= 0).sum()),
        }

    def observe(self, rows: torch.Tensor, kl: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return _scan(
            self._current_batch(),
            rows,
            kl,
            lengths,
            threshold=self._batch_threshold if self._batch_active else -math.inf,
            rule=self.rule,
        )

    def end_batch(self) -> dict[str, float]:
        batch = self._current_batch()
        minimum, cut = self._gather(batch.minimum), self._gather(batch.cut)
        kept = torch.cat([self._buffer, minimum[minimum.isfinite()]])
        self._buffer = kept[-self.rule.threshold.buffer_size :]
        self._batch = None
        return {
            "kat/threshold": self._batch_threshold,
            "kat/buffer_size": float(self._buffer.numel()),
            "kat/active": float(self._batch_active),
            "kat/cut_rows": float((cut >= 0).sum()),
        }

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._gather = gather

    def on_optimizer_step(self) -> None:
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self._buffer.clone(), "optimizer_steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float64).flatten().cpu()
        self._buffer = buffer[-self.rule.threshold.buffer_size :].clone()
        self._steps = int(state["optimizer_steps"])

    def _current_batch(self) -> _ScanState:
        if self._batch is None:
            raise RuntimeError("KATTerminator: begin_batch must be called before observe/end_batch")
        return self._batch

    def __repr__(self) -> str:
        return f"KATTerminator({self.rule!r})"
