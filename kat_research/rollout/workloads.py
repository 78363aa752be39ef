"""Fixed rollout workloads for the engine benchmarks (scripts/bench_engine.py) and the GPU
check (scripts/gpu_check.py): seeded arithmetic prompts, and a rule that stops a share of the
rows early (the shape of a batch that KAT or RandomTerm thins out)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kat_research.termination.base import Terminator


class StopShareEarly(Terminator):
    """Caps the first ``share`` of the rows at ``fraction`` of the length cap."""

    def __init__(self, share: float, fraction: float):
        self.share, self.fraction = share, fraction

    def begin_batch(self, batch_size, max_new_tokens, generator=None):
        caps = torch.full((batch_size,), max_new_tokens, dtype=torch.long)
        caps[: round(self.share * batch_size)] = max(1, round(self.fraction * max_new_tokens))
        return caps

    def __repr__(self) -> str:
        return f"StopShareEarly({self.share}, {self.fraction})"


def arithmetic_prompts(
    tokenizer: PreTrainedTokenizerBase, batch: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` seeded ``Compute a*b-c`` prompts, encoded and padded: (input_ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(batch):
        a, b, c = torch.randint(2, 99, (3,), generator=gen).tolist()
        texts.append(f"Compute {a}*{b}-{c}. Show the steps.")
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask
