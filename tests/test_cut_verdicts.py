"""Cut verdicts: the testbed's first-error locator, each row's verdict and the step's counts on
hand-computed values, and the verdicts logged while training (CSV, summary.json)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kat_research.analysis.trap.check import classify
from kat_research.data.collatz import CollatzTaskConfig
from kat_research.data.first_error import CollatzFirstError, first_error_task
from kat_research.lit.cut_verdicts import (
    COUNTS,
    decoded,
    judge_row,
    run_summary,
    verdict_counts,
    verdict_metrics,
)
from kat_research.training.job import train

TASK = CollatzTaskConfig()  # x even -> x/2, x odd -> 3x-1, stop below 5
COLLATZ = CollatzFirstError(TASK)
# from 12: 12/2=6 (chars 0-5, newline 6), 6:2=3 (7-11, newline 12), \boxed{3} (13-21)
CORRECT = "12/2=6\n6:2=3\n\\boxed{3}"
LOOP = "10/2=5\n3*5-1=14\n14/2=7\n3*7-1=20\n20/2=10\n10/2=5\n3*5-1=14\n14/2=7\n3*7-1=20\n20/2=10"


@pytest.mark.parametrize(
    "problem,completion,error",
    [
        ("12", CORRECT, None),
        ("12", "12/2=6\n3=6/2\n\\boxed{3}", None),  # the result-first phrasing
        ("12", "12/2=6\n6/2=4\n\\boxed{4}", 7),
        ("12", "12/2=6\n6:2", None),  # an unfinished line that can still be right
        ("12", "12/2=6\n6:3", 7),  # one that cannot
        ("12", CORRECT + "\n", None),
        ("12", CORRECT + "\nx", 23),  # text after the box
        ("12", "12/2=6\n\n6:2=3", 7),  # an empty line inside the chain
        ("12", "\n12/2=6", None),  # leading newlines are skipped, as verify does
        ("12", "\nx", 1),
        ("12", "", None),
        ("10", LOOP, None),  # valid steps that never stop: no error, but degenerate
        ("12", "12/2=6\n6:2=3\n3=", 13),  # the chain stopped: only the box may follow
    ],
)
def test_collatz_first_error_on_hand_computed_cases(problem, completion, error) -> None:
    assert COLLATZ.first_error(problem, completion) == error


@pytest.mark.parametrize(
    "problem,completion,stop",
    [
        ("12", CORRECT, "eos"),
        ("12", "12/2=6\n6/2=4\n\\boxed{4}", "eos"),
        ("10", LOOP, "max_tokens"),
        ("12", "12/2=6\n6/2=4\n4/2=2\n2/2=1", "max_tokens"),
        ("12", CORRECT + "\nx", "eos"),
    ],
)
def test_collatz_category_equals_the_trap_check(problem, completion, stop) -> None:
    assert (
        COLLATZ.category(problem, completion, stop)
        == classify(problem, completion, stop, TASK).category
    )


def test_first_error_task_of_each_data_source() -> None:
    assert isinstance(first_error_task({"kind": "collatz", "task": {}}), CollatzFirstError)
    assert first_error_task({"kind": "synthetic"}) is None


def test_decoded_maps_characters_to_tokens() -> None:
    class Pieces:
        def decode(self, ids):
            return {1: "ab", 2: "c", 3: "de"}[ids[0]]

    text, ends = decoded(Pieces(), [1, 2, 3, 2], {})
    assert (text, ends) == ("abcdec", [2, 3, 5, 6])


def _row(problem: str, text: str, kept: int, stop: str):
    return judge_row(COLLATZ, problem, text, list(range(1, len(text) + 1)), kept, stop)


def test_cut_verdicts_on_hand_computed_rows() -> None:
    rows = [
        # error line starts at token 7, kept 10: derailed, 3 tokens past it, 5 dropped
        _row("12", "12/2=6\n6/2=4\n\\b", 10, "terminated"),
        # no error, kept 5 of 13: valid, 8 dropped
        _row("12", "12/2=6\n6:2=3\n", 5, "terminated"),
        # cut exactly at the error line (kept 7 = e): valid, 0 past it, 5 dropped
        _row("12", "12/2=6\n6/2=4", 7, "terminated"),
        _row("12", CORRECT, len(CORRECT), "eos"),
        _row("12", "12/2=6\n6/2=4\n\\boxed{4}", 22, "eos"),
    ]
    assert [r.error for r in rows] == [7, None, 7, None, 7]
    assert [r.cut for r in rows] == [True, True, True, False, False]
    counts = verdict_counts(rows)
    assert counts == {
        "rows": 5,
        "cut": 3,
        "cut_derailed": 1,
        "cut_with_error": 2,
        "cut_minus_error_sum": 3,
        "dropped_derailed": 5,
        "dropped_valid": 13,
        "uncut": 2,
        "uncut_correct": 1,
        "uncut_wrong": 1,
        "uncut_degenerate": 0,
        "uncut_capped": 0,
    }
    assert verdict_metrics(counts) == pytest.approx(
        {
            "verdict/cut_rows": 0.6,
            "verdict/cut_on_derailed": 1 / 3,
            "verdict/cut_minus_error": 1.5,
            "verdict/dropped_on_derailed": 5 / 18,
            "verdict/dropped_on_valid": 13 / 18,
            "verdict/uncut_correct": 0.5,
            "verdict/uncut_wrong": 0.5,
            "verdict/uncut_degenerate": 0.0,
            "verdict/uncut_capped": 0.0,
        }
    )


def test_a_row_capped_by_the_rule_is_cut_without_dropping() -> None:
    row = _row("12", "12/2=6\n6/2", 10, "terminated")  # FixedPrefix: kept = generated
    counts = verdict_counts([row])
    assert row.cut and counts["cut"] == 1 and counts["dropped_valid"] == 0
    metrics = verdict_metrics(counts)
    assert math.isnan(metrics["verdict/dropped_on_valid"])
    assert math.isnan(metrics["verdict/uncut_correct"])


def test_run_summary_sums_steps() -> None:
    step = verdict_counts([_row("12", "12/2=6\n6/2=4", 7, "terminated")])
    totals = {f"verdict/{k}": 2 * v for k, v in step.items()} | {"rollouts": 2}
    summary = run_summary(totals)
    assert summary["n_rows"] == 2 and summary["n_cut"] == 2 and summary["cut_rows"] == 1.0
    assert summary["cut_minus_error"] == 0.0 and set(COUNTS) <= {k[2:] for k in summary}
    assert run_summary({"rollouts": 2}) is None


@pytest.mark.parametrize("data", ["collatz", "running_sum"])
def test_training_logs_cut_verdicts(debug_config, tmp_path, data) -> None:
    summary = train(debug_config(tmp_path, f"data={data}", "method=kat", "logger=csv"))
    verdicts = summary["cut_verdicts"]
    assert verdicts["n_rows"] == 2 * 4 * 2
    assert verdicts["n_cut"] + verdicts["n_uncut"] == verdicts["n_rows"]
    assert json.loads((tmp_path / "summary.json").read_text())["cut_verdicts"] == verdicts
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv").dropna(subset=["verdict/cut_rows"])
    assert len(metrics) == 2
    n_cut = (metrics["verdict/cut_rows"] * 8).round().sum()
    assert n_cut == verdicts["n_cut"]


def test_no_verdicts_without_a_verifier_or_when_off(debug_config, tmp_path) -> None:
    assert train(debug_config(tmp_path / "a", "method=kat"))["cut_verdicts"] is None
    off = debug_config(tmp_path / "b", "data=collatz", "method=kat", "cut_verdicts=false")
    assert train(off)["cut_verdicts"] is None


def test_verdict_series_collects_jobs_and_plots(tmp_path) -> None:
    from kat_research.tables.plots import verdict_figure
    from kat_research.tables.verdicts import verdict_series

    for name, cut in (("a", [0.5, 0.25]), ("b", [0.0, 1.0])):
        (tmp_path / name / "csv").mkdir(parents=True)
        pd.DataFrame(  # Lightning writes one row per log call: verdicts and others apart
            {
                "step": [0, 0, 1, 1],
                "train/loss": [1.0, None, 0.5, None],
                "verdict/cut_rows": [None, cut[0], None, cut[1]],
                "verdict/cut_on_derailed": [None, 1.0, None, None],
            }
        ).to_csv(tmp_path / name / "csv" / "metrics.csv", index=False)
    records = pd.DataFrame(
        {
            "job": ["method=kat,seed=0", "method=kat,seed=1", "method=teacher"],
            "kind": ["train", "train", "evaluate"],
            "method": ["kat", "kat", "teacher"],
            "seed": [0, 1, None],
            "folder": [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")],
        }
    )
    series = verdict_series(records)
    assert list(series.columns) == [
        "job",
        "method",
        "seed",
        "step",
        "verdict/cut_rows",
        "verdict/cut_on_derailed",
    ]
    assert series["verdict/cut_rows"].tolist() == [0.5, 0.25, 0.0, 1.0]
    assert series["step"].tolist() == [0, 1, 0, 1]
    png = verdict_figure(series, tmp_path / "v.png", title="verdicts")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert verdict_series(records.iloc[2:]).empty
