"""Answer grading with math-verify, a string fast path, a cache and a hard time limit.

math-verify times out with ``signal.alarm``, which only works in the main thread. Here its own
timeouts are off and one ``setitimer`` budget of ``timeout_s`` covers the whole item (parsing
both sides and comparing), so grading runs either in the main thread (``num_workers=0``) or in
worker processes. Worker processes add a wall-clock guard on top: a worker that does not answer
within ``hard_timeout_s`` (stuck in C code that never returns to the interpreter) is killed, the
pool is replaced, and the item counts as a timeout. A worker that dies (a segfault, the OOM
killer) is replaced too; the items it may have been grading are retried one at a time, and one
that kills its worker again counts as a crash (wrong).

Answers beyond an ``AnswerBudget`` (characters or terms) are not parsed at all: math-verify's
parser gives up on long inputs without saying so and grades what it kept (``1+1+...+1`` with
1,000 terms reads as ``1``), so such answers count as ``too_long`` instead. Timeouts, answers
too long, parse errors and crashes are all wrong answers, counted on the ``Grader``, and cached
like any other result.

Gold answers may be a string or a sequence of strings (OlympiadBench's ``final_answer``). A
sequence is joined with commas into one answer, which math-verify reads as a set: every element
must be matched and the order does not matter. A one-element sequence is just that element.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import math_verify
from sympy import Basic
from sympy.matrices import MatrixBase

Gold = str | Sequence[str]

CORRECT, WRONG, TIMEOUT, PARSE_ERROR, CRASH = "correct", "wrong", "timeout", "parse_error", "crash"
TOO_LONG = "too_long"
_STARTUP_TIMEOUT_S = 120.0

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_LAYOUT = re.compile(r"\\(?:left|right)(?![a-zA-Z])|\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
_ZERO_DECIMALS = re.compile(r"(\d)\.0+(?!\d)")
_BARE_PERCENT = re.compile(r"(?<!\\)%")  # a LaTeX comment sign, meant as a percent sign
_E_NOTATION = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
# What separates two terms: arithmetic and relation signs, commas, and their LaTeX commands.
_TERM_SEPARATOR = re.compile(
    r"[-+*/^=<>,;]|\\(?:cdot|times|div|pm|mp|le|ge|leq|geq|neq)(?![a-zA-Z])"
)


@dataclass(frozen=True)
class AnswerBudget:
    """The largest answer the grader parses: ``max_chars`` characters and ``max_terms`` terms
    (one more than the separators ``+ - * / ^ = < > , ;`` and ``\\cdot``, ``\\times``, ...).

    Larger answers are graded ``too_long`` (wrong) without parsing. The defaults are far above
    every gold of the seven benchmarks (at most 210 characters and 48 terms) and below where
    math-verify starts to truncate silently (a sum of about 960 terms).
    """

    max_chars: int = 1000
    max_terms: int = 250

    def __post_init__(self) -> None:
        if self.max_chars < 1 or self.max_terms < 1:
            raise ValueError(f"answer budget must be >= 1, got {self}")

    def exceeded(self, answer: str) -> bool:
        """Whether ``answer`` is over the budget."""
        if len(answer) > self.max_chars:
            return True
        return len(_TERM_SEPARATOR.findall(answer)) + 1 > self.max_terms


class _DisabledTimeoutWarning(logging.Filter):
    """Drop math-verify's warning that its own timeout is off: ours replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DisabledTimeoutWarning())


class _ItemTimeout(BaseException):
    """Raised by our alarm; a BaseException so math-verify's ``except Exception`` lets it out."""


def gold_text(gold: Gold) -> str:
    """One answer string for a gold string or a sequence of gold strings (joined as a set)."""
    if isinstance(gold, str):
        return gold.strip()
    parts = [part.strip() for part in gold if part.strip()]
    if not parts:
        raise ValueError("gold answer list is empty")
    return ", ".join(parts)


def normalize(answer: str) -> str:
    """Cheap canonical form for the string fast path (equal forms mean equal answers)."""
    text = _UNESCAPED_DOLLAR.sub("", answer)
    text = _LAYOUT.sub("", text)
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    text = _DEGREES.sub("", text)
    text = "".join(text.split()).rstrip(".")
    return _ZERO_DECIMALS.sub(r"\1", text)


@contextmanager
def _time_limit(seconds: float):
    """Raise ``_ItemTimeout`` in the main thread after ``seconds`` of wall-clock time."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise _ItemTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[Basic | MatrixBase, ...]:
    """The sympy objects math-verify reads from a bare answer wrapped as ``$…$``.

    Before parsing: ``$`` signs go, a bare ``%`` becomes ``\\%`` and ``4.5e33`` becomes
    ``4.5 \\times 10^{33}`` (Minerva's golds), which LaTeX would otherwise misread. Wrapping in
    ``\\boxed{}`` instead parses no gold of the seven benchmarks that ``$…$`` misses, loses
    ``10\\%``, and misreads some (a Minerva gold ``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}`` as 2/3).
    """
    bare = _UNESCAPED_DOLLAR.sub("", text)
    bare = _BARE_PERCENT.sub(r"\\%", bare)
    bare = _E_NOTATION.sub(r"\1 \\times 10^{\2}", bare)
    parsed = math_verify.parse(f"${bare}$", parsing_timeout=None)
    return tuple(item for item in parsed if isinstance(item, (Basic, MatrixBase)))


def grade_outcome(
    answer: str, gold: str, timeout_s: float, budget: AnswerBudget = AnswerBudget()
) -> str:
    """Grade one bare answer against one gold string: CORRECT, WRONG, TIMEOUT, TOO_LONG (over
    ``budget``, not parsed) or PARSE_ERROR.

    Must run in the main thread of its process (it uses SIGALRM).
    """
    if normalize(answer) == normalize(gold):
        return CORRECT
    if budget.exceeded(answer):
        return TOO_LONG
    try:
        with _time_limit(timeout_s):
            gold_parsed, answer_parsed = _parse(gold), _parse(answer)
            if not gold_parsed or not answer_parsed:
                return PARSE_ERROR
            same = math_verify.verify(list(gold_parsed), list(answer_parsed), timeout_seconds=None)
    except _ItemTimeout:
        return TIMEOUT
    except Exception:  # any failure inside sympy is a wrong answer, not a crash
        return PARSE_ERROR
    return CORRECT if same else WRONG


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "in-process grading uses SIGALRM and must run in the main thread; "
            "use Grader(num_workers>0) to grade from another thread"
        )


def _warm_up() -> None:
    """Load math-verify's grammar in a fresh worker before any timed item reaches it."""
    _parse("1")


class Grader:
    """Grades many (answer, gold) pairs with a per-run cache and optional worker processes.

    Counters (over distinct graded pairs, cache hits not recounted): ``n_graded``,
    ``n_cache_hits``, ``n_timeouts``, ``n_too_long`` (answers over ``max_answer_chars`` or
    ``max_answer_terms``, see ``AnswerBudget``), ``n_parse_errors``, ``n_crashes`` (the worker
    died), ``n_pool_restarts``. Use as a context manager, or call ``close()``, to stop the
    workers.

    ``num_workers=0`` grades in the calling (main) thread. ``hard_timeout_s`` defaults to
    ``2 * timeout_s + 5``. ``mp_context="spawn"`` is safe next to CUDA and threads; ``"fork"``
    starts workers faster where that is safe.
    """

    def __init__(
        self,
        num_workers: int = 0,
        timeout_s: float = 5.0,
        hard_timeout_s: float | None = None,
        mp_context: str = "spawn",
        max_answer_chars: int = AnswerBudget.max_chars,
        max_answer_terms: int = AnswerBudget.max_terms,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0 or (hard_timeout_s is not None and hard_timeout_s <= 0):
            raise ValueError(f"timeouts must be > 0, got {timeout_s}, {hard_timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.hard_timeout_s = 2 * timeout_s + 5.0 if hard_timeout_s is None else hard_timeout_s
        self.mp_context = mp_context
        self.budget = AnswerBudget(max_answer_chars, max_answer_terms)
        self._cache: dict[tuple[str, str], bool] = {}
        self._pool: ProcessPoolExecutor | None = None
        self.n_graded = self.n_cache_hits = self.n_timeouts = self.n_too_long = 0
        self.n_parse_errors = self.n_crashes = self.n_pool_restarts = 0

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def grade(self, answer: str | None, gold: Gold) -> bool:
        """Grade one pair."""
        return self.grade_many([(answer, gold)])[0]

    def grade_many(self, pairs: Iterable[tuple[str | None, Gold]]) -> list[bool]:
        """Grade pairs in order; ``None`` answers are wrong without grading."""
        keys = [(answer, gold_text(gold)) for answer, gold in pairs]
        answered = [key for key in keys if key[0] is not None]
        todo = list(dict.fromkeys(key for key in answered if key not in self._cache))
        self.n_cache_hits += len(answered) - len(todo)
        slow = [key for key in todo if normalize(key[0]) != normalize(key[1])]
        run = self._run_pool if self.num_workers else self._run_here
        outcomes = dict(zip(slow, run(slow), strict=True))
        for key in todo:
            outcome = outcomes.get(key, CORRECT)  # not slow: equal after normalisation
            self._cache[key] = outcome == CORRECT
            self.n_timeouts += outcome == TIMEOUT
            self.n_too_long += outcome == TOO_LONG
            self.n_parse_errors += outcome == PARSE_ERROR
            self.n_crashes += outcome == CRASH
        self.n_graded += len(todo)
        return [key[0] is not None and self._cache[key] for key in keys]

    def _run_here(self, items: list[tuple[str, str]]) -> list[str]:
        if items:
            _require_main_thread()
        return [grade_outcome(answer, gold, self.timeout_s, self.budget) for answer, gold in items]

    def _start_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            self.num_workers, mp_context=multiprocessing.get_context(self.mp_context)
        )
        warm = [pool.submit(_warm_up) for _ in range(self.num_workers)]
        _, not_done = wait(warm, timeout=_STARTUP_TIMEOUT_S)
        if not_done:
            raise RuntimeError(f"grading workers did not start within {_STARTUP_TIMEOUT_S} s")
        for future in warm:
            future.result()
        return pool

    def _kill_pool(self) -> None:
        """Kill every worker (some may be stuck in C code) and drop the pool."""
        assert self._pool is not None
        # ProcessPoolExecutor has no public kill before Python 3.14 (kill_workers).
        for process in list((self._pool._processes or {}).values()):
            process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self.n_pool_restarts += 1

    def _run_pool(self, items: list[tuple[str, str]]) -> list[str]:
        """Grade in worker processes with at most ``num_workers`` items in flight, so each item
        starts when it is submitted and its wall-clock deadline is exact.

        A worker past its deadline is killed with the pool; the item is a TIMEOUT and the other
        items in flight are rerun. When a worker dies, the items in flight become suspects and
        are rerun one at a time; a suspect whose worker dies again is graded CRASH.
        """
        outcomes = [CRASH] * len(items)
        queue = deque(range(len(items)))
        suspects: set[int] = set()
        running: dict[Future, tuple[int, float]] = {}
        while queue or running:
            if self._pool is None:
                self._pool = self._start_pool()
            while queue and len(running) < self.num_workers:
                if running and queue[0] in suspects:
                    break
                index = queue.popleft()
                future = self._pool.submit(
                    grade_outcome, *items[index], self.timeout_s, self.budget
                )
                running[future] = (index, time.monotonic())
                if index in suspects:
                    break
            first_deadline = min(start for _, start in running.values()) + self.hard_timeout_s
            done, _ = wait(
                running,
                timeout=max(0.0, first_deadline - time.monotonic()),
                return_when=FIRST_COMPLETED,
            )
            died = []
            for future in done:
                index, _ = running.pop(future)
                try:
                    outcomes[index] = future.result()
                except BrokenProcessPool:
                    died.append(index)
            now = time.monotonic()
            late = [f for f, (_, start) in running.items() if now - start >= self.hard_timeout_s]
            for future in late:
                outcomes[running.pop(future)[0]] = TIMEOUT
            if not (died or late):
                continue
            in_flight = died + [index for index, _ in running.values()]
            running.clear()
            self._kill_pool()
            lone_suspect = len(in_flight) == 1 and in_flight[0] in suspects
            retry = [] if died and lone_suspect else in_flight  # died alone twice: CRASH
            if died:
                suspects.update(in_flight)
            queue.extendleft(reversed(retry))
        return outcomes
