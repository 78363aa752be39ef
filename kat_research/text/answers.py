"""Pull the final answer out of a model completion or a worked solution."""

from __future__ import annotations

import re

# `\boxed` / `\fbox` followed by `{` or by whitespace (`\boxed 5`), never `\boxedfoo`.
_BOX = re.compile(r"\\(?:boxed|fbox)(?=[\s{])")
_HASHES = "####"


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if never closed.

    Escaped braces (``\\{``, ``\\}``) do not count towards the nesting depth.
    """
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _box_content(text: str, end: int) -> str | None:
    """What a box command ending at ``end`` holds: a brace group or one whitespace-led token."""
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced(text, end + len(rest) - len(stripped))
    token = re.match(r"[^\s$]+", stripped)
    return token.group(0) if token else None


def _clean(answer: str) -> str | None:
    """Strip whitespace and one trailing period; empty answers become None."""
    answer = answer.strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{…}`` / ``\\boxed …`` / ``\\fbox{…}`` in ``text``.

    A box that is never closed (a truncated generation) is ignored and the one before it
    is used instead.
    """
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end())
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
