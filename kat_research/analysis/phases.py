"""Split a rollout into pre-agreement / agreement / post-agreement tokens with the KAT detector.

Windows, thresholds and the counter are exactly KAT's (:func:`kat_research.termination.kat_cut`
is the only scan used): window k covers tokens ``[k*stride, k*stride + window)``, a window is
low when its finite mean is ``< threshold``, and the detector fires on the first run of
``patience`` consecutive low windows.

For a sequence of ``length`` tokens:

- **pre-agreement** ``[0, pre_end)``: everything before the detected run, where
  ``pre_end`` is KAT's cut (the first token of the run's first window);
- **agreement** ``[pre_end, agreement_end)``: the detected run extended while its windows stay
  low; ``agreement_end`` is the end of the run's last low window, i.e. where the first window
  back at or above the threshold (or non-finite) starts adding tokens; if the run lasts to the
  last evaluated window the KL never came back up and ``agreement_end = length``;
- **post-agreement** ``[agreement_end, length)``: what follows.

Without a detection every token is pre-agreement (``pre_end = agreement_end = length``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kat_research.termination import kat_cut
from kat_research.termination.marking import agreement_end

PHASES = ("pre", "agreement", "post")
PRE, AGREEMENT, POST = range(len(PHASES))
PADDING = -1  # phase id of positions past a row's length


@dataclass(frozen=True)
class PhaseSegments:
    """Phase boundaries of one sequence (token indices, end-exclusive)."""

    length: int
    pre_end: int
    agreement_end: int

    @property
    def detected(self) -> bool:
        """Whether the sequence holds an extended low-KL segment (the detector fired)."""
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


def segment_phases(
    kl: Sequence[float] | torch.Tensor,
    *,
    threshold: float,
    window: int,
    stride: int | None = None,
    patience: int,
    exempt: int = 0,
) -> PhaseSegments:
    """Phase boundaries of one sequence's per-token KL (see the module docstring)."""
    seq = torch.as_tensor(kl, dtype=torch.float64)
    length = seq.numel()
    rule = dict(threshold=threshold, window=window, exempt=exempt)
    cut = kat_cut(seq, stride=stride, patience=patience, **rule)
    if cut is None:
        return PhaseSegments(length, length, length)
    stride = window if stride is None else stride
    end = agreement_end(seq, cut, stride=stride, patience=patience, **rule)
    return PhaseSegments(length, cut, end)


def phase_id_matrix(segments: Sequence[PhaseSegments], width: int) -> torch.Tensor:
    """[B, width] phase ids of a batch (PADDING past each row's length)."""
    return torch.stack([s.phase_ids(width) for s in segments])
