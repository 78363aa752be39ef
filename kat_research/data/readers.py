"""Reading raw records from local JSONL / JSON / Parquet files or a hub dataset, and counting what
was skipped: shared by the training sources and the benchmark loaders, which differ only in what
they do with a record.

Every record comes with its place in the source (``line 12`` of a JSONL file, ``row 7`` of a
JSON array, Parquet file or hub split, both counted from 1), so a skipped record can be found.
Bytes that are not UTF-8 never stop a load: the record holding them becomes ``Unreadable``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_PLACES = 3  # places listed per skip reason in a summary
_PARQUET_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a record that could not be decoded (``invalid_utf8``) or parsed
    (``invalid_json``); ``detail`` says where in the record."""

    reason: str
    detail: str


@dataclass
class Records:
    """The records of one source, each as ``(place, value)``; ``value`` may be ``Unreadable``."""

    source: str  # the file path or hub id, for messages
    items: Iterator[tuple[str, Any]]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self.items


@dataclass
class LoadStats:
    """Records read from ``source``, records skipped, and why (reason -> count).

    For each reason the first ``MAX_PLACES`` places are kept, and, for a missing field, the
    field asked for and the fields the skipped records did have, so ``summary()`` can say what
    to fix.
    """

    source: str = ""
    n_read: int = 0
    n_skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    places: dict[str, list[str]] = field(default_factory=dict)
    asked: dict[str, str] = field(default_factory=dict)
    found: dict[str, set[str]] = field(default_factory=dict)

    def skip(
        self,
        reason: str,
        place: str | None = None,
        asked: str | None = None,
        found: Iterable[str] = (),
    ) -> None:
        """Count one skipped record; ``asked``/``found``: the field wanted and those present."""
        self.n_skipped += 1
        self.reasons[reason] += 1
        places = self.places.setdefault(reason, [])
        if place is not None and len(places) < MAX_PLACES:
            places.append(place)
        if asked is not None:
            self.asked[reason] = asked
            self.found.setdefault(reason, set()).update(map(str, found))

    def _describe(self, reason: str) -> str:
        count, places = self.reasons[reason], self.places.get(reason, [])
        notes = [", ".join(places) + (", ..." if count > len(places) else "")] if places else []
        if reason in self.asked:
            fields = ", ".join(sorted(self.found.get(reason, ()))) or "none"
            notes.append(f"asked for {self.asked[reason]}; those records have fields: {fields}")
        return f"{reason} {count}" + (f" ({'; '.join(notes)})" if notes else "")

    def summary(self) -> str:
        """One line: what was skipped from where, e.g. ``skipped 2 of 9 records of a.jsonl:
        invalid_utf8 1 (line 4: ...); missing_problem 1 (line 7; asked for ...)``."""
        text = f"skipped {self.n_skipped} of {self.n_read} records of {self.source}"
        if not self.n_skipped:
            return text
        return f"{text}: " + "; ".join(self._describe(r) for r, _ in self.reasons.most_common())

    def __str__(self) -> str:
        return self.summary()


def _bad_bytes(error: UnicodeDecodeError) -> str:
    return f"byte {error.object[error.start]:#04x} at column {error.start + 1} is not UTF-8"


def _jsonl_items(path: Path) -> Iterator[tuple[str, Any]]:
    """``(line N, parsed value)`` per non-blank line; undecodable or unparsable lines give an
    ``Unreadable``. Read as bytes so one bad byte spoils only its own line."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            place = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield place, Unreadable("invalid_utf8", _bad_bytes(error))
                continue
            if not line.strip():
                continue
            try:
                yield place, json.loads(line)
            except json.JSONDecodeError as error:
                yield place, Unreadable("invalid_json", error.msg)


def _has_undecodable(value: Any) -> bool:
    """Whether a value decoded with ``surrogateescape`` holds any byte that was not UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= char <= "\udcff" for char in value)
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(item) for item in value)
    return False


def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """``(row N, element)`` of a JSON array; elements holding non-UTF-8 bytes are Unreadable."""
    raw = path.read_bytes()
    try:
        text, suspect = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, suspect = raw.decode("utf-8", errors="surrogateescape"), True
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "fix it or convert it to JSONL, where a bad line is skipped and counted"
        ) from error
    if not isinstance(values, list):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an array of records")
    for number, value in enumerate(values, start=1):
        if suspect and _has_undecodable(value):
            value = Unreadable("invalid_utf8", "a string holds bytes that are not UTF-8")
        yield f"row {number}", value


def _batch_rows(batch: Any) -> Iterator[Any]:
    """The records of one Arrow batch; a row whose strings are not UTF-8 is ``Unreadable``."""
    try:
        yield from batch.to_pylist()
    except UnicodeDecodeError:
        for i in range(batch.num_rows):
            try:
                yield batch.slice(i, 1).to_pylist()[0]
            except UnicodeDecodeError as error:
                yield Unreadable("invalid_utf8", f"in a string value, {_bad_bytes(error)}")


def _parquet_items(path: Path) -> Iterator[tuple[str, Any]]:
    """``(row N, record)`` of a Parquet file, read in batches (big files never sit in memory
    twice as Python objects)."""
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for record in _batch_rows(batch):
            number += 1
            yield f"row {number}", record


def file_records(path: Path, missing_hint: str) -> Records:
    """Records of a ``.jsonl``, ``.json`` (array) or ``.parquet`` file.

    A missing file raises FileNotFoundError ending with ``missing_hint`` (what to fix).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {missing_hint}")
    suffix = path.suffix.lower()
    readers = {".parquet": _parquet_items, ".json": _json_items, ".jsonl": _jsonl_items}
    if suffix not in readers:
        raise ValueError(
            f"unsupported file type {suffix!r} for {path}: use .jsonl, .json or .parquet"
        )
    return Records(str(path), readers[suffix](path))


def hub_records(hub_id: str, config: str | None, split: str, fallback_hint: str) -> Records:
    """Records of a hub dataset split; a failure (e.g. offline, not cached) raises RuntimeError
    ending with ``fallback_hint`` (how to load a local copy instead)."""
    import datasets
    from huggingface_hub import constants

    try:
        dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:
        offline = " (HF_HUB_OFFLINE is set, not cached)" if constants.HF_HUB_OFFLINE else ""
        raise RuntimeError(
            f"could not load {hub_id!r} split {split!r} from the hub{offline}; {fallback_hint}"
        ) from error
    name = f"{hub_id} ({config}, {split})" if config else f"{hub_id} ({split})"
    return Records(name, ((f"row {i}", r) for i, r in enumerate(dataset, start=1)))
