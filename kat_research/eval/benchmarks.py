"""Evaluation benchmarks: where each lives, how to read a problem and its gold answer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kat_research.data.readers import LoadStats, Unreadable, file_records, hub_records
from kat_research.text.answers import after_hashes, gold_from_solution

Gold = str | tuple[str, ...]
Row = Mapping[str, Any]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One evaluation problem. ``gold`` is a tuple for list-valued golds (OlympiadBench)."""

    benchmark: str
    problem_id: str
    problem: str
    gold: Gold


def _scalar_text(value: Any) -> str | None:
    """A scalar gold as text: floats that are integers lose their ``.0`` (AMC's 27.0 -> 27)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip() or None


def answer_field(row: Row) -> Gold | None:
    """Gold from an ``answer`` field (string, int or float)."""
    return _scalar_text(row.get("answer"))


def answer_or_last_box(row: Row) -> Gold | None:
    """Gold from ``answer`` when present (hub copies), else the last box of ``solution``."""
    gold = _scalar_text(row.get("answer"))
    solution = row.get("solution")
    if gold is None and isinstance(solution, str):
        return gold_from_solution(solution)
    return gold


def final_answer_list(row: Row) -> Gold | None:
    """OlympiadBench's ``final_answer``: a list of strings (a scalar is accepted too)."""
    value = row.get("final_answer")
    if not isinstance(value, list | tuple):
        return _scalar_text(value)
    parts = tuple(text for text in map(_scalar_text, value) if text is not None)
    return parts or None


def gsm8k_answer(row: Row) -> Gold | None:
    """GSM8K's number after ``####``, thousands separators removed (``2,125`` -> ``2125``)."""
    answer = row.get("answer")
    if not isinstance(answer, str):
        return None
    number = after_hashes(answer)
    return number.replace(",", "") if number else None


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read it, plus its default sampling settings.

    ``problem_fields`` / ``id_fields``: candidate column names, first present wins (local copies
    and hub copies name them differently); rows without an id are numbered by position.
    Sampling defaults follow the usual Qwen3 evaluation (temperature 0.6, top-p 0.95); the
    KAT paper does not state them, so treat them as config defaults (?), not facts.
    """

    name: str
    hub_id: str
    split: str
    gold: Callable[[Row], Gold | None]
    n_samples: int = 8
    hub_config: str | None = None
    local_file: str = "test.jsonl"
    problem_fields: tuple[str, ...] = ("problem", "question")
    id_fields: tuple[str, ...] = ("unique_id", "id", "idx", "problem_idx")
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", answer_field),
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", answer_field, n_samples=32),
        BenchmarkSpec("aime25", "math-ai/aime25", "test", answer_field, n_samples=32),
        BenchmarkSpec("amc23", "math-ai/amc23", "test", answer_field),
        BenchmarkSpec("minerva_math", "math-ai/minervamath", "test", answer_or_last_box),
        BenchmarkSpec(
            "olympiadbench",
            "Hothan/OlympiadBench",
            "train",
            final_answer_list,
            hub_config="OE_TO_maths_en_COMP",
        ),
        BenchmarkSpec("gsm8k", "openai/gsm8k", "test", gsm8k_answer, hub_config="main"),
    )
}


def get_spec(name: str) -> BenchmarkSpec:
    """The spec of a registered benchmark; ValueError naming the valid ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _first_present(row: Row, names: tuple[str, ...]) -> Any:
    return next((row[name] for name in names if row.get(name) is not None), None)


def _problem(
    spec: BenchmarkSpec, row: Any, place: str, index: int, stats: LoadStats
) -> Problem | None:
    """A Problem from one row, or None (counted in ``stats``) when the row is unusable."""
    if isinstance(row, Unreadable):
        stats.skip(row.reason, f"{place}: {row.detail}")
        return None
    if not isinstance(row, Mapping):
        stats.skip("not_an_object", place)
        return None
    text = _first_present(row, spec.problem_fields)
    if text is None:
        asked = f"a problem field ({' or '.join(spec.problem_fields)})"
        stats.skip("missing_problem", place, asked=asked, found=row)
        return None
    if not isinstance(text, str) or not text.strip():
        stats.skip("empty_problem", place)
        return None
    gold = spec.gold(row)
    if gold is None:
        stats.skip("empty_gold", place)
        return None
    problem_id = _first_present(row, spec.id_fields)
    problem_id = str(index) if problem_id is None else str(problem_id)
    return Problem(spec.name, problem_id, text, gold)


def load_benchmark(
    name: str,
    path: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
) -> tuple[list[Problem], LoadStats]:
    """Problems of benchmark ``name`` and what was skipped on the way (logged when any were).

    Source, first match: ``path`` (JSONL, or Parquet by suffix), ``data_dir/<name>/<local_file>``,
    else the hub via ``datasets.load_dataset``. Rows with no problem text or no gold, and lines
    that are not UTF-8 or not JSON, are skipped and counted. ``limit`` caps the number of
    problems returned.
    """
    spec = get_spec(name)
    if path is not None:
        rows = file_records(Path(path), "pass an existing benchmark file as path=")
    elif data_dir is not None:
        rows = file_records(Path(data_dir) / name / spec.local_file, "check data_dir=")
    else:
        rows = hub_records(
            spec.hub_id,
            spec.hub_config,
            spec.split,
            f"pass path=<file.jsonl|file.parquet> or data_dir=<dir with {spec.name}/"
            f"{spec.local_file}> to load_benchmark",
        )
    stats = LoadStats(rows.source)
    problems: list[Problem] = []
    for place, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        stats.n_read += 1
        problem = _problem(spec, row, place, stats.n_read - 1, stats)
        if problem is not None:
            problems.append(problem)
    if stats.n_skipped:
        log.warning("%s: %s", name, stats)
    return problems, stats
