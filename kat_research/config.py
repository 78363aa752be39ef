"""The config leaf: where conf/ lives, how a config is composed, the checks a config must pass
before any model is loaded, and the OPD module a training config describes.

Entry points (train, evaluate, plan, reproduce, demo, the analyses) import this module; no
library subpackage does. It imports neither Lightning nor the models at import time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from kat_research.lit import OPDModule
    from kat_research.models import LoadedModel
    from kat_research.termination.base import Terminator

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# conf/hydra/launcher/submitit_*.yaml override the submitit plugin's presets of the same name on
# purpose; Hydra validates them against those and warns that it does (once per composition).
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema"
)


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def compose(
    overrides: Sequence[str] = (), config_name: str = "train", with_hydra: bool = False
) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` (Hydra's compose API);
    ``with_hydra`` keeps the ``hydra`` node (e.g. the launcher an override picks)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def _rules(terminator: Terminator) -> list[Terminator]:
    from kat_research.termination import CompositeTerminator

    if isinstance(terminator, CompositeTerminator):
        return [r for child in terminator.terminators for r in _rules(child)]
    return [terminator]


def check_runnable(cfg: DictConfig) -> Terminator:
    """Fail with a :class:`ConfigError` naming the key to change if ``cfg`` cannot run; return
    the configured termination rule. Loads no model."""
    from kat_research.termination import KATTerminator

    terminator = instantiate(cfg.method.terminator)
    cap = cfg.rollout.max_new_tokens
    for rule in _rules(terminator):
        if isinstance(rule, KATTerminator) and rule.window + rule.exempt > cap:
            raise ConfigError(
                f"KAT window {rule.window} (+ exempt {rule.exempt}) exceeds "
                f"rollout.max_new_tokens={cap}: no window could ever be evaluated. Lower "
                "method.terminator.window or raise rollout.max_new_tokens."
            )
    source = cfg.data.source
    if source.kind == "file" and not Path(source.path).exists():
        raise ConfigError(
            f"data file {source.path} does not exist: set data.source.path (or paths.data_dir)"
        )
    return terminator


def build_module(
    cfg: DictConfig,
    student: LoadedModel,
    teacher: LoadedModel,
    terminator: Terminator | None = None,
) -> OPDModule:
    """The OPD LightningModule ``cfg`` describes, around already loaded models."""
    from kat_research.lit import OPDModule

    options: dict[str, Any] = {}
    if terminator is not None:
        options["terminator"] = terminator
    return OPDModule(
        student.model,
        teacher.model,
        student.tokenizer,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        rollout=OmegaConf.to_container(cfg.rollout, resolve=True),
        seed=cfg.seed,
        **options,
    )
