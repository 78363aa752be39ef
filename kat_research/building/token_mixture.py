"""Language-model batches from a mixture of plain documents (loss on every token) and chat
SFT rows (loss on the completion only): how the testbed models are pre-trained on copy-rich
text and keep some of it in their SFT mixture."""

from __future__ import annotations

import random
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kat_research.data.datamodule import ResumableDataLoader, batches_consumed
from kat_research.data.prompts import (
    IGNORE_INDEX,
    encode_completions,
    encode_prompts,
    pad_sequences,
)
from kat_research.data.sampler import LoaderShuffleBatchSampler
from kat_research.data.sources import Row

Example = tuple[list[int], list[int]]  # (input ids, labels with IGNORE_INDEX where unscored)


def document_examples(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]
) -> list[Example]:
    """Plain-text documents (no chat template), each followed by eos; every token is scored."""
    encoded = tokenizer(list(documents), add_special_tokens=False).input_ids
    return [([*ids, tokenizer.eos_token_id], [*ids, tokenizer.eos_token_id]) for ids in encoded]


def sft_examples(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row], instruction: str = ""
) -> list[Example]:
    """Chat-formatted prompt + solution + eos; only the solution and eos are scored."""
    missing = [r.problem_id for r in rows if r.solution is None]
    if missing:
        raise ValueError(f"rows without a solution to train on: {missing[:5]}")
    prompts = encode_prompts(tokenizer, [r.problem for r in rows], instruction)
    completions = encode_completions(tokenizer, [r.solution for r in rows])
    return [
        ([*p, *c], [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions, strict=True)
    ]


def mix(parts: Sequence[tuple[Sequence[Example], float]], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn with replacement, each from part i with probability ``weight_i``."""
    parts = [(examples, weight) for examples, weight in parts if weight > 0]
    if not parts or any(not examples for examples, _ in parts):
        raise ValueError("every mixture part with a positive weight needs examples")
    rng = random.Random(seed)
    weights = [weight for _, weight in parts]
    return [rng.choice(parts[rng.choices(range(len(parts)), weights)[0]][0]) for _ in range(n)]


class ExampleCollator:
    """Examples -> right-padded ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        ids = [e[0][: self.max_length] for e in examples]
        labels = [e[1][: self.max_length] for e in examples]
        input_ids, mask = pad_sequences(ids, self.pad_token_id, left=False)
        label_ids, _ = pad_sequences(labels, IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


class ExampleDataModule(L.LightningDataModule):
    """Serves a fixed list of examples in a seeded shuffled order, ``batch_size`` at a time;
    examples longer than ``max_length`` are truncated (documents are generated to fit).

    The order is a plain seeded DataLoader shuffle's (what the committed testbed stages were
    trained with, so their rebuilds stay bitwise equal), served by
    :class:`LoaderShuffleBatchSampler` from the trainer's optimizer step: a fit resumed from a
    checkpoint sees the batches the interrupted one would have.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        pad_token_id: int,
        batch_size: int,
        max_length: int,
        seed: int = 0,
    ):
        super().__init__()
        self.examples = list(examples)
        self.collator = ExampleCollator(pad_token_id, max_length)
        self.batch_size, self.seed = batch_size, seed

    def _steps_done(self) -> int:
        return batches_consumed(self.trainer)

    def train_dataloader(self) -> DataLoader:
        sampler = LoaderShuffleBatchSampler(
            len(self.examples), self.batch_size, seed=self.seed, consumed=self._steps_done
        )
        return ResumableDataLoader(
            self.examples,
            batch_sampler=sampler,
            collate_fn=self.collator,
            # the loader's own base-seed draw stays off the global RNG, as it was
            generator=torch.Generator().manual_seed(self.seed),
        )
