"""The field's other termination rules (docs/paper.md, "Other termination rules"): Prune-OPD's
top-k overlap drift, a progressive horizon and prime-rl's repetition filter, on hand-computed
values, inside the engine's chunk protocol, and training two steps on tiny models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from kat_research.termination import (
    CompositeTerminator,
    KATTerminator,
    OverlapDriftTerminator,
    ProgressiveHorizon,
    RepetitionFilter,
    kat_cut,
    kat_rule,
    repetition_cut,
    topk_overlap,
)
from kat_research.training.job import train


def _feed(rule, series: list[float], signal: str, chunk: int) -> tuple[int, int]:
    """Feed one row's ``series`` to ``rule`` in chunks; return (cut, tokens seen when it fired)
    or (-1, len) when it never fires."""
    rule.begin_batch(1, len(series))
    seq = torch.tensor([series], dtype=torch.float64)
    rows = torch.zeros(1, dtype=torch.long)
    for end in range(chunk, len(series) + chunk, chunk):
        end = min(end, len(series))
        cut = rule.observe(rows, seq[:, :end] * 0, torch.tensor([end]), {signal: seq[:, :end]})
        if cut[0] >= 0:
            rule.end_batch()
            return int(cut[0]), end
    rule.end_batch()
    return -1, len(series)


# ---------------------------------------------------------------- top-k overlap (Prune-OPD)
def test_topk_overlap_on_hand_computed_logits() -> None:
    student = torch.tensor([[5.0, 4, 3, 2, 1], [5.0, 4, 3, 2, 1], [0.0, 9, 1, 8, 2]])
    teacher = torch.tensor([[1.0, 2, 3, 4, 5], [1.0, 2, 3, 4, 5], [0.0, 8, 1, 9, 2]])
    # k=2: {0,1} vs {4,3}: 0; row 3: {1,3} vs {3,1}: 2/2
    assert topk_overlap(student, teacher, 2).tolist() == [0.0, 0.0, 1.0]
    # k=3: {0,1,2} vs {4,3,2}: 1/3; row 3: {1,3,4} vs {3,1,4}: 3/3
    assert topk_overlap(student, teacher, 3).tolist() == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert topk_overlap(student, teacher, 50).tolist() == [1.0, 1.0, 1.0]  # k capped at V
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(student, teacher, 0)


OVERLAP = [1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.5, 0.25, 1.0, 1.0]


@pytest.mark.parametrize("chunk", [1, 2, 3, 10])
def test_overlap_drift_fires_on_a_persistent_low_run(chunk: int) -> None:
    # windows of 2 every 2: means 1, 1, 0.25, 0.375, 1; the 3rd and 4th are below 0.5, so the
    # rule fires once 8 tokens exist and keeps the 4 tokens before the run
    rule = OverlapDriftTerminator(k=4, threshold=0.5, window=2, stride=2, patience=2)
    cut, seen = _feed(rule, OVERLAP, "topk_overlap", chunk)
    assert cut == 4 and 8 <= seen < 8 + chunk
    assert kat_cut(OVERLAP, kat_rule(threshold=0.5, window=2, stride=2, patience=2)) == 4


def test_overlap_drift_threshold_is_strict_and_patience_counts() -> None:
    # window means 1, 0.5, 0.25: a mean equal to the threshold is not drift
    series = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]

    def cut(threshold: float, patience: int) -> int:
        rule = OverlapDriftTerminator(threshold=threshold, window=2, patience=patience)
        return _feed(rule, series, "topk_overlap", 2)[0]

    assert cut(0.5, patience=2) == -1
    assert cut(0.5, patience=1) == 4
    assert cut(0.6, patience=2) == 2


def test_overlap_drift_metrics_and_errors() -> None:
    rule = OverlapDriftTerminator(threshold=0.5, window=2, patience=1)
    rule.begin_batch(2, 4)
    seq = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]])
    cut = rule.observe(torch.arange(2), seq, torch.tensor([4, 4]), {"topk_overlap": seq})
    assert cut.tolist() == [2, -1]
    # per-row minimum window means: 0 and 0.75
    assert rule.end_batch() == {"drift/cut_rows": 1.0, "drift/min_window_overlap": 0.375}
    with pytest.raises(ValueError, match="threshold"):
        OverlapDriftTerminator(threshold=0.0)
    rule.begin_batch(1, 4)
    with pytest.raises(ValueError, match="topk_overlap"):
        rule.observe(torch.zeros(1, dtype=torch.long), seq[:1], torch.tensor([4]))


# ---------------------------------------------------------------- progressive horizon
def test_progressive_horizon_grows_linearly_then_holds() -> None:
    rule = ProgressiveHorizon(start=10, end=50, ramp_steps=4)
    caps = []
    for _ in range(6):
        caps.append(rule.begin_batch(3, 100).tolist())
        assert rule.end_batch() == {"horizon/cap": float(caps[-1][0])}
        rule.on_optimizer_step()
    assert caps == [[c] * 3 for c in (10, 20, 30, 40, 50, 50)]
    assert rule.begin_batch(1, 35).tolist() == [35]  # clipped to the rollout cap


def test_progressive_horizon_defaults_to_the_rollout_cap_and_resumes() -> None:
    rule = ProgressiveHorizon(start=10, ramp_steps=3)  # end = max_new_tokens
    # 10 + floor(90 * s / 3): 10, 40, 70, 100, 100
    assert [rule.horizon(s, 100) for s in range(5)] == [10, 40, 70, 100, 100]
    assert [rule.horizon(s, 11) for s in range(4)] == [10, 10, 10, 11]  # 10 + floor(s / 3)
    for _ in range(2):
        rule.on_optimizer_step()
    resumed = ProgressiveHorizon(start=10, ramp_steps=3)
    resumed.load_state_dict(rule.state_dict())
    assert resumed.begin_batch(1, 100).tolist() == [70]
    with pytest.raises(ValueError, match="end must be"):
        ProgressiveHorizon(start=10, end=5)


# ---------------------------------------------------------------- repetition filter
P = [0.5, 0.995, 0.999, 0.98, 0.995, 0.995, 0.995, 0.1]


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_repetition_filter_fires_on_a_high_confidence_run(chunk: int) -> None:
    # runs of p > 0.99: tokens 1-2 (broken by 0.98), then 4-6: the third token of that run
    # (index 6) fires, keeping tokens 0-3
    lp = [math.log(p) for p in P]
    cut, seen = _feed(RepetitionFilter(window=3, prob_threshold=0.99), lp, "student_logprob", chunk)
    assert cut == 4 and 7 <= seen < 7 + chunk
    assert repetition_cut(lp, window=3, prob_threshold=0.99) == 4
    assert repetition_cut(lp, window=3, prob_threshold=0.99, keep_prefix=False) == 0
    assert repetition_cut(lp, window=4, prob_threshold=0.99) is None
    assert repetition_cut(lp, window=2, prob_threshold=0.99) == 1


def test_repetition_filter_threshold_is_strict_and_nan_resets() -> None:
    at = math.log(0.99)
    assert repetition_cut([at, at, at], window=2, prob_threshold=0.99) is None
    high = math.log(0.999)
    assert repetition_cut([high, math.nan, high, high], window=2, prob_threshold=0.99) == 2
    with pytest.raises(ValueError, match="prob_threshold"):
        RepetitionFilter(prob_threshold=1.5)


def test_repetition_filter_across_inference_mode_boundaries() -> None:
    rule = RepetitionFilter(window=2, prob_threshold=0.5)
    with torch.inference_mode():  # state made in inference mode, updated outside it
        rule.begin_batch(1, 4)
    lp = torch.zeros(1, 4)  # p = 1 > 0.5 everywhere: the run reaches 2 at token 1
    cut = rule.observe(
        torch.zeros(1, dtype=torch.long), lp, torch.tensor([4]), {"student_logprob": lp}
    )
    assert cut.tolist() == [0]


# ---------------------------------------------------------------- composition, engine
def test_composite_collects_signals_and_checks_overlap_k() -> None:
    both = CompositeTerminator(
        [
            KATTerminator(kat_rule(window=2, threshold=0.1)),
            OverlapDriftTerminator(k=4, window=2),
            RepetitionFilter(window=3),
        ]
    )
    assert both.signals == ("topk_overlap", "student_logprob") and both.overlap_k == 4
    assert both.observes and both.needs_kl
    with pytest.raises(ValueError, match="different k"):
        CompositeTerminator([OverlapDriftTerminator(k=4), OverlapDriftTerminator(k=8)])


def test_composite_passes_each_child_its_signals() -> None:
    rule = CompositeTerminator(
        [OverlapDriftTerminator(threshold=0.5, window=2, patience=1), RepetitionFilter(window=2)]
    )
    rule.begin_batch(2, 4)
    overlap = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    logprob = torch.tensor([[-5.0, -5.0, -5.0, -5.0], [-5.0, 0.0, 0.0, -5.0]])
    cut = rule.observe(
        torch.arange(2),
        overlap * 0,
        torch.tensor([4, 4]),
        {"topk_overlap": overlap, "student_logprob": logprob},
    )
    assert cut.tolist() == [2, 1]


def test_engine_refuses_signals_it_cannot_record(tiny_pair) -> None:
    from kat_research.rollout import RolloutEngine, SamplingConfig

    student = tiny_pair[0].model
    sampling = SamplingConfig(1.0, 1.0, 8, ())
    with pytest.raises(ValueError, match="pass a teacher"):
        RolloutEngine(
            student, None, sampling=sampling, pad_token_id=0, terminator=RepetitionFilter(window=2)
        )

    class Unknown(RepetitionFilter):
        signals = ("entropy",)

    with pytest.raises(ValueError, match="unknown terminator signals"):
        RolloutEngine(student, student, sampling=sampling, pad_token_id=0, terminator=Unknown())


@pytest.mark.parametrize(
    "method,metric",
    [
        ("prune_opd", "drift/cut_rows"),
        ("progressive_horizon", "horizon/cap"),
        ("repetition_filter", "repetition/cut_rows"),
    ],
)
def test_field_rule_trains_two_steps(debug_config, tmp_path, method, metric) -> None:
    summary = train(debug_config(tmp_path, f"method={method}", "logger=csv"))
    assert summary["steps"] == 2 and summary["method"] == method
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["train/loss"]))
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    logged = metrics.dropna(subset=["len/generated"])
    values = metrics[metric].dropna().tolist()
    if method == "progressive_horizon":  # debug preset: 4 tokens at step 0, 12 at step 1
        assert values == [4.0, 12.0]
        assert logged["len/generated"].iloc[0] <= 4
    else:  # the random tiny models drift at once and sample every token at p > 0.001
        assert sum(values) > 0
        assert (logged["stop/terminated"] > 0).all()
