"""Training progress as a periodic line (``kat: step 12/150 (8%), 1,234 tokens/s, 2.3 s/step,
about 5 min left``): readable in sweep logs and when several jobs share a terminal. Off while a
progress bar is shown (``callbacks.progress_bar.refresh_rate`` > 0)."""

from __future__ import annotations

from typing import Any

import lightning as L

from kat_research.console import Progress


class ProgressLine(L.Callback):
    """Print :class:`kat_research.console.Progress` lines every ``every_s`` seconds of
    training (the first after the first optimizer step); tokens are the module's generated
    rollout tokens (``OPDModule.totals``)."""

    def __init__(self, name: str, every_s: float = 30.0):
        if not every_s > 0:
            raise ValueError(f"callbacks.progress_line.every_s must be > 0, got {every_s}")
        self.name, self.every_s = name, every_s
        self._progress: Progress | None = None

    @staticmethod
    def _tokens(pl_module: L.LightningModule) -> int | None:
        totals = getattr(pl_module, "totals", None)
        return totals.get("tokens_generated") if isinstance(totals, dict) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = trainer.progress_bar_callback
        if not trainer.is_global_zero or (bar is not None and bar.is_enabled):
            return
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._progress = Progress(self.name, total, every_s=self.every_s)
        self._progress.start(trainer.global_step, self._tokens(pl_module) or 0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if self._progress is not None:
            self._progress.update(trainer.global_step, self._tokens(pl_module))
