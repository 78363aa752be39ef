"""No lost or mixed work: unique run folders, refusal of another run's folder, auto-resume in the
same folder, broken checkpoints, disabled callbacks/loggers and config values checked before any
model is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kat_research.config import ConfigError, check_runnable
from kat_research.run_folder import (
    CheckpointError,
    RunFolderError,
    check_checkpoint,
    claim,
    resume_checkpoint,
    trim_metrics,
)
from kat_research.training import train

ROOT = Path(__file__).resolve().parent.parent
METRICS = ["train/loss", "train/kl", "len/generated", "kat/threshold", "kat/buffer_size"]


def per_step(folder: Path) -> pd.DataFrame:
    df = pd.read_csv(folder / "csv" / "metrics.csv")
    return df.dropna(subset=["train/loss"]).set_index("step")[METRICS]


def test_runs_launched_at_once_get_their_own_folders(tmp_path):
    """Two `kat_research.train` processes started together, with the same run name, write into
    two folders, each holding one run (before, both shared outputs/<run>/<second>)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAT_ROOT": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        *(sys.executable, "-m", "kat_research.train", "debug=fast", "trainer.max_steps=1"),
        *("logger=csv", "export_student=false", f"paths.cache_dir={tmp_path / 'cache'}"),
    ]
    procs = [
        subprocess.Popen([*cmd, f"seed={seed}"], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        for seed in (0, 1)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    folders = sorted((tmp_path / "outputs" / "kat").iterdir())
    assert len(folders) == 2
    seeds = sorted(json.loads((f / "summary.json").read_text())["seed"] for f in folders)
    assert seeds == [0, 1]
    for folder in folders:
        assert len(pd.read_csv(folder / "csv" / "metrics.csv").dropna(subset=["train/loss"])) == 1


def test_a_folder_of_another_run_is_refused(debug_config, tmp_path):
    claim(tmp_path, debug_config(tmp_path, "seed=0"), "auto")
    with pytest.raises(RunFolderError, match="belongs to another run"):
        claim(tmp_path, debug_config(tmp_path, "seed=1"), "auto")
    # the same run again is an earlier attempt of it; more steps extend it
    assert claim(tmp_path, debug_config(tmp_path, "seed=0", "trainer.max_steps=5"), "auto")
    with pytest.raises(RunFolderError, match="resume=never"):
        claim(tmp_path, debug_config(tmp_path, "seed=0"), "never")


def test_a_folder_with_unrecorded_files_is_refused(debug_config, tmp_path):
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    with pytest.raises(RunFolderError, match="did not record its config"):
        claim(tmp_path, debug_config(tmp_path), "auto")


def test_an_interrupted_run_resumes_in_its_folder(debug_config, tmp_path):
    """A run killed after step 3's metrics but before its checkpoint continues, when started
    again with the same config, from its newest checkpoint in the same folder; its one
    metrics file then equals an uninterrupted run's, without repeated steps."""
    steps = ["trainer.max_steps=4", "method=kat", "logger=csv", "export_student=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(debug_config(full, *steps))
    train(debug_config(killed, *steps))
    # what a kill after step 3 leaves: no summary, no checkpoint after step 2, step 3 logged
    (killed / "summary.json").unlink()
    for name in ("step000003.ckpt", "step000004.ckpt", "last.ckpt"):
        (killed / "checkpoints" / name).unlink()
    summary = train(debug_config(killed, *steps))
    assert summary["steps"] == 4
    a, b = per_step(full), per_step(killed)
    assert list(b.index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)


def test_a_finished_run_is_not_trained_again(debug_config, tmp_path):
    first = train(debug_config(tmp_path, "logger=csv", "export_student=false"))
    mtime = (tmp_path / "checkpoints" / "last.ckpt").stat().st_mtime
    again = train(debug_config(tmp_path, "logger=csv", "export_student=false"))
    assert again == first
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_mtime == mtime


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The checkpoints of a 3-step debug run (one per step, plus last.ckpt)."""
    from kat_research import config

    run = tmp_path_factory.mktemp("ckpt_run")
    cfg = config.compose(
        [
            "debug=fast",
            f"paths.output_dir={run}",
            f"paths.cache_dir={run.parent / 'cache'}",
            "trainer.max_steps=3",
            "logger=csv",
            "export_student=false",
        ]
    )
    train(cfg)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.parametrize("damage", ["empty", "random_bytes", "truncated"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(checkpoints, tmp_path, damage):
    run = copy_run(checkpoints, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(
        {"empty": b"", "random_bytes": os.urandom(4096), "truncated": data[:1000]}[damage]
    )
    os.utime(last, (2e9, 2e9))  # the newest file
    start = resume_checkpoint(run, "auto")
    assert start.path is not None and start.path.name == "step000003.ckpt" and start.step == 3
    with pytest.raises(CheckpointError, match=str(last)):
        check_checkpoint(last)


def test_no_loadable_checkpoint_is_an_error_naming_the_files(checkpoints, tmp_path):
    run = copy_run(checkpoints, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed"):
        resume_checkpoint(run, "auto")


def test_an_explicit_broken_checkpoint_fails_before_models_load(debug_config, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        train(debug_config(tmp_path / "run", f"resume={bad}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trim_metrics_drops_replayed_steps(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2,0.8\n0,2,\n0,3,0.7\n")
    assert trim_metrics(path, 2) == 3
    assert path.read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0", "0,1,0.9"]


@pytest.mark.parametrize(
    "override,checkpoints,tensorboard",
    [
        ("callbacks.model_checkpoint=null", False, True),
        ("callbacks.lr_monitor=null", True, True),
        ("logger.tensorboard=null", True, False),
        ("~logger", True, False),  # the LR monitor, which needs a logger, switches off
        ("~callbacks", False, True),
    ],
)
def test_null_disables_a_callback_or_logger(
    debug_config, tmp_path, override, checkpoints, tensorboard
):
    summary = train(debug_config(tmp_path, override, "export_student=false"))
    assert summary["steps"] == 2
    assert (tmp_path / "checkpoints").exists() == checkpoints
    assert (tmp_path / "tensorboard").exists() == tensorboard


@pytest.mark.parametrize(
    "override,key",
    [
        ("rollout.score_every=0", "rollout.score_every"),
        ("data.batch_size=0", "data.batch_size"),
        ("rollout.temperature=-1", "rollout.temperature"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("loss.kind=nope", "loss.kind"),
        ("optimizer.lr=nan", "optimizer.lr"),
        ("rollout.backend=sglang", "rollout.backend"),
        ("data.batch_size=3", "data.batch_size"),
        ("termination.kat.quantile=1.5", "method.terminator"),
    ],
)
def test_bad_values_fail_before_any_model_loads(debug_config, tmp_path, override, key):
    ranks = ["trainer.devices=2"] if override == "data.batch_size=3" else []
    # a student that cannot be built: had it been loaded first, this would fail differently
    cfg = debug_config(tmp_path, override, *ranks, "model.student._target_=no.such.loader")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_runnable(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
