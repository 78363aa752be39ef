"""The demo's jobs, importable by worker processes (spawned workers cannot see __main__)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from kat_research.config import compose
from kat_research.console import quiet
from kat_research.training import train


def demo_config(method: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    """The training config of one demo job."""
    return compose(
        [
            "experiment=demo",
            f"method={method}",
            f"paths.output_dir={output_dir / method}",
            *overrides,
        ]
    )


def run_job(name: str, output_dir: Path, overrides: list[str], threads: int) -> dict | None:
    """One demo job: ``teacher``/``student`` prepares (trains, caches) that model; a method
    name runs its training job and returns the summary."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # spawned workers start bare
    cfg = demo_config("opd", output_dir, overrides)
    quiet(cfg.verbose)
    if name in ("teacher", "student"):
        instantiate(cfg.model[name])
        return None
    print(f"=== demo: {name} ===", flush=True)
    folder = output_dir / name
    if folder.exists():  # the demo's own output from an earlier `make demo`: replaced
        shutil.rmtree(folder)
    return train(demo_config(name, output_dir, overrides))
