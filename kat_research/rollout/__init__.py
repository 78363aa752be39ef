"""The rollout engine shared by every method, and the data it produces."""

from kat_research.rollout.engine import (
    RolloutEngine,
    check_head_reproduces_logits,
    prompt_positions,
)
from kat_research.rollout.sampling import sample_next_token, top_p_filter
from kat_research.rollout.types import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_REASONS,
    STOP_TERMINATED,
    Rollout,
    SamplingConfig,
)

__all__ = [
    "STOP_EOS",
    "STOP_MAX_TOKENS",
    "STOP_REASONS",
    "STOP_TERMINATED",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "check_head_reproduces_logits",
    "prompt_positions",
    "sample_next_token",
    "top_p_filter",
]
