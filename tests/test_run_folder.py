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

from kat_research.config import ConfigError
from kat_research.config.checks import check_runnable
from kat_research.lit.checkpoint_hooks import set_peak_lr
from kat_research.lit.resume import CheckpointError, check_checkpoint
from kat_research.training.folder import (
    RunFolderError,
    claim,
    fingerprint,
    hold,
    resume_checkpoint,
    trim_metrics,
)
from kat_research.training.job import train

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


def test_trim_metrics_drops_a_row_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.csv"  # the kill cut the append of step 2 (no newline after it)
    path.write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2")
    assert trim_metrics(path, 2) == 1
    assert path.read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0", "0,1,0.9"]
    path.write_text("epoch,step,train/loss\n0,0,1.0\n0,")  # torn before its step
    assert trim_metrics(path, 5) == 1
    assert path.read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0"]


@pytest.mark.parametrize(
    "override,checkpoints,tensorboard",
    [
        ("callbacks.model_checkpoint=null", False, True),
        ("callbacks.lr_monitor=null", True, True),
        ("logger.tensorboard=null", True, False),
        ("~logger", True, False),  # the LR monitor, which needs a logger, switches off
        ("~callbacks", False, True),
        ("callbacks.progress_bar=null", True, True),
    ],
)
def test_null_disables_a_callback_or_logger(
    debug_config, tmp_path, capfd, override, checkpoints, tensorboard
):
    summary = train(debug_config(tmp_path, override, "export_student=false"))
    assert summary["steps"] == 2
    assert (tmp_path / "checkpoints").exists() == checkpoints
    assert (tmp_path / "tensorboard").exists() == tensorboard
    # no progress bar turns on (Lightning adds its default bar when none is configured)
    err = capfd.readouterr().err
    assert "Epoch" not in err and "it/s" not in err
    if override == "callbacks.progress_bar=null":  # the periodic line reports instead
        assert "kat: step 1/2 (50%)" in err and "tokens/s" in err


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
        ("termination.kat.quantile=1.5", "termination.kat.quantile=1.5"),
        ("+rollout.scor_every=8", "did you mean rollout.score_every"),
        ("+callbacks.model_checkpoint.every_n_train_step=3", "every_n_train_steps"),
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


# --------------------------------------------------------------------------- issue 24


def test_a_held_folder_is_refused_and_a_dead_holder_leaves_it_free(debug_config, tmp_path):
    """A second run on a folder in use is refused before it writes anything; a holder killed
    with -9 leaves no lock behind."""
    with hold(tmp_path):
        with pytest.raises(RunFolderError, match="in use by another run"):
            train(debug_config(tmp_path, "export_student=false"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    code = (
        "import pathlib, sys, time\n"
        "from kat_research.training.folder import hold\n"
        "with hold(pathlib.Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"process {holder.pid} holds"):
            with hold(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with hold(tmp_path):
        pass


def test_the_fingerprint_does_not_depend_on_where_the_folder_is(debug_config, tmp_path):
    here = debug_config(tmp_path / "a", "paths.data_dir=/data/x")
    moved = debug_config(tmp_path / "elsewhere" / "b", "paths.data_dir=/mnt/y")
    assert here.logger.csv.save_dir != moved.logger.csv.save_dir
    assert fingerprint(here) == fingerprint(moved)
    assert fingerprint(here) != fingerprint(debug_config(tmp_path / "a", "seed=1"))
    # a new peak learning rate continues the same run (it takes effect: see below)
    assert fingerprint(here) == fingerprint(
        debug_config(tmp_path / "a", "paths.data_dir=/data/x", "optimizer.lr=1e-6")
    )


def test_a_moved_folder_resumes_from_its_newest_step_not_its_newest_file(
    checkpoints, debug_config, tmp_path
):
    """mv a run folder, touch an old checkpoint, extend the run: it continues from step 3 in the
    new place, with one metrics row per step, one data/* row, and no -v1 checkpoint copies."""
    run = copy_run(checkpoints, tmp_path / "moved")
    os.utime(run / "checkpoints" / "step000001.ckpt", (2e9, 2e9))  # the newest file
    start = resume_checkpoint(run, "auto")
    assert start.step == 3 and start.path.name in ("last.ckpt", "step000003.ckpt")
    cfg = debug_config(run, "trainer.max_steps=4", "logger=csv", "export_student=false")
    assert train(cfg)["steps"] == 4
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    assert list(per_step(run).index) == [0, 1, 2, 3]
    assert metrics["data/n_rows"].notna().sum() == 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", *(f"step00000{i}.ckpt" for i in (1, 2, 3, 4))]


def damage_tensors(path: Path) -> None:
    """Overwrite 4 KiB in the middle of every tensor entry of at least 8 KiB with finite values
    (1,024 float32 0.5s), leaving the zip archive and its pickle intact: the file loads, and
    only the checksum tells."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 8192]
    assert entries
    with open(path, "r+b") as f:
        for info in entries:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data = info.header_offset + 30 + name_len + extra_len
            f.seek(data + info.file_size // 2 - 2048)
            f.write(struct.pack("<f", 0.5) * 1024)


def test_damaged_weights_in_an_intact_checkpoint_are_caught(checkpoints, tmp_path):
    run = copy_run(checkpoints, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    damage_tensors(last)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        check_checkpoint(last)
    start = resume_checkpoint(run, "auto")  # skipped like any broken file
    assert start.path.name == "step000003.ckpt" and start.step == 3


def test_set_peak_lr_rescales_the_optimizer_and_the_schedule():
    checkpoint = {
        "optimizer_states": [{"param_groups": [{"lr": 5e-4, "initial_lr": 1e-3}]}],
        "lr_schedulers": [{"base_lrs": [1e-3], "_last_lr": [5e-4]}],
    }
    assert set_peak_lr(checkpoint, 1e-6) == 1e-3
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(5e-7) and group["initial_lr"] == pytest.approx(1e-6)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-6)]
    assert checkpoint["lr_schedulers"][0]["_last_lr"] == [pytest.approx(5e-7)]
    assert set_peak_lr(checkpoint, 1e-6) is None  # unchanged


def test_a_new_learning_rate_takes_effect_on_resume(checkpoints, debug_config, tmp_path):
    """resume=<step-2 checkpoint of an lr=1e-3 run> optimizer.lr=1e-6: the logged rate of step 2
    is the schedule's at the new peak (warm-up step 3 of 20: 0.15 x peak), not the old one's."""
    cfg = debug_config(
        tmp_path,
        f"resume={checkpoints / 'checkpoints' / 'step000002.ckpt'}",
        "optimizer.lr=1e-6",
        "trainer.max_steps=3",
        "logger=csv",
        "export_student=false",
    )
    train(cfg)
    old = pd.read_csv(checkpoints / "csv" / "metrics.csv").dropna(subset=["lr-AdamW"])
    new = pd.read_csv(tmp_path / "csv" / "metrics.csv").dropna(subset=["lr-AdamW"])
    assert old.set_index("step")["lr-AdamW"][2] == pytest.approx(0.15e-3)
    assert new.set_index("step")["lr-AdamW"][2] == pytest.approx(0.15e-6)


def test_an_interrupted_run_says_how_to_continue(debug_config, tmp_path, monkeypatch, caplog):
    import kat_research.training.job as training

    original = training.OPDModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.trainer.global_step == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training.OPDModule, "training_step", interrupted)
    with pytest.raises(SystemExit), caplog.at_level("WARNING"):
        train(debug_config(tmp_path, "export_student=false", "logger=csv"))
    assert (
        f"interrupted at step 1: run the same command with run_dir={tmp_path} to continue from "
        "its checkpoint of step 1"
    ) in caplog.text


def test_a_data_file_without_usable_rows_fails_before_models_load(debug_config, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"question": "1+1"}\n{"text": "no fields"}\n')
    cfg = debug_config(
        tmp_path / "run",
        "data=local_file",
        f"data.source.path={data}",
        "model.student._target_=no.such.loader",
    )
    with pytest.raises(
        ConfigError, match=r"no rows left for train: skipped 2 of 2 records of .*prompts\.jsonl"
    ):
        train(cfg)


def test_own_data_with_the_default_evaluation_names_eval(compose_config, tmp_path):
    data = ROOT / "tests" / "fixtures" / "data" / "train" / "math_train_rllm.jsonl"
    cfg = compose_config("data=local_file", f"data.source.path={data}")
    with pytest.raises(
        ConfigError, match=r"eval\.evaluator\.task cannot be resolved: .*data\.source\.task.*eval="
    ):
        check_runnable(cfg)


@pytest.mark.parametrize("override", ["logger=null", "callbacks=null"])
def test_a_group_set_to_null_suggests_leaving_it_out(override):
    from kat_research.config.checks import check_overrides

    group = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"write ~{group} to leave"):
        check_overrides(["debug=fast", override])
    check_overrides(["debug=fast", f"~{group}", "eval=none", f"{group}.x=null"])


def test_a_config_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAT_ROOT": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "kat_research.train", "debug=fast", "threads=1"]
    done = subprocess.run(
        [*cmd, "termination.kat.quantile=1.5"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: termination.kat.quantile=1.5 is invalid: quantile must be in (0, 1), got 1.5",
        "(verbose=true shows the traceback)",
    ]
