"""Test doubles of a served teacher without vLLM: a top-k source computed by an HF model (each
sequence re-scored from scratch, an independent oracle of the cached paths) and the project's
teacher server around any source, in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kat_research.rollout.teachers import RowTopK
from kat_research.rollout.teachers.server import serve


class HFTopKSource:
    """A :class:`TopKSource` from an HF causal LM: a full forward of every sequence."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls = 0

    def info(self) -> dict[str, int]:
        return {
            "vocab_size": self.model.config.vocab_size,
            "max_model_len": 4096,
            "max_logprobs": 256,
        }

    @torch.no_grad()
    def score(self, sequences: list[list[int]], first: list[int], k: int) -> list[RowTopK]:
        self.calls += 1
        rows = []
        for seq, start in zip(sequences, first, strict=True):
            logits = self.model(input_ids=torch.tensor([seq])).logits[0].float()
            log_q = logits.log_softmax(-1)[start - 1 : len(seq) - 1]
            top = log_q.topk(k, dim=-1)
            own = log_q.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]
            rows.append(RowTopK(top.values, top.indices, own))
        return rows


@contextmanager
def running_server(source) -> Iterator[str]:
    """Serve ``source`` on a free local port; yields its URL; stops it on exit."""
    server = serve(source, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
