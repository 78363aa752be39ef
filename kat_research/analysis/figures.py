"""Figure helpers: matplotlib's object API (no pyplot state, no display backend needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kat_research.termination.phases import PhaseSegments

PHASE_COLORS = {"pre": "tab:blue", "agreement": "tab:orange", "post": "tab:gray", "random": "k"}


def new_figure(rows: int, cols: int, *, width: float = 4.5, height: float = 3.0) -> Figure:
    """A figure of ``rows`` x ``cols`` panels of ``width`` x ``height`` inches each."""
    return Figure(figsize=(cols * width, rows * height), layout="constrained")


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


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
