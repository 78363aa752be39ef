"""FLOPs of on-policy distillation: the one formula behind the planner and Table 2's EFLOPs.

A causal forward pass over a sequence of S tokens costs

    F(S) = 2 N S + 2 layers attn_dim S^2

with N the parameter count (all parameters, Chinchilla's convention) and attn_dim = query
heads x head dim: 2 FLOPs per multiply-add of every weight per token, plus the attention
products QK^T and AV (2 x 2 attn_dim per attended position) over a causal context of S^2/2
positions in all (Kaplan et al. 2020 count only QK^T: 2 layers ctx attn_dim per token). The
attention term is left out when the shape is unknown (``layers=0``), as for Table 2.

Per rollout of G generated tokens, K of them kept for training, after a P-token prompt:

    rollout (student prefill + decode)   F_student(P + G)
    teacher scoring (same tokens)        F_teacher(P + G)
    training (student forward+backward)  3 F_student(P + K)

so with P = 0 and no attention term: 2 N_s G + 2 N_t G + 6 N_s K. Lengths are means over
rollouts; the attention term then uses the mean length (exact for equal lengths).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopsModel:
    """What a model's FLOPs depend on; ``layers=0`` leaves the attention term out."""

    n_params: float
    layers: int = 0
    attn_dim: int = 0


@dataclass(frozen=True)
class OPDFlops:
    """FLOPs of OPD by phase."""

    rollout: float
    scoring: float
    training: float

    @property
    def total(self) -> float:
        return self.rollout + self.scoring + self.training


def sequence_flops(model: FlopsModel, length: float) -> float:
    """Forward FLOPs over one causal sequence of ``length`` tokens: 2 N S + 2 L d_attn S^2."""
    return 2 * model.n_params * length + 2 * model.layers * model.attn_dim * length**2


def opd_flops(
    student: FlopsModel,
    teacher: FlopsModel,
    *,
    rollouts: float,
    generated: float,
    kept: float,
    prompt: float = 0.0,
) -> OPDFlops:
    """FLOPs of ``rollouts`` rollouts of mean length ``generated`` (``kept`` trained on) after
    prompts of mean length ``prompt``."""
    return OPDFlops(
        rollout=rollouts * sequence_flops(student, prompt + generated),
        scoring=rollouts * sequence_flops(teacher, prompt + generated),
        training=rollouts * 3 * sequence_flops(student, prompt + kept),
    )
