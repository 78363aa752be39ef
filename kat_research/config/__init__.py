"""Composition: where conf/ lives, the resolvers its files use, and ``compose()``.

The rest of the config's jobs live beside it: ``config.checks`` (what a config must pass before
any model loads) and ``config.build`` (the objects a training config describes: the OPD module,
its schedule, loggers and callbacks). Imports neither Lightning nor the models.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from kat_research.provenance import PACKAGE_ROOT

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


# ${run_id:} in conf/hydra/default.yaml: unique per process (pid + random), the same for every
# folder one process names (a -m sweep's jobs share their sweep folder).
RUN_ID = f"{os.getpid():x}{secrets.token_hex(2)}"
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
# ${first:a,b,...}: the first value that is not null (an explicit run_dir, else the default).
OmegaConf.register_new_resolver(
    "first", lambda *values: next((v for v in values if v is not None), None), replace=True
)
# ${package_root:}: the folder holding the kat_research package (the repository of a source
# install), for files that ship with the code wherever a run is launched from.
OmegaConf.register_new_resolver("package_root", lambda: str(PACKAGE_ROOT), replace=True)


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` (Hydra's compose API; inside a
    running Hydra app, e.g. an analysis composing a train config, with that app's conf/)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))
