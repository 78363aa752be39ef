"""Collectives the OPD module needs under data parallelism; identities in a single process.

The module injects these into the pure parts (loss weights, KAT buffer) so that those parts
never import ``torch.distributed`` themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``x`` over ranks (a new tensor; ``x`` itself in a single process)."""
    if world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over ranks, in rank order."""
    if world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=x.device))
    width = max(int(s) for s in sizes)
    padded = torch.cat([x, x.new_zeros(width - x.numel())])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s)] for part, s in zip(parts, sizes, strict=True)])
