"""The GPU validation kit (scripts/gpu_check.py) in its CPU mode: the same sections on tiny
models, as a smoke test of their logic and of the report a lent GPU machine would send back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kat_research.losses import LOSS_KINDS

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("a_engine_parity", "b_training", "c_loss_memory", "d_engine_throughput", "e_vllm")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("OUT", None)
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    data["log"] = (out / "gpu_check.log").read_text()
    data["out"] = out
    return data


def test_every_section_passed_or_was_skipped_with_a_reason(report):
    assert tuple(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] in ("passed", "skipped"), (name, section)
        if section["status"] == "skipped":
            assert section["reason"], name
        else:
            assert section["checks"] and all(section["checks"].values()), name
        assert f"[{name}] {section['status']}" in report["log"]
    assert report["all_passed_or_skipped"] is True
    assert report["device"] == "cpu" and report["smollm2"]["source"] == "tiny"
    assert report["environment"]["missing_modules"] == []


def test_engine_parity_compares_tokens_and_kl(report):
    a = report["sections"]["a_engine_parity"]
    assert a["tokens_equal"] and a["lengths_equal"]
    assert a["first_mismatch_per_row"] == [None] * a["rows"]
    assert 0 < a["compared_positions"] <= a["rows"] * a["new_tokens"]
    assert a["max_abs_diff_kl"] <= 1e-3 and a["mean_kl"] > 0


def test_training_runs_each_method_and_resumes(report):
    runs = report["sections"]["b_training"]["runs"]
    assert set(runs) == {"opd", "kat", "topk_lsm", "kat_resumed", "kat_partial"}
    for method in ("opd", "kat", "topk_lsm"):
        assert runs[method]["steps"] == 1 and list(runs[method]["losses"]) == ["0"]
        assert all(math.isfinite(v) for v in runs[method]["losses"].values())
        assert (report["out"] / "b_training" / method / "metrics.csv").exists()
    resumed = runs["kat_resumed"]
    assert resumed["resumed_from_step"] == 1 and resumed["steps"] == 2
    assert list(resumed["losses"]) == ["0", "1"]
    assert resumed["losses"]["0"] == runs["kat"]["losses"]["0"]  # step 0 kept, not re-run
    partial = runs["kat_partial"]
    assert partial["steps"] == 1 and 0 < partial["occupancy"] <= 1
    assert partial["staleness_max"] == 0 and partial["sync_over_partial_fit_time"] > 0


def test_loss_memory_covers_every_kind_and_mode(report):
    c = report["sections"]["c_loss_memory"]
    assert set(c["kinds"]) == set(LOSS_KINDS)
    for kind, modes in c["kinds"].items():
        assert set(modes) == {"chunked_fp32", "chunked_bf16", "naive"}, kind
        for result in modes.values():
            assert result["peak_extra_mib"] >= 0 and math.isfinite(result["loss"])
        # the chunked loss computes the same value as the naive one
        assert modes["chunked_fp32"]["loss"] == pytest.approx(modes["naive"]["loss"], rel=1e-4)


def test_engine_throughput_reports_the_early_stop_saving(report):
    d = report["sections"]["d_engine_throughput"]
    cap = d["new_tokens"]
    for batch, result in d["batches"].items():
        rows = int(batch)
        assert result["tokens"]["student_only"] == result["tokens"]["with_teacher"] == rows * cap
        stopped = round(0.6 * rows)
        expected = stopped * round(0.25 * cap) + (rows - stopped) * cap
        assert result["tokens"]["with_teacher_early_stop"] == expected
        assert result["early_stop_token_ratio"] == pytest.approx(expected / (rows * cap), abs=1e-3)
        wall, tokens = result["early_stop_wall_ratio"], result["early_stop_token_ratio"]
        assert result["realised_saving"] == pytest.approx((1 - wall) / (1 - tokens), abs=5e-3)
        assert result["with_teacher_tokens_per_s"] > 0 and result["student_only_tokens_per_s"] > 0
        # SmolLM2 is a Llama: its lean decode steps pass the check; transformers' forward samples
        # as many tokens
        assert result["lean_decode_used"] is True and result["lean_speedup"] > 0
        assert result["tokens"]["student_only_transformers"] == rows * cap


def test_vllm_is_skipped_with_the_carry_limit_as_reason(report):
    e = report["sections"]["e_vllm"]
    assert e["status"] == "skipped" and "carry limit" in e["reason"]
