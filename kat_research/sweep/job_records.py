"""Job folders -> one record (DataFrame row) per job, as ``kat_research.tables`` aggregates
them: identity (``ID_COLUMNS``), axis labels, state and measures.

``job_records(jobs, runs_dir)`` covers the jobs a sweep expects (never-launched ones included,
as ``missing``); ``scan_records(root)`` reads whatever job folders lie below ``root`` (any
sweep, e.g. from a notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kat_research.layout import JOB_FILE, STATUS_FILE, read_json
from kat_research.sweep.spec import Job
from kat_research.sweep.state import DONE, job_folder, job_state
from kat_research.tables.aggregate import ID_COLUMNS
from kat_research.tables.measures import job_measures


def job_record(folder: Path, job: Job, state: str) -> dict:
    """One row: identity, axis labels (columns named by axis), state and (if done) measures."""
    record = {
        "experiment": job.experiment,
        "scale": job.scale,
        "job": job.name,
        "kind": job.kind,
        "role": job.role,
        "status": state,
        "folder": str(folder),
        # the code the job ran (recorded when it started; older jobs did not record it)
        "commit": (read_json(folder / STATUS_FILE) or {}).get("commit", "unknown"),
        **job.axes,
    }
    for axis, title in job.titles.items():
        record[f"{axis}:title"] = title
    if state == DONE:
        record.update(job_measures(folder))
    return record


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    return frame if not frame.empty else pd.DataFrame(columns=list(ID_COLUMNS))


def job_records(jobs: Sequence[Job], runs_dir: str | Path) -> pd.DataFrame:
    """Rows for ``jobs`` (in order), states judged against the jobs' current overrides."""
    rows = []
    for job in jobs:
        folder = job_folder(runs_dir, job)
        rows.append(job_record(folder, job, job_state(folder, job)))
    return _frame(rows)


def scan_records(root: str | Path) -> pd.DataFrame:
    """Rows for every job folder (holding job.json) below ``root``, in sweep order."""
    found = [(path.parent, Job.from_dict(read_json(path))) for path in Path(root).rglob(JOB_FILE)]
    found.sort(key=lambda item: (item[1].scale, item[1].experiment, item[1].order, item[0]))
    return _frame([job_record(folder, job, job_state(folder)) for folder, job in found])
