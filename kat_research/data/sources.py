"""Where training rows come from: the synthetic task, a local JSONL/Parquet file, or the hub.

Every source yields the same ``Row``. Unusable records (bytes that are not UTF-8, bad JSON, no
problem text, an empty answer when an answer field is configured, ...) are skipped and counted
by reason with their place in the file, never fatal; so are repeated prompts when ``dedup`` is
on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kat_research.data import collatz, running_sum
from kat_research.data.readers import LoadStats, Unreadable, file_records, hub_records
from kat_research.data.synthetic import (
    ArithmeticTaskConfig,
    problems_for_split,
    solution_text,
)
from kat_research.text.answers import after_hashes, last_boxed

KINDS = ("synthetic", "collatz", "running_sum", "file", "hub")
ANSWER_TRANSFORMS = ("none", "gsm8k", "last_boxed")
_MISSING = object()  # a field path that does not resolve
# The tasks generated in code, by kind: their settings class (``data.source.task``).
TASK_CONFIGS = {
    "synthetic": ArithmeticTaskConfig,
    "collatz": collatz.CollatzTaskConfig,
    "running_sum": running_sum.RunningSumConfig,
}
GENERATED_KINDS = tuple(TASK_CONFIGS)
TaskConfig = ArithmeticTaskConfig | collatz.CollatzTaskConfig | running_sum.RunningSumConfig


@dataclass(frozen=True)
class Row:
    """One training prompt. ``answer`` is the gold final answer, ``solution`` an SFT target."""

    problem_id: str
    problem: str
    answer: str | None
    solution: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """Where rows come from and how to read them.

    ``kind="file"``: ``path`` to a ``.jsonl``, ``.json`` (array) or ``.parquet`` file.
    ``kind="hub"``: ``datasets.load_dataset(hub_id, config_name, split=split)``.
    ``kind="synthetic"``: ``n`` arithmetic problems of ``split`` (train/eval) drawn with ``seed``.
    ``kind="collatz"``: the same for the long-horizon task (``data.collatz``; ``task`` holds
    its ``CollatzTaskConfig`` settings); ``kind="running_sum"``: the running-total task
    (``data.running_sum``, ``RunningSumConfig``).

    Field names may be dotted paths (``reward_model.ground_truth``; list items by index). A field
    holding a chat message list gives its last user message. With ``answer_field`` /
    ``solution_field`` set, rows where that field is empty are skipped; ``answer_transform``
    extracts the answer from it (``gsm8k``: after ``####``; ``last_boxed``: the last box).
    Rows are numbered by position unless ``id_field`` names an id. ``dedup`` keeps only the
    first row of each (problem text, answer) pair, exactly as read (file and hub sources; the
    synthetic train split repeats problems by design). ``limit`` caps rows kept.
    """

    kind: str = "synthetic"
    path: str | None = None
    hub_id: str | None = None
    config_name: str | None = None
    split: str = "train"
    problem_field: str = "problem"
    answer_field: str | None = "answer"
    solution_field: str | None = None
    id_field: str | None = None
    answer_transform: str = "none"
    limit: int | None = None
    dedup: bool = False
    task: TaskConfig = field(default_factory=ArithmeticTaskConfig)
    n: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        task_type = TASK_CONFIGS.get(self.kind, ArithmeticTaskConfig)
        if isinstance(self.task, Mapping):  # plain values from Hydra
            object.__setattr__(self, "task", task_type(**self.task))
        if self.kind != "synthetic" and self.task == ArithmeticTaskConfig():  # the unset default
            object.__setattr__(self, "task", task_type())
        if self.kind in GENERATED_KINDS and not isinstance(self.task, task_type):
            raise ValueError(
                f"data.source.kind={self.kind} needs data.source.task settings of a "
                f"{task_type.__name__}, got a {type(self.task).__name__}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"data source kind must be one of {KINDS}, got {self.kind!r}")
        if self.answer_transform not in ANSWER_TRANSFORMS:
            raise ValueError(
                f"answer_transform must be one of {ANSWER_TRANSFORMS}, "
                f"got {self.answer_transform!r}"
            )
        if self.kind == "file" and not self.path:
            raise ValueError("a file data source needs data.source.path")
        if self.kind == "hub" and not self.hub_id:
            raise ValueError("a hub data source needs data.source.hub_id")
        if self.kind in GENERATED_KINDS and self.dedup:
            raise ValueError(
                "data.source.dedup applies to file and hub sources; the synthetic train split "
                "draws problems with repeats by design: set data.source.dedup=false"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SourceSpec:
        """Build from plain values (a dict or Hydra DictConfig), rejecting unknown keys."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown data source keys: {sorted(unknown)}")
        return cls(**values)

    @property
    def name(self) -> str:
        """A short name for row ids and messages."""
        if self.kind == "file":
            return Path(str(self.path)).stem
        if self.kind in GENERATED_KINDS:
            return f"{self.kind}-{self.split}"
        return str(self.hub_id)


def as_source_spec(spec: SourceSpec | Mapping[str, Any]) -> SourceSpec:
    """``spec`` itself, or a SourceSpec built from its plain values."""
    return spec if isinstance(spec, SourceSpec) else SourceSpec.from_mapping(spec)


def resolve_field(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (``a.b``, ``a.0.c``), or ``_MISSING`` if it is absent."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    )


def _last_user_message(messages: list[Mapping[str, Any]]) -> Any:
    contents = [m["content"] for m in messages if m["role"] == "user"]
    return contents[-1] if contents else _MISSING


def _number_text(value: int | float) -> str:
    """A numeric answer as text; integral floats lose their ``.0`` (27.0 -> "27")."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _text_field(record: Mapping[str, Any], path: str, what: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable string/number field, else (None, reason for skipping)."""
    value = resolve_field(record, path)
    if _is_message_list(value) and value:
        value = _last_user_message(value)
    if value is _MISSING or value is None:
        return None, f"missing_{what}"
    if what != "problem" and isinstance(value, int | float) and not isinstance(value, bool):
        value = _number_text(value)
    if not isinstance(value, str):
        return None, f"non_string_{what}"
    if not value.strip():
        return None, f"empty_{what}"
    return value, None


def _transform_answer(answer: str, transform: str) -> str | None:
    if transform == "gsm8k":
        number = after_hashes(answer)
        return number.replace(",", "") if number else None
    if transform == "last_boxed":
        return last_boxed(answer)
    return answer.strip()


def _row(spec: SourceSpec, record: Any, place: str, index: int, stats: LoadStats) -> Row | None:
    """A Row from one record, or None (counted in ``stats``) when it is unusable."""
    if isinstance(record, Unreadable):
        stats.skip(record.reason, f"{place}: {record.detail}")
        return None
    if not isinstance(record, Mapping):
        stats.skip("not_an_object", place)
        return None
    values: dict[str, str | None] = {}
    for what, path in (
        ("problem", spec.problem_field),
        ("answer", spec.answer_field),
        ("solution", spec.solution_field),
    ):
        if path is None:
            values[what] = None
            continue
        values[what], reason = _text_field(record, path, what)
        if reason == f"missing_{what}":
            stats.skip(reason, place, asked=f"data.source.{what}_field={path!r}", found=record)
            return None
        if reason:
            stats.skip(reason, place)
            return None
    if values["answer"] is not None:
        values["answer"] = _transform_answer(values["answer"], spec.answer_transform)
        if not values["answer"]:
            stats.skip(f"no_answer_after_{spec.answer_transform}", place)
            return None
    found_id = resolve_field(record, spec.id_field) if spec.id_field else _MISSING
    problem_id = f"{spec.name}:{index}" if found_id in (_MISSING, None) else str(found_id)
    return Row(problem_id, values["problem"], values["answer"], values["solution"])


def _synthetic_rows(spec: SourceSpec) -> list[Row]:
    n = spec.n if spec.limit is None else min(spec.n, spec.limit)
    if spec.kind in ("collatz", "running_sum"):
        task = collatz if spec.kind == "collatz" else running_sum
        drawn = task.problems_for_split(spec.split, n, spec.seed, spec.task)
        return [
            Row(f"{spec.name}:{i}", p.problem, p.answer, p.solution) for i, p in enumerate(drawn)
        ]
    problems = problems_for_split(spec.split, n, spec.seed, spec.task)
    return [
        Row(f"{spec.name}:{i}", p.problem, p.answer, solution_text(p))
        for i, p in enumerate(problems)
    ]


def load_rows(spec: SourceSpec | Mapping[str, Any]) -> tuple[list[Row], LoadStats]:
    """The rows of a source and what was skipped on the way (with ``dedup``, repeats count as
    ``duplicate`` skips)."""
    spec = as_source_spec(spec)
    if spec.kind in GENERATED_KINDS:
        rows = _synthetic_rows(spec)
        return rows, LoadStats(spec.name, n_read=len(rows))
    if spec.kind == "file":
        records = file_records(Path(str(spec.path)), "fix data.source.path")
    else:
        records = hub_records(
            str(spec.hub_id),
            spec.config_name,
            spec.split,
            "point data.source.path at a local .jsonl or .parquet file (kind: file) instead",
        )
    stats = LoadStats(records.source)
    rows: list[Row] = []
    seen: set[tuple[str, str | None]] = set()
    for place, record in records:
        if spec.limit is not None and len(rows) >= spec.limit:
            break
        stats.n_read += 1
        row = _row(spec, record, place, stats.n_read - 1, stats)
        if row is None:
            continue
        if spec.dedup:
            key = (row.problem, row.answer)
            if key in seen:
                stats.skip("duplicate", place)
                continue
            seen.add(key)
        rows.append(row)
    return rows, stats
