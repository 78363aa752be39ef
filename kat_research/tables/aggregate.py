"""Job rows -> a table: mean ± std over seeds per cell, the paper's numbers beside them, and
cells with unfinished jobs reported as missing instead of averaged over fewer seeds.

The input is one record per job (a DataFrame row, e.g. from ``kat_research.sweep.job_records``):
the ``ID_COLUMNS``, one column per sweep axis holding the job's label, and the job's measures
(``kat_research.tables.measures``) when its ``status`` is ``DONE``.

A cell is (row, column): rows are the values of the table's row axes, columns the values of
its column axis. A job without a value for the column axis (e.g. the teacher, shared by both
students) belongs to every column. A cell is complete when every job expected in it is done
and, if the table has seeds, it holds every seed any cell of the table has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kat_research.tables.measures import MEASURES

# of a record (commit: the code the job ran, sweep.job_records)
ID_COLUMNS = ("experiment", "scale", "job", "kind", "role", "status", "folder", "commit")
DONE = "done"  # the status of a finished job: its measures count
MISSING_LABEL = "-"  # row-axis value of jobs that do not set that axis (e.g. KAT in a budget sweep)
TIDY_COLUMNS = (
    "row",
    "column",
    "measure",
    "mean",
    "std",
    "n",
    "expected",
    "missing",
    "paper",
)


@dataclass(frozen=True)
class TableSpec:
    """Layout of a table (the ``table`` section of experiments/<name>.yaml)."""

    rows: tuple[str, ...]  # axes whose values make the rows
    columns: str | None = None  # axis whose values make column groups
    measures: tuple[str, ...] = ("avg@k", "pass@k", "length")
    labels: Mapping[str, str] = field(default_factory=dict)  # value -> display label (row order)
    select: Mapping[str, Sequence[str]] = field(default_factory=dict)  # keep jobs: column -> values
    relative_to: str | None = None  # a value of the first row axis: add measure ratios to it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSpec:
        return cls(
            rows=tuple(data["rows"]),
            columns=data.get("columns"),
            measures=tuple(data.get("measures", cls.measures)),
            labels=dict(data.get("labels") or {}),
            select={k: list(v) for k, v in (data.get("select") or {}).items()},
            relative_to=data.get("relative_to"),
        )

    def label(self, value: str) -> str:
        return self.labels.get(value, value)


def _row_keys(frame: pd.DataFrame, table: TableSpec) -> list[tuple[str, ...]]:
    """Each job's row: its labels on the row axes (``MISSING_LABEL`` where it has none)."""
    parts = [
        frame[a].fillna(MISSING_LABEL).astype(str) if a in frame else [MISSING_LABEL] * len(frame)
        for a in table.rows
    ]
    return list(zip(*parts, strict=True))


def _row_order(key: tuple[str, ...], table: TableSpec) -> list[tuple[int, float]]:
    """Sort key of a row: per axis, its value's position in ``labels`` (unlisted values after
    the listed ones), then its numeric value (non-numbers last); ties keep job order."""
    order = list(table.labels)
    out = []
    for value in key:
        try:
            number = float(value)
        except ValueError:
            number = math.inf
        out.append((order.index(value) if value in order else len(order), number))
    return out


def _describe(job: pd.Series, table: TableSpec) -> str:
    """What tells an unfinished job apart inside its cell, e.g. ``seed=2 (failed)``."""
    skip = {*table.rows, table.columns, *ID_COLUMNS, *MEASURES}
    axes = [a for a in job.index if a not in skip and ":" not in a and isinstance(job[a], str)]
    name = ",".join(f"{a.rsplit('.', 1)[-1]}={job[a]}" for a in axes) or job["job"]
    return f"{name} ({job['status']})"


def reference_value(
    reference: Mapping[str, Any], row: tuple[str, ...], column: str | None, measure: str
) -> float:
    """The paper's number for a cell (``values[row][column][measure]``), NaN if none."""
    key = "/".join(v for v in row if v != MISSING_LABEL)
    cell = (reference.get(key) or {}).get(column if column is not None else "all") or {}
    value = cell.get(measure)
    return float(value) if value is not None else math.nan


def _missing(members: pd.DataFrame, table: TableSpec, seeds: set[str]) -> list[str]:
    """The cell's unfinished jobs, and the table's seeds it has no job for."""
    out = [_describe(job, table) for _, job in members.iterrows() if job.status != DONE]
    if seeds and "seed" in members and members["seed"].notna().any():
        out += [f"seed={s} (no job)" for s in sorted(seeds - set(members["seed"].dropna()))]
    return out


def aggregate(
    records: pd.DataFrame, table: TableSpec, reference: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Tidy table: one row per (row, column, measure) with the row axes and ``TIDY_COLUMNS``.

    Incomplete cells have ``mean`` NaN, ``n`` 0 and ``missing`` listing what is missing;
    ``n`` 0 without ``missing`` means the measure does not apply to the cell's jobs.
    """
    frame = records
    for column, values in table.select.items():
        frame = frame[frame[column].isin(values)]
    keys = _row_keys(frame, table)
    col = table.columns
    groups = [None] if col is None or col not in frame else list(frame[col].dropna().unique())
    seeds = set(frame["seed"].dropna()) if "seed" in frame else set()
    out = []
    for key in sorted(dict.fromkeys(keys), key=lambda k: _row_order(k, table)):
        in_row = frame[[k == key for k in keys]]
        for group in groups:
            if group is not None:
                members = in_row[in_row[col].isna() | (in_row[col] == group)]
            else:
                members = in_row
            if members.empty:
                continue
            missing = _missing(members, table, seeds)
            done = members[members["status"] == DONE]
            for measure in table.measures:
                values = [] if missing or measure not in done else done[measure].dropna()
                out.append(
                    {
                        **dict(zip(table.rows, key, strict=True)),
                        "row": " / ".join(table.label(v) for v in key if v != MISSING_LABEL),
                        "column": group,
                        "measure": measure,
                        "mean": values.mean() if len(values) else math.nan,
                        "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                        "n": len(values),
                        "expected": len(members) + sum(m.endswith("(no job)") for m in missing),
                        "missing": "; ".join(missing),
                        "paper": reference_value(reference or {}, key, group, measure),
                    }
                )
    tidy = pd.DataFrame(out, columns=[*table.rows, *TIDY_COLUMNS])
    return with_ratios(tidy, table) if table.relative_to else tidy


def with_ratios(tidy: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """Append, per column and measure, each row's mean (and paper value) divided by the
    ``relative_to`` row's, as measure ``<measure> / <label>``."""
    base = tidy[tidy[table.rows[0]] == table.relative_to]
    ratios = tidy.copy()
    for name in ("mean", "paper"):
        cells = zip(base["column"], base["measure"], base[name], strict=True)
        lookup = {(c, m): v for c, m, v in cells}
        keys = zip(ratios["column"], ratios["measure"], strict=True)
        denominators = [lookup.get(k, math.nan) for k in keys]
        ratios[name] = ratios[name] / pd.Series(denominators, index=ratios.index, dtype=float)
    ratios["std"] = math.nan
    ratios["measure"] = ratios["measure"] + f" / {table.label(table.relative_to)}"
    return pd.concat([tidy, ratios], ignore_index=True)
