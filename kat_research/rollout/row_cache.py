"""A causal LM whose KV cache holds rows that join and leave at any time (partial rollouts).

Rows live at different depths, so every row carries its own attention mask over the cache's
columns: a new row is prefilled on its own and left-padded (mask 0) to the cache's width, or the
cache is left-padded to the new row's; columns that no row still attends to are trimmed.
Positions are explicit per row (0 at a row's first real token), so padding never shifts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from kat_research.rollout.cached_lm import CachedLM
from kat_research.rollout.lean_decode import CACHE_BLOCK, LeanModel


def _pad_left(x: torch.Tensor, columns: int) -> torch.Tensor:
    """Left-pad the sequence dimension (-2) of a cache tensor [b, h, L, d] with zeros."""
    return F.pad(x, (0, 0, columns, 0)) if columns else x


class RowCache(CachedLM):
    """The body of a causal LM fed new tokens of its rows; rows join (``add``) and leave
    (``keep_rows``) between forwards. ``next_hidden`` [n, H] is, per row, the final hidden
    state predicting its next token."""

    def __init__(self, model: PreTrainedModel):
        super().__init__(model)
        self.lean: LeanModel | None = None  # set: one-token feeds run through its decode step
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [n, L] 1 where a row attends
        self.next_pos = torch.zeros(0, dtype=torch.long)  # [n] position of each row's next token
        self.next_hidden: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def add(self, sequences: list[torch.Tensor]) -> None:
        """Append rows whose contexts so far are ``sequences`` (1-D token ids, each >= 1 token):
        one prefill of the new rows, merged into the cache after the existing rows."""
        device = sequences[0].device
        width = max(s.numel() for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, width - s.numel() :], mask[i, width - s.numel() :] = s, 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        hidden = self.forward(ids, mask, pos, cache)
        self._merge(cache, mask, mask.sum(-1), hidden[:, -1])

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        self._drop_spare()
        if self.cache is None or self.rows == 0:
            self.cache, self.mask, self.next_pos, self.next_hidden = cache, mask, next_pos, hidden
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_pad_left(mine.keys, width - old), _pad_left(theirs.keys, width - new)]
            )
            mine.values = torch.cat(
                [_pad_left(mine.values, width - old), _pad_left(theirs.values, width - new)]
            )
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.next_hidden = torch.cat([self.next_hidden, hidden])

    def feed(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Consume one column block [n, C] of every row (``valid`` [n, C] marks real tokens; a
        row's valid tokens come first); return the hidden states [n, C, H] *predicting* each
        fed token. ``next_hidden`` becomes the state after each row's last valid token."""
        assert self.cache is not None
        if self.lean is not None and tokens.shape[1] == 1 and bool(valid.all()):
            return self._feed_one(tokens[:, 0])
        self._drop_spare()  # transformers' cache appends after its last column
        valid = valid.long()
        self.mask = torch.cat([self.mask, valid], dim=1)
        pos = self.next_pos[:, None] + (valid.cumsum(-1) - 1).clamp(min=0)
        hidden = self.forward(tokens, self.mask, pos)
        predicting = torch.cat([self.next_hidden[:, None], hidden[:, :-1]], dim=1)
        counts = valid.sum(-1)
        last = (counts - 1).clamp(min=0)
        stepped = hidden[torch.arange(self.rows, device=hidden.device), last]
        self.next_hidden = torch.where((counts > 0)[:, None], stepped, self.next_hidden)
        self.next_pos = self.next_pos + counts
        return predicting

    def _feed_one(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`feed` of one token per row through ``self.lean``'s decode step. The cache
        tensors keep spare columns after the mask's width (grown CACHE_BLOCK at a time), so a
        step writes one column instead of copying the cache as a concatenation would."""
        column = self.mask.shape[1]
        layers = self.cache.layers
        if layers[0].keys.shape[2] <= column:
            grow = (0, 0, 0, column + CACHE_BLOCK - layers[0].keys.shape[2])
            for layer in layers:
                layer.keys, layer.values = F.pad(layer.keys, grow), F.pad(layer.values, grow)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        mask = None if bool(self.mask.all()) else self.mask.bool()[:, None, None, :]
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        hidden = self.lean.step(keys, values, column, tokens, self.next_pos, mask)
        predicting = self.next_hidden[:, None]
        self.next_hidden, self.next_pos = hidden, self.next_pos + 1
        return predicting

    def _drop_spare(self) -> None:
        """Cut the cache tensors to the mask's width (spare columns of lean steps)."""
        width = self.mask.shape[1]
        if self.cache is not None and self.cache.layers[0].keys.shape[2] > width:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (positions in the current order); trim columns no kept row
        attends to."""
        if index.numel() == self.rows:
            return
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.next_hidden = self.next_hidden[index]
        if index.numel() == 0:
            self.cache = None
            return
        self.cache.batch_select_indices(index)
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else self.mask.shape[1]
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
