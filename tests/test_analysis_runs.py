"""Each analysis end to end on a tiny KAT run's checkpoints (and the benchmark's Hydra entry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kat_research import config
from kat_research.analysis import gradient_projection, kl_dynamics, teacher_tokens
from kat_research.analysis.runs import kat_buffer, load_run, read_checkpoint
from kat_research.analysis.trap import benchmark as trap_benchmark
from kat_research.config import CONFIG_DIR
from kat_research.termination.phases import PHASES
from kat_research.training.job import train

ROOT = Path(__file__).resolve().parent.parent
CONF = Path(CONFIG_DIR)

# A 4-step KAT run of the debug preset (tiny random models, a checkpoint after every step),
# with the paper's non-overlapping windows and patience.
TINY_RUN = [
    "debug=fast",
    "method=kat",
    "trainer.max_steps=4",
    "rollout.max_new_tokens=16",
    "termination.kat.stride=null",
    "termination.kat.patience=4",
    "logger=csv",
    "export_student=false",
]
FEW_ROLLOUTS = ["analysis.rollouts.n=8", "analysis.rollouts.batch_size=8", "device=cpu"]
TINY_GRID = [
    "analysis.benchmark.n=20",
    "analysis.benchmark.n_calibration=20",
    "analysis.benchmark.noise_levels=[0.0,1.0]",
    "analysis.benchmark.segment_lengths=[32,64]",
    "analysis.benchmark.detectors.windows=[4,8]",
]


def compose_config(name: str, *overrides: str):
    return config.compose(overrides, config_name=name)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis_run")
    cfg = compose_config(
        "train", f"paths.output_dir={root / 'kat'}", f"paths.cache_dir={root / 'cache'}", *TINY_RUN
    )
    train(cfg)
    return root / "kat"


def analysis_config(name: str, run_dir: Path, out: Path, *overrides: str):
    return compose_config(
        f"analysis_{name}", f"run_dir={run_dir}", f"output_dir={out}", *FEW_ROLLOUTS, *overrides
    )


PAPER_SCALE = {
    "kl_dynamics": ["analysis/detector=kat_paper", "analysis.rollouts.batch_size=4"],
    "gradient_projection": ["analysis/detector=kat_paper", "analysis.rollouts.batch_size=4"],
    "teacher_tokens": ["analysis/detector=kat_paper", "analysis.rollouts.batch_size=4"],
    "trap_benchmark": ["analysis/benchmark=length_4096"],
    "trap_analysis": ["analysis/detector=kat_paper", "analysis.rollouts.batch_size=4"],
    "testbed_trap_check": ["analysis/detector=kat_paper"],
    "smollm2_trap": [],  # its own pair and KAT rule (train_overrides), no paper scale
    "termination_benchmark": ["batch_size=4"],
    "kat_threshold": ["phases=4"],
}
NOT_OF_A_RUN = ("trap_benchmark", "testbed_trap_check", "smollm2_trap", "termination_benchmark")
REDRAWING = ("trap_plot",)  # redraws figures in the folders it is given: no results folder


def test_every_analysis_has_an_entry_config():
    assert sorted(p.stem for p in CONF.glob("analysis_*.yaml")) == sorted(
        f"analysis_{name}" for name in (*PAPER_SCALE, *REDRAWING)
    )


@pytest.mark.parametrize("name,paper", PAPER_SCALE.items(), ids=list(PAPER_SCALE))
def test_every_analysis_config_composes_at_both_scales(name, paper):
    run = [] if name in NOT_OF_A_RUN else ["run_dir=x"]
    for overrides in ([], paper):
        cfg = compose_config(f"analysis_{name}", *run, *overrides)
        assert cfg.name == name and str(cfg.output_dir).endswith(f"results/{name}")


def test_run_folder_lists_step_checkpoints(tiny_run):
    run = load_run(tiny_run)
    assert sorted(run.checkpoints) == [1, 2, 3, 4]
    assert run.checkpoint(0.1)[0] == "step1" and run.checkpoint(0.5)[0] == "step2"
    assert run.checkpoint(1.0)[0] == "step4" and run.checkpoint("init") == ("step0", None)


def test_kl_dynamics_end_to_end(tiny_run, tmp_path, capsys):
    summary = kl_dynamics.run(analysis_config("kl_dynamics", tiny_run, tmp_path))
    assert list(summary.stage) == ["early", "late"]
    assert list(summary.checkpoint) == ["step1", "step4"]  # no checkpoint within 10% of 4 steps
    buffer = kat_buffer(read_checkpoint(tiny_run / "checkpoints" / "step000004.ckpt")["terminator"])
    assert summary.threshold.iloc[0] == pytest.approx(float(torch.quantile(buffer, 0.7)))
    assert set(summary.threshold_source) == {"checkpoint buffer"}
    assert summary.share_with_segment.between(0, 1).all()
    rollouts = pd.read_csv(tmp_path / "rollouts.csv")
    assert len(rollouts) == 16 and (rollouts.onset.dropna() < rollouts.length.max()).all()
    traces = pd.read_csv(tmp_path / "traces.csv")
    assert len(traces) == rollouts.length.sum()
    for figure in ("example_traces.png", "onset_histogram.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert "rollouts hold an extended low-KL segment" in capsys.readouterr().out


def test_gradient_projection_end_to_end(tiny_run, tmp_path):
    cfg = analysis_config("gradient_projection", tiny_run, tmp_path, "gradient_at=0.5")
    table = gradient_projection.run(cfg)
    assert "random" in set(table.phase) and set(table.phase) - {"random"} <= set(PHASES)
    assert (table[table.phase != "random"].tokens > 0).all()
    assert set(table.k) == {1, 4, 16, 64} and table.rho.between(0, 1 + 1e-9).all()
    assert {"all", "attention", "mlp", "layer0", "layer1"} <= set(table.group)
    per_matrix = pd.read_csv(tmp_path / "rho_per_matrix.csv")
    assert per_matrix.parameter.nunique() == 14  # 7 projections x 2 layers
    # k=64 is clipped to each matrix's rank: 16 for k/v projections (2 kv heads x 8), else 32
    assert set(per_matrix[per_matrix.k == 64].k_used) == {16, 32}
    assert (tmp_path / "rho.png").exists()


def test_teacher_tokens_end_to_end_without_a_kat_buffer(tiny_run, tmp_path, capsys):
    cfg = analysis_config("teacher_tokens", tiny_run, tmp_path, "threshold_from=init", "top_n=5")
    table = teacher_tokens.run(cfg)
    assert set(table.phase) <= {"pre", "agreement", "post"} and "pre" in set(table.phase)
    assert table.groupby("phase")["rank"].max().le(5).all()
    assert table.groupby("phase").share.sum().le(1 + 1e-9).all()
    assert (tmp_path / "top_tokens.csv").exists() and (tmp_path / "wordcloud.png").exists()
    assert "from rollout minima" in capsys.readouterr().out  # step0 has no KAT buffer


def test_trap_benchmark_entry_point_writes_results(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "kat_research.analysis.trap.benchmark",
        f"output_dir={out}",
        *TINY_GRID,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "planted-trap benchmark" in done.stdout
    for name in ("benchmark.png", ".hydra/config.yaml"):
        assert (out / name).exists(), name
    table = pd.read_csv(out / "benchmark.csv")
    assert len(table) == 2 * 2 * 2 * 3  # noise levels x trap lengths x windows x detectors
    assert set(table.detector) == set(trap_benchmark.DETECTORS)
    rates = table[["precision", "recall", "false_alarm_rate"]].stack().dropna()
    assert rates.between(0, 1).all()
