"""The KAT paper's §3 analyses over a training run, and the agreement trap (``analysis.trap``).

Entry points (Hydra, configs in conf/analysis_*.yaml), each writing PNG + CSV to results/<name>:
``python -m kat_research.analysis.kl_dynamics`` (§3.1), ``.gradient_projection`` (§3.2),
``.teacher_tokens`` (§3.3), ``.trap.analysis`` (a run's rollouts against KAT's cuts),
``.trap.testbed_check`` (the testbed's trap probes) and ``.trap.benchmark`` (synthetic traces,
no run needed). Every analysis samples through ``rollouts.uncut_rollouts`` and applies KAT's
rule through :mod:`kat_research.termination` (phases: :mod:`kat_research.termination.phases`).
"""
