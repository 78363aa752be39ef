"""Where a job lives and how far it got.

A job folder is ``<runs_dir>/<scale>/<experiment>/<job name>/``. It holds ``job.json`` (the job,
written when it is first launched), ``status.json`` (state, attempt, the process running it:
pid and host, timings, error, parameter counts), the run's own files (checkpoints, metrics) and,
once finished, ``summary.json``. Launching a job again never empties its folder: the job resumes
from its newest checkpoint (training's ``resume=auto``). Only a folder recorded with other
overrides (a ``stale`` job, re-run on request) is emptied first. States:

- ``done``: summary.json exists (the job ran with the current overrides);
- ``stale``: ran, or started, with other overrides (kept unless re-running stale jobs is asked);
- ``failed``: raised an error (traceback in status.json);
- ``interrupted``: its process died without finishing (killed, machine lost), or it was prepared
  and never started;
- ``running``: its process is alive, or it runs on another host (not checkable from here);
- ``pending``: handed to a queue or a command template and not started yet;
- ``missing``: never launched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from kat_research.layout import JOB_FILE, STATUS_FILE, SUMMARY_FILE, read_json, write_atomic
from kat_research.sweep.spec import Job
from kat_research.tables.aggregate import DONE  # the state whose measures tables count

STALE, FAILED, INTERRUPTED, RUNNING, PENDING, MISSING = (
    "stale",
    "failed",
    "interrupted",
    "running",
    "pending",
    "missing",
)
TO_RUN = (MISSING, FAILED, INTERRUPTED)  # states a sweep (re-)launches by default
# status.json ``state`` values before a job ends (it then writes done or failed)
PREPARED, SUBMITTED = "prepared", "submitted"


def job_folder(runs_dir: str | Path, job: Job) -> Path:
    return Path(runs_dir) / job.scale / job.experiment / job.name


def process_alive(status: dict[str, Any]) -> bool:
    """Whether the process ``status`` names still runs. One on another host counts as alive
    (it cannot be checked from here); this very process is not running a job while it lists."""
    if status.get("host") != socket.gethostname():
        return True
    pid = status.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def running_elsewhere(folder: Path) -> bool:
    """Whether status.json says the job runs on another host."""
    status = read_json(folder / STATUS_FILE) or {}
    return status.get("state") == RUNNING and status.get("host") != socket.gethostname()


def job_state(folder: Path, job: Job | None = None) -> str:
    """The state of the job in ``folder``; with ``job``, a folder recorded with other overrides
    is ``stale``."""
    recorded = read_json(folder / JOB_FILE)
    if recorded is None:
        return MISSING
    if job is not None and tuple(recorded.get("overrides", ())) != job.overrides:
        return STALE
    if (folder / SUMMARY_FILE).exists():
        return DONE
    status = read_json(folder / STATUS_FILE) or {}
    state = status.get("state")
    if state == FAILED:
        return FAILED
    if state == RUNNING:
        return RUNNING if process_alive(status) else INTERRUPTED
    if state == SUBMITTED:
        return PENDING
    return INTERRUPTED


def prepare_folder(folder: Path, job: Job) -> None:
    """Record ``job`` in ``folder`` for a new attempt. An earlier attempt's files stay (the job
    resumes from its checkpoints); a folder recorded with other overrides is emptied first."""
    recorded = read_json(folder / JOB_FILE)
    if recorded is not None and tuple(recorded.get("overrides", ())) != job.overrides:
        shutil.rmtree(folder)
    attempt = (read_json(folder / STATUS_FILE) or {}).get("attempt", 0) + 1
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / JOB_FILE, json.dumps(job.to_dict(), indent=2))
    (folder / STATUS_FILE).unlink(missing_ok=True)  # the previous attempt's state and error
    write_status(folder, PREPARED, attempt=attempt)


def write_status(folder: Path, state: str, **info: Any) -> None:
    """Update status.json: ``state``, the time of the update and ``info``."""
    status = read_json(folder / STATUS_FILE) or {}
    status.update(info, state=state, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_atomic(folder / STATUS_FILE, json.dumps(status, indent=2))
