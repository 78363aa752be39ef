"""Cut verdicts: what a task's verifier says about the rows a termination rule cut, per step.

A row is *cut* when the rule stopped it (stop reason ``terminated``) or kept fewer tokens than
it generated. For every row the verifier's first error (:class:`~kat_research.data.first_error.
FirstErrorTask`: the start of the first invalid line) is located in the generated text and
turned into a token index ``e`` (the token holding that character). For a cut row keeping
``kept`` of ``generated`` tokens:

- its kept prefix is *derailed* when ``e < kept`` (the prefix reaches into the first invalid
  line), *valid* otherwise (no error generated, or one at or after the cut);
- ``kept - e`` is the cut's position relative to the error, in tokens (> 0: the prefix runs
  past the error; <= 0: cut before it), for rows whose generated text holds an error;
- its ``generated - kept`` dropped tokens count as dropped on a derailed or a valid prefix.

Uncut rows get their finished category (correct, wrong, degenerate, capped).
:func:`rollout_counts` returns a step's counts (sums, so ranks and steps add up);
:func:`verdict_metrics` turns any sum of counts into the logged shares and means, and
:func:`run_summary` a run's totals (``verdict/<count>`` keys) into its ``summary.json`` entry.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.first_error import CATEGORIES, FirstErrorTask
from kat_research.rollout.types import STOP_EOS, STOP_TERMINATED, Rollout

#: the counts of :func:`verdict_counts`, in a fixed order (summed over ranks and steps)
COUNTS = (
    "rows",
    "cut",
    "cut_derailed",
    "cut_with_error",
    "cut_minus_error_sum",
    "dropped_derailed",
    "dropped_valid",
    "uncut",
    *(f"uncut_{c}" for c in CATEGORIES),
)


@dataclass(frozen=True)
class RowVerdict:
    """One row: whether it was cut, tokens kept and generated, the first error's token index
    (None: no error generated) and, for uncut rows, the category."""

    cut: bool
    kept: int
    generated: int
    error: int | None
    category: str | None


def decoded(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], cache: dict[int, str]
) -> tuple[str, list[int]]:
    """The text of ``ids`` as the concatenation of each token's decoding, and each token's end
    offset in it (so character offsets map to tokens exactly)."""
    ends, total = [], 0
    pieces = []
    for t in ids:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
        pieces.append(cache[t])
        total += len(cache[t])
        ends.append(total)
    return "".join(pieces), ends


def judge_row(
    task: FirstErrorTask,
    problem: str,
    text: str,
    ends: Sequence[int],
    kept: int,
    stop_reason: str,
) -> RowVerdict:
    """The verdict of one row whose generated tokens decode to ``text`` (``ends``: each
    token's end offset; the EOS token, if any, left out)."""
    generated = len(ends)
    cut = stop_reason == STOP_TERMINATED or kept < generated
    offset = task.first_error(problem, text)
    error = None if offset is None else bisect.bisect_right(ends, offset)
    category = None if cut else task.category(problem, text, stop_reason)
    return RowVerdict(cut, kept, generated, error, category)


def verdict_counts(verdicts: Sequence[RowVerdict]) -> dict[str, float]:
    """Sums over rows, keyed by :data:`COUNTS`."""
    out = dict.fromkeys(COUNTS, 0.0)
    for v in verdicts:
        out["rows"] += 1
        if not v.cut:
            out["uncut"] += 1
            out[f"uncut_{v.category}"] += 1
            continue
        derailed = v.error is not None and v.error < v.kept
        out["cut"] += 1
        out["cut_derailed"] += derailed
        if v.error is not None:
            out["cut_with_error"] += 1
            out["cut_minus_error_sum"] += v.kept - v.error
        out["dropped_derailed" if derailed else "dropped_valid"] += v.generated - v.kept
    return out


def rollout_counts(
    task: FirstErrorTask,
    tokenizer: PreTrainedTokenizerBase,
    rollout: Rollout,
    problems: Sequence[str],
) -> dict[str, float]:
    """:func:`verdict_counts` of one training rollout batch (``problems``: one per row)."""
    if len(problems) != rollout.batch_size:
        raise ValueError(f"{len(problems)} problems for {rollout.batch_size} rows")
    cache: dict[int, str] = {}
    verdicts = []
    for b, problem in enumerate(problems):
        stop = rollout.stop_reason[b]
        length = int(rollout.lengths[b]) - (stop == STOP_EOS)
        text, ends = decoded(tokenizer, rollout.tokens[b, :length].tolist(), cache)
        kept = min(int(rollout.cut[b]), length)
        verdicts.append(judge_row(task, problem, text, ends, kept, stop))
    return verdict_counts(verdicts)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def verdict_metrics(counts: dict[str, float], prefix: str = "verdict/") -> dict[str, float]:
    """The logged values of summed counts (NaN where a share has nothing to count):

    ``cut_rows`` share of rows cut; ``cut_on_derailed`` share of cut rows whose kept prefix
    holds an error; ``cut_minus_error`` mean ``kept - e`` over cut rows with an error;
    ``dropped_on_derailed`` / ``dropped_on_valid`` shares of the tokens cuts dropped;
    ``uncut_<category>`` shares of the uncut rows.
    """
    dropped = counts["dropped_derailed"] + counts["dropped_valid"]
    out = {
        "cut_rows": _ratio(counts["cut"], counts["rows"]),
        "cut_on_derailed": _ratio(counts["cut_derailed"], counts["cut"]),
        "cut_minus_error": _ratio(counts["cut_minus_error_sum"], counts["cut_with_error"]),
        "dropped_on_derailed": _ratio(counts["dropped_derailed"], dropped),
        "dropped_on_valid": _ratio(counts["dropped_valid"], dropped),
        **{f"uncut_{c}": _ratio(counts[f"uncut_{c}"], counts["uncut"]) for c in CATEGORIES},
    }
    return {f"{prefix}{k}": v for k, v in out.items()}


def run_summary(totals: Mapping[str, float], prefix: str = "verdict/") -> dict[str, float] | None:
    """A run's verdicts from its totals (``<prefix><count>`` keys summed over the steps): the
    :func:`verdict_metrics` of the sums plus the counts; None when the run logged none."""
    if f"{prefix}rows" not in totals:
        return None
    counts = {k: float(totals.get(f"{prefix}{k}", 0.0)) for k in COUNTS}
    return {**verdict_metrics(counts, prefix=""), **{f"n_{k}": v for k, v in counts.items()}}
