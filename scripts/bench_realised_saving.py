"""Realised compute saving of early termination on the long-horizon testbed (issue 14, item 5).

    python scripts/bench_realised_saving.py [--methods opd kat random_term] [--steps 150]
        [--eval-every 25] [--out results/realised_saving] [hydra override ...]

Runs each method's Table-1 job (`experiment=table1`, scale=tiny: the testbed, smaller student by
default) side by side, one process and one torch thread each, so all see the same machine load;
every --eval-every steps the student is evaluated greedily on the 39 held-out starts. Then
prints, per method, the wall time per step and where it goes (sampling, teacher scoring, the
rest: loss, backward, optimizer), how many decode steps a batch ran (its longest row) and the
share of their row slots that held a live row, the tokens generated and trained, the realised
saving against OPD, (1 - wall/wall_OPD) / (1 - tokens/tokens_OPD), which is 1 when time falls
as fast as the generated tokens, and the wall time at which the method first reaches OPD's
final accuracy.
Writes `<out>/realised_saving.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from kat_research.demo.jobs import realised_saving, run_method
from kat_research.layout import EVAL_DIR
from kat_research.provenance import code_commit


def step_table(folder: Path) -> pd.DataFrame:
    """Per optimizer step: wall time, sampling time (teacher scoring included), teacher time,
    generated and kept tokens per rollout, the longest row (decode steps) and occupancy."""
    metrics = pd.read_csv(folder / "csv" / "metrics.csv")
    cols = ["perf/step_time_s", "perf/rollout_s", "perf/teacher_s", "len/generated", "len/kept"]
    cols += ["len/longest", "perf/occupancy"]
    return metrics.dropna(subset=["perf/step_time_s"])[["step", *cols]]


def accuracy_curve(folder: Path) -> dict[int, float]:
    """Greedy held-out accuracy by step, from the graded samples."""
    curve = {}
    for path in sorted((folder / EVAL_DIR).glob("step*.jsonl")):
        rows = pd.read_json(path, lines=True)
        curve[int(path.stem.removeprefix("step"))] = float(rows["correct"].mean())
    return curve


def wall_to_reach(steps: pd.DataFrame, curve: dict[int, float], target: float) -> float:
    """Cumulative step time up to the first evaluation reaching ``target`` (NaN if none)."""
    wall = steps.set_index("step")["perf/step_time_s"].cumsum()
    for step, acc in sorted(curve.items()):
        if step > 0 and acc >= target - 1e-9:
            return float(wall[wall.index < step].iloc[-1])
    return float("nan")


def measure(summary: dict, folder: Path) -> dict[str, float]:
    steps = step_table(folder)
    step_s = steps["perf/step_time_s"].mean()
    rollout_s = steps["perf/rollout_s"].mean()
    teacher_s = steps["perf/teacher_s"].mean()
    return {
        "steps": int(summary["steps"]),
        "fit_time_s": summary["fit_time_s"],
        "step_s": step_s,
        "sampling_s": rollout_s - teacher_s,
        "teacher_s": teacher_s,
        "rest_s": step_s - rollout_s,
        "mean_decode_steps": steps["len/longest"].mean(),
        "occupancy": steps["perf/occupancy"].mean(),
        "tokens_generated": summary["tokens_generated"],
        "tokens_kept": summary["tokens_kept"],
        "final_accuracy": accuracy_curve(folder)[int(summary["steps"])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["opd", "kat", "random_term"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("results/realised_saving"))
    parser.add_argument("--runs", type=Path, default=Path("outputs/realised_saving"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every method")
    args = parser.parse_args()
    if args.methods[0] != "opd":
        parser.error("--methods must start with opd (the reference)")
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"eval.every_n_steps={args.eval_every}",
        "eval.evaluator.n_samples=1",
        "eval.evaluator.temperature=0.0",
        *args.overrides,
    ]
    commit = code_commit()  # the code the runs use, read before they start
    with ProcessPoolExecutor(len(args.methods), mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(run_method, m, args.runs, overrides, 1, "table1") for m in args.methods]
        summaries = [job.result() for job in jobs]
    rows = {s["method"]: measure(s, args.runs / s["method"]) for s in summaries}
    opd = rows["opd"]
    for method, row in rows.items():
        folder = args.runs / method
        row["wall_to_opd_final_s"] = wall_to_reach(
            step_table(folder), accuracy_curve(folder), opd["final_accuracy"]
        )
        row.update(realised_saving(opd, row))
    header = (
        "| method | s/step | sampling | teacher | rest | decode steps / batch | occupancy "
        "| tokens generated | tokens trained | wall saving | token saving | realised "
        "| final acc. | wall to OPD's final acc. (s) |"
    )
    lines = [
        f"Command: `python scripts/bench_realised_saving.py {' '.join(sys.argv[1:])}` at commit "
        f"{commit}; {args.steps} steps, greedy accuracy on 39 held-out starts every "
        f"{args.eval_every} steps; the methods ran at once, one thread each.",
        "",
        header,
        "|---" * (header.count("|") - 1) + "|",
    ]
    for method, r in rows.items():
        lines.append(
            f"| {method} | {r['step_s']:.2f} | {r['sampling_s']:.2f} | {r['teacher_s']:.2f} "
            f"| {r['rest_s']:.2f} | {r['mean_decode_steps']:.1f} | {r['occupancy']:.2f} "
            f"| {r['tokens_generated']:,} | {r['tokens_kept']:,} "
            f"| {100 * r['wall_saving']:.0f}% | {100 * r['token_saving']:.0f}% "
            f"| {r['realised']:.2f} | {100 * r['final_accuracy']:.1f}% "
            f"| {r['wall_to_opd_final_s']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realised_saving.md").write_text(text + "\n")
    (args.out / "realised_saving.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
