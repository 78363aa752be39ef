"""PNG figures of a tidy table (the ``figure`` section of experiments/<name>.yaml).

Kinds: ``scatter`` (measure ``x`` against measure ``y``, one point per row, a panel per column
group: e.g. accuracy against rollout length), ``line`` (measures ``y`` against the numeric row
axis ``x``, a line per remaining row label; rows without a value on ``x`` are dashed
horizontal references) and ``bars`` (measures ``y`` per row, grouped by column). Error bars are
the std over seeds; incomplete cells are left out. :func:`verdict_figure` draws the cut-verdict
series over training (``tables.verdicts``). Drawn in the project's plotting style
(``kat_research.plotting``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kat_research.plotting import new_figure, save_figure
from kat_research.tables.aggregate import MISSING_LABEL, TableSpec
from kat_research.tables.measures import measure_format

PANEL = {"width": 5.0, "height": 4.0}  # inches per panel


def legend(ax: Axes) -> None:
    """A legend of the labelled artists, if any (incomplete cells draw none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _cells(tidy: pd.DataFrame, measure: str) -> pd.DataFrame:
    return tidy[(tidy["measure"] == measure) & tidy["mean"].notna()]


def _groups(tidy: pd.DataFrame) -> list[Any]:
    return list(dict.fromkeys(tidy["column"]))


def _title(group: Any, titles: Mapping[str, str]) -> str:
    return "" if pd.isna(group) else f"{group}: {titles[group]}" if group in titles else group


def scatter(tidy: pd.DataFrame, figure: Mapping[str, Any], titles: Mapping[str, str]) -> Figure:
    x, y = figure["x"], figure["y"]
    groups = _groups(tidy)
    fig = new_figure(1, len(groups), **PANEL)
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        xs = _cells(tidy[tidy["column"] == group], x).set_index("row")
        ys = _cells(tidy[tidy["column"] == group], y).set_index("row")
        for row in xs.index.intersection(ys.index):
            ax.errorbar(
                xs.at[row, "mean"],
                ys.at[row, "mean"],
                xerr=np.nan_to_num(xs.at[row, "std"]),
                yerr=np.nan_to_num(ys.at[row, "std"]),
                fmt="o",
                capsize=3,
                label=row,
            )
        ax.set(xlabel=measure_format(x).title, ylabel=measure_format(y).title)
        ax.set_title(_title(group, titles))
        legend(ax)
    return fig


def line(
    tidy: pd.DataFrame, table: TableSpec, figure: Mapping[str, Any], titles: Mapping[str, str]
) -> Figure:
    x, measures = figure["x"], list(np.atleast_1d(figure["y"]))
    series = [a for a in table.rows if a != x]
    fig = new_figure(1, len(measures), **PANEL)
    axes = fig.subplots(1, len(measures), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        cells = _cells(tidy, measure)
        for key, part in cells.groupby([*series, "column"], dropna=False, sort=False):
            *values, group = key
            names = [table.label(v) for v in values if v != MISSING_LABEL]
            label = " ".join(filter(None, [*names, _title(group, titles)]))
            points = part[part[x] != MISSING_LABEL]
            if points.empty:
                ax.axhline(part["mean"].mean(), linestyle="--", color="gray", label=label)
                continue
            points = points.assign(_x=pd.to_numeric(points[x])).sort_values("_x")
            ax.errorbar(
                points["_x"], points["mean"], yerr=points["std"].fillna(0), marker="o", label=label
            )
        ax.set(xlabel=x.rsplit(".", 1)[-1], ylabel=measure_format(measure).title)
        legend(ax)
    return fig


def bars(tidy: pd.DataFrame, figure: Mapping[str, Any], titles: Mapping[str, str]) -> Figure:
    measures = list(np.atleast_1d(figure["y"]))
    groups = _groups(tidy)
    rows = list(dict.fromkeys(tidy["row"]))
    width = 0.8 / len(groups)
    fig = new_figure(1, len(measures), **PANEL)
    axes = fig.subplots(1, len(measures), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        for i, group in enumerate(groups):
            cells = _cells(tidy[tidy["column"] == group], measure).set_index("row")
            cells = cells.reindex(rows)
            ax.bar(
                np.arange(len(rows)) + i * width,
                cells["mean"],
                width,
                yerr=cells["std"].fillna(0),
                capsize=3,
                label=_title(group, titles) or None,
            )
        ax.set_xticks(np.arange(len(rows)) + width * (len(groups) - 1) / 2, rows, rotation=30)
        ax.set_ylabel(measure_format(measure).title)
        if len(groups) > 1:
            legend(ax)
    return fig


def plot_figure(
    tidy: pd.DataFrame,
    table: TableSpec,
    figure: Mapping[str, Any],
    path: Path,
    *,
    title: str,
    column_titles: Mapping[str, str] | None = None,
) -> Path:
    """Draw ``figure`` from ``tidy`` into ``path`` (PNG)."""
    titles = column_titles or {}
    kind = figure["kind"]
    if kind == "scatter":
        fig = scatter(tidy, figure, titles)
    elif kind == "line":
        fig = line(tidy, table, figure, titles)
    elif kind == "bars":
        fig = bars(tidy, figure, titles)
    else:
        raise ValueError(f"unknown figure kind {kind!r}: scatter, line or bars")
    fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)


#: the cut-verdict measures drawn over training, with their axis titles
VERDICT_PANELS = {
    "verdict/cut_rows": "share of rows cut",
    "verdict/cut_on_derailed": "cut rows whose kept prefix holds an error",
    "verdict/cut_minus_error": "cut - first error (tokens)",
    "verdict/dropped_on_derailed": "share of dropped tokens on derailed prefixes",
}


def verdict_figure(series: pd.DataFrame, path: Path, *, title: str) -> Path:
    """The cut verdicts of ``series`` (``tables.verdicts.verdict_series``) over training steps:
    a panel per measure, a line per method (mean over seeds, band = min..max over seeds)."""
    panels = [m for m in VERDICT_PANELS if m in series]
    if not panels:
        raise ValueError(f"no verdict measures in the series (columns: {list(series)})")
    fig = new_figure(1, len(panels), **PANEL)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, measure in zip(axes[0], panels, strict=True):
        for method, part in series.groupby("method", sort=False):
            stats = part.groupby("step")[measure].agg(["mean", "min", "max"]).dropna()
            if stats.empty:
                continue
            (drawn,) = ax.plot(stats.index, stats["mean"], label=method)
            ax.fill_between(
                stats.index, stats["min"], stats["max"], color=drawn.get_color(), alpha=0.2
            )
        ax.set(xlabel="optimizer step", ylabel=VERDICT_PANELS[measure])
        legend(ax)
    fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)
