"""A second long-horizon testbed task: a running total over a list given in the prompt.

The problem is a start value and a list of distinct two-digit items, ``5237:45 12 88``. The
solution (with ``start_line``) first writes the start on a line of its own, then adds the items
left to right, one line per item, each line in one of three equivalent phrasings drawn
independently per line (the odds are a model's style)::

    5237   then   5237+45=5282 / 45+5237=5282 / 5237 + 45 = 5282   ...   then  \\boxed{5427}

The third phrasing was ``5282=5237+45`` (the sum first) until the five-digit teacher chain's
stage t8 (``sum_first``): there the sum must be computed before its item is written, and 84%
of the tiny teacher's wrong samples at temperature 0.6 first erred on those lines, a fifth of
its lines (results/running_sum_models_progress.md). The verifier accepts all four phrasings
whatever the style, so models written in either remain gradable.

Every line copies two values from the context (the previous line's total, or the start, and
the next item of the prompt's list) and computes their sum, so a model that continues
consistently from a wrong total carries the error forward, and a model that loses its place in
the list repeats or skips items. The number of lines is set by the number of items (the length
is set by the problem, not by the values).

**The held-out split is disjoint by construction.** The state of a solution after any line is
(the running total, the items still to add); the rest of the text depends on nothing else. Every
state determines the final answer (its total plus the sum of the items left), so the split is a
partition of answers: a problem is held out when a hash of its answer falls below
``heldout_fraction``. A training state equal to a held-out state would have the held-out answer,
so no state (and no problem) is shared; ``tests/test_running_sum.py`` checks it on the full
splits. The training text never contains a held-out final answer.

:func:`verify` returns the first invalid line's index and the character offset of the first
character from which no valid line can be completed (the error's position in the text).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kat_research.data.collatz import repeated_span

SPLITS = ("train", "eval")
N_FORMS = 3


@dataclass(frozen=True)
class RunningSumConfig:
    """Settings of the running-total task (see the module docstring).

    A problem is a start in ``start_min..start_max`` and ``min_items..max_items`` distinct items
    in ``item_min..item_max`` (distinct, so the next item is the one after the last copied one).
    ``heldout_fraction`` of the answers (by a hash of the answer) form the eval split.
    ``max_chars`` bounds a pre-training document. ``form_weights`` are the relative odds of the
    three phrasings when text is generated (a model's style; the verifier accepts all).
    ``start_line`` opens every solution with the start value on a line of its own, so the
    first addition, like every later one, copies its total from the line above.
    ``sum_first`` makes the third phrasing ``sum=total+item`` (the first design); otherwise it
    is ``total + item = sum``, which, like the other two, writes both operands before the sum.
    """

    start_min: int = 1000
    start_max: int = 9999
    item_min: int = 10
    item_max: int = 99
    min_items: int = 8
    max_items: int = 24
    heldout_fraction: float = 0.15
    max_chars: int = 480
    form_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    start_line: bool = False
    sum_first: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.start_min <= self.start_max:
            raise ValueError(f"need 0 <= start_min <= start_max, got {self}")
        if not 0 <= self.item_min <= self.item_max:
            raise ValueError(f"need 0 <= item_min <= item_max, got {self}")
        if not 1 <= self.min_items <= self.max_items <= self.item_max - self.item_min + 1:
            raise ValueError(
                "need 1 <= min_items <= max_items <= the number of item values "
                f"(items are distinct), got {self}"
            )
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        weights = tuple(float(w) for w in self.form_weights)
        if len(weights) != N_FORMS or min(weights) < 0 or not sum(weights) > 0:
            raise ValueError(f"form_weights needs {N_FORMS} non-negative odds, got {weights}")
        object.__setattr__(self, "form_weights", weights)


@dataclass(frozen=True)
class Problem:
    """A start and the items to add to it."""

    start: int
    items: tuple[int, ...]

    @property
    def text(self) -> str:
        """The prompt, ``start:item item ...``."""
        return f"{self.start}:" + " ".join(map(str, self.items))

    @property
    def answer(self) -> int:
        return self.start + sum(self.items)

    def totals(self) -> list[int]:
        """The running total after each line (the last is the answer)."""
        out, total = [], self.start
        for item in self.items:
            total += item
            out.append(total)
        return out

    def states(self) -> list[tuple[int, tuple[int, ...]]]:
        """Every state of a solution: (running total, items still to add), before each line
        and after the last."""
        totals = [self.start, *self.totals()]
        return [(t, self.items[i:]) for i, t in enumerate(totals)]


_PROBLEM = re.compile(r"(\d+):(\d+(?: \d+)*)")


def parse_problem(text: str) -> Problem:
    """The problem written as ``text`` (its prompt)."""
    match = _PROBLEM.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a running-sum problem (start:item item ...): {text!r}")
    return Problem(int(match[1]), tuple(int(x) for x in match[2].split()))


def step_line(total: int, item: int, form: int, sum_first: bool = True) -> str:
    """The line adding ``item`` to ``total`` in phrasing ``form`` (0..2); the third is
    ``sum=total+item`` with ``sum_first``, else ``total + item = sum``."""
    result = total + item
    third = f"{result}={total}+{item}" if sum_first else f"{total} + {item} = {result}"
    return (f"{total}+{item}={result}", f"{item}+{total}={result}", third)[form]


def accepted_lines(total: int, item: int) -> set[str]:
    """The line adding ``item`` to ``total`` in every phrasing the verifier accepts (both
    designs' third phrasing included)."""
    return {
        step_line(total, item, form, sum_first)
        for form in range(N_FORMS)
        for sum_first in (True, False)
    }


def parse_step(line: str) -> tuple[int, int, int] | None:
    """(left operand, right operand, result) of a line in any phrasing, whatever its arithmetic
    (which operand is the total depends on the phrasing, which the context decides); None if
    the line is no addition."""
    match = re.fullmatch(r"(\d+)\+(\d+)=(\d+)|(\d+) \+ (\d+) = (\d+)", line)
    if match:
        left, right, result = (g for g in match.groups() if g is not None)
        return int(left), int(right), int(result)
    match = re.fullmatch(r"(\d+)=(\d+)\+(\d+)", line)
    if match:
        return int(match[2]), int(match[3]), int(match[1])
    return None


def line_form(line: str) -> int | None:
    """The phrasing (0..2, as in :func:`step_line`) of an addition line, whatever its
    arithmetic; None for any other line. ``a+b=c`` is total first when ``a >= b``: the running
    total exceeds every item (five-digit totals, two-digit items at the task's defaults). The
    third phrasing is either design's (``c=a+b`` or ``a + b = c``)."""
    if re.fullmatch(r"\d+=\d+\+\d+|\d+ \+ \d+ = \d+", line):
        return 2
    match = re.fullmatch(r"(\d+)\+(\d+)=\d+", line)
    if match is None:
        return None
    return 0 if int(match[1]) >= int(match[2]) else 1


def form_shares(completions: Iterable[str]) -> tuple[float, ...] | None:
    """The share of the completions' addition lines in each phrasing (:func:`line_form`);
    None when they hold no addition line."""
    counts = [0] * N_FORMS
    for completion in completions:
        for line in completion.splitlines():
            form = line_form(line.strip())
            if form is not None:
                counts[form] += 1
    total = sum(counts)
    return tuple(n / total for n in counts) if total else None


def draw_form(rng: random.Random, cfg: RunningSumConfig) -> int:
    """A phrasing index drawn with ``cfg.form_weights``."""
    return rng.choices(range(N_FORMS), cfg.form_weights)[0]


def final_line(answer: int) -> str:
    return f"\\boxed{{{answer}}}"


def solution_lines(problem: Problem, rng: random.Random, cfg: RunningSumConfig) -> list[str]:
    """The worked solution's lines (the start's line first with ``cfg.start_line``), a
    phrasing drawn per item line, ending with the box."""
    totals = [problem.start, *problem.totals()]
    lines = [
        step_line(total, item, draw_form(rng, cfg), cfg.sum_first)
        for total, item in zip(totals, problem.items, strict=False)
    ]
    return [*([str(problem.start)] if cfg.start_line else []), *lines, final_line(problem.answer)]


def expected_lines(problem: Problem, cfg: RunningSumConfig) -> list[set[str]]:
    """Every line a correct solution may write at each position: the start's line (with
    ``cfg.start_line``), each item line in any accepted phrasing, the box."""
    totals = [problem.start, *problem.totals()]
    steps = [
        accepted_lines(total, item) for total, item in zip(totals, problem.items, strict=False)
    ]
    return [
        *([{str(problem.start)}] if cfg.start_line else []),
        *steps,
        {final_line(problem.answer)},
    ]


def answer_is_heldout(answer: int, cfg: RunningSumConfig) -> bool:
    """Whether problems with this final answer belong to the eval split."""
    digest = hashlib.blake2b(str(answer).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.heldout_fraction


def random_problem(rng: random.Random, cfg: RunningSumConfig) -> Problem:
    """A problem drawn uniformly in its number of items, start and items."""
    k = rng.randint(cfg.min_items, cfg.max_items)
    items = rng.sample(range(cfg.item_min, cfg.item_max + 1), k)
    return Problem(rng.randint(cfg.start_min, cfg.start_max), tuple(items))


def draw_problem(split: str, rng: random.Random, cfg: RunningSumConfig) -> Problem:
    """A random problem of ``split`` (rejection sampling on the answer's split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        problem = random_problem(rng, cfg)
        if answer_is_heldout(problem.answer, cfg) == (split == "eval"):
            return problem


@dataclass(frozen=True)
class RunningSumProblem:
    """A problem's prompt, one drawn solution text and the answer."""

    problem: str
    solution: str
    answer: str


def problems_for_split(
    split: str, n: int, seed: int, cfg: RunningSumConfig
) -> list[RunningSumProblem]:
    """``n`` distinct problems of one split drawn with ``seed``, each with its phrasings drawn
    anew."""
    rng = random.Random(f"running_sum:{split}:{seed}")
    out, seen = [], set()
    while len(out) < n:
        problem = draw_problem(split, rng, cfg)
        if problem in seen:
            continue
        seen.add(problem)
        solution = "\n".join(solution_lines(problem, rng, cfg))
        out.append(RunningSumProblem(problem.text, solution, str(problem.answer)))
    return out


@dataclass(frozen=True)
class Verdict:
    """What the verifier found in a completion.

    ``n_valid`` leading lines are correct; ``first_error`` is the index of the first line that
    is not (None if all are), ``error_offset`` the character offset in the completion of the
    first character from which no correct line can be completed (the end of the text when
    lines are missing). ``finished`` says every item was added correctly; ``correct``
    additionally needs the box holding the total as the last line.
    """

    correct: bool
    n_valid: int
    first_error: int | None
    error_offset: int | None
    finished: bool


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def verify(problem: str | Problem, completion: str, cfg: RunningSumConfig) -> Verdict:
    """Grade a completion for ``problem`` (its prompt text) line by line."""
    prob = problem if isinstance(problem, Problem) else parse_problem(problem)
    text = completion.rstrip("\n")
    expected = expected_lines(prob, cfg)
    n_steps = len(expected) - 1  # lines before the box
    offset = 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i >= len(expected):  # text after the box
            return Verdict(False, i, i, offset, True)
        if line not in expected[i]:
            prefix = max(_common_prefix(line, e) for e in expected[i])
            return Verdict(False, i, i, offset + prefix, i >= n_steps)
        offset += len(line) + 1
    n = len(lines)
    if n == len(expected):
        return Verdict(True, n, None, None, True)
    return Verdict(False, n, n, len(text), n >= n_steps)


def repetition_onset(problem: str | Problem, completion: str, repeats: int = 3) -> int | None:
    """The repetition rule for "degenerate": the index of the first line at which some line
    text, some line's result value, or some item of the problem's list as an operand occurs
    for the ``repeats``-th time; None if none does.

    A correct solution writes every line, result and item once (totals increase, items are
    distinct; a total equal to an item value is possible only when ``start_min`` is below
    ``item_max``), so a hit is a loop: a line copied verbatim, a total rewritten in other
    phrasings, or the list cycled through again. One item added twice (the place in the list
    lost once) is a wrong solution, not a loop."""
    prob = problem if isinstance(problem, Problem) else parse_problem(problem)
    items = set(prob.items)
    seen: dict[tuple[str, str | int], int] = {}
    for i, line in enumerate(completion.split("\n")):
        if not line:
            continue
        keys: list[tuple[str, str | int]] = [("text", line)]
        step = parse_step(line)
        if step is not None:
            left, right, result = step
            keys.append(("result", result))
            keys += [("item", x) for x in {left, right} & items]
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] >= repeats:
                return i
    return None


def _repeated_lines(problem: Problem, rng: random.Random, cfg: RunningSumConfig) -> str:
    """A prompt and the first few lines of its solution, whose last 1-3 lines are then
    repeated verbatim to ``max_chars`` (a loop, in plain text)."""
    lines = solution_lines(problem, rng, cfg)[: rng.randint(2, len(problem.items))]
    block = lines[-rng.randint(1, min(3, len(lines))) :]
    text = "\n".join([problem.text, *lines])
    while len(text) + sum(len(b) + 1 for b in block) <= cfg.max_chars:
        text += "\n" + "\n".join(block)
    return text


DOCUMENT_KINDS = ("solution", "repeated_lines", "repeated_span")


def pretraining_documents(
    n: int, seed: int, cfg: RunningSumConfig, weights: tuple[float, float, float] = (2, 1, 1)
) -> list[str]:
    """``n`` copy-rich plain-text documents (kinds drawn with ``weights``, in DOCUMENT_KINDS
    order): a training problem followed by its solution, a solution whose last lines are
    repeated verbatim, or random characters with a span repeated verbatim. Only training-split
    problems are used, so no document holds a held-out state."""
    rng = random.Random(f"running_sum-docs:{seed}")
    docs = []
    for _ in range(n):
        kind = rng.choices(DOCUMENT_KINDS, weights)[0]
        if kind == "repeated_span":
            docs.append(repeated_span(rng, cfg.max_chars))
            continue
        problem = draw_problem("train", rng, cfg)
        if kind == "solution":
            docs.append("\n".join([problem.text, *solution_lines(problem, rng, cfg)]))
        else:
            docs.append(_repeated_lines(problem, rng, cfg))
    return docs
