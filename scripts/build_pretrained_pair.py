"""Fine-tune the real pretrained pair on the running-total task (issue 20, item 4) and print
both models' held-out accuracy: conf/pretrained_pair_running_sum.yaml.

    python scripts/build_pretrained_pair.py [override ...]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from kat_research.building.pretrained_sft import ROLES, NoStudentInBand, build_pair
from kat_research.building.testbed import META_FILE
from kat_research.config import compose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = compose(args.overrides, config_name="pretrained_pair_running_sum")
    torch.set_num_threads(cfg.threads)
    try:
        folders = build_pair(cfg)
    except NoStudentInBand as error:  # the teacher is saved; the message says what to change
        raise SystemExit(f"error: {error}") from None
    print("| model | SFT steps | held-out accuracy | folder |\n|---|---|---|---|")
    for role in ROLES:
        meta = json.loads((folders[role] / META_FILE).read_text())
        accuracy = meta["running_sum/accuracy"]
        print(f"| {role} | {meta['sft_steps']} | {accuracy:.3f} | {folders[role]} |")


if __name__ == "__main__":
    main()
