"""Grading throughput on realistic MATH-500 (answer, gold) pairs, in-process and with workers.

Each problem gives four pairs: the gold itself (the string fast path), another problem's gold
(mostly wrong, needs math-verify), a shifted gold (integer + 1, else ``gold + 1``; wrong) and a
sum of 5,000+ ones against its value (over the answer budget: counted as too long, unparsed).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_grading.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import random
import re
import time

from kat_research.eval import Grader, load_benchmark


def perturbed_pairs(golds: list[str], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Pairs per kind: ``self`` (equal), ``other`` (another gold), ``shifted`` (off by one),
    ``too_long`` (a sum of ones over the grader's answer budget)."""
    rng = random.Random(seed)
    shifted = [str(int(g) + 1) if re.fullmatch(r"-?\d+", g) else f"{g}+1" for g in golds]
    others = [golds[(i + rng.randrange(1, len(golds))) % len(golds)] for i in range(len(golds))]
    return {
        "self": [(g, g) for g in golds],
        "other": list(zip(others, golds, strict=True)),
        "shifted": list(zip(shifted, golds, strict=True)),
        "too_long": [("+".join(["1"] * (5000 + i)), str(5000 + i)) for i in range(len(golds))],
    }


def timed_grade(grader: Grader, pairs: list[tuple[str, str]]) -> tuple[list[bool], float]:
    start = time.perf_counter()
    results = grader.grade_many(pairs)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n", type=int, default=200, help="MATH-500 problems to use")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    problems, _ = load_benchmark("math500", data_dir=args.data_dir, limit=args.n)
    by_kind = perturbed_pairs([str(p.gold) for p in problems], args.seed)
    pairs = [pair for kind_pairs in by_kind.values() for pair in kind_pairs]
    print(f"{len(problems)} MATH-500 problems, {len(pairs)} pairs, timeout {args.timeout} s")

    for workers in args.workers:
        with Grader(num_workers=workers, timeout_s=args.timeout) as grader:
            start = time.perf_counter()
            if workers:
                grader.grade("1", "2")  # start the pool outside the timed run
            startup = time.perf_counter() - start
            results, cold = timed_grade(grader, pairs)
            _, warm = timed_grade(grader, pairs)
        accuracy = {}
        for kind, kind_pairs in by_kind.items():
            kind_results = results[: len(kind_pairs)]
            results = results[len(kind_pairs) :]
            accuracy[kind] = sum(kind_results) / len(kind_results)
        print(
            f"workers={workers}: {1e3 * cold / len(pairs):.2f} ms/pair "
            f"({cold:.2f} s total, pool start {startup:.2f} s); "
            f"cache hit {1e6 * warm / len(pairs):.2f} us/pair ({cold / warm:.0f}x faster); "
            f"timeouts {grader.n_timeouts}, too long {grader.n_too_long}, "
            f"parse errors {grader.n_parse_errors}; "
            "judged correct: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items())
        )


if __name__ == "__main__":
    main()
