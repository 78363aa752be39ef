"""Synthetic per-token KL traces with planted agreement traps, and how well a detector finds them.

A trace is ``high_kl`` everywhere except a trap of ``segment_length`` tokens at a known onset
(``low_kl``) and a few short low-KL decoys before it (easy tokens that are not a trap).
Noise is multiplicative and mean-preserving: ``d_t = m_t * exp(noise * eps - noise**2 / 2)``,
eps ~ N(0, 1), so larger ``noise`` gives spikier traces with the same mean.

Detection is KAT's own scan (:func:`~kat_research.termination.kat_cuts`, batched over traces).
A detection (cut c) on a trace with onset τ is a hit when the first window of the detected run
overlaps the trap, ``τ - window < c < τ + segment_length``; any other detection is a false
alarm. Delay = tokens generated after τ until the rule fires, ``c + window +
(patience - 1) * stride - τ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kat_research.termination import KATRule


@dataclass(frozen=True)
class TraceSpec:
    """How planted traces are drawn (everything but the noise level and trap length)."""

    length: int = 256
    trap_fraction: float = 0.5  # share of traces holding a trap
    high_kl: float = 1.0  # mean KL outside the trap
    low_kl: float = 0.02  # mean KL inside the trap and the decoys
    onset_min: int = 32  # trap onsets are uniform on [onset_min, onset_max]
    onset_max: int = 128
    decoys: int = 2  # short low-KL stretches per trace, before the trap
    decoy_length: int = 8
    decoy_gap: int = 16  # decoys end at least this many tokens before the onset


@dataclass(frozen=True)
class PlantedTraces:
    kl: torch.Tensor  # [n, length] float64
    onsets: torch.Tensor  # [n] long, -1 for a trace without a trap


def planted_traces(
    n: int, spec: TraceSpec, *, noise: float, segment_length: int, generator: torch.Generator
) -> PlantedTraces:
    """``n`` traces; the first ``round(n * trap_fraction)`` hold a trap."""
    if spec.onset_max + segment_length > spec.length:
        raise ValueError(
            f"onset_max {spec.onset_max} + segment_length {segment_length} exceeds the trace "
            f"length {spec.length}"
        )
    mean = torch.full((n, spec.length), spec.high_kl, dtype=torch.float64)
    onsets = torch.full((n,), -1, dtype=torch.long)
    n_trap = round(n * spec.trap_fraction)
    onsets[:n_trap] = torch.randint(
        spec.onset_min, spec.onset_max + 1, (n_trap,), generator=generator
    )
    for b in range(n):
        onset = int(onsets[b])
        if onset >= 0:
            mean[b, onset : onset + segment_length] = spec.low_kl
        room = (onset - spec.decoy_gap if onset >= 0 else spec.length) - spec.decoy_length
        if room > 0:
            for start in torch.randint(0, room + 1, (spec.decoys,), generator=generator).tolist():
                mean[b, start : start + spec.decoy_length] = spec.low_kl
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    return PlantedTraces(mean * torch.exp(noise * eps - noise**2 / 2), onsets)


def score(
    cuts: torch.Tensor, onsets: torch.Tensor, *, segment_length: int, rule: KATRule
) -> dict[str, float]:
    """Precision, recall, false-alarm rate on trap-free traces, mean delay and onset error."""
    trap, fired = onsets >= 0, cuts >= 0
    hit = trap & fired & (cuts > onsets - rule.window) & (cuts < onsets + segment_length)
    hits, detections = int(hit.sum()), int(fired.sum())
    delay = (cuts + rule.detection_lag - onsets)[hit].double()
    nan = math.nan
    return {
        "precision": hits / detections if detections else nan,
        "recall": hits / int(trap.sum()) if bool(trap.any()) else nan,
        "false_alarm_rate": float((fired & ~trap).sum()) / int((~trap).sum())
        if bool((~trap).any())
        else nan,
        "delay_mean": float(delay.mean()) if hits else nan,
        "onset_error_mean": float((cuts - onsets)[hit].double().abs().mean()) if hits else nan,
    }
