"""The Lightning data module serving training prompts (OPD) or prompt + solution pairs (SFT)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kat_research.data.prompts import (
    DEFAULT_INSTRUCTION,
    PromptCollator,
    SFTCollator,
    drop_too_long,
)
from kat_research.data.readers import LoadStats
from kat_research.data.sampler import ResumableBatchSampler
from kat_research.data.sources import GENERATED_KINDS, Row, SourceSpec, as_source_spec, load_rows

MODES = ("prompts", "sft")
DEFAULT_SYNTHETIC_VAL_SIZE = 256

log = logging.getLogger(__name__)


def _log_counts(
    role: str, spec: SourceSpec, load_stats: LoadStats, stats: dict[str, int], dropped: str
) -> None:
    """One console line per source: rows read, unique prompts kept, what was skipped or
    dropped. A warning when anything but configured de-duplication removed rows, or when a
    file or hub source keeps repeated prompts."""
    line = (
        f"{role} data: {stats['n_read']} rows read, {stats['n_rows']} kept "
        f"({stats['n_unique_prompts']} unique prompts)"
    )
    if load_stats.n_skipped:
        line += f"; {load_stats}"
    line += dropped
    repeats = spec.kind not in GENERATED_KINDS and stats["n_rows"] > stats["n_unique_prompts"]
    if repeats:  # the synthetic train split repeats problems by design
        line += "; repeated prompts kept (set data.source.dedup=true to drop them)"
    unexpected = (
        load_stats.n_skipped - load_stats.reasons["duplicate"] + stats["n_dropped_too_long"]
    )
    log.log(logging.WARNING if unexpected or repeats else logging.INFO, line)


def batches_consumed(trainer: L.Trainer | None) -> int:
    """Training batches ``trainer`` has consumed (0 without a trainer): where a
    :class:`ResumableBatchSampler` continues."""
    return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches


class ResumableDataLoader(DataLoader):
    """A DataLoader whose order resumes by itself: its ``ResumableBatchSampler`` continues from
    the batches the run has consumed, so there is no loader state to checkpoint. The empty
    ``state_dict`` tells Lightning so (it warns on a mid-epoch resume of loaders without one)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the order follows the trainer's step count."""


class PromptDataModule(L.LightningDataModule):
    """Loads rows from a source, drops prompts too long for the model, and batches them.

    Built from plain values (Hydra); the tokenizer comes later through ``attach_tokenizer``
    because the model config decides it. ``mode="prompts"`` yields left-padded prompt batches
    for rollouts; ``mode="sft"`` yields prompt + solution batches with masked labels
    (``max_length`` tokens at most). Validation always yields prompt batches, for grading
    generations. A synthetic source validates on its eval split (``val_size`` problems, 0 for
    none) unless ``val_source`` is given; other sources validate only on ``val_source``
    (``val_size`` caps its rows).

    After ``setup()``, ``stats`` holds row counts (``val_``-prefixed for validation):
    ``n_read`` records read, ``n_skipped`` skipped (``n_skipped_<reason>`` per reason, e.g.
    ``n_skipped_duplicate``, ``n_skipped_invalid_utf8``), ``n_dropped_too_long``, ``n_rows``
    served and ``n_unique_prompts`` among them (distinct problem + answer: the prompt count
    that epoch arithmetic should use). Each source's counts are logged in one line at setup, as
    a warning when records were skipped or dropped for a reason other than ``dedup``.
    """

    def __init__(
        self,
        source: SourceSpec | Mapping[str, Any],
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
        max_prompt_tokens: int = 512,
        batch_size: int = 32,
        mode: str = "prompts",
        max_length: int = 1024,
        val_source: SourceSpec | Mapping[str, Any] | None = None,
        val_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data mode must be one of {MODES}, got {mode!r}")
        self.source = as_source_spec(source)
        self.val_source = self._val_spec(val_source, val_size)
        self.instruction = instruction
        self.system = system
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.mode = mode
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self.stats: dict[str, int] = {}
        self._sources: dict[str, tuple[list[Row], LoadStats]] = {}  # role -> rows, counts

    def load_sources(self) -> None:
        """Read the training and validation sources (no tokenizer needed: before the models
        load); raise ValueError naming the source when one has no usable row."""
        for spec, role in ((self.source, "train"), (self.val_source, "validation")):
            if spec is None or role in self._sources:
                continue
            rows, load_stats = load_rows(spec)
            if not rows:
                raise ValueError(f"no rows left for {role}: {load_stats}")
            self._sources[role] = rows, load_stats

    def _val_spec(
        self, val_source: SourceSpec | Mapping[str, Any] | None, val_size: int | None
    ) -> SourceSpec | None:
        if val_source is not None:
            spec = as_source_spec(val_source)
            return spec if val_size is None else dataclasses.replace(spec, limit=val_size)
        if self.source.kind != "synthetic" or val_size == 0:
            return None
        n = DEFAULT_SYNTHETIC_VAL_SIZE if val_size is None else val_size
        return dataclasses.replace(self.source, split="eval", n=n, limit=None)

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the module the policy's tokenizer; needed before ``setup``."""
        self.tokenizer = tokenizer

    def _load(self, spec: SourceSpec, sft: bool, role: str) -> tuple[list[Row], dict[str, int]]:
        assert self.tokenizer is not None
        self.load_sources()
        rows, load_stats = self._sources[role]
        if sft and any(row.solution is None for row in rows):
            raise ValueError(
                f"mode=sft needs a solution per row but {spec.name} has none: set solution_field"
            )
        kept, n_too_long = drop_too_long(
            rows,
            self.tokenizer,
            self.max_prompt_tokens,
            self.instruction,
            self.system,
            self.max_length if sft else None,
        )
        limits = f"max_prompt_tokens={self.max_prompt_tokens}"
        if sft:
            limits += f" or max_length={self.max_length}"
        dropped = f"; dropped {n_too_long} longer than {limits}" if n_too_long else ""
        if not kept:
            raise ValueError(f"no rows left for {role}: {load_stats}{dropped}")
        stats = {
            "n_read": load_stats.n_read,
            "n_skipped": load_stats.n_skipped,
            "n_dropped_too_long": n_too_long,
            "n_rows": len(kept),
            "n_unique_prompts": len({(row.problem, row.answer) for row in kept}),
        }
        stats.update({f"n_skipped_{r}": n for r, n in sorted(load_stats.reasons.items())})
        _log_counts(role, spec, load_stats, stats, dropped)
        return kept, stats

    def setup(self, stage: str | None = None) -> None:
        """Load and filter the training and validation rows (once)."""
        if self.tokenizer is None:
            raise RuntimeError("call attach_tokenizer(tokenizer) before setup()")
        if self.stats:
            return
        self.train_rows, stats = self._load(self.source, sft=self.mode == "sft", role="train")
        if self.val_source is not None:
            self.val_rows, val_stats = self._load(self.val_source, sft=False, role="validation")
            stats.update({f"val_{key}": value for key, value in val_stats.items()})
        self.stats = stats

    def _collator(self, sft: bool) -> Callable[[Sequence[Row]], dict]:
        assert self.tokenizer is not None
        if sft:
            return SFTCollator(self.tokenizer, self.max_length, self.instruction, self.system)
        return PromptCollator(self.tokenizer, self.max_prompt_tokens, self.instruction, self.system)

    def _batches_consumed(self) -> int:
        return batches_consumed(self.trainer)

    def train_dataloader(self, consumed: Callable[[], int] | None = None) -> DataLoader:
        """Training batches, reshuffled every epoch from ``seed``; a resumed run continues
        where the checkpoint left off. ``batch_size`` is the global batch: under data
        parallelism each rank gets its disjoint share (see ``ResumableBatchSampler``), so the
        trainer must not inject a ``DistributedSampler`` (``use_distributed_sampler: false``).
        ``consumed`` replaces the trainer's step count as the batches already consumed (partial
        rollouts draw prompts at their own pace, from a loader of their own)."""
        trainer = self.trainer
        sampler = ResumableBatchSampler(
            len(self.train_rows),
            self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=True,
            consumed=consumed or self._batches_consumed,
            rank=0 if trainer is None else trainer.global_rank,
            world_size=1 if trainer is None else trainer.world_size,
        )
        return ResumableDataLoader(
            self.train_rows,
            batch_sampler=sampler,
            collate_fn=self._collator(self.mode == "sft"),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
