"""`python -m kat_research.evaluate`: math benchmark evaluation of any student.

``student=`` takes a hub id, a local model folder, or a training run folder (its exported
``student/``); ``eval=math_suite|quick`` picks the suite. The job folder receives ``samples.jsonl``
(one graded sample per line), ``summary.csv`` / ``summary.json`` (per-benchmark metrics and
throughput) and TensorBoard scalars under ``tensorboard/``; the table is printed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from kat_research.config import CONFIG_DIR, ConfigError
from kat_research.eval.suite import BenchmarkEvaluator, SuiteResult
from kat_research.layout import write_samples, write_summary
from kat_research.models import load_causal_lm, pick_device
from kat_research.runtime import set_torch_threads, warn_if_oversubscribed

log = logging.getLogger(__name__)


def resolve_model(name_or_path: str) -> str:
    """A training run folder (no ``config.json``, but ``student/config.json``) means its
    exported student; anything else (a model folder, a hub id) is returned unchanged."""
    path = Path(name_or_path)
    if not (path / "config.json").exists() and (path / "student" / "config.json").exists():
        return str(path / "student")
    return name_or_path


def write_outputs(result: SuiteResult, output_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write samples.jsonl, summary.csv, summary.json and TensorBoard scalars; return the
    summary (``info`` + per-benchmark table + flat metrics)."""
    write_samples(output_dir / "samples.jsonl", result.records)
    result.table.to_csv(output_dir / "summary.csv")
    summary = {
        **info,
        "benchmarks": json.loads(result.table.to_json(orient="index")),
        "paper_avg_missing": list(result.paper_missing),
        "metrics": result.metrics,
    }
    write_summary(output_dir, summary)
    with SummaryWriter(str(output_dir / "tensorboard")) as writer:
        for name, value in result.metrics.items():
            writer.add_scalar(f"eval/{name}", value, global_step=0)
    return summary


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.student`` with ``cfg.eval.evaluator`` into ``cfg.paths.output_dir``."""
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    warn_if_oversubscribed(set_torch_threads(cfg.threads, key="threads"), key="threads")
    if "evaluator" not in cfg.eval:
        raise ConfigError("this eval option has no evaluator: choose eval=math_suite or eval=quick")
    evaluator = instantiate(cfg.eval.evaluator)  # loads the problems before the model
    if not isinstance(evaluator, BenchmarkEvaluator):
        raise ConfigError(
            f"eval.evaluator must be a BenchmarkEvaluator, got {type(evaluator).__name__}"
        )
    name = resolve_model(cfg.student)
    device = str(pick_device(cfg.device))
    loaded = load_causal_lm(
        name, dtype=cfg.dtype, trainable=False, gguf_file=cfg.gguf_file, device=device
    )
    result = evaluator(loaded.model, loaded.tokenizer)
    info = {
        "kind": "evaluate",
        "role": "student",
        "seed": cfg.seed,
        "model": name,
        "dtype": cfg.dtype,
        "device": device,
        "backend": evaluator.backend,
        "load": {
            bench: {"n_read": s.n_read, "n_skipped": s.n_skipped, "reasons": dict(s.reasons)}
            for bench, s in evaluator.load_stats.items()
        },
        "wall_time_s": time.perf_counter() - start,
        "output_dir": str(output_dir),
    }
    summary = write_outputs(result, output_dir, info)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(f"{name}\n{result.table.to_string(float_format=lambda x: f'{x:.4f}')}")
    if result.paper_missing:
        print(f"no paper_avg: {', '.join(result.paper_missing)} not evaluated")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (single run or `-m` multirun)."""
    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    evaluate(cfg)


if __name__ == "__main__":
    main()
