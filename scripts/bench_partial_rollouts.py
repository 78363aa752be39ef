"""Sync against partial rollouts on the long-horizon testbed (issue 21, item 5).

    python scripts/bench_partial_rollouts.py [--methods opd kat] [--seeds 0 1 2] [--steps 150]
        [--eval-every 150] [--parallel 0] [--out results/partial_rollouts] [hydra override ...]

Runs every (method, rollout.mode, seed) Table-1 job (`experiment=table1`, scale=tiny: the
testbed, smaller student) side by side, one process and one torch thread each (--parallel N
runs N at a time; 0 = all at once), so all see the same machine load. Then prints, per method
and mode (means over seeds): wall time per step, decoded tokens per second of rollout time,
decode steps per step and row-slot occupancy, the partial/sync ratios of step time and
tokens/s, KAT's realised saving against OPD in each mode, (1 - wall/wall_OPD) /
(1 - decoded/decoded_OPD) (1 when time falls as fast as the decoded tokens), the same ratio in
decode steps (what the saving is where a decode step costs the same whatever its live rows,
as on a GPU, see kat_research/planning/decode_time.py), and the greedy
held-out accuracy (avg@1) with the test: partial is within noise of sync when
|mean_partial - mean_sync| <= 2 * sqrt(var_partial/n + var_sync/n) over the n seeds.
Writes `<out>/partial_rollouts.{md,json}`. Jobs already finished under --runs are read back and
unfinished ones continue from their last checkpoint, so the measurement can be split over
sessions (each job's step times are its own, measured beside the jobs that ran with it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from kat_research.demo.jobs import run_method
from kat_research.layout import EVAL_DIR
from kat_research.provenance import code_commit

MODES = ("sync", "partial")


def job_folder(runs: Path, method: str, mode: str, seed: int) -> Path:
    return runs / f"{mode}_s{seed}"


def measure(summary: dict, folder: Path) -> dict[str, float]:
    """Per job: wall time per step, decoded tokens (rows in flight included) and their rate
    over rollout time, decode steps per step, occupancy, final greedy accuracy."""
    metrics = pd.read_csv(folder / "csv" / "metrics.csv").dropna(subset=["perf/rollout_s"])
    decoded = (metrics["perf/tokens_per_s"] * metrics["perf/rollout_s"]).sum()
    steps = pd.read_csv(folder / "csv" / "metrics.csv").dropna(subset=["perf/step_time_s"])
    evals = sorted((folder / EVAL_DIR).glob("step*.jsonl"))
    graded = pd.read_json(evals[-1], lines=True) if evals else pd.DataFrame({"correct": []})
    return {
        "steps": int(summary["steps"]),
        "wall_s": float(steps["perf/step_time_s"].sum()),
        "step_s": float(steps["perf/step_time_s"].mean()),
        "decoded": float(decoded),
        "tokens_per_s": float(decoded / metrics["perf/rollout_s"].sum()),
        "decode_steps": float(metrics["len/longest"].mean()),
        "occupancy": float(summary["occupancy"]),
        "accuracy": float(graded["correct"].mean()) if len(graded) else float("nan"),
        "eval_problems": len(graded),
    }


def run_job(method: str, mode: str, seed: int, runs: Path, overrides: list[str]) -> dict:
    folder = job_folder(runs, method, mode, seed)
    # the code of every session that trained it (beside the run folder, which train() owns)
    commits = folder / f"{method}.commits.txt"
    if not (folder / method / "summary.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with commits.open("a") as out:
            out.write(code_commit() + "\n")
    summary = run_method(
        method,
        folder,
        [f"seed={seed}", f"rollout.mode={mode}", *overrides],
        1,
        "table1",
        fresh=False,  # finished jobs are read back, unfinished ones resume
    )
    ran_at = sorted(set(commits.read_text().split())) if commits.exists() else ["unrecorded"]
    row = {"method": method, "mode": mode, "seed": seed, "commits": ran_at}
    return row | measure(summary, folder / method)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def within_noise(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """Difference of means, 2 standard errors of it, and the verdict (n >= 2 seeds each)."""
    diff = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan"), "n/a (1 seed)"
    two_se = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return diff, two_se, "yes" if abs(diff) <= two_se else "no"


def report(rows: list[dict], methods: list[str]) -> tuple[list[str], dict[str, dict]]:
    """The table and the accuracy test over the jobs' measurements; the summary per cell."""

    def cell(method: str, mode: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["method"] == method and r["mode"] == mode]

    header = (
        "| method | mode | s/step | tokens/s | decode steps/step | occupancy | accuracy "
        "| s/step partial/sync | tokens/s partial/sync | realised saving vs OPD "
        "| decode-step saving / token saving vs OPD |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    summary: dict[str, dict] = {}
    for method in methods:
        for mode in MODES:
            wall, decoded = mean(cell(method, mode, "wall_s")), mean(cell(method, mode, "decoded"))
            opd_wall, opd_decoded = (
                mean(cell("opd", mode, "wall_s")),
                mean(cell("opd", mode, "decoded")),
            )
            token_saving = 1 - decoded / opd_decoded
            realised = (1 - wall / opd_wall) / token_saving if token_saving else float("nan")
            step_ratio = mean(cell(method, mode, "step_s")) / mean(cell(method, "sync", "step_s"))
            rate_ratio = mean(cell(method, mode, "tokens_per_s")) / mean(
                cell(method, "sync", "tokens_per_s")
            )
            entry = {
                key: mean(cell(method, mode, key))
                for key in ("step_s", "tokens_per_s", "decode_steps", "occupancy", "accuracy")
            }
            entry |= {"step_ratio": step_ratio, "rate_ratio": rate_ratio, "realised": realised}
            entry["token_saving"], entry["wall_saving"] = token_saving, 1 - wall / opd_wall
            # the saving where a decode step costs the same whatever its live rows (GPU decode)
            steps_saving = 1 - entry["decode_steps"] / mean(cell("opd", mode, "decode_steps"))
            entry["decode_step_realised"] = (
                steps_saving / token_saving if token_saving else float("nan")
            )
            summary[f"{method}/{mode}"] = entry
            lines.append(
                f"| {method} | {mode} | {entry['step_s']:.2f} | {entry['tokens_per_s']:.0f} "
                f"| {entry['decode_steps']:.1f} | {entry['occupancy']:.2f} "
                f"| {100 * entry['accuracy']:.1f}% | {step_ratio:.2f} | {rate_ratio:.2f} "
                + (
                    f"| {realised:.2f} | {entry['decode_step_realised']:.2f} |"
                    if method != "opd"
                    else "| - | - |"
                )
            )
    lines += ["", "Accuracy, partial - sync (within noise: |diff| <= 2 SE over seeds):", ""]
    for method in methods:
        diff, two_se, verdict = within_noise(
            cell(method, "partial", "accuracy"), cell(method, "sync", "accuracy")
        )
        summary[f"{method}/accuracy_test"] = {"diff": diff, "two_se": two_se, "within": verdict}
        lines.append(f"- {method}: {100 * diff:+.1f} points, 2 SE {100 * two_se:.1f}: {verdict}")
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["opd", "kat"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=150, help="0: no evaluation")
    parser.add_argument("--parallel", type=int, default=0, help="jobs at a time; 0 = all")
    parser.add_argument("--out", type=Path, default=Path("results/partial_rollouts"))
    parser.add_argument("--runs", type=Path, default=Path("outputs/partial_rollouts"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job")
    args = parser.parse_args()
    if args.methods[0] != "opd":
        parser.error("--methods must start with opd (the reference of the realised saving)")
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"eval.every_n_steps={args.eval_every}",
        "eval.evaluator.n_samples=1",
        "eval.evaluator.temperature=0.0",
        *args.overrides,
    ]
    commit = code_commit()  # the code the runs use, read before they start
    grid = [(m, mode, s) for s in args.seeds for m in args.methods for mode in MODES]
    workers = args.parallel or len(grid)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(run_job, m, mode, s, args.runs, overrides) for m, mode, s in grid]
        rows = [job.result() for job in jobs]

    ran_at = sorted({c for r in rows for c in r["commits"]})
    first = (
        f"Command: `python scripts/bench_partial_rollouts.py {' '.join(sys.argv[1:])}` at commit "
        f"{commit} (the jobs trained at {', '.join(ran_at)}); {args.steps} steps, seeds "
        f"{args.seeds}, {workers} jobs at a time, one thread each. Means over seeds; accuracy: "
        f"greedy, {max(r['eval_problems'] for r in rows)} held-out problems, last evaluation."
    )
    lines, summary = report(rows, args.methods)
    text = "\n".join([first, "", *lines])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "partial_rollouts.md").write_text(text + "\n")
    (args.out / "partial_rollouts.json").write_text(json.dumps({"jobs": rows, **summary}, indent=2))


if __name__ == "__main__":
    main()
