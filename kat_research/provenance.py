"""Which code produced a result: the git commit of the checkout holding the package."""

from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def code_commit() -> str:
    """The short commit of the package's checkout, with ``+dirty`` when tracked files other
    than ``results/`` (which the sweeps rewrite) differ from it; ``unknown`` outside a git
    checkout (an installed wheel) or without git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
