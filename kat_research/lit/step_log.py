"""A plain one-line-per-N-steps progress log: readable in CI logs and when several jobs
share one terminal (where progress bars would overwrite each other)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StepLog(L.Callback):
    """Print ``[name] step k/N  metric=value ...  elapsed`` every ``every_n_steps`` steps."""

    def __init__(self, name: str, every_n_steps: int = 100, metrics: tuple[str, ...] = ()):
        self.name, self.every_n_steps, self.metrics = name, every_n_steps, tuple(metrics)
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        values = trainer.callback_metrics
        shown = " ".join(f"{m}={float(values[m]):.4g}" for m in self.metrics if m in values)
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        elapsed = time.perf_counter() - self._start
        print(f"[{self.name}] step {step}/{total} {shown} ({elapsed:.0f} s)", flush=True)
