"""The building's batch order against its oracle, a plain seeded DataLoader shuffle: the
committed testbed stages were trained through such a loader, so their rebuilds (and resumed
stages) must see exactly its batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from kat_research.building.token_mixture import ExampleDataModule
from kat_research.data.sampler import LoaderShuffleBatchSampler


def loader_epochs(n: int, batch: int, seed: int, epochs: int) -> list[list[list[int]]]:
    loader = DataLoader(
        list(range(n)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return [[b.tolist() for b in loader] for _ in range(epochs)]


@pytest.mark.parametrize(("n", "batch", "seed"), [(23, 4, 7), (24, 4, 0), (5, 2, 3)])
def test_the_sampler_replays_a_seeded_dataloader_shuffle_epoch_by_epoch(n, batch, seed):
    expected = loader_epochs(n, batch, seed, epochs=3)
    consumed = 0
    sampler = LoaderShuffleBatchSampler(n, batch, seed=seed, consumed=lambda: consumed)
    for epoch in range(3):
        consumed = epoch * len(sampler)
        assert list(sampler) == expected[epoch]


def test_a_resumed_sampler_continues_mid_epoch():
    expected = [b for epoch in loader_epochs(23, 4, 7, epochs=2) for b in epoch]
    for done in (0, 2, 5, 7):  # 5 batches per epoch: mid first epoch, at and past its end
        sampler = LoaderShuffleBatchSampler(23, 4, seed=7, consumed=lambda done=done: done)
        assert list(sampler) == expected[done : (done // 5 + 1) * 5]


def test_example_batches_are_the_plain_loaders():
    examples = [([i, i + 1], [-100, i + 1]) for i in range(10)]
    data = ExampleDataModule(examples, pad_token_id=0, batch_size=3, max_length=8, seed=5)
    got = [b["input_ids"][:, 0].tolist() for b in data.train_dataloader()]
    assert got == loader_epochs(10, 3, 5, epochs=1)[0]
