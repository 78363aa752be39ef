"""The training pipeline end to end on tiny random models: every method, resume, multirun,
exports, and the errors a config that cannot run must raise before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kat_research.config import ConfigError
from kat_research.models import VocabularyMismatchError, build_char_tokenizer, save_tiny_model
from kat_research.training.job import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "method", ["opd", "random_term", "fixed_prefix", "topk_lsm", "kat", "kat_fixed_prefix"]
)
def test_each_method_trains_two_steps(debug_config, tmp_path, method):
    summary = train(debug_config(tmp_path / method, f"method={method}"))
    out = tmp_path / method
    assert summary["steps"] == 2 and summary["method"] == method
    assert summary["rollouts"] == 2 * 4 * 2
    assert 0 < summary["tokens_kept"] <= summary["tokens_generated"]
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["train/loss"]))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    for column in (
        "train/loss",
        "train/kl",
        "len/generated",
        "len/kept",
        "len/longest",
        "perf/occupancy",
        "stop/terminated",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "lr-AdamW",
    ):
        assert metrics[column].notna().any(), column
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "student" / "config.json").exists()
    logged = metrics.dropna(subset=["len/longest"])
    occupancy = logged["len/generated"] / logged["len/longest"]  # one rank: generated/(n x max)
    assert (logged["len/generated"] <= logged["len/longest"]).all()
    assert logged["perf/occupancy"].to_numpy() == pytest.approx(occupancy.to_numpy())
    if method in ("fixed_prefix", "kat_fixed_prefix"):
        assert metrics["len/generated"].dropna().max() <= 6
    if method.startswith("kat"):
        assert metrics["kat/buffer_size"].notna().any()


def test_training_stops_once_the_evaluation_reaches_its_target(debug_config, tmp_path):
    cfg = debug_config(
        tmp_path,
        "eval=synthetic",
        "eval.evaluator.n_problems=4",
        "eval.every_n_steps=1",
        "eval.stop_when={synthetic/accuracy: 0.0}",  # reached at the first check
        "trainer.max_steps=3",
    )
    assert train(cfg)["steps"] == 1


@pytest.mark.parametrize("loss", ["full", "topk_tail", "topk_lsm", "sampled_token"])
def test_each_loss_trains(debug_config, tmp_path, loss):
    summary = train(debug_config(tmp_path, "method=opd", f"loss={loss}", "logger=csv"))
    assert summary["loss"] == loss and summary["steps"] == 2


def test_checkpoint_holds_student_and_terminator_state_not_teacher(debug_config, tmp_path):
    train(debug_config(tmp_path, "method=kat"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)
    assert ckpt["terminator"]["buffer"].numel() > 0 and ckpt["terminator"]["optimizer_steps"] == 2
    assert "rollout_rng" in ckpt and ckpt["optimizer_states"] and ckpt["lr_schedulers"]


def test_exported_student_loads_with_plain_transformers(debug_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(debug_config(tmp_path, "method=opd", "logger=csv"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert model.config.vocab_size == len(tokenizer)


def test_resume_matches_uninterrupted_run(debug_config, tmp_path):
    """A run killed after step 2 and resumed from that checkpoint logs what the run that was
    never interrupted logged (same data order, rollout RNG, KAT buffer, optimizer, schedule)."""
    steps = ["trainer.max_steps=4", "method=kat", "logger=csv"]
    full = tmp_path / "full"
    train(debug_config(full, *steps))
    resumed = tmp_path / "resumed"
    train(debug_config(resumed, *steps, f"resume={full / 'checkpoints' / 'step000002.ckpt'}"))

    def per_step(folder: Path) -> pd.DataFrame:
        df = pd.read_csv(folder / "csv" / "metrics.csv")
        cols = ["train/loss", "train/kl", "len/generated", "kat/threshold", "kat/buffer_size"]
        return df.dropna(subset=["train/loss"]).groupby("step")[cols].last()

    a, b = per_step(full), per_step(resumed)
    assert list(b.index) == [2, 3]
    pd.testing.assert_frame_equal(a.loc[[2, 3]], b, rtol=1e-5)
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4


def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m kat_research.train -m method=opd,kat`` on tiny models into ``tmp_path``; the
    jobs (also those a launcher starts) import this checkout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAT_ROOT": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        *(sys.executable, "-m", "kat_research.train", "-m"),
        *overrides,
        "method=opd,kat",
        "logger=csv",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "debug=fast",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_job_multirun(tmp_path):
    run_sweep(tmp_path)
    summaries = sorted((tmp_path / "multirun").glob("*/*/summary.json"))
    assert [json.loads(p.read_text())["method"] for p in summaries] == ["opd", "kat"]
    for path in summaries:
        job = path.parent
        assert (job / ".hydra" / "config.yaml").exists() and (job / "student").is_dir()
        assert (job / "csv" / "metrics.csv").exists()


def test_kat_window_longer_than_cap_fails_before_training(debug_config, tmp_path):
    with pytest.raises(ConfigError, match="exceeds rollout.max_new_tokens"):
        train(debug_config(tmp_path, "method=kat", "termination.kat.window=64"))
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_file_fails_before_training(debug_config, tmp_path):
    with pytest.raises(ConfigError, match="data.source.path"):
        train(debug_config(tmp_path, "data=local_file", "data.source.path=/nope/missing.jsonl"))


def test_mismatched_vocabularies_fail_before_training(debug_config, tmp_path):
    other = save_tiny_model(
        tmp_path / "other", build_char_tokenizer("0123456789+-*="), hidden_size=16
    )
    cfg = debug_config(
        tmp_path / "run",
        "model/teacher=qwen3_8b",
        f"model.teacher.name_or_path={other}",
        "model.teacher.dtype=float32",
    )
    with pytest.raises(VocabularyMismatchError, match="do not share a vocabulary"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
