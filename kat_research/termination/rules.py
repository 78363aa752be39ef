"""Baseline termination rules (none, fixed prefix, random) and their composition."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kat_research.termination.base import Terminator, observe_rule


class NoTermination(Terminator):
    """Standard OPD: rollouts run until EOS or ``max_new_tokens``."""

    supports_partial = True

    def __repr__(self) -> str:
        return "NoTermination()"


class FixedPrefix(Terminator):
    """Cap every rollout at ``budget`` generated tokens, all of them kept."""

    supports_partial = True

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self.budget = budget

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.full((batch_size,), min(self.budget, max_new_tokens), dtype=torch.long)

    def __repr__(self) -> str:
        return f"FixedPrefix(budget={self.budget})"


def _geometric_lengths(
    n: int, hazard: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample ``n`` lengths ~ Geometric(hazard) on {1, 2, ...} (mean 1/hazard), float64.

    Inverse CDF: ``L = floor(log U / log(1 - h)) + 1`` with U uniform on (0, 1].
    """
    if hazard >= 1:
        return torch.ones(n, dtype=torch.float64)
    device = generator.device if generator is not None else None
    u = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return torch.floor(u.log() / math.log1p(-hazard)) + 1


class RandomTermination(Terminator):
    """Control for length reduction: a per-token stopping hazard after ``exempt`` tokens.

    Each row's cap is ``exempt + L`` with L ~ Geometric(hazard) on {1, 2, ...}, drawn in
    ``begin_batch`` from the given generator and clipped to ``max_new_tokens``; all generated
    tokens are kept. Give exactly one of ``hazard`` in (0, 1] or ``mean_length`` >= exempt + 1
    (then ``hazard = 1 / (mean_length - exempt)``).
    """

    supports_partial = True

    def __init__(
        self, hazard: float | None = None, mean_length: float | None = None, exempt: int = 0
    ) -> None:
        if (hazard is None) == (mean_length is None):
            raise ValueError("give exactly one of hazard or mean_length")
        if exempt < 0:
            raise ValueError(f"exempt must be >= 0, got {exempt}")
        if mean_length is not None:
            if not mean_length >= exempt + 1:
                raise ValueError(
                    f"mean_length must be >= exempt + 1 = {exempt + 1}, got {mean_length}"
                )
            hazard = 1.0 / (mean_length - exempt)
        if not 0 < hazard <= 1:
            raise ValueError(f"hazard must be in (0, 1], got {hazard}")
        self.hazard, self.exempt = float(hazard), exempt

    @property
    def mean_length(self) -> float:
        """Expected cap before clipping to ``max_new_tokens``."""
        return self.exempt + 1.0 / self.hazard

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        lengths = _geometric_lengths(batch_size, self.hazard, generator).cpu()
        return (self.exempt + lengths).clamp(max=max_new_tokens).long()

    def __repr__(self) -> str:
        return (
            f"RandomTermination(hazard={self.hazard:.6g}, mean_length={self.mean_length:.6g}, "
            f"exempt={self.exempt})"
        )


class CompositeTerminator(Terminator):
    """Several rules at once (e.g. KAT on top of a fixed prefix): the earliest stop wins.

    Caps are the elementwise minimum of the children's caps; ``observe`` returns the
    smallest cut any child reports (children that do not ``observe`` are not observed);
    the signals are the union of the children's, which must agree on ``overlap_k``.
    Metrics are merged (children use distinct keys); state is keyed by child index.
    """

    def __init__(self, terminators: list[Terminator]) -> None:
        if not terminators:
            raise ValueError("CompositeTerminator needs at least one terminator")
        self.terminators = list(terminators)
        self.needs_kl = any(t.needs_kl for t in self.terminators)
        hints = [t.chunk_hint for t in self.terminators if t.chunk_hint is not None]
        self.chunk_hint = min(hints) if hints else None
        self.signals = tuple(dict.fromkeys(s for t in self.terminators for s in t.signals))
        ks = {t.overlap_k for t in self.terminators if "topk_overlap" in t.signals}
        if len(ks) > 1:
            raise ValueError(f"children need top-k overlaps of different k {sorted(ks)}")
        self.overlap_k = ks.pop() if ks else None
        self.supports_partial = all(t.supports_partial for t in self.terminators)

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        caps = [t.begin_batch(batch_size, max_new_tokens, generator) for t in self.terminators]
        return torch.stack([c.cpu() for c in caps]).amin(0)

    def observe(
        self,
        rows: torch.Tensor,
        kl: torch.Tensor,
        lengths: torch.Tensor,
        signals: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        cut = torch.full((rows.numel(),), -1, dtype=torch.long)
        for t in self.terminators:
            if t.observes:
                child = observe_rule(t, rows, kl, lengths, signals or {}).cpu()
                cut = torch.where((child >= 0) & ((cut < 0) | (child < cut)), child, cut)
        return cut

    def kept_tokens(
        self, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        for t in self.terminators:
            cut = t.kept_tokens(cut, kl, lengths)
        return cut

    def end_batch(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for t in self.terminators:
            metrics.update(t.end_batch())
        return metrics

    def begin_slots(self, n_slots: int, max_new_tokens: int) -> None:
        for t in self.terminators:
            t.begin_slots(n_slots, max_new_tokens)

    def begin_step(self) -> None:
        for t in self.terminators:
            t.begin_step()

    def admit(
        self, slots: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        caps = [t.admit(slots, max_new_tokens, generator).cpu() for t in self.terminators]
        return torch.stack(caps).amin(0)

    def finish(
        self, slots: torch.Tensor, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        for t in self.terminators:
            cut = t.finish(slots, cut, kl, lengths)
        return cut

    def end_step(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for t in self.terminators:
            metrics.update(t.end_step())
        return metrics

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for t in self.terminators:
            t.set_gather(gather)

    def on_optimizer_step(self) -> None:
        for t in self.terminators:
            t.on_optimizer_step()

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.terminators)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.terminators):
            raise ValueError(
                f"state has {len(state)} children, this composition has {len(self.terminators)}"
            )
        for i, t in enumerate(self.terminators):
            t.load_state_dict(state[str(i)])

    def __repr__(self) -> str:
        return f"CompositeTerminator([{', '.join(map(repr, self.terminators))}])"
