"""`python -m kat_research.train [overrides]` (console script `kat-train`): one OPD job, or a
sweep with `-m`, driven by the Hydra config in conf/ (entry config conf/train.yaml).

The job itself is :func:`kat_research.training.train`.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kat_research.config import CONFIG_DIR
from kat_research.training import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (single run or `-m` multirun)."""
    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


if __name__ == "__main__":
    main()
