"""The KAT paper's §3 analyses over a training run, and a planted-trap benchmark for the detector.

Entry points (Hydra, configs in conf/analysis_*.yaml), each writing PNG + CSV to results/<name>:
``python -m kat_research.analysis.kl_dynamics`` (§3.1), ``.gradient_projection`` (§3.2),
``.teacher_tokens`` (§3.3), ``.trap_benchmark`` (synthetic traces, no run needed).
Phase segmentation is :mod:`kat_research.termination.phases`, shared with the stage-wise
supervision rule (:class:`kat_research.termination.marking.KATPhaseMarker`).
"""
