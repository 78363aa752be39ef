"""The project's one plotting style, for result tables and analyses alike: matplotlib's object
API (a ``Figure`` owns its axes, made with ``fig.subplots``: no pyplot state, no display
backend needed), constrained layout, PNG files at 120 dpi."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 120


def new_figure(rows: int, cols: int, *, width: float = 4.5, height: float = 3.0) -> Figure:
    """A figure sized for ``rows`` x ``cols`` panels of ``width`` x ``height`` inches each."""
    return Figure(figsize=(cols * width, rows * height), layout="constrained")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
