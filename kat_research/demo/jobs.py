"""The demo's jobs, importable by worker processes (spawned workers cannot see __main__), and
the realised compute saving computed from their summaries."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.trap.check import binomial_two_sided
from kat_research.analysis.trap.tasks import task_config
from kat_research.config import ConfigError, compose
from kat_research.console import quiet
from kat_research.data.prompts import PromptCollator
from kat_research.data.running_sum import form_shares
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.demo.trap import trap_stats
from kat_research.layout import SUMMARY_FILE, eval_file, read_samples
from kat_research.training.job import train


def demo_config(
    method: str, output_dir: Path, overrides: list[str], experiment: str = "demo"
) -> DictConfig:
    """The training config of one demo job (``experiment``: a conf/experiment file)."""
    return compose(
        [
            f"experiment={experiment}",
            f"method={method}",
            f"paths.output_dir={output_dir / method}",
            *overrides,
        ]
    )


def _start(threads: int, verbose: bool) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # spawned workers start bare
    quiet(verbose)


def run_method(
    name: str,
    output_dir: Path,
    overrides: list[str],
    threads: int,
    experiment: str = "demo",
    fresh: bool = True,
) -> dict:
    """One method's training job and its summary. ``fresh``: a folder from an earlier run is
    replaced (the demo); otherwise a finished job (its summary written) is read back and an
    unfinished one continues from its last checkpoint (long benchmarks split over sessions)."""
    cfg = demo_config(name, output_dir, overrides, experiment)
    _start(threads, cfg.verbose)
    folder = output_dir / name
    if not fresh and (folder / SUMMARY_FILE).exists():
        print(f"=== {name}: finished earlier, {folder} ===", flush=True)
        return json.loads((folder / SUMMARY_FILE).read_text())
    print(f"=== demo: {name} ===", flush=True)
    if fresh and folder.exists():  # the demo's own output from an earlier `make demo`
        shutil.rmtree(folder)
    return train(cfg)


def run_trap(n_rollouts: int, output_dir: Path, overrides: list[str], threads: int) -> dict:
    """The trap statistics of the student before OPD: ``n_rollouts`` uncut rollouts on
    training prompts, sampled as the demo's OPD samples them, KAT applied offline with the
    demo's KAT settings."""
    cfg = demo_config("kat", output_dir, overrides)
    source = OmegaConf.to_container(cfg.data.source, resolve=True)
    try:
        task = task_config(source)
    except ValueError as error:
        raise ConfigError(f"the demo's trap statistics: {error}, or --trap-rollouts 0") from None
    _start(threads, cfg.verbose)
    print("=== demo: trap statistics ===", flush=True)
    student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    rows, _ = load_rows(
        SourceSpec(kind=source["kind"], split="train", n=n_rollouts, seed=cfg.seed + 1, task=task)
    )
    data = cfg.data
    collate = PromptCollator(
        student.tokenizer, data.max_prompt_tokens, data.instruction, data.get("system")
    )
    stats = trap_stats(
        student.model.eval(),
        teacher.model,
        collate,
        rows,
        task,
        max_new_tokens=cfg.rollout.max_new_tokens,
        top_p=cfg.rollout.top_p,
        rule=instantiate(cfg.termination.kat),
        seed=cfg.seed,
    )
    return stats.to_dict()


def realised_saving(opd: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """Wall-time saving against token saving of ``other`` relative to OPD: 1 when time falls
    as fast as generated tokens do; and the saving in decode steps (a batch decodes until its
    longest row ends, whatever its other rows do)."""
    wall = 1 - other["fit_time_s"] / opd["fit_time_s"]
    tokens = 1 - other["tokens_generated"] / opd["tokens_generated"]
    return {
        "wall_saving": wall,
        "token_saving": tokens,
        "realised": wall / tokens if tokens else float("nan"),
        "decode_step_saving": 1 - other["mean_decode_steps"] / opd["mean_decode_steps"],
    }


def _evaluations(run: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The graded samples of a run's evaluations before and after training."""
    before, after = (eval_file(run["output_dir"], step) for step in (0, run["steps"]))
    return read_samples(before), read_samples(after)


def phrasing_shift(run: dict[str, Any]) -> dict[str, tuple[float, ...] | None]:
    """The share of a running-sum run's greedy held-out addition lines in each phrasing
    (total first, item first, spaced), at its evaluation before and after training."""
    before, after = _evaluations(run)
    return {
        when: form_shares(record["completion"] for record in records)
        for when, records in (("before", before), ("after", after))
    }


def _graded(records: list[dict]) -> dict[tuple[str, int], bool]:
    return {(r["problem_id"], r["sample_index"]): bool(r["correct"]) for r in records}


def accuracy_change(run: dict[str, Any]) -> dict[str, float]:
    """The held-out samples a run solved before training but not after (``lost``) and after but
    not before (``gained``), and the exact McNemar test's p-value (a two-sided sign test on
    those discordant pairs): whether its accuracy moved beyond sampling noise."""
    before, after = (_graded(records) for records in _evaluations(run))
    if before.keys() != after.keys():
        raise ValueError(f"{run['output_dir']}: its evaluations graded different problems")
    lost = sum(before[key] and not after[key] for key in before)
    gained = sum(after[key] and not before[key] for key in before)
    return {"lost": lost, "gained": gained, "p": binomial_two_sided(lost, lost + gained)}
