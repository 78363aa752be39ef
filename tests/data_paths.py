"""Where tests read benchmark data: the vendored slices (always there), or the full offline
copies for the tests marked ``slow`` that need every record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"  # same layout as paths.data_dir


def full_data_dir() -> Path:
    """The full offline data folder (``KAT_DATA_DIR``, default ``<repo>/data`` as in
    conf/paths/default.yaml); fails the calling test, naming what to set, when it is missing."""
    path = Path(os.environ.get("KAT_DATA_DIR", ROOT / "data"))
    if not (path / "math500" / "test.jsonl").is_file():
        pytest.fail(
            f"this test needs the full benchmark data, not found at {path}: set KAT_DATA_DIR to "
            "a folder laid out like tests/fixtures/data (see its README), or deselect slow tests",
            pytrace=False,
        )
    return path
