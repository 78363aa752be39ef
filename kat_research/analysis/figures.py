"""What the analyses draw on their figures (phase colours and shading, window means); figures
themselves come from ``kat_research.plotting``, the project's one plotting style."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes

from kat_research.termination.phases import PhaseSegments

PHASE_COLORS = {"pre": "tab:blue", "agreement": "tab:orange", "post": "tab:gray", "random": "k"}


def shade_phases(ax: Axes, segments: PhaseSegments) -> None:
    """Shade a trace's agreement and post-agreement spans (token index on the x axis)."""
    if segments.detected:
        ax.axvspan(
            segments.pre_end, segments.agreement_end, color=PHASE_COLORS["agreement"], alpha=0.25
        )
    if segments.agreement_end < segments.length:
        ax.axvspan(segments.agreement_end, segments.length, color=PHASE_COLORS["post"], alpha=0.2)


def window_means(kl: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(first token k*stride, mean) of each complete window of a trace, for display."""
    starts = np.arange(0, len(kl) - window + 1, stride)
    return starts, np.array([kl[s : s + window].mean() for s in starts])
