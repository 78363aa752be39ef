"""Analyses' pure parts: the detector's threshold sources, gradient projection ratios, the
planted-trap benchmark's traces, detection and scoring (phase segmentation: test_termination),
and the shared sampler's progress lines."""

from __future__ import annotations

import pytest
import torch

from kat_research.analysis.detector import resolve_threshold
from kat_research.analysis.projection import (
    group_ratios,
    parameter_groups,
    projection_ratios,
    top_left_singular_vectors,
)
from kat_research.analysis.rollouts import uncut_rollouts
from kat_research.analysis.trap.planted import TraceSpec, planted_traces, score
from kat_research.console import Progress
from kat_research.rollout import SamplingConfig
from kat_research.termination import kat_calibrated, kat_cuts, kat_rule, kat_rule_from_settings

HIGH, LOW = 1.0, 0.01


def planted(*segments: tuple[float, int]) -> torch.Tensor:
    return torch.tensor([value for value, count in segments for _ in range(count)])


# --- detector ----------------------------------------------------------------------------------


def test_detector_threshold_sources() -> None:
    traces = [planted((HIGH, 8), (LOW, 8)), planted((HIGH, 16))]
    fixed, source = resolve_threshold(kat_rule(window=4, threshold=0.3), None, lambda: traces)
    assert (fixed.threshold.fixed, source) == (0.3, "fixed")
    buffer = torch.tensor([0.0, 1.0])
    from_buffer, source = resolve_threshold(kat_rule(window=4, quantile=0.5), buffer, list)
    assert (from_buffer.threshold.fixed, source) == (0.5, "checkpoint buffer")
    minima, source = resolve_threshold(kat_rule(window=4, quantile=0.5), None, lambda: traces)
    assert source == "rollout minima"
    assert minima.threshold.fixed == pytest.approx((LOW + HIGH) / 2)
    run = kat_rule_from_settings(
        {"window": 8, "buffer_size": 4096}, {"window": None, "patience": 2}
    )
    assert (run.window, run.patience) == (8, 2)


# --- gradient projection ---------------------------------------------------------------------


def test_rho_is_one_inside_the_subspace_and_zero_orthogonal_to_it() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 8, generator=generator)
    basis = top_left_singular_vectors(delta, 4)
    inside = basis[:, :3] @ torch.randn(3, 5, generator=generator, dtype=torch.float64)
    assert projection_ratios(inside, basis, [3, 4]).tolist() == pytest.approx([1.0, 1.0])
    other = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    orthogonal = other - basis @ (basis.T @ other)
    assert projection_ratios(orthogonal, basis, [1, 4]).tolist() == pytest.approx(
        [0.0, 0.0], abs=1e-10
    )


def test_rank_is_clipped_and_random_directions_average_k_over_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    basis = top_left_singular_vectors(torch.randn(6, 10, generator=generator), 64)
    assert basis.shape == (6, 6)
    assert float(projection_ratios(torch.randn(6, 3), basis, [64])[0]) == pytest.approx(1.0)
    wide = top_left_singular_vectors(torch.randn(32, 40, generator=generator), 8)
    rho = torch.stack([projection_ratios(torch.randn(32, 40), wide, [8])[0] for _ in range(50)])
    assert float(rho.mean()) == pytest.approx(8 / 32, abs=0.03)


def test_group_ratio_is_the_ratio_of_summed_energies() -> None:
    eye = torch.eye(4)
    bases = {
        "model.layers.0.self_attn.q_proj.weight": eye,
        "model.layers.1.mlp.up_proj.weight": eye,
    }
    grads = {
        "model.layers.0.self_attn.q_proj.weight": torch.diag(torch.tensor([3.0, 0, 0, 0])),
        "model.layers.1.mlp.up_proj.weight": torch.diag(torch.tensor([0.0, 4, 0, 0])),
    }
    ratios = group_ratios(grads, bases, [1, 2])
    assert list(ratios) == ["all", "attention", "mlp", "layer0", "layer1"]
    assert ratios["attention"].tolist() == [1.0, 1.0]
    assert ratios["mlp"].tolist() == [0.0, 1.0]
    assert ratios["all"].tolist() == pytest.approx([9 / 25, 1.0])
    assert parameter_groups("lm_head.weight") == ["all"]


# --- planted-trap benchmark ------------------------------------------------------------------

CLEAN = TraceSpec(length=128, onset_min=16, onset_max=64, decoys=0)


def test_clean_traces_hold_their_traps_exactly() -> None:
    traces = planted_traces(
        10, CLEAN, noise=0.0, segment_length=32, generator=torch.Generator().manual_seed(0)
    )
    trapped = traces.onsets >= 0
    assert int(trapped.sum()) == 5 and not traces.onsets[5:].ge(0).any()
    for b in range(5):
        onset = int(traces.onsets[b])
        assert traces.kl[b, onset : onset + 32].eq(CLEAN.low_kl).all()
        assert traces.kl[b, :onset].eq(CLEAN.high_kl).all()
    assert traces.kl[5:].eq(CLEAN.high_kl).all()


def test_benchmark_recovers_a_clean_trap_exactly() -> None:
    kl = planted((HIGH, 32), (LOW, 32), (HIGH, 32))[None]
    onsets = torch.tensor([32])
    rule = kat_rule(window=8, stride=8, patience=3, threshold=0.5)
    cuts = kat_cuts(kl, rule)
    assert cuts.tolist() == [32]
    metrics = score(cuts, onsets, segment_length=32, rule=rule)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["delay_mean"] == 8 + 2 * 8 and metrics["onset_error_mean"] == 0


def test_adaptive_threshold_finds_every_clean_trap() -> None:
    generator = torch.Generator().manual_seed(0)
    test = planted_traces(40, CLEAN, noise=0.0, segment_length=48, generator=generator)
    calibration = planted_traces(40, CLEAN, noise=0.0, segment_length=48, generator=generator)
    rule = kat_calibrated(kat_rule(window=8, patience=4, quantile=0.7), calibration.kl)
    assert rule.threshold.fixed == CLEAN.high_kl  # half the minima are high: a strict cut below
    cuts = kat_cuts(test.kl, rule)
    trapped = test.onsets >= 0
    assert torch.equal(cuts[trapped], test.onsets[trapped] // 8 * 8)  # first overlapping window
    assert cuts[~trapped].eq(-1).all()
    metrics = score(cuts, test.onsets, segment_length=48, rule=rule)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["false_alarm_rate"] == 0.0


def test_persistence_ignores_decoys_that_fool_patience_one() -> None:
    spec = TraceSpec(length=128, onset_min=48, onset_max=64, decoys=1, decoy_length=16)
    traces = planted_traces(
        20, spec, noise=0.0, segment_length=48, generator=torch.Generator().manual_seed(2)
    )
    patient, eager = (
        kat_rule(window=4, patience=5, threshold=0.5),
        kat_rule(window=4, patience=1, threshold=0.5),
    )
    one = score(kat_cuts(traces.kl, eager), traces.onsets, segment_length=48, rule=eager)
    five = score(kat_cuts(traces.kl, patient), traces.onsets, segment_length=48, rule=patient)
    assert one["false_alarm_rate"] == 1.0 and one["precision"] == 0.0
    assert five["precision"] == five["recall"] == 1.0


# --- the shared sampler's progress ---------------------------------------------------------------


def test_the_analysis_sampler_reports_rollouts_tokens_per_second_and_time_left(
    tiny_pair, char_tokenizer, prompts
) -> None:
    """Four batches of one prompt, each taking 5 s on a fake clock and generating exactly 10
    tokens (no stop token): a line after the first batch, the next once ``every_s`` = 8 s
    passed, none for the last batch (its caller reports the result)."""
    now, lines = [100.0], []

    def batches():
        for b in range(4):
            now[0] += 5.0
            yield {k: prompts[k][b : b + 1] for k in ("input_ids", "attention_mask")}

    progress = Progress(
        "early (step3)", 4, unit="rollout", every_s=8, write=lines.append, clock=lambda: now[0]
    )
    student, teacher = tiny_pair
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10, stop_token_ids=())
    sampled = uncut_rollouts(
        student.model,
        teacher.model,
        char_tokenizer,
        batches(),
        sampling,
        seed=0,
        progress=progress,
    )
    assert [int(r.lengths.sum()) for r in sampled] == [10] * 4
    assert lines == [
        # 1 rollout, 10 tokens in 5 s; 3 left at 5 s each
        "early (step3): rollout 1/4 (25%), 2 tokens/s, 5 s/rollout, about 15 s left",
        # 3 rollouts, 30 tokens in 15 s (the second batch came 5 s after the first line)
        "early (step3): rollout 3/4 (75%), 2 tokens/s, 5 s/rollout, about 5 s left",
    ]
