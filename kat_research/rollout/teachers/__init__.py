"""Teacher scorers of the rollout engine: ``hf`` (the teacher model on the training rank,
full-vocabulary logits) and ``vllm`` (top-k log-probs from a colocated vLLM engine or the
project's teacher server). ``vllm_engine`` and ``server`` import vLLM and load only when used.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from kat_research.rollout.teachers.base import TeacherBatch, TeacherChunk, TeacherScorer
from kat_research.rollout.teachers.hf import HFTeacher
from kat_research.rollout.teachers.remote import (
    TeacherServerClient,
    TeacherServerFailed,
    TeacherServerUnavailable,
)
from kat_research.rollout.teachers.served import RowTopK, ServedTeacher, TopKSource

TEACHER_BACKENDS = ("hf", "vllm")


def connect_source(vllm: dict[str, Any], save_teacher: Callable[[str], None]) -> TopKSource:
    """The top-k source ``teacher.vllm`` describes: a client of the server at ``url`` (checked
    to answer, else :class:`TeacherServerUnavailable`), or, with ``url: null``, a colocated
    engine of ``engine.model`` (null: ``save_teacher(folder)`` writes the teacher there)."""
    if vllm.get("url"):
        client = TeacherServerClient(
            vllm["url"], vllm["timeout_s"], vllm["retries"], vllm["retry_wait_s"]
        )
        client.check()
        return client
    try:
        from kat_research.rollout.teachers.vllm_engine import EngineSettings, VLLMTopKEngine
    except ImportError as error:
        raise ImportError(
            f"a colocated vLLM teacher (teacher.backend=vllm, teacher.vllm.url=null) needs vLLM "
            f"({error}); `make install-vllm` builds .venv-vllm with it, or set teacher.vllm.url "
            "to a teacher server"
        ) from error
    engine = dict(vllm["engine"])
    snapshot = None
    if engine.get("model") is None:
        snapshot = tempfile.TemporaryDirectory(prefix="kat-teacher-")
        save_teacher(snapshot.name)
        engine["model"] = snapshot.name
    source = VLLMTopKEngine(EngineSettings(**engine))
    source.snapshot = snapshot  # the folder lives as long as the engine
    return source


__all__ = [
    "TEACHER_BACKENDS",
    "HFTeacher",
    "RowTopK",
    "ServedTeacher",
    "TeacherBatch",
    "TeacherChunk",
    "TeacherScorer",
    "TeacherServerClient",
    "TeacherServerFailed",
    "TeacherServerUnavailable",
    "TopKSource",
    "connect_source",
]
