"""Lightning modules: on-policy distillation and supervised fine-tuning."""

from kat_research.lit.opd_module import LossSettings, OPDModule, RolloutSettings
from kat_research.lit.schedule import warmup_cosine, warmup_cosine_factor
from kat_research.lit.sft_module import SFTModule

__all__ = [
    "LossSettings",
    "OPDModule",
    "RolloutSettings",
    "SFTModule",
    "warmup_cosine",
    "warmup_cosine_factor",
]
