"""Greedy held-out metrics of one saved model on the running-total task (data=running_sum),
with a couple of its completions: how far a stage of conf/testbed_models_running_sum.yaml has
come (exact accuracy, and the share of item lines valid before the first error).

    python scripts/eval_running_sum_model.py MODEL_DIR [N_PROBLEMS]
"""

from __future__ import annotations

import argparse

import torch

from kat_research.eval.tasks import RunningSumEvaluator
from kat_research.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("n_problems", nargs="?", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_causal_lm(args.model_dir, trainable=False)
    result = RunningSumEvaluator(n_problems=args.n_problems, max_new_tokens=448)(
        loaded.model, loaded.tokenizer
    )
    for key, value in sorted(result.metrics.items()):
        print(f"{key}: {value:.3f}")
    for record in result.records[:2]:
        print(record.problem_id, repr(record.completion[:160]))


if __name__ == "__main__":
    main()
