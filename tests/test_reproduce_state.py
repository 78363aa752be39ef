"""Job states read from hand-written job folders: a dead process is `interrupted`, not
`running`; relaunching keeps an earlier attempt's checkpoints; other overrides make a job
`stale` and only re-running it on request empties its folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kat_research.layout import CHECKPOINT_DIR, JOB_FILE, STATUS_FILE, SUMMARY_FILE
from kat_research.sweep.spec import Job
from kat_research.sweep.state import (
    DONE,
    FAILED,
    INTERRUPTED,
    MISSING,
    PENDING,
    RUNNING,
    STALE,
    job_state,
    prepare_folder,
    running_elsewhere,
)

JOB = Job(experiment="e", scale="smoke", name="seed=0", kind="train", role=None, axes={},
          overrides=("scale=smoke", "seed=0"))  # fmt: skip


def folder_with(tmp_path: Path, status: dict | None, job: Job = JOB) -> Path:
    folder = tmp_path / "job"
    folder.mkdir(exist_ok=True)
    (folder / JOB_FILE).write_text(json.dumps(job.to_dict()))
    if status is not None:
        (folder / STATUS_FILE).write_text(json.dumps(status))
    return folder


def here(pid: int) -> dict:
    return {"state": "running", "pid": pid, "host": socket.gethostname()}


def test_states_from_status_files(tmp_path):
    assert job_state(tmp_path / "none", JOB) == MISSING
    assert job_state(folder_with(tmp_path, {"state": "failed", "error": "x"}), JOB) == FAILED
    assert job_state(folder_with(tmp_path, {"state": "submitted"}), JOB) == PENDING
    assert job_state(folder_with(tmp_path, {"state": "prepared"}), JOB) == INTERRUPTED
    assert job_state(folder_with(tmp_path, None), JOB) == INTERRUPTED
    other = {"state": "running", "pid": 1, "host": "another-host"}
    folder = folder_with(tmp_path, other)
    assert job_state(folder, JOB) == RUNNING and running_elsewhere(folder)
    (folder / SUMMARY_FILE).write_text("{}")
    assert job_state(folder, JOB) == DONE


def test_a_running_job_whose_process_died_is_interrupted(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = folder_with(tmp_path, here(child.pid))
        assert job_state(folder, JOB) == RUNNING and not running_elsewhere(folder)
    finally:
        child.kill()
        child.wait()
    assert job_state(folder, JOB) == INTERRUPTED
    # this process lists jobs; it is not running one
    assert job_state(folder_with(tmp_path, here(os.getpid())), JOB) == INTERRUPTED


def test_other_overrides_make_any_recorded_job_stale(tmp_path):
    changed = Job(**{**JOB.to_dict(), "overrides": ("scale=smoke", "seed=0", "optimizer.lr=1")})
    folder = folder_with(tmp_path, {"state": "running", "pid": 1, "host": "another-host"})
    assert job_state(folder, changed) == STALE
    assert job_state(folder) == RUNNING  # without a job to compare with


@pytest.mark.parametrize("previous", [{"state": "failed", "error": "boom"}, here(2**22 + 1)])
def test_relaunching_keeps_the_checkpoints_of_the_same_job(tmp_path, previous):
    folder = folder_with(tmp_path, {**previous, "attempt": 1})
    (folder / CHECKPOINT_DIR).mkdir()
    (folder / CHECKPOINT_DIR / "step000002.ckpt").write_bytes(b"weights")
    prepare_folder(folder, JOB)
    assert (folder / CHECKPOINT_DIR / "step000002.ckpt").read_bytes() == b"weights"
    status = json.loads((folder / STATUS_FILE).read_text())
    assert status["attempt"] == 2 and status["state"] == "prepared" and "error" not in status


def test_rerunning_a_stale_job_starts_it_afresh(tmp_path):
    folder = folder_with(tmp_path, {"state": "done", "attempt": 3})
    (folder / SUMMARY_FILE).write_text("{}")
    (folder / CHECKPOINT_DIR).mkdir()
    changed = Job(**{**JOB.to_dict(), "overrides": ("scale=smoke", "seed=0", "optimizer.lr=1")})
    prepare_folder(folder, changed)
    assert sorted(p.name for p in folder.iterdir()) == [JOB_FILE, STATUS_FILE]
    assert json.loads((folder / JOB_FILE).read_text())["overrides"] == list(changed.overrides)
    assert json.loads((folder / STATUS_FILE).read_text())["attempt"] == 1
