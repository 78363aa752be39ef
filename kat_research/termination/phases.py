"""Split a rollout into pre-agreement / agreement / post-agreement tokens with KAT's detector.

Windows, threshold and counter are exactly KAT's (a :class:`~kat_research.termination.
kat_rule.KATRule`, and :func:`~kat_research.termination.kat.kat_cut` is the only scan used):
window k covers tokens ``[k*stride, k*stride + window)``, a window is low when its finite mean
is ``< threshold``, and the detector fires on the first run of ``patience`` consecutive low
windows. For a rollout of ``length`` tokens:

- **pre-agreement** ``[0, pre_end)``: everything before the detected run; ``pre_end`` is KAT's
  cut (the first token of the run's first window), or ``length`` when the detector never fires;
- **agreement** ``[pre_end, agreement_end)``: the detected run extended while its windows stay
  low; ``agreement_end`` is the end of the run's last low window, i.e. where the first window
  back at or above the threshold (or non-finite) starts adding tokens; if the run lasts to the
  last evaluated window the KL never came back up and ``agreement_end = length``;
- **post-agreement** ``[agreement_end, length)``: what follows.

Used by the stage-wise supervision rule (:class:`~kat_research.termination.marking.
KATPhaseMarker`) and the analyses of ``kat_research.analysis``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kat_research.termination.kat import kat_cut
from kat_research.termination.kat_rule import KATRule

PHASES = ("pre", "agreement", "post")
PRE, AGREEMENT, POST = range(len(PHASES))
PADDING = -1  # phase id of positions past a row's length


@dataclass(frozen=True)
class PhaseSegments:
    """Phase boundaries of one rollout (token indices, end-exclusive)."""

    length: int
    pre_end: int
    agreement_end: int

    @property
    def detected(self) -> bool:
        """Whether the rollout holds an extended low-KL segment (the detector fired)."""
        return self.pre_end < self.length

    @property
    def stays_low(self) -> bool:
        """Detected, and the KL never comes back above the threshold afterwards."""
        return self.detected and self.agreement_end == self.length

    def phase_ids(self, width: int | None = None) -> torch.Tensor:
        """Per-token phase ids [width] (PRE / AGREEMENT / POST, PADDING past ``length``)."""
        width = self.length if width is None else width
        steps = torch.arange(width)
        ids = torch.full((width,), POST, dtype=torch.long)
        ids[steps < self.agreement_end] = AGREEMENT
        ids[steps < self.pre_end] = PRE
        ids[steps >= self.length] = PADDING
        return ids


def agreement_end(kl: torch.Tensor, cut: int, rule: KATRule, *, threshold: float) -> int:
    """End of the low-KL run that KAT detects at ``cut`` in one rollout's KL [length].

    Every run before the detected one is shorter than ``patience``, so for ``p >= patience``
    KAT still cuts at ``cut`` iff the run holds at least ``p`` low windows: a binary search
    over ``p`` finds the run's length with the KAT scan itself.
    """
    length, window, stride = kl.numel(), rule.window, rule.stride
    last_window = (length - window) // stride
    lo, hi = rule.patience, last_window - cut // stride + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kat_cut(kl, replace(rule, patience=mid), threshold) == cut:
            lo = mid
        else:
            hi = mid - 1
    run_end = cut // stride + lo - 1
    return length if run_end == last_window else run_end * stride + window


def segments_at_cut(
    kl: Sequence[float] | torch.Tensor,
    cut: int | None,
    rule: KATRule,
    *,
    threshold: float | None = None,
) -> PhaseSegments:
    """Phase boundaries of one rollout's KL [length] given KAT's cut on it (None: no detection),
    e.g. the cut the online rule found at ``threshold`` (default: the rule's fixed one)."""
    seq = torch.as_tensor(kl, dtype=torch.float64)
    length = seq.numel()
    if cut is None:
        return PhaseSegments(length, length, length)
    threshold = rule.threshold.fixed if threshold is None else threshold
    if threshold is None:
        raise ValueError("segments_at_cut needs a threshold: pass one or fix the rule's")
    return PhaseSegments(length, cut, agreement_end(seq, cut, rule, threshold=threshold))


def segment_phases(
    kl: Sequence[float] | torch.Tensor, rule: KATRule, *, threshold: float | None = None
) -> PhaseSegments:
    """Phase boundaries of one rollout's per-token KL (see the module docstring) at
    ``threshold`` (default: the rule's fixed one)."""
    return segments_at_cut(kl, kat_cut(kl, rule, threshold), rule, threshold=threshold)


def phase_id_matrix(segments: Sequence[PhaseSegments], width: int) -> torch.Tensor:
    """[B, width] phase ids of a batch (PADDING past each row's length)."""
    return torch.stack([s.phase_ids(width) for s in segments])
