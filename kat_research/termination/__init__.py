"""Termination rules: when a rollout stops and which prefix is trained on."""

from __future__ import annotations

from kat_research.termination.base import Terminator
from kat_research.termination.drift import OverlapDriftTerminator, topk_overlap
from kat_research.termination.horizon import ProgressiveHorizon
from kat_research.termination.kat import (
    KATTerminator,
    kat_calibrated,
    kat_cut,
    kat_cuts,
    kat_window_minima,
    kat_window_minimum,
)
from kat_research.termination.kat_rule import (
    KATRule,
    ThresholdPolicy,
    kat_rule,
    kat_rule_from_settings,
)
from kat_research.termination.marking import KATPhaseMarker
from kat_research.termination.repetition import RepetitionFilter, repetition_cut
from kat_research.termination.rules import (
    CompositeTerminator,
    FixedPrefix,
    NoTermination,
    RandomTermination,
)

__all__ = [
    "CompositeTerminator",
    "FixedPrefix",
    "KATPhaseMarker",
    "KATRule",
    "KATTerminator",
    "NoTermination",
    "OverlapDriftTerminator",
    "ProgressiveHorizon",
    "RandomTermination",
    "RepetitionFilter",
    "Terminator",
    "ThresholdPolicy",
    "kat_calibrated",
    "kat_cut",
    "kat_cuts",
    "kat_rule",
    "kat_rule_from_settings",
    "kat_window_minima",
    "kat_window_minimum",
    "repetition_cut",
    "topk_overlap",
]
