"""The trap analysis (issue 14, item 2): verdicts, cut scores and intervals against hand-computed
values, then the entry end to end on a tiny debug=fast KAT run, the figure redrawn from its
tables, and the SmolLM2 pair's entry (its config; end to end: slow)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from data_paths import FIXTURE_DATA

from kat_research.analysis.runs import kat_buffer, read_checkpoint
from kat_research.analysis.trap import analysis as trap_analysis
from kat_research.analysis.trap import smollm2, testbed_check
from kat_research.analysis.trap.analysis import StageRollouts, measure
from kat_research.analysis.trap.plot import read_results
from kat_research.analysis.trap.smollm2 import sft_solution
from kat_research.analysis.trap.verdicts import (
    LineVerifier,
    MathVerifier,
    Verdict,
    crosstab,
    free_text_category,
    ngram_repetition_onset,
    score_cuts,
    wilson_interval,
)
from kat_research.config import compose
from kat_research.data.collatz import CollatzTaskConfig, solution_text
from kat_research.termination import kat_rule
from kat_research.training.job import train

ROOT = Path(__file__).resolve().parent.parent


def test_ngram_rule_counts_non_overlapping_occurrences():
    assert ngram_repetition_onset([1, 2, 1, 2, 1, 2], n=2, repeats=3) == 4
    assert ngram_repetition_onset([1, 2, 1, 2, 3, 4], n=2, repeats=3) is None
    # a run of one token: (5, 5) counted at 0, 2, 4 (1 and 3 overlap the previous count)
    assert ngram_repetition_onset([5] * 6, n=2, repeats=3) == 4
    assert ngram_repetition_onset([5] * 5, n=2, repeats=3) is None
    with pytest.raises(ValueError, match="repeats"):
        ngram_repetition_onset([1], n=1, repeats=1)


@pytest.mark.parametrize(
    "answer_correct,stop,degenerate,expected",
    [
        (True, "eos", True, "correct"),  # correct wins
        (True, "max_tokens", False, "capped"),  # right answer but never stopped
        (True, "max_tokens", True, "degenerate"),
        (False, "eos", True, "degenerate"),
        (False, "max_tokens", False, "capped"),
        (False, "eos", False, "wrong"),
    ],
)
def test_free_text_category_priority(answer_correct, stop, degenerate, expected):
    assert free_text_category(answer_correct, stop, degenerate) == expected


def test_wilson_interval_hand_values():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(x != x for x in wilson_interval(0, 0))  # NaN for no observations
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_score_cuts_hand_counts():
    categories = ["correct", "correct", "correct", "wrong", "degenerate", "capped", "wrong"]
    cut = [True, False, False, True, True, False, False]
    s = score_cuts([*cut, False], [*categories, "correct"])
    assert (s["n_cut"], s["cut_derailed"], s["n_derailed"]) == (3, 2, 4)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(0.5)
    assert s["cut_rate_correct"] == pytest.approx(0.25)
    assert s["fisher_p"] == pytest.approx(1.0)  # [[2, 2], [1, 3]]: every table as likely or less
    assert (s["cut_rate_wrong"], s["cut_rate_degenerate"], s["cut_rate_capped"]) == (0.5, 1, 0)
    assert (s["recall_lo"], s["recall_hi"]) == pytest.approx(wilson_interval(2, 4))


def test_score_cuts_perfect_separation():
    s = score_cuts([False] * 5 + [True] * 5, ["correct"] * 5 + ["wrong"] * 5)
    assert s["precision"] == 1 and s["recall"] == 1 and s["cut_rate_correct"] == 0
    assert s["fisher_p"] == pytest.approx(2 / 252)  # two most extreme tables of C(10, 5)
    assert s["cut_rate_correct_hi"] == pytest.approx(0.4345, abs=1e-4)
    with pytest.raises(ValueError, match="unknown categories"):
        score_cuts([True], ["right"])


def test_crosstab_counts():
    table = crosstab(
        [True, True, False, False, False], ["correct", "wrong", "wrong", "capped", "correct"]
    )
    assert table.loc["with segment"].tolist() == [1, 1, 0, 0, 2]
    assert table.loc["without segment"].tolist() == [1, 1, 0, 1, 3]
    assert list(table.columns) == ["correct", "wrong", "degenerate", "capped", "total"]


def test_math_verifier_grades_the_answer_and_the_stop():
    texts = ["so \\boxed{4}", "so \\boxed{4} and so on", "the answer is \\boxed{5}", "x"]
    tokens = [[1, 2, 3], [1, 2, 3], [4, 5], [7, 8, 7, 8, 7, 8]]
    verdicts = MathVerifier(ngram=2, repeats=3).judge(
        ["p"] * 4, ["4", "4", "4", "4"], tokens, texts, ["eos", "max_tokens", "eos", "eos"]
    )
    assert [v.category for v in verdicts] == ["correct", "capped", "wrong", "degenerate"]
    assert [v.answer_correct for v in verdicts] == [True, True, False, False]
    assert verdicts[3].repetition_onset == 4


def test_collatz_verifier_uses_the_chain_verifier():
    task = CollatzTaskConfig()
    start = 29
    good = solution_text(start, random.Random(0), task)
    broken = good.replace("\\boxed", "\\boxd")
    verdicts = LineVerifier(task).judge(
        [str(start)] * 2, [None] * 2, [[], []], [good, broken], ["eos", "eos"]
    )
    assert [v.category for v in verdicts] == ["correct", "wrong"]


def _stage(buffer=None) -> StageRollouts:
    """Two rollouts: A dips below 0.5 at tokens 2-3, B never does."""
    traces = [
        torch.tensor([1.0, 1.0, 0.1, 0.1, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
    ]
    verdicts = [Verdict("degenerate", False, 3), Verdict("correct", True, None)]
    records = [
        {"problem_id": "a", "stop": "max_tokens", "length": 6, "text": "aaa"},
        {"problem_id": "b", "stop": "eos", "length": 4, "text": "b"},
    ]
    return StageRollouts("late", "step2", traces, verdicts, records, buffer)


def test_measure_segments_kl_and_cuts_by_hand():
    detector = kat_rule(window=2, stride=2, patience=1, quantile=0.7, threshold=0.5)
    results = measure([_stage()], detector, quantiles=[0.5])
    a, b = results.rollouts.itertuples()
    assert a.has_segment and a.onset == 2 and not b.has_segment
    assert a.mean_kl_before == pytest.approx(1.0)
    assert a.mean_kl_after == pytest.approx((0.1 + 0.1 + 1 + 1) / 4)
    run = results.cuts.set_index("threshold_label").loc["run"]
    assert run.threshold_source == "fixed" and run.threshold == 0.5
    assert (run.precision, run.recall, run.cut_rate_correct) == (1.0, 1.0, 0.0)
    # q0.5 of the rollouts' minima [0.1, 1.0] = 0.55 (no buffer): again only A is cut
    q = results.cuts.set_index("threshold_label").loc["q0.5"]
    assert q.threshold_source == "rollout minima" and q.threshold == pytest.approx(0.55)
    assert results.rollouts["cut_q0.5"].iloc[0] == 2
    assert pd.isna(results.rollouts["cut_q0.5"].iloc[1])
    all_rows = results.onsets.set_index(["category"]).loc["all"]
    assert all_rows.n == 2 and all_rows.n_segment == 1 and all_rows.onset_median == 2
    assert results.crosstab.set_index("segment").loc["with segment", "degenerate"] == 1


def test_measure_prefers_the_checkpoint_buffer():
    detector = kat_rule(window=2, stride=2, patience=1, quantile=0.5)
    results = measure([_stage(buffer=torch.tensor([0.0, 2.0]))], detector, quantiles=[0.9])
    cuts = results.cuts.set_index("threshold_label")
    assert set(cuts.threshold_source) == {"checkpoint buffer"}
    assert cuts.loc["run", "threshold"] == pytest.approx(1.0)  # median of [0, 2]
    assert cuts.loc["q0.9", "threshold"] == pytest.approx(1.8)
    # B's windows are exactly 1.0, not below the threshold 1.0: only A is cut
    assert results.rollouts.has_segment.tolist() == [True, False]


@pytest.fixture(scope="module")
def tiny_kat_run(tmp_path_factory, debug_config):
    run_dir = tmp_path_factory.mktemp("trap_run") / "kat"
    cfg = debug_config(
        run_dir,
        "method=kat",
        "trainer.max_steps=3",
        "rollout.max_new_tokens=16",
        "logger=csv",
        "export_student=false",
    )
    train(cfg)
    return run_dir


def test_entry_end_to_end_on_a_tiny_run(tiny_kat_run, tmp_path, capsys):
    out = tmp_path / "trap"
    cfg = compose(
        [
            f"run_dir={tiny_kat_run}",
            f"output_dir={out}",
            "analysis.rollouts.n=8",
            "analysis.rollouts.batch_size=4",
            "device=cpu",
        ],
        config_name="analysis_trap_analysis",
    )
    results = trap_analysis.run(cfg, command="pytest")
    rollouts = pd.read_csv(out / "rollouts.csv")
    assert len(rollouts) == 16 and list(dict.fromkeys(rollouts.checkpoint)) == ["step0", "last"]
    assert rollouts.length.le(16).all()
    # at the run's threshold the low-KL segment and KAT's cut are the same thing
    assert (rollouts.has_segment == rollouts.cut_run.notna()).all()
    assert (rollouts.onset.dropna() == rollouts.cut_run.dropna()).all()
    cuts = pd.read_csv(out / "cuts.csv").set_index(["stage", "threshold_label"])
    assert cuts.loc[("early", "run"), "threshold_source"] == "rollout minima"  # untrained
    assert cuts.loc[("late", "run"), "threshold_source"] == "checkpoint buffer"
    buffer = kat_buffer(read_checkpoint(tiny_kat_run / "checkpoints" / "last.ckpt")["terminator"])
    assert cuts.loc[("late", "q0.9"), "threshold"] == pytest.approx(
        float(torch.quantile(buffer, 0.9))
    )
    for stage, df in rollouts.groupby("stage"):  # the scores recount from the rollouts
        row = cuts.loc[(stage, "run")]
        assert row.n_cut == df.cut_run.notna().sum() and row.n == len(df)
        assert row.n_derailed == (df.category != "correct").sum()
    tab = pd.read_csv(out / "crosstab.csv")
    assert tab.groupby("stage").total.sum().tolist() == [8, 8]
    assert (out / "trap_analysis.png").stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert "command: `pytest`" in text and "N = 8" in text and "commit:" in text
    assert set(results.rollouts.category) <= {"correct", "wrong", "degenerate", "capped"}
    assert "KAT's offline cuts" in capsys.readouterr().out
    # the figure can be redrawn from the written tables alone (kat_research.analysis.trap.plot),
    # writing nothing where it is launched
    (out / "trap_analysis.png").unlink()
    launch = tmp_path / "launch"
    launch.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "kat_research.analysis.trap.plot", f"folders=[{out}]"]
    done = subprocess.run(cmd, cwd=launch, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "trap_analysis.png").stat().st_size > 1000
    assert f"wrote {out / 'trap_analysis.png'}" in done.stdout and not any(launch.iterdir())


def test_redrawing_a_folder_without_the_tables_names_what_is_missing(tmp_path):
    (tmp_path / "cuts.csv").write_text("stage\n")
    with pytest.raises(FileNotFoundError, match=r"no rollouts.csv, crosstab.csv, onsets.csv \(set"):
        read_results(tmp_path)


# --- the SmolLM2 pair (kat_research.analysis.trap.smollm2) ---------------------------------------


def test_smollm2_sft_target_follows_the_prompts_instruction():
    answer = "Half of 48 is <<48/2=24>>24.\n#### 24"
    assert sft_solution(answer) == "Half of 48 is 24.\nThe final answer is \\boxed{24}."
    with pytest.raises(ValueError, match="without a '####' line"):
        sft_solution("no final line")


def test_smollm2_entry_composes_its_train_config():
    """The entry's knobs reach the train config it reads; extra overrides come last."""
    cfg = compose(
        [
            f"paths.data_dir={FIXTURE_DATA}",
            "student_layers=12",
            "max_new_tokens=64",
            'extra_train_overrides=["termination.kat.quantile=0.9"]',
        ],
        config_name="analysis_smollm2_trap",
    )
    train_cfg = smollm2.train_config(cfg)
    assert train_cfg.model.student.num_layers == 12 and train_cfg.rollout.max_new_tokens == 64
    assert train_cfg.paths.data_dir == str(FIXTURE_DATA)  # the entry's paths reach the run's
    assert train_cfg.data.source.path == f"{FIXTURE_DATA}/gsm8k/test.jsonl"  # held out from SFT
    kat = train_cfg.termination.kat
    assert (kat.window, kat.stride, kat.patience, kat.quantile) == (16, 8, 2, 0.9)
    with pytest.raises(ValueError, match="teacher_accuracy must be >= 0"):
        smollm2.train_config(compose(["teacher_accuracy=-1"], config_name="analysis_smollm2_trap"))
    missing = compose(["paths.data_dir=/nonexistent"], config_name="analysis_smollm2_trap")
    with pytest.raises(FileNotFoundError, match="set paths.data_dir"):
        smollm2.train_config(missing)


@pytest.mark.slow
def test_smollm2_entry_runs_the_sft_then_the_analysis(tmp_path):
    """The real pair, shrunk: a 2-layer student, 2 SFT steps, 2 rollouts of up to 24 tokens."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = compose(
        [
            f"output_dir={out}",
            f"paths.data_dir={FIXTURE_DATA}",
            f"paths.cache_dir={cache}",
            "student_layers=2",
            "sft.steps=2",
            "sft.batch_size=2",
            "rollouts=2",
            "batch_size=2",
            "max_new_tokens=24",  # KAT's window is 16
        ],
        config_name="analysis_smollm2_trap",
    )
    smollm2.run(cfg, command="pytest")
    rows = pd.read_csv(out / "rollouts.csv")
    assert len(rows) == 2 and rows.length.le(24).all()
    text = (out / "summary.md").read_text()
    assert "command: `pytest`" in text and "first 2 layers after 2 SFT steps x 2" in text
    (sft,) = (cache / "trap_analysis").glob("smollm2-gsm8k-sft-*/sft.json")
    assert '"steps": 2' in sft.read_text()


def test_testbed_trap_check_entry_on_the_shipped_models(tmp_path, capsys):
    """The testbed check on the committed models, 8 short rollouts; its KAT rule is the train
    config's termination.kat (scale=tiny: W=16, stride 8, patience 2) at each quantile."""
    out = tmp_path / "check"
    cfg = compose(
        [f"output_dir={out}", "rollouts=8", "batch_size=8", "max_new_tokens=32", "quantiles=[0.7]"],
        config_name="analysis_testbed_trap_check",
    )
    summary = testbed_check.run(cfg, command="pytest")
    assert summary["command"] == "pytest"
    assert summary["rule"].startswith("window 16, stride 8, patience 2, exempt 0")
    assert sum(summary["categories"].values()) == 8
    assert set(summary["kat"]) == {"0.7"} and summary["kat"]["0.7"]["threshold"] > 0
    rows = pd.read_csv(out / "rollouts.csv")
    assert len(rows) == 8 and rows.length.le(32).all() and "cut_q0.7" in rows
    assert "forced-loop copy index" in (out / "summary.md").read_text()
    assert "| quantile q |" in capsys.readouterr().out
