"""Tiny Qwen3 models trained by SFT on a built-in task: the stages of the testbed's models
(``collatz``, :mod:`kat_research.building.testbed`) and the ``model/*/demo`` presets'
arithmetic models (``synthetic``).

A ``demo_model`` is trained on first use and cached under
``<cache_dir>/demo/<role>-<settings hash>``; later runs (and every job of a sweep) load the
cached copy through the ordinary loader.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from kat_research.building import testbed
from kat_research.building.sft import SFTModule
from kat_research.building.testbed import META_FILE, TaskSetup
from kat_research.data import ArithmeticTaskConfig, PromptDataModule, SourceSpec
from kat_research.eval.tasks import SyntheticEvaluator
from kat_research.lit import warmup_cosine
from kat_research.lit.checkpoint_hooks import WeightsDigest
from kat_research.lit.eval_callback import EvalCallback
from kat_research.lit.resume import newest_resumable
from kat_research.lit.step_log import StepLog
from kat_research.models import LoadedModel, build_char_tokenizer, build_tiny_qwen3, load_causal_lm
from kat_research.models.cache import publish_folder
from kat_research.models.tiny import COMPACT_CHAT_TEMPLATE

log = logging.getLogger(__name__)
# Part of the cache key: bump it when the demo tokenizer changes (alphabet, chat template).
TOKENIZER_VERSION = "char-compact-1"


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def settings_key(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings a cached model was trained with."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def fit_steps(
    module: L.LightningModule,
    data: L.LightningDataModule,
    steps: int,
    callbacks: list,
    accelerator: str = "auto",
    checkpoints: Path | None = None,
    checkpoint_every: int = 0,
) -> tuple[L.Trainer, int]:
    """Train ``module`` for ``steps`` AdamW steps on ``data`` (no logger); return the trainer
    and the step this attempt started from.

    With ``checkpoints`` set, ``last.ckpt`` there is rewritten every ``checkpoint_every`` steps
    (with its weights' checksum) and the fit continues from the newest resumable checkpoint in
    that folder, so an interrupted fine-tune loses at most ``checkpoint_every`` steps (``data``
    must serve its batches by the trainer's step, as ``ExampleDataModule`` does); without it,
    nothing is saved.
    """
    resume_from, start_step = None, 0
    if checkpoints is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every}: save every >= 1 steps")
        callbacks = [
            *callbacks,
            WeightsDigest(),
            ModelCheckpoint(
                dirpath=checkpoints,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=checkpoint_every,
            ),
        ]
        found = newest_resumable(checkpoints, remedy=f"Delete {checkpoints} to start over.")
        if found is not None:
            resume_from, start_step = found
            log.info("resuming from %s (step %d of %d)", resume_from, start_step, steps)
    trainer = L.Trainer(
        accelerator=accelerator,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    return trainer, start_step


def _sft_module(model: Any, tokenizer: Any, sft: dict[str, Any]) -> SFTModule:
    return SFTModule(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=sft["lr"], weight_decay=0.0),
        scheduler=functools.partial(
            warmup_cosine, warmup_steps=sft["warmup_steps"], min_lr_ratio=sft["min_lr_ratio"]
        ),
        tokenizer=tokenizer,
    )


def _arithmetic_setup(tokenizer: Any, sft: dict[str, Any], task: dict[str, Any]) -> TaskSetup:
    data = PromptDataModule(
        source=SourceSpec(
            kind="synthetic",
            n=sft["n_problems"],
            seed=sft["seed"],
            task=ArithmeticTaskConfig(**task),
        ),
        instruction="",
        mode="sft",
        batch_size=sft["batch_size"],
        max_length=96,
        val_size=0,
        seed=sft["seed"],
    )
    data.attach_tokenizer(tokenizer)
    return TaskSetup(data, SyntheticEvaluator(n_problems=256, task=task), None)


TASK_SETUPS = {
    "synthetic": _arithmetic_setup,
    "collatz": testbed.collatz_setup,
    "running_sum": testbed.running_sum_setup,
}


def train_sft_model(
    path: Path,
    *,
    architecture: dict[str, Any],
    sft: dict[str, Any],
    task: dict[str, Any],
    kind: str = "synthetic",
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """SFT a fresh tiny Qwen3 on worked solutions of a built-in task; save it at ``path``.

    ``kind`` names the task (``data.source.kind``: ``synthetic`` arithmetic or the long
    ``collatz`` task, whose models are first pre-trained on copy-rich documents for
    ``sft.pretrain_steps`` steps; see ``building.testbed``). Held-out greedy accuracy is measured
    every ``sft.eval_every`` steps (0: at the end only); with ``sft.target_accuracy`` set,
    training stops at the first check that reaches it. With ``sft.init_from`` (optional) the
    weights start from that saved model instead of a random init. With ``checkpoint_every`` > 0
    the SFT fit checkpoints in ``<path>.checkpoints`` and a rerun continues it from there
    (a long stage survives an interrupted session; the pre-training phase restarts); held-out
    checks made before the interruption are not kept, so ``target_accuracy`` acts from the
    resumed step on.
    """
    if kind not in TASK_SETUPS:
        raise ValueError(
            f"no built-in models for data.source.kind={kind!r}: one of {list(TASK_SETUPS)}"
        )
    start = time.perf_counter()
    L.seed_everything(sft["seed"], workers=True)
    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    init_from = sft.get("init_from")  # a saved model to continue from (same architecture)
    if init_from:
        model = load_causal_lm(str(init_from), trainable=True).model
    else:
        model = build_tiny_qwen3(tokenizer, **architecture, seed=sft["seed"])
    setup = TASK_SETUPS[kind](tokenizer, sft, task)
    pretrain_seconds = 0.0
    if setup.pretrain is not None:
        fit_steps(
            _sft_module(model, tokenizer, sft),
            setup.pretrain,
            sft["pretrain_steps"],
            [StepLog(f"pretrain {path.name}", every_n_steps=250, metrics=("sft/loss",))],
        )
        pretrain_seconds = time.perf_counter() - start
    metric = f"{setup.evaluator.name}/accuracy"
    target = sft["target_accuracy"]
    accuracy_check = EvalCallback(
        setup.evaluator,
        every_n_steps=sft["eval_every"],
        at_start=False,
        stop_when={metric: target} if target is not None else None,
    )
    checkpoints = path.with_name(f"{path.name}.checkpoints")
    trainer, resumed_from = fit_steps(
        _sft_module(model, tokenizer, sft),
        setup.data,
        sft["steps"],
        [StepLog(f"sft {path.name}", every_n_steps=50, metrics=("sft/loss",)), accuracy_check],
        checkpoints=checkpoints if checkpoint_every > 0 else None,
        checkpoint_every=checkpoint_every,
    )
    seconds = time.perf_counter() - start
    accuracy = accuracy_check.results[trainer.global_step]
    log.info(
        "sft %s: held-out accuracy by step %s",
        path.name,
        {step: round(m[metric], 3) for step, m in sorted(accuracy_check.results.items())},
    )
    meta = {
        "sft_seconds": seconds,  # this attempt's (from resumed_from_step on)
        "resumed_from_step": resumed_from,
        "sft_steps": trainer.global_step,
        **accuracy,
        "architecture": architecture,
        "sft": sft,
        "kind": kind,
        "task": task,
    }
    if setup.pretrain is not None:
        meta["pretrain_seconds"] = pretrain_seconds
    save_model_folder(model, tokenizer, path, meta)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved; its fit is not needed
    return meta


def save_model_folder(model: Any, tokenizer: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Write a model, its tokenizer and ``meta`` (as META_FILE) to ``folder`` atomically: a
    half-written folder is never mistaken for a cached one."""
    with publish_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


# Task settings added after models were cached, with the value they had implicitly before:
# at that value a setting stays out of the key, so the models trained before keep their keys
# (the committed stage archives among them).
LATER_TASK_KEYS = {"sum_first": True}


def demo_model_path(
    role: str,
    cache_dir: str | Path,
    architecture: dict[str, Any] | DictConfig,
    sft: dict[str, Any] | DictConfig,
    task: dict[str, Any] | DictConfig,
    kind: str = "synthetic",
) -> Path:
    """Where ``demo_model`` caches the model these settings train:
    ``<cache_dir>/demo/<role>-<settings hash>``. A parent model (``sft.init_from``) enters the
    hash by its folder's name, itself such a hash, so the key does not depend on where the cache
    lies (a moved cache or a committed stage archive keeps its keys)."""
    sft = _plain(sft)
    if sft.get("init_from"):
        sft = {**sft, "init_from": Path(sft["init_from"]).name}
    task = {k: v for k, v in _plain(task).items() if LATER_TASK_KEYS.get(k, ...) != v}
    settings = {"architecture": _plain(architecture), "sft": sft, "task": task}
    # the arithmetic models keep the cache key they had before other kinds existed
    extra = {} if kind == "synthetic" else {"kind": kind}
    key = settings_key({**settings, "tokenizer": TOKENIZER_VERSION, **extra})
    return Path(cache_dir) / "demo" / f"{role}-{key}"


def demo_model(
    role: str,
    cache_dir: str,
    architecture: dict[str, Any] | DictConfig,
    sft: dict[str, Any] | DictConfig,
    task: dict[str, Any] | DictConfig,
    trainable: bool = True,
    kind: str = "synthetic",
    checkpoint_every: int = 0,
) -> LoadedModel:
    """Load the demo ``role`` model (teacher/student), training and caching it on first use.

    ``kind``: the built-in task it is trained on (``data.source.kind``); ``checkpoint_every``:
    see :func:`train_sft_model` (not part of the cache key)."""
    settings = {"architecture": _plain(architecture), "sft": _plain(sft), "task": _plain(task)}
    path = demo_model_path(role, cache_dir, **settings, kind=kind)
    if not (path / "config.json").exists():
        log.info("training the demo %s (first run; cached at %s)", role, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = train_sft_model(path, **settings, kind=kind, checkpoint_every=checkpoint_every)
        log.info(
            "demo %s: %.0f s of SFT, held-out accuracy %.1f%%",
            role,
            meta["sft_seconds"],
            100 * meta[f"{kind}/accuracy"],  # evaluators are named after their task
        )
    return load_causal_lm(str(path), trainable=trainable)


def demo_model_info(model_dir: str | Path) -> dict[str, Any]:
    """The metadata saved with a cached demo model (SFT time and accuracy)."""
    return json.loads((Path(model_dir) / META_FILE).read_text())
