"""A competent real pretrained pair for a testbed task (issue 20, item 4): SmolLM2-135M-Instruct
fully fine-tuned on the task's worked solutions.

One SFT run makes both models: the teacher is the model after ``sft.steps`` steps, the student
the same run's weights after ``sft.student_steps`` (an earlier, weaker point of the same
fine-tune, so teacher and student share tokenizer, chat template and architecture). Both are
saved under ``<cache_dir>/pretrained_sft/<settings hash>/{student,teacher}`` with a
``demo_model.json`` holding their held-out accuracy (sampled as ``evaluation`` says) and the
settings; a finished pair is loaded from there, not retrained.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.building.models import fit_steps, settings_key
from kat_research.building.sft import SFTModule
from kat_research.building.testbed import META_FILE
from kat_research.building.token_mixture import ExampleDataModule, sft_examples
from kat_research.data.running_sum import RunningSumConfig
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.tasks import RunningSumEvaluator
from kat_research.lit.schedule import warmup_cosine
from kat_research.lit.step_log import StepLog
from kat_research.models import load_causal_lm
from kat_research.models.cache import publish_folder

log = logging.getLogger(__name__)
ROLES = ("student", "teacher")


class SaveAtStep(L.Callback):
    """Saves the model and tokenizer to ``folder`` once ``step`` optimizer steps are done."""

    def __init__(self, step: int, folder: Path) -> None:
        self.step, self.folder = step, folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            save(pl_module.model, pl_module.tokenizer, self.folder, {"sft_steps": self.step})


def save(model: Any, tokenizer: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Write a model folder atomically (a half-written one is never taken for a finished one)."""
    with publish_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def build_pair(cfg: DictConfig) -> dict[str, Path]:
    """Fine-tune ``cfg.model`` on ``cfg.data.source`` (the running-sum task) as ``cfg.sft`` says,
    evaluate both checkpoints, and return the student's and teacher's folders."""
    sft = OmegaConf.to_container(cfg.sft, resolve=True)
    if not 0 < sft["student_steps"] < sft["steps"]:
        raise ValueError(
            f"sft.student_steps={sft['student_steps']} must lie in (0, sft.steps={sft['steps']})"
        )
    if cfg.data.source.kind != "running_sum":
        raise ValueError(f"data.source.kind={cfg.data.source.kind!r}: use data=running_sum")
    task = RunningSumConfig(**{**cfg.data.source.task, "form_weights": sft["form_weights"]})
    settings = {
        "model": OmegaConf.to_container(cfg.model, resolve=False),
        "sft": sft,
        "task": OmegaConf.to_container(cfg.data.source.task, resolve=True),
        "evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True),
    }
    root = Path(cfg.paths.cache_dir) / "pretrained_sft" / settings_key(settings)
    folders = {role: root / role for role in ROLES}
    if all((folders[role] / META_FILE).exists() for role in ROLES):
        log.info("pretrained pair cached at %s", root)
        return folders
    start = time.perf_counter()
    L.seed_everything(sft["seed"], workers=True)
    loaded = instantiate(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows, _ = load_rows(
        SourceSpec(kind="running_sum", n=sft["n_problems"], seed=sft["seed"], task=task)
    )
    data = ExampleDataModule(
        sft_examples(tokenizer, rows),
        tokenizer.pad_token_id,
        sft["batch_size"],
        sft["max_length"],
        sft["seed"],
    )
    module = SFTModule(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=sft["lr"], weight_decay=0.0),
        scheduler=functools.partial(
            warmup_cosine, warmup_steps=sft["warmup_steps"], min_lr_ratio=sft["min_lr_ratio"]
        ),
        tokenizer=tokenizer,
    )
    callbacks = [
        StepLog(f"sft {root.name}", every_n_steps=10, metrics=("sft/loss",)),
        SaveAtStep(sft["student_steps"], folders["student"]),
    ]
    fit_steps(module, data, sft["steps"], callbacks)
    save(model, tokenizer, folders["teacher"], {"sft_steps": sft["steps"]})
    evaluator = RunningSumEvaluator(
        task=cfg.data.source.task, **OmegaConf.to_container(cfg.evaluation, resolve=True)
    )
    for role in ROLES:
        meta_file = folders[role] / META_FILE
        meta = json.loads(meta_file.read_text())
        saved = load_causal_lm(str(folders[role]), trainable=False)
        metrics = evaluator(saved.model, saved.tokenizer).metrics
        meta.update(
            metrics, task=settings["task"], settings=settings, seconds=time.perf_counter() - start
        )
        meta_file.write_text(json.dumps(meta, indent=2))
        log.info("%s (%d SFT steps): %s", role, meta["sft_steps"], metrics)
    return folders
