"""Evaluation throughput of a tiny random Qwen3 on MATH-500: problems/s, tokens/s, grading time.

Generation runs through ``BenchmarkEvaluator`` (the rollout engine, no teacher). A random model
never writes a box, so grading is then also timed on its completions with a ``\\boxed{}`` gold
appended (every other sample boxes another problem's gold, usually wrong): in the main process
and with worker processes (pool start-up excluded and reported apart).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval_throughput.py --data-dir ../shared/data
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval_throughput.py --n 64 --k 8 \
        --max-new-tokens 256 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import time

import torch

from kat_research.eval import Grader
from kat_research.eval.runner import Completion, SampleRecord, grade_completions
from kat_research.eval.suite import BenchmarkEvaluator
from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.text.answers import extract_answer


def boxed_completions(
    records: list[SampleRecord], golds: list[str], k: int
) -> list[list[Completion]]:
    """Per problem, its k completions with a boxed gold appended: its own on even samples,
    the next problem's on odd ones."""
    out: list[list[Completion]] = [[] for _ in golds]
    for i, record in enumerate(records):
        problem = i // k
        gold = golds[(problem + record.sample_index % 2) % len(golds)]
        text = f"{record.completion} \\boxed{{{gold}}}"
        out[problem].append(Completion(text, record.length, record.stop_reason))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n", type=int, default=32, help="MATH-500 problems")
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed
    ).eval()
    params = sum(p.numel() for p in model.parameters())
    evaluator = BenchmarkEvaluator(
        {"math500": {"n_samples": args.k, "max_new_tokens": args.max_new_tokens}},
        data_dir=args.data_dir,
        limit=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(
        f"tiny Qwen3 hidden {args.hidden_size}, {args.num_layers} layers ({params / 1e6:.2f}M "
        f"params), char tokenizer; {args.n} MATH-500 problems x k={args.k}, max_new_tokens "
        f"{args.max_new_tokens}, batch {args.batch_size}, {torch.get_num_threads()} torch threads"
    )
    result = evaluator(model, tokenizer)
    row = result.table.loc["math500"]
    own_ms = 1e3 * result.metrics["grading_s_per_sample"]
    print(
        f"generation: {row['generation_s']:.1f} s, {row['problems_per_s']:.2f} problems/s, "
        f"{row['tokens_per_s']:.0f} tokens/s (mean length {row['mean_length']:.1f}); "
        f"grading of its own (unboxed) completions {own_ms:.3f} ms/sample"
    )

    problems = evaluator.problems["math500"]
    golds = [str(p.gold) for p in problems]
    completions = boxed_completions(result.records, golds, args.k)
    for workers in args.workers:
        with Grader(num_workers=workers) as grader:
            start = time.perf_counter()
            if workers:
                grader.grade("1", "2")  # start the pool outside the timed run
            startup = time.perf_counter() - start
            start = time.perf_counter()
            records = grade_completions(
                "math500",
                [p.problem_id for p in problems],
                golds,
                completions,
                extract=extract_answer,
                grade_many=grader.grade_many,
            )
            seconds = time.perf_counter() - start
        print(
            f"grading boxed answers, workers={workers}: {1e3 * seconds / len(records):.2f} "
            f"ms/sample ({seconds:.2f} s for {len(records)}, pool start {startup:.2f} s); "
            f"correct {sum(r.correct for r in records) / len(records):.1%}, "
            f"timeouts {grader.n_timeouts}, parse errors {grader.n_parse_errors}"
        )


if __name__ == "__main__":
    main()
