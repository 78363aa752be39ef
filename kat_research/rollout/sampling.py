"""Next-token sampling: temperature, nucleus (top-p), greedy."""

from __future__ import annotations

import torch


class NonFiniteLogitsError(FloatingPointError):
    """The logits to sample from hold NaN or inf: the model's weights or activations are not
    finite (a diverged training run, or a precision too narrow for the model)."""


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability reaches ``top_p``.

    The most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` [n, V]; ``temperature == 0`` is greedy.

    Raises :class:`NonFiniteLogitsError` if a row holds NaN or +inf or no finite logit at all
    (sampling would fail or, greedily, silently pick an arbitrary token); -inf marks a token
    that cannot be sampled.
    """
    finite = torch.isfinite(logits)
    if not bool(finite.all()):  # the common case costs one check; -inf entries are legal
        invalid = (~finite & (logits != float("-inf"))).any(dim=-1) | ~finite.any(dim=-1)
        if bool(invalid.any()):
            raise NonFiniteLogitsError(
                f"cannot sample the next token: the logits of {int(invalid.sum())} of "
                f"{logits.shape[0]} rows hold NaN or inf, so the model's weights or activations "
                "are not finite (a diverged training run, or a precision too narrow for the model)"
            )
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() if temperature == 1 else logits.float() / temperature  # x / 1 == x
    scaled = top_p_filter(scaled, top_p)
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
