"""The per-task pieces of the testbed's trap check: what ``check`` needs to know about a
line-by-line task (the collatz chain, the running total), behind one small interface.

A :class:`TrapTask` says, for a problem (its prompt text) and a completion:

- ``verify``: whether it is correct, the index of its first rejected line (None: none) and of
  lines accepted before it; ``repetition_line``: the line where the task's repetition rule
  fires (None: never);
- ``result`` / ``is_step_from``: the value a step line writes, and whether a line is a correct
  step from a given value (what "carried forward" means);
- ``wrong_result``: for a rejected line that used the right input but wrote a wrong result,
  (written, right); None otherwise;
- ``probe_lines``: the first ``n`` lines of a correct solution, a phrasing drawn per line
  (the forced-loop probes), None when the solution has fewer;
- ``probe_problems``: problems of a split for those probes.

:func:`trap_task` picks the implementation from the task's settings object
(``CollatzTaskConfig`` or ``RunningSumConfig``, i.e. ``data.source.kind`` collatz or
running_sum).
"""

from __future__ import annotations

import random
from typing import Protocol

from kat_research.data import collatz, running_sum
from kat_research.data.sources import SourceSpec, load_rows

TaskConfig = collatz.CollatzTaskConfig | running_sum.RunningSumConfig


class TrapTask(Protocol):
    """A line-by-line task as the trap check sees it (module docstring)."""

    kind: str  # its data.source.kind
    config: TaskConfig
    verifier_name: str
    repetition_rule: str

    def verify(self, problem: str, completion: str) -> tuple[bool, int | None, int]: ...

    def repetition_line(self, problem: str, completion: str) -> int | None: ...

    def result(self, line: str) -> int | None: ...

    def is_step_from(self, line: str, value: int) -> bool: ...

    def wrong_result(self, problem: str, index: int, line: str) -> tuple[int, int] | None: ...

    def probe_lines(self, problem: str, n: int, rng: random.Random) -> list[str] | None: ...

    def probe_problems(self, split: str, n: int) -> list[str]: ...


class CollatzTrap:
    """The collatz chain (``data.collatz``): a problem is its start value."""

    kind = "collatz"
    verifier_name = "collatz chain verifier (collatz.verify)"
    repetition_rule = (
        "collatz.repetition_onset: some line text or some step result value occurs for the 3rd time"
    )

    def __init__(self, config: collatz.CollatzTaskConfig) -> None:
        self.config = config

    def verify(self, problem: str, completion: str) -> tuple[bool, int | None, int]:
        v = collatz.verify(problem, completion, self.config)
        return v.correct, v.first_error, v.n_valid

    def repetition_line(self, problem: str, completion: str) -> int | None:
        return collatz.repetition_onset(completion, self.config)

    def result(self, line: str) -> int | None:
        step = collatz.parse_step(line, self.config)
        return None if step is None else step[1]

    def is_step_from(self, line: str, value: int) -> bool:
        return collatz.is_valid_step(line, value, self.config)

    def wrong_result(self, problem: str, index: int, line: str) -> tuple[int, int] | None:
        x = int(problem)
        for _ in range(index):
            x = collatz.next_value(x, self.config)
        right = collatz.next_value(x, self.config)
        step = collatz.parse_step(line, self.config)
        if step is None or step[0] != x or step[1] == right:
            return None
        return step[1], right

    def probe_lines(self, problem: str, n: int, rng: random.Random) -> list[str] | None:
        values = collatz.trajectory(int(problem), self.config)
        if values is None or len(values) - 1 < n:
            return None
        forms = collatz.N_FORMS
        return [collatz.step_line(x, rng.randrange(forms), self.config) for x in values[:n]]

    def probe_problems(self, split: str, n: int) -> list[str]:
        """The eval split's first ``n`` starts as drawn; for train the ``n`` smallest distinct
        starts of ``4n`` drawn with seed 7 (the train split repeats starts)."""
        if split == "eval":
            rows, _ = load_rows(SourceSpec(kind=self.kind, split=split, n=n, task=self.config))
            return [r.problem for r in rows]
        rows, _ = load_rows(
            SourceSpec(kind=self.kind, split=split, n=4 * n, seed=7, task=self.config)
        )
        return [str(s) for s in sorted({int(r.problem) for r in rows})[:n]]


class RunningSumTrap:
    """The running total (``data.running_sum``): a problem is its prompt. A line is a step
    from a value when it adds some number to that value correctly, in any phrasing (the total
    is what is carried; the item is not checked)."""

    kind = "running_sum"
    verifier_name = "running-sum line verifier (running_sum.verify)"
    repetition_rule = (
        "running_sum.repetition_onset: some line text, step result value or list item (as an "
        "operand) occurs for the 3rd time"
    )

    def __init__(self, config: running_sum.RunningSumConfig) -> None:
        self.config = config

    def verify(self, problem: str, completion: str) -> tuple[bool, int | None, int]:
        v = running_sum.verify(problem, completion, self.config)
        return v.correct, v.first_error, v.n_valid

    def repetition_line(self, problem: str, completion: str) -> int | None:
        return running_sum.repetition_onset(problem, completion)

    def result(self, line: str) -> int | None:
        step = running_sum.parse_step(line)
        return None if step is None else step[2]

    def is_step_from(self, line: str, value: int) -> bool:
        step = running_sum.parse_step(line)
        return step is not None and value in step[:2] and step[0] + step[1] == step[2]

    def wrong_result(self, problem: str, index: int, line: str) -> tuple[int, int] | None:
        """(written, right) when line ``index`` adds the right item to the right total and
        writes a wrong sum (the start's line, with ``start_line``, adds nothing)."""
        prob = running_sum.parse_problem(problem)
        index -= self.config.start_line  # the item line's index
        if not 0 <= index < len(prob.items):
            return None
        step = running_sum.parse_step(line)
        total = [prob.start, *prob.totals()][index]
        item, right = prob.items[index], prob.totals()[index]
        if step is None or sorted(step[:2]) != sorted((total, item)) or step[2] == right:
            return None
        return step[2], right

    def probe_lines(self, problem: str, n: int, rng: random.Random) -> list[str] | None:
        prob = running_sum.parse_problem(problem)
        lines = running_sum.solution_lines(prob, rng, self.config)[:-1]  # without the box
        return lines[:n] if len(lines) >= n else None

    def probe_problems(self, split: str, n: int) -> list[str]:
        """``n`` distinct problems of the split, drawn with seed 7 for train (0 for eval)."""
        seed = 7 if split == "train" else 0
        rows, _ = load_rows(
            SourceSpec(kind=self.kind, split=split, n=n, seed=seed, task=self.config)
        )
        return [r.problem for r in rows]


def trap_task(config: TaskConfig) -> TrapTask:
    """The :class:`TrapTask` of a task's settings object."""
    if isinstance(config, collatz.CollatzTaskConfig):
        return CollatzTrap(config)
    if isinstance(config, running_sum.RunningSumConfig):
        return RunningSumTrap(config)
    raise TypeError(
        f"the trap check knows the collatz and running_sum tasks, got {type(config).__name__}"
    )


def task_config(data_source: dict) -> TaskConfig:
    """The task settings of a run's ``data.source`` (kind collatz or running_sum)."""
    kinds = {"collatz": collatz.CollatzTaskConfig, "running_sum": running_sum.RunningSumConfig}
    kind = data_source.get("kind")
    if kind not in kinds:
        raise ValueError(
            f"data.source.kind={kind!r}: the testbed trap check needs a line-verified task; "
            f"use train_overrides=[data=collatz,...] or [data=running_sum,...] ({sorted(kinds)})"
        )
    return kinds[kind](**(data_source.get("task") or {}))
