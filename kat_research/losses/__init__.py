"""OPD losses: per-token reverse-KL divergences and the chunked training loss."""

from kat_research.losses.kl import (
    DEFAULT_K,
    KL_KINDS,
    per_token_reverse_kl,
    teacher_topk_tail_kl,
)
from kat_research.losses.opd import (
    LOSS_KINDS,
    TEACHER_KEEP,
    LossOutput,
    TeacherTargets,
    opd_loss,
    token_weights,
)

__all__ = [
    "DEFAULT_K",
    "KL_KINDS",
    "LOSS_KINDS",
    "TEACHER_KEEP",
    "LossOutput",
    "TeacherTargets",
    "opd_loss",
    "per_token_reverse_kl",
    "teacher_topk_tail_kl",
    "token_weights",
]
