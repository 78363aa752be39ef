"""Chunked on-policy distillation losses, computed from final hidden states and LM heads.

A [positions, vocab] logits tensor is never built for the whole batch: positions are
processed ``chunk_size`` at a time, and when there are several chunks each chunk's
"hidden -> logits -> per-token value" runs under activation checkpointing, so backward
recomputes one chunk's logits at a time. Peak extra memory is a few [chunk_size, vocab] float32
blocks (see ``scripts/bench_loss_memory.py``). A loss of one chunk is not checkpointed: its
recomputation would come while the student's activations are all still held, so it would not
lower the peak, only cost a second forward of the chunk.

Positions whose teacher values are NaN/inf are dropped: their value and weight are treated
as 0 and they are counted in ``LossOutput.n_nonfinite``. The remaining weights are not
renormalised, so a dropped position simply contributes nothing. Non-finite student logits
raise ``FloatingPointError``: the run is diverging.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kat_research.losses.kl import DEFAULT_K, KL_KINDS, per_token_reverse_kl, teacher_topk_tail_kl

LOSS_KINDS = (*KL_KINDS, "sampled_token")
AGGREGATIONS = ("token_mean", "seq_mean")
DEFAULT_CHUNK_SIZE = 128
# What each loss kind needs the rollout to keep of the teacher besides log q(y_t): its final
# hidden states (the loss recomputes the teacher's logits chunk by chunk), its top-K
# log-probabilities and ids, or nothing (``rollout.teacher_keep: auto``).
TEACHER_KEEP = {
    "full": "hidden",
    "topk_tail": "hidden",
    "topk_lsm": "topk",
    "sampled_token": "none",
}


@dataclass
class TeacherTargets:
    """What the loss knows about the teacher at each selected position (one of the modes).

    ``full`` needs ``hidden`` + ``lm_head``; ``topk_lsm`` and ``topk_tail`` use them if given,
    else ``topk_logprobs`` + ``topk_ids`` (``topk_tail`` then on the teacher's support, with
    r_q = 1 - q(top-K): :func:`teacher_topk_tail_kl`); ``sampled_token`` uses
    ``sampled_logprobs`` if given, else ``hidden`` + ``lm_head``.
    """

    hidden: Tensor | None = None  # [N, H] teacher final hidden states
    lm_head: Callable[[Tensor], Tensor] | None = None  # teacher head: hidden -> logits
    topk_logprobs: Tensor | None = None  # [N, K] teacher log-probs of its top-K tokens
    topk_ids: Tensor | None = None  # [N, K] long, ids of those tokens
    sampled_logprobs: Tensor | None = None  # [N] teacher log q(y_t) of the sampled token

    @property
    def has_hidden(self) -> bool:
        return self.hidden is not None and self.lm_head is not None

    @property
    def has_topk(self) -> bool:
        return self.topk_logprobs is not None and self.topk_ids is not None


@dataclass
class LossOutput:
    """A training loss and what to log about it."""

    loss: Tensor  # scalar, differentiable
    n_tokens: int  # positions that contributed (nonzero weight, finite teacher)
    n_nonfinite: int  # nonzero-weight positions dropped for NaN/inf teacher values
    mean_kl: float  # unweighted mean per-token value over contributing positions
    per_token: Tensor  # [N] detached per-token values (0 at dropped positions)


def token_weights(
    mask: Tensor,
    aggregation: str = "token_mean",
    *,
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
) -> Tensor:
    """Per-token loss weights [B, T] for a validity mask [B, T] (0 where masked).

    ``token_mean``: 1 / (valid tokens in the whole batch). ``seq_mean``: each row with
    tokens gets total weight 1 / (rows with tokens), spread evenly over its valid tokens.
    An all-masked batch gives all zeros.

    Data parallelism: each of ``world_size`` ranks holds a share of the global batch and the
    gradients are averaged over ranks. Pass ``sum_over_ranks`` (an all-reduce sum): the counts
    become global and the weights are scaled by ``world_size``, so the averaged gradient (and
    the mean over ranks of the loss) equals a single process's on the whole global batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    total = sum_over_ranks or (lambda x: x)
    valid = mask.bool().float()
    if aggregation == "token_mean":
        return valid * world_size / total(valid.sum()).clamp(min=1.0)
    row_len = valid.sum(-1, keepdim=True)
    n_rows = total((row_len > 0).sum().float()).clamp(min=1.0)
    return valid * world_size / (row_len.clamp(min=1.0) * n_rows)


def opd_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    weights: Tensor,
    teacher: TeacherTargets,
    kind: str = "full",
    k: int | None = None,
    support: str = "student",
    discount: float = 0.0,
    row_index: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LossOutput:
    """OPD loss over N selected positions: ``sum_t weights_t * value_t``.

    Divergence kinds (``full``, ``topk_tail``, ``topk_lsm``) back-propagate the per-token
    reverse KL (see ``per_token_reverse_kl``) directly. ``sampled_token`` uses
    r_t = log p(y_t) - log q(y_t) as a detached negative advantage, A_t = -r_t or, with
    ``discount`` > 0, the discounted sum of -r_s over later contributing tokens of the same
    row (``row_index`` required), in the policy-gradient term -A_t log p(y_t); its
    ``per_token`` and ``mean_kl`` report r_t.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    weights = weights.float()
    if kind == "sampled_token":
        loss, per_token, teacher_ok = _sampled_token_loss(
            student_hidden, student_head, targets, weights, teacher, discount, row_index, chunk_size
        )
    else:
        loss, per_token, teacher_ok = _divergence_loss(
            student_hidden, student_head, weights, teacher, kind, k, support, chunk_size
        )
    contributes = (weights != 0) & teacher_ok
    n_tokens = int(contributes.sum())
    return LossOutput(
        loss=loss,
        n_tokens=n_tokens,
        n_nonfinite=int(((weights != 0) & ~teacher_ok).sum()),
        mean_kl=float(per_token[contributes].mean()) if n_tokens else math.nan,
        per_token=per_token,
    )


def _divergence_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    weights: Tensor,
    teacher: TeacherTargets,
    kind: str,
    k: int | None,
    support: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, detached per-token KL, teacher-finite mask) for the divergence kinds."""
    use_hidden = teacher.has_hidden
    if not use_hidden and kind == "full":
        raise ValueError("kind='full' needs the teacher's hidden states and lm_head")
    if not use_hidden:
        if not teacher.has_topk:
            raise ValueError(
                f"kind={kind!r} needs the teacher's hidden states and lm_head, "
                "or its top-K log-probs and ids"
            )
        if kind == "topk_tail" and support != "teacher":
            raise ValueError(
                "kind='topk_tail' from the teacher's top-K log-probs alone needs "
                f"support='teacher' (got {support!r}): the teacher's log-probs on the "
                "student's top-k tokens are not known"
            )
        k = DEFAULT_K[kind] if k is None else k
        if k > teacher.topk_ids.shape[-1]:
            raise ValueError(
                f"k={k} exceeds the {teacher.topk_ids.shape[-1]} teacher top-K log-probs kept"
            )
    values, oks = [], []
    chunks = _chunks(student_hidden.shape[0], chunk_size)
    for rows in chunks:
        value, ok = _chunk_call(
            len(chunks) > 1,
            _chunk_kl,
            student_hidden[rows],
            student_head,
            _slice_teacher(teacher, rows, use_hidden),
            kind,
            k,
            support,
        )
        values.append(value)
        oks.append(ok)
    value = torch.cat(values)
    return (weights * value).sum(), value.detach(), torch.cat(oks)


def _chunk_kl(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    teacher: TeacherTargets,
    kind: str,
    k: int | None,
    support: str,
) -> tuple[Tensor, Tensor]:
    """Per-token KL of one chunk (0 where the teacher is non-finite) and the finite mask."""
    student = _student_logits(hidden, head)
    with torch.no_grad():
        if teacher.hidden is not None:
            teacher_logits = teacher.lm_head(teacher.hidden).float()
            _check_vocab(student, teacher_logits)
            ok = _rows_finite(teacher_logits)
            teacher_logits[~ok] = 0.0
        else:  # top-K only (sorted, most probable first)
            ok = _rows_finite(teacher.topk_logprobs)
            topk = teacher.topk_logprobs.float().masked_fill(~ok[:, None], 0.0)
            # topk_lsm: -inf off the support, so its top-K is exactly the given ids
            teacher_logits = torch.full_like(student, float("-inf"))
            teacher_logits.scatter_(-1, teacher.topk_ids, topk)
    if teacher.hidden is None and kind == "topk_tail":  # r_q = 1 - q(top-K)
        value = teacher_topk_tail_kl(student, topk[:, :k], teacher.topk_ids[:, :k])
    else:
        value = per_token_reverse_kl(student, teacher_logits, kind=kind, k=k, support=support)
    return torch.where(ok, value, 0.0), ok


def _sampled_token_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    weights: Tensor,
    teacher: TeacherTargets,
    discount: float,
    row_index: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, detached r_t, teacher-finite mask) for the sampled-token policy gradient."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    teacher_logq = _teacher_sampled_logprobs(teacher, targets, chunk_size)
    teacher_ok = torch.isfinite(teacher_logq)
    chunks = _chunks(student_hidden.shape[0], chunk_size)
    logp = torch.cat(
        [
            _chunk_call(
                len(chunks) > 1, _chunk_logprob, student_hidden[rows], student_head, targets[rows]
            )
            for rows in chunks
        ]
    )
    r = torch.where(teacher_ok, logp.detach() - teacher_logq, 0.0)
    advantage = -r * ((weights != 0) & teacher_ok)
    if discount > 0:
        advantage = _discounted_returns(advantage, discount, row_index)
    w = torch.where(teacher_ok, weights, 0.0)
    return -(w * advantage * logp).sum(), r, teacher_ok


def _chunk_logprob(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor) -> Tensor:
    """log p(y_t) of one chunk."""
    logits = _student_logits(hidden, head)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def _teacher_sampled_logprobs(teacher: TeacherTargets, targets: Tensor, chunk_size: int) -> Tensor:
    """Teacher log q(y_t) [N], given directly or computed chunk-wise from hidden states."""
    if teacher.sampled_logprobs is not None:
        return teacher.sampled_logprobs.float()
    if not teacher.has_hidden:
        raise ValueError(
            "kind='sampled_token' needs the teacher's sampled-token log-probs, "
            "or its hidden states and lm_head"
        )
    parts = []
    for rows in _chunks(targets.shape[0], chunk_size):
        log_q = F.log_softmax(teacher.lm_head(teacher.hidden[rows]).float(), dim=-1)
        parts.append(log_q.gather(-1, targets[rows, None]).squeeze(-1))
    return torch.cat(parts)


def _discounted_returns(x: Tensor, discount: float, row_index: Tensor | None) -> Tensor:
    """A_t = sum_{s >= t, same row} discount^(s - t) x_s; rows must be contiguous runs."""
    if row_index is None:
        raise ValueError("discount > 0 needs row_index to know where each row ends")
    if torch.unique_consecutive(row_index).numel() != torch.unique(row_index).numel():
        raise ValueError("row_index must list each row's positions contiguously")
    values, rows = x.tolist(), row_index.tolist()
    out = [0.0] * len(values)
    acc = 0.0
    for i in reversed(range(len(values))):
        if i + 1 == len(values) or rows[i + 1] != rows[i]:
            acc = 0.0
        acc = values[i] + discount * acc
        out[i] = acc
    return torch.tensor(out, dtype=x.dtype, device=x.device)


def _student_logits(hidden: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    logits = head(hidden).float()
    if not _rows_finite(logits).all():
        raise FloatingPointError(
            "student logits contain NaN/inf in the OPD loss: the run is diverging"
        )
    return logits


def _rows_finite(x: Tensor) -> Tensor:
    """Per row, whether every entry is finite: NaN and +-inf survive a sum (one cheap pass)."""
    return torch.isfinite(x.sum(-1))


def _check_vocab(student: Tensor, teacher: Tensor) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"teacher vocabulary size {teacher.shape[-1]} != student {student.shape[-1]}: "
            "OPD needs teacher and student to share one tokenizer"
        )


def _slice_teacher(teacher: TeacherTargets, rows: slice, use_hidden: bool) -> TeacherTargets:
    """The chunk's rows of the one teacher mode in use."""
    if use_hidden:
        return TeacherTargets(hidden=teacher.hidden[rows], lm_head=teacher.lm_head)
    return TeacherTargets(
        topk_logprobs=teacher.topk_logprobs[rows], topk_ids=teacher.topk_ids[rows]
    )


def _chunk_call(recompute: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, under activation checkpointing when ``recompute`` (the loss has
    several chunks: backward then recomputes one chunk's logits at a time)."""
    if recompute:
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _chunks(n: int, chunk_size: int) -> list[slice]:
    """Row slices covering n positions; one (empty) slice when n == 0 keeps the graph alive."""
    return [slice(start, start + chunk_size) for start in range(0, max(n, 1), chunk_size)]
