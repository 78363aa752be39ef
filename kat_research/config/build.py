"""Building what a training config describes: the OPD module around loaded models, its LR
schedule, the loggers and the callbacks (``training.train`` calls these in this order)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from kat_research.config.checks import served_topk
from kat_research.lit.eval_callback import EvalCallback

if TYPE_CHECKING:
    from kat_research.lit import OPDModule
    from kat_research.models import LoadedModel
    from kat_research.rollout.teachers import TopKSource
    from kat_research.termination.base import Terminator

log = logging.getLogger(__name__)
LOGGER_CALLBACKS = (LearningRateMonitor,)  # callbacks that fail without a logger


def build_scheduler(cfg: DictConfig) -> Any:
    """The LR schedule factory, or None for a constant rate (``scheduler=none``; settings a
    scale gives the schedule are then unused)."""
    node = cfg.get("scheduler")
    return instantiate(node) if node and "_target_" in node else None


def build_module(
    cfg: DictConfig,
    student: LoadedModel,
    teacher: LoadedModel | TopKSource,
    terminator: Terminator | None = None,
) -> OPDModule:
    """The OPD LightningModule ``cfg`` describes, around already loaded models (or a served
    teacher's top-k source, :func:`connect_teacher`)."""
    from kat_research.data.first_error import first_error_task
    from kat_research.lit import OPDModule
    from kat_research.models import LoadedModel
    from kat_research.rollout.teachers import ServedTeacher

    options: dict[str, Any] = {}
    if terminator is not None:
        options["terminator"] = terminator
    if cfg.get("cut_verdicts", False):
        options["verdict_task"] = first_error_task(cfg.data.source)
    if isinstance(teacher, LoadedModel):
        scorer = teacher.model
    else:
        scorer = ServedTeacher(teacher, served_topk(cfg))
    return OPDModule(
        student.model,
        scorer,
        student.tokenizer,
        optimizer=instantiate(cfg.optimizer),
        scheduler=build_scheduler(cfg),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        rollout=OmegaConf.to_container(cfg.rollout, resolve=True),
        seed=cfg.seed,
        **options,
    )


def connect_teacher(cfg: DictConfig) -> TopKSource | None:
    """The served teacher's top-k source (``teacher.backend=vllm``), else None. A teacher server
    that does not answer raises ``TeacherServerUnavailable`` here, before any model loads."""
    if OmegaConf.select(cfg, "teacher.backend", default="hf") != "vllm":
        return None
    from kat_research.rollout.teachers import connect_source

    def save_teacher(folder: str) -> None:
        instantiate(cfg.model.teacher).model.save_pretrained(folder)

    return connect_source(OmegaConf.to_container(cfg.teacher.vllm, resolve=True), save_teacher)


def enabled(cfg: DictConfig, group: str) -> dict[str, DictConfig]:
    """The entries of ``cfg.<group>`` (``callbacks`` / ``logger``) to build: those set to
    ``null`` are disabled; settings left without a ``_target_`` (a removed preset that another
    preset still sizes, e.g. ``~callbacks`` under ``debug=fast``) are skipped with a warning."""
    entries = {}
    for name, node in (cfg.get(group) or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            log.warning("%s.%s has settings but no _target_: not built", group, name)
            continue
        entries[name] = node
    return entries


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(c) for c in enabled(cfg, "logger").values()]


def build_callbacks(
    cfg: DictConfig, output_dir: Path, has_logger: bool
) -> tuple[list[L.Callback], EvalCallback | None]:
    """The configured callbacks (``callbacks.<name>=null`` disables one; those that log through
    a logger, such as the LR monitor, are left out when no logger is configured), plus the
    evaluation callback when ``eval.enabled``."""
    callbacks = []
    for name, node in enabled(cfg, "callbacks").items():
        callback = instantiate(node)
        if isinstance(callback, LOGGER_CALLBACKS) and not has_logger:
            log.info("callbacks.%s is off: it needs a logger and every logger is disabled", name)
            continue
        callbacks.append(callback)
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
