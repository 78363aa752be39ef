"""Where a completion first goes wrong: the task-agnostic interface the cut verdicts use, and the
testbed tasks' implementations.

A task with a line-by-line verifier implements :class:`FirstErrorTask`:

- ``first_error(problem, completion)``: the character offset where the first invalid line of
  ``completion`` starts, or None when every line so far is valid. ``completion`` may be a
  prefix (a rollout still running, or cut): its last line, when not followed by a newline, is
  judged as a prefix of a line, so an unfinished valid solution has no error;
- ``category(problem, completion, stop_reason)``: the finished rollout's category, one of
  :data:`CATEGORIES` (correct, then degenerate, capped, wrong in that priority, as
  ``analysis.trap.check.classify``).

:func:`first_error_task` returns the implementation of a run's ``data.source`` (collatz,
running_sum; None for tasks without one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from kat_research.data import running_sum
from kat_research.data.collatz import (
    N_FORMS,
    CollatzTaskConfig,
    next_value,
    repetition_onset,
    step_line,
    verify,
)

CATEGORIES = ("correct", "wrong", "degenerate", "capped")


class FirstErrorTask(Protocol):
    """A task whose verifier can say where a (partial) completion first goes wrong."""

    name: str

    def first_error(self, problem: str, completion: str) -> int | None: ...

    def category(self, problem: str, completion: str, stop_reason: str) -> str: ...


class CollatzFirstError:
    """The testbed's chain verifier (``collatz.verify``) as a :class:`FirstErrorTask`;
    ``problem`` is the start."""

    name = "collatz chain verifier (collatz.verify)"

    def __init__(self, task: CollatzTaskConfig) -> None:
        self.task = task

    def first_error(self, problem: str, completion: str) -> int | None:
        """Start of the first line that is not a valid step from the previous value (any
        phrasing), not the box once the chain has stopped, or any text after the box; leading
        newlines are skipped as ``verify`` does."""
        x, boxed = int(problem), False
        offset = len(completion) - len(completion.lstrip("\n"))
        lines = completion[offset:].split("\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1  # not followed by a newline: may be unfinished
            if boxed:
                valid: set[str] = {""}
            elif x < self.task.stop_below:
                valid = {f"\\boxed{{{x}}}"}
            else:
                valid = {step_line(x, form, self.task) for form in range(N_FORMS)}
            if line in valid:
                if x < self.task.stop_below:
                    boxed = True  # (stays so: x no longer changes)
                else:
                    x = next_value(x, self.task)
            elif not (last and any(v.startswith(line) for v in valid)):
                return offset
            offset += len(line) + 1
        return None

    def category(self, problem: str, completion: str, stop_reason: str) -> str:
        if verify(problem, completion, self.task).correct:
            return "correct"
        if repetition_onset(completion, self.task) is not None:
            return "degenerate"
        return "capped" if stop_reason == "max_tokens" else "wrong"


class RunningSumFirstError:
    """The running-total verifier (``running_sum.verify``) as a :class:`FirstErrorTask`;
    ``problem`` is the prompt (``5237:45 12 ...``)."""

    name = "running-sum line verifier (running_sum.verify)"

    def __init__(self, task: running_sum.RunningSumConfig) -> None:
        self.task = task

    def first_error(self, problem: str, completion: str) -> int | None:
        """Start of the first line that is not the start's line (with ``start_line``), does not
        add the next item to the previous total (any phrasing), is not the box after the last
        item, or is not empty after the box. Unlike the collatz chain, a leading newline is an error
        (``running_sum.verify`` skips none)."""
        expected = running_sum.expected_lines(running_sum.parse_problem(problem), self.task)
        offset = 0
        lines = completion.split("\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1  # not followed by a newline: may be unfinished
            valid = expected[i] if i < len(expected) else {""}  # only newlines after the box
            if line not in valid and not (last and any(v.startswith(line) for v in valid)):
                return offset
            offset += len(line) + 1
        return None

    def category(self, problem: str, completion: str, stop_reason: str) -> str:
        if running_sum.verify(problem, completion, self.task).correct:
            return "correct"
        if running_sum.repetition_onset(problem, completion) is not None:
            return "degenerate"
        return "capped" if stop_reason == "max_tokens" else "wrong"


def first_error_task(data_source: Mapping[str, Any]) -> FirstErrorTask | None:
    """The :class:`FirstErrorTask` of a run's ``data.source``, None for a task without one."""
    kind, task = data_source.get("kind"), data_source.get("task") or {}
    if kind == "collatz":
        return CollatzFirstError(CollatzTaskConfig(**task))
    if kind == "running_sum":
        return RunningSumFirstError(running_sum.RunningSumConfig(**task))
    return None
