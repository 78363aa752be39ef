"""Launch prepared jobs with submitit, resources from a launcher file.

A launcher file is ``conf/launcher/<name>.yaml`` (``--launcher <name>``) or any YAML file
(``--launcher path/to/file.yaml``): ``cluster`` (submitit's executor: ``local`` or ``slurm``),
``max_num_timeout``, submitit's shared parameters (``timeout_min``, ``gpus_per_node``, ...) and,
under a key named after the cluster, that executor's own parameters (e.g. ``slurm.partition``).
Values are resolved against each job's own config (``tasks_per_node: ${trainer.devices}``);
``launcher.<key>=<value>`` arguments override them for a sweep.

``local`` runs the jobs on this machine one after another and waits; ``slurm`` submits them (one
job array per distinct resource set) and returns, each job ``pending`` until it starts. A job
that times out or is preempted is requeued up to ``max_num_timeout`` times and resumes from its
newest checkpoint. Logs: ``<job>/.submitit/`` (local) or ``<runs>/<scale>/.submitit/``
(Slurm); ``<job>/submitit.json`` names the job's id and log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf, open_dict

from kat_research.config import CONFIG_DIR
from kat_research.sweep.job import job_config, run_job
from kat_research.sweep.spec import Job
from kat_research.sweep.state import FAILED, SUBMITTED, prepare_folder, write_status

log = logging.getLogger(__name__)
LAUNCHER_DIR = Path(CONFIG_DIR) / "launcher"
CLUSTERS = ("local", "slurm")


def launcher_names() -> list[str]:
    """The named launcher files (``conf/launcher/*.yaml``)."""
    return sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))


def launcher_file(launcher: str) -> Path | None:
    """The launcher file ``launcher`` names (a name in conf/launcher or a YAML path), or None."""
    if launcher.endswith((".yaml", ".yml")):
        return Path(launcher)
    path = LAUNCHER_DIR / f"{launcher}.yaml"
    return path if path.exists() else None


def load_launcher(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The launcher file with ``overrides`` (``key=value``), unresolved."""
    if not path.exists():
        raise FileNotFoundError(f"launcher file {path} does not exist")
    settings = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    if settings.get("cluster") not in CLUSTERS:
        raise ValueError(
            f"{path}: cluster must be one of {CLUSTERS}, got {settings.get('cluster')!r}"
        )
    return settings


def launcher_settings(
    path: Path, job: Job, folder: Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The launcher file's settings with ``overrides``, resolved against the job's config."""
    root = job_config(job, folder)
    with open_dict(root):
        root.launcher = load_launcher(path, overrides)  # its interpolations see the job's config
    return OmegaConf.to_container(root.launcher, resolve=True)


def make_executor(folder: Path, settings: Mapping[str, Any]) -> submitit.AutoExecutor:
    """A submitit executor writing into ``folder``: the cluster's own parameters (the section
    named after it) get submitit's ``<cluster>_`` prefix, the others are shared ones."""
    settings = dict(settings)
    cluster = settings.pop("cluster")
    own = settings.pop(cluster, None) or {}
    requeues = settings.pop("max_num_timeout", 0)
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, **{f"{cluster}_max_num_timeout": requeues}
    )
    executor.update_parameters(**settings, **{f"{cluster}_{k}": v for k, v in own.items()})
    return executor


class JobRunner(submitit.helpers.Checkpointable):
    """What submitit runs: one prepared job. Checkpointable: on a timeout or preemption
    submitit requeues the same call, and the job resumes from its newest checkpoint."""

    def __call__(self, folder: Path) -> dict[str, Any]:
        return run_job(folder)


def record(folder: Path, job: submitit.Job) -> None:
    """Name the submitit job and its log in ``<job folder>/submitit.json``."""
    info = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    (folder / "submitit.json").write_text(json.dumps(info, indent=2))


def run_local(jobs: list[tuple[Job, Path]], path: Path, overrides: Sequence[str]) -> bool:
    """Run each job through submitit's local executor, one at a time; False if one failed."""
    ok = True
    for n, (job, folder) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job.experiment}/{job.name}", flush=True)
        prepare_folder(folder, job)
        settings = launcher_settings(path, job, folder, overrides)
        executor = make_executor(folder / ".submitit" / "%j", settings)
        executor.update_parameters(name=job.name)
        submitted = executor.submit(JobRunner(), folder.resolve())
        record(folder, submitted)
        try:
            submitted.result()
        except Exception:
            log.exception("job %s failed (log: %s)", folder.name, submitted.paths.stdout)
            ok = False
    return ok


def submit_queue(jobs: list[tuple[Job, Path]], path: Path, overrides: Sequence[str]) -> bool:
    """Submit the jobs, one array per distinct resource set; do not wait. False (the jobs
    recorded as failed, so they are launched again) if a submission fails."""
    groups: dict[str, list[tuple[Job, Path]]] = {}
    for job, folder in jobs:
        key = json.dumps(launcher_settings(path, job, folder, overrides), sort_keys=True)
        groups.setdefault(key, []).append((job, folder))
    ok = True
    for key, members in groups.items():
        root = members[0][1].parents[1] / ".submitit"  # <runs>/<scale>/.submitit
        for job, folder in members:
            prepare_folder(folder, job)
            write_status(folder, SUBMITTED, launcher=str(path))
        try:
            executor = make_executor(root / "%j", json.loads(key))
            executor.update_parameters(name=f"kat_{members[0][0].experiment}")
            with executor.batch():
                submitted = [
                    executor.submit(JobRunner(), folder.resolve()) for _, folder in members
                ]
        except Exception as error:
            log.exception("submitting %d jobs failed", len(members))
            for _, folder in members:
                write_status(folder, FAILED, error=f"submission failed: {error}")
            ok = False
            continue
        for (_, folder), sub in zip(members, submitted, strict=True):
            record(folder, sub)
        array = submitted[0].job_id.split("_")[0]
        print(f"submitted {len(members)} jobs as array {array} (logs in {root})")
    return ok


def launch_submitit(jobs: list[tuple[Job, Path]], path: Path, overrides: Sequence[str]) -> bool:
    """Run (``cluster: local``) or submit (``slurm``) ``jobs`` with the launcher file ``path``;
    False if one failed."""
    if not jobs:
        return True
    local = load_launcher(path, overrides).cluster == "local"
    return (run_local if local else submit_queue)(jobs, path, overrides)
