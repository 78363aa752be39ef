"""The table of scripts/bench_partial_rollouts.py from given job measurements (hand-computed
ratios), and its accuracy noise test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "bench_partial_rollouts", ROOT / "scripts" / "bench_partial_rollouts.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def job(method, mode, seed, wall, decoded, steps, accuracy):
    return {
        "method": method,
        "mode": mode,
        "seed": seed,
        "wall_s": wall,
        "decoded": decoded,
        "step_s": wall / 10,
        "tokens_per_s": decoded / wall,
        "decode_steps": steps,
        "occupancy": 0.5,
        "accuracy": accuracy,
    }


def test_report_ratios_and_noise_test():
    rows = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        rows += [
            job("opd", "sync", seed, 100.0, 1000.0, 250.0, acc),
            job("opd", "partial", seed, 80.0, 1000.0, 200.0, acc),
            job("kat", "sync", seed, 90.0, 600.0, 245.0, acc),
            job("kat", "partial", seed, 52.0, 600.0, 120.0, acc + 0.1),
        ]
    lines, summary = bench.report(rows, ["opd", "kat"])
    kat_sync, kat_partial = summary["kat/sync"], summary["kat/partial"]
    assert kat_sync["realised"] == pytest.approx(0.1 / 0.4)  # wall 10% for tokens 40%
    assert kat_partial["realised"] == pytest.approx((1 - 52 / 80) / 0.4)
    assert kat_partial["decode_step_realised"] == pytest.approx((1 - 120 / 200) / 0.4)
    assert kat_partial["step_ratio"] == pytest.approx(52 / 90)
    # accuracy: +0.1 with per-cell sd 0.1414 over 2 seeds -> 2 SE = 2 * sqrt(2 * 0.02 / 2)
    test = summary["kat/accuracy_test"]
    assert test["diff"] == pytest.approx(0.1) and test["two_se"] == pytest.approx(0.2828, abs=1e-4)
    assert test["within"] == "yes"
    assert any(line.startswith("| kat | partial |") for line in lines)


def test_one_seed_has_no_noise_verdict():
    assert bench.within_noise([0.5], [0.6])[2] == "n/a (1 seed)"
