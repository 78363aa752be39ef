"""The interface every termination rule implements; the rollout engine only talks to this."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

#: per-token series besides the KL that a rule may ask the engine for (``Terminator.signals``):
#: ``student_logprob``: log p(y_t) of the sampled token under the student at temperature 1;
#: ``topk_overlap``: |top-k of the student's logits & top-k of the teacher's| / k at each
#: position, with k = ``Terminator.overlap_k``
SIGNALS = ("student_logprob", "topk_overlap")


class Terminator:
    """Decides, per rollout row, when generation stops and which prefix is kept for the loss.

    Protocol followed by the rollout engine for one batch of ``batch_size`` rows:

    1. ``caps = begin_batch(batch_size, max_new_tokens, generator)``: a per-row length cap
       decided up front (fixed prefix, random termination); ``max_new_tokens`` means no cap.
       A row reaching its cap stops with reason ``terminated`` and keeps all its tokens.
    2. ``observe(rows, kl, lengths)`` at every teacher-scoring chunk boundary, for the rows
       that were scored: ``rows`` are original row indices [n], ``kl`` is the recorded
       per-token KL of those rows [n, t] (entries at index >= the row's length are
       undefined), ``lengths`` the tokens generated per row [n] (each <= t). Returns the
       cut per row [n] (number of tokens kept) for rows whose rule fired at this call,
       -1 elsewhere. A row reported once is stopped by the engine and not observed again.
       Rules that list ``signals`` also get ``signals={name: [n, t]}`` (see ``SIGNALS``),
       aligned with ``kl``; rules observe only when ``observes`` (a teacher is scoring).
    3. ``kept_tokens(cut, kl, lengths)`` once every row has finished: the final number of
       tokens kept per row (rules that mark phases instead of stopping lower it here).
    4. ``end_batch()``; adaptive rules update their state here and return scalar metrics for
       logging.

    Partial rollouts (``rollout.mode: partial``, rules with ``supports_partial``) keep rows in
    a fixed set of slots across optimizer steps instead: ``begin_slots(n_slots, cap)`` once;
    per training step ``begin_step()``, then ``admit(slots, cap, generator)`` whenever rows
    start in ``slots`` (returns their caps; per-row state is reset there and survives
    steps), ``observe`` with slot indices as ``rows``, ``finish(slots, cut, kl, lengths)``
    when rows end (returns their kept tokens, as ``kept_tokens``), and ``end_step()`` (like
    ``end_batch``) once the step's rows are collected.

    ``on_optimizer_step()`` is called once per optimizer step (warm-up counting).
    ``set_gather(gather)`` is called once under data parallelism, before the first batch.
    """

    #: whether ``observe`` needs the teacher's per-token KL (no-teacher rollouts skip it)
    needs_kl: bool = False
    #: preferred teacher-scoring chunk (KAT: its stride, so evaluation points fall on chunk
    #: boundaries); None lets the engine choose
    chunk_hint: int | None = None
    #: per-token series ``observe`` reads besides the KL (names in ``SIGNALS``)
    signals: tuple[str, ...] = ()
    #: k of the ``topk_overlap`` signal (rules that list it)
    overlap_k: int | None = None

    @property
    def observes(self) -> bool:
        """Whether the engine calls ``observe`` at chunk boundaries."""
        return self.needs_kl or bool(self.signals)

    #: whether the rule implements the partial-rollout protocol (the defaults below are right
    #: for rules whose only per-row state is the cap ``begin_batch`` draws)
    supports_partial: bool = False

    def begin_batch(
        self, batch_size: int, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Start a batch; return per-row length caps [batch_size] (long)."""
        return torch.full((batch_size,), max_new_tokens, dtype=torch.long)

    def observe(
        self,
        rows: torch.Tensor,
        kl: torch.Tensor,
        lengths: torch.Tensor,
        signals: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return per-row cuts [n] for rows stopped at this chunk boundary, -1 elsewhere."""
        return torch.full((rows.numel(),), -1, dtype=torch.long)

    def kept_tokens(
        self, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Final tokens kept per row [B] given the cuts so far [B] (== lengths where no rule
        cut), the per-token KL [B, T] (None without a teacher) and the lengths [B]."""
        return cut

    def end_batch(self) -> dict[str, float]:
        """Finish the batch; return metrics (e.g. threshold, buffer size)."""
        return {}

    def begin_slots(self, n_slots: int, max_new_tokens: int) -> None:
        """Partial rollouts: start ``n_slots`` persistent row slots."""
        return None

    def begin_step(self) -> None:
        """Partial rollouts: a training step's rollouts start (adaptive rules snapshot here)."""
        return None

    def admit(
        self, slots: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Partial rollouts: new rows start in ``slots`` [k]; return their caps [k] (long)."""
        return self.begin_batch(slots.numel(), max_new_tokens, generator)

    def finish(
        self, slots: torch.Tensor, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Partial rollouts: rows in ``slots`` ended; return their final kept tokens."""
        return self.kept_tokens(cut, kl, lengths)

    def end_step(self) -> dict[str, float]:
        """Partial rollouts: the step's rows are collected; return metrics (as ``end_batch``)."""
        return {}

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make adaptive state global over data-parallel ranks: ``gather(x)`` returns the
        concatenation of every rank's 1-D ``x`` in rank order (no-op for stateless rules)."""
        return None

    def on_optimizer_step(self) -> None:
        """Count one optimizer step (no-op for stateless rules)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (no-op for stateless rules)."""
        return None


def observe_rule(
    rule: Terminator,
    rows: torch.Tensor,
    kl: torch.Tensor,
    lengths: torch.Tensor,
    signals: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``rule.observe`` with the signals it lists (rules that list none get the KL only)."""
    if not rule.signals:
        return rule.observe(rows, kl, lengths)
    return rule.observe(rows, kl, lengths, signals={name: signals[name] for name in rule.signals})


def signal(rule: Terminator, signals: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor:
    """The ``name`` series of ``signals`` (what the engine passes to ``rule.observe``)."""
    if signals is None or name not in signals:
        raise ValueError(f"{type(rule).__name__}.observe needs signals[{name!r}]")
    return signals[name]
