"""Run one prepared job: `python -m kat_research.sweep.job <job folder>`.

Reads ``job.json``, composes its config, saves it as ``.hydra/config.yaml`` (like a Hydra job),
runs training (``kat_research.training.job.train``: with ``resume=auto`` it continues from the
newest checkpoint an earlier attempt left in the folder) or a model evaluation, then records
parameter counts and the job's hyperparameters and final metrics for TensorBoard's HPARAMS tab.
Output goes to ``job.log``; ``status.json`` follows the job (running, with pid and host ->
done | failed). Under a multi-process launch (Slurm tasks, DDP ranks) only rank 0 writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kat_research.config import compose
from kat_research.layout import JOB_FILE, read_json
from kat_research.planning.configs import model_config
from kat_research.planning.params import count_params
from kat_research.provenance import code_commit
from kat_research.sweep.evaluate_model import evaluate_model
from kat_research.sweep.hparams import write_hparams
from kat_research.sweep.spec import EVALUATE, ROLES, Job
from kat_research.sweep.state import DONE, FAILED, RUNNING, write_status
from kat_research.training.job import train

log = logging.getLogger(__name__)


def job_config(job: Job, folder: Path) -> DictConfig:
    """The job's training config, writing into ``folder``."""
    return compose([*job.overrides, f"paths.output_dir='{folder}'"])  # quoted: '=' ','


def count_parameters(node: DictConfig) -> int:
    """Parameters of the model a ``model.*`` node builds, counted on the meta device from its
    config (``kat_research.planning``: no weights loaded, nothing trained)."""
    return count_params(model_config(node)).total


def parameter_counts(cfg: DictConfig, roles: tuple[str, ...]) -> dict[str, int | None]:
    """``count_parameters`` per role; None (logged) where the model cannot be described here."""
    counts: dict[str, int | None] = {}
    for role in roles:
        try:
            counts[role] = count_parameters(cfg.model[role])
        except Exception as error:  # e.g. a hub id offline: the compute estimate is then unknown
            log.warning("cannot count the %s's parameters: %s", role, error)
            counts[role] = None
    return counts


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Copy the root logger's records into ``path`` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_job(folder: str | Path) -> dict[str, Any]:
    """Run the job prepared in ``folder``; return its summary (raises what the job raised)."""
    folder = Path(folder)
    recorded = read_json(folder / JOB_FILE)
    if recorded is None:
        raise FileNotFoundError(f"{folder / JOB_FILE} does not exist: not a prepared job folder")
    job = Job.from_dict(recorded)
    start = time.time()
    main_rank = rank_zero_only.rank == 0  # from the launcher's environment (RANK, SLURM_PROCID)
    if main_rank:
        write_status(
            folder,
            RUNNING,
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            commit=code_commit(),
        )
    with log_to(folder / "job.log"):
        try:
            cfg = job_config(job, folder)
            (folder / ".hydra").mkdir(exist_ok=True)
            OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
            OmegaConf.save(list(job.overrides), folder / ".hydra" / "overrides.yaml")
            if job.kind == EVALUATE:
                summary = evaluate_model(cfg, job.role)
            else:
                summary = train(cfg)
        except BaseException as error:
            if main_rank:
                write_status(folder, FAILED, error="".join(traceback.format_exception(error)))
            raise
        if not main_rank:
            return summary
        roles = (job.role,) if job.kind == EVALUATE else ROLES
        counts = parameter_counts(cfg, roles)
        write_hparams(folder, job, summary)
    write_status(folder, DONE, seconds=time.time() - start, n_params=counts)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a job folder holding job.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    run_job(args.folder)


if __name__ == "__main__":
    main()
