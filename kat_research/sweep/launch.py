"""Launch prepared jobs: in this process (``local``), one subprocess each (``subprocess``), or
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
from kat_research.sweep.state import EXTERNAL, write_status

log = logging.getLogger(__name__)
LOCAL, SUBPROCESS = "local", "subprocess"


def job_command(folder: Path) -> list[str]:
    """The command line that runs the job prepared in ``folder``."""
    return [sys.executable, "-m", "kat_research.sweep.job", str(folder.resolve())]


def check_launcher(launcher: str) -> None:
    if launcher not in (LOCAL, SUBPROCESS) and "{cmd}" not in launcher:
        raise ValueError(
            f"launcher must be {LOCAL}, {SUBPROCESS} or a command template containing {{cmd}}, "
            f"got {launcher!r}"
        )


def launch(folder: Path, launcher: str) -> bool:
    """Run, or hand over, the job prepared in ``folder``; False if it failed (or its
    submission did). Errors of local jobs are logged and recorded, not raised."""
    check_launcher(launcher)
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
