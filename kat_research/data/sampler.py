"""A batch sampler whose order is a pure function of (seed, batches consumed), so a resumed
run sees exactly the prompts an uninterrupted run would have seen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Epoch ``e`` visits ``randperm(n)`` drawn from ``seed + e`` in batches of ``batch_size``
    (the last partial batch dropped when ``drop_last``).

    Each ``__iter__`` asks ``consumed()`` how many batches the run has already trained on and
    continues from there: the rest of that epoch. Lightning restarts a mid-epoch resume by
    calling ``iter`` again, so no loader state has to be checkpointed.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        consumed: Callable[[], int] = lambda: 0,
    ):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.consumed = (
            shuffle,
            drop_last and n >= batch_size,
            consumed,
        )

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
        ).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.consumed(), len(self))
        order = self.epoch_order(epoch)
        for b in range(offset, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]
