"""Lightning pieces of on-policy distillation: the module, its schedule, callbacks and logger."""

from kat_research.lit.opd_module import LossSettings, OPDModule, RolloutSettings
from kat_research.lit.schedule import warmup_cosine, warmup_cosine_factor

__all__ = [
    "LossSettings",
    "OPDModule",
    "RolloutSettings",
    "warmup_cosine",
    "warmup_cosine_factor",
]
