"""A training run's folder across attempts: who owns it, which checkpoint a run resumes from,
and keeping its metrics file whole when it does.

- :func:`hold` locks the folder for one process (``run.lock``, released when the process ends,
  however it ends): a second run started on a held folder is refused.
- :func:`claim` records the run's config fingerprint in ``run.json`` on the first attempt and
  refuses a folder that holds another run's files (a different config, or files but no record).
  The fingerprint does not depend on where the folder is: a moved or copied folder resumes.
- :func:`resume_checkpoint` picks the checkpoint a run continues from: an explicit path (checked),
  or with ``resume=auto`` the newest resumable one of ``checkpoints/`` (``lit.resume``).
- :func:`trim_metrics` drops the CSV rows a resumed run will log again (steps after the
  checkpoint), so one run's metrics stay one file without duplicates.

Everything here runs before any model is loaded.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kat_research.layout import (
    CHECKPOINT_DIR,
    JOB_FILE,
    STATUS_FILE,
    read_json,
    write_atomic,
)
from kat_research.lit.resume import check_checkpoint, newest_resumable

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"  # the resolved config of the run's first attempt
LOCK_FILE = "run.lock"  # locked (flock) by the process that runs in the folder; holds its pid
# Keys that may change between attempts of one run: where it writes, how it resumes, how long
# it trains (extending a finished run is resuming it), how many threads it uses, what it prints,
# the peak learning rate (the new rate takes effect: lit/checkpoint_hooks.PeakLearningRate) and
# how it reaches a served teacher (a restarted teacher server may listen elsewhere).
# Everything else must match the folder's first attempt (README: Resuming).
RESUMABLE_CHANGES = (
    "paths",
    "resume",
    "run_dir",
    "threads",
    "verbose",
    "optimizer.lr",
    "trainer.max_steps",
    "trainer.max_epochs",
    "teacher.vllm.url",
    "teacher.vllm.timeout_s",
    "teacher.vllm.retries",
    "teacher.vllm.retry_wait_s",
)
AUTO, NEVER = "auto", "never"
LAUNCHER_FILES = {
    ".hydra",
    RUN_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    JOB_FILE,
    STATUS_FILE,
    ".submitit",
    "submitit.json",
}


class RunFolderError(RuntimeError):
    """A run folder that this run must not write into; the message says what to change."""


def _placeless(value: Any, places: list[tuple[str, str]]) -> Any:
    """``value`` with every occurrence of a folder of ``places`` (path, its name) in its strings
    replaced by the folder's name, longest path first."""
    if isinstance(value, dict):
        return {k: _placeless(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeless(v, places) for v in value]
    if isinstance(value, str):
        for path, name in places:
            value = value.replace(path, name)
    return value


def fingerprint(cfg: DictConfig) -> str:
    """A hash of the resolved config without the keys of :data:`RESUMABLE_CHANGES`, and
    without where the run's folders are: values under ``paths.*`` (the run folder, the data and
    cache folders) count by name, not by place (``logger.csv.save_dir`` is ``${paths.output_dir}``
    wherever the folder is moved)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    folders = data.get("paths") or {}
    places = sorted(
        ((str(v).rstrip("/"), f"${{paths.{k}}}") for k, v in folders.items() if v),
        key=lambda place: -len(place[0]),
    )
    data = _placeless(data, [(path, name) for path, name in places if len(path) > 1])
    for dotted in RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def launcher_file(name: str) -> bool:
    """Files a launcher writes before the run starts (Hydra's config and log, a sweep's records)."""
    return name in LAUNCHER_FILES or name.endswith(".log")


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs; raise :class:`RunFolderError` if
    another process holds it. The lock (``flock`` on ``run.lock``) is released by the kernel
    when the holder exits, even on kill -9, so a dead run never blocks its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderError(
            f"{folder} is in use by another run (process {holder} holds {path}): wait for it to "
            "finish, or choose another run_dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def claim(folder: Path, cfg: DictConfig, resume: str) -> bool:
    """Check that ``folder`` is this run's and record it; True if an earlier attempt of this run
    wrote there. Raises :class:`RunFolderError` for another run's folder, or for an earlier
    attempt of this run with ``resume=never``."""
    record = read_json(folder / RUN_FILE)
    mine = fingerprint(cfg)
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    earlier = [name for name in names if not launcher_file(name)]
    if record is None and earlier:
        raise RunFolderError(
            f"{folder} already holds files ({', '.join(sorted(earlier)[:5])}) of a run that did "
            "not record its config: choose another run_dir (or paths.output_dir)"
        )
    if record is not None and record["fingerprint"] != mine:
        raise RunFolderError(
            f"{folder} belongs to another run (its config differs from this one beyond "
            f"{', '.join(RESUMABLE_CHANGES)}; see {folder / CONFIG_FILE}): choose "
            "another run_dir, or run that folder's own config to resume it"
        )
    if record is not None and resume == NEVER:
        raise RunFolderError(
            f"{folder} holds an earlier attempt of this run and resume=never: set resume=auto to "
            "continue it, or choose another run_dir"
        )
    attempts = (record or {}).get("attempts", 0) + 1
    folder.mkdir(parents=True, exist_ok=True)
    info = {"fingerprint": mine, "attempts": attempts, "pid": os.getpid()}
    write_atomic(folder / RUN_FILE, json.dumps(info, indent=2))
    if record is None:  # also when not launched by Hydra (no .hydra/config.yaml)
        write_atomic(folder / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    return record is not None


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from (None: from scratch) and its optimizer step."""

    path: Path | None
    step: int = 0


def resume_checkpoint(folder: Path, resume: str) -> Resume:
    """Where a run in ``folder`` starts: with ``resume=auto`` the checkpoint of
    ``folder/checkpoints`` with the most optimizer steps that loads and passes its checksum
    (file times do not count: a touched old file is not newer; none: from scratch);
    ``never``: from scratch; any other value is a checkpoint path, which must load."""
    if resume == NEVER:
        return Resume(None)
    if resume != AUTO:
        path = Path(resume)
        return Resume(path, check_checkpoint(path)["global_step"])
    found = newest_resumable(
        folder / CHECKPOINT_DIR,
        remedy="Delete them (or set resume=never with another run_dir) to start over.",
    )
    return Resume(*found) if found else Resume(None)


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of a Lightning ``metrics.csv`` logged at optimizer steps >= ``step`` (a
    resumed run logs them again) and a row torn by a kill during its append (too few or too
    many fields, or no step); return how many were dropped. Warns when the row of step
    ``step - 1`` is missing: Lightning saves a step's checkpoint just before logging its
    metrics, so a kill in between loses that one row."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    whole = [r for r in rows if None not in r and None not in r.values() and _step(r) is not None]
    if len(whole) < len(rows):
        log.warning("%s: dropped %d torn row(s) of a killed run", path, len(rows) - len(whole))
    logged = {_step(r) for r in whole}
    if step > 0 and step - 1 not in logged:
        log.warning(
            "%s has no row for step %d: the run stopped between that step's checkpoint and its "
            "metrics, which are lost (training resumes correctly after it)",
            path,
            step - 1,
        )
    kept = [r for r in whole if _step(r) < step]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def _step(row: dict[str, str | None]) -> int | None:
    """The optimizer step of a ``metrics.csv`` row, or None when it has none (a torn row)."""
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None
