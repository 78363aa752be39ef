"""A competent real pretrained pair for a testbed task (issue 20, item 4): SmolLM2-135M-Instruct
fully fine-tuned on the task's worked solutions.

One SFT run makes both models: the teacher is the model after ``sft.steps`` steps, the student
the same run's weights after ``sft.student_steps`` (an earlier, weaker point of the same
fine-tune, so teacher and student share tokenizer, chat template and architecture). Both are
saved under ``<cache_dir>/pretrained_sft/<settings hash>/{student,teacher}`` with a
``demo_model.json`` holding their held-out accuracy (sampled as ``evaluation`` says) and the
settings; a finished pair is loaded from there, not retrained. The fine-tune is long on a CPU
(hours), so it checkpoints every ``sft.checkpoint_every`` steps and a rerun of the same command
continues it: a fine-tune can be spread over several sessions.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
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
from kat_research.layout import write_atomic
from kat_research.lit.schedule import warmup_cosine
from kat_research.lit.step_log import StepLog
from kat_research.models import load_causal_lm
from kat_research.models.cache import publish_folder

log = logging.getLogger(__name__)
ROLES = ("student", "teacher")
ACCURACY = "running_sum/accuracy"  # in a model's meta once it is evaluated
CHECKPOINTS = "checkpoints"  # under the pair's folder while the fine-tune runs


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


def _fine_tune(cfg: DictConfig, sft: dict[str, Any], root: Path) -> None:
    """Run the fine-tune, checkpointed under ``root/checkpoints`` (resumed from there when an
    earlier attempt was interrupted); save the student on the way and the teacher at the end."""
    start = time.perf_counter()
    L.seed_everything(sft["seed"], workers=True)
    loaded = instantiate(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    task = RunningSumConfig(**{**cfg.data.source.task, "form_weights": sft["form_weights"]})
    rows, _ = load_rows(
        SourceSpec(kind="running_sum", n=sft["n_problems"], seed=sft["seed"], task=task)
    )
    data = ExampleDataModule(
        sft_examples(tokenizer, rows),
        tokenizer.pad_token_id,
        sft["batch_size"],
        sft["max_length"],
        sft["seed"],
        resumable=True,
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
        SaveAtStep(sft["student_steps"], root / "student"),
    ]
    checkpoints = root / CHECKPOINTS
    fit_steps(
        module,
        data,
        sft["steps"],
        callbacks,
        checkpoints=checkpoints,
        checkpoint_every=sft["checkpoint_every"],
    )
    save(model, tokenizer, root / "teacher", {"sft_steps": sft["steps"]})
    shutil.rmtree(checkpoints)  # the pair is saved; the optimizer state is not needed again
    log.info("fine-tune %s: %.0f s in this attempt", root.name, time.perf_counter() - start)


def build_pair(cfg: DictConfig) -> dict[str, Path]:
    """Fine-tune ``cfg.model`` on ``cfg.data.source`` (the running-sum task) as ``cfg.sft`` says,
    evaluate both checkpoints, and return the student's and teacher's folders.

    Each step of the way is kept: an interrupted fine-tune resumes from its last checkpoint
    (``sft.checkpoint_every``), a finished one whose evaluation was interrupted is only
    evaluated, and an evaluated pair is loaded, not rebuilt."""
    sft = OmegaConf.to_container(cfg.sft, resolve=True)
    if not 0 < sft["student_steps"] < sft["steps"]:
        raise ValueError(
            f"sft.student_steps={sft['student_steps']} must lie in (0, sft.steps={sft['steps']})"
        )
    if cfg.data.source.kind != "running_sum":
        raise ValueError(f"data.source.kind={cfg.data.source.kind!r}: use data=running_sum")
    settings = {
        "model": OmegaConf.to_container(cfg.model, resolve=False),
        "sft": {k: v for k, v in sft.items() if k != "checkpoint_every"},  # not in the result
        "task": OmegaConf.to_container(cfg.data.source.task, resolve=True),
        "evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True),
    }
    root = Path(cfg.paths.cache_dir) / "pretrained_sft" / settings_key(settings)
    folders = {role: root / role for role in ROLES}
    if all(ACCURACY in _meta(folders[role]) for role in ROLES):
        log.info("pretrained pair cached at %s", root)
        return folders
    if not _meta(folders["teacher"]):
        _fine_tune(cfg, sft, root)
    evaluator = RunningSumEvaluator(
        task=cfg.data.source.task, **OmegaConf.to_container(cfg.evaluation, resolve=True)
    )
    for role in ROLES:
        start = time.perf_counter()
        saved = load_causal_lm(str(folders[role]), trainable=False)
        metrics = evaluator(saved.model, saved.tokenizer).metrics
        meta = _meta(folders[role])
        meta.update(
            metrics,
            task=settings["task"],
            settings=settings,
            eval_seconds=time.perf_counter() - start,
        )
        write_atomic(folders[role] / META_FILE, json.dumps(meta, indent=2))
        log.info("%s (%d SFT steps): %s", role, meta["sft_steps"], metrics)
    return folders


def _meta(folder: Path) -> dict[str, Any]:
    """A saved model's ``demo_model.json`` (empty when the model is not saved yet)."""
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}
