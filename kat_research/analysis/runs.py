"""A finished training job as analyses see it: its config, checkpoints, models and KAT buffer.

A job folder holds ``.hydra/config.yaml`` (jobs launched through Hydra) or ``csv/hparams.yaml``
(the resolved config every job logs), and ``checkpoints/stepNNNNNN.ckpt``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.config.build import build_module
from kat_research.lit import OPDModule
from kat_research.models import LoadedModel

CONFIG_FILES = (".hydra/config.yaml", "csv/hparams.yaml")
_STEP_FILE = re.compile(r"step(\d+)\.ckpt")
INIT = "init"  # checkpoint spec: the student of the run's config, before any training


@dataclass(frozen=True)
class TrainingRun:
    """A training job folder, its config and its step checkpoints (step -> path)."""

    path: Path
    cfg: DictConfig
    checkpoints: dict[int, Path]

    @property
    def final_step(self) -> int:
        if not self.checkpoints:
            raise FileNotFoundError(
                f"{self.path}/checkpoints holds no stepNNNNNN.ckpt: train with "
                "callbacks.model_checkpoint.every_n_train_steps set"
            )
        return max(self.checkpoints)

    def checkpoint(self, spec: float | str) -> tuple[str, Path | None]:
        """Resolve a checkpoint spec to (label, path); path None for ``init``.

        ``spec``: ``init``; a fraction of the final step (the latest checkpoint at or before
        it, else the earliest one: ``0.1`` = within the first 10% of training, ``1.0`` = the
        last); or a checkpoint path (relative paths resolve against the job folder).
        """
        if spec == INIT:
            return "step0", None
        if isinstance(spec, str):
            path = Path(spec) if Path(spec).is_absolute() else self.path / spec
            if not path.exists():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            return path.stem, path
        if not 0 < spec <= 1:
            raise ValueError(f"a checkpoint fraction must be in (0, 1], got {spec}")
        limit = spec * self.final_step
        steps = [s for s in self.checkpoints if s <= limit] or [min(self.checkpoints)]
        step = max(steps)
        return f"step{step}", self.checkpoints[step]


def load_run(path: str | Path) -> TrainingRun:
    """Read a job folder's config and list its step checkpoints."""
    path = Path(path).resolve()
    config = next((path / f for f in CONFIG_FILES if (path / f).exists()), None)
    if config is None:
        raise FileNotFoundError(
            f"{path} is not a training job folder: no {' or '.join(CONFIG_FILES)}"
        )
    cfg = OmegaConf.load(config)
    cfg.paths.output_dir = str(path)
    checkpoints = {
        int(m.group(1)): p
        for p in (path / "checkpoints").glob("step*.ckpt")
        if (m := _STEP_FILE.fullmatch(p.name))
    }
    return TrainingRun(path, cfg, checkpoints)


def run_module(cfg: DictConfig, device: torch.device) -> OPDModule:
    """The run's OPD module (student as configured, i.e. before training; frozen teacher)."""
    student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    module = build_module(cfg, student, teacher)
    module.to(device)
    module.teacher.to(device)
    return module


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint, memory-mapped (only what is used is read)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def initial_state(module: OPDModule) -> dict[str, torch.Tensor]:
    """A CPU copy of the student's weights as configured (call before loading a checkpoint)."""
    return {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}


def load_student(
    module: OPDModule, path: Path | None, init: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """Put the checkpoint's student weights (``init`` for path None) into ``module``; return
    the checkpoint (None for ``init``)."""
    checkpoint = None if path is None else read_checkpoint(path)
    module.student.load_state_dict(init if checkpoint is None else student_state(checkpoint))
    return checkpoint


def student_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint, keyed like ``student.state_dict()``."""
    prefix = "student."
    return {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }


def checkpoint_file(path: str | Path, key: str = "student_checkpoint") -> Path:
    """``path`` when it is a file, else an error naming the setting ``key`` and what it wants
    (checked before any model loads)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{key}={path} does not exist: point it at a training run's checkpoint "
            "(<run>/checkpoints/*.ckpt)"
        )
    return Path(path)


def with_checkpoint_student(student: LoadedModel, path: str | Path) -> LoadedModel:
    """``student`` holding the student weights of the training checkpoint ``path``, and named
    after it."""
    student.model.load_state_dict(student_state(read_checkpoint(checkpoint_file(path))))
    return replace(student, name=str(path))


def kat_buffer(state: Any) -> torch.Tensor | None:
    """The KAT buffer inside a checkpoint's terminator state (also inside a composition)."""
    if not isinstance(state, dict):
        return None
    if "buffer" in state:
        return torch.as_tensor(state["buffer"], dtype=torch.float64)
    found = (kat_buffer(child) for child in state.values())
    return next((b for b in found if b is not None), None)
