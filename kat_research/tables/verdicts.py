"""Cut-verdict series: the ``verdict/*`` metrics training jobs log at every step
(``kat_research/lit/cut_verdicts.py``), collected from the jobs' ``csv/metrics.csv`` into one
long table (``<table>.verdicts.csv`` beside a table's files, plotted by
``tables.plots.verdict_figure``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PREFIX = "verdict/"
#: columns of a series besides the ``verdict/*`` measures
KEYS = ("job", "method", "seed", "step")


def job_verdicts(folder: str | Path) -> pd.DataFrame:
    """One job's logged verdicts per step (``step`` and the ``verdict/*`` columns); empty when
    it logged none."""
    path = Path(folder) / "csv" / "metrics.csv"
    if not path.exists():
        return pd.DataFrame()
    metrics = pd.read_csv(path)
    columns = [c for c in metrics if c.startswith(PREFIX)]
    if not columns:
        return pd.DataFrame()
    rows = metrics.dropna(subset=columns, how="all")
    return rows[["step", *columns]].groupby("step", as_index=False).first()


def verdict_series(records: pd.DataFrame) -> pd.DataFrame:
    """The verdicts of every training job of ``records`` (a table's job records: ``job``,
    ``method``, ``seed``, ``folder``) as one table with columns :data:`KEYS` + ``verdict/*``;
    empty when no job logged any."""
    parts = []
    for record in records[records["kind"] == "train"].itertuples(index=False):
        part = job_verdicts(record.folder)
        if not part.empty:
            parts.append(part.assign(job=record.job, method=record.method, seed=record.seed))
    if not parts:
        return pd.DataFrame(columns=list(KEYS))
    series = pd.concat(parts, ignore_index=True)
    return series[[*KEYS, *(c for c in series if c.startswith(PREFIX))]]
