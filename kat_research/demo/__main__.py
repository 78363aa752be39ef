"""`python -m kat_research.demo` (what `make demo` runs): the offline end-to-end demo.

On first run it trains and caches the tiny teacher and student (SFT on the synthetic task),
then runs each method (default: standard OPD and KAT-OPD) through the same training entry
point as any experiment (`experiment=demo`), and prints the comparison table plus what the
per-token KL does after a student's first mistake (the agreement trap).

    python -m kat_research.demo [--methods opd kat] [--jobs 2] [--output-dir outputs/demo]
                                [override ...]

Extra arguments are Hydra overrides applied to every method (e.g. trainer.max_steps=300).
On a small CPU the jobs are tiny-matrix bound, so they run side by side (`--jobs`, default:
one per core, each with cores/jobs threads): the teacher and student SFT in parallel, then
the methods in parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from kat_research.console import quiet
from kat_research.data.sources import load_rows
from kat_research.demo.jobs import demo_config, run_job
from kat_research.demo.models import demo_model_info
from kat_research.demo.trap import agreement_trap_stats


def format_table(teacher_accuracy: float, summaries: list[dict[str, Any]]) -> str:
    """The demo's result table (Markdown)."""
    lines = [
        "| run | accuracy before | accuracy after | mean generated len | mean kept len "
        "| tokens generated | wall time (s) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {100 * teacher_accuracy:.1f}% | | | | | |",
    ]
    for s in summaries:
        before = s["eval_before"]["synthetic/accuracy"]
        after = s["eval_after"]["synthetic/accuracy"]
        lines.append(
            f"| {s['method']} | {100 * before:.1f}% | {100 * after:.1f}% "
            f"| {s['mean_generated_length']:.1f} | {s['mean_kept_length']:.1f} "
            f"| {s['tokens_generated']:,} | {s['fit_time_s']:.0f} |"
        )
    return "\n".join(lines)


def trap_report(cfg: DictConfig) -> dict[str, float]:
    """Agreement-trap statistics of the demo student before distillation."""
    student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    n_problems = cfg.eval.evaluator.n_problems
    rows, _ = load_rows({**cfg.data.source, "split": "eval", "n": n_problems})
    stats = agreement_trap_stats(
        student.model.eval(),
        teacher.model,
        student.tokenizer,
        rows,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.seed,
    )
    return stats.to_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["opd", "kat"])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/demo"),
        help="one folder per method, replaced by every demo run",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="library output too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet(args.verbose)
    start = time.perf_counter()
    overrides = [f"verbose={args.verbose}", *args.overrides]
    if args.jobs > 1:  # progress bars of parallel jobs would overwrite each other
        overrides = [
            "callbacks.progress_bar.refresh_rate=0",
            "callbacks.step_log.every_n_steps=100",
            *overrides,
        ]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run_all(names: list[str]) -> list[dict | None]:
        if args.jobs == 1:
            return [run_job(n, args.output_dir, overrides, threads) for n in names]
        with ProcessPoolExecutor(
            min(args.jobs, len(names)), mp_context=get_context("spawn")
        ) as pool:
            jobs = [pool.submit(run_job, n, args.output_dir, overrides, threads) for n in names]
            return [job.result() for job in jobs]

    run_all(["teacher", "student"])
    summaries = run_all(args.methods)
    cfg = demo_config(args.methods[-1], args.output_dir, overrides)
    teacher = instantiate(cfg.model.teacher)
    teacher_accuracy = demo_model_info(teacher.name)["synthetic/accuracy"]
    trap = trap_report(cfg)
    table = format_table(teacher_accuracy, summaries)
    seconds = time.perf_counter() - start

    print("\n" + table)
    after, before = trap["kl_after_error"], trap["kl_before_error"]
    verdict = (
        "lower than before it: the teacher agrees with the derailed student (a low-KL trap)"
        if after < before
        else "higher than before it: no low-KL trap on this task (rollouts are too short for "
        "a derailed student to settle into agreement)"
    )
    print(
        f"\nAfter the student's first error ({trap['n_derailed']} of {trap['n_rollouts']} "
        f"rollouts before OPD leave the reference solution): KL at the first wrong token "
        f"{trap['kl_at_error']:.3f} (median); mean KL over the next {trap['horizon']} tokens "
        f"{after:.3f} vs {before:.3f} before the error, {verdict}. The teacher's top token "
        f"equals the student's on {100 * trap['teacher_agrees_after']:.0f}% of those tokens."
    )
    print(f"\nDemo wall time: {seconds:.0f} s. Results in {args.output_dir}/")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "demo_table.md").write_text(table + "\n")
    (args.output_dir / "demo_results.json").write_text(
        json.dumps(
            {
                "teacher_accuracy": teacher_accuracy,
                "runs": summaries,
                "trap": trap,
                "wall_time_s": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
