"""The long-horizon testbed task: a Collatz-style iteration written out step by step.

From a start ``n`` the map is applied until the value drops below ``stop_below``::

    x even -> x/2          x odd -> 3*x-1        (odd_multiplier=3, odd_offset=-1)

Each step is one line in one of three equivalent phrasings, drawn independently per line
(two operand orders and a result-first form), so correct solutions are not near-deterministic::

    27 -> 3*27-1=80 / 27*3-1=80 / 80=3*27-1        80 -> 80/2=40 / 80:2=40 / 40=80/2

The final line is ``\\boxed{last value}``. The length of a solution depends on the values
computed: the ``3x-1`` map has cycles that never go below ``stop_below`` (``5 14 7 20 10`` and an
18-value cycle from 17), and about two thirds of all values lead into one, so a wrong value
usually makes a consistent continuation loop for ever (to the rollout cap), and otherwise
changes how long the solution runs. Problems are the starts whose trajectory stops after
``min_steps..max_steps`` steps without exceeding ``max_value``.

The verifier (:func:`verify`) grades a whole completion: every line a valid step (any phrasing)
from the previous value, the last value below ``stop_below``, then the box holding it.

Copy-rich documents (:func:`pretraining_documents`) are what the testbed models are
pre-trained on before their SFT: free-running trajectories (which cycle when the start lies in
a loop basin) and trajectories whose last lines are then repeated verbatim, plus spans of
random characters repeated verbatim.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass

SPLITS = ("train", "eval")
N_FORMS = 3
_INT = r"(-?\d+)"


@dataclass(frozen=True)
class CollatzTaskConfig:
    """Settings of the long-horizon task (see the module docstring).

    ``heldout_fraction`` of the starts (by a hash of the problem string) form the eval split.
    ``max_chars`` bounds a pre-training document. ``form_weights`` are the relative odds of
    the three phrasings when text is generated (a model's style; the verifier accepts all).
    """

    odd_multiplier: int = 3
    odd_offset: int = -1
    stop_below: int = 5
    min_steps: int = 8
    max_steps: int = 20
    max_value: int = 9999
    heldout_fraction: float = 0.15
    max_chars: int = 256
    form_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.odd_multiplier < 1 or (self.odd_multiplier + self.odd_offset) % 2:
            raise ValueError(
                "odd_multiplier must be >= 1 and odd_multiplier*x + odd_offset even for odd x "
                f"(got {self.odd_multiplier}, {self.odd_offset})"
            )
        if not 2 <= self.stop_below <= self.max_value:
            raise ValueError("need 2 <= stop_below <= max_value")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("need 1 <= min_steps <= max_steps")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        weights = tuple(float(w) for w in self.form_weights)
        if len(weights) != N_FORMS or min(weights) < 0 or not sum(weights) > 0:
            raise ValueError(f"form_weights needs {N_FORMS} non-negative odds, got {weights}")
        object.__setattr__(self, "form_weights", weights)

    @property
    def odd_rule(self) -> str:
        """The odd step as written, e.g. ``3*x-1``."""
        return f"{self.odd_multiplier}*x{self.odd_offset:+d}"


def next_value(x: int, cfg: CollatzTaskConfig) -> int:
    """One step of the map."""
    return x // 2 if x % 2 == 0 else cfg.odd_multiplier * x + cfg.odd_offset


def trajectory(start: int, cfg: CollatzTaskConfig) -> list[int] | None:
    """``[start, ..., last]`` up to the first value below ``stop_below``; None when the
    iteration cycles, exceeds ``max_value`` or needs more than ``max_steps`` steps."""
    values = [start]
    while values[-1] >= cfg.stop_below:
        y = next_value(values[-1], cfg)
        if y > cfg.max_value or y in values or len(values) > cfg.max_steps:
            return None
        values.append(y)
    return values


def draw_form(rng: random.Random, cfg: CollatzTaskConfig) -> int:
    """A phrasing index drawn with ``cfg.form_weights`` (equal odds: ``randrange``, the stream
    the first testbed models were trained on)."""
    if len(set(cfg.form_weights)) == 1:
        return rng.randrange(N_FORMS)
    return rng.choices(range(N_FORMS), cfg.form_weights)[0]


def step_line(x: int, form: int, cfg: CollatzTaskConfig) -> str:
    """The line for the step from ``x`` in phrasing ``form`` (0..2)."""
    y = next_value(x, cfg)
    m, off = cfg.odd_multiplier, f"{cfg.odd_offset:+d}"
    if x % 2 == 0:
        forms = (f"{x}/2={y}", f"{x}:2={y}", f"{y}={x}/2")
    else:
        forms = (f"{m}*{x}{off}={y}", f"{x}*{m}{off}={y}", f"{y}={m}*{x}{off}")
    return forms[form]


def parse_step(line: str, cfg: CollatzTaskConfig) -> tuple[int, int] | None:
    """(x, y) of a line in any of the phrasings, whatever its arithmetic; None if none fits."""
    m, off = cfg.odd_multiplier, re.escape(f"{cfg.odd_offset:+d}")
    patterns = (
        (rf"{_INT}[/:]2={_INT}", False),
        (rf"{_INT}={_INT}/2", True),
        (rf"{m}\*{_INT}{off}={_INT}", False),
        (rf"{_INT}\*{m}{off}={_INT}", False),
        (rf"{_INT}={m}\*{_INT}{off}", True),
    )
    for pattern, result_first in patterns:
        match = re.fullmatch(pattern, line)
        if match:
            a, b = int(match[1]), int(match[2])
            return (b, a) if result_first else (a, b)
    return None


def is_valid_step(line: str, x: int, cfg: CollatzTaskConfig) -> bool:
    """Whether ``line`` is a correct step from ``x`` in one of the phrasings."""
    return line in {step_line(x, form, cfg) for form in range(N_FORMS)}


@dataclass(frozen=True)
class CollatzProblem:
    """A start, one drawn solution text and the answer (the last value)."""

    problem: str
    solution: str
    answer: str


def solution_text(start: int, rng: random.Random, cfg: CollatzTaskConfig) -> str:
    """A worked solution with a phrasing drawn per line, ending in ``\\boxed{last}``."""
    values = trajectory(start, cfg)
    if values is None:
        raise ValueError(f"start {start} has no trajectory within {cfg}")
    lines = [step_line(x, draw_form(rng, cfg), cfg) for x in values[:-1]]
    return "\n".join([*lines, f"\\boxed{{{values[-1]}}}"])


def valid_starts(cfg: CollatzTaskConfig) -> list[int]:
    """Every start whose trajectory is a problem of the task, ascending."""
    return [
        s
        for s in range(cfg.stop_below, cfg.max_value + 1)
        if (values := trajectory(s, cfg)) and len(values) - 1 >= cfg.min_steps
    ]


def is_heldout(problem: str, cfg: CollatzTaskConfig) -> bool:
    """Whether a problem string belongs to the eval split (a fixed property of the string)."""
    digest = hashlib.blake2b(problem.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.heldout_fraction


def problems_for_split(
    split: str, n: int, seed: int, cfg: CollatzTaskConfig
) -> list[CollatzProblem]:
    """``n`` problems of one split. Train draws starts with repeats, each with freshly drawn
    phrasings; eval takes distinct starts in a seeded order (at most all of them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    heldout = split == "eval"
    starts = [s for s in valid_starts(cfg) if is_heldout(str(s), cfg) == heldout]
    if not starts:
        raise ValueError(f"{cfg} has no {split} problems")
    rng = random.Random(f"collatz:{split}:{seed}")
    if heldout:
        if n > len(starts):
            raise ValueError(f"{cfg} has only {len(starts)} eval problems, asked for {n}")
        chosen = rng.sample(starts, n)
    else:
        chosen = [rng.choice(starts) for _ in range(n)]
    out = []
    for start in chosen:
        text = solution_text(start, rng, cfg)
        out.append(CollatzProblem(str(start), text, text.rsplit("{", 1)[1].rstrip("}")))
    return out


@dataclass(frozen=True)
class Verdict:
    """What the verifier found in a completion.

    ``n_valid`` leading lines are correct steps; ``first_error`` is the index of the first line
    that is not (None if all are); ``stopped`` says the chain reached a value below
    ``stop_below``; ``correct`` additionally needs the box right after that line, holding it.
    """

    correct: bool
    n_valid: int
    first_error: int | None
    stopped: bool


def verify(start: int | str, completion: str, cfg: CollatzTaskConfig) -> Verdict:
    """Grade a completion for the problem ``start`` line by line."""
    x = int(start)
    lines = completion.strip("\n").split("\n")
    for i, line in enumerate(lines):
        if x < cfg.stop_below:
            ok = line == f"\\boxed{{{x}}}" and i == len(lines) - 1
            return Verdict(ok, i, None if ok else i, True)
        if not is_valid_step(line, x, cfg):
            return Verdict(False, i, i, False)
        x = next_value(x, cfg)
    return Verdict(False, len(lines), len(lines), x < cfg.stop_below)


def line_values(completion: str, cfg: CollatzTaskConfig) -> list[int | None]:
    """Per line, the result value of a parsed step (None for lines that are not steps)."""
    out: list[int | None] = []
    for line in completion.split("\n"):
        step = parse_step(line, cfg)
        out.append(None if step is None else step[1])
    return out


def repetition_onset(completion: str, cfg: CollatzTaskConfig, repeats: int = 3) -> int | None:
    """The repetition rule for "degenerate": the index of the first line at which some line
    text, or some step result value, occurs for the ``repeats``-th time; None if none does.

    Correct solutions never repeat a value (the trajectory of a problem has no cycle), so any
    hit is a loop: a value cycle of the map or verbatim repetition."""
    seen_text: dict[str, int] = {}
    seen_value: dict[int, int] = {}
    for i, (line, value) in enumerate(
        zip(completion.split("\n"), line_values(completion, cfg), strict=True)
    ):
        if not line:
            continue
        seen_text[line] = seen_text.get(line, 0) + 1
        if value is not None:
            seen_value[value] = seen_value.get(value, 0) + 1
        if seen_text[line] >= repeats or (value is not None and seen_value[value] >= repeats):
            return i
    return None


def _free_trajectory(start: int, rng: random.Random, cfg: CollatzTaskConfig) -> str:
    """A document iterating the map from ``start`` (phrasings drawn per line) until the stop or
    ``max_chars``: starts in a loop basin cycle until the end of the document."""
    text, x = f"{start}", start
    while x >= cfg.stop_below and next_value(x, cfg) <= cfg.max_value:
        line = step_line(x, draw_form(rng, cfg), cfg)
        if len(text) + len(line) + 1 > cfg.max_chars:
            return text
        text += "\n" + line
        x = next_value(x, cfg)
    return text + (f"\n\\boxed{{{x}}}" if x < cfg.stop_below else "")


def _repeated_lines(start: int, rng: random.Random, cfg: CollatzTaskConfig) -> str:
    """A free trajectory cut after a few lines whose last 1-3 lines are then repeated verbatim
    to ``max_chars``."""
    lines = [f"{start}"]
    x = start
    for _ in range(rng.randint(2, 7)):
        if x < cfg.stop_below or next_value(x, cfg) > cfg.max_value:
            break
        lines.append(step_line(x, draw_form(rng, cfg), cfg))
        x = next_value(x, cfg)
    if len(lines) < 2:  # the first step already leaves max_value: repeat the start line
        lines.append(lines[0])
    block = lines[-rng.randint(1, min(3, len(lines) - 1)) :]
    text = "\n".join(lines)
    while len(text) + sum(len(b) + 1 for b in block) <= cfg.max_chars:
        text += "\n" + "\n".join(block)
    return text


_NOISE_CHARS = string.ascii_lowercase + string.digits + "+-*/:=() "


def repeated_span(rng: random.Random, max_chars: int) -> str:
    """Random characters in which a random span is repeated verbatim several times."""
    parts = []
    while sum(map(len, parts)) < max_chars - 40:
        noise = "".join(rng.choice(_NOISE_CHARS) for _ in range(rng.randint(0, 12)))
        span = "".join(rng.choice(_NOISE_CHARS) for _ in range(rng.randint(3, 15)))
        parts.append(noise + "\n".join([span] * rng.randint(2, 6)))
    return "\n".join(parts)[:max_chars]


DOCUMENT_KINDS = ("trajectory", "repeated_lines", "repeated_span")


def pretraining_documents(
    n: int, seed: int, cfg: CollatzTaskConfig, weights: tuple[float, float, float] = (2, 1, 1)
) -> list[str]:
    """``n`` copy-rich plain-text documents (kinds drawn with ``weights``, in DOCUMENT_KINDS
    order). Trajectory starts are any value above ``stop_below`` up to ``max_value`` except the
    eval split's starts (whose values still occur inside other trajectories: the documents teach
    the map)."""
    rng = random.Random(f"collatz-docs:{seed}")
    docs = []
    for _ in range(n):
        kind = rng.choices(DOCUMENT_KINDS, weights)[0]
        start = rng.randint(cfg.stop_below, cfg.max_value)
        while is_heldout(str(start), cfg):
            start = rng.randint(cfg.stop_below, cfg.max_value)
        if kind == "trajectory":
            docs.append(_free_trajectory(start, rng, cfg))
        elif kind == "repeated_lines":
            docs.append(_repeated_lines(start, rng, cfg))
        else:
            docs.append(repeated_span(rng, cfg.max_chars))
    return docs
