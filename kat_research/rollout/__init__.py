"""The rollout engine shared by every method, its student backends, and the data it produces."""

from kat_research.rollout.backends import (
    BACKENDS,
    ChunkSample,
    HFBackend,
    StudentBackend,
    StudentSampler,
    build_backend,
)
from kat_research.rollout.cached_lm import prompt_positions
from kat_research.rollout.engine import RolloutEngine, check_head_reproduces_logits
from kat_research.rollout.sampling import sample_next_token, top_p_filter
from kat_research.rollout.types import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_REASONS,
    STOP_STALE,
    STOP_TERMINATED,
    Rollout,
    SamplingConfig,
)

__all__ = [
    "BACKENDS",
    "ChunkSample",
    "HFBackend",
    "StudentBackend",
    "StudentSampler",
    "build_backend",
    "STOP_EOS",
    "STOP_MAX_TOKENS",
    "STOP_REASONS",
    "STOP_STALE",
    "STOP_TERMINATED",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "check_head_reproduces_logits",
    "prompt_positions",
    "sample_next_token",
    "top_p_filter",
]
