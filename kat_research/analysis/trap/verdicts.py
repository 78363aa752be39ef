"""What the task's verifier says about a rollout, and how well KAT's cuts agree with it.

Every rollout gets one exclusive category, in this priority (as ``check.classify``):

1. ``correct``: the verifier accepts it;
2. ``degenerate``: the repetition rule fires;
3. ``capped``: it ran to the length cap (and is not degenerate);
4. ``wrong``: it stopped by itself and is rejected.

The verifier is the task's own:

- ``data.source.kind=collatz`` (the testbed): the chain verifier ``collatz.verify``; the
  repetition rule is ``collatz.repetition_onset`` (some line text or step result value
  occurs a third time);
- ``data.source.kind=running_sum`` (the running-total testbed): the line verifier
  ``running_sum.verify``; the repetition rule is ``running_sum.repetition_onset`` (some line
  text, step result value or list item as an operand occurs a third time);
- any other data (GSM8K, MATH, the synthetic arithmetic task): math grading (``eval.grading.
  Grader``, math-verify) of the completion's final answer (``text.answers.extract_answer``: the
  last box, else the ``####`` line) against the gold answer. ``correct`` also needs the rollout
  to have stopped by itself (EOS), as the chain verifier needs nothing after the box: a rollout
  that wrote the right answer and then ran to the cap is not correct. The repetition rule is
  generic (:func:`ngram_repetition_onset`): some ``n``-token sequence of the generated tokens
  occurs for the ``repeats``-th time, occurrences not overlapping.

A rollout is *derailed* when it is not correct. KAT's cuts are scored against that
(:func:`score_cuts`): precision = share of cut rollouts that are derailed, recall = share of
derailed rollouts that are cut, and the cut rates of correct and derailed rollouts with the
two-sided Fisher exact p of the 2x2 table; every share carries a Wilson 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kat_research.analysis.trap.check import CATEGORIES, classify, fisher_exact
from kat_research.analysis.trap.tasks import TaskConfig, task_config, trap_task
from kat_research.eval.grading import Grader
from kat_research.text.answers import extract_answer

CORRECT = "correct"
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Verdict:
    """One rollout as the verifier sees it. ``repetition_onset``: where the repetition rule
    fires (token index for free text; character index for the testbed, which is the token
    index of its character tokenizer), None when it does not."""

    category: str
    answer_correct: bool  # the verifier's verdict alone, before the priority order
    repetition_onset: int | None


def ngram_repetition_onset(tokens: Sequence[int], n: int, repeats: int) -> int | None:
    """The first token of the earliest occurrence that makes some ``n``-gram occur for the
    ``repeats``-th time (occurrences counted only when they do not overlap the previous counted
    one); None if none does."""
    if n < 1 or repeats < 2:
        raise ValueError(f"need n >= 1 and repeats >= 2, got n={n}, repeats={repeats}")
    counted: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (count, last start)
    for i in range(len(tokens) - n + 1):
        key = tuple(tokens[i : i + n])
        count, last = counted.get(key, (0, -n))
        if i - last < n:
            continue
        counted[key] = (count + 1, i)
        if count + 1 >= repeats:
            return i
    return None


def free_text_category(answer_correct: bool, stop_reason: str, degenerate: bool) -> str:
    """The category of a free-text rollout (module docstring): correct needs the right answer
    and a rollout that stopped by itself."""
    if answer_correct and stop_reason == "eos":
        return CORRECT
    if degenerate:
        return "degenerate"
    if stop_reason == "max_tokens":
        return "capped"
    return "wrong"


class LineVerifier:
    """A testbed task's line verifier and repetition rule (``check.classify``), collatz's chain
    or the running total's, as ``task``'s type says; ``problem`` is the prompt text."""

    def __init__(self, task: TaskConfig):
        self.task = task
        trap = trap_task(task)
        self.name, self.repetition_rule = trap.verifier_name, trap.repetition_rule

    def judge(
        self,
        problems: Sequence[str],
        answers: Sequence[Any],
        tokens: Sequence[Sequence[int]],
        texts: Sequence[str],
        stop_reasons: Sequence[str],
    ) -> list[Verdict]:
        out = []
        for problem, text, stop in zip(problems, texts, stop_reasons, strict=True):
            v = classify(problem, text, stop, self.task)
            out.append(Verdict(v.category, v.category == CORRECT, v.loop_onset))
        return out


class MathVerifier:
    """Math grading of the final answer plus the n-gram repetition rule (module docstring)."""

    name = "math grading (math-verify) of the final answer; correct also needs EOS"

    def __init__(self, ngram: int = 10, repeats: int = 3, timeout_s: float = 5.0):
        self.ngram, self.repeats, self.timeout_s = ngram, repeats, timeout_s
        self.repetition_rule = (
            f"some {ngram}-token sequence of the generated tokens occurs {repeats} times "
            "(non-overlapping occurrences)"
        )

    def judge(
        self,
        problems: Sequence[str],
        answers: Sequence[Any],
        tokens: Sequence[Sequence[int]],
        texts: Sequence[str],
        stop_reasons: Sequence[str],
    ) -> list[Verdict]:
        with Grader(num_workers=0, timeout_s=self.timeout_s) as grader:
            graded = grader.grade_many(
                (extract_answer(t), gold) for t, gold in zip(texts, answers, strict=True)
            )
        out = []
        for ok, ids, stop in zip(graded, tokens, stop_reasons, strict=True):
            onset = ngram_repetition_onset(ids, self.ngram, self.repeats)
            out.append(Verdict(free_text_category(ok, stop, onset is not None), ok, onset))
        return out


def make_verifier(
    data_source: dict[str, Any], *, ngram: int, repeats: int, timeout_s: float
) -> LineVerifier | MathVerifier:
    """The verifier of a run's ``data.source`` (see the module docstring)."""
    if data_source.get("kind") in ("collatz", "running_sum"):
        return LineVerifier(task_config(data_source))
    return MathVerifier(ngram=ngram, repeats=repeats, timeout_s=timeout_s)


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial share ``k/n`` (NaN, NaN for n = 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the bounds are exactly 0 at k = 0 and 1 at k = n; rounding would miss them by a hair
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def share(k: int, n: int, name: str) -> dict[str, float]:
    """``name`` = k/n (NaN for n = 0) with its Wilson 95% interval ``name_lo`` / ``name_hi``."""
    lo, hi = wilson_interval(k, n)
    return {name: k / n if n else math.nan, f"{name}_lo": lo, f"{name}_hi": hi}


def score_cuts(cut: Sequence[bool], categories: Sequence[str]) -> dict[str, float]:
    """KAT's cuts against the verifier: counts, precision, recall, the cut rates of correct and
    derailed rollouts (each with a Wilson 95% interval), Fisher's two-sided p of cut x derailed,
    and the cut rate of each category."""
    pairs = list(zip(cut, categories, strict=True))
    unknown = {c for _, c in pairs} - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected {CATEGORIES}")
    cut_derailed = sum(c and cat != CORRECT for c, cat in pairs)
    cut_correct = sum(c and cat == CORRECT for c, cat in pairs)
    n_derailed = sum(cat != CORRECT for _, cat in pairs)
    n_correct = len(pairs) - n_derailed
    n_cut = cut_derailed + cut_correct
    out: dict[str, float] = {
        "n": len(pairs),
        "n_cut": n_cut,
        "n_derailed": n_derailed,
        "n_correct": n_correct,
        "cut_derailed": cut_derailed,
        "cut_correct": cut_correct,
        **share(cut_derailed, n_cut, "precision"),
        **share(cut_derailed, n_derailed, "recall"),
        **share(cut_correct, n_correct, "cut_rate_correct"),
        **share(n_cut, len(pairs), "cut_rate"),
        "fisher_p": fisher_exact(
            cut_derailed, n_derailed - cut_derailed, cut_correct, n_correct - cut_correct
        ),
    }
    for category in CATEGORIES:
        flags = [c for c, cat in pairs if cat == category]
        out[f"cut_rate_{category}"] = sum(flags) / len(flags) if flags else math.nan
    return out


def crosstab(has_segment: Sequence[bool], categories: Sequence[str]) -> pd.DataFrame:
    """Counts of rollouts by segment (rows ``with segment`` / ``without segment``) and category
    (columns in ``CATEGORIES`` order, then ``total``)."""
    table = pd.DataFrame(0, index=["with segment", "without segment"], columns=[*CATEGORIES])
    for seg, category in zip(has_segment, categories, strict=True):
        table.loc["with segment" if seg else "without segment", category] += 1
    table["total"] = table.sum(axis=1)
    return table
