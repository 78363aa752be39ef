"""The demo's jobs, importable by worker processes (spawned workers cannot see __main__)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from kat_research.config import CONFIG_DIR
from kat_research.training import train


def demo_config(method: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    """The training config of one demo job."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=demo",
                f"method={method}",
                f"paths.output_dir={output_dir / method}",
                *overrides,
            ],
        )


def run_job(name: str, output_dir: Path, overrides: list[str], threads: int) -> dict | None:
    """One demo job: ``teacher``/``student`` prepares (trains, caches) that model; a method
    name runs its training job and returns the summary."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # spawned workers start bare
    if name in ("teacher", "student"):
        instantiate(demo_config("opd", output_dir, overrides).model[name])
        return None
    print(f"=== demo: {name} ===", flush=True)
    return train(demo_config(name, output_dir, overrides))
