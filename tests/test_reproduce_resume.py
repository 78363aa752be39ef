"""No lost work in sweeps: a sweep killed after its job's first checkpoint lists the job as
`interrupted`, and running the sweep again resumes the job from that checkpoint (not from step
0) in the same folder, ending with the metrics of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kat_research.reproduce import main as reproduce
from kat_research.sweep.state import DONE, job_state

ROOT = Path(__file__).resolve().parent.parent
JOB = Path("smoke") / "ablation_quantile" / "student=small,quantile=0.5,seed=0"
STEPS = 16


def sweep_args(tmp_path: Path, name: str) -> list[str]:
    """One KAT job at smoke scale, 16 steps, a checkpoint every 4, into ``tmp_path/name``."""
    return [
        "ablation_quantile",
        "scale.quantiles=[0.5]",
        "--scale=smoke",
        f"--runs-dir={tmp_path / name / 'runs'}",
        f"--results-dir={tmp_path / name / 'results'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"scale.steps={STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=4",
    ]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "kat_research.reproduce", *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def per_step(folder: Path) -> pd.DataFrame:
    metrics = pd.read_csv(folder / "csv" / "metrics.csv")
    columns = ["train/loss", "train/kl", "len/generated", "kat/threshold", "kat/buffer_size"]
    return metrics.dropna(subset=["train/loss"]).groupby("step")[columns].last()


def checkpointed(folder: Path) -> bool:
    """Whether the job wrote its first checkpoint (step 4: after 4 steps) and the metrics of
    the steps before it. Lightning saves a step's checkpoint before it writes that step's
    metrics: a kill in between loses the metrics of step 3 for good (reported to the training
    side), so the kill waits for them."""
    if not (folder / "checkpoints" / "last.ckpt").exists():  # saved after step000004.ckpt
        return False
    try:
        return 3 in set(pd.read_csv(folder / "csv" / "metrics.csv")["step"])
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False  # not written yet, or being written


def test_a_killed_sweep_job_resumes_from_its_checkpoint(tmp_path, capsys):
    killed = tmp_path / "killed" / "runs" / JOB
    with open(tmp_path / "first.log", "w") as out:
        sweep = subprocess.Popen(
            command(sweep_args(tmp_path, "killed")),
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches every process
        )
    give_up = time.monotonic() + 900
    while not checkpointed(killed):
        assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < give_up, "no checkpoint after 15 minutes"
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert not (killed / "summary.json").exists()  # killed mid-way
    assert json.loads((killed / "status.json").read_text())["state"] == "running"

    assert reproduce([*sweep_args(tmp_path, "killed"), "--no-run"]) == 0
    assert "(1 interrupted); 1 would run" in capsys.readouterr().out

    again = subprocess.run(
        command(sweep_args(tmp_path, "killed")), cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 interrupted); 1 to run" in again.stdout
    assert job_state(killed) == DONE
    resumed = re.search(
        r"resuming from (\S+) \(optimizer step (\d+)\)", (killed / "job.log").read_text()
    )
    assert resumed and Path(resumed[1]).parent == killed / "checkpoints"
    assert 4 <= int(resumed[2]) < STEPS  # from the checkpoint, not from step 0
    assert json.loads((killed / "status.json").read_text())["attempt"] == 2

    assert reproduce(sweep_args(tmp_path, "never_killed")) == 0
    never = tmp_path / "never_killed" / "runs" / JOB
    a, b = per_step(never), per_step(killed)
    assert list(b.index) == list(range(STEPS))  # every step once, in one metrics file
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
    final = [json.loads((f / "summary.json").read_text()) for f in (never, killed)]
    assert final[0]["steps"] == final[1]["steps"] == STEPS
    assert final[0]["eval_after"] == final[1]["eval_after"]
    measured = {k: v for k, v in final[0]["final_metrics"].items() if not k.startswith("perf/")}
    assert measured and {k: final[1]["final_metrics"][k] for k in measured} == pytest.approx(
        measured, rel=1e-5
    )  # perf/*: throughput, a timing
