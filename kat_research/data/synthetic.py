"""The built-in offline task: multi-step integer arithmetic with worked steps and a boxed answer.

A problem such as ``28*5-11`` is evaluated left to right, one step per operator::

    28*5=140
    140-11=129
    \\boxed{129}

When a ``*`` follows a ``+``/``-`` the prefix is parenthesised (``(3+4)*5``), so the problem
string reads the same under the usual precedence rules (``eval(problem) == int(answer)``).
Problems are split into train and held-out eval sets by a hash of the problem string, so the
two never share a problem, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "eval")
_OPERATORS = frozenset("+-*")
_CANONICAL_INTEGER = re.compile(r"0|-?[1-9][0-9]*")  # how str(int) writes an integer
_MAX_RESTARTS = 1000


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Settings of the arithmetic task.

    ``+``/``-`` operands and the first number are drawn from ``min_operand..max_operand``; a
    ``*`` multiplier from ``min_multiplier..max_multiplier``. Every intermediate value stays in
    ``[0, max_value]`` (``[-max_value, max_value]`` with ``allow_negative``): operators and
    operands that would leave it are not drawn. The defaults give answers of at most 4 digits.
    ``heldout_fraction`` of the problem space is reserved for the eval split.
    """

    n_ops: int = 2
    min_operand: int = 2
    max_operand: int = 99
    min_multiplier: int = 2
    max_multiplier: int = 9
    operators: str = "+-*"
    allow_negative: bool = False
    max_value: int = 9999
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.n_ops < 1:
            raise ValueError(f"n_ops must be >= 1, got {self.n_ops}")
        if not self.operators or not set(self.operators) <= _OPERATORS:
            raise ValueError(
                f"operators must be a non-empty subset of '+-*', got {self.operators!r}"
            )
        if not 0 <= self.min_operand <= self.max_operand <= self.max_value:
            raise ValueError("need 0 <= min_operand <= max_operand <= max_value")
        if not 0 <= self.min_multiplier <= self.max_multiplier:
            raise ValueError("need 0 <= min_multiplier <= max_multiplier")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class ArithmeticProblem:
    """A problem string, its worked steps (``a op b=c``, one per operator) and the answer."""

    problem: str
    steps: list[str]
    answer: str


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _operand_range(op: str, value: int, cfg: ArithmeticTaskConfig) -> tuple[int, int] | None:
    """Operands ``b`` keeping ``value op b`` inside the allowed value range, or None if none do."""
    low_bound = -cfg.max_value if cfg.allow_negative else 0
    if op == "*":
        low, high = cfg.min_multiplier, cfg.max_multiplier
        if value:
            high = min(high, cfg.max_value // abs(value))
    else:
        low, high = cfg.min_operand, cfg.max_operand
        high = min(high, cfg.max_value - value if op == "+" else value - low_bound)
    return (low, high) if low <= high else None


def _try_problem(rng: random.Random, cfg: ArithmeticTaskConfig) -> ArithmeticProblem | None:
    value = rng.randint(cfg.min_operand, cfg.max_operand)
    text, additive, steps = str(value), False, []
    for _ in range(cfg.n_ops):
        choices = [(op, r) for op in cfg.operators if (r := _operand_range(op, value, cfg))]
        if not choices:
            return None
        op, (low, high) = rng.choice(choices)
        operand = rng.randint(low, high)
        result = _apply(op, value, operand)
        steps.append(f"{value}{op}{operand}={result}")
        if op == "*" and additive:
            text = f"({text})"
        text, additive, value = f"{text}{op}{operand}", op != "*", result
    return ArithmeticProblem(text, steps, str(value))


def make_problem(rng: random.Random, cfg: ArithmeticTaskConfig) -> ArithmeticProblem:
    """One random problem drawn with ``rng``."""
    for _ in range(_MAX_RESTARTS):
        problem = _try_problem(rng, cfg)
        if problem is not None:
            return problem
    raise ValueError(f"{cfg} cannot produce problems within max_value={cfg.max_value}")


def solution_text(problem: ArithmeticProblem) -> str:
    """The SFT target: the worked steps, one per line, then ``\\boxed{answer}``."""
    return "\n".join([*problem.steps, f"\\boxed{{{problem.answer}}}"])


def is_heldout(problem: str, cfg: ArithmeticTaskConfig) -> bool:
    """Whether a problem string belongs to the eval split (a fixed property of the string)."""
    digest = hashlib.blake2b(problem.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.heldout_fraction


def problems_for_split(
    split: str, n: int, seed: int, cfg: ArithmeticTaskConfig
) -> list[ArithmeticProblem]:
    """``n`` problems of one split: train (repeats possible) or eval (distinct problems).

    Each split draws from its own seeded stream, so a split does not depend on the other's size.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    heldout = split == "eval"
    rng = random.Random(f"{split}:{seed}")
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    budget = 100 * n + 10_000
    while len(problems) < n and budget:
        budget -= 1
        problem = make_problem(rng, cfg)
        if is_heldout(problem.problem, cfg) != heldout or heldout and problem.problem in seen:
            continue
        seen.add(problem.problem)
        problems.append(problem)
    if len(problems) < n:
        raise ValueError(f"could only draw {len(problems)} of {n} {split} problems from {cfg}")
    return problems


def exact_integer_match(answer: str | None, gold: str) -> bool:
    """The task's grading rule: whether a completion's final answer is exactly the gold integer.

    ``answer`` is the content of the completion's last complete box (``text.last_boxed``: a box
    that is never closed is ignored, surrounding whitespace and one trailing period are
    stripped). It must be written exactly as the gold is: ASCII digits, ``-`` for negatives,
    nothing else. So ``\\boxed{ 7 }`` and ``\\boxed{7.}`` match 7, while ``+7``, ``07``, ``7.0``,
    ``7 0``, ``1,234``, ``-0`` and non-ASCII digits do not. No box (``None``) is wrong. A gold
    not in that form is a ValueError (golds come from ``str(int)``).
    """
    if not _CANONICAL_INTEGER.fullmatch(gold):
        raise ValueError(f"gold {gold!r} of the arithmetic task is not an integer written by str()")
    return answer == gold
