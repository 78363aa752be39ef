"""Where an analysis's KAT threshold comes from, and the phases of many traces at once. The
detector itself is the KAT rule (:class:`~kat_research.termination.KATRule`) with a fixed
threshold."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kat_research.termination import KATRule, kat_calibrated
from kat_research.termination.phases import PhaseSegments, segment_phases


def segment_traces(traces: Sequence[torch.Tensor], rule: KATRule) -> list[PhaseSegments]:
    """Phase boundaries of each KL trace (``rule`` with a fixed threshold)."""
    if rule.threshold.fixed is None:
        raise ValueError("resolve the detector's threshold first (see resolve_threshold)")
    return [segment_phases(t, rule) for t in traces]


def resolve_threshold(
    rule: KATRule,
    buffer: torch.Tensor | None,
    traces: Callable[[], Sequence[torch.Tensor]],
) -> tuple[KATRule, str]:
    """The rule with a fixed threshold, and where it came from.

    A fixed threshold wins; else the quantile of a trained run's KAT ``buffer``; else (a run
    without KAT) the quantile of the minima of the KL traces ``traces()`` (called only then).
    """
    if rule.threshold.fixed is not None:
        return rule, "fixed"
    if buffer is not None and buffer.numel():
        source, fixed = "checkpoint buffer", rule.with_fixed_threshold(rule.threshold.of(buffer))
    else:
        source, fixed = "rollout minima", kat_calibrated(rule, traces())
    if not math.isfinite(fixed.threshold.fixed):
        raise ValueError(f"threshold from {source} is not finite: {fixed.threshold.fixed}")
    return fixed, source
