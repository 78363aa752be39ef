"""The student's training forward in length buckets.

After early termination the kept lengths of a batch's rows differ widely, and one forward
padded to the widest row spends most of its work on padding. Rows sorted by kept length are
split into ``n`` groups of (nearly) equal size; each group runs one forward trimmed to its own
longest row. Causal attention makes the hidden states at a row's kept positions independent of
the columns trimmed after them, so the loss is unchanged up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kat_research.rollout import prompt_positions


def kept_extent(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last generated position in the loss (0 for rows with none)."""
    positions = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device)
    return (loss_mask.long() * positions).amax(dim=1)


def bucket_rows(extent: torch.Tensor, n_buckets: int) -> list[tuple[torch.Tensor, int]]:
    """Row indices sorted by ``extent``, split into ``n_buckets`` groups of nearly equal size,
    each with its width (the group's largest extent, at least 1); empty groups are left out."""
    order = torch.argsort(extent, stable=True)
    groups = order.tensor_split(min(n_buckets, max(1, extent.numel())))
    return [(rows, max(1, int(extent[rows].max()))) for rows in groups if rows.numel()]


def bucketed_hidden(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    loss_mask: torch.Tensor,
    n_buckets: int,
) -> torch.Tensor:
    """Final hidden states predicting each generated token, ``[B, width, H]`` (position ``t``
    predicts generated token ``t``), computed per length bucket by ``forward(ids, mask,
    positions)``; positions past a bucket's width are zeros (outside every row's loss)."""
    width = loss_mask.shape[1]
    buckets = bucket_rows(kept_extent(loss_mask), n_buckets)
    parts, order = [], []
    for rows, w in buckets:
        mask = attention_mask[rows, : prompt_width + w]
        hidden = forward(input_ids[rows, : prompt_width + w], mask, prompt_positions(mask))
        hidden = hidden[:, prompt_width - 1 : prompt_width - 1 + w]
        parts.append(F.pad(hidden, (0, 0, 0, width - hidden.shape[1])))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(parts)[inverse]
