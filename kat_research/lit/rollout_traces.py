"""Opt-in dump of a few training rollouts' per-token KL, for notebooks and figures.

Enable it with a callback entry (the reproduction scales do), e.g. on the command line::

    +callbacks.rollout_traces._target_=kat_research.lit.rollout_traces.RolloutTraceWriter

Every ``every_n_steps`` optimizer steps (counted from 0, so the first batch is included) the
first ``n_rollouts`` rows of that step's rollout batch are appended to
``<job>/rollouts/kl_traces.jsonl``, one JSON object per rollout (fields and reader:
:mod:`kat_research.tables.traces`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from kat_research.layout import TRACE_FILE


class RolloutTraceWriter(L.Callback):
    """Appends per-token KL traces of ``n_rollouts`` training rollouts every ``every_n_steps``
    steps to ``<default_root_dir>/rollouts/kl_traces.jsonl`` (rank zero only)."""

    def __init__(self, every_n_steps: int = 100, n_rollouts: int = 4) -> None:
        if every_n_steps < 1 or n_rollouts < 1:
            raise ValueError("every_n_steps and n_rollouts must be >= 1")
        self.every_n_steps, self.n_rollouts = every_n_steps, n_rollouts

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step - 1
        rollout = getattr(pl_module, "last_rollout", None)
        if step % self.every_n_steps or rollout is None or rollout.kl is None:
            return
        if not trainer.is_global_zero:
            return
        threshold = rollout.terminator_metrics.get("kat/threshold", math.nan)
        active = rollout.terminator_metrics.get("kat/active", 0.0) > 0
        tokenizer = pl_module.tokenizer
        path = Path(trainer.default_root_dir) / TRACE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        kl = rollout.kl.tolist()
        with open(path, "a") as f:
            for row in range(min(self.n_rollouts, rollout.batch_size)):
                length = int(rollout.lengths[row])
                prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
                record = {
                    "step": step,
                    "row": row,
                    "length": length,
                    "kept": int(rollout.cut[row]),
                    "stop_reason": rollout.stop_reason[row],
                    "threshold": threshold if active and math.isfinite(threshold) else None,
                    "kl": [round(v, 6) if math.isfinite(v) else None for v in kl[row][:length]],
                    "prompt": tokenizer.decode(prompt.tolist()),
                    "text": tokenizer.decode(rollout.tokens[row, :length].tolist()),
                }
                f.write(json.dumps(record) + "\n")
