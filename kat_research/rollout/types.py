"""Data the rollout engine produces and the settings it samples with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

STOP_EOS = "eos"
STOP_MAX_TOKENS = "max_tokens"
STOP_TERMINATED = "terminated"
STOP_REASONS = (STOP_EOS, STOP_MAX_TOKENS, STOP_TERMINATED)
# partial rollouts only: ended at the staleness bound (rollout.max_staleness), all tokens kept
STOP_STALE = "stale"


@dataclass(frozen=True)
class SamplingConfig:
    """How the student samples. ``temperature=0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """A batch of sampled continuations. B rows, P prompt positions, T = longest generation.

    Generated-token tensors are right-padded to T; positions at index >= ``lengths[b]`` hold
    ``pad_token_id`` / 0 / NaN and are never in ``loss_mask``. Per-token values at index t
    refer to generated token t, scored at the prefix before it.
    """

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 on real prompt tokens
    tokens: torch.Tensor  # [B, T] long, generated tokens
    lengths: torch.Tensor  # [B] long, tokens generated per row
    cut: torch.Tensor  # [B] long, tokens kept for the loss (== lengths unless a rule cut)
    loss_mask: torch.Tensor  # [B, T] bool: generated, before the cut, teacher finite, not masked
    student_logprobs: torch.Tensor  # [B, T] float, log p(y_t) at temperature 1
    stop_reason: list[str]  # per row: eos / max_tokens / terminated
    kl: torch.Tensor | None = None  # [B, T] float, d_t = KL(p_t || q_t), full vocabulary
    teacher_logprobs: torch.Tensor | None = None  # [B, T] float, log q(y_t)
    teacher_hidden: torch.Tensor | None = None  # [B, T, H] teacher final hidden state
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K] teacher log q, top-K
    teacher_topk_ids: torch.Tensor | None = None  # [B, T, K] long, ids of those tokens
    topk_overlap: torch.Tensor | None = None  # [B, T] float, the engine's overlap_k signal
    n_teacher_nonfinite: int = 0  # generated positions dropped for non-finite teacher logits
    timings: dict[str, float] = field(default_factory=dict)  # seconds: total, teacher, ...
    terminator_metrics: dict[str, float] = field(default_factory=dict)  # from end_batch()
    # partial rollouts (rollout.mode=partial) only: the optimizer step whose weights sampled
    # each token [B, T] long (-1 past a row's length), and the step's scheduling metrics
    policy_step: torch.Tensor | None = None
    partial_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def gen_mask(self) -> torch.Tensor:
        """[B, T] bool, True on generated (non-padding) positions."""
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps[None, :] < self.lengths[:, None]

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P+T] prompt followed by the generation (for the training forward)."""
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+T] long, 1 on prompt and generated tokens."""
        return torch.cat([self.prompt_mask, self.gen_mask.long()], dim=1)

    @property
    def sequence_loss_mask(self) -> torch.Tensor:
        """[B, P+T] bool: ``loss_mask`` aligned to ``input_ids`` (prompt positions False)."""
        return torch.cat([torch.zeros_like(self.prompt_mask, dtype=torch.bool), self.loss_mask], 1)

    def stop_counts(self) -> dict[str, int]:
        """Number of rows per stop reason."""
        return {r: sum(1 for s in self.stop_reason if s == r) for r in STOP_REASONS}

    def to(self, device: torch.device | str) -> Rollout:
        """Move every tensor to ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return Rollout(**moved)
