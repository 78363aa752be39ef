"""Evaluation-only jobs: the teacher, or a student before training, evaluated with the config's
evaluator (Table 1's "Teacher" and "Student (before)" rows), written like a training job."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kat_research.config import ConfigError
from kat_research.layout import eval_file, write_samples, write_summary
from kat_research.models import pick_device
from kat_research.runtime import set_torch_threads, warn_if_oversubscribed


def evaluate_model(cfg: DictConfig, role: str) -> dict[str, Any]:
    """Evaluate ``cfg.model.<role>`` with ``cfg.eval.evaluator`` into ``cfg.paths.output_dir``:
    graded samples in ``eval/step000000.jsonl``, metrics in ``summary.json`` (``eval``)."""
    start = time.perf_counter()
    if not cfg.eval.get("enabled", False):
        raise ConfigError("evaluation jobs need an evaluator: choose an eval option, not none")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    warn_if_oversubscribed(set_torch_threads(cfg.threads, key="threads"), key="threads")
    L.seed_everything(cfg.seed, workers=True)
    evaluator = instantiate(cfg.eval.evaluator)
    loaded = instantiate(cfg.model[role])
    model = loaded.model.to(pick_device()).eval()
    result = evaluator(model, loaded.tokenizer)
    write_samples(eval_file(output_dir, 0), result.records)
    summary = {
        "kind": "evaluate",
        "role": role,
        "model": loaded.name,
        "seed": cfg.seed,
        "eval": result.metrics,
        "wall_time_s": time.perf_counter() - start,
        "output_dir": str(output_dir),
    }
    write_summary(output_dir, summary)
    return summary
