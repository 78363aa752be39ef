"""Divergence guard: a run whose numbers have gone wrong stops with an error that says so, and a
run drifting out of any healthy range is warned about while it is still finite.

``OPDModule`` raises :class:`TrainingDivergedError` when the student's logits (while sampling
rollouts), the loss or the gradient norm are NaN or inf. :class:`DivergenceGuard` (a callback,
``callbacks.divergence_guard``) warns once per run when the gradient norm or the student's
weights pass finite bounds: a learning rate far too high can drive every weight to thousands
while all values stay finite and the loss looks normal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# max |w| of a weight tensor is compared with max(its value at the start, WEIGHT_FLOOR), so
# tensors that start near zero (biases, zero-initialised adapters) may grow to O(1) freely.
WEIGHT_FLOOR = 1.0


class TrainingDivergedError(FloatingPointError):
    """Training produced NaN or inf: the run cannot continue from its current weights."""


class DivergenceWarning(UserWarning):
    """Training left the range a healthy run stays in (``callbacks.divergence_guard``)."""


def current_lr(trainer: L.Trainer) -> float | None:
    """The first optimizer's current learning rate (after warm-up / decay), if any."""
    return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None


def likely_causes(trainer: L.Trainer) -> str:
    """The settings that usually make training diverge, with this run's values."""
    causes = [
        f"a learning rate too high (optimizer.lr; the current rate is {current_lr(trainer):.3g})",
        f"a precision too narrow (trainer.precision={trainer.precision})",
    ]
    if not trainer.gradient_clip_val:
        causes.append("no gradient clipping (trainer.gradient_clip_val=null)")
    return ", ".join(causes[:-1]) + " or " + causes[-1]


def divergence_error(trainer: L.Trainer, finding: str) -> TrainingDivergedError:
    """The error for a non-finite ``finding`` (e.g. "the loss is nan") at the trainer's current
    step: optimizer steps done, as in checkpoint names and the step column of metrics.csv."""
    return TrainingDivergedError(
        f"training diverged at step {trainer.global_step}: {finding}. Likely causes: "
        f"{likely_causes(trainer)}. Lower optimizer.lr and start again, or resume from a "
        "checkpoint saved before the divergence (resume=<run>/checkpoints/stepNNNNNN.ckpt) "
        "with a lower rate."
    )


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together, over all ranks (FSDP shards included)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def grad_scaler_active(trainer: L.Trainer) -> bool:
    """Whether float16 loss scaling runs: its scaler skips steps with NaN/inf gradients and
    lowers the scale, so such gradients are part of normal training."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def weight_abs_max(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """max |w| of each tensor, over all ranks (FSDP shards included); one host sync."""
    names, values, sharded = [], [], False
    for name, p in named:
        local = p.to_local() if isinstance(p, DTensor) else p
        sharded |= isinstance(p, DTensor)
        names.append(name)
        values.append(local.detach().abs().amax() if local.numel() else local.new_zeros(()))
    if not values:
        return {}
    stacked = torch.stack([v.float() for v in values])
    if sharded and dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return dict(zip(names, stacked.tolist(), strict=True))


class DivergenceGuard(L.Callback):
    """Warn once per run (rank 0, as a :class:`DivergenceWarning`) when an ``OPDModule``'s
    training leaves the range of a healthy run while every value is still finite.

    Args:
        max_grad_norm: bound on the global gradient norm before clipping, as the module
            measures it (``OPDModule.grad_norm``, logged as ``train/grad_norm``); None = off.
            Only finite norms count: NaN/inf stops training in ``OPDModule`` (or, under float16
            loss scaling, makes the scaler skip the step).
        max_weight_growth: bound on each student weight tensor's max |w| as a multiple of
            max(its value when training started, ``WEIGHT_FLOOR``); None = off.
    """

    def __init__(self, max_grad_norm: float | None = None, max_weight_growth: float | None = None):
        for key, value in (
            ("max_grad_norm", max_grad_norm),
            ("max_weight_growth", max_weight_growth),
        ):
            if value is not None and not value > 0:
                raise ValueError(
                    f"callbacks.divergence_guard.{key} must be > 0 or null (off), got {value}"
                )
        self.max_grad_norm, self.max_weight_growth = max_grad_norm, max_weight_growth
        self._start_abs_max: dict[str, float] = {}
        self._warned: set[str] = set()
        self.finding: str | None = None  # the first warning's text: the run's summary shows it

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: a resumed run still knows that it diverged (and when)."""
        return {
            "warned": sorted(self._warned),
            "finding": self.finding,
            "start_abs_max": self._start_abs_max,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = set(state_dict.get("warned", ()))
        self.finding = state_dict.get("finding")
        self._start_abs_max = dict(state_dict.get("start_abs_max", {}))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.max_weight_growth is not None and not self._start_abs_max:  # kept on resume
            self._start_abs_max = weight_abs_max(pl_module.student.named_parameters())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        norm = pl_module.grad_norm
        bound = self.max_grad_norm
        if bound is not None and norm is not None and math.isfinite(norm) and norm > bound:
            self._warn(
                trainer,
                "max_grad_norm",
                f"the gradient norm before clipping is {norm:.4g}, above "
                f"callbacks.divergence_guard.max_grad_norm={bound:g}",
            )
        if self.max_weight_growth is None or "max_weight_growth" in self._warned:
            return
        now = weight_abs_max(pl_module.student.named_parameters())
        for name, value in now.items():
            start = max(self._start_abs_max.get(name, 0.0), WEIGHT_FLOOR)
            if value > self.max_weight_growth * start or not math.isfinite(value):
                self._warn(
                    trainer,
                    "max_weight_growth",
                    f"the student's weight tensor {name} reached max |w| = {value:.4g}, "
                    f"{value / start:.3g} times max(its value at the start, {WEIGHT_FLOOR:g}) = "
                    f"{start:.3g}: above callbacks.divergence_guard.max_weight_growth="
                    f"{self.max_weight_growth:g}",
                )
                return

    def _warn(self, trainer: L.Trainer, bound: str, what: str) -> None:
        if bound in self._warned:
            return
        self._warned.add(bound)
        if self.finding is None:
            self.finding = f"step {trainer.global_step}: {what}"
        if trainer.is_global_zero:
            warnings.warn(
                f"step {trainer.global_step}: {what}; training is likely diverging. Likely "
                f"causes: {likely_causes(trainer)}. (Warned once per run.)",
                DivergenceWarning,
                stacklevel=2,
            )
