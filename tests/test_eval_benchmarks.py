"""Benchmark registry and loaders on the real local files and on malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from data_paths import FIXTURE_DATA, full_data_dir

from kat_research.eval import BENCHMARKS, PAPER_BENCHMARKS, Problem, load_benchmark

EXPECTED_COUNTS = {  # of the full files, from the data README
    "math500": 500,
    "aime24": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "gsm8k": 1319,
    "aime25": 30,
}


def test_registry() -> None:
    assert set(BENCHMARKS) == set(EXPECTED_COUNTS)
    assert set(PAPER_BENCHMARKS) <= set(BENCHMARKS)
    assert BENCHMARKS["aime24"].n_samples == 32
    assert {BENCHMARKS[name].n_samples for name in ("math500", "amc23", "minerva_math")} == {8}
    spec = BENCHMARKS["math500"]
    assert (spec.temperature, spec.top_p) == (0.6, 0.95)


def test_unknown_benchmark_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="math500"):
        load_benchmark("math5000")


@pytest.mark.parametrize(
    "full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["slice", "full"]
)
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_local_files_load_completely(name: str, full: bool) -> None:
    """The vendored slice (one record per line), or the full file (slow: needs KAT_DATA_DIR)."""
    data_dir = full_data_dir() if full else FIXTURE_DATA
    slice_lines = (FIXTURE_DATA / name / "test.jsonl").read_text().splitlines()
    count = EXPECTED_COUNTS[name] if full else len(slice_lines)
    problems, stats = load_benchmark(name, data_dir=str(data_dir))
    assert len(problems) == count
    assert (stats.n_read, stats.n_skipped) == (count, 0)
    assert len({p.problem_id for p in problems}) == count
    assert all(p.benchmark == name and p.problem.strip() and p.gold for p in problems)


def test_gold_formats_per_benchmark() -> None:
    def first(name: str) -> Problem:
        return load_benchmark(name, data_dir=str(FIXTURE_DATA), limit=1)[0][0]

    assert first("amc23").gold == "27"  # float 27.0 in the file
    assert first("gsm8k").gold == "18"  # after ####
    assert first("minerva_math").gold == "1.6"  # last box of the solution
    assert first("olympiadbench").gold == ("2",)  # a list in the file
    assert first("aime24").gold == "204"
    assert first("math500").problem_id == "test/precalculus/807.json"


def test_path_and_limit() -> None:
    path = FIXTURE_DATA / "aime25" / "test.jsonl"
    problems, stats = load_benchmark("aime25", path=str(path), limit=5)
    assert [p.problem_id for p in problems] == [f"2025-I-{i}" for i in range(1, 6)]
    assert stats.n_read == 5


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        json.dumps({"problem": "1+1?", "answer": "2"}),
        "{not json",
        json.dumps({"question": "2+2?", "answer": 4}),  # hub copies name it question
        json.dumps({"answer": "3"}),  # no problem
        json.dumps({"problem": "x?", "answer": ""}),  # empty gold
        json.dumps({"problem": "y?", "answer": None}),
        json.dumps([1, 2]),
        "",
        json.dumps({"problem": "3+3?", "answer": 6.0}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    problems, stats = load_benchmark("math500", path=str(path))
    assert [(p.problem_id, p.gold) for p in problems] == [("0", "2"), ("2", "4"), ("7", "6")]
    assert (stats.n_read, stats.n_skipped) == (8, 5)
    assert stats.reasons == {
        "invalid_json": 1,
        "missing_problem": 1,
        "empty_gold": 2,
        "not_an_object": 1,
    }


def test_bad_bytes_and_wrong_columns_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bytes.jsonl"
    lines = [
        json.dumps({"problem": "1+1?", "answer": "2"}).encode(),
        b'{"problem": "caf\xe9?", "answer": "3"}',  # Latin-1, not UTF-8
        json.dumps({"prompt": "2+2?", "answer": "4"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("WARNING", logger="kat_research.eval.benchmarks"):
        problems, stats = load_benchmark("math500", path=str(path))
    assert [p.gold for p in problems] == ["2"]
    assert (stats.n_read, stats.n_skipped) == (3, 2)
    expected = (
        f"math500: skipped 2 of 3 records of {path}: "
        "invalid_utf8 1 (line 2: byte 0xe9 at column 17 is not UTF-8); "
        "missing_problem 1 (line 3; asked for a problem field (problem or question); "
        "those records have fields: answer, prompt)"
    )
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_parquet_with_list_gold(tmp_path: Path) -> None:
    path = tmp_path / "olympiad.parquet"
    frame = pd.DataFrame(
        {"id": [7, 8], "question": ["q1", "q2"], "final_answer": [["$1$", "$2$"], []]}
    )
    frame.to_parquet(path)
    problems, stats = load_benchmark("olympiadbench", path=str(path))
    assert problems == [Problem("olympiadbench", "7", "q1", ("$1$", "$2$"))]
    assert stats.reasons == {"empty_gold": 1}


def test_missing_file_and_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="amc23"):
        load_benchmark("amc23", data_dir=str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*pass path="):
        load_benchmark("amc23")
