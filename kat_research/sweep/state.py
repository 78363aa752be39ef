"""Where a job lives and how far it got.

A job folder is ``<runs_dir>/<scale>/<experiment>/<job name>/`` and holds ``job.json`` (the job,
written when it is launched), ``status.json`` (state, attempts, timings, error, parameter
counts) and, once finished, ``summary.json``. States:

- ``done``: summary.json exists and the job ran with the current overrides;
- ``stale``: done, but with other overrides (kept unless re-running stale jobs is asked for);
- ``failed``: raised an error; ``incomplete``: started here and never finished (killed);
- ``pending``: handed to an external launcher (e.g. a cluster queue) and not finished yet;
- ``missing``: never launched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from kat_research.layout import JOB_FILE, STATUS_FILE, SUMMARY_FILE, read_json
from kat_research.sweep.spec import Job
from kat_research.tables.aggregate import DONE  # the state whose measures tables count

STALE, FAILED, INCOMPLETE, PENDING, MISSING = (
    "stale",
    "failed",
    "incomplete",
    "pending",
    "missing",
)
TO_RUN = (MISSING, FAILED, INCOMPLETE)  # states a sweep (re-)launches by default
EXTERNAL = "external"  # status.json launcher of jobs handed to a command template


def job_folder(runs_dir: str | Path, job: Job) -> Path:
    return Path(runs_dir) / job.scale / job.experiment / job.name


def job_state(folder: Path, job: Job | None = None) -> str:
    """The state of the job in ``folder``; with ``job``, overrides that differ from the recorded
    ones make a finished job ``stale``."""
    recorded = read_json(folder / JOB_FILE)
    if recorded is None:
        return MISSING
    changed = job is not None and tuple(recorded.get("overrides", ())) != job.overrides
    if (folder / SUMMARY_FILE).exists():
        return STALE if changed else DONE
    status = read_json(folder / STATUS_FILE) or {}
    if status.get("state") == FAILED:
        return FAILED
    if status.get("launcher") == EXTERNAL and not changed:
        return PENDING
    return INCOMPLETE


def prepare_folder(folder: Path, job: Job) -> None:
    """Empty ``folder`` (a previous attempt's files) and record ``job`` in it."""
    previous = read_json(folder / STATUS_FILE) or {}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / JOB_FILE).write_text(json.dumps(job.to_dict(), indent=2))
    write_status(folder, "prepared", attempt=previous.get("attempt", 0) + 1)


def write_status(folder: Path, state: str, **info: Any) -> None:
    """Update status.json: ``state``, the time of the update and ``info``."""
    status = read_json(folder / STATUS_FILE) or {}
    status.update(info, state=state, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    (folder / STATUS_FILE).write_text(json.dumps(status, indent=2))
