"""The teacher server: a vLLM engine scoring chunks of rollouts over HTTP for training processes
that do not hold the teacher (protocol: :mod:`~kat_research.rollout.teachers.remote`).

    python -m kat_research.rollout.teachers.server --model <teacher folder or hub id> --port 8100

Requests are served one at a time (one engine call each; the engine batches a request's rows).
For several training ranks, start one server per rank or per GPU and point each rank at its own.
"""

from __future__ import annotations

import argparse
import json
import logging
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from kat_research.rollout.teachers.remote import encode_rows
from kat_research.rollout.teachers.served import TopKSource

log = logging.getLogger(__name__)


def make_handler(engine: TopKSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/health":
                return self._send(404, {"error": f"unknown path {self.path}"})
            self._send(200, engine.info())

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                return self._send(404, {"error": f"unknown path {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                rows = engine.score(body["sequences"], body["first"], int(body["k"]))
            except (ValueError, KeyError, TypeError) as error:  # a bad request
                return self._send(400, {"error": f"{type(error).__name__}: {error}"})
            except Exception as error:  # the engine failed: 500, the client may retry
                log.exception("scoring failed")
                return self._send(500, {"error": f"{type(error).__name__}: {error}"})
            self._send(200, encode_rows(rows))

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug(format, *args)

    return Handler


def serve(engine: TopKSource, host: str, port: int) -> HTTPServer:
    """An HTTP server for ``engine`` bound to ``host:port`` (port 0: a free one); call
    ``serve_forever()`` on it."""
    return HTTPServer((host, port), make_handler(engine))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder or hub id of the teacher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--dtype", default=None, help="weight dtype; default: the checkpoint's")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None, help="prefix-cache block size")
    parser.add_argument("--max-logprobs", type=int, default=256, help="largest k served")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--engine-args",
        default="{}",
        help="other vllm.LLM arguments as JSON, e.g. '{\"tensor_parallel_size\": 2}'",
    )
    args = parser.parse_args(argv)
    from kat_research.rollout.teachers.vllm_engine import EngineSettings, VLLMTopKEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    engine = VLLMTopKEngine(
        EngineSettings(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            enforce_eager=args.enforce_eager,
            block_size=args.block_size,
            max_logprobs=args.max_logprobs,
            extra=json.loads(args.engine_args),
        )
    )
    server = serve(engine, args.host, args.port)
    log.info("teacher server on http://%s:%d (%s)", args.host, server.server_port, engine.info())
    server.serve_forever()


if __name__ == "__main__":
    main()
