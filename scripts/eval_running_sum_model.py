"""Held-out metrics (greedy, or avg@k sampled) of one saved model on the running-total task
(data=running_sum), with a per-line diagnosis and a few of its completions: how far a stage of
conf/testbed_models_running_sum.yaml has come.

    python scripts/eval_running_sum_model.py MODEL_DIR [N_PROBLEMS] [--samples K --temperature T]
        [--teacher-forced] [--records FILE.jsonl] [--per-problem FILE.csv]

Greedy by default; ``--samples 8 --temperature 0.6`` gives the targets' metric (avg@8 at T=0.6:
``running_sum/accuracy`` is then the mean over every sample).

Besides exact accuracy and the share of item lines valid before the first error, it prints,
over every line the model wrote in place of an item line: the share holding the right item for
its position (the copy from the prompt), the share whose sum is right for its own operands (the
arithmetic, whatever was copied), and the share of first item lines that add the first item to
the start (after the start's line, when the task writes one), and what the first error of each
wrong completion is (an item with one or both digits miscopied, another item of the list, a
wrong sum, an unreadable line). The task settings come from the model's demo_model.json
(``task``; RunningSumConfig's defaults, no start line, for a stage saved before the file
recorded them).

``--teacher-forced`` adds how sure the model is of each item digit when fed the held-out problems'
worked solutions in its own style (demo_model.json's ``sft.form_weights``): the mean -log p and
the shares of digits below p 0.5 and 0.9. An item digit that opens a line is left out, since
there it also carries the choice of phrasing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from kat_research.building.token_mixture import sft_examples
from kat_research.data import running_sum as rs
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.metrics import avg_at_k, per_problem, records_frame
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


def first_error_kind(problem: rs.Problem, completion: str, start_line: bool = False) -> str:
    """What the first wrong item line of ``completion`` got wrong ("" when every item line is
    right): its item (one digit or both miscopied, or another item of the list), its sum, or
    its form (unreadable), and in which phrasing (``line_phrasing``). Lines after the items (the
    box) are not judged here."""
    item_lines = completion.split("\n")[int(start_line) :]
    for i, right in enumerate(problem.items):
        step = rs.parse_step(item_lines[i]) if i < len(item_lines) else None
        if step is None:
            return "unreadable line"
        left, other, result = step
        phrasing = line_phrasing(item_lines[i])
        if right not in (left, other):
            written = min(left, other)  # the item: totals have more digits
            if written in problem.items:
                return f"item: another item of the list ({phrasing})"
            same = sum(a == b for a, b in zip(f"{written:02d}", f"{right:02d}", strict=False))
            kind = "one digit miscopied" if same == 1 else "both digits miscopied"
            return f"item: {kind} ({phrasing})"
        if left + other != result:
            return f"sum wrong ({phrasing})"
    return ""


def line_phrasing(line: str) -> str:
    """Which phrasing an addition line uses (rs.step_line's forms, both designs)."""
    if re.fullmatch(r"\d+=\d+\+\d+", line):
        return "sum first"
    if " " in line:
        return "total first, spaced"
    return "item first" if len(line.split("+")[0]) <= 2 else "total first"


def item_digit_confidence(
    model: torch.nn.Module, tokenizer, rows: list, start_line: bool
) -> dict[str, float]:
    """Teacher-forced probabilities of the item digits of ``rows``' worked solutions (not a
    line's first character): mean -log p, shares below 0.5 and 0.9, and how many digits."""
    probabilities = []
    for (ids, labels), row in zip(sft_examples(tokenizer, rows), rows, strict=True):
        scored = [i for i, label in enumerate(labels) if label != -100]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
        log_p = torch.log_softmax(logits[[i - 1 for i in scored]], -1)
        p = log_p.gather(-1, torch.tensor([[ids[i]] for i in scored])).squeeze(-1).exp()
        texts = [tokenizer.decode([ids[i]]) for i in scored]
        owner = [t for t, text in enumerate(texts) for _ in text]  # character -> scored token
        if not "".join(texts).startswith(row.solution):
            raise ValueError("the tokenizer does not decode token by token to the solution text")
        problem, offset = rs.parse_problem(row.problem), 0
        lines = row.solution.split("\n")
        for i, line in enumerate(lines):
            j = i - int(start_line)
            if 0 <= j < len(problem.items):
                for number in re.finditer(r"\d+", line):
                    if int(number[0]) == problem.items[j] and len(number[0]) <= 2:
                        chars = range(max(number.start(), 1), number.end())  # not the opener
                        probabilities += [float(p[owner[offset + c]]) for c in chars]
            offset += len(line) + 1
    values = torch.tensor(probabilities)
    return {
        "item_digit_mean_neg_log_p": float(-values.log().mean()),
        "item_digit_share_p_below_0.5": float((values < 0.5).float().mean()),
        "item_digit_share_p_below_0.9": float((values < 0.9).float().mean()),
        "item_digits_scored": float(len(values)),
    }


def clustered_interval(counts: list[tuple[int, int]], z: float = 1.96) -> tuple[float, float]:
    """avg@k over problems, from each problem's (samples n, correct c) as
    ``eval.metrics.per_problem`` counts them, and the half-width of its normal ``z`` interval with
    problems as the sampling unit (a problem's samples are correlated, so they are not counted
    as independent): z x the standard deviation of the per-problem means / sqrt(problems)."""
    means = [avg_at_k(n, c) for n, c in counts]
    n = len(means)
    if n < 2:
        raise ValueError(f"need at least 2 problems for an interval, got {n}")
    mean = sum(means) / n
    variance = sum((m - mean) ** 2 for m in means) / (n - 1)
    return mean, z * math.sqrt(variance / n)


def per_problem_table(records: list[dict]) -> pd.DataFrame:
    """One row per problem, in evaluation order: problem_id, samples, correct, mean_length
    (response tokens, mean over its samples)."""
    grouped = records_frame(records).groupby("problem_id", sort=False)
    table = pd.DataFrame(
        {
            "samples": grouped.size(),
            "correct": grouped["correct"].sum(),
            "mean_length": grouped["length"].mean(),
        }
    )
    return table.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("n_problems", nargs="?", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument(
        "--teacher-forced",
        action="store_true",
        help="also the item digits' probabilities on the held-out worked solutions",
    )
    parser.add_argument("--records", type=Path, help="write every graded sample to this JSONL file")
    parser.add_argument(
        "--per-problem",
        type=Path,
        help="write one CSV row per problem: samples, correct, mean length",
    )
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
    if args.teacher_forced:
        style = rs.RunningSumConfig(**{**meta.get("task", {}), **_style(meta)})
        gold, _ = load_rows(
            SourceSpec(kind="running_sum", n=args.n_problems, seed=0, split="eval", task=style)
        )
        diagnosis |= item_digit_confidence(loaded.model, loaded.tokenizer, gold, task.start_line)
    for key, value in sorted({**result.metrics, **diagnosis}.items()):
        print(f"{key}: {value:.4f}")
    counts = per_problem(records_frame([record.to_dict() for record in result.records]))
    mean, half = clustered_interval(list(zip(counts["n"], counts["c"], strict=True)))
    print(f"avg@{args.samples}: {mean:.4f} +- {half:.4f} (95%, problems as the unit)")
    if args.per_problem:
        args.per_problem.parent.mkdir(parents=True, exist_ok=True)
        per_problem_table([r.to_dict() for r in result.records]).to_csv(
            args.per_problem, index=False
        )
    if args.records:
        args.records.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(record.to_dict()) for record in result.records]
        args.records.write_text("\n".join(lines) + "\n")
    problems = [rs.parse_problem(row.problem) for row in evaluator.rows]
    kinds = Counter(
        first_error_kind(problems[i // args.samples], record.completion, task.start_line)
        for i, record in enumerate(result.records)
    )
    wrong = sum(n for kind, n in kinds.items() if kind)
    print(f"first error of the {wrong} completions with a wrong item line:")
    for kind, n in kinds.most_common():
        if kind:
            print(f"  {kind}: {n} ({n / max(1, wrong):.1%})")
    print(f"{args.n_problems} problems x {args.samples} samples, temperature {args.temperature}")
    for row, record in list(zip(evaluator.rows, result.records[:: args.samples], strict=True))[:3]:
        print(row.problem, "->", repr(record.completion[:120]))


def _style(meta: dict) -> dict:
    """The model's phrasing odds (``sft.form_weights`` in demo_model.json), if recorded."""
    weights = meta.get("sft", {}).get("form_weights")
    return {"form_weights": tuple(weights)} if weights else {}


if __name__ == "__main__":
    main()
