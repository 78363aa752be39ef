"""`python -m kat_research.demo` (what `make demo` runs): the offline end-to-end demo on the
running-total testbed.

The committed running-total teacher and smaller student (assets/testbed_running_sum) are
distilled with standard OPD and KAT-OPD side by side (so that their wall times share the
machine's load), then with RandomTerm whose mean length cap is KAT's mean generated length, each
through the same training entry point as any experiment (`experiment=demo`). Beside RandomTerm,
the student's own rollouts before OPD are checked for the agreement trap. It prints the
comparison table, KAT's realised compute saving, how each run moved the student's phrasing (the
running-total task) and the trap statistics.

    python -m kat_research.demo [--methods opd kat] [--no-random-term] [--trap-rollouts 128]
                                [--jobs 2] [--output-dir outputs/demo] [override ...]

Extra arguments are Hydra overrides applied to every job (e.g. trainer.max_steps=200). On a
small CPU the jobs are matrix-overhead bound, so they run side by side (`--jobs`, default: one
per core, each with cores/jobs threads).
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

from kat_research.building import demo_model_info
from kat_research.console import quiet
from kat_research.demo.jobs import (
    accuracy_change,
    demo_config,
    phrasing_shift,
    realised_saving,
    run_method,
    run_trap,
)


def accuracy(metrics: dict[str, float]) -> float:
    """The ``<task>/accuracy`` value of an evaluation's metrics."""
    (value,) = [v for k, v in metrics.items() if k.endswith("/accuracy")]
    return value


def format_table(teacher_accuracy: float, summaries: list[dict[str, Any]]) -> str:
    """The demo's result table (Markdown)."""
    lines = [
        "| run | accuracy before | accuracy after | mean generated len | mean kept len "
        "| tokens generated | wall time (s) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {100 * teacher_accuracy:.1f}% | | | | | |",
    ]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {100 * accuracy(s['eval_before']):.1f}% "
            f"| {100 * accuracy(s['eval_after']):.1f}% "
            f"| {s['mean_generated_length']:.1f} | {s['mean_kept_length']:.1f} "
            f"| {s['tokens_generated']:,} | {s['fit_time_s']:.0f} |"
        )
    return "\n".join(lines)


def trap_text(trap: dict[str, Any], alpha: float = 0.05) -> str:
    """The trap statistics in words, claiming only what they show: a difference is named only
    where its test's p-value is below ``alpha``."""
    counts = ", ".join(f"{n} {c}" for c, n in trap["categories"].items())
    after, control = trap["kl_after_derailment"], trap["kl_correct_same_positions"]
    relation = (
        ("below" if after < control else "above")
        if trap["sign_test_p"] < alpha
        else "not distinguishable from"
    )
    prefer = (
        "with no detectable preference between derailed and correct rollouts"
        if not trap["fisher_p"] < alpha
        else "derailed rollouts more often than correct ones"
        if trap["recall"] > trap["cut_correct"]
        else "correct rollouts more often than derailed ones"
    )
    return (
        f"Agreement trap, student before OPD ({trap['n_rollouts']} uncut rollouts on training "
        f"prompts: {counts}):\n"
        f"- KL over the {trap['horizon']} tokens after derailment: median {after:.3f}, "
        f"{relation} correct rollouts at the same positions ({control:.3f}; "
        f"n={trap['n_compared']}, sign test p={trap['sign_test_p']:.2g}).\n"
        f"- KAT offline (q={trap['quantile']} of these rollouts' window minima, threshold "
        f"{trap['threshold']:.3f}) would cut {100 * trap['recall']:.0f}% of derailed and "
        f"{100 * trap['cut_correct']:.0f}% of correct rollouts (Fisher p={trap['fisher_p']:.2g}; "
        f"precision {100 * trap['precision']:.0f}%): it cuts {prefer}."
    )


def phrasing_text(
    phrasing: dict[str, dict[str, tuple[float, ...] | None]],
    teacher_mix: list[float],
    student_mix: list[float],
) -> str:
    """Where each run's greedy held-out solutions moved between the task's phrasings; the
    ``*_mix`` are the odds of each phrasing in the models' training text."""

    def shares(values: tuple[float, ...] | None) -> str:
        return "no addition lines" if values is None else " / ".join(f"{v:.2f}" for v in values)

    lines = [
        "Phrasing of the greedy held-out solutions' addition lines (share total first / item "
        f"first / spaced; the teacher was trained on {':'.join(f'{w:g}' for w in teacher_mix)}, "
        f"the student on {':'.join(f'{w:g}' for w in student_mix)}):"
    ]
    for method, when in phrasing.items():
        lines.append(f"- {method}: before {shares(when['before'])}, after {shares(when['after'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["opd", "kat"])
    parser.add_argument(
        "--no-random-term",
        action="store_true",
        help="skip RandomTerm at KAT's mean length (needs kat in --methods)",
    )
    parser.add_argument("--trap-rollouts", type=int, default=128, help="0: no trap statistics")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/demo"),
        help="one folder per method, replaced by every demo run",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="library output too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet(args.verbose)
    start = time.perf_counter()
    overrides = [f"verbose={args.verbose}", *args.overrides]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    out = args.output_dir
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        first = [pool.submit(run_method, m, out, overrides, threads) for m in args.methods]
        summaries = [job.result() for job in first]
        by_method = {s["method"]: s for s in summaries}
        second = []
        if not args.no_random_term and "kat" in by_method:
            length = max(1, round(by_method["kat"]["mean_generated_length"]))
            rt_overrides = [*overrides, f"termination.random.mean_length={length}"]
            second.append(pool.submit(run_method, "random_term", out, rt_overrides, threads))
        trap_job = (
            pool.submit(run_trap, args.trap_rollouts, out, overrides, threads)
            if args.trap_rollouts
            else None
        )
        summaries += [job.result() for job in second]
        trap = trap_job.result() if trap_job else None
    cfg = demo_config(args.methods[0], out, overrides)
    teacher_info = demo_model_info(instantiate(cfg.model.teacher).name)
    teacher_accuracy = accuracy(teacher_info)
    table = format_table(teacher_accuracy, summaries)
    savings = {  # only methods that ran side by side with OPD, under the same machine load
        m: realised_saving(by_method["opd"], by_method[m])
        for m in args.methods
        if "opd" in by_method and m != "opd"
    }
    seconds = time.perf_counter() - start

    changes = {s["method"]: accuracy_change(s) for s in summaries}
    print("\n" + table)
    print(
        "\nAfter against before, on the same held-out problems (exact McNemar test): "
        + "; ".join(
            f"{method} solved {c['gained']} it had failed and failed {c['lost']} it had solved "
            f"(p={c['p']:.2g})"
            for method, c in changes.items()
        )
        + "."
    )
    for method, saving in savings.items():
        fewer = saving["decode_step_saving"]
        print(
            f"\n{method} against OPD: {100 * saving['token_saving']:.0f}% fewer generated tokens, "
            f"{100 * saving['wall_saving']:.0f}% less wall time: realised saving "
            f"{saving['realised']:.2f} (1 = time falls as fast as tokens). A batch decodes "
            f"until its longest row ends: {method}'s batches ran {100 * abs(fewer):.0f}% "
            f"{'fewer' if fewer >= 0 else 'more'} decode steps, with rows live in "
            f"{100 * by_method[method]['occupancy']:.0f}% of their slots against OPD's "
            f"{100 * by_method['opd']['occupancy']:.0f}%."
        )
    if second:
        print(
            "\nrandom_term ran after them, beside the trap statistics, with KAT's mean generated "
            "length as its mean length cap (rows that end by themselves first make it generate "
            "less): its wall time is not measured under the same load as theirs."
        )
    phrasing = {}
    if cfg.data.source.kind == "running_sum":
        phrasing = {s["method"]: phrasing_shift(s) for s in summaries}
        student_info = demo_model_info(instantiate(cfg.model.student).name)
        mixes = [info["sft"]["form_weights"] for info in (teacher_info, student_info)]
        print("\n" + phrasing_text(phrasing, *mixes))
    if trap is not None:
        print("\n" + trap_text(trap))
    print(f"\nDemo wall time: {seconds:.0f} s. Results in {out}/")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_table.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(
        json.dumps(
            {
                "teacher_accuracy": teacher_accuracy,
                "runs": summaries,
                "realised_saving": savings,
                "trap": trap,
                "phrasing": phrasing,
                "accuracy_change": changes,
                "wall_time_s": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
