"""One OPD training job from a composed config (what `python -m kat_research.train`, sweep jobs
and the demo run).

Each job writes into its own folder: the resolved config (.hydra/), TensorBoard logs and CSV
metrics, checkpoints, evaluation samples, ``summary.json`` and the exported student. Under
data parallelism (``trainer=ddp`` / ``trainer=fsdp``) every rank runs :func:`train`; files
are written by rank 0 only.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kat_research.config import ConfigError
from kat_research.config.build import (
    build_callbacks,
    build_loggers,
    build_module,
    connect_teacher,
)
from kat_research.config.checks import check_runnable, served_topk
from kat_research.console import duration, quiet, result_line
from kat_research.layout import SUMMARY_FILE, read_json, write_summary
from kat_research.lit import OPDModule
from kat_research.lit.checkpoint_hooks import PeakLearningRate, WeightsDigest
from kat_research.lit.cut_verdicts import run_summary
from kat_research.lit.divergence import DivergenceGuard
from kat_research.lit.eval_callback import EvalCallback
from kat_research.lit.teacher_failure import TeacherFailureCheckpoint
from kat_research.models import LoadedModel, check_vocab_agreement
from kat_research.models.vocab_check import check_finite_weights
from kat_research.runtime import set_torch_threads, warn_if_oversubscribed
from kat_research.training.folder import Resume, claim, hold, resume_checkpoint, trim_metrics

if TYPE_CHECKING:
    from kat_research.termination.base import Terminator

log = logging.getLogger(__name__)


def metrics_file(output_dir: Path) -> Path:
    """The CSV logger's file (``logger.csv``), continued across resumes."""
    return output_dir / "csv" / "metrics.csv"


def prepare_folder(cfg: DictConfig, output_dir: Path) -> Resume:
    """Claim the run folder (rank 0) and pick the checkpoint to continue from, before any model
    is loaded; drop metrics a resumed run will log again."""
    if rank_zero_only.rank == 0:
        claim(output_dir, cfg, cfg.resume)
    start = resume_checkpoint(output_dir, cfg.resume)
    if start.path is not None:
        log.info("resuming from %s (optimizer step %d)", start.path, start.step)
        if rank_zero_only.rank == 0:
            dropped = trim_metrics(metrics_file(output_dir), start.step)
            if dropped:
                log.info(
                    "dropped %d metrics rows after step %d (logged again)", dropped, start.step
                )
    return start


class InterruptNote(L.Callback):
    """Say, when a run is interrupted (Ctrl-C), where it stopped and how to continue it."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            saved = resume_checkpoint(self.output_dir, "auto")
            where = (
                f"its checkpoint of step {saved.step}"
                if saved.path
                else "the start (no checkpoint yet)"
            )
            log.warning(
                "interrupted at step %d: run the same command with run_dir=%s to continue from "
                "%s (resume=auto)",
                trainer.global_step,
                self.output_dir,
                where,
            )


def plan_line(cfg: DictConfig) -> str:
    """What a job runs and, where the scale records a measured pace
    (``scale.seconds_per_step``), about how long it takes."""
    steps = cfg.trainer.max_steps
    line = (
        f"training {cfg.method.name} (seed {cfg.seed}) for {steps} optimizer steps of "
        f"{cfg.data.batch_size} prompts x {cfg.rollout.group_size} rollouts of up to "
        f"{cfg.rollout.max_new_tokens} tokens into {cfg.paths.output_dir}"
    )
    pace = OmegaConf.select(cfg, "scale.seconds_per_step")
    if pace and steps and steps > 0:
        line += f"; about {duration(pace * steps)} on a CPU core (scale.seconds_per_step={pace})"
    return line


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one OPD job described by ``cfg`` (``paths.output_dir`` set); return its summary.

    A folder holding an earlier attempt of the same run continues from its newest checkpoint
    (``resume=auto``); a finished run returns its summary without training again. The folder
    is held for the job (:func:`kat_research.training.folder.hold`): a second run on it is
    refused."""
    start = time.perf_counter()
    quiet(cfg.get("verbose", False))
    output_dir = Path(cfg.paths.output_dir)
    terminator = check_runnable(cfg)
    with hold(output_dir) if rank_zero_only.rank == 0 else nullcontext():
        return _train_in_folder(cfg, output_dir, terminator, start)


def _train_in_folder(
    cfg: DictConfig, output_dir: Path, terminator: Terminator, start: float
) -> dict[str, Any]:
    resume = prepare_folder(cfg, output_dir)
    done = read_json(output_dir / SUMMARY_FILE)
    if done is not None and not extends(cfg, done):
        log.info("%s is finished (%d steps): nothing to do", output_dir, done["steps"])
        return done
    if rank_zero_only.rank == 0:
        log.info(plan_line(cfg))
    threads = set_torch_threads(cfg.threads, key="threads")
    if rank_zero_only.rank == 0:
        warn_if_oversubscribed(threads, processes=local_ranks(cfg), key="threads")
    L.seed_everything(cfg.seed, workers=True)
    served = connect_teacher(cfg)  # a teacher server that is down fails here, before any model
    datamodule = instantiate(cfg.data)
    try:  # a data file without usable rows fails here, before the models load
        datamodule.load_sources()
    except ValueError as error:
        source = cfg.data.source.get("path") or cfg.data.source.kind
        raise ConfigError(f"data ({source}): {error}") from error

    student = instantiate(cfg.model.student)
    if served is None:
        teacher = instantiate(cfg.model.teacher)
        for loaded in (student, teacher):
            check_finite_weights(loaded.name, loaded.model)
        check_vocab_agreement(
            student.name,
            student.tokenizer,
            student.model,
            teacher.name,
            teacher.tokenizer,
            teacher.model,
        )
    else:
        check_finite_weights(student.name, student.model)
        check_served_teacher(student, served.info(), served_topk(cfg))
    datamodule.attach_tokenizer(student.tokenizer)
    datamodule.setup("fit")

    module = build_module(cfg, student, teacher if served is None else served, terminator)
    loggers = build_loggers(cfg)
    callbacks, eval_cb = build_callbacks(cfg, output_dir, has_logger=bool(loggers))
    callbacks += [WeightsDigest(), PeakLearningRate(cfg.optimizer.lr), InterruptNote(output_dir)]
    if served is not None:
        callbacks.append(TeacherFailureCheckpoint(output_dir / "checkpoints"))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
        # only a configured bar: without one Lightning would add its default bar
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if not metrics_file(output_dir).exists():  # a resumed run's file holds this row
            stats = {f"data/{k}": float(v) for k, v in datamodule.stats.items()}
            logger.log_metrics(stats, step=0)

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path)
    fit_seconds = time.perf_counter() - fit_start

    diverged = divergence(callbacks)
    if cfg.export_student and diverged is None:
        export_student(trainer, student, output_dir / "student")
    elif cfg.export_student and trainer.is_global_zero:
        log.warning("the student is not exported (%s): it diverged", output_dir / "student")
    summary = make_summary(
        cfg, module, trainer, eval_cb, datamodule.stats, fit_seconds, time.perf_counter() - start
    )
    summary["diverged"] = diverged  # None, or the divergence guard's finding
    if trainer.is_global_zero:
        write_summary(output_dir, summary)
        log.info(result_line(summary))
    return summary


def divergence(callbacks: list[L.Callback]) -> str | None:
    """What the divergence guard found (its warning), or None for a run that stayed healthy."""
    guards = [c for c in callbacks if isinstance(c, DivergenceGuard)]
    return next((g.finding for g in guards if g.finding is not None), None)


def check_served_teacher(student: LoadedModel, info: dict[str, int], topk: int) -> None:
    """The served teacher's logits must index the student's vocabulary (the server knows no
    tokenizer, so only the sizes can be compared) and it must serve ``topk`` log-probs."""
    if topk > info["max_logprobs"]:
        raise ValueError(
            f"the served teacher returns at most {info['max_logprobs']} log-probs per position, "
            f"teacher.topk (or the loss's K) asks for {topk}: lower it, or raise the server's "
            "--max-logprobs (colocated: teacher.vllm.engine.max_logprobs)"
        )
    teacher_vocab = info["vocab_size"]
    size = student.model.get_output_embeddings().weight.shape[0]
    if size != teacher_vocab:
        raise ValueError(
            f"the served teacher's vocabulary has {teacher_vocab} entries, the student's "
            f"({student.name}) {size}: OPD needs teacher and student to share one tokenizer "
            "(serve the matching teacher, teacher.vllm.url / teacher.vllm.engine.model)"
        )


def local_ranks(cfg: DictConfig) -> int:
    """Training processes on this machine: one per device on the CPU, else one."""
    return cfg.trainer.devices if cfg.trainer.accelerator == "cpu" else 1


def extends(cfg: DictConfig, summary: dict[str, Any]) -> bool:
    """Whether ``cfg`` asks for more optimizer steps than the finished run took."""
    return cfg.trainer.max_steps is not None and cfg.trainer.max_steps > summary["steps"]


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
    ``mean_decode_steps`` is a batch's longest generated row (the decode steps it ran), and
    ``occupancy`` the share of those steps' row slots that held a live row.
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
        "mean_decode_steps": totals["decode_steps"] / max(1, totals["batches"]),
        "occupancy": totals["slot_tokens"] / max(1, totals["row_slots"]),
        "cut_verdicts": run_summary(totals),
        "final_metrics": {
            k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)
        },
        "eval_before": evals[steps[0]] if steps and steps[0] == 0 else None,
        "eval_after": evals[steps[-1]] if steps and steps[-1] > 0 else None,
        "data": data_stats,
        "output_dir": cfg.paths.output_dir,
    }
