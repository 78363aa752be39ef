"""Launch prepared jobs with submitit: ``submitit_local`` runs them on this machine one after
another and waits; ``submitit_slurm`` submits them to Slurm (one job array per resource set)
and returns, each job ``pending`` until its summary appears (like a command template).

Resources come from conf/hydra/launcher/<launcher>.yaml, the presets of
``python -m kat_research.train -m hydra/launcher=<launcher>``, resolved against each job's own
config (e.g. ``tasks_per_node: ${trainer.devices}``). Logs: ``<job>/.submitit/`` (local) or
``<runs>/<scale>/.submitit/`` (Slurm); ``<job>/submitit.json`` names the job's id and log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import submitit
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from kat_research.sweep.job import run_job
from kat_research.sweep.spec import Job, compose_train
from kat_research.sweep.state import EXTERNAL, FAILED, prepare_folder, write_status

log = logging.getLogger(__name__)
SUBMITIT_LOCAL, SUBMITIT_SLURM = "submitit_local", "submitit_slurm"
SUBMITIT_LAUNCHERS = (SUBMITIT_LOCAL, SUBMITIT_SLURM)
SWEEP_KEYS = ("_target_", "submitit_folder", "name")  # set by Hydra per sweep, here per job


def launcher_params(job: Job, folder: Path, launcher: str) -> dict[str, Any]:
    """The preset's resources, resolved against the job's config (sweep-only keys dropped)."""
    cfg = compose_train(
        [*job.overrides, f"paths.output_dir='{folder}'", f"hydra/launcher={launcher}"],
        with_hydra=True,
    )
    preset, params = cfg.hydra.launcher, {}
    for key in preset:
        if key not in SWEEP_KEYS:
            value = preset[key]  # resolved
            params[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return params


def make_executor(launcher: str, folder: Path, params: dict[str, Any]) -> submitit.AutoExecutor:
    """An executor writing into ``folder`` with ``params`` named as the Hydra plugin names them
    (shared keys as they are, executor-specific ones prefixed with the cluster)."""
    cluster = launcher.removeprefix("submitit_")
    params = dict(params)
    init = {}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in shared else f"{cluster}_{k}": v for k, v in params.items()}
    )
    return executor


def record(folder: Path, job: submitit.Job) -> None:
    """Name the submitit job and its log in ``<job folder>/submitit.json``."""
    info = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    (folder / "submitit.json").write_text(json.dumps(info, indent=2))


def run_local(jobs: list[tuple[Job, Path]]) -> bool:
    """Run each job through submitit's local executor, one at a time; False if one failed."""
    ok = True
    for n, (job, folder) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job.experiment}/{job.name}", flush=True)
        prepare_folder(folder, job)
        params = launcher_params(job, folder, SUBMITIT_LOCAL)
        executor = make_executor(SUBMITIT_LOCAL, folder / ".submitit" / "%j", params)
        executor.update_parameters(name=job.name)
        submitted = executor.submit(run_job, folder.resolve())
        record(folder, submitted)
        try:
            submitted.result()
        except Exception:
            log.exception("job %s failed (log: %s)", folder.name, submitted.paths.stdout)
            ok = False
    return ok


def submit_slurm(jobs: list[tuple[Job, Path]]) -> bool:
    """Submit the jobs to Slurm, one array per distinct resource set; do not wait. False (the
    jobs recorded as failed, so they are launched again) if a submission fails."""
    groups: dict[str, list[tuple[Job, Path]]] = {}
    for job, folder in jobs:
        key = json.dumps(launcher_params(job, folder, SUBMITIT_SLURM), sort_keys=True)
        groups.setdefault(key, []).append((job, folder))
    ok = True
    for key, members in groups.items():
        root = members[0][1].parents[1] / ".submitit"  # <runs>/<scale>/.submitit
        for job, folder in members:
            prepare_folder(folder, job)
            write_status(folder, "submitted", launcher=EXTERNAL)
        try:
            executor = make_executor(SUBMITIT_SLURM, root / "%j", json.loads(key))
            executor.update_parameters(name=f"kat_{members[0][0].experiment}")
            with executor.batch():
                submitted = [executor.submit(run_job, folder.resolve()) for _, folder in members]
        except Exception as error:
            log.exception("submitting %d jobs to Slurm failed", len(members))
            for _, folder in members:
                write_status(folder, FAILED, error=f"submission failed: {error}")
            ok = False
            continue
        for (_, folder), sub in zip(members, submitted, strict=True):
            record(folder, sub)
        array = submitted[0].job_id.split("_")[0]
        print(f"submitted {len(members)} jobs to Slurm as array {array} (logs in {root})")
    return ok


def launch_submitit(jobs: list[tuple[Job, Path]], launcher: str) -> bool:
    """Run (local) or submit (Slurm) ``jobs`` with ``launcher``; False if one failed."""
    return run_local(jobs) if launcher == SUBMITIT_LOCAL else submit_slurm(jobs)
