"""The termination benchmark (issue 23 item 4): scoring against hand-computed values, the rules
driven offline through their own online protocol, RandomTermination's matched hazard, the
engine's recorded top-k overlap, and an end-to-end run on the debug preset."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from kat_research.analysis.offline_rules import (
    Traces,
    expected_random_kept,
    matched_hazard,
    offline_kept,
)
from kat_research.analysis.termination_benchmark import Judged, score_rule
from kat_research.analysis.trap.verdicts import wilson_interval
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.termination import (
    FixedPrefix,
    KATRule,
    KATTerminator,
    OverlapDriftTerminator,
    ProgressiveHorizon,
    RepetitionFilter,
    kat_cuts,
)


def _traces(kl, logprob=None, overlap=None, lengths=None) -> Traces:
    kl = torch.tensor(kl, dtype=torch.float64)
    n, t = kl.shape
    lengths = torch.full((n,), t) if lengths is None else torch.tensor(lengths)
    as_t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float64)  # noqa: E731
    logprob = torch.zeros(n, t, dtype=torch.float64) if logprob is None else as_t(logprob)
    return Traces(kl, logprob, as_t(overlap), lengths)


def test_score_rule_hand_values():
    # 4 rollouts of 10 tokens: errors at 2, 5, none, none; categories wrong, capped, correct,
    # correct. Kept 4, 3, 6, 10: cuts on rows 0, 1, 2; right only row 0 (2 < 4; 5 >= 3).
    judged = [
        Judged(10, 2, "wrong"),
        Judged(10, 5, "capped"),
        Judged(10, None, "correct"),
        Judged(10, None, "correct"),
    ]
    s = score_rule([4, 3, 6, 10], judged)
    assert s["tokens_kept_mean"] == pytest.approx(23 / 4)
    assert s["tokens_kept_share"] == pytest.approx(23 / 40)
    assert (s["n_cut"], s["right_cuts"], s["n_with_error"]) == (3, 1, 2)
    assert s["precision"] == pytest.approx(1 / 3)
    assert (s["precision_lo"], s["precision_hi"]) == pytest.approx(wilson_interval(1, 3))
    assert s["recall"] == pytest.approx(1 / 2)
    # against the category: cut derailed rows 0, 1 of 3 cuts; 2 derailed rows, both cut
    assert s["precision_derailed"] == pytest.approx(2 / 3)
    assert s["recall_derailed"] == 1.0
    assert s["cut_rate_correct"] == pytest.approx(1 / 2)
    # kept - error over cut rows holding an error: 4 - 2 = 2, 3 - 5 = -2
    assert s["n_cut_with_error"] == 2
    assert s["cut_minus_error_median"] == 0.0
    assert (s["cut_minus_error_q1"], s["cut_minus_error_q3"]) == (-1.0, 1.0)


def test_score_rule_no_cuts_and_bad_input():
    s = score_rule([5, 7], [Judged(5, 1, "wrong"), Judged(7, None, "correct")])
    assert s["n_cut"] == 0 and math.isnan(s["precision"]) and s["recall"] == 0.0
    assert math.isnan(s["cut_minus_error_median"])
    with pytest.raises(ValueError, match="tokens kept"):
        score_rule([6], [Judged(5, None, "correct")])
    with pytest.raises(ValueError, match="2 cuts for 1"):
        score_rule([1, 2], [Judged(5, None, "correct")])


def test_offline_caps_and_horizon_step():
    traces = _traces([[0.0] * 8, [0.0] * 8], lengths=[8, 3])
    assert offline_kept(FixedPrefix(5), traces, 8).tolist() == [5, 3]
    horizon = ProgressiveHorizon(start=2, end=8, ramp_steps=4)
    horizon.load_state_dict({"optimizer_steps": 2})  # cap 2 + (8 - 2) * 2 // 4 = 5
    assert offline_kept(horizon, traces, 8).tolist() == [5, 3]


def test_offline_observe_rules_match_their_own_scans():
    # overlap drift, window 2 stride 2 patience 1, threshold 0.5: windows [0,2) mean 0.75,
    # [2,4) mean 0.25 -> cut at 2; row 1 never drifts
    overlap = [[1.0, 0.5, 0.0, 0.5, 1.0, 1.0], [1.0] * 6]
    traces = _traces([[0.0] * 6] * 2, overlap=overlap)
    drift = OverlapDriftTerminator(k=2, threshold=0.5, window=2, patience=1)
    assert offline_kept(drift, traces, 6).tolist() == [2, 6]
    # repetition: 3 tokens in a row with p > 0.9 (log p > log 0.9); row 0 from token 1
    high, low = math.log(0.95), math.log(0.5)
    logprob = [[low, high, high, high, low, low], [high, high, low, high, high, low]]
    traces = _traces([[0.0] * 6] * 2, logprob=logprob)
    assert offline_kept(RepetitionFilter(3, 0.9), traces, 6).tolist() == [1, 6]
    # KAT through its online terminator equals the offline scan kat_cuts on the same traces
    kl = torch.rand(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rule = KATRule(window=4, stride=2, patience=2).with_fixed_threshold(0.45)
    online = offline_kept(KATTerminator(rule), Traces(kl, kl, None, torch.full((5,), 40)), 40)
    scanned = kat_cuts(kl, rule)
    assert online.tolist() == torch.where(scanned >= 0, scanned, 40).tolist()


def test_offline_rule_needing_an_unrecorded_signal_is_refused():
    traces = _traces([[0.0] * 4])
    with pytest.raises(ValueError, match="overlap_k"):
        offline_kept(OverlapDriftTerminator(k=2, window=2), traces, 4)


def test_expected_random_kept_and_matched_hazard():
    lengths = torch.tensor([1, 3])
    # h = 1/2: a 1-token rollout keeps 1; a 3-token one E[min(L, 3)] = 1 + 1/2 + 1/4
    assert expected_random_kept(lengths, 0.5) == pytest.approx((1 + 1.75) / 2)
    # exempt 2: the 1-token rollout keeps 1, the 3-token one 2 + (1 - 1/2) / (1/2) = 3
    assert expected_random_kept(lengths, 0.5, exempt=2) == pytest.approx(2.0)
    assert expected_random_kept(lengths, 1.0) == 1.0
    h = matched_hazard(lengths, 1.375)
    assert expected_random_kept(lengths, h) == pytest.approx(1.375, abs=1e-8)
    with pytest.raises(ValueError, match="cannot match"):
        matched_hazard(lengths, 2.0)  # the rollouts' own mean: no hazard keeps that


def test_engine_records_topk_overlap_on_request(tiny_pair, prompts, char_tokenizer):
    student, teacher = (m.model for m in tiny_pair)
    sampling = SamplingConfig(1.0, 1.0, 6, ())
    pad = char_tokenizer.pad_token_id
    engine = RolloutEngine(student, teacher, sampling=sampling, pad_token_id=pad, overlap_k=3)
    g = torch.Generator().manual_seed(0)
    rollout = engine.generate(prompts["input_ids"], prompts["attention_mask"], g)
    overlap = rollout.topk_overlap[rollout.gen_mask]
    assert overlap.numel() and bool(((overlap >= 0) & (overlap <= 1)).all())
    # the same rows as an OverlapDriftTerminator(k=3) would see: thirds only
    assert torch.allclose(overlap * 3, (overlap * 3).round())
    bare = RolloutEngine(student, teacher, sampling=sampling, pad_token_id=pad)
    assert bare.generate(prompts["input_ids"], prompts["attention_mask"], g).topk_overlap is None
    with pytest.raises(ValueError, match="overlap_k"):
        RolloutEngine(student, None, sampling=sampling, pad_token_id=pad, overlap_k=3)


@pytest.mark.parametrize("data", ["collatz", "running_sum", "synthetic"])
def test_benchmark_end_to_end_debug(compose_config, tmp_path, data):
    """The debug preset on the testbed's tasks (line verifiers: first errors) and on the
    synthetic arithmetic task (graded answers only: no first error, precision undefined)."""
    from kat_research.analysis.termination_benchmark import run

    cfg = compose_config(
        f"train_overrides=['debug=fast','data={data}','paths.cache_dir={tmp_path}/cache']",
        "rollouts=8",
        "batch_size=4",
        "kat_thresholds=[0.05]",
        f"output_dir={tmp_path}/out",
        f"report={tmp_path}/bench.md",
        "label=smoke",
        config_name="analysis_termination_benchmark",
    )
    table = run(cfg, "test")
    expected = {
        "kat q=0.7",
        "kat s=0.05",
        "random (matched to kat q=0.7)",
        "fixed_prefix",
        "overlap_drift",
        "progressive_horizon step=0",
        "progressive_horizon step=50",
        "progressive_horizon step=100",
        "repetition",
    }
    assert set(table.index) == expected
    assert (table["n"] == 8).all()
    text = (tmp_path / "bench.md").read_text()
    assert "**smoke**" in text and "command: `test`" in text and "commit:" in text
    assert set(pd.read_csv(tmp_path / "bench.csv")["rule"]) == expected
    per_rollout = pd.read_csv(tmp_path / "out" / "rollouts.csv")
    assert len(per_rollout) == 8
    assert (per_rollout["kept[fixed_prefix]"] <= per_rollout["generated"]).all()
    # FixedPrefix(budget=6) of the debug preset keeps min(6, generated)
    assert (per_rollout["kept[fixed_prefix]"] == per_rollout["generated"].clip(upper=6)).all()
    if data == "synthetic":  # no line verifier: no first error, so no right cut
        assert per_rollout["error"].isna().all() and (table["n_with_error"] == 0).all()


def test_benchmark_of_a_trained_checkpoint(compose_config, debug_config, tmp_path):
    """``student_checkpoint``: the rollouts come from the checkpoint's student weights; a
    missing file is named before any model loads."""
    from kat_research.analysis.termination_benchmark import run
    from kat_research.training.job import train

    train(debug_config(tmp_path / "run", "method=opd", "trainer.max_steps=1"))
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step*.ckpt"))

    def benchmark(path):
        return compose_config(
            "train_overrides=['debug=fast']",
            f"student_checkpoint={path}",
            "rollouts=4",
            "batch_size=4",
            f"output_dir={tmp_path}/out",
            f"report={tmp_path}/bench.md",
            config_name="analysis_termination_benchmark",
        )

    with pytest.raises(FileNotFoundError, match="student_checkpoint=.*missing.ckpt"):
        run(benchmark(tmp_path / "missing.ckpt"), "test")
    table = run(benchmark(checkpoint), "test")
    assert (table["n"] == 4).all()
    assert f"student {checkpoint}," in (tmp_path / "bench.md").read_text()
