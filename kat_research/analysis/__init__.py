"""The KAT paper's §3 analyses over a training run, and a planted-trap benchmark for the detector.

Entry points (Hydra, configs in conf/analysis_*.yaml), each writing PNG + CSV to results/<name>:
``python -m kat_research.analysis.kl_dynamics`` (§3.1), ``.gradient_projection`` (§3.2),
``.teacher_tokens`` (§3.3), ``.trap_benchmark`` (synthetic traces, no run needed).
Phase segmentation (:func:`segment_phases`) is shared with other experiments.
"""

from kat_research.analysis.phases import (
    AGREEMENT,
    PADDING,
    PHASES,
    POST,
    PRE,
    PhaseSegments,
    phase_id_matrix,
    segment_phases,
)

__all__ = [
    "AGREEMENT",
    "PADDING",
    "PHASES",
    "POST",
    "PRE",
    "PhaseSegments",
    "phase_id_matrix",
    "segment_phases",
]
