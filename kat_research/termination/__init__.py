"""Termination rules: when a rollout stops and which prefix is trained on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kat_research.termination.base import Terminator
from kat_research.termination.drift import OverlapDriftTerminator, topk_overlap
from kat_research.termination.horizon import ProgressiveHorizon
from kat_research.termination.kat import KATTerminator, kat_cut, kat_window_minimum
from kat_research.termination.repetition import RepetitionFilter, repetition_cut
from kat_research.termination.rules import (
    CompositeTerminator,
    FixedPrefix,
    NoTermination,
    RandomTermination,
)


def kat_on_fixed_prefix(budget: int, **kat_kwargs: Any) -> CompositeTerminator:
    """KAT running on top of a fixed prefix of `budget` tokens: the earliest stop wins."""
    return CompositeTerminator([FixedPrefix(budget), KATTerminator(**kat_kwargs)])


_BUILDERS: dict[str, Callable[..., Terminator]] = {
    "none": NoTermination,
    "fixed_prefix": FixedPrefix,
    "random": RandomTermination,
    "kat": KATTerminator,
    "kat_fixed_prefix": kat_on_fixed_prefix,
}
TERMINATOR_NAMES = tuple(_BUILDERS)


def build_terminator(name: str, **kwargs: Any) -> Terminator:
    """Build a rule by name: none, fixed_prefix, random, kat, kat_fixed_prefix.

    ``kat_fixed_prefix`` takes ``budget`` plus :class:`KATTerminator`'s keyword arguments.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown terminator {name!r}; valid names: {', '.join(TERMINATOR_NAMES)}")
    return _BUILDERS[name](**kwargs)


__all__ = [
    "TERMINATOR_NAMES",
    "CompositeTerminator",
    "FixedPrefix",
    "KATTerminator",
    "NoTermination",
    "OverlapDriftTerminator",
    "ProgressiveHorizon",
    "RandomTermination",
    "RepetitionFilter",
    "Terminator",
    "build_terminator",
    "kat_on_fixed_prefix",
    "kat_cut",
    "kat_window_minimum",
    "repetition_cut",
    "topk_overlap",
]
