"""How much of the teacher's probability lies outside its top-K tokens on the student's
rollouts: a Top-K loss truncates (``topk_lsm``) or buckets (``topk_tail``) exactly that mass, so a
Top-K ablation tests truncation only where it is not ~0 (issue 23, item 5).

:func:`tail_mass` and :func:`support_size` are pure functions of logits; :func:`teacher_logits`
recomputes the teacher's logits at the generated positions of a rollout sampled with
``teacher_keep="hidden"``; :func:`tail_table` and :func:`support_table` summarise them
(``scripts/topk_tail_mass.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from kat_research.lit import OPDModule
from kat_research.rollout import Rollout


def tail_mass(logits: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """1 - (probability of the ``k`` most likely tokens) per position [N, len(ks)], for logits
    [N, V] (softmax in float64; k is capped at V, whose tail is 0)."""
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {list(ks)}")
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.topk(min(max(ks), probs.shape[-1]), dim=-1).values.cumsum(-1)
    index = torch.tensor([min(k, top.shape[-1]) - 1 for k in ks], device=top.device)
    return (1.0 - top[:, index]).clamp(min=0.0)


def support_size(logits: torch.Tensor, coverage: float) -> torch.Tensor:
    """The fewest tokens whose probability reaches ``coverage`` per position [N] (long; a
    1e-12 tolerance absorbs the float64 sum's rounding)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    cum = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values.cumsum(-1)
    return ((cum < coverage - 1e-12).sum(-1) + 1).clamp(max=logits.shape[-1])


@torch.no_grad()
def teacher_logits(module: OPDModule, rollout: Rollout) -> torch.Tensor:
    """The teacher's logits [N, V] at the N generated positions of ``rollout`` (sampled with
    ``teacher_keep="hidden"``), in row order."""
    if rollout.teacher_hidden is None:
        raise ValueError(
            "the rollout holds no teacher hidden states: sample it with teacher_keep='hidden'"
        )
    hidden = rollout.teacher_hidden[rollout.gen_mask]
    return module.teacher.get_output_embeddings()(hidden).float()


def tail_table(tails: torch.Tensor, ks: Sequence[int]) -> pd.DataFrame:
    """Per K (``tails`` [N, len(ks)] from :func:`tail_mass`): the mean, median, 90th and 99th
    percentile and max of the teacher's mass outside its top-K, and the share of positions
    where it exceeds 1e-3 and 1e-2."""
    rows = {}
    for j, k in enumerate(ks):
        t = tails[:, j].double()
        rows[k] = {
            "mean": float(t.mean()),
            "median": float(t.median()),
            "p90": float(t.quantile(0.9)),
            "p99": float(t.quantile(0.99)),
            "max": float(t.max()),
            "share > 1e-3": float((t > 1e-3).double().mean()),
            "share > 1e-2": float((t > 1e-2).double().mean()),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("K")


def support_table(supports: dict[float, torch.Tensor]) -> pd.DataFrame:
    """Per coverage (:func:`support_size` of each position): mean, median and max tokens."""
    rows = {
        c: {
            "mean": float(s.double().mean()),
            "median": float(s.double().median()),
            "max": int(s.max()),
        }
        for c, s in supports.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("coverage")
