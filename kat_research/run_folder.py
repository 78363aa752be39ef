"""A training run's folder across attempts: who owns it, which checkpoint a run resumes from,
and keeping its metrics file whole when it does.

- :func:`claim` records the run's config fingerprint in ``run.json`` on the first attempt and
  refuses a folder that holds another run's files (a different config, or files but no record).
- :func:`resume_checkpoint` picks the checkpoint a run continues from: an explicit path (checked),
  or with ``resume=auto`` the newest checkpoint in ``checkpoints/`` that loads, falling back to
  older ones with a warning when the newest is broken.
- :func:`trim_metrics` drops the CSV rows a resumed run will log again (steps after the
  checkpoint), so one run's metrics stay one file without duplicates.

Everything here runs before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kat_research.layout import (
    CHECKPOINT_DIR,
    JOB_FILE,
    STATUS_FILE,
    read_json,
    write_atomic,
)

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"  # the resolved config of the run's first attempt
# Keys that may change between attempts of one run: where it writes, how it resumes, how long
# it trains (extending a finished run is resuming it), how many threads it uses and how it
# reaches a served teacher (a restarted teacher server may listen elsewhere).
RESUMABLE_CHANGES = (
    "paths",
    "resume",
    "run_dir",
    "threads",
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
    JOB_FILE,
    STATUS_FILE,
    ".submitit",
    "submitit.json",
}


class RunFolderError(RuntimeError):
    """A run folder that this run must not write into; the message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def fingerprint(cfg: DictConfig) -> str:
    """A hash of the resolved config without the keys of :data:`RESUMABLE_CHANGES`."""
    data = OmegaConf.to_container(cfg, resolve=True)
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


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's training progress (``global_step``, ``epoch``); raises
    :class:`CheckpointError` naming the file and what is wrong with it. Reads the file
    memory-mapped: large tensors are not loaded."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was interrupted")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is not a torch checkpoint (no zip archive): "
            "it is truncated or corrupted"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # any failure to read means: not resumable
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) cannot be read: {type(error).__name__}: {error}"
        ) from error
    missing = [k for k in ("state_dict", "global_step", "loops") if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint (missing {missing})"
        )
    return {"global_step": int(state["global_step"]), "epoch": int(state.get("epoch", 0))}


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from (None: from scratch) and its optimizer step."""

    path: Path | None
    step: int = 0


def resume_checkpoint(folder: Path, resume: str) -> Resume:
    """Where a run in ``folder`` starts: with ``resume=auto`` the newest checkpoint of
    ``folder/checkpoints`` that loads (none: from scratch); ``never``: from scratch; any other
    value is a checkpoint path, which must load."""
    if resume == NEVER:
        return Resume(None)
    if resume != AUTO:
        path = Path(resume)
        return Resume(path, check_checkpoint(path)["global_step"])
    candidates = sorted(
        (folder / CHECKPOINT_DIR).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    broken = []
    for path in candidates:
        try:
            progress = check_checkpoint(path)
        except CheckpointError as error:
            broken.append(str(error))
            continue
        for message in broken:
            log.warning("skipping a broken checkpoint: %s", message)
        if broken:
            log.warning("resuming from the older checkpoint %s instead", path)
        return Resume(path, progress["global_step"])
    if broken:
        raise CheckpointError(
            f"no checkpoint in {folder / CHECKPOINT_DIR} can be resumed from: "
            + "; ".join(broken)
            + ". Delete them (or set resume=never with another run_dir) to start over."
        )
    return Resume(None)


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of a Lightning ``metrics.csv`` logged at optimizer steps >= ``step`` (a
    resumed run logs them again); return how many were dropped. Warns when the row of step
    ``step - 1`` is missing: Lightning saves a step's checkpoint just before logging its
    metrics, so a kill in between loses that one row."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    logged = {int(float(r["step"])) for r in rows if r.get("step")}
    if step > 0 and step - 1 not in logged:
        log.warning(
            "%s has no row for step %d: the run stopped between that step's checkpoint and its "
            "metrics, which are lost (training resumes correctly after it)",
            path,
            step - 1,
        )
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)
