"""A competent real pretrained pair for a testbed task (issue 20, item 4): SmolLM2-135M-Instruct
fully fine-tuned on the task's worked solutions.

One SFT run makes both models, so teacher and student share tokenizer, chat template and
architecture: the teacher is the model after ``sft.steps`` steps; the run also saves a snapshot
every ``sft.snapshot_every`` steps, and the student is the earliest snapshot whose held-out
accuracy lies in ``sft.student_band`` (an earlier, weaker point of the same fine-tune; which
step that is cannot be known before the run). Both are saved under
``<cache_dir>/pretrained_sft/<settings hash>/{student,teacher}`` with a ``demo_model.json``
holding their held-out accuracy (sampled as ``evaluation`` says) and the settings; a finished
pair is loaded from there, not retrained.

The fine-tune is long on a CPU (hours), so every stage resumes: the fine-tune from its last
checkpoint (``sft.checkpoint_every``), the evaluations from the last evaluated model. Rerunning
the same command continues, so a fine-tune can be spread over several sessions.
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

from kat_research.building.models import fit_steps, save_model_folder, settings_key
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
SNAPSHOTS = "snapshots"  # ... and the student's candidates, until one is chosen


class NoStudentInBand(RuntimeError):
    """No snapshot's held-out accuracy lies in ``sft.student_band``; the message lists them."""


class Snapshots(L.Callback):
    """Saves the model and tokenizer to ``folder/step<k>`` every ``every`` optimizer steps
    before ``steps`` (a snapshot already saved by an earlier attempt is kept)."""

    def __init__(self, every: int, steps: int, folder: Path) -> None:
        self.every, self.steps, self.folder = every, steps, folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step < self.steps:
            path = snapshot_folder(self.folder, step)
            if not path.exists():
                save_model_folder(pl_module.model, pl_module.tokenizer, path, {"sft_steps": step})


def snapshot_folder(folder: Path, step: int) -> Path:
    return folder / f"step{step:06d}"


def _fine_tune(cfg: DictConfig, sft: dict[str, Any], root: Path) -> None:
    """Run the fine-tune, checkpointed under ``root/checkpoints`` (resumed from there when an
    earlier attempt was interrupted); save snapshots on the way and the teacher at the end."""
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
        Snapshots(sft["snapshot_every"], sft["steps"], root / SNAPSHOTS),
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
    save_model_folder(model, tokenizer, root / "teacher", {"sft_steps": sft["steps"]})
    shutil.rmtree(checkpoints)  # the pair is saved; the optimizer state is not needed again
    log.info("fine-tune %s: %.0f s in this attempt", root.name, time.perf_counter() - start)


def check_settings(sft: dict[str, Any]) -> None:
    """Refuse fine-tune settings that cannot give a student; the message names the key."""
    if not 0 < sft["snapshot_every"] < sft["steps"]:
        raise ValueError(
            f"sft.snapshot_every={sft['snapshot_every']} must lie in (0, sft.steps={sft['steps']}):"
            " the student is one of the snapshots saved before the teacher's last step"
        )
    low, high = sft["student_band"]
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"sft.student_band={[low, high]} must be [low, high] within [0, 1]")


def build_pair(cfg: DictConfig) -> dict[str, Path]:
    """Fine-tune ``cfg.model`` on ``cfg.data.source`` (the running-sum task) as ``cfg.sft`` says,
    evaluate the teacher, choose the student among the snapshots, and return both folders.

    Each stage is kept: an interrupted fine-tune resumes from its last checkpoint, an evaluation
    continues with the models not yet evaluated, and an evaluated pair is loaded, not rebuilt.
    Raises :class:`NoStudentInBand` naming every snapshot's accuracy when none lies in the band."""
    sft = OmegaConf.to_container(cfg.sft, resolve=True)
    check_settings(sft)
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
    teacher = _evaluated(folders["teacher"], evaluator, settings)
    log.info("teacher (%d SFT steps): %s", teacher["sft_steps"], teacher[ACCURACY])
    if not _meta(folders["student"]):
        _choose_student(root, evaluator, settings, sft["student_band"])
    return folders


def _choose_student(
    root: Path, evaluator: RunningSumEvaluator, settings: dict[str, Any], band: list[float]
) -> None:
    """Evaluate the snapshots in step order until one lies in ``band``; publish it as the
    student (its meta lists every snapshot evaluated) and drop the snapshots."""
    low, high = band
    tried: dict[int, float] = {}
    for folder in sorted((root / SNAPSHOTS).glob("step*")):
        meta = _evaluated(folder, evaluator, settings)
        tried[meta["sft_steps"]] = meta[ACCURACY]
        log.info("snapshot at step %d: accuracy %.3f", meta["sft_steps"], meta[ACCURACY])
        if low <= meta[ACCURACY] <= high:
            meta["student_choice"] = {"band": band, "snapshots_evaluated": tried}
            with publish_folder(root / "student") as tmp:
                shutil.copytree(folder, tmp, dirs_exist_ok=True)
                write_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
            shutil.rmtree(root / SNAPSHOTS)
            return
    raise NoStudentInBand(
        f"no snapshot of {root} has held-out accuracy in sft.student_band={band} "
        f"(step: accuracy {tried}); the teacher is saved. Set sft.snapshot_every smaller to get "
        "snapshots between these, or state another band."
    )


def _evaluated(
    folder: Path, evaluator: RunningSumEvaluator, settings: dict[str, Any]
) -> dict[str, Any]:
    """The model's meta, with its held-out metrics added (and saved) unless already there."""
    meta = _meta(folder)
    if ACCURACY in meta:
        return meta
    start = time.perf_counter()
    saved = load_causal_lm(str(folder), trainable=False)
    meta.update(
        evaluator(saved.model, saved.tokenizer).metrics,
        task=settings["task"],
        settings=settings,
        eval_seconds=time.perf_counter() - start,
    )
    write_atomic(folder / META_FILE, json.dumps(meta, indent=2))
    return meta


def _meta(folder: Path) -> dict[str, Any]:
    """A saved model's ``demo_model.json`` (empty when the model is not saved yet)."""
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}
