"""Launch jobs: in this process (``local``), one subprocess each (``subprocess``), through
submitit (``submitit_local``, ``submitit_slurm``: kat_research.sweep.submitit_launch), or
through a command template holding ``{cmd}`` (e.g. a cluster submission).

A template is run with the shell after replacing ``{cmd}`` (the job's command line), ``{dir}``
(its folder) and ``{name}`` (``<experiment>/<job>``), e.g.
``sbatch --gpus=1 -J {name} --wrap '{cmd}'``. The job is then ``pending`` until its summary
appears; re-running the sweep does not submit it again.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path

from kat_research.sweep.job import run_job
from kat_research.sweep.spec import Job
from kat_research.sweep.state import EXTERNAL, prepare_folder, write_status
from kat_research.sweep.submitit_launch import SUBMITIT_LAUNCHERS, launch_submitit

log = logging.getLogger(__name__)
LOCAL, SUBPROCESS = "local", "subprocess"
LAUNCHERS = (LOCAL, SUBPROCESS, *SUBMITIT_LAUNCHERS)  # named launchers (besides templates)


def job_command(folder: Path) -> list[str]:
    """The command line that runs the job prepared in ``folder``."""
    return [sys.executable, "-m", "kat_research.sweep.job", str(folder.resolve())]


def check_launcher(launcher: str) -> None:
    if launcher not in LAUNCHERS and "{cmd}" not in launcher:
        raise ValueError(
            f"launcher must be one of {', '.join(LAUNCHERS)} or a command template containing "
            f"{{cmd}}, got {launcher!r}"
        )


def launch_all(jobs: list[tuple[Job, Path]], launcher: str) -> bool:
    """Prepare the folder of each (job, folder) and run or hand over the job; False if one
    failed (or its submission did)."""
    check_launcher(launcher)
    if launcher in SUBMITIT_LAUNCHERS:
        return launch_submitit(jobs, launcher)
    ok = True
    for n, (job, folder) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job.experiment}/{job.name}", flush=True)
        prepare_folder(folder, job)
        ok &= launch(folder, launcher)
    return ok


def launch(folder: Path, launcher: str) -> bool:
    """Run, or hand over, the job prepared in ``folder`` (not with submitit); False if it failed
    (or its submission did). Errors of local jobs are logged and recorded, not raised."""
    if launcher == LOCAL:
        try:
            run_job(folder)
        except Exception:
            log.exception("job %s failed (traceback in %s/status.json)", folder.name, folder)
            return False
        return True
    if launcher == SUBPROCESS:
        with open(folder / "stdout.log", "w") as out:
            done = subprocess.run(job_command(folder), stdout=out, stderr=subprocess.STDOUT)
        return done.returncode == 0
    write_status(folder, "submitted", launcher=EXTERNAL)
    command = (
        launcher.replace("{cmd}", shlex.join(job_command(folder)))
        .replace("{dir}", shlex.quote(str(folder.resolve())))
        .replace("{name}", shlex.quote(f"{folder.parent.name}/{folder.name}"))
    )
    return subprocess.run(command, shell=True).returncode == 0
