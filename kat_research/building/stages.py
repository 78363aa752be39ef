"""Rebuild the testbed's committed models from their stage chain (``conf/testbed_models.yaml``).

Each stage is a cached ``demo_model`` (pre-training and SFT on ``data.source.kind``, the
collatz or running-sum task); a stage with
``from`` continues its parent's weights. ``install`` copies the shipped stages into
``<assets_dir>/<install_dir>/<name>`` (``testbed/``: the folders the ``model/*/testbed*``
presets load).

A chain longer than one session keeps its finished stages in git: ``archive`` copies stages to
``archive_dir`` (committed, named like the cache: ``<role>-<settings hash>``), and
``build_chain`` takes a stage from there when the cache lacks it, so a fresh clone continues at
the first stage neither holds; only the latest finished stage of each branch needs archiving,
since a stage's key names its parent without its weights.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from kat_research.building.models import demo_model, demo_model_info, demo_model_path
from kat_research.models.cache import publish_folder

log = logging.getLogger(__name__)


def stage_settings(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Each stage's role, architecture, parent, full SFT settings and task settings (the data
    preset's ``data.source.task`` with the stage's ``task`` overrides), checked for order."""
    base = OmegaConf.to_container(cfg.sft, resolve=True)
    base_task = OmegaConf.to_container(cfg.data.source.task, resolve=True)
    stages: dict[str, dict[str, Any]] = {}
    for name, stage in cfg.stages.items():
        parent = stage.get("from")
        if parent is not None and parent not in stages:
            raise ValueError(
                f"testbed_models.stages.{name}.from={parent!r}: the parent must be a stage "
                f"listed before it (listed so far: {list(stages)})"
            )
        if stage.architecture not in cfg.architectures:
            raise ValueError(
                f"testbed_models.stages.{name}.architecture={stage.architecture!r}: one of "
                f"{list(cfg.architectures)}"
            )
        overrides = OmegaConf.to_container(stage.get("sft") or OmegaConf.create(), resolve=True)
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ValueError(f"testbed_models.stages.{name}.sft: unknown keys {unknown}")
        task = OmegaConf.to_container(stage.get("task") or OmegaConf.create(), resolve=True)
        unknown = sorted(set(task) - set(base_task))
        if unknown:
            raise ValueError(f"testbed_models.stages.{name}.task: unknown keys {unknown}")
        stages[name] = {
            "role": stage.role,
            "architecture": OmegaConf.to_container(cfg.architectures[stage.architecture]),
            "from": parent,
            "sft": {**base, **overrides},
            "task": {**base_task, **task},
        }
    missing = sorted(set(cfg.shipped.values()) - set(stages))
    if missing:
        raise ValueError(f"testbed_models.shipped names stages that do not exist: {missing}")
    return stages


def _model_arguments(
    cfg: DictConfig, stages: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Each stage's ``demo_model`` arguments and cache folder, computed before anything trains
    (a parent enters a stage's key by its folder's name)."""
    arguments: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}
    for name, stage in stages.items():
        parent = stage["from"]
        arguments[name] = {
            "role": stage["role"],
            "cache_dir": cfg.paths.cache_dir,
            "architecture": stage["architecture"],
            "sft": {**stage["sft"], "init_from": str(folders[parent]) if parent else None},
            "task": stage["task"],
            "kind": cfg.data.source.kind,
        }
        folders[name] = demo_model_path(**arguments[name])
    return arguments, folders


def build_chain(cfg: DictConfig, also: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """Bring the shipped stages (and ``also``) into the cache and return their folders: each
    is loaded from the cache, copied from ``cfg.archive_dir``, or trained, in chain order, after
    its missing ancestors; an ancestor is not needed once its descendant exists."""
    stages = stage_settings(cfg)
    unknown = sorted(set(also) - set(stages))
    if unknown:
        raise ValueError(f"the chain has no stages {unknown} (stages: {list(stages)})")
    arguments, folders = _model_arguments(cfg, stages)
    archived = {name: Path(cfg.archive_dir) / folder.name for name, folder in folders.items()}

    def present(name: str) -> bool:
        return any((p / "config.json").is_file() for p in (folders[name], archived[name]))

    needed, todo = set(), [*cfg.shipped.values(), *also]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            if not present(name) and stages[name]["from"] is not None:
                todo.append(stages[name]["from"])
    for name in stages:
        if name not in needed:
            continue
        if not (folders[name] / "config.json").is_file() and present(name):
            log.info("stage %s: taken from the archive %s", name, archived[name])
            with publish_folder(folders[name]) as tmp:
                shutil.copytree(archived[name], tmp, dirs_exist_ok=True)
        model = demo_model(
            **arguments[name], trainable=False, checkpoint_every=cfg.checkpoint_every
        )
        accuracy = demo_model_info(model.name)[f"{cfg.data.source.kind}/accuracy"]
        log.info("stage %s: held-out greedy accuracy %.3f (%s)", name, accuracy, model.name)
    return {name: folders[name] for name in stages if name in needed}


def _replace_folder(source: Path, target: Path) -> None:
    """Copy the folder ``source`` to ``target``, replacing what is there."""
    if target.exists():
        shutil.rmtree(target)
    with publish_folder(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def install(folders: dict[str, Path], shipped: dict[str, str], folder: str | Path) -> None:
    """Copy each shipped stage to ``<folder>/<name>`` (``<assets_dir>/<install_dir>``),
    replacing what is there."""
    for name, stage in shipped.items():
        target = Path(folder) / name
        _replace_folder(folders[stage], target)
        log.info("installed %s <- stage %s", target, stage)


def archive(folders: dict[str, Path], names: list[str], folder: str | Path) -> None:
    """Copy the finished stages ``names`` into ``folder`` (the chain's ``archive_dir``) under
    their cache names, replacing what is there."""
    unknown = sorted(set(names) - set(folders))
    if unknown:
        raise ValueError(f"--archive names stages not built: {unknown}")
    for name in names:
        target = Path(folder) / folders[name].name
        _replace_folder(folders[name], target)
        log.info("archived stage %s at %s", name, target)


def weight_difference(a: str | Path, b: str | Path) -> float:
    """Largest absolute difference between two model folders' weights (``model.safetensors``);
    0.0 when bitwise equal, inf when their tensor names or shapes differ."""
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return float("inf")
    return max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa), default=0.0)
