"""A job's hyperparameters and final measures for TensorBoard's HPARAMS tab.

Written into the job's own ``tensorboard/`` folder (beside the training scalars), so
``tensorboard --logdir runs/<scale>/<experiment>`` shows one session per job, with the sweep's
axes as hyperparameter columns and the table's measures as metric columns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from kat_research.sweep.spec import Job
from kat_research.tables.measures import job_measures


def job_hparams(job: Job, summary: dict[str, Any]) -> dict[str, str | float]:
    """The sweep's axes plus what identifies the job (kind, method, loss, scale)."""
    fixed = {"experiment": job.experiment, "scale": job.scale, "kind": job.kind}
    known = {k: summary[k] for k in ("method", "loss", "role") if summary.get(k) is not None}
    return {**fixed, **known, **job.axes}


def write_hparams(folder: Path, job: Job, summary: dict[str, Any]) -> None:
    """Log ``job_hparams`` and the job's finite measures (``hparams/<measure>``)."""
    metrics = {
        f"hparams/{name}": float(value)
        for name, value in job_measures(folder).items()
        if math.isfinite(value)
    }
    step = int(summary.get("steps", 0))
    with SummaryWriter(str(folder / "tensorboard")) as writer:
        for summary_proto in hparams(job_hparams(job, summary), metrics):
            writer.file_writer.add_summary(summary_proto, step)
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
