"""Chunk-scoring throughput of the teacher backends on one workload, side by side: the HF
teacher, the colocated vLLM teacher and the project's teacher server on localhost
(``scripts/bench_teacher_backends.py`` and the GPU kit's vLLM section run it; needs vLLM)."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from kat_research.rollout.engine import RolloutEngine
from kat_research.rollout.teachers import HFTeacher, ServedTeacher, TeacherServerClient
from kat_research.rollout.teachers.server import serve
from kat_research.rollout.teachers.vllm_engine import EngineSettings, VLLMTopKEngine
from kat_research.rollout.types import SamplingConfig
from kat_research.runtime import interleaved


def workload(
    teacher: PreTrainedModel, batch: int, prompt_len: int, new_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts [B, P] (random ids, left-padded to lengths between P/2 and P), their mask, and
    generated tokens [B, T] sampled from the teacher itself (T=1, top-p 0.95, no stop id), so
    they are mostly among its top-k as an on-policy student's are: a chunk on a cache-block
    edge then takes its first position from the previous request rather than being resent."""
    g = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g)
    ids = torch.randint(4, teacher.config.vocab_size, (batch, prompt_len), generator=g)
    mask = (torch.arange(prompt_len)[None] >= prompt_len - lengths[:, None]).long()
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=new_tokens)
    engine = RolloutEngine(teacher, sampling=sampling, pad_token_id=0)
    sampler = torch.Generator(device=device).manual_seed(seed)
    rollout = engine.generate((ids * mask).to(device), mask.to(device), sampler)
    return ids * mask, mask, rollout.tokens.cpu()


def score_all(scorer, prompt_ids, prompt_mask, tokens, score_every: int, engine=None) -> None:
    """Feed every chunk of ``tokens`` to ``scorer`` as the rollout engine does (a vLLM
    ``engine`` first forgets the previous runs' prefixes: each run is a new rollout)."""
    if engine is not None:
        engine.reset()
    batch = scorer.begin(prompt_ids.to(device_of(scorer)), prompt_mask.to(device_of(scorer)))
    tokens = tokens.to(device_of(scorer))
    for start in range(0, tokens.shape[1], score_every):
        chunk = tokens[:, start : start + score_every]
        batch.score(chunk, torch.ones_like(chunk, dtype=torch.bool), start)


def device_of(scorer) -> torch.device:
    model = getattr(scorer, "model", None)
    return next(model.parameters()).device if model is not None else torch.device("cpu")


def bench_teacher(
    name: str,
    teacher: PreTrainedModel,
    args: argparse.Namespace,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Scored tokens/s of each backend on ``teacher``; prints a table, returns the numbers."""
    prompt_ids, prompt_mask, tokens = workload(
        teacher, args.batch, args.prompt_tokens, args.new_tokens
    )
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as folder:
        teacher.save_pretrained(folder)
        start = time.perf_counter()
        engine = VLLMTopKEngine(
            EngineSettings(
                model=folder,
                dtype=str(teacher.dtype).removeprefix("torch."),
                max_model_len=args.prompt_tokens + args.new_tokens + 1,
                kv_cache_memory_bytes=args.kv_cache_mib * 2**20,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enforce_eager=True,
                block_size=args.block_size,
            )
        )
        startup = time.perf_counter() - start
    server = serve(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = TeacherServerClient(
        f"http://127.0.0.1:{server.server_port}", timeout_s=600, retries=0, retry_wait_s=0
    )
    scorers = {
        "hf": HFTeacher(teacher),
        "vllm": ServedTeacher(engine, args.topk),
        "vllm-server": ServedTeacher(client, args.topk),
    }
    fns = {
        label: (
            lambda s=s, e=(None if label == "hf" else engine): score_all(
                s, prompt_ids, prompt_mask, tokens, args.score_every, e
            )
        )
        for label, s in scorers.items()
    }
    with torch.no_grad():
        t = interleaved(fns, args.repeats)
    server.shutdown()
    server.server_close()
    n = args.batch * args.new_tokens
    rates = {label: n / seconds for label, seconds in t.items()}
    print_fn(
        f"{name}: batch {args.batch}, prompts <= {args.prompt_tokens} tokens, {args.new_tokens} "
        f"new tokens scored {args.score_every} at a time, top-{args.topk}; vLLM start "
        f"{startup:.1f} s, block {engine.llm.llm_engine.vllm_config.cache_config.block_size}"
    )
    for label, rate in rates.items():
        print_fn(f"  {label:12s} {rate:9.0f} scored tokens/s   /hf {rate / rates['hf']:.2f}")
    print_fn(
        f"  prefix cache, all runs: {engine.n_cached} prompt tokens read from it; chunks on a "
        f"block edge: {engine.n_filled} filled from the decode step, {engine.n_resent} resent"
    )
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--score-every", type=int, default=16)
    parser.add_argument("--topk", type=int, default=64, help="log-probs per position (loss K)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM prefix-cache block")
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
