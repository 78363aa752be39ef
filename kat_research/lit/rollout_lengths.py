"""Every training rollout's length, per step, for the planner's decode-time model.

Each optimizer step appends one line per rollout row (all ranks, gathered to rank zero) to
``<job>/rollouts/lengths.csv`` (:data:`~kat_research.layout.LENGTHS_FILE`)::

    step,row,generated,kept,stop_reason

``step`` is the 0-based optimizer step the row trains, ``row`` its index in the step's rows
over all ranks (rank order; under gradient accumulation the micro-batches continue the count),
``generated`` the tokens the student sampled (the decode steps the row occupied: with KAT up to
the detection point, past the cut), ``kept`` the tokens trained on (``Rollout.cut``) and
``stop_reason`` eos / max_tokens / terminated / stale. A resumed run first drops the lines of
the steps it trains again (those at or after its checkpoint's step), so the file holds each
step once. With a TensorBoard logger the step's generated lengths also go to a histogram
(``rollout/generated_length``). :func:`read_generated` is the planner's reader
(``plan.decode.from_runs``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from kat_research.distributed import all_gather_cat
from kat_research.layout import LENGTHS_FILE, write_atomic
from kat_research.rollout.types import STOP_REASONS, STOP_STALE

COLUMNS = ("step", "row", "generated", "kept", "stop_reason")
_REASONS = (*STOP_REASONS, STOP_STALE)  # stop reasons by code, for the gather


def trim_lengths(path: Path, step: int) -> int:
    """Drop the lines of ``path`` logged at optimizer steps >= ``step``; return how many."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(r["step"]) < step]
    if len(kept) < len(rows):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        write_atomic(path, text.getvalue())
    return len(rows) - len(kept)


def read_generated(folder: str | Path, last_steps: int | None = None) -> list[int]:
    """The generated lengths a run logged, of its last ``last_steps`` logged steps (None: all).
    Raises FileNotFoundError naming the file when the folder has none."""
    path = Path(folder) / LENGTHS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="") as f:
        rows = [(int(r["step"]), int(r["generated"])) for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path} holds no rollout rows yet")
    steps = sorted({step for step, _ in rows})
    first = steps[-last_steps] if last_steps is not None and last_steps < len(steps) else steps[0]
    return [length for step, length in rows if step >= first]


class RolloutLengthLog(L.Callback):
    """Appends each step's rollout lengths to ``<default_root_dir>/rollouts/lengths.csv``
    (rank zero, rows of every rank), and a histogram to TensorBoard when it logs."""

    def __init__(self, histogram: bool = True) -> None:
        self.histogram = histogram
        self._step, self._rows = -1, 0  # the step being logged, rows logged for it so far

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / LENGTHS_FILE

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # a resumed run trains the steps from its checkpoint again
            trim_lengths(self.path(trainer), trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step != self._step:
            self._step, self._rows = trainer.global_step, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is None:
            return
        codes = torch.tensor([_REASONS.index(r) for r in rollout.stop_reason])
        local = torch.stack([rollout.lengths.cpu(), rollout.cut.cpu(), codes], dim=1).long()
        rows = all_gather_cat(local.flatten().to(pl_module.device)).view(-1, 3).cpu()
        first, self._rows = self._rows, self._rows + rows.shape[0]
        if not trainer.is_global_zero:
            return
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            if new:
                writer.writerow(COLUMNS)
            for i, (generated, kept, code) in enumerate(rows.tolist()):
                writer.writerow([self._step, first + i, generated, kept, _REASONS[code]])
        if self.histogram:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram(
                        "rollout/generated_length", rows[:, 0], global_step=self._step
                    )
