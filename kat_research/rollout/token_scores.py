"""What the teacher's scoring records per generated token, shared by the sync engine and the
partial-rollout driver."""

from __future__ import annotations

import torch

from kat_research.losses.kl import per_token_reverse_kl


def score_tokens(
    s_logits: torch.Tensor, t_logits: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For N scored tokens (student and teacher logits [N, V], token ids [N]): the full-vocabulary
    reverse KL d_t = KL(p_t || q_t) (NaN where the teacher's logits are not finite), log q(y_t),
    the teacher's finiteness [N] and its log-probabilities [N, V] (float32)."""
    finite = torch.isfinite(t_logits).all(dim=-1)
    kl = torch.full(finite.shape, float("nan"), device=t_logits.device)
    kl[finite] = per_token_reverse_kl(s_logits[finite], t_logits[finite], kind="full")
    t_logprobs = torch.log_softmax(t_logits.float(), dim=-1)
    lq = t_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    return kl, lq, finite, t_logprobs
