"""Rebuild the long-horizon testbed's models from their stage chain (`make testbed-models`).

    python scripts/build_testbed_models.py [--install] [--archive STAGE ...] [--threads N]
        [--config-name NAME] [override ...]

``--config-name testbed_models_running_sum`` builds the running-total task's chain instead.

Trains every stage of conf/testbed_models.yaml in order (cached under paths.cache_dir, so a
rerun continues where it stopped), then prints each shipped model's held-out greedy accuracy
beside the committed one's (assets/testbed/<name>/demo_model.json) and how far their weights
differ (0 when the rebuild is bitwise identical). --install replaces the
committed folders (<assets_dir>/<install_dir>/<name>) with the rebuilt ones; --archive copies
finished stages to the chain's archive_dir, from which a fresh clone continues a chain that
takes longer than one sitting.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from kat_research.building import demo_model_info
from kat_research.building.stages import archive, build_chain, install, weight_difference
from kat_research.config import compose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="replace assets/testbed/*")
    parser.add_argument(
        "--config-name", default="testbed_models", help="the chain's config in conf/"
    )
    parser.add_argument(
        "--archive",
        nargs="+",
        default=[],
        metavar="STAGE",
        help="copy these finished stages to the chain's archive_dir (committed; a fresh clone "
        "continues the chain from them)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: the recorded step times)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of that config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = compose(args.overrides, config_name=args.config_name)
    folders = build_chain(cfg, also=args.archive)
    metric = f"{cfg.data.source.kind}/accuracy"
    print(
        "| model | stage | rebuilt accuracy | committed accuracy | weights: max abs difference |"
        "\n|---|---|---|---|---|"
    )
    for name, stage in cfg.shipped.items():
        rebuilt = demo_model_info(folders[stage])[metric]
        committed_dir = Path(cfg.paths.assets_dir) / cfg.install_dir / name
        if committed_dir.is_dir():
            committed = f"{demo_model_info(committed_dir)[metric]:.3f}"
            difference = weight_difference(folders[stage], committed_dir)
            weights = "0 (bitwise equal)" if difference == 0 else f"{difference:.3g}"
        else:
            committed = weights = "none committed"
        print(f"| {name} | {stage} | {rebuilt:.3f} | {committed} | {weights} |")
    if args.archive:
        archive(folders, args.archive, cfg.archive_dir)
    if args.install:
        install(folders, dict(cfg.shipped), Path(cfg.paths.assets_dir) / cfg.install_dir)


if __name__ == "__main__":
    main()
