"""Rows against unique problems (and unique (problem, answer) pairs) of every local data file
the presets read: does any carry DAPO-Math's accidental duplication?

    python scripts/count_repeated_problems.py --data-dir data > results/dataset_duplicates.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.benchmarks import BENCHMARKS, load_benchmark
from kat_research.provenance import code_commit

FILES = {  # file under the data folder: (problem field, answer field, answer transform)
    "train/gsm8k_train.jsonl": ("question", "answer", "gsm8k"),
    "train/math_train_rllm.jsonl": ("problem", "answer", "none"),
    "train/aime_1983_2023_rllm.jsonl": ("problem", "answer", "none"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="paths.data_dir")
    args = parser.parse_args()
    commit = code_commit()
    command = f"python scripts/count_repeated_problems.py --data-dir {args.data_dir}"
    print(f"`{command}` at commit {commit}\n")
    print("| file | rows read | usable rows | unique problems | unique (problem, answer) |")
    print("|---|---|---|---|---|")
    root = Path(args.data_dir)
    for name, (problem, answer, transform) in FILES.items():
        spec = SourceSpec(
            kind="file",
            path=str(root / name),
            problem_field=problem,
            answer_field=answer,
            answer_transform=transform,
        )
        rows, stats = load_rows(spec)
        pairs = {(r.problem, r.answer) for r in rows}
        print(
            f"| {name} | {stats.n_read} | {len(rows)} | {len({r.problem for r in rows})} "
            f"| {len(pairs)} |"
        )
    for name in BENCHMARKS:
        problems, stats = load_benchmark(name, data_dir=str(root))
        pairs = {(p.problem, str(p.gold)) for p in problems}
        print(
            f"| {name}/test.jsonl | {stats.n_read} | {len(problems)} "
            f"| {len({p.problem for p in problems})} | {len(pairs)} |"
        )


if __name__ == "__main__":
    main()
