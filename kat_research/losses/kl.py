"""Per-token reverse KL divergences KL(p || q) between student p and teacher q logits.

All functions are pure: logits ``[N, V]`` in, float32 values ``[N]`` out, computed in
float32. The teacher is a constant (detached); gradients reach the student logits only.
Student logits are expected to be finite (``opd_loss`` checks this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KL_KINDS = ("full", "topk_tail", "topk_lsm")
DEFAULT_K = {"topk_tail": 64, "topk_lsm": 32}
SUPPORTS = ("student", "teacher")


def per_token_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "full",
    k: int | None = None,
    support: str = "student",
) -> Tensor:
    """Reverse KL(p || q) per row, p = softmax(student), q = softmax(teacher).

    ``full``: exact, over the whole vocabulary. ``topk_tail``: exact terms on the top-k
    tokens of ``support`` (student or teacher) plus one bucket for the remaining mass.
    ``topk_lsm``: both distributions renormalised on the teacher's top-k tokens (local
    support matching); no gradient reaches student logits outside that support.
    ``k`` defaults to ``DEFAULT_K[kind]`` and is clamped to the vocabulary size.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if kind == "full":
        return _full_kl(student, teacher)
    k = min(DEFAULT_K[kind] if k is None else k, student.shape[-1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if kind == "topk_lsm":
        return _local_support_kl(student, teacher, k)
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; valid: {', '.join(SUPPORTS)}")
    return _topk_tail_kl(student, teacher, k, support)


def _full_kl(student: Tensor, teacher: Tensor) -> Tensor:
    log_p = F.log_softmax(student, dim=-1)
    log_q = F.log_softmax(teacher, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _topk_tail_kl(student: Tensor, teacher: Tensor, k: int, support: str) -> Tensor:
    log_p = F.log_softmax(student, dim=-1)
    log_q = F.log_softmax(teacher, dim=-1)
    ranked = log_p.detach() if support == "student" else log_q
    idx = ranked.topk(k, dim=-1).indices
    log_p_s, log_q_s = log_p.gather(-1, idx), log_q.gather(-1, idx)
    head = (log_p_s.exp() * (log_p_s - log_q_s)).sum(-1)
    in_support = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, idx, True)
    r_p, r_q = _tail_mass(log_p, in_support), _tail_mass(log_q, in_support)
    # r is clamped before the log, so an empty or underflowed tail (r_p = 0) contributes 0.
    return head + r_p * (_safe_log(r_p) - _safe_log(r_q))


def _tail_mass(log_probs: Tensor, in_support: Tensor) -> Tensor:
    """Probability mass outside the support per row.

    Summed over the tail itself rather than as 1 - mass(support), so it stays exact when the
    support holds almost all the mass.
    """
    return torch.where(in_support, 0.0, log_probs.exp()).sum(-1)


def _safe_log(x: Tensor) -> Tensor:
    return x.clamp(min=torch.finfo(x.dtype).tiny).log()


def teacher_topk_tail_kl(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor) -> Tensor:
    """Reverse KL(p || q) per row when only the teacher's top-k log-probs are known (a served
    teacher): exact terms on the teacher's top-k tokens S plus one bucket for the rest,
    ``sum_S p (log p - log q) + r_p (log r_p - log r_q)``. ``topk_logprobs`` [N, k] are log q
    over the whole vocabulary (not renormalised on S) at ``topk_ids`` [N, k]; r_q = 1 - q(S)
    comes from them and r_p from the student's full distribution. Equals
    ``per_token_reverse_kl(..., kind="topk_tail", support="teacher")`` when S is the teacher's
    top-k. Where q(S) rounds to >= 1, r_q is clamped to the smallest float (a large but
    finite tail term, proportional to the student's tail mass r_p).
    """
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    log_q_s = topk_logprobs.detach().float()
    log_p_s = log_p.gather(-1, topk_ids)
    head = (log_p_s.exp() * (log_p_s - log_q_s)).sum(-1)
    in_support = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, topk_ids, True)
    r_p = _tail_mass(log_p, in_support)
    r_q = (-torch.expm1(log_q_s.logsumexp(-1))).clamp(min=0.0)
    return head + r_p * (_safe_log(r_p) - _safe_log(r_q))


def _local_support_kl(student: Tensor, teacher: Tensor, k: int) -> Tensor:
    top = teacher.topk(k, dim=-1)
    log_p_hat = F.log_softmax(student.gather(-1, top.indices), dim=-1)
    log_q_hat = F.log_softmax(top.values, dim=-1)
    return (log_p_hat.exp() * (log_p_hat - log_q_hat)).sum(-1)
