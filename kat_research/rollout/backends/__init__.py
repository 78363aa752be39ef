"""Student backends of the rollout engine: ``hf`` (the trained model decodes) and ``vllm`` (a
colocated vLLM engine; its module imports vLLM, so it is loaded only when asked for).

``base`` holds what the engine relies on (the protocols, ``ChunkSample``, the row-end rule);
the factory lives here rather than in ``base`` because it imports the backends, which import
``base``.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from kat_research.rollout.backends.base import (
    BACKENDS,
    ChunkSample,
    StudentBackend,
    StudentSampler,
    row_ends,
)
from kat_research.rollout.backends.hf import HFBackend


def build_backend(
    name: str, student: PreTrainedModel, vllm: dict | None = None, lean_decode: bool = True
) -> StudentBackend:
    """The student backend called ``name`` (``hf`` or ``vllm``; ``vllm`` = settings of the
    vLLM engine, see ``rollout.vllm`` in ``conf/train.yaml``; ``lean_decode``: the ``hf``
    backend's decode steps, see :class:`HFBackend`). A student already served by a vLLM engine
    gets that engine (:meth:`VLLMBackend.serving`)."""
    if name == "hf":
        return HFBackend(student, lean=lean_decode)
    if name == "vllm":
        try:
            from kat_research.rollout.backends.vllm import VLLMBackend, VLLMSettings
        except ImportError as error:
            raise ImportError(
                f"the vllm backend (rollout.backend / eval.backend) needs vLLM ({error}); "
                "`make install-vllm` builds .venv-vllm with it"
            ) from error
        return VLLMBackend.serving(student, VLLMSettings(**(vllm or {})))
    raise ValueError(f"unknown rollout backend {name!r}; valid: {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "ChunkSample",
    "HFBackend",
    "StudentBackend",
    "StudentSampler",
    "build_backend",
    "row_ends",
]
