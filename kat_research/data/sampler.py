"""A batch sampler whose order is a pure function of (seed, batches consumed), so a resumed
run sees exactly the prompts an uninterrupted run would have seen, and each data-parallel rank
sees its own disjoint share of every global batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Epoch ``e`` visits ``randperm(n)`` drawn from ``seed + e`` in global batches of
    ``batch_size`` (the last partial batch dropped when ``drop_last``).

    With ``world_size`` ranks, rank ``r`` yields the ``r``-th of ``world_size`` equal,
    contiguous slices of each global batch (``batch_size`` must divide evenly), so the ranks'
    prompts are disjoint and their union in rank order is the single-process batch.

    Each ``__iter__`` asks ``consumed()`` how many global batches the run has already trained
    on and continues from there: the rest of that epoch. Lightning restarts a mid-epoch resume
    by calling ``iter`` again, so no loader state has to be checkpointed.
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
        rank: int = 0,
        world_size: int = 1,
    ):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} (the global batch) must be divisible by the "
                f"{world_size} data-parallel ranks"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.consumed = (
            shuffle,
            drop_last and n >= batch_size,
            consumed,
        )
        self.rank, self.world_size = rank, world_size

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
        share = self.batch_size // self.world_size
        for b in range(offset, len(self)):
            start = b * self.batch_size + self.rank * share
            yield order[start : start + share]


class LoaderShuffleBatchSampler(ResumableBatchSampler):
    """:class:`ResumableBatchSampler` in the order a plain
    ``DataLoader(shuffle=True, drop_last=True, generator=Generator().manual_seed(seed))`` draws:
    per epoch, one int64 draw (the loader's base seed), ``randperm(n)`` (the order) and one more
    ``randperm(n)`` (drawn when the exhausted sampler is asked for the leftover batch). Models
    first trained through such a loader (the committed testbed stages) keep their exact batches,
    and a resumed fit continues them; ``tests/test_sampler.py`` checks this against the loader.
    """

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):  # replay the draws of the epochs before
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(self.n, generator=generator)
            torch.randperm(self.n, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.n, generator=generator).tolist()
