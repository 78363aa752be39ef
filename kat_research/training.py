"""One OPD training job from a composed config (what `python -m kat_research.train`, sweep jobs
and the demo run).

Each job writes into its own folder: the resolved config (.hydra/), TensorBoard logs and CSV
metrics, checkpoints, evaluation samples, ``summary.json`` and the exported student. Under
data parallelism (``trainer=ddp`` / ``trainer=fsdp``) every rank runs :func:`train`; files
are written by rank 0 only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.config import build_module, check_runnable
from kat_research.layout import write_summary
from kat_research.lit import OPDModule
from kat_research.lit.eval_callback import EvalCallback
from kat_research.models import LoadedModel, check_vocab_agreement

log = logging.getLogger(__name__)


def build_callbacks(
    cfg: DictConfig, output_dir: Path
) -> tuple[list[L.Callback], EvalCallback | None]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    eval_cb = None
    if cfg.eval.get("enabled", False):
        eval_cb = EvalCallback(
            instantiate(cfg.eval.evaluator),
            output_dir=output_dir,
            every_n_steps=cfg.eval.every_n_steps,
            at_start=cfg.eval.at_start,
            at_end=cfg.eval.at_end,
            stop_when=cfg.eval.get("stop_when"),
        )
        callbacks.append(eval_cb)
    return callbacks, eval_cb


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one OPD job described by ``cfg`` (``paths.output_dir`` set); return its summary."""
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    terminator = check_runnable(cfg)

    student = instantiate(cfg.model.student)
    teacher = instantiate(cfg.model.teacher)
    check_vocab_agreement(
        student.name,
        student.tokenizer,
        student.model,
        teacher.name,
        teacher.tokenizer,
        teacher.model,
    )
    datamodule = instantiate(cfg.data)
    datamodule.attach_tokenizer(student.tokenizer)
    datamodule.setup("fit")

    module = build_module(cfg, student, teacher, terminator)
    callbacks, eval_cb = build_callbacks(cfg, output_dir)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(output_dir)
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({f"data/{k}": float(v) for k, v in datamodule.stats.items()}, step=0)

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - fit_start

    if cfg.export_student:
        export_student(trainer, student, output_dir / "student")
    summary = make_summary(
        cfg, module, trainer, eval_cb, datamodule.stats, fit_seconds, time.perf_counter() - start
    )
    if trainer.is_global_zero:
        write_summary(output_dir, summary)
        log.info("summary: %s", json.dumps(summary))
    return summary


def export_student(trainer: L.Trainer, student: LoadedModel, folder: Path) -> None:
    """``save_pretrained`` the trained student (+ tokenizer) from rank 0. Every rank must call
    it: under FSDP the strategy gathers the full weights collectively."""
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "student."
        weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        student.model.save_pretrained(folder, state_dict=weights)
        student.tokenizer.save_pretrained(folder)


def make_summary(
    cfg: DictConfig,
    module: OPDModule,
    trainer: L.Trainer,
    eval_cb: EvalCallback | None,
    data_stats: dict[str, int],
    fit_seconds: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """What a job reports: settings, compute spent, lengths, final metrics, evaluation.

    Token and rollout counts are totals over all ranks; times are wall-clock (per rank).
    """
    totals = module.totals
    rollouts = max(1, totals["rollouts"])
    evals = eval_cb.results if eval_cb is not None else {}
    steps = sorted(evals)
    return {
        "kind": "train",
        "method": cfg.method.name,
        "loss": cfg.loss.kind,
        "seed": cfg.seed,
        "student": module.student.name_or_path,
        "steps": trainer.global_step,
        "fit_time_s": fit_seconds,
        "wall_time_s": wall_seconds,
        "tokens_generated": totals["tokens_generated"],
        "tokens_kept": totals["tokens_kept"],
        "rollouts": totals["rollouts"],
        "mean_generated_length": totals["tokens_generated"] / rollouts,
        "mean_kept_length": totals["tokens_kept"] / rollouts,
        "rollout_time_s": totals["rollout_s"],
        "final_metrics": {
            k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)
        },
        "eval_before": evals[steps[0]] if steps and steps[0] == 0 else None,
        "eval_after": evals[steps[-1]] if steps and steps[-1] > 0 else None,
        "data": data_stats,
        "output_dir": cfg.paths.output_dir,
    }
