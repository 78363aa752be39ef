"""The 2-rank worker of tests/test_distributed.py, kept apart from it so that spawned ranks
import only torch and the pure modules (not Hydra, Lightning or transformers)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from kat_research.distributed import all_gather_cat, all_reduce_sum
from kat_research.losses import token_weights
from kat_research.termination import KATTerminator, kat_rule

KAT = dict(
    window=4, stride=2, patience=1, quantile=0.7, buffer_size=12, min_buffer=1, warmup_steps=0
)


def free_port() -> int:
    """A free TCP port for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_kl(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL [3 + rank, 12] and lengths of this rank's rows at a step (ranks differ
    in size)."""
    g = torch.Generator().manual_seed(10 * step + rank)
    kl = torch.rand(3 + rank, 12, generator=g, dtype=torch.float64)
    return kl, torch.randint(6, 13, (3 + rank,), generator=g)


def kat_step(
    terminator: KATTerminator, kl: torch.Tensor, lengths: torch.Tensor
) -> dict[str, float]:
    """One batch through the rule with the whole KL known at once; its metrics."""
    terminator.begin_batch(kl.shape[0], kl.shape[1])
    terminator.observe(torch.arange(kl.shape[0]), kl, lengths)
    return terminator.end_batch()


def rank_mask(rank: int) -> torch.Tensor:
    """This rank's loss mask [3, 7]."""
    g = torch.Generator().manual_seed(20 + rank)
    mask = torch.rand(3, 7, generator=g) < 0.6
    mask[rank] = False  # an all-masked row on each rank
    return mask


def worker(rank: int, port: int, out: str) -> None:
    """Run 3 KAT batches with a gathered buffer and the loss weights; save what the rank sees."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        kat = KATTerminator(kat_rule(**KAT))
        kat.set_gather(all_gather_cat)
        metrics = [kat_step(kat, *rank_kl(rank, step)) for step in range(2)]
        buffer = kat.buffer
        metrics.append(kat_step(kat, *rank_kl(rank, 2)))
        weights = {
            a: token_weights(rank_mask(rank), a, sum_over_ranks=all_reduce_sum, world_size=2)
            for a in ("token_mean", "seq_mean")
        }
        torch.save(
            {"buffer": buffer, "metrics": metrics, "weights": weights},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
