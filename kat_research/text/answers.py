"""Pull the final answer out of a model completion or a worked solution."""

from __future__ import annotations

import re

# `\boxed` / `\fbox` followed by `{` or by whitespace (`\boxed 5`), never `\boxedfoo`.
_BOX = re.compile(r"\\(?:boxed|fbox)(?=[\s{])")
_HASHES = "####"


def _closing_braces(text: str) -> dict[int, int]:
    """For every ``{`` of ``text`` that is closed, the index of its matching ``}``: one pass with
    a stack, so the cost is linear in ``len(text)`` however many groups stay open. Escaped
    braces (``\\{``, ``\\}``) do not count towards the nesting depth."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            closing[stack.pop()] = i
        i += 1
    return closing


_TOKEN = re.compile(r"\s*([^\s$]+)")
_SPACE = re.compile(r"\s*")


def _box_content(text: str, end: int, closing: dict[int, int]) -> str | None:
    """What a box command ending at ``end`` holds: a brace group or one whitespace-led token."""
    start = _SPACE.match(text, end).end()  # type: ignore[union-attr]
    if start < len(text) and text[start] == "{":
        close = closing.get(start)
        return None if close is None else text[start + 1 : close]
    token = _TOKEN.match(text, end)
    return token.group(1) if token else None


def _clean(answer: str) -> str | None:
    """Strip whitespace and one trailing period; empty answers become None."""
    answer = answer.strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{…}`` / ``\\boxed …`` / ``\\fbox{…}`` in ``text``.

    A box that is never closed (a truncated generation) is ignored and the one before it
    is used instead. Linear in ``len(text)``, also for thousands of unclosed boxes (a
    degenerate generation); the grader's answer budget then bounds what is parsed.
    """
    closing = _closing_braces(text)
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end(), closing)
        if content is not None:
            return _clean(content)
    return None


def after_hashes(text: str) -> str | None:
    """GSM8K style: the rest of the line after the last ``####``."""
    position = text.rfind(_HASHES)
    if position < 0:
        return None
    return _clean(text[position + len(_HASHES) :].split("\n", 1)[0])


def extract_answer(text: str) -> str | None:
    """A completion's final answer: the last box, else the ``####`` line, else None."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else after_hashes(text)


def gold_from_solution(solution: str) -> str | None:
    """Gold answer of a worked solution (Minerva Math): its last box."""
    return last_boxed(solution)
