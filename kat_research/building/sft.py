"""Supervised fine-tuning as a LightningModule: how the testbed's and the demo's models start.

Works for any causal LM: the batch carries ``labels`` with -100 on prompt and padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kat_research.lit.schedule import optimizers_config


class SFTModule(L.LightningModule):
    """Next-token cross-entropy on the completion tokens.

    ``student`` and ``tokenizer`` are the names the training callbacks (evaluation) read, as on
    the OPD module; the tokenizer is only needed by such callbacks.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.model = model.train()
        self.tokenizer = tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    @property
    def student(self) -> PreTrainedModel:
        """The model being trained."""
        return self.model

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"SFT loss is {out.loss.item()} at step {self.global_step}")
        self.log(
            "sft/loss",
            out.loss.detach(),
            prog_bar=True,
            on_step=True,
            batch_size=batch["input_ids"].shape[0],
        )
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizers_config(
            self.model.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )
