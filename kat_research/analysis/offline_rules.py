"""Termination rules applied offline to finished, uncut rollouts, through each rule's own online
protocol (``begin_batch`` caps, ``observe`` on the recorded per-token signals, ``kept_tokens``),
so a rule has one implementation, online and offline.

A rule's scans (KAT's windows, the overlap drift, the repetition run) do not depend on where the
engine's chunk boundaries fall, so observing each whole trace at once gives the cut the rule
would have made online on the same tokens; a row is observed only up to its cap, as online.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kat_research.rollout import Rollout
from kat_research.termination.base import Terminator, observe_rule


@dataclass(frozen=True)
class Traces:
    """Per-token signals of ``n`` finished rollouts, [n, T] float64 NaN-padded past ``lengths``
    (generated tokens per rollout, [n] long); ``topk_overlap`` None when not recorded."""

    kl: torch.Tensor
    student_logprob: torch.Tensor
    topk_overlap: torch.Tensor | None
    lengths: torch.Tensor

    @classmethod
    def of(cls, rollouts: Sequence[Rollout]) -> Traces:
        """The traces of rollout batches (concatenated in order, padded to the longest)."""
        width = max(int(r.lengths.max()) for r in rollouts)

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(r, name) for r in rollouts]
            if any(v is None for v in values):
                return None
            padded = [
                torch.nn.functional.pad(v.double().cpu(), (0, width - v.shape[1]), value=math.nan)
                for v in values
            ]
            return torch.cat(padded)

        kl = cat("kl")
        if kl is None:
            raise ValueError("the rollouts hold no KL: sample them with a teacher")
        lengths = torch.cat([r.lengths.cpu().long() for r in rollouts])
        return cls(kl, cat("student_logprobs"), cat("topk_overlap"), lengths)

    def signal(self, name: str) -> torch.Tensor:
        """The ``termination.SIGNALS`` series ``name``."""
        value = getattr(self, name, None)
        if value is None:
            raise ValueError(
                f"the rollouts did not record {name!r}: sample them with overlap_k set "
                "(analysis.rollouts.uncut_rollouts)"
            )
        return value

    def kl_list(self) -> list[torch.Tensor]:
        """Each rollout's KL trace, trimmed to its length."""
        return [self.kl[i, : int(n)] for i, n in enumerate(self.lengths)]


def offline_kept(
    rule: Terminator,
    traces: Traces,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Tokens ``rule`` keeps of each rollout [n] had it run online on these tokens: its cap
    (``begin_batch``, drawn from ``generator``), else the cut its ``observe`` reports on the
    signals up to the cap, else the whole rollout; then its ``kept_tokens``."""
    n = traces.lengths.numel()
    caps = rule.begin_batch(n, max_new_tokens, generator).cpu().long().clamp(max=max_new_tokens)
    seen = torch.minimum(traces.lengths, caps)
    cut = torch.full((n,), -1, dtype=torch.long)
    if rule.observes:
        signals = {name: traces.signal(name) for name in rule.signals}
        cut = observe_rule(rule, torch.arange(n), traces.kl, seen, signals).cpu().long()
    kept = torch.where(cut >= 0, cut, seen)
    kept = rule.kept_tokens(kept, traces.kl, traces.lengths).cpu().long()
    rule.end_batch()
    return kept


def expected_random_kept(lengths: torch.Tensor, hazard: float, exempt: int = 0) -> float:
    """Mean over rollouts of the expected tokens :class:`RandomTermination` keeps of a rollout
    of ``lengths`` tokens: ``E[min(exempt + L, m)]`` with L ~ Geometric(hazard) on {1, 2, ...},
    which is ``m`` for ``m <= exempt`` and ``exempt + (1 - (1 - h)^(m - exempt)) / h`` above."""
    m = lengths.double()
    over = (m - exempt).clamp(min=0)
    if hazard >= 1:
        return float(torch.minimum(m, torch.full_like(m, exempt + 1.0)).mean())
    grown = (1 - (1 - hazard) ** over) / hazard
    return float(torch.where(m <= exempt, m, exempt + grown).mean())


def matched_hazard(
    lengths: torch.Tensor, target: float, exempt: int = 0, tol: float = 1e-10
) -> float:
    """The hazard at which :class:`RandomTermination` keeps ``target`` tokens per rollout in
    expectation on rollouts of ``lengths`` (bisection; the expectation falls as the hazard
    rises)."""
    lo_kept = expected_random_kept(lengths, 1.0, exempt)
    full = float(lengths.double().mean())
    if not lo_kept <= target < full:
        raise ValueError(
            f"a random rule keeps between {lo_kept:.4g} (hazard 1) and {full:.4g} (hazard -> 0) "
            f"tokens per rollout here; cannot match {target:.4g}"
        )
    lo, hi = 0.0, 1.0  # expected kept: > target at lo, <= target at hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if mid > 0 and expected_random_kept(lengths, mid, exempt) <= target:
            hi = mid
        else:
            lo = mid
    return hi
