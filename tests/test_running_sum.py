"""The running-total testbed task: the split and space conditions of issue 20 on the full
configured splits, the phrasings and styles, solution lengths, the line verifier by hand, the
data source and evaluator, and (slow) the model recipe."""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from functools import cache

import pytest
import torch
from omegaconf import OmegaConf

from kat_research.building.stages import stage_settings
from kat_research.config import compose
from kat_research.data import running_sum as rs
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.runner import Completion
from kat_research.eval.tasks import RunningSumEvaluator, valid_line_share
from kat_research.models import build_char_tokenizer
from kat_research.models.tiny import COMPACT_CHAT_TEMPLATE


@cache
def configs():
    """The data preset, the evaluator preset and the model chain, as composed for runs."""
    train = compose(["data=running_sum", "eval=running_sum"])
    chain = compose([], config_name="testbed_models_running_sum")
    return train.data, train.eval, chain


@cache
def task() -> rs.RunningSumConfig:
    return rs.RunningSumConfig(**OmegaConf.to_container(configs()[0].source.task))


@cache
def train_rows(seed: int) -> list:
    """The data preset's training split drawn with ``seed``."""
    n = configs()[0].source.n
    return load_rows(SourceSpec(kind="running_sum", n=n, seed=seed, task=task()))[0]


@cache
def full_splits() -> tuple[list[rs.Problem], list[rs.Problem]]:
    """Every training problem the chain's stages draw (the data preset's split with each
    stage's seed) and every held-out problem the evaluator uses."""
    data, ev, chain = configs()
    seeds = sorted({s["sft"]["seed"] for s in stage_settings(chain).values()} | {data.source.seed})
    train = [rs.parse_problem(r.problem) for seed in seeds for r in train_rows(seed)]
    heldout = load_rows(
        SourceSpec(
            kind="running_sum",
            split="eval",
            n=ev.evaluator.n_problems,
            seed=ev.evaluator.seed,
            task=task(),
        )
    )[0]
    return train, [rs.parse_problem(r.problem) for r in heldout]


# ---- the split and space conditions, on the full splits --------------------------------


def shared_states(train: list[rs.Problem], heldout: list[rs.Problem]) -> set:
    """The states (running total, items left) occurring in both lists of problems. A train
    state's full tuple is built only when its (total, number of items left) matches a held-out
    state's, a necessary condition, so the exact overlap costs little."""
    heldout_states = {s for p in heldout for s in p.states()}
    keys = {(total, len(rest)) for total, rest in heldout_states}
    shared = set()
    for p in train:
        totals = [p.start, *p.totals()]
        for i, total in enumerate(totals):
            if (total, len(p.items) - i) in keys and (total, p.items[i:]) in heldout_states:
                shared.add((total, p.items[i:]))
    return shared


def test_shared_states_finds_a_planted_overlap():
    a, b = rs.Problem(1000, (10, 20, 30)), rs.Problem(1010, (20, 30))
    assert shared_states([a], [b]) == {(1010, (20, 30)), (1030, (30,)), (1060, ())}
    assert shared_states([a], [rs.Problem(1010, (30, 20))]) == {(1060, ())}
    assert shared_states([a], [rs.Problem(1000, (30, 20, 10))]) == {(1060, ())}
    assert not shared_states([a], [rs.Problem(1000, (11, 20, 30))])


def test_heldout_problems_share_no_state_with_training_problems():
    train, heldout = full_splits()
    assert len(heldout) >= 500
    overlap = shared_states(train, heldout)
    assert len(overlap) == 0, f"{len(overlap)} shared states, e.g. {sorted(overlap)[:3]}"
    assert not {p.answer for p in train} & {p.answer for p in heldout}  # nor a final answer


def test_pretraining_documents_hold_no_heldout_state():
    _, heldout = full_splits()
    chain = configs()[2]
    stages = stage_settings(chain).values()
    for seed in sorted({s["sft"]["seed"] for s in stages}):
        docs = rs.pretraining_documents(max(s["sft"]["n_documents"] for s in stages), seed, task())
        firsts = [d.split("\n")[0] for d in docs]
        problems = [rs.parse_problem(f) for f in firsts if re.fullmatch(r"\d+:[\d ]+", f)]
        assert len(problems) > len(docs) // 2
        assert not shared_states(problems, heldout)


def test_the_space_is_too_large_for_a_successor_table():
    cfg = task()
    n_items = cfg.item_max - cfg.item_min + 1
    n_problems = (cfg.start_max - cfg.start_min + 1) * sum(
        math.perm(n_items, k) for k in range(cfg.min_items, cfg.max_items + 1)
    )
    assert n_problems >= 10**5
    train, heldout = full_splits()
    assert len(set(train)) >= 10**5  # the chain trains on that many distinct problems
    values = {v for p in train + heldout for v in p.totals()}
    assert len(values) >= 10**4


def test_final_answers_spread_out():
    for problems in full_splits():
        counts = Counter(p.answer for p in problems)
        value, top = counts.most_common(1)[0]
        assert top / len(problems) <= 0.01, (value, top, len(problems))


def test_every_step_copies_from_the_context_and_computes_a_new_value():
    """The start's line copies the start; then each line's operands are the previous total (the
    line above) and the next prompt item, both already in the context; its result occurs
    nowhere before it (it must be computed)."""
    data = configs()[0]
    assert task().start_line
    rows = load_rows(SourceSpec(kind="running_sum", n=2000, seed=data.source.seed, task=task()))[0]
    for row in rows:
        problem = rs.parse_problem(row.problem)
        start_line, *lines = row.solution.split("\n")
        assert start_line == str(problem.start)
        assert len(lines) == len(problem.items) + 1  # the length is set by the problem
        previous = problem.start
        for i, line in enumerate(lines[:-1]):
            a, b, result = rs.parse_step(line)
            assert {a, b} == {previous, problem.items[i]}
            context = "\n".join([row.problem, start_line, *lines[:i]])
            assert str(previous) in re.findall(r"\d+", context)
            assert str(problem.items[i]) in row.problem.split(":")[1].split()
            assert str(result) not in re.findall(r"\d+", context)
            previous = result
        assert lines[-1] == rs.final_line(problem.answer)


def test_teacher_and_students_write_different_phrasing_mixes():
    chain = configs()[2]
    stages = stage_settings(chain)
    styles = {
        name: tuple(stages[stage]["sft"]["form_weights"]) for name, stage in chain.shipped.items()
    }
    assert styles["teacher"] != styles["student_large"]
    assert styles["teacher"] != styles["student_small"]
    problem = rs.Problem(5000, tuple(range(10, 34)))
    for weights in set(styles.values()):
        cfg = rs.RunningSumConfig(form_weights=weights, sum_first=task().sum_first)
        rng = random.Random(0)
        forms = Counter()
        for _ in range(200):
            for line in rs.solution_lines(problem, rng, cfg)[:-1]:
                forms["third" if " " in line else line.split("+")[0]] += 1
        # every phrasing is written, and their shares follow the style's odds
        first_form = sum(forms[str(t)] for t in [problem.start, *problem.totals()])
        total = sum(forms.values())
        assert abs(first_form / total - weights[0] / sum(weights)) < 0.03
        assert abs(forms["third"] / total - weights[2] / sum(weights)) < 0.03


def test_the_third_phrasing_writes_both_operands_first_and_all_four_are_accepted():
    assert not task().sum_first  # the preset's design
    assert rs.step_line(5237, 45, 2, sum_first=False) == "5237 + 45 = 5282"
    assert rs.step_line(5237, 45, 2, sum_first=True) == "5282=5237+45"
    assert rs.step_line(5237, 45, 1, sum_first=False) == "45+5237=5282"
    assert rs.parse_step("5237 + 45 = 5282") == (5237, 45, 5282)
    assert rs.parse_step("5237 + 45=5282") is None  # not a written phrasing
    problem = rs.Problem(5237, (45, 12))
    for sum_first in (True, False):  # a model of either design is graded the same
        cfg = rs.RunningSumConfig(start_line=True, sum_first=sum_first)
        for mixed in (
            "5237\n5282=5237+45\n5282 + 12 = 5294\n\\boxed{5294}",
            "5237\n45+5237=5282\n5294=5282+12\n\\boxed{5294}",
        ):
            assert rs.verify(problem, mixed, cfg).correct


def test_line_form_and_form_shares_by_hand():
    assert rs.line_form("52370+45=52415") == 0  # total first, even with a wrong sum
    assert rs.line_form("52370+45=99999") == 0
    assert rs.line_form("45+52370=52415") == 1
    assert rs.line_form("52370 + 45 = 52415") == 2
    assert rs.line_form("52415=52370+45") == 2  # the first design's third phrasing
    for other in ("52370", "\\boxed{52415}", "52370 + 45=52415", "a+b=c"):
        assert rs.line_form(other) is None
    # 2 total first, 1 item first, 1 spaced among 4 addition lines (start and box not counted)
    completions = ["52370\n52370+45=52415\n12+52415=52427\n\\boxed{52427}", "1+0=1\n3 + 4 = 7"]
    assert rs.form_shares(completions) == (0.5, 0.25, 0.25)
    assert rs.form_shares(["52370\n\\boxed{52370}"]) is None


def test_solution_lengths_in_tokens():
    data, ev, _ = configs()
    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    rows = train_rows(data.source.seed)
    lengths = [len(ids) for ids in tokenizer([r.solution for r in rows]).input_ids]
    # the "about 100-400 tokens": 139-447 in the preset's split (uniform phrasing odds)
    assert 100 <= min(lengths) and max(lengths) <= 450
    # the longest possible prompt and solution (24 items, every line the longest phrasing) fit
    # the data and document bounds, and the rollout cap leaves room for a loop to show
    cfg = rs.RunningSumConfig(**{**vars(task()), "form_weights": (0, 0, 1)})
    longest = rs.Problem(
        cfg.start_max, tuple(range(cfg.item_max, cfg.item_max - cfg.max_items, -1))
    )
    solution = "\n".join(rs.solution_lines(longest, random.Random(0), cfg))
    assert len(solution) + 1 < ev.evaluator.max_new_tokens  # + end of turn
    text = longest.text + "\n" + solution
    assert len(text) <= cfg.max_chars and len(text) + 4 <= data.max_length
    assert len(longest.text) + 3 <= data.max_prompt_tokens


def test_the_preset_keeps_every_problem_within_its_token_limits():
    """The data preset, built as a run builds it (prompts for OPD, prompt + solution for SFT),
    drops no problem as too long, and the tokenizer knows every character of the task."""
    from hydra.utils import instantiate

    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    data = configs()[0]
    for mode in ("prompts", "sft"):
        module = instantiate(data, source={"n": 2000}, mode=mode)
        module.attach_tokenizer(tokenizer)
        module.setup("fit")
        assert module.source.kind == "running_sum" and module.source.n == 2000
        assert module.stats["n_dropped_too_long"] == 0 and module.stats["n_rows"] == 2000
    text = "\n".join(r.problem + "\n" + r.solution for r in train_rows(data.source.seed)[:500])
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids


# ---- the verifier, by hand -------------------------------------------------------------

# 1000 + 10 = 1010, 1010 + 20 = 1030
PROBLEM = "1000:10 20"


@pytest.mark.parametrize(
    ("completion", "first_error", "offset"),
    [
        ("1000+10=1010\n1030=1010+20\n\\boxed{1030}", None, None),
        ("10+1000=1010\n20+1010=1030\n\\boxed{1030}\n", None, None),  # a trailing newline
        ("1000+10=1010\n1010+20=1040\n\\boxed{1040}", 1, 13 + len("1010+20=10")),
        ("1000+20=1020\n", 0, len("1000+")),  # a skipped item
        ("10+1000=1011", 0, len("10+1000=101")),  # wrong arithmetic, item first
        ("1000+10=1010", 1, len("1000+10=1010")),  # lines missing: the error is the text's end
        ("1000+10=1010\n1010+20=1030\n\\boxed{1030}\n1030+20=1050", 3, 39),  # text after the box
        ("1000+10=1010\n1010+20=1030\n\\boxed{1010}", 2, 26 + len("\\boxed{10")),
    ],
)
def test_verify_locates_the_first_error(completion, first_error, offset):
    verdict = rs.verify(PROBLEM, completion, rs.RunningSumConfig(start_line=False))
    assert verdict.correct == (first_error is None)
    assert verdict.first_error == first_error and verdict.error_offset == offset
    if first_error is not None:
        assert verdict.n_valid == first_error


@pytest.mark.parametrize(
    ("completion", "first_error", "offset"),
    [
        ("1000\n1000+10=1010\n1030=1010+20\n\\boxed{1030}", None, None),
        ("1000+10=1010\n1010+20=1030\n\\boxed{1030}", 0, len("1000")),  # no start line
        ("1001\n1001+10=1011", 0, len("100")),  # the start miscopied
        ("1000\n1000+10=1010\n1010+20=1040", 2, 18 + len("1010+20=10")),
        ("1000\n1000+10=1010\n\\boxed{1010}", 2, 18),  # boxed before the last item
    ],
)
def test_verify_with_the_start_line(completion, first_error, offset):
    verdict = rs.verify(PROBLEM, completion, rs.RunningSumConfig(start_line=True))
    assert verdict.first_error == first_error and verdict.error_offset == offset
    assert verdict.correct == (first_error is None)


def test_verify_accepts_every_drawn_solution_and_rejects_a_changed_digit():
    rows = load_rows(SourceSpec(kind="running_sum", split="eval", n=50, seed=3, task=task()))[0]
    for row in rows:
        assert rs.verify(row.problem, row.solution, task()).correct
        i = re.search(r"= ?(\d)", row.solution).start(1)  # first line's first digit after '='
        wrong = row.solution[:i] + str((int(row.solution[i]) + 1) % 10) + row.solution[i + 1 :]
        verdict = rs.verify(row.problem, wrong, task())
        assert not verdict.correct and verdict.first_error == task().start_line


def test_bad_settings_and_problems_are_named():
    with pytest.raises(ValueError, match="min_items"):
        rs.RunningSumConfig(min_items=10, max_items=5)
    with pytest.raises(ValueError, match="form_weights"):
        rs.RunningSumConfig(form_weights=(1, 1))
    with pytest.raises(ValueError, match="start:item"):
        rs.parse_problem("12 34")


# ---- source and evaluator --------------------------------------------------------------


def test_source_kind_running_sum():
    rows, stats = load_rows(SourceSpec(kind="running_sum", n=5, seed=0, task={"max_items": 10}))
    assert stats.n_read == 5 and rows[0].problem_id == "running_sum-train:0"
    assert all(len(rs.parse_problem(r.problem).items) <= 10 for r in rows)
    assert SourceSpec(kind="running_sum").task == rs.RunningSumConfig()


def test_evaluator_grades_with_the_verifier():
    ev = RunningSumEvaluator(n_problems=2, task=task())
    good = ev.rows[0].solution
    completions = [[Completion(good, 10, "eos")], [Completion("1+1=2", 5, "eos")]]
    records = ev.grade(completions)
    assert [r.correct for r in records] == [True, False]
    assert records[0].answer == ev.rows[0].answer
    # the first row: all lines valid; the second: none
    assert valid_line_share({r.problem_id: r.problem for r in ev.rows}, records, task()) == 0.5
    assert task().start_line  # the start's line, 4 valid item lines, then an error
    half = "\n".join(good.split("\n")[:5]) + "\n1+1=3"
    n_items = len(rs.parse_problem(ev.rows[0].problem).items)
    record = ev.grade([[Completion(half, 10, "eos")], [Completion(good, 1, "eos")]])[:1]
    assert valid_line_share({r.problem_id: r.problem for r in ev.rows}, record, task()) == (
        4 / n_items
    )


# ---- the recipe on tiny settings --------------------------------------------------------


@pytest.mark.slow
def test_running_sum_models_train(tmp_path):
    from kat_research.building.models import train_sft_model

    sft = {
        "pretrain_steps": 2,
        "n_documents": 20,
        "copy_fraction": 0.2,
        "steps": 2,
        "eval_every": 0,
        "eval_problems": 2,
        "target_accuracy": None,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "n_problems": 20,
        "seed": 0,
    }
    architecture = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    meta = train_sft_model(
        tmp_path / "m", architecture=architecture, sft=sft, task={}, kind="running_sum"
    )
    assert meta["sft_steps"] == 2 and 0 <= meta["running_sum/accuracy"] <= 1
    assert 0 <= meta["running_sum/valid_line_share"] <= 1  # the evaluator's progress metric


def test_eval_script_line_diagnosis_by_hand():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "eval_running_sum_model.py"
    spec = importlib.util.spec_from_file_location("eval_running_sum_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # problem 1: a right first line, then the right item with a wrong sum; problem 2: a right
    # first line, then text that is no addition (not counted)
    diagnosis = script.line_diagnosis(
        ["1000:10 20", "2000:30 40"],
        ["10+1000=1010\n1010+20=1031", "2030=2000+30\nnot a line"],
    )
    assert diagnosis == {
        "item_lines_parsed": 3,
        "right_item_share": 3 / 3,
        "right_sum_share": 2 / 3,
        "right_first_line_share": 2 / 2,
    }
    with_start = script.line_diagnosis(["1000:10 20"], ["1000\n10+1000=1010"], start_line=True)
    assert with_start["right_first_line_share"] == 1.0 and with_start["item_lines_parsed"] == 1
    # the start's first digits read as the item: the sum is right, the copy is not
    assert script.line_diagnosis(["2298:71 19"], ["22+2298=2320"]) == {
        "item_lines_parsed": 1,
        "right_item_share": 0.0,
        "right_sum_share": 1.0,
        "right_first_line_share": 0.0,
    }
    # the first wrong item line's error and phrasing (problem 1000:10 20 30, start line on)
    problem = rs.parse_problem("1000:10 20 30")
    kind = functools.partial(script.first_error_kind, problem, start_line=True)
    assert kind("1000\n1000+10=1010\n20+1010=1030\n1030 + 30 = 1060\n\\boxed{1060}") == ""
    assert kind("1000\n1000+10=1010\n1040=1010+30") == "item: another item of the list (sum first)"
    assert kind("1000\n1000+10=1010\n1031=1010+21") == "item: one digit miscopied (sum first)"
    assert kind("1000\n1000+10=1010\n1010+57=1067") == "item: both digits miscopied (total first)"
    assert kind("1000\n1000+10=1010\n1010 + 20 = 1031") == "sum wrong (total first, spaced)"
    assert kind("1000\n10+1000=1011") == "sum wrong (item first)"
    assert kind("1000\n1000+10=1010\n\\boxed{1010}") == "unreadable line"


def test_eval_script_interval_takes_problems_as_the_unit():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "eval_running_sum_model.py"
    spec = importlib.util.spec_from_file_location("eval_running_sum_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # per-problem means 1, 0.5, 0: mean 0.5, sample variance 0.25, SE sqrt(0.25 / 3)
    mean, half = script.clustered_interval([(2, 2), (2, 1), (2, 0)])  # (samples, correct)
    assert mean == 0.5 and half == pytest.approx(1.96 * (0.25 / 3) ** 0.5)
    # every problem at the same mean: no spread between problems, a zero-width interval
    assert script.clustered_interval([(2, 1), (2, 1)]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least 2 problems"):
        script.clustered_interval([(1, 1)])


def test_eval_script_per_problem_rows_by_hand():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "eval_running_sum_model.py"
    spec = importlib.util.spec_from_file_location("eval_running_sum_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    records = [
        {"benchmark": "running_sum", "problem_id": p, "correct": c, "length": n}
        for p, c, n in [("eval:1", True, 200), ("eval:0", False, 500), ("eval:1", False, 300)]
    ]
    table = script.per_problem_table(records)
    assert table.to_dict("records") == [  # evaluation order, not sorted
        {"problem_id": "eval:1", "samples": 2, "correct": 1, "mean_length": 250.0},
        {"problem_id": "eval:0", "samples": 1, "correct": 0, "mean_length": 500.0},
    ]


def test_eval_script_scores_every_item_digit_but_a_line_opener():
    import importlib.util
    from pathlib import Path

    from kat_research.data.sources import Row
    from kat_research.models.tiny import build_tiny_qwen3

    path = Path(__file__).parents[1] / "scripts" / "eval_running_sum_model.py"
    spec = importlib.util.spec_from_file_location("eval_running_sum_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    model = build_tiny_qwen3(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    # items 10 (after the total: 2 digits) and 20 (opening its line: 1 digit) and 30 (2 digits)
    solution = "1000\n1000+10=1010\n20+1010=1030\n1030 + 30 = 1060\n\\boxed{1060}"
    row = Row(problem_id="0", problem="1000:10 20 30", answer="1060", solution=solution)
    result = script.item_digit_confidence(model, tokenizer, [row], start_line=True)
    assert result["item_digits_scored"] == 5
    assert 0 < result["item_digit_mean_neg_log_p"] < 10


def test_an_interrupted_stage_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """A chain stage checkpoints (``checkpoint_every``) and a rerun continues its SFT from the
    checkpoint, with the batches and weights of an uninterrupted run; the checkpoints go once
    the stage is saved."""
    from kat_research.building.models import train_sft_model
    from kat_research.building.sft import SFTModule
    from kat_research.models import load_causal_lm

    sft = {
        "pretrain_steps": 1,
        "n_documents": 8,
        "copy_fraction": 0.2,
        "steps": 5,
        "eval_every": 0,
        "eval_problems": 1,
        "target_accuracy": None,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "n_problems": 8,
        "seed": 0,
    }
    architecture = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    settings = {"architecture": architecture, "sft": sft, "task": {}, "kind": "running_sum"}
    train_sft_model(tmp_path / "whole", **settings)  # no checkpoints
    step = SFTModule.training_step
    seen: list[int] = []

    def killed_at_step_3(module, batch, batch_idx):
        if module.global_step == 3 and module.trainer.max_steps == 5:  # the SFT fit only
            raise KeyError("killed")
        return step(module, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", killed_at_step_3)
    with pytest.raises(KeyError, match="killed"):
        train_sft_model(tmp_path / "cut", **settings, checkpoint_every=2)
    assert (tmp_path / "cut.checkpoints" / "last.ckpt").is_file()

    def recorded(module, batch, batch_idx):
        if module.trainer.max_steps == 5:
            seen.append(module.global_step)
        return step(module, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", recorded)
    meta = train_sft_model(tmp_path / "cut", **settings, checkpoint_every=2)
    assert seen == [2, 3, 4] and meta["resumed_from_step"] == 2 and meta["sft_steps"] == 5
    whole = load_causal_lm(str(tmp_path / "whole")).model.state_dict()
    resumed = load_causal_lm(str(tmp_path / "cut")).model.state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / "cut.checkpoints").exists()
