"""Learning-rate schedule of the paper: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def warmup_cosine_factor(
    step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """LR multiplier at ``step``: 0→1 linearly over ``warmup_steps``, then cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.03,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Cosine schedule with linear warm-up (``warmup_steps`` overrides ``warmup_ratio``)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warm = round(warmup_ratio * total_steps) if warmup_steps is None else warmup_steps
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(
            step, total_steps=total_steps, warmup_steps=warm, min_lr_ratio=min_lr_ratio
        ),
    )


def optimizers_config(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., Optimizer],
    scheduler: Callable[..., LRScheduler] | None,
    total_steps: int,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer and a per-step schedule."""
    built = optimizer(params=params)
    if scheduler is None:
        return {"optimizer": built}
    return {
        "optimizer": built,
        "lr_scheduler": {
            "scheduler": scheduler(built, total_steps=total_steps),
            "interval": "step",
        },
    }
