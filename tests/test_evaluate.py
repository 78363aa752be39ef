"""Benchmark evaluation end to end: the suite evaluator, the `kat_research.evaluate` entry point,
and the evaluation callback inside training, on tiny random models and the local data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from data_paths import FIXTURE_DATA
from hydra import compose, initialize_config_dir

from kat_research.config import CONFIG_DIR
from kat_research.data.prompts import format_prompt
from kat_research.eval import PAPER_BENCHMARKS
from kat_research.eval.runner import Completion
from kat_research.eval.suite import BenchmarkEvaluator, BenchmarkSettings
from kat_research.evaluate import evaluate, resolve_model
from kat_research.models import build_tiny_qwen3, save_tiny_model
from kat_research.training import train

ROOT = Path(__file__).resolve().parent.parent

# Few problems (of the vendored slices), short responses: each evaluation takes about a second.
SMALL = [
    f"paths.data_dir={FIXTURE_DATA}",
    "eval.evaluator.limit=3",
    "eval.evaluator.max_new_tokens=8",
]


def expected_metrics(records: list[dict], benchmark: str) -> tuple[float, float]:
    """(avg@k, pass@k) of one benchmark from its graded samples: the mean over problems of
    the share of correct samples, and of whether any sample is correct."""
    by_problem: dict[str, list[bool]] = {}
    for r in records:
        if r["benchmark"] == benchmark:
            by_problem.setdefault(r["problem_id"], []).append(r["correct"])
    shares = [sum(c) / len(c) for c in by_problem.values()]
    solved = [any(c) for c in by_problem.values()]
    return sum(shares) / len(shares), sum(solved) / len(solved)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, char_tokenizer) -> Path:
    """A training-run-like folder holding a tiny random student in ``student/``."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_model(run / "student", char_tokenizer, hidden_size=32)
    return run


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_settings_fall_back_to_suite_then_registry() -> None:
    bare = BenchmarkSettings("aime24").resolve(BenchmarkSettings("*"))
    assert (bare.n_samples, bare.temperature, bare.top_p, bare.max_new_tokens) == (
        32,
        0.6,
        0.95,
        4096,
    )
    suite = BenchmarkSettings("*", n_samples=4, limit=5)
    assert BenchmarkSettings("aime24").resolve(suite).n_samples == 4
    own = BenchmarkSettings("aime24", n_samples=2).resolve(suite)
    assert (own.n_samples, own.limit) == (2, 5)
    with pytest.raises(ValueError, match="math500"):
        BenchmarkSettings("math5000").resolve(suite)
    with pytest.raises(ValueError, match="n_samples"):
        BenchmarkSettings("aime24", n_samples=0).resolve(suite)


def test_run_folder_means_its_student(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == str(tiny_dir / "student")
    assert resolve_model(str(tiny_dir / "student")) == str(tiny_dir / "student")
    assert resolve_model("Qwen/Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"


def test_tiny_model_on_math500_and_aime24(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = compose_config(
        "evaluate", f"student={tiny_dir}", "eval=quick", f"paths.output_dir={tmp_path}", *SMALL
    )
    summary = evaluate(cfg)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 2  # benchmarks x problems x k
    assert {r["benchmark"] for r in records} == {"math500", "aime24"}
    assert all(0 < r["length"] <= 8 and isinstance(r["correct"], bool) for r in records)
    metrics = summary["metrics"]
    for bench in ("math500", "aime24"):
        avg, passed = expected_metrics(records, bench)
        assert metrics[f"{bench}/avg@k"] == pytest.approx(avg)
        assert metrics[f"{bench}/pass@k"] == pytest.approx(passed)
        assert metrics[f"{bench}/n_problems"] == 3
        assert metrics[f"{bench}/problems_per_s"] > 0 and metrics[f"{bench}/tokens_per_s"] > 0
    assert metrics["grading_timeouts"] == 0
    assert not any(name.startswith("paper_avg/") for name in metrics)
    assert summary["paper_avg_missing"] == ["amc23", "minerva_math"]
    table = pd.read_csv(tmp_path / "summary.csv", index_col="benchmark")
    assert sorted(table.index) == ["aime24", "math500"] and (table["k"] == 2).all()
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["aime24"]["k"] == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def fake_generation(evaluator: BenchmarkEvaluator, tokenizer, correct_samples: int | None):
    """A stand-in for ``generate_completions`` that boxes the gold in the first
    ``correct_samples`` samples of each problem (all when None) and nothing in the others."""
    golds = {
        format_prompt(tokenizer, p.problem, evaluator.instruction): p.gold
        for problems in evaluator.problems.values()
        for p in problems
    }

    def generate(model, tok, prompts, *, sampling, n_samples, batch_size, seed):
        def text(gold: str, s: int) -> str:
            right = correct_samples is None or s < correct_samples
            return f"so the answer is \\boxed{{{gold}}}." if right else "no idea"

        return [
            [Completion(text(golds[p], s), 5, "eos") for s in range(n_samples)] for p in prompts
        ]

    return generate


def test_forced_correct_answers_score_one_with_paper_average(monkeypatch, char_tokenizer) -> None:
    evaluator = BenchmarkEvaluator(list(PAPER_BENCHMARKS), data_dir=str(FIXTURE_DATA), limit=2)
    monkeypatch.setattr(
        "kat_research.eval.suite.generate_completions",
        fake_generation(evaluator, char_tokenizer, None),
    )
    result = evaluator(build_tiny_qwen3(char_tokenizer, hidden_size=32), char_tokenizer)
    assert len(result.records) == 2 * (8 + 8 + 8 + 32)  # registry k: 32 for AIME24, else 8
    assert all(r.correct for r in result.records)
    for bench in (*PAPER_BENCHMARKS, "paper_avg"):
        assert result.metrics[f"{bench}/avg@k"] == result.metrics[f"{bench}/pass@k"] == 1.0
    assert result.paper_missing == ()
    assert result.table.at["aime24", "k"] == 32 and result.table.at["math500", "k"] == 8


def test_one_correct_sample_of_k_and_no_average_without_all_four(
    monkeypatch, char_tokenizer
) -> None:
    evaluator = BenchmarkEvaluator(
        {"math500": None, "aime24": {"n_samples": 4}},
        data_dir=str(FIXTURE_DATA),
        limit=3,
    )
    monkeypatch.setattr(
        "kat_research.eval.suite.generate_completions",
        fake_generation(evaluator, char_tokenizer, 1),
    )
    result = evaluator(build_tiny_qwen3(char_tokenizer, hidden_size=32), char_tokenizer)
    assert result.metrics["math500/avg@k"] == pytest.approx(1 / 8)
    assert result.metrics["aime24/avg@k"] == pytest.approx(1 / 4)
    assert result.metrics["math500/pass@k"] == result.metrics["aime24/pass@k"] == 1.0
    assert result.paper_missing == ("amc23", "minerva_math")
    assert "paper_avg" not in result.table.index
    assert not any(name.startswith("paper_avg/") for name in result.metrics)


def test_entry_point_writes_its_files(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "job"
    command = [
        sys.executable,
        "-m",
        "kat_research.evaluate",
        f"student={tiny_dir}",  # a run folder: its student/ is evaluated
        "eval=quick",
        f"hydra.run.dir={out}",
        *SMALL,
        "eval.evaluator.limit=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "math500" in done.stdout and "aime24" in done.stdout
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2 * 2
    assert json.loads((out / "summary.json").read_text())["model"] == str(tiny_dir / "student")
    assert (out / "summary.csv").exists() and (out / ".hydra" / "config.yaml").exists()


def test_eval_callback_runs_the_suite_during_training(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={tmp_path.parent / 'cache'}",
        "method=opd",
        "logger=csv",
        "trainer.max_steps=1",
        "data.batch_size=4",
        "data.source.n=64",
        "rollout.max_new_tokens=12",
        "callbacks.progress_bar.refresh_rate=0",
        "eval=quick",
        *SMALL,
        "eval.evaluator.limit=2",
    )
    summary = train(cfg)
    for key, step in (("eval_before", 0), ("eval_after", 1)):
        lines = (tmp_path / "eval" / f"step{step:06d}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 2 * 2 * 2  # benchmarks x problems x k
        for bench in ("math500", "aime24"):
            avg, passed = expected_metrics(records, bench)
            assert summary[key][f"{bench}/avg@k"] == pytest.approx(avg)
            assert summary[key][f"{bench}/pass@k"] == pytest.approx(passed)
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert metrics["eval/aime24/pass@k"].notna().sum() == 2  # before and after training
