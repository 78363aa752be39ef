"""A decode-time model: sync against partial rollouts, from a row-length distribution.

Decoding one token for every live row is memory-bound on a GPU: a decode step reads the
student's weights once and each live row's KV cache, so

    t_step = (weight_bytes + kv_bytes_per_token * sum over live rows of their context) / bandwidth

(the rows' own FLOPs are ignored: at 64 rows a 1.7B-4B model's decode is far below the GPU's
compute roof). The teacher scores ``score_every`` tokens per forward, reading its weights once
per chunk, so it adds ``teacher_weight_bytes / score_every`` per decode step plus its own KV
reads, and is counted the same way.

Sync mode: a batch of B rows with generated lengths L_1..L_B (prompt P tokens each) runs
max_i L_i decode steps; at step s the rows with L_i > s are live, with context P + s. For
lengths drawn i.i.d. from a distribution with CDF F, the expected time of one batch is

    E[T_sync] = sum_s [ W (1 - F(s)^B) + kv B (1 - F(s)) (P + s) ] / bw

(W the weight bytes read per decode step, kv the KV bytes per cached token, summed over the
student and the teacher). Partial mode keeps S = B slots busy, so per B finished rows it runs
B E[L] / S = E[L] decode steps with S rows live in each, and the rows read the same KV bytes as
in sync mode (each row reads its own context once per token it generates):

    E[T_partial] = [ W E[L] + kv B (P E[L] + E[L (L - 1)] / 2) ] / bw

so partial mode saves exactly the weight reads of the steps a sync batch spends waiting for
its longest row, W (E[max L] - E[L]) / bw. This assumes attention over each row's own context
(a paged KV cache, as vLLM's); the HF backend's padded cache reads the longest live row's width
for every row, so its KV term is larger than modelled. With KAT the distribution is that of
the generated lengths (detection point, not the cut), which is what a run logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kat_research.planning.memory import kv_cache_bytes
from kat_research.planning.params import ModelShape


@dataclass(frozen=True)
class DecodeCosts:
    """Bytes a decode step reads: weights once per step, KV per cached context token."""

    weight_bytes: float  # per decode step (teacher weights divided by its chunk)
    kv_bytes_per_token: float  # per live row, per token of its context
    bandwidth: float  # bytes per second

    @classmethod
    def of(
        cls,
        student: ModelShape,
        student_params: int,
        teacher: ModelShape,
        teacher_params: int,
        *,
        student_bytes: int,
        teacher_bytes: int,
        score_every: int,
        bandwidth: float,
    ) -> DecodeCosts:
        """Costs of a student decoding and a teacher scoring every ``score_every`` tokens
        (``*_bytes``: bytes per weight and cache element of each model)."""
        weights = student_params * student_bytes + teacher_params * teacher_bytes / score_every
        kv = kv_cache_bytes(student, 1, student_bytes) + kv_cache_bytes(teacher, 1, teacher_bytes)
        return cls(float(weights), float(kv), float(bandwidth))


def _survival(lengths: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical P(L > s) for s = 0 .. max L - 1, and the positions s."""
    values = torch.as_tensor(lengths, dtype=torch.float64)
    if values.numel() == 0 or bool((values < 1).any()):
        raise ValueError("need at least one row length, every length >= 1")
    steps = torch.arange(int(values.max()), dtype=torch.float64)
    return (values[None, :] > steps[:, None]).double().mean(1), steps


def sync_batch_seconds(
    lengths: Sequence[int] | torch.Tensor, rows: int, prompt: int, costs: DecodeCosts
) -> float:
    """Expected decode time of one sync batch of ``rows`` rows with lengths drawn i.i.d. from
    the empirical distribution ``lengths``, each with a ``prompt``-token context."""
    alive, steps = _survival(lengths)
    any_alive = 1 - (1 - alive) ** rows
    kv = costs.kv_bytes_per_token * rows * alive * (prompt + steps)
    return float((costs.weight_bytes * any_alive + kv).sum() / costs.bandwidth)


def partial_batch_seconds(
    lengths: Sequence[int] | torch.Tensor, rows: int, prompt: int, costs: DecodeCosts
) -> float:
    """Expected decode time per ``rows`` finished rows with ``rows`` slots kept busy."""
    values = torch.as_tensor(lengths, dtype=torch.float64)
    _survival(values)  # validates
    mean = float(values.mean())
    context = prompt * mean + float((values * (values - 1)).mean()) / 2
    return (costs.weight_bytes * mean + costs.kv_bytes_per_token * rows * context) / costs.bandwidth


def predict(
    lengths: dict[str, Sequence[int] | torch.Tensor], rows: int, prompt: int, costs: DecodeCosts
) -> dict[str, dict[str, float]]:
    """Per method (e.g. ``opd``, ``kat``: its logged generated lengths): expected decode
    seconds per batch in sync and partial mode, and their ratio."""
    out = {}
    for method, values in lengths.items():
        sync = sync_batch_seconds(values, rows, prompt, costs)
        partial = partial_batch_seconds(values, rows, prompt, costs)
        out[method] = {"sync_s": sync, "partial_s": partial, "sync_over_partial": sync / partial}
    return out
