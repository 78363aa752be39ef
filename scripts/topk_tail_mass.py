"""The teacher's probability mass outside its top-K on the student's rollouts (issue 23, item 5),
so that a Top-K ablation can pick K below the teacher's support on the task.

    python scripts/topk_tail_mass.py [--rollouts 64] [--batch 16] [--ks 1 2 4 8 16 32 64]
        [--out results/topk_tail_mass.md] [--threads 1] [hydra override ...]

Samples ``--rollouts`` rollouts of the configured student (the training config and its
overrides, e.g. ``model/student=testbed_large``; default: the testbed pair of ``scale=tiny``)
on the run's training prompts, the teacher scoring every
token, and prints per K the distribution over generated positions of the teacher's mass outside
its top-K, and how many tokens cover 90/99/99.9% of it. With ``--out`` writes that as Markdown
with the command and commit.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from kat_research import config
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches, sample_rollouts
from kat_research.analysis.runs import run_module
from kat_research.analysis.topk_mass import (
    support_size,
    support_table,
    tail_mass,
    tail_table,
    teacher_logits,
)
from kat_research.provenance import code_commit

COVERAGES = (0.9, 0.99, 0.999)
ROOT = Path(__file__).resolve().parent.parent


def shown(path: str) -> str:
    """A model's path relative to the repository when it lies inside it."""
    return str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config.compose(["method=opd", *overrides])
    module = run_module(cfg, torch.device("cpu"))
    spec = RolloutSpec(n=args.rollouts, batch_size=args.batch, seed=args.seed)
    tails, supports = [], {c: [] for c in COVERAGES}
    for i, rollout in enumerate(
        sample_rollouts(
            module, prompt_batches(cfg, module.tokenizer, spec), spec, teacher_keep="hidden"
        )
    ):
        logits = teacher_logits(module, rollout)
        tails.append(tail_mass(logits, args.ks))
        for c in COVERAGES:
            supports[c].append(support_size(logits, c))
        print(f"batch {i + 1}: {logits.shape[0]} positions", file=sys.stderr)
    tail = torch.cat(tails)
    vocab = module.teacher.get_output_embeddings().weight.shape[0]
    command = "python scripts/topk_tail_mass.py " + shlex.join(argv or sys.argv[1:])
    text = "\n".join(
        [
            "# The teacher's probability mass outside its top-K on the student's rollouts",
            "",
            f"{args.rollouts} rollouts of `{shown(module.student.name_or_path)}` scored by "
            f"`{shown(module.teacher.name_or_path)}` (vocabulary {vocab}), {tail.shape[0]} "
            "generated positions; mass outside the top-K per position:",
            "",
            tail_table(tail, args.ks).to_markdown(floatfmt=".3g"),
            "",
            "Tokens needed to cover a share of the teacher's mass, per position:",
            "",
            support_table({c: torch.cat(s) for c, s in supports.items()}).to_markdown(
                floatfmt=".4g"
            ),
            "",
            f"command: `{command}`; code: commit {code_commit()}",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
