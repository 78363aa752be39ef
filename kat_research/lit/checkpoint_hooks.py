"""What a training checkpoint carries beyond Lightning's own state, and what a resume may change.

- :class:`WeightsDigest` stores a SHA-256 of the saved weights in every checkpoint
  (``weights_sha256``); ``lit.resume.check_checkpoint`` recomputes it before a run resumes, so
  bytes damaged inside an intact archive are caught like a truncated file.
- :class:`PeakLearningRate` makes ``optimizer.lr`` of the resuming run take effect: the
  checkpoint's optimizer and schedule state are rescaled to the new peak rate before Lightning
  restores them (without it, the optimizer state would bring the old rate back).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)
DIGEST_KEY = "weights_sha256"


def weights_digest(state_dict: Mapping[str, Any]) -> str | None:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state_dict``'s tensors (sorted by
    name); None when a tensor is sharded (a distributed checkpoint is not one file)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            return None  # DTensor and other tensor subclasses: no plain bytes
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WeightsDigest(L.Callback):
    """Store :func:`weights_digest` of the checkpoint's ``state_dict`` under ``weights_sha256``."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        value = weights_digest(checkpoint.get("state_dict", {}))
        if value is not None:
            checkpoint[DIGEST_KEY] = value


def set_peak_lr(checkpoint: dict[str, Any], lr: float) -> float | None:
    """Rescale ``checkpoint``'s optimizer and LR-schedule state to the peak rate ``lr`` (the
    schedule keeps its position: the current rate scales by ``lr / old peak``); return the old
    peak, or None when it already was ``lr`` or the checkpoint holds no optimizer state."""
    states = checkpoint.get("optimizer_states") or []
    groups = [g for state in states for g in state.get("param_groups", [])]
    if not groups:
        return None
    old = groups[0].get("initial_lr", groups[0]["lr"])
    if math.isclose(old, lr, rel_tol=1e-12):
        return None
    ratio = lr / old
    for group in groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    for schedule in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if key in schedule:
                schedule[key] = [value * ratio for value in schedule[key]]
    return old


class PeakLearningRate(L.Callback):
    """On resume, replace the checkpoint's peak learning rate by ``lr`` (``optimizer.lr``)."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        old = set_peak_lr(checkpoint, self.lr)
        if old is not None:
            log.warning(
                "optimizer.lr=%g replaces the checkpoint's peak learning rate %g from step %d on",
                self.lr,
                old,
                checkpoint.get("global_step", 0),
            )
