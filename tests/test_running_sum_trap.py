"""The running-total task in the trap machinery: first-error locator, repetition rule, the trap
check's per-task pieces and verifier on hand-computed completions, and the
testbed trap check end to end on tiny random-init models."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from kat_research.analysis.trap import check as tc
from kat_research.analysis.trap import testbed_check
from kat_research.analysis.trap.tasks import RunningSumTrap, task_config, trap_task
from kat_research.analysis.trap.verdicts import LineVerifier, make_verifier
from kat_research.config import compose
from kat_research.data import running_sum
from kat_research.data.first_error import RunningSumFirstError, first_error_task

CFG = running_sum.RunningSumConfig()
FIRST = RunningSumFirstError(CFG)
# 1000:12 34 -> totals 1012, 1046. Lines: chars 0-11 (newline 12), 13-24 (newline 25), 26-37
PROBLEM = "1000:12 34"
CORRECT = "1000+12=1012\n1012+34=1046\n\\boxed{1046}"


@pytest.mark.parametrize(
    "problem,completion,error",
    [
        (PROBLEM, CORRECT, None),
        (PROBLEM, "12+1000=1012\n1046=1012+34\n\\boxed{1046}", None),  # other phrasings
        (PROBLEM, "1000+12=1012\n1012+34=1047\n\\boxed{1047}", 13),  # wrong sum
        (PROBLEM, "1000+34=1034", 0),  # the wrong item
        (PROBLEM, "1000+12=1012\n1012+3", None),  # unfinished, can still be right
        (PROBLEM, "1000+12=1012\n1012+5", 13),  # unfinished, cannot
        (PROBLEM, "1000+12=1012\n\\boxed{1012}", 13),  # boxed before the last item
        (PROBLEM, CORRECT + "\n\n", None),  # only newlines after the box
        (PROBLEM, CORRECT + "\nx", 39),  # text after the box
        (PROBLEM, "\n1000+12=1012", 0),  # a leading newline, as verify rejects it
        (PROBLEM, "", None),
    ],
)
def test_running_sum_first_error_on_hand_computed_cases(problem, completion, error) -> None:
    assert FIRST.first_error(problem, completion) == error


@pytest.mark.parametrize(
    "completion,error",
    [
        ("1000\n" + CORRECT, None),
        ("10", None),  # unfinished start line, can still be right
        ("1001\n", 0),  # the start miscopied
        (CORRECT, 0),  # no start line
        ("1000\n1000+12=1012\n1012+34=1047", 18),
    ],
)
def test_running_sum_first_error_with_the_start_line(completion, error) -> None:
    first = RunningSumFirstError(running_sum.RunningSumConfig(start_line=True))
    assert first.first_error(PROBLEM, completion) == error


def test_running_sum_start_line_shifts_the_wrong_result_and_probe_lines() -> None:
    task = RunningSumTrap(running_sum.RunningSumConfig(start_line=True))
    assert task.wrong_result(PROBLEM, 0, "1001") is None  # the start's line adds nothing
    assert task.wrong_result(PROBLEM, 2, "1012+34=1047") == (1047, 1046)
    lines = task.probe_lines(PROBLEM, 2, random.Random(0))
    assert lines[0] == "1000" and running_sum.parse_step(lines[1])[2] == 1012
    assert task.probe_lines(PROBLEM, 4, random.Random(0)) is None  # start + 2 items only


@pytest.mark.parametrize(
    "problem,completion,line",
    [
        (PROBLEM, CORRECT, None),
        # verbatim loop: the second line's third copy
        (PROBLEM, "1000+12=1012\n1012+34=1046\n1012+34=1046\n1012+34=1046", 3),
        # the same total in three phrasings (result 1012 and item 12 a third time)
        (PROBLEM, "1000+12=1012\n12+1000=1012\n1012=1000+12", 2),
        # the list cycled: item 12 added a third time on line 4 (texts and results differ)
        (PROBLEM, "1000+12=1012\n1012+34=1046\n1046+12=1058\n1058+34=1092\n1092+12=1104", 4),
        # one item added twice (the place lost once): wrong, not a loop
        (PROBLEM, "1000+12=1012\n1012+12=1024\n1024+34=1058", None),
        # empty lines do not count
        (PROBLEM, "\n\n\n1000+12=1012", None),
    ],
)
def test_running_sum_repetition_rule_by_hand(problem, completion, line) -> None:
    assert running_sum.repetition_onset(problem, completion) == line


@pytest.mark.parametrize(
    "problem,completion,stop,category",
    [
        (PROBLEM, CORRECT, "eos", "correct"),
        (PROBLEM, "1000+12=1012\n1012+34=1047\n\\boxed{1047}", "eos", "wrong"),
        (
            PROBLEM,
            "1000+12=1012\n1012+34=1046\n1012+34=1046\n1012+34=1046",
            "max_tokens",
            "degenerate",
        ),
        (PROBLEM, "1000+12=1012\n1012+34=1046\n1046+", "max_tokens", "capped"),
    ],
)
def test_running_sum_category_equals_the_trap_check(problem, completion, stop, category) -> None:
    assert FIRST.category(problem, completion, stop) == category
    assert tc.classify(problem, completion, stop, CFG).category == category


def test_running_sum_classify_positions_by_hand() -> None:
    wrong = "1000+12=1012\n1012+34=1047\n\\boxed{1047}"
    v = tc.classify(PROBLEM, wrong, "eos", CFG)
    assert (v.onset, v.after, v.loop_onset) == (13, 26, None)
    loop = "1000+12=1012\n1012+34=1046\n1012+34=1046\n1012+34=1046"
    v = tc.classify(PROBLEM, loop, "max_tokens", CFG)
    # verify rejects line 2 (the box is due); the rule fires on line 3
    assert (v.category, v.onset, v.after, v.loop_onset) == ("degenerate", 26, 39, 39)


def test_running_sum_carry_forward_by_hand() -> None:
    problem = "1000:12 34 56"  # totals 1012, 1046, 1102
    wrong = "1000+12=1012\n1012+34=1047\n1047+56=1103\n56+1047=1103\n\\boxed{1103}"
    # after line 1 (1047): 1047+56=1103 carries it; 56+1047=1103 does not start from 1103
    assert tc.carried_forward_share(wrong, 1, CFG) == pytest.approx(1 / 2)
    prefix, got, right = tc.error_prefixes(problem, wrong, CFG)
    assert (prefix, got, right) == ("1000+12=1012\n1012+34=1047\n", 1047, 1046)
    assert tc.continuation_kind("1047+56=1103", 1047, 1046, CFG) == "carried"
    assert tc.continuation_kind("56+1046=1102", 1047, 1046, CFG) == "reverted"
    assert tc.continuation_kind("1046+56=1103", 1047, 1046, CFG) == "other"  # bad sum
    # a first error that adds the wrong item: no wrong-result prefix
    assert tc.error_prefixes(problem, "1000+12=1012\n1012+56=1068\n1068+34=1102", CFG) is None
    assert tc.error_prefixes(problem, "1000+12=1012\n1012+34=1047", CFG) is None  # nothing after


def test_running_sum_probe_lines_are_a_correct_solution() -> None:
    problem = "1000:12 34 56"
    task = RunningSumTrap(CFG)
    lines = task.probe_lines(problem, 3, random.Random(0))
    text = "\n".join([*lines, running_sum.final_line(1102)])
    assert running_sum.verify(problem, text, CFG).correct
    assert task.probe_lines(problem, 4, random.Random(0)) is None  # only 3 items
    short = running_sum.RunningSumConfig(min_items=3, max_items=5)
    for p in trap_task(short).probe_problems("eval", 3):
        assert 3 <= len(running_sum.parse_problem(p).items) <= 5


def test_running_sum_verifier_and_first_error_task_from_the_data_source() -> None:
    source = {"kind": "running_sum", "task": {"max_items": 12}}
    assert isinstance(first_error_task(source), RunningSumFirstError)
    assert task_config(source) == running_sum.RunningSumConfig(max_items=12)
    verifier = make_verifier(source, ngram=10, repeats=3, timeout_s=1.0)
    assert isinstance(verifier, LineVerifier) and "running_sum" in verifier.name
    assert verifier.task == running_sum.RunningSumConfig(max_items=12)
    texts = [CORRECT, "1000+12=1012\n1012+34=1047"]
    verdicts = verifier.judge([PROBLEM] * 2, ["1046"] * 2, [[], []], texts, ["eos", "eos"])
    assert [v.category for v in verdicts] == ["correct", "wrong"]
    with pytest.raises(ValueError, match="data=running_sum"):
        task_config({"kind": "synthetic"})


def test_cut_positions_by_hand() -> None:
    cuts = tc.OfflineCuts(0.1, [None, 30, 10, 40, 5])
    verdicts = [
        tc.RolloutVerdict("correct", None, None, None),
        tc.RolloutVerdict("wrong", 20, 30, None),  # cut 10 tokens after the error starts
        tc.RolloutVerdict("degenerate", 26, 39, 39),  # cut 16 tokens before it
        tc.RolloutVerdict("capped", 40, 52, None),  # cut exactly at it
        tc.RolloutVerdict("correct", None, None, None),  # a cut correct rollout: not counted
    ]
    assert tc.cut_offsets(cuts, verdicts) == [10, -16, 0]
    pos = testbed_check.cut_positions(cuts, verdicts)
    assert pos["n_cut_with_error"] == 3 and pos["segment_after_error"] == pytest.approx(2 / 3)
    assert pos["segment_after_error_lo"] < 2 / 3 < pos["segment_after_error_hi"]
    assert (pos["cut_minus_error_q1"], pos["cut_minus_error_median"]) == (-8.0, 0.0)
    assert pos["cut_minus_error_q3"] == 5.0


def test_check_settings_fail_before_models_load(tmp_path) -> None:
    base = ["rollouts=2", f"output_dir={tmp_path}"]
    both = compose(
        [*base, f"student_dir={tmp_path}", "student_checkpoint=x.ckpt"],
        config_name="analysis_testbed_trap_check",
    )
    with pytest.raises(ValueError, match="not both"):
        testbed_check.check_settings(both)
    missing = compose([*base, f"teacher_dir={tmp_path}"], config_name="analysis_testbed_trap_check")
    with pytest.raises(FileNotFoundError, match="teacher_dir"):
        testbed_check.check_settings(missing)
    ckpt = compose(
        [*base, f"student_checkpoint={tmp_path}/no.ckpt"], config_name="analysis_testbed_trap_check"
    )
    with pytest.raises(FileNotFoundError, match="student_checkpoint"):
        testbed_check.check_settings(ckpt)


def test_student_checkpoint_replaces_the_configured_students_weights(tmp_path) -> None:
    train_cfg = compose(["model/student=tiny_random", f"paths.cache_dir={tmp_path / 'cache'}"])
    student = instantiate(train_cfg.model.student)
    state = {f"student.{k}": v + 1.0 for k, v in student.model.state_dict().items()}
    path = tmp_path / "step2.ckpt"
    torch.save({"state_dict": state}, path)
    cfg = compose([f"student_checkpoint={path}"], config_name="analysis_testbed_trap_check")
    loaded = testbed_check.load_student(cfg, train_cfg)
    assert loaded.name == str(path)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[f"student.{k}"])


def test_testbed_trap_check_on_running_sum_with_tiny_models(tmp_path, tiny_dirs, capsys):
    """The whole check for data=running_sum on random-init models, 4 short rollouts."""
    out = tmp_path / "check"
    overrides = "['data=running_sum','eval=running_sum']"
    cfg = compose(
        [
            f"output_dir={out}",
            f"train_overrides={overrides}",
            f"teacher_dir={tiny_dirs['teacher']}",
            f"student_dir={tiny_dirs['student']}",
            "rollouts=4",
            "batch_size=4",
            "max_new_tokens=32",
            "quantiles=[0.7]",
            "probe_problems.eval=2",
            "probe_problems.train=2",
        ],
        config_name="analysis_testbed_trap_check",
    )
    summary = testbed_check.run(cfg, command="pytest")
    assert summary["task"] == "running_sum" and summary["student"]["name"] == tiny_dirs["student"]
    assert sum(summary["categories"].values()) == 4
    assert sum(summary["shares"][c] for c in tc.CATEGORIES) == pytest.approx(1.0)
    assert len(summary["forced_loop"]["teacher"]) == 7  # copies 0..6
    kat = summary["kat"]["0.7"]
    assert {"precision", "recall_lo", "segment_after_error", "cut_minus_error_median"} <= set(kat)
    rows = pd.read_csv(out / "rollouts.csv")
    assert len(rows) == 4 and rows.length.le(32).all()
    assert all(running_sum.parse_problem(p).items for p in rows.start)
    text = (out / "summary.md").read_text()
    assert "task running_sum" in text and "precision [95%]" in text
    assert "| quantile q |" in capsys.readouterr().out
