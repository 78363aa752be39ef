"""The KAT detector an analysis segments rollouts with, and where its threshold comes from."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from kat_research.termination import kat_window_minimum
from kat_research.termination.phases import PhaseSegments, segment_phases


@dataclass(frozen=True)
class Detector:
    """KAT settings (``stride=None`` means ``window``); ``threshold=None`` means adaptive:
    the ``quantile`` of a buffer of per-rollout minimum window means."""

    window: int = 64
    stride: int | None = None
    patience: int = 4
    exempt: int = 0
    quantile: float = 0.7
    threshold: float | None = None

    @classmethod
    def from_settings(
        cls, base: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
    ) -> Detector:
        """Detector from a run's ``termination.kat``, with the non-null ``overrides`` applied
        (unknown keys of ``base``, e.g. ``buffer_size``, are ignored)."""
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in base.items() if k in names}
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**merged)

    def with_threshold(self, threshold: float) -> Detector:
        return replace(self, threshold=float(threshold))

    def segment_traces(self, traces: Sequence[torch.Tensor]) -> list[PhaseSegments]:
        """Phase boundaries of each KL trace (needs a threshold)."""
        if self.threshold is None:
            raise ValueError("resolve the detector's threshold first (see resolve_threshold)")
        return [
            segment_phases(
                t,
                threshold=self.threshold,
                window=self.window,
                stride=self.stride,
                patience=self.patience,
                exempt=self.exempt,
            )
            for t in traces
        ]

    def minima(self, traces: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each trace's minimum window mean (what it would push into KAT's buffer)."""
        values = [
            kat_window_minimum(t, window=self.window, stride=self.stride, exempt=self.exempt)
            for t in traces
        ]
        return torch.tensor([v for v in values if v is not None], dtype=torch.float64)


def resolve_threshold(
    detector: Detector,
    buffer: torch.Tensor | None,
    traces: Callable[[], Sequence[torch.Tensor]],
) -> tuple[Detector, str]:
    """The detector with a concrete threshold, and where it came from.

    A fixed ``threshold`` wins; else the ``quantile`` of a trained run's KAT ``buffer``;
    else (a run without KAT) the quantile of the minima of the KL traces ``traces()``
    (called only in that case).
    """
    if detector.threshold is not None:
        return detector, "fixed"
    if buffer is not None and buffer.numel():
        source, values = "checkpoint buffer", buffer.double()
    else:
        source, values = "rollout minima", detector.minima(traces())
    if not values.numel():
        raise ValueError(
            f"no window of {detector.window} tokens fits any rollout: lower the window or set "
            "a fixed threshold"
        )
    threshold = float(torch.quantile(values, detector.quantile))
    if not math.isfinite(threshold):
        raise ValueError(f"threshold from {source} is not finite: {threshold}")
    return detector.with_threshold(threshold), source
