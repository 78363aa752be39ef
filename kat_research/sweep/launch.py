"""Launch jobs: in this process (``local``), one subprocess each (``subprocess``), through
submitit with a launcher file (``submitit_local``, ``submitit_slurm``, any name in
conf/launcher or a YAML path: kat_research.sweep.submitit_launch), or through a command
template holding ``{cmd}`` (e.g. a cluster submission).

A template is run with the shell after replacing ``{cmd}`` (the job's command line), ``{dir}``
(its folder) and ``{name}`` (``<experiment>/<job>``), e.g.
``sbatch --gpus=1 -J {name} --wrap '{cmd}'``. The job is then ``pending`` until it starts;
re-running the sweep does not submit it again.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kat_research.console import Progress
from kat_research.sweep.job import run_job
from kat_research.sweep.spec import Job
from kat_research.sweep.state import SUBMITTED, prepare_folder, write_status
from kat_research.sweep.submitit_launch import launch_submitit, launcher_file, launcher_names

log = logging.getLogger(__name__)
LOCAL, SUBPROCESS = "local", "subprocess"
TEMPLATE = "template"  # status.json launcher of jobs handed to a command template


def launcher_choices() -> list[str]:
    """The named launchers (besides launcher file paths and command templates)."""
    return [LOCAL, SUBPROCESS, *launcher_names()]


def job_command(folder: Path) -> list[str]:
    """The command line that runs the job prepared in ``folder``."""
    return [sys.executable, "-m", "kat_research.sweep.job", str(folder.resolve())]


def check_launcher(launcher: str) -> None:
    if launcher in (LOCAL, SUBPROCESS) or "{cmd}" in launcher:
        return
    path = launcher_file(launcher)
    if path is None or not path.exists():
        raise ValueError(
            f"launcher must be one of {', '.join(launcher_choices())}, a launcher file (.yaml) or "
            f"a command template containing {{cmd}}, got {launcher!r}"
        )


def launch_all(
    jobs: list[tuple[Job, Path]],
    launcher: str,
    launcher_overrides: Sequence[str] = (),
    parallel: int = 1,
) -> bool:
    """Prepare the folder of each (job, folder) and run or hand over the job; False if one
    failed (or its submission did). ``launcher_overrides`` (``key=value``) change a launcher
    file's settings; ``parallel`` subprocess jobs run at once (``subprocess`` only)."""
    check_launcher(launcher)
    if parallel < 1 or (parallel > 1 and launcher != SUBPROCESS):
        raise ValueError(
            f"--parallel {parallel}: a positive number, above 1 only with --launcher subprocess"
        )
    path = None if launcher in (LOCAL, SUBPROCESS) else launcher_file(launcher)
    if path is not None:
        return launch_submitit(jobs, path, launcher_overrides)

    progress = Progress("sweep", len(jobs), unit="job", every_s=0.0, write=_say)
    progress.start()
    finished, lock = [0], threading.Lock()

    def start(n: int, job: Job, folder: Path) -> bool:
        print(f"[{n}/{len(jobs)}] {job.experiment}/{job.name}", flush=True)
        prepare_folder(folder, job)
        ok = launch(folder, launcher)
        with lock:  # jobs done so far, and the time the rest will take at this pace
            finished[0] += 1
            progress.update(finished[0])
        return ok

    if parallel == 1:
        return all([start(n, job, folder) for n, (job, folder) in enumerate(jobs, 1)])
    with ThreadPoolExecutor(parallel) as pool:  # each job is its own process
        done = [pool.submit(start, n, job, folder) for n, (job, folder) in enumerate(jobs, 1)]
        return all([d.result() for d in done])


def _say(line: str) -> None:
    print(line, flush=True)


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
        with open(folder / "stdout.log", "a") as out:
            done = subprocess.run(job_command(folder), stdout=out, stderr=subprocess.STDOUT)
        return done.returncode == 0
    write_status(folder, SUBMITTED, launcher=TEMPLATE)
    command = (
        launcher.replace("{cmd}", shlex.join(job_command(folder)))
        .replace("{dir}", shlex.quote(str(folder.resolve())))
        .replace("{name}", shlex.quote(f"{folder.parent.name}/{folder.name}"))
    )
    return subprocess.run(command, shell=True).returncode == 0
