"""The KAT threshold analysis (issue 23 item 2): counts recovered from a hand-made metrics.csv
and their sums by phase of training, against hand-computed values."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kat_research.analysis.kat_threshold import phase_table, read_metrics, step_counts

# 4 steps of 10 rollouts each (cumulative tokens 1000, 2000, 2800, 3600): steps 0-1 inactive,
# no cuts; steps 2-3 active at thresholds 0.2 and 0.1, 5 and 10 cut rows, kept 60 of 80
# tokens per rollout on average. A second row per step (an eval line) holds only its step.
ROWS = [
    # step, len/generated, len/kept, total, active, threshold, cut_rows, on_derailed,
    # dropped_on_derailed, uncut_correct, uncut_wrong, uncut_degenerate, uncut_capped
    (0, 100, 100, 1000, 0, 0.5, 0.0, None, None, 0.5, 0.5, 0.0, 0.0),
    (1, 100, 100, 2000, 0, 0.4, 0.0, None, None, 0.3, 0.7, 0.0, 0.0),
    (2, 80, 70, 2800, 1, 0.2, 0.5, 0.4, 0.25, 0.6, 0.4, 0.0, 0.0),
    (3, 80, 50, 3600, 1, 0.1, 1.0, 0.9, 0.75, None, None, None, None),
]
COLUMNS = [
    "step",
    "len/generated",
    "len/kept",
    "total/tokens_generated",
    "kat/active",
    "kat/threshold",
    "verdict/cut_rows",
    "verdict/cut_on_derailed",
    "verdict/dropped_on_derailed",
    "verdict/uncut_correct",
    "verdict/uncut_wrong",
    "verdict/uncut_degenerate",
    "verdict/uncut_capped",
]


@pytest.fixture
def run_dir(tmp_path):
    frame = pd.DataFrame(ROWS, columns=COLUMNS)
    extra = pd.DataFrame({"step": [0, 1, 2, 3], "val/accuracy": [0.1, 0.2, 0.3, 0.4]})
    (tmp_path / "csv").mkdir()
    pd.concat([frame, extra]).to_csv(tmp_path / "csv" / "metrics.csv", index=False)
    return tmp_path


def test_step_counts_recover_counts(run_dir):
    steps = step_counts(read_metrics(run_dir))
    assert steps["rows"].tolist() == [10, 10, 10, 10]
    assert steps["cut"].tolist() == [0, 0, 5, 10]
    assert steps["cut_derailed"].tolist() == [0, 0, 2, 9]
    assert steps["dropped"].tolist() == [0, 0, 100, 300]
    assert steps["dropped_derailed"].tolist() == [0, 0, 25, 225]
    assert steps["uncut_correct"].tolist() == [5, 3, 3, 0]


def test_phase_table_sums_by_phase(run_dir):
    steps = step_counts(read_metrics(run_dir))
    table = phase_table(steps, phases=2)
    early, late = table.loc[1], table.loc[2]
    assert (early["steps"], late["steps"]) == ("0-1", "2-3")
    assert early["active_steps"] == 0 and math.isnan(early["threshold_mean"])
    assert late["threshold_mean"] == pytest.approx(0.15)
    assert (late["threshold_min"], late["threshold_max"]) == (0.1, 0.2)
    assert late["cut_share"] == pytest.approx(15 / 20)
    assert late["cut_on_derailed"] == pytest.approx(11 / 15)
    assert late["dropped_on_derailed"] == pytest.approx(250 / 400)
    assert late["kept_per_rollout"] == pytest.approx(60.0)
    assert early["uncut_correct_share"] == pytest.approx(8 / 20)
    # a reference run generating 100 per rollout throughout: saved 0 early, 20 x 20 late
    reference = steps.assign(generated=steps["rows"] * 100)
    saved = phase_table(steps, phases=2, reference=reference)
    assert saved["saved"].tolist() == pytest.approx([0.0, 400.0])
    assert saved["saved_share"].tolist() == pytest.approx([0.0, 1.0])


def test_summary_check_sets_recovered_beside_exact_totals(run_dir):
    from kat_research.analysis.kat_threshold import summary_check

    table = phase_table(step_counts(read_metrics(run_dir)), phases=2)
    assert summary_check(run_dir, table) is None  # no summary.json
    verdicts = {
        "n_cut": 15,
        "n_cut_derailed": 11,
        "n_dropped_derailed": 250,
        "n_dropped_valid": 150,
    }
    (run_dir / "summary.json").write_text(json.dumps({"cut_verdicts": verdicts}))
    assert summary_check(run_dir, table) == (
        "recovered from the shares / logged exactly (summary.json): cut rows 15 / 15, cut on "
        "derailed prefixes 11 / 11, dropped tokens 400 / 400"
    )


def test_bad_inputs_are_named(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="total/tokens_generated"):
        step_counts(pd.DataFrame({"step": [0], "len/generated": [1.0], "len/kept": [1.0]}))
    with pytest.raises(ValueError, match="phases"):
        phase_table(step_counts(read_metrics(run_dir)), phases=0)


def test_run_writes_report_with_the_sweep_override(compose_config, run_dir, tmp_path):
    from kat_research.analysis.kat_threshold import run

    cfg = compose_config(
        f"run_dir={run_dir}",
        "phases=2",
        f"report={tmp_path}/kt.md",
        f"output_dir={tmp_path}/out",
        config_name="analysis_kat_threshold",
    )
    table = run(cfg, "test")
    assert len(table) == 2
    text = (tmp_path / "kt.md").read_text()
    assert "command: `test`" in text and "commit:" in text
    assert "kat_thresholds=[0.15]" in text
    assert len(pd.read_csv(tmp_path / "kt.csv")) == 2
