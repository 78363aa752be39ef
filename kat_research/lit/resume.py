"""Which Lightning checkpoint a run can continue from.

A file is resumable when it loads as a Lightning training checkpoint and its weights match the
SHA-256 saved with them (:class:`~kat_research.lit.checkpoint_hooks.WeightsDigest`); a folder of
checkpoints resumes from its resumable file with the most optimizer steps (file times do not
count: a touched old file is not newer). Training runs (``training.folder``) and the builders'
long fine-tunes (``building.pretrained_sft``) both resume through here.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from kat_research.lit.checkpoint_hooks import DIGEST_KEY, weights_digest

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def check_checkpoint(path: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's training progress (``global_step``, ``epoch``); raises
    :class:`CheckpointError` naming the file and what is wrong with it. Reads the file
    memory-mapped; ``verify`` also reads every weight to compare it with the saved checksum."""
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
    if verify:
        verify_weights(path, state)
    return {"global_step": int(state["global_step"]), "epoch": int(state.get("epoch", 0))}


def verify_weights(path: Path, state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's weights do not match the checksum
    saved with them (``weights_sha256``; checkpoints written before it existed pass)."""
    saved = state.get(DIGEST_KEY)
    if saved is None:
        return
    try:
        now = weights_digest(state["state_dict"])
    except Exception as error:  # a damaged tensor entry may not even read
        raise CheckpointError(
            f"checkpoint {path}: its weights cannot be read ({type(error).__name__}: {error})"
        ) from error
    if now is not None and now != saved:
        raise CheckpointError(
            f"checkpoint {path}: its weights do not match the checksum saved with them "
            f"({DIGEST_KEY}): the file was damaged after it was written"
        )


def newest_resumable(directory: Path, remedy: str) -> tuple[Path, int] | None:
    """The checkpoint of ``directory/*.ckpt`` with the most optimizer steps that loads and passes
    its checksum, with its step; None when there is none. Broken files are skipped with a warning
    naming each; when every file is broken, :class:`CheckpointError` lists them and ``remedy``."""
    broken, steps = [], {}
    for path in sorted(directory.glob("*.ckpt")):
        try:
            steps[path] = check_checkpoint(path, verify=False)["global_step"]
        except CheckpointError as error:
            broken.append(str(error))
    # most steps first; at equal steps last.ckpt and stepNNNNNN.ckpt hold the same state
    for path in sorted(steps, key=lambda p: (-steps[p], p.name)):
        try:
            check_checkpoint(path, verify=True)
        except CheckpointError as error:
            broken.append(str(error))
            continue
        for message in broken:
            log.warning("skipping a broken checkpoint: %s", message)
        if broken:
            log.warning("resuming from %s (step %d), the newest that loads", path, steps[path])
        return path, steps[path]
    if broken:
        raise CheckpointError(
            f"no checkpoint in {directory} can be resumed from: {'; '.join(broken)}. {remedy}"
        )
    return None
