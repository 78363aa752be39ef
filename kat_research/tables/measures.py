"""The numbers a job contributes to a table, read from the files in its folder.

Accuracy comes from the job's last graded samples (``eval/stepNNNNNN.jsonl``): avg@k and
pass@k per benchmark (``kat_research.eval.metrics.summarize``), macro-averaged over the
paper's four benchmarks when all ran, else over the benchmarks present (e.g. the synthetic
task). The compute estimate is ``kat_research.planning.flops.opd_flops`` (the planner's
formula) with the job's parameter counts and lengths, without prompts and the attention term:
2 N_student + 2 N_teacher per generated token (rollout, teacher scoring) + 6 N_student per
kept token (training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from kat_research.eval.metrics import PAPER_BENCHMARKS, macro_average, summarize
from kat_research.layout import CONFIG_FILE, EVAL_DIR, STATUS_FILE, SUMMARY_FILE, read_json
from kat_research.planning.flops import FlopsModel, opd_flops


@dataclass(frozen=True)
class Measure:
    """How a measure is shown: column title and format spec."""

    title: str
    fmt: str


MEASURES = {
    "avg@k": Measure("avg@k (%)", ".2f"),
    "pass@k": Measure("pass@k (%)", ".2f"),
    "k": Measure("k", ".0f"),
    "eval_length": Measure("eval length", ".1f"),
    "length": Measure("rollout length", ".1f"),
    "kept_length": Measure("trained tokens / rollout", ".1f"),
    "tokens_generated": Measure("tokens generated", ",.0f"),
    "accel_hours": Measure("accelerator-hours", ".3g"),
    "eflops": Measure("EFLOPs (est.)", ".3g"),
    "wall_time_h": Measure("wall time (h)", ".3g"),
    "steps": Measure("steps", ".0f"),
    "pre_tokens": Measure("pre-agreement tokens", ".1f"),
    "agreement_tokens": Measure("agreement tokens", ".1f"),
    "post_tokens": Measure("post-agreement tokens", ".1f"),
}
# training metrics (csv/metrics.csv) averaged over all steps, by measure name
CURVE_MEASURES = {
    "pre_tokens": "kat/pre_tokens",
    "agreement_tokens": "kat/agreement_tokens",
    "post_tokens": "kat/post_tokens",
}


def measure_format(name: str) -> Measure:
    """The display settings of ``name`` (a generic one for unknown measures)."""
    return MEASURES.get(name, Measure(name, ".4g"))


def eval_measures(folder: Path) -> dict[str, float]:
    """avg@k / pass@k (in %), k and mean response length of the job's last evaluation."""
    files = sorted((folder / EVAL_DIR).glob("step*.jsonl"))
    if not files:
        return {}
    table = summarize(pd.read_json(files[-1], lines=True, dtype={"problem_id": str}))
    paper = set(PAPER_BENCHMARKS) <= set(table.index)
    average = macro_average(table, PAPER_BENCHMARKS if paper else tuple(table.index))
    return {
        "avg@k": 100 * average["avg@k"],
        "pass@k": 100 * average["pass@k"],
        "k": float(table["k"].max()),
        "eval_length": float(average["mean_length"]),
    }


def _devices(folder: Path) -> int:
    """Accelerators the job trained on (trainer.devices x num_nodes of its saved config)."""
    path = folder / CONFIG_FILE
    if not path.exists():
        return 1
    trainer = OmegaConf.load(path).get("trainer", {})
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, list | tuple) else devices
    return (count if isinstance(count, int) and count > 0 else 1) * trainer.get("num_nodes", 1)


def compute_eflops(summary: dict[str, Any], n_params: dict[str, Any] | None) -> float:
    """The OPD FLOPs of a training job's ``summary`` in 1e18 (NaN if a count is unknown)."""
    counts = n_params or {}
    student, teacher = counts.get("student"), counts.get("teacher")
    if student is None or teacher is None:
        return math.nan
    flops = opd_flops(
        FlopsModel(student),
        FlopsModel(teacher),
        rollouts=summary["rollouts"],
        generated=summary["mean_generated_length"],
        kept=summary["mean_kept_length"],
    )
    return flops.total / 1e18


def curve_means(folder: Path) -> dict[str, float]:
    """Training metrics of ``CURVE_MEASURES`` averaged over the logged steps."""
    path = folder / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    metrics = pd.read_csv(path)
    return {
        name: float(metrics[column].mean())
        for name, column in CURVE_MEASURES.items()
        if column in metrics
    }


def job_measures(folder: str | Path) -> dict[str, float]:
    """Every measure a finished job folder provides (training measures only for training jobs)."""
    folder = Path(folder)
    summary = read_json(folder / SUMMARY_FILE) or {}
    out = eval_measures(folder)
    if "wall_time_s" in summary:
        out["wall_time_h"] = summary["wall_time_s"] / 3600
    if "tokens_generated" not in summary:
        return out
    status = read_json(folder / STATUS_FILE) or {}
    out.update(
        length=summary["mean_generated_length"],
        kept_length=summary["mean_kept_length"],
        tokens_generated=float(summary["tokens_generated"]),
        steps=float(summary["steps"]),
        accel_hours=summary["fit_time_s"] * _devices(folder) / 3600,
        eflops=compute_eflops(summary, status.get("n_params")),
        **curve_means(folder),
    )
    verdicts = summary.get("cut_verdicts") or {}  # the run's cut verdicts (lit/cut_verdicts.py)
    out.update({f"verdict_{k}": v for k, v in verdicts.items() if not k.startswith("n_")})
    return out
