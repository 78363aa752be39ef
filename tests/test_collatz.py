"""The long-horizon testbed task: generator, verifier, repetition rule, pre-training documents,
the trap-check statistics on hand-made traces, and (slow) the model recipe."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import pytest
import torch

from kat_research.analysis.trap import check as tc
from kat_research.data import collatz as lt
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.data.synthetic import ArithmeticTaskConfig
from kat_research.termination import kat_rule

CFG = lt.CollatzTaskConfig()
# 29 -> 86 -> 43 -> 128 -> 64 -> 32 -> 16 -> 8 -> 4, by hand: 3*29-1=86, 3*43-1=128, halvings
SOLUTION_29 = (
    "3*29-1=86\n43=86/2\n43*3-1=128\n128:2=64\n64/2=32\n16=32/2\n16/2=8\n8:2=4\n\\boxed{4}"
)


def test_trajectory_and_phrasings_by_hand():
    assert lt.trajectory(29, CFG) == [29, 86, 43, 128, 64, 32, 16, 8, 4]
    assert lt.trajectory(12, CFG) == [12, 6, 3]
    assert lt.trajectory(7, CFG) is None  # 7 -> 20 -> 10 -> 5 -> 14 -> 7: a cycle
    assert lt.trajectory(17, CFG) is None  # the 18-value cycle from 17
    assert [lt.step_line(29, f, CFG) for f in range(3)] == ["3*29-1=86", "29*3-1=86", "86=3*29-1"]
    assert [lt.step_line(86, f, CFG) for f in range(3)] == ["86/2=43", "86:2=43", "43=86/2"]
    assert lt.parse_step("86=3*29-1", CFG) == (29, 86)
    assert lt.parse_step("43=86/2", CFG) == (86, 43)
    assert lt.parse_step("86/3=43", CFG) is None
    assert 29 in lt.valid_starts(CFG) and 12 not in lt.valid_starts(CFG)  # 2 steps < min_steps


def test_verifier_by_hand():
    ok = lt.verify(29, SOLUTION_29, CFG)
    assert ok.correct and ok.n_valid == 8 and ok.first_error is None and ok.stopped
    wrong = SOLUTION_29.replace("43*3-1=128", "43*3-1=129")
    assert lt.verify(29, wrong, CFG) == lt.Verdict(False, 2, 2, False)
    assert lt.verify(29, wrong.replace("129", "128"), CFG).correct
    no_box = SOLUTION_29.rsplit("\n", 1)[0]
    assert not lt.verify(29, no_box, CFG).correct and lt.verify(29, no_box, CFG).stopped
    assert not lt.verify(29, SOLUTION_29.replace("{4}", "{8}"), CFG).correct
    assert not lt.verify(29, SOLUTION_29 + "\n8:2=4", CFG).correct  # text after the box
    assert not lt.verify(30, SOLUTION_29, CFG).correct  # another start


def test_repetition_rule_by_hand():
    assert lt.repetition_onset(SOLUTION_29, CFG) is None
    assert lt.repetition_onset("a\nb\na\nc\na\nd", CFG) == 4  # third verbatim copy
    # the 5-cycle written with changing phrasings: value 5 occurs a third time at line 10
    values = [10, 5, 14, 7, 20] * 3
    lines = [lt.step_line(x, i % 3, CFG) for i, x in enumerate(values)]
    assert lt.line_values("\n".join(lines), CFG)[:5] == [5, 14, 7, 20, 10]
    assert lt.repetition_onset("\n".join(lines), CFG) == 10


def test_splits_are_deterministic_disjoint_and_long():
    train = lt.problems_for_split("train", 400, 0, CFG)
    assert train == lt.problems_for_split("train", 400, 0, CFG)
    assert train != lt.problems_for_split("train", 400, 1, CFG)
    evals = lt.problems_for_split("eval", 20, 0, CFG)
    assert not {p.problem for p in evals} & {p.problem for p in train}
    lengths = [len(p.solution) for p in train]
    assert statistics.mean(lengths) >= 100  # the issue's >= 100 tokens (one per character)
    assert max(lengths) + 1 <= 256  # solution + eos fit the rollout cap
    for p in train[:50]:
        assert lt.verify(p.problem, p.solution, CFG).correct
        assert len(lt.trajectory(int(p.problem), CFG)) - 1 >= 8  # >= 8 dependent steps


def test_phrasings_vary_within_and_across_solutions():
    train = lt.problems_for_split("train", 400, 0, CFG)
    forms = Counter()
    for p in train:
        values = lt.trajectory(int(p.problem), CFG)
        for x, line in zip(values, p.solution.split("\n")[:-1], strict=False):
            forms[next(f for f in range(3) if lt.step_line(x, f, CFG) == line)] += 1
    total = sum(forms.values())
    assert all(0.28 <= forms[f] / total <= 0.39 for f in range(3))  # each drawn ~1/3 per line
    by_start: dict[str, set[str]] = {}
    for p in train:
        by_start.setdefault(p.problem, set()).add(p.solution)
    drawn_twice = [texts for texts in by_start.values() if len(texts) > 1]
    assert len(drawn_twice) >= 50  # the same start drawn again is phrased differently


def test_form_weights_set_a_style():
    styled = lt.CollatzTaskConfig(form_weights=(6, 2, 2))
    rng = random.Random(0)
    forms = Counter(lt.draw_form(rng, styled) for _ in range(3000))
    assert 0.56 <= forms[0] / 3000 <= 0.64 and 0.17 <= forms[2] / 3000 <= 0.23
    with pytest.raises(ValueError, match="form_weights"):
        lt.CollatzTaskConfig(form_weights=(1, 1))
    with pytest.raises(ValueError, match="form_weights"):
        lt.CollatzTaskConfig(form_weights=(0, 0, 0))


def test_source_kind_collatz():
    rows, stats = load_rows(SourceSpec(kind="collatz", n=5, seed=0, task={"max_steps": 20}))
    assert stats.n_read == 5 and rows[0].problem_id == "collatz-train:0"
    assert all(lt.verify(r.problem, r.solution, CFG).correct for r in rows)
    assert rows[0].answer == rows[0].solution.rsplit("{", 1)[1].rstrip("}")
    assert SourceSpec(kind="collatz").task == CFG  # no task given: the task's defaults
    with pytest.raises(ValueError, match="CollatzTaskConfig"):
        SourceSpec(kind="collatz", task=ArithmeticTaskConfig(n_ops=3))
    with pytest.raises(ValueError, match="ArithmeticTaskConfig"):
        SourceSpec(kind="synthetic", task=CFG)


def test_pretraining_documents_are_copy_rich():
    docs = lt.pretraining_documents(300, 0, CFG)
    assert docs == lt.pretraining_documents(300, 0, CFG)
    assert all(len(d) <= CFG.max_chars for d in docs)
    heldout = {p.problem for p in lt.problems_for_split("eval", 39, 0, CFG)}
    assert not any(d.split("\n", 1)[0] in heldout for d in docs)
    repeating = [d for d in docs if Counter(d.split("\n")).most_common(1)[0][1] >= 3]
    assert len(repeating) >= 300 // 4  # repeated-lines + repeated-span documents


# ---- trap-check statistics on hand-made traces ------------------------------------------


def test_fisher_exact_and_binomial_by_hand():
    # Fisher's tea tasting: [[3, 1], [1, 3]], two-sided p = (1 + 16 + 16 + 1) / 70
    assert tc.fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70)
    # [[4, 0], [0, 4]]: only it and its mirror are as extreme, p = 2 / 70
    assert tc.fisher_exact(4, 0, 0, 4) == pytest.approx(2 / 70)
    assert tc.binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert tc.binomial_two_sided(2, 4) == pytest.approx(1.0)
    assert math.isnan(tc.binomial_two_sided(0, 0))


def test_classify_by_hand():
    assert tc.classify(29, SOLUTION_29, "eos", CFG).category == "correct"
    wrong = SOLUTION_29.replace("43*3-1=128", "43*3-1=129")
    v = tc.classify(29, wrong, "eos", CFG)
    assert v.category == "wrong"
    assert v.onset == len("3*29-1=86\n43=86/2\n") and v.after == v.onset + len("43*3-1=129\n")
    capped = "3*29-1=86\n43=86/2\n43*3-1=128\n128:2=6"
    assert tc.classify(29, capped, "max_tokens", CFG).category == "capped"
    loop = "3*29-1=86\n" + "86/2=43\n" * 3
    v = tc.classify(29, loop, "max_tokens", CFG)
    assert v.category == "degenerate" and v.onset == len("3*29-1=86\n86/2=43\n")
    assert v.loop_onset == len("3*29-1=86\n86/2=43\n86/2=43\n")


def test_kl_after_derailment_by_hand():
    correct = tc.RolloutVerdict("correct", None, None, None)
    derailed = tc.RolloutVerdict("wrong", 2, 4, None)
    short = tc.RolloutVerdict("wrong", 2, 18, None)  # no room for the horizon: left out
    kls = [torch.full((20,), 1.0), torch.full((30,), 3.0), torch.full((20,), 0.1), torch.zeros(20)]
    kls[1][:8] = 1.0  # a correct rollout whose KL is 1 on the compared positions
    res = tc.kl_after_derailment(kls, [correct, correct, derailed, short], horizon=4)
    assert res.derailed == [pytest.approx(0.1)] and res.control == [pytest.approx(1.0)]
    assert res.share_below_control == 1.0 and res.n_without_control == 0


def test_offline_kat_cuts_by_hand():
    # window 2, stride 2, patience 1: window means per trace
    a = torch.tensor([1.0, 1.0, 0.2, 0.2, 1.0, 1.0])  # windows 1, 0.2, 1 -> min 0.2
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])  # min 1
    c = torch.tensor([0.5, 0.5, 0.0, 0.0])  # windows 0.5, 0 -> min 0
    cuts = tc.offline_kat_cuts([a, b, c], kat_rule(window=2, stride=2, patience=1, quantile=0.5))
    assert cuts.threshold == pytest.approx(0.2)  # median of minima (0.2, 1, 0)
    assert cuts.cut == [None, None, 2]  # 0.2 is not < 0.2; c fires at its second window
    verdicts = [
        tc.RolloutVerdict("correct", None, None, None),
        tc.RolloutVerdict("correct", None, None, None),
        tc.RolloutVerdict("degenerate", 1, 3, 2),
    ]
    table = tc.cut_rate_table(cuts, verdicts)
    assert (table["cut_derailed"], table["n_derailed"]) == (1, 1)
    assert (table["cut_correct"], table["n_correct"]) == (0, 2)
    assert table["fisher_p"] == pytest.approx(1 / 3)  # P(table) 1/3, its mirror 2/3
    assert table["fisher_p_degenerate"] == pytest.approx(1 / 3)  # the same table here
    assert math.isnan(table["rate_wrong"]) and table["fisher_p_wrong"] == pytest.approx(1.0)
    assert tc.cut_after_onset_share(cuts, verdicts) == 1.0


def test_carry_forward_measures_by_hand():
    # 43*3-1 should be 128; the rollout writes 129, then halves... 129 is odd: 3*129-1=386
    wrong = "3*29-1=86\n43=86/2\n43*3-1=129\n3*129-1=386\n193=386/2\n64:2=32"
    assert tc.carried_forward_share(wrong, 2, CFG) == pytest.approx(2 / 3)  # last line reverts
    prefix, got, right = tc.error_prefixes(29, wrong, CFG)
    assert prefix == "3*29-1=86\n43=86/2\n43*3-1=129\n" and (got, right) == (129, 128)
    assert tc.continuation_kind("129*3-1=386", 129, 128, CFG) == "carried"
    assert tc.continuation_kind("64=128/2", 129, 128, CFG) == "reverted"
    assert tc.continuation_kind("64=129/2", 129, 128, CFG) == "other"
    # a first error that is not a wrong result from the right input: no prefix
    assert tc.error_prefixes(29, "3*29-1=86\n44=88/2\n22=44/2", CFG) is None
    assert tc.error_prefixes(29, SOLUTION_29, CFG) is None


def test_forced_loop_probes_on_tiny_models():
    from kat_research.models import build_char_tokenizer, build_tiny_qwen3
    from kat_research.models.tiny import COMPACT_CHAT_TEMPLATE

    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    arch = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    a, b = build_tiny_qwen3(tokenizer, seed=0, **arch), build_tiny_qwen3(tokenizer, seed=1, **arch)
    starts = [29, *lt.valid_starts(CFG)[:3]]
    loop, control = tc.forced_loop_kl(a, a, tokenizer, starts, CFG, k=2, copies=3)
    assert len(loop) == len(control) == 3
    assert all(abs(x) < 1e-5 for x in loop + control)  # a model against itself: KL 0
    loop, control = tc.forced_loop_kl(a, b, tokenizer, starts, CFG, k=2, copies=3)
    assert all(x > 1e-3 for x in loop + control)
    accuracy = tc.forced_loop_accuracy(a, tokenizer, starts, CFG, k=2, copies=3)
    assert len(accuracy) == 4 and all(0 <= x <= 1 for x in accuracy)


# ---- the recipe on tiny settings --------------------------------------------------------


@pytest.mark.slow
def test_collatz_models_pretrain_then_sft(tmp_path):
    from kat_research.building import train_sft_model

    sft = {
        "pretrain_steps": 3,
        "n_documents": 50,
        "copy_fraction": 0.2,
        "steps": 2,
        "eval_every": 0,
        "eval_problems": 2,
        "target_accuracy": None,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "n_problems": 50,
        "seed": 0,
    }
    architecture = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    meta = train_sft_model(
        tmp_path / "m", architecture=architecture, sft=sft, task={}, kind="collatz"
    )
    assert meta["sft_steps"] == 2 and "collatz/accuracy" in meta and meta["pretrain_seconds"] > 0
    # continuing from the saved model starts from its weights, not a fresh init
    from kat_research.models import load_causal_lm

    saved = load_causal_lm(str(tmp_path / "m"), trainable=False).model
    again = train_sft_model(
        tmp_path / "c",
        architecture=architecture,
        sft={**sft, "pretrain_steps": 0, "steps": 1, "lr": 0.0, "init_from": str(tmp_path / "m")},
        task={},
        kind="collatz",
    )
    assert again["sft_steps"] == 1
    continued = load_causal_lm(str(tmp_path / "c"), trainable=False).model
    for a, b in zip(saved.parameters(), continued.parameters(), strict=True):
        assert torch.equal(a, b)  # lr 0: the continued model is the saved one
