"""Held-out metrics (greedy, or avg@k sampled) of one saved model on the running-total task
(data=running_sum), with a per-line diagnosis and a few of its completions: how far a stage of
conf/testbed_models_running_sum.yaml has come.

    python scripts/eval_running_sum_model.py MODEL_DIR [N_PROBLEMS] [--samples K --temperature T]

Greedy by default; ``--samples 8 --temperature 0.6`` gives the targets' metric (avg@8 at T=0.6:
``running_sum/accuracy`` is then the mean over every sample).

Besides exact accuracy and the share of item lines valid before the first error, it prints,
over every line the model wrote in place of an item line: the share holding the right item for
its position (the copy from the prompt), the share whose sum is right for its own operands (the
arithmetic, whatever was copied), and the share of first item lines that add the first item to
the start (after the start's line, when the task writes one). The task settings come from the
model's demo_model.json (``task``; RunningSumConfig's defaults, no start line, for a stage
saved before the file recorded them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kat_research.data import running_sum as rs
from kat_research.eval.tasks import RunningSumEvaluator
from kat_research.models import load_causal_lm


def line_diagnosis(
    problems: list[str], completions: list[str], start_line: bool = False
) -> dict[str, float]:
    """Shares of item lines with the right item, with a right sum, and of right first item
    lines (``start_line``: the completions open with the start's line, which is skipped)."""
    lines = items_ok = sums_ok = first_ok = 0
    for text, completion in zip(problems, completions, strict=True):
        problem = rs.parse_problem(text)
        item_lines = completion.split("\n")[int(start_line) :]
        for i, line in enumerate(item_lines[: len(problem.items)]):
            step = rs.parse_step(line)
            if step is None:
                continue
            left, right, result = step
            lines += 1
            items_ok += problem.items[i] in (left, right)
            sums_ok += left + right == result
            first_ok += i == 0 and {left, right} == {problem.start, problem.items[0]}
    return {
        "item_lines_parsed": lines,
        "right_item_share": items_ok / max(1, lines),
        "right_sum_share": sums_ok / max(1, lines),
        "right_first_line_share": first_ok / max(1, len(problems)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("n_problems", nargs="?", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args()
    if args.samples > 1 and args.temperature == 0:
        parser.error("--samples above 1 needs --temperature above 0 (greedy samples are equal)")
    torch.set_num_threads(1)
    meta = json.loads((Path(args.model_dir) / "demo_model.json").read_text())
    task = rs.RunningSumConfig(**meta.get("task", {}))
    loaded = load_causal_lm(args.model_dir, trainable=False)
    evaluator = RunningSumEvaluator(
        n_problems=args.n_problems,
        max_new_tokens=512,
        task=task,
        temperature=args.temperature,
        n_samples=args.samples,
    )
    result = evaluator(loaded.model, loaded.tokenizer)
    diagnosis = line_diagnosis(
        [row.problem for row in evaluator.rows for _ in range(args.samples)],
        [r.completion for r in result.records],
        task.start_line,
    )
    for key, value in sorted({**result.metrics, **diagnosis}.items()):
        print(f"{key}: {value:.3f}")
    print(f"{args.n_problems} problems x {args.samples} samples, temperature {args.temperature}")
    for row, record in list(zip(evaluator.rows, result.records[:: args.samples], strict=True))[:3]:
        print(row.problem, "->", repr(record.completion[:120]))


if __name__ == "__main__":
    main()
