"""Model caches written atomically: concurrent jobs (a sweep's first jobs, submitit_local, DDP
ranks) may build the same cached model at once, and none may load a half-written folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def publish_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh private folder beside ``path``; when the block ends without error, it
    becomes ``path`` in one rename. If another process published ``path`` meanwhile, that copy
    wins and this one is discarded; on error nothing is published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
