"""The run-folder layout: the names of the files a job writes, and the one way each is written.

A job folder (a training run, an evaluation, a sweep job) holds::

    .hydra/config.yaml      the resolved config
    summary.json            what the job reports (written last: its presence means "finished")
    eval/step<NNNNNN>.jsonl graded evaluation samples, one per line, per evaluated step
    checkpoints/            Lightning checkpoints (training)
    rollouts/kl_traces.jsonl per-token KL of a few training rollouts
    rollouts/lengths.csv    every training rollout's generated and kept tokens, per step
    job.json, status.json   sweep jobs only: the job and its state

Every summary has the keys of :data:`SUMMARY_KEYS` (``kind`` is ``train`` or ``evaluate``).
This module imports nothing from the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
JOB_FILE = "job.json"
STATUS_FILE = "status.json"
EVAL_DIR = "eval"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = ".hydra/config.yaml"
TRACE_FILE = "rollouts/kl_traces.jsonl"  # per-token KL of a few training rollouts (notebooks)
LENGTHS_FILE = "rollouts/lengths.csv"  # every training rollout's lengths (lit/rollout_lengths.py)
SUMMARY_KEYS = ("kind", "seed", "wall_time_s", "output_dir")  # present in every summary


def eval_file(folder: str | Path, step: int) -> Path:
    """Where the graded samples of the evaluation at optimizer step ``step`` go."""
    return Path(folder) / EVAL_DIR / f"step{step:06d}.jsonl"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_samples(path: Path, records: Iterable[Any]) -> None:
    """Graded samples (objects with ``to_dict()``, or dicts) as JSON lines."""
    lines = [json.dumps(r if isinstance(r, Mapping) else r.to_dict()) + "\n" for r in records]
    write_atomic(path, "".join(lines))


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The graded samples :func:`write_samples` wrote, as dicts."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_summary(folder: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json``; every summary holds :data:`SUMMARY_KEYS`."""
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise KeyError(f"a run summary needs {missing} (layout.SUMMARY_KEYS)")
    path = Path(folder) / SUMMARY_FILE
    write_atomic(path, json.dumps(summary, indent=2))
    return path


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file's content, or None if it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
