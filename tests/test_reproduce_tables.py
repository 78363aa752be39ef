"""Aggregation of job folders into tables: the results fixture (a smoke-scale Table 1 sweep with
seeds 0 and 1, one job failed), missing cells, reference numbers, writers and figures."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kat_research.sweep.job_records import scan_records
from kat_research.sweep.spec import load_spec
from kat_research.tables.aggregate import TableSpec, aggregate
from kat_research.tables.measures import compute_eflops
from kat_research.tables.plots import plot_figure
from kat_research.tables.write import write_table

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reproduce" / "runs"
TABLE1 = load_spec("table1")


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return scan_records(FIXTURE)


def cell(tidy: pd.DataFrame, row: str, column: str, measure: str) -> pd.Series:
    found = tidy[
        (tidy["method"] == row) & (tidy["column"] == column) & (tidy["measure"] == measure)
    ]
    assert len(found) == 1
    return found.iloc[0]


def test_fixture_records(records):
    assert len(records) == 19
    assert records["status"].value_counts().to_dict() == {"done": 18, "failed": 1}
    done = records[(records["status"] == "done") & (records["kind"] == "train")]
    assert done[["avg@k", "pass@k", "length", "accel_hours", "eflops"]].notna().all().all()
    assert set(records["student:title"].dropna()) == {
        "tiny random (hidden 32)",
        "tiny random (hidden 48)",
    }


def test_failed_seed_is_reported_not_averaged(records):
    tidy = aggregate(records, TableSpec.from_dict(TABLE1.table), TABLE1.reference["values"])
    failed = cell(tidy, "kat", "large", "avg@k")
    assert math.isnan(failed["mean"]) and failed["n"] == 0 and failed["expected"] == 2
    assert failed["missing"] == "seed=1 (failed)"
    complete = cell(tidy, "kat", "small", "length")
    assert complete["n"] == 2 and complete["missing"] == ""
    jobs = records[(records["method"] == "kat") & (records["student"] == "small")]
    assert complete["mean"] == pytest.approx(jobs["length"].mean())
    assert complete["std"] == pytest.approx(jobs["length"].std())
    assert complete["paper"] == 456


def test_never_launched_seed_is_reported(records):
    without = records[~((records["method"] == "opd") & (records["seed"] == "1"))]
    tidy = aggregate(without, TableSpec.from_dict(TABLE1.table))
    opd = cell(tidy, "opd", "small", "avg@k")
    assert opd["missing"] == "seed=1 (no job)" and opd["expected"] == 2
    assert math.isnan(opd["mean"])


def test_teacher_row_is_shared_by_every_column(records):
    tidy = aggregate(records, TableSpec.from_dict(TABLE1.table), TABLE1.reference["values"])
    for column in ("small", "large"):
        teacher = cell(tidy, "teacher", column, "pass@k")
        assert teacher["n"] == 1 and teacher["paper"] == 68.96
        assert cell(tidy, "teacher", column, "length")["n"] == 0  # not applicable
    assert list(dict.fromkeys(tidy["row"]))[:3] == ["Teacher", "Student (before)", "OPD"]


def test_ratios_to_a_reference_row(records):
    table2 = load_spec("table2")
    tidy = aggregate(records, TableSpec.from_dict(table2.table), table2.reference["values"])
    assert set(tidy["method"]) == {"opd", "random_term", "fixed_prefix", "kat"}
    opd = cell(tidy, "opd", "small", "tokens_generated / OPD")
    assert opd["mean"] == pytest.approx(1.0)
    kat = cell(tidy, "kat", "small", "eflops / OPD")
    assert kat["paper"] == pytest.approx(1.30 / 1.98)


def test_compute_estimate():
    # 1000 rollouts x 1000 generated tokens, 400 kept: (2 + 16) 1e9 x 1e6 + 6e9 x 4e5 = 0.0204e18
    summary = {"rollouts": 1000, "mean_generated_length": 1000.0, "mean_kept_length": 400.0}
    assert compute_eflops(summary, {"student": 1e9, "teacher": 8e9}) == pytest.approx(0.0204)
    assert math.isnan(compute_eflops(summary, {"student": 1e9, "teacher": None}))


def test_writers(tmp_path, records):
    table = TableSpec.from_dict(TABLE1.table)
    tidy = aggregate(records, table, TABLE1.reference["values"])
    text = write_table(tidy, table, tmp_path / "table1", title=TABLE1.title, notes=["a note"])
    assert text.startswith("# Table 1") and "- a note" in text
    assert "missing cell KAT-OPD / large: seed=1 (failed)" in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "small avg@k (%)" in header and "| paper" in header
    assert "| 49.65" in text
    assert "\\multicolumn" in (tmp_path / "table1.tex").read_text()
    saved = pd.read_csv(tmp_path / "table1.csv")
    assert {"mean", "std", "n", "expected", "missing", "paper"} <= set(saved.columns)


@pytest.mark.parametrize("name", ["table1", "table2", "ablation_prefix", "ablation_stagewise"])
def test_figures(tmp_path, name):
    """Each figure kind draws from a synthetic table shaped like the spec's."""
    spec = load_spec(name)
    table = TableSpec.from_dict(spec.table)
    rows = [("opd", "-"), ("kat", "-"), ("fixed_prefix", "16"), ("fixed_prefix", "24")]
    tidy = pd.DataFrame(
        [
            {
                **dict(zip(table.rows, values[: len(table.rows)], strict=False)),
                "row": " ".join(values),
                "column": column,
                "measure": measure,
                "mean": float(i),
                "std": 0.5,
                "n": 2,
                "expected": 2,
                "missing": "",
                "paper": math.nan,
            }
            for i, values in enumerate(rows)
            for column in ("small", "large")
            for measure in table.measures
        ]
    )
    path = plot_figure(tidy, table, spec.figure, tmp_path / f"{name}.png", title=spec.title)
    assert path.stat().st_size > 1000


def test_scan_ignores_folders_without_a_job(tmp_path):
    shutil.copytree(FIXTURE / "smoke" / "table1" / "method=teacher", tmp_path / "a" / "job")
    (tmp_path / "b").mkdir()
    assert scan_records(tmp_path)["job"].tolist() == ["method=teacher"]
    assert scan_records(tmp_path / "b").empty
