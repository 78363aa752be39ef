"""`python -m kat_research.train [overrides]` (console script `kat-train`): one OPD job, or a
sweep with `-m`, driven by the Hydra config in conf/ (entry config conf/train.yaml).

The job itself is :func:`kat_research.training.job.train`. A config that cannot run, a run folder
that is not this run's and a broken checkpoint end the command with one line saying what to
change (exit status 2); ``verbose=true`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kat_research.config import CONFIG_DIR, ConfigError
from kat_research.config.checks import check_overrides
from kat_research.lit.resume import CheckpointError
from kat_research.training.folder import RunFolderError
from kat_research.training.job import train

USER_ERRORS = (ConfigError, RunFolderError, CheckpointError)  # what the user can fix


def fail(error: Exception, traceback_hint: bool = True) -> None:
    """End the command with ``error``'s message, without a traceback."""
    hint = "\n(verbose=true shows the traceback)" if traceback_hint else ""
    print(f"error: {error}{hint}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (single run or `-m` multirun)."""
    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg)
    except USER_ERRORS as error:
        if cfg.get("verbose", False):
            raise
        fail(error)


def cli() -> None:
    """Check the overrides Hydra would reject with a traceback, then run :func:`main`."""
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as error:
        fail(error, traceback_hint=False)  # before Hydra: there is no traceback to show
    main()


if __name__ == "__main__":
    cli()
