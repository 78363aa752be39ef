"""The planner's decode-time model (kat_research/planning/decode_time.py): hand-computed values
and a Monte Carlo simulation of sync batches and busy slots as the oracle."""

from __future__ import annotations

import pytest
import torch

from kat_research.planning.decode_time import (
    DecodeCosts,
    partial_batch_seconds,
    predict,
    sync_batch_seconds,
)
from kat_research.planning.params import ModelShape


def test_weight_reads_by_hand():
    costs = DecodeCosts(weight_bytes=1.0, kv_bytes_per_token=0.0, bandwidth=1.0)
    # two rows drawn from {1, 3}: P(max > 0) = 1, P(max > 1) = P(max > 2) = 3/4
    assert sync_batch_seconds([1, 3], 2, 0, costs) == pytest.approx(2.5)
    assert partial_batch_seconds([1, 3], 2, 0, costs) == pytest.approx(2.0)  # E[L] steps


def test_kv_reads_are_the_same_in_both_modes():
    costs = DecodeCosts(weight_bytes=0.0, kv_bytes_per_token=1.0, bandwidth=1.0)
    # one row of 2 tokens, prompt 3: contexts 3 and 4
    assert sync_batch_seconds([2], 1, 3, costs) == pytest.approx(7.0)
    assert partial_batch_seconds([2], 1, 3, costs) == pytest.approx(7.0)


def test_matches_a_simulation_of_batches():
    """Sync: sample batches, run each until its longest row ends; partial: per B rows, B E[L]/S
    steps of S live rows, each row reading its own context once per token."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (200,), generator=g)
    costs = DecodeCosts(weight_bytes=50.0, kv_bytes_per_token=0.3, bandwidth=2.0)
    rows, prompt, trials = 8, 10, 4000
    draws = lengths[torch.randint(0, 200, (trials, rows), generator=g)].double()
    steps = torch.arange(int(lengths.max()), dtype=torch.float64)
    live = draws[:, :, None] > steps
    per_batch = costs.weight_bytes * live.any(1).sum(-1) + costs.kv_bytes_per_token * (
        live * (prompt + steps)
    ).sum((1, 2))
    simulated_sync = float(per_batch.mean()) / costs.bandwidth
    assert sync_batch_seconds(lengths, rows, prompt, costs) == pytest.approx(
        simulated_sync, rel=0.01
    )
    tokens = draws.sum(1)  # busy slots: one token per slot per step
    kv = (draws * prompt + draws * (draws - 1) / 2).sum(1)
    simulated_partial = float(
        (costs.weight_bytes * tokens / rows + costs.kv_bytes_per_token * kv).mean()
    )
    assert partial_batch_seconds(lengths, rows, prompt, costs) == pytest.approx(
        simulated_partial / costs.bandwidth, rel=0.01
    )


def test_paper_students_prediction():
    """Qwen3-1.7B student, Qwen3-8B teacher (bf16), 64 rows, a 4096-token cap: partial mode
    saves more where the lengths spread more (a few rows near the cap)."""
    student = ModelShape(
        layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936
    )
    teacher = ModelShape(
        layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936
    )
    costs = DecodeCosts.of(
        student,
        2_031_739_904,
        teacher,
        8_190_735_360,
        student_bytes=2,
        teacher_bytes=2,
        score_every=64,
        bandwidth=3.35e12,
    )
    assert costs.kv_bytes_per_token == 2 * 2 * 128 * 8 * (28 + 36)
    spread = [600] * 9 + [4096]  # KAT-like: most rows cut early, one in ten runs to the cap
    narrow = [2000] * 10
    out = predict({"kat": spread, "narrow": narrow}, 64, 256, costs)
    assert out["narrow"]["sync_over_partial"] == pytest.approx(1.0)
    assert out["kat"]["sync_over_partial"] > 1.5


def test_the_planner_prints_the_prediction_from_a_lengths_file(tmp_path):
    """`python -m kat_research.plan plan.decode.lengths=...` on the paper preset: the model's
    numbers for the config's student, teacher, rows per rank and chunk."""
    from hydra import compose, initialize_config_dir

    from kat_research.config import CONFIG_DIR
    from kat_research.plan import format_plan
    from kat_research.planning.estimate import make_plan

    path = tmp_path / "lengths.json"
    path.write_text('{"opd": [3000, 4096, 2500, 4096], "kat": [600, 800, 4096, 700]}')
    overrides = ["experiment=table1", "scale=paper", "model/student=0.7b", "trainer.devices=8"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("plan", overrides=[*overrides, f"plan.decode.lengths={path}"])
    plan = make_plan(cfg)
    decode = plan["decode_seconds_per_batch"]
    assert set(decode) == {"opd", "kat"}
    assert decode["kat"]["sync_over_partial"] > decode["opd"]["sync_over_partial"] >= 1
    assert "decode s per batch" in format_plan({**plan, "problems": []})
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("plan", overrides=overrides)
    assert make_plan(cfg)["decode_seconds_per_batch"] is None
