"""`python -m kat_research.reproduce <name>... [--scale tiny] [--dry-run] [key=value ...]`:
run the sweep behind a table of the KAT paper and write the table (what `make reproduce-*` runs).

For each name (experiments/<name>.yaml): expand its jobs and those of the specs it includes,
list them with their state, compose and check the config of every job to launch (of every job
with ``--dry-run``), launch those not done (finished jobs are skipped; failed and interrupted
ones run again and resume from their newest checkpoint), then aggregate all of them into
``<results-dir>/<name>.{csv,md,tex}`` (+ ``.png`` and ``.jobs.csv``) and print the table.
Arguments holding ``=`` (or starting with ``~``) are Hydra overrides for every job, e.g.
``scale.seeds=[0]`` or ``~scale.students.large``; ``launcher.<key>=<value>`` ones change the
launcher file's settings instead (e.g. ``launcher.slurm.partition=gpu``).
Job folders: ``<runs-dir>/<scale>/<experiment>/<job>``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from kat_research.config import ConfigError, compose
from kat_research.config.checks import check_runnable
from kat_research.planning.checks import config_problems, memory_problem
from kat_research.planning.configs import model_config
from kat_research.planning.estimate import make_plan, world_size
from kat_research.sweep.job_records import job_records
from kat_research.sweep.launch import LOCAL, check_launcher, launch_all, launcher_choices
from kat_research.sweep.spec import (
    EVALUATE,
    ExperimentSpec,
    Job,
    load_spec,
    spec_jobs,
)
from kat_research.sweep.state import (
    DONE,
    PENDING,
    RUNNING,
    STALE,
    TO_RUN,
    job_folder,
    job_state,
    running_elsewhere,
)
from kat_research.tables.aggregate import TableSpec, aggregate
from kat_research.tables.plots import plot_figure, verdict_figure
from kat_research.tables.verdicts import verdict_series
from kat_research.tables.write import write_table

log = logging.getLogger(__name__)


def validate(job: Job, folder: Path, launcher: str = LOCAL) -> None:
    """Compose the job's config, build its termination rule and check what would only fail on
    the cluster (``kat_research.planning.checks``); raise ConfigError if it cannot run (no model
    or data is loaded), or cannot run with ``launcher``. On accelerators, a training job whose
    memory plan exceeds a device is reported with a warning (the plan is an estimate)."""
    cfg = compose([*job.overrides, f"paths.output_dir='{folder}'"], config_name="plan")
    check_runnable(cfg)
    if job.kind == EVALUATE and not cfg.eval.get("enabled", False):
        raise ConfigError(f"{job.name}: an evaluation job needs eval.enabled (not eval=none)")
    if launcher == LOCAL and job.kind != EVALUATE and world_size(cfg.trainer) > 1:
        raise ConfigError(
            f"{job.name}: a job on {world_size(cfg.trainer)} ranks starts processes of its own "
            "(Lightning re-runs the launching command): use --launcher subprocess or submitit_* "
            "(LAUNCHER=...), not local"
        )
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"{job.experiment}/{job.name}: " + "; ".join(problems))
    if cfg.trainer.get("accelerator") == "cpu":
        return
    if job.kind == EVALUATE:
        model_config(cfg.model[job.role])  # a hub id the planner cannot describe fails here
        return
    memory = memory_problem(cfg, make_plan(cfg))
    if memory:
        log.warning("%s/%s: %s", job.experiment, job.name, memory)


def selected(state: str, folder: Path, args: argparse.Namespace) -> bool:
    """Whether the job in ``folder``, in ``state``, is launched."""
    return (
        state in TO_RUN
        or (state == STALE and args.rerun_stale)
        or (state == PENDING and args.relaunch_pending)
        or (state == RUNNING and args.relaunch_pending and running_elsewhere(folder))
    )


def column_titles(records: pd.DataFrame, table: TableSpec) -> dict[str, str]:
    """Titles of the column groups whose jobs give their axis one (e.g. students)."""
    column = f"{table.columns}:title"
    if column not in records:
        return {}
    pairs = records[[table.columns, column]].dropna().drop_duplicates(table.columns)
    return dict(pairs.itertuples(index=False))


def write_results(
    spec: ExperimentSpec,
    jobs: list[Job],
    scale: str,
    runs_dir: Path,
    results_dir: Path,
    command: str = "(called from Python)",
) -> str:
    """Aggregate ``jobs`` into the spec's table (and figure) files; return the Markdown, whose
    notes name ``command`` and the commits the jobs ran at."""
    records = job_records(jobs, runs_dir)
    table = TableSpec.from_dict(spec.table)
    tidy = aggregate(records, table, spec.reference.get("values"))
    titles = column_titles(records, table)
    stem = results_dir / spec.name
    notes = [
        *(f"{label}: {title}" for label, title in titles.items()),
        f"scale `{scale}`: {Counter(records['status'])[DONE]} of {len(records)} jobs done "
        f"(folders under `{runs_dir / scale}`); mean ± std over seeds",
        f"paper numbers: {spec.reference.get('source', 'none')}",
        f"command: `{command}`; code: "
        + ", ".join(f"commit {c} ({n} jobs)" for c, n in Counter(records["commit"]).items()),
    ]
    text = write_table(tidy, table, stem, title=spec.title, notes=notes)
    records.to_csv(stem.with_suffix(".jobs.csv"), index=False)
    verdicts = verdict_series(records)
    if not verdicts.empty:  # the cut verdicts its training jobs logged, over training
        verdicts.to_csv(stem.with_suffix(".verdicts.csv"), index=False)
        verdict_figure(verdicts, stem.with_suffix(".verdicts.png"), title=spec.title)
    if spec.figure:
        plot_figure(
            tidy,
            table,
            spec.figure,
            stem.with_suffix(".png"),
            title=spec.title,
            column_titles=titles,
        )
    return text


def reproduce(name: str, args: argparse.Namespace, extra: list[str]) -> bool:
    """List, check, run and aggregate one spec; False if a job failed."""
    spec = load_spec(name)
    jobs = spec_jobs(spec, args.scale, extra)
    folders = [job_folder(args.runs_dir, job) for job in jobs]
    states = [job_state(folder, job) for job, folder in zip(jobs, folders, strict=True)]
    chosen = [i for i, s in enumerate(states) if selected(s, folders[i], args)]
    for i in range(len(jobs)) if args.dry_run else [] if args.no_run else chosen:
        validate(jobs[i], folders[i], args.launcher)
    counts = ", ".join(f"{n} {s}" for s, n in Counter(states).items())
    run = "would run" if args.no_run or args.dry_run else "to run"
    print(f"{name} @ {args.scale}: {len(jobs)} jobs ({counts}); {len(chosen)} {run}")
    for i, job in enumerate(jobs):
        mark = f"{states[i]}, {run}" if i in chosen else states[i]
        print(f"  [{mark:>22}] {job.experiment}/{job.name}: {' '.join(job.overrides)}")
    if args.dry_run:
        print("--dry-run: nothing launched, no table written")
        return True
    if args.no_run:
        print("--no-run: nothing launched; the table shows the jobs as they are")
        ok = True
    else:
        chosen_jobs = [(jobs[i], folders[i]) for i in chosen]
        ok = launch_all(chosen_jobs, args.launcher, args.launcher_overrides, args.parallel)
    command = "python -m kat_research.reproduce " + shlex.join(args.argv)
    print(
        write_results(spec, jobs, args.scale, Path(args.runs_dir), Path(args.results_dir), command)
    )
    return ok


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="spec names and Hydra overrides")
    parser.add_argument("--scale", default="tiny", help="conf/scale option: paper | tiny | smoke")
    parser.add_argument("--dry-run", action="store_true", help="list and check jobs, run nothing")
    parser.add_argument("--no-run", action="store_true", help="only aggregate existing results")
    parser.add_argument(
        "--launcher",
        default=LOCAL,
        help=f"{' | '.join(launcher_choices())} (conf/launcher) | a launcher file (.yaml) | "
        "a command template with {cmd}",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="jobs run at once with --launcher subprocess (e.g. one per CPU core at scale tiny, "
        "whose jobs use one thread each)",
    )
    parser.add_argument("--runs-dir", default="runs", help="root of the job folders")
    parser.add_argument("--results-dir", default="results", help="where tables are written")
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="re-run, from scratch, jobs that ran (or started) with other overrides",
    )
    parser.add_argument(
        "--relaunch-pending",
        action="store_true",
        help="launch again jobs handed to a queue or a template that have not finished: pending "
        "ones, and running ones on another host (whose process cannot be checked from here)",
    )
    args = parser.parse_intermixed_args(argv)
    check_launcher(args.launcher)
    overrides = [t for t in args.targets if "=" in t or t.startswith("~")]
    args.launcher_overrides = [
        o.removeprefix("launcher.") for o in overrides if o.startswith("launcher.")
    ]
    extra = [o for o in overrides if not o.startswith("launcher.")]  # Hydra overrides of every job
    names = [t for t in args.targets if t not in overrides]
    if not names:
        parser.error("name at least one spec (experiments/<name>.yaml)")
    args.targets = names
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # named in the tables' notes
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ok = all([reproduce(name, args, extra) for name in args.targets])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
