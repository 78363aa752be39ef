"""A tidy table -> the wide table a reader compares at a glance, written as CSV, Markdown, LaTeX.

``<stem>.csv`` is the tidy table (one line per cell and measure: mean, std, n, expected,
missing, paper); ``<stem>.md`` and ``<stem>.tex`` show, per column group and measure, our
``mean ± std`` over seeds beside the paper's number, and the unfinished cells.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from kat_research.tables.aggregate import TableSpec
from kat_research.tables.measures import measure_format

OURS, PAPER = "ours", "paper"


def format_value(value: float, fmt: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, fmt)


def format_cell(cell: pd.Series, fmt: str) -> str:
    """``mean ± std`` (just the mean for one seed), ``missing: ...``, or empty (n/a)."""
    if cell["missing"]:
        return f"missing: {cell['missing']}"
    mean, std = format_value(cell["mean"], fmt), format_value(cell["std"], fmt)
    return f"{mean} ± {std}" if mean and std else mean


def _measure_title(measure: str) -> str:
    base, _, ratio = measure.partition(" / ")
    title = measure_format(base).title
    return f"{title} / {ratio}" if ratio else title


def _fmt(measure: str) -> str:
    base, _, ratio = measure.partition(" / ")
    return ".2f" if ratio else measure_format(base).fmt


def wide_table(tidy: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """Rows x (column group, measure, ours|paper) of display strings; the paper's columns only
    where the reference has a number."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    rows = list(dict.fromkeys(tidy["row"]))
    for _, cell in tidy.iterrows():
        group = "" if pd.isna(cell["column"]) else str(cell["column"])
        measure = _measure_title(cell["measure"])
        fmt = _fmt(cell["measure"])
        cells.setdefault((group, measure, OURS), {})[cell["row"]] = format_cell(cell, fmt)
        paper = format_value(cell["paper"], fmt)
        if paper:
            cells.setdefault((group, measure, PAPER), {})[cell["row"]] = paper
    order = list(dict.fromkeys((g, m) for g, m, _ in cells))
    columns = [(g, m, k) for g, m in order for k in (OURS, PAPER) if (g, m, k) in cells]
    wide = pd.DataFrame({c: cells[c] for c in columns}, index=rows).fillna("")
    wide.columns = pd.MultiIndex.from_tuples(columns)
    wide.index.name = " / ".join(a.rsplit(".", 1)[-1] for a in table.rows)
    return wide


def _flat_header(column: tuple[str, str, str]) -> str:
    group, measure, kind = column
    return PAPER if kind == PAPER else f"{group} {measure}".strip()


def markdown(wide: pd.DataFrame, title: str, notes: list[str]) -> str:
    """Title, the table (``<group> <measure>`` columns, each followed by the paper's), notes."""
    flat = wide.copy()
    flat.columns = [_flat_header(c) for c in wide.columns]
    body = flat.reset_index().to_markdown(index=False, disable_numparse=True)
    return f"# {title}\n\n{body}\n\n" + "".join(f"- {note}\n" for note in notes)


def latex(wide: pd.DataFrame, title: str) -> str:
    """A booktabs tabular with grouped headers, captioned with ``title``."""
    return wide.to_latex(multicolumn=True, multicolumn_format="c", caption=title, escape=True)


def incomplete_notes(tidy: pd.DataFrame) -> list[str]:
    """One line per incomplete cell (what is missing)."""
    cells = tidy[tidy["missing"] != ""].drop_duplicates(["row", "column"])
    return [
        f"missing cell {c['row']}"
        + ("" if pd.isna(c["column"]) else f" / {c['column']}")
        + f": {c['missing']}"
        for _, c in cells.iterrows()
    ]


def write_table(
    tidy: pd.DataFrame, table: TableSpec, stem: Path, *, title: str, notes: list[str]
) -> str:
    """Write ``stem``.csv/.md/.tex; return the Markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tidy.to_csv(stem.with_suffix(".csv"), index=False)
    wide = wide_table(tidy, table)
    stem.with_suffix(".md").write_text(
        text := markdown(wide, title, [*incomplete_notes(tidy), *notes])
    )
    stem.with_suffix(".tex").write_text(latex(wide, title))
    return text
