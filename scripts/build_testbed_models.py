"""Rebuild the long-horizon testbed's models from their stage chain (`make testbed-models`).

    python scripts/build_testbed_models.py [--install] [hydra override ...]

Trains every stage of conf/testbed_models.yaml in order (cached under paths.cache_dir, so a
rerun continues where it stopped), then prints each shipped model's held-out greedy accuracy
beside the committed one's (assets/testbed/<name>/demo_model.json) and how far their weights
differ (0 when the rebuild is bitwise identical). --install replaces the
committed folders with the rebuilt ones.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from kat_research.building import demo_model_info
from kat_research.building.stages import build_chain, install, weight_difference
from kat_research.config import compose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="replace assets/testbed/*")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of testbed_models.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = compose(args.overrides, config_name="testbed_models")
    folders = build_chain(cfg)
    print(
        "| model | stage | rebuilt accuracy | committed accuracy | weights: max abs difference |"
        "\n|---|---|---|---|---|"
    )
    for name, stage in cfg.shipped.items():
        rebuilt = demo_model_info(folders[stage])["collatz/accuracy"]
        committed_dir = Path(cfg.paths.assets_dir) / "testbed" / name
        if committed_dir.is_dir():
            committed = f"{demo_model_info(committed_dir)['collatz/accuracy']:.3f}"
            difference = weight_difference(folders[stage], committed_dir)
            weights = "0 (bitwise equal)" if difference == 0 else f"{difference:.3g}"
        else:
            committed = weights = "none committed"
        print(f"| {name} | {stage} | {rebuilt:.3f} | {committed} | {weights} |")
    if args.install:
        install(folders, dict(cfg.shipped), cfg.paths.assets_dir)


if __name__ == "__main__":
    main()
