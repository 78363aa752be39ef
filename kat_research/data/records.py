"""Reading raw records from local JSONL / JSON / Parquet files or a hub dataset: shared by the
training sources and the benchmark loaders, which differ only in what they do with a record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

INVALID_JSON = object()  # stands in for a JSONL line that does not parse


def _jsonl_records(path: Path) -> Iterator[Any]:
    """Parsed JSONL lines (``INVALID_JSON`` for broken ones); blank lines are ignored."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield INVALID_JSON


def file_records(path: Path, missing_hint: str) -> Iterator[Any]:
    """Records of a ``.jsonl``, ``.json`` (array) or ``.parquet`` file.

    A missing file raises FileNotFoundError ending with ``missing_hint`` (what to fix).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {missing_hint}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return iter(pq.read_table(path).to_pylist())
    if suffix == ".json":
        return iter(json.loads(path.read_text(encoding="utf-8")))
    if suffix == ".jsonl":
        return _jsonl_records(path)
    raise ValueError(f"unsupported file type {suffix!r} for {path}: use .jsonl, .json or .parquet")


def hub_records(hub_id: str, config: str | None, split: str, fallback_hint: str) -> Iterator[Any]:
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
    return iter(dataset)
