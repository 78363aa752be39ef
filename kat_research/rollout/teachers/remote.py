"""The client of the project's teacher server (:mod:`~kat_research.rollout.teachers.server`),
its wire format and its errors. Standard library only: training processes need no vLLM.

Why a project server rather than vLLM's OpenAI-compatible ``/v1/completions``: that endpoint
returns prompt log-probs only for requests that skip the prefix cache (vLLM 0.32 sets
``skip_reading_prefix_cache`` for them and the API does not expose it), so every chunk would
cost the rollout's whole prefix; and it sends each position's top-k as a JSON object of
decoded strings. The project server reads the prefix cache (see ``vllm_engine``) and returns
the chunk's positions only, as packed float32/int32 arrays.

Protocol: ``GET /health`` -> ``{"vocab_size", "max_model_len"}``; ``POST /score`` with
``{"sequences": [[ids]], "first": [int], "k": int}`` -> ``{"rows": [{"n", "topk_logprobs",
"topk_ids", "token_logprobs"}]}`` (base64 little-endian arrays, n positions per row).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch

from kat_research.rollout.teachers.served import RowTopK

log = logging.getLogger(__name__)


class TeacherServerUnavailable(ConnectionError):
    """The teacher server could not be reached when the run started."""


class TeacherServerFailed(RuntimeError):
    """The teacher server failed or timed out mid-rollout, after every configured retry."""


def encode_rows(rows: list[RowTopK]) -> dict[str, Any]:
    """The ``/score`` response body of ``rows``."""

    def pack(t: torch.Tensor, dtype: str) -> str:
        return base64.b64encode(t.numpy().astype(dtype).tobytes()).decode("ascii")

    return {
        "rows": [
            {
                "n": int(r.token_logprobs.shape[0]),
                "topk_logprobs": pack(r.topk_logprobs, "<f4"),
                "topk_ids": pack(r.topk_ids, "<i4"),
                "token_logprobs": pack(r.token_logprobs, "<f4"),
            }
            for r in rows
        ]
    }


def decode_rows(body: dict[str, Any], k: int) -> list[RowTopK]:
    """The rows of a ``/score`` response body."""

    def unpack(text: str, dtype: str) -> np.ndarray:
        return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()

    rows = []
    for r in body["rows"]:
        n = r["n"]
        rows.append(
            RowTopK(
                topk_logprobs=torch.from_numpy(unpack(r["topk_logprobs"], "<f4").reshape(n, k)),
                topk_ids=torch.from_numpy(unpack(r["topk_ids"], "<i4").reshape(n, k)).long(),
                token_logprobs=torch.from_numpy(unpack(r["token_logprobs"], "<f4")),
            )
        )
    return rows


class TeacherServerClient:
    """Talks to a teacher server at ``url`` (a :class:`~.served.TopKSource`).

    A request that fails (connection refused or reset, timeout after ``timeout_s``, HTTP 5xx)
    is sent again up to ``retries`` times, ``retry_wait_s`` apart; then
    :class:`TeacherServerFailed`. A request the server rejects (HTTP 4xx) fails at once.
    """

    def __init__(self, url: str, timeout_s: float, retries: int, retry_wait_s: float):
        if retries < 0 or timeout_s <= 0 or retry_wait_s < 0:
            raise ValueError(
                "teacher.vllm: timeout_s must be > 0, retries and retry_wait_s >= 0 (got "
                f"{timeout_s}, {retries}, {retry_wait_s})"
            )
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.retry_wait_s = timeout_s, retries, retry_wait_s
        self._info: dict[str, int] | None = None

    def check(self) -> dict[str, int]:
        """Reach the server once (no retries); :class:`TeacherServerUnavailable` if it is down."""
        try:
            self._info = self._request("GET", "/health", None)
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise TeacherServerUnavailable(
                f"the teacher server at {self.url} (teacher.vllm.url) does not answer: "
                f"{_reason(error)}. Start it first (python -m kat_research.rollout.teachers."
                "server --model <teacher folder> --port <port>; README 'Serving the teacher'), "
                "or set teacher.backend=hf"
            ) from error
        return self._info

    def info(self) -> dict[str, int]:
        return self._info if self._info is not None else self.check()

    def score(self, sequences: list[list[int]], first: list[int], k: int) -> list[RowTopK]:
        body = {"sequences": sequences, "first": first, "k": k}
        for attempt in range(self.retries + 1):
            try:
                return decode_rows(self._request("POST", "/score", body), k)
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    detail = error.read().decode(errors="replace")
                    raise TeacherServerFailed(
                        f"the teacher server at {self.url} rejected a request: {detail}"
                    ) from error
                failure: Exception = error
            except (OSError, http.client.HTTPException) as error:  # refused, timeout, reset
                failure = error
            if attempt < self.retries:
                log.warning(
                    "teacher server %s: %s; retry %d of %d in %.0f s",
                    self.url,
                    _reason(failure),
                    attempt + 1,
                    self.retries,
                    self.retry_wait_s,
                )
                time.sleep(self.retry_wait_s)
        raise TeacherServerFailed(
            f"the teacher server at {self.url} failed mid-rollout: {_reason(failure)} "
            f"({self.retries + 1} attempts, timeout {self.timeout_s} s each; "
            "teacher.vllm.retries / timeout_s). Training stopped; checkpoints are kept and "
            "the run resumes from its newest one (resume=auto) once the server is back"
        ) from failure

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}: {reason if reason is not None else error}"
