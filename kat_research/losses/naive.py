"""The OPD losses with every position's logits materialised at once, and seeded random inputs
for them: the reference the chunked losses' memory is measured against
(``scripts/bench_loss_memory.py``, the GPU kit's loss section)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kat_research.losses.kl import DEFAULT_K, per_token_reverse_kl
from kat_research.losses.opd import TeacherTargets


def make_inputs(
    kind: str, n: int, vocab: int, hidden: int, chunk_size: int, device: str | torch.device = "cpu"
):
    """Student hidden states and head, targets, weights and the teacher output ``kind`` uses,
    built on ``device``."""
    torch.manual_seed(0)
    student_head = nn.Linear(hidden, vocab, bias=False, device=device)
    teacher_head = nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    student_hidden = torch.randn(n, hidden, device=device, requires_grad=True)
    teacher_hidden = torch.randn(n, hidden, device=device)
    targets = torch.randint(vocab, (n,), device=device)
    weights = torch.full((n,), 1.0 / n, device=device)
    if kind in ("full", "topk_tail"):
        teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    else:  # what a rollout engine would keep: top-K or sampled-token log-probs
        topk_values, topk_ids, sampled = [], [], []
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                log_q = F.log_softmax(teacher_head(teacher_hidden[rows]), dim=-1)
                top = log_q.topk(DEFAULT_K["topk_lsm"], dim=-1)
                topk_values.append(top.values)
                topk_ids.append(top.indices)
                sampled.append(log_q.gather(-1, targets[rows, None]).squeeze(-1))
        if kind == "topk_lsm":
            teacher = TeacherTargets(
                topk_logprobs=torch.cat(topk_values), topk_ids=torch.cat(topk_ids)
            )
        else:
            teacher = TeacherTargets(sampled_logprobs=torch.cat(sampled))
    return student_hidden, student_head, targets, weights, teacher


def naive_loss(student_hidden, student_head, targets, weights, teacher, kind):
    """The same loss with every position's logits materialised at once."""
    logits = student_head(student_hidden)
    if kind == "sampled_token":
        log_p = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        return (weights * (log_p - teacher.sampled_logprobs).detach() * log_p).sum()
    if kind == "topk_lsm":
        teacher_logits = torch.full_like(logits, float("-inf")).detach()
        teacher_logits.scatter_(-1, teacher.topk_ids, teacher.topk_logprobs)
    else:
        with torch.no_grad():
            teacher_logits = teacher.lm_head(teacher.hidden)
    return (weights * per_token_reverse_kl(logits, teacher_logits, kind=kind)).sum()
