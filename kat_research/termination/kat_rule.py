"""The KAT rule as one value: its windows (:class:`KATRule`) and where its threshold comes from
(:class:`ThresholdPolicy`), built from one config node (``termination.kat``) by
:func:`kat_rule`. The online terminator, the phase marker, the offline scan and every analysis
take this value whole."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class ThresholdPolicy:
    """A fixed threshold, or (``fixed=None``) the ``quantile`` of a FIFO buffer of the last
    ``buffer_size`` per-rollout minimum window means, active once the buffer holds
    ``min_buffer`` minima and ``warmup_steps`` optimizer steps were taken."""

    fixed: float | None = None
    quantile: float = 0.7
    buffer_size: int = 4096
    min_buffer: int = 512
    warmup_steps: int = 50

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 1 <= self.min_buffer <= self.buffer_size:
            raise ValueError(
                f"need 1 <= min_buffer <= buffer_size, got min_buffer={self.min_buffer}, "
                f"buffer_size={self.buffer_size}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.fixed is not None and math.isnan(self.fixed):
            raise ValueError("threshold must not be NaN")

    def of(self, minima: torch.Tensor) -> float:
        """The threshold given a buffer of minima: the fixed one, else their ``quantile``
        (``torch.quantile``, as the online rule computes it; NaN for an empty buffer)."""
        if self.fixed is not None:
            return float(self.fixed)
        minima = minima.double()
        return float(torch.quantile(minima, self.quantile)) if minima.numel() else math.nan

    def active(self, buffered: int, optimizer_steps: int) -> bool:
        """Whether the rule may cut: always with a fixed threshold, else after the warm-up."""
        return self.fixed is not None or (
            buffered >= self.min_buffer and optimizer_steps >= self.warmup_steps
        )


@dataclass(frozen=True)
class KATRule:
    """Window k covers generated tokens ``[k*stride, k*stride + window)`` (``stride=None``
    means ``window``, resolved here and nowhere else); windows starting before ``exempt`` never
    count; ``patience`` consecutive windows with mean below the threshold fire the rule."""

    window: int = 64
    stride: int = None  # type: ignore[assignment]  # None -> window (__post_init__)
    patience: int = 4
    exempt: int = 0
    threshold: ThresholdPolicy = field(default_factory=ThresholdPolicy)

    def __post_init__(self) -> None:
        if self.stride is None:
            object.__setattr__(self, "stride", self.window)
        for name, low in (("window", 1), ("stride", 1), ("patience", 1), ("exempt", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")

    @property
    def detection_lag(self) -> int:
        """Tokens from the cut to the point where the rule fires."""
        return self.window + (self.patience - 1) * self.stride

    def with_fixed_threshold(self, threshold: float) -> KATRule:
        return replace(self, threshold=replace(self.threshold, fixed=float(threshold)))

    def with_quantile(self, quantile: float) -> KATRule:
        """The adaptive rule at another quantile (a fixed threshold is dropped)."""
        return replace(self, threshold=replace(self.threshold, fixed=None, quantile=quantile))

    def __str__(self) -> str:
        policy = self.threshold
        shown = (
            f"threshold {policy.fixed:.4g}"
            if policy.fixed is not None
            else f"quantile {policy.quantile}"
        )
        return (
            f"window {self.window}, stride {self.stride}, patience {self.patience}, "
            f"exempt {self.exempt}, {shown}"
        )


def kat_rule(
    window: int = 64,
    stride: int | None = None,
    patience: int = 4,
    exempt: int = 0,
    quantile: float = 0.7,
    buffer_size: int = 4096,
    min_buffer: int = 512,
    warmup_steps: int = 50,
    threshold: float | None = None,
) -> KATRule:
    """The rule a ``termination.kat`` config node describes (its keys, flat)."""
    policy = ThresholdPolicy(threshold, quantile, buffer_size, min_buffer, warmup_steps)
    return KATRule(window, stride, patience, exempt, policy)  # type: ignore[arg-type]


def kat_rule_from_settings(
    settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> KATRule:
    """:func:`kat_rule` of a ``termination.kat`` mapping (``_target_`` ignored) with the
    non-null ``overrides`` applied (an analysis's detector settings on a run's rule)."""
    merged = {k: v for k, v in settings.items() if k != "_target_"}
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return kat_rule(**merged)
