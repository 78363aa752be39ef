"""Build (first use) and cache one testbed model from its preset, print its folder and metadata.

    python scripts/testbed_models.py teacher|student [hydra override ...]

E.g. continue SFT from a cached model (the chain the trap-check probes used):
    python scripts/testbed_models.py teacher +model.teacher.sft.init_from=<folder> \\
        model.teacher.sft.pretrain_steps=0 model.teacher.sft.steps=800 model.teacher.sft.lr=1e-3
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from hydra.utils import instantiate

from kat_research.config import compose
from kat_research.demo.models import demo_model_info

PRESETS = ["data=collatz", "model/teacher=testbed", "model/student=testbed"]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("teacher", "student"):
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    role = sys.argv[1]
    model = instantiate(compose([*PRESETS, *sys.argv[2:]]).model[role])
    info = {k: v for k, v in demo_model_info(model.name).items() if k != "architecture"}
    print(model.name)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
