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
from conftest import VLLM_TEST_SETTINGS
from data_paths import FIXTURE_DATA
from hydra import compose, initialize_config_dir

from kat_research.config import CONFIG_DIR
from kat_research.data.prompts import format_prompt
from kat_research.eval import PAPER_BENCHMARKS
from kat_research.eval.runner import Completion
from kat_research.eval.suite import BenchmarkEvaluator, BenchmarkSettings
from kat_research.evaluate import evaluate, resolve_model
from kat_research.models import build_tiny_qwen3, load_causal_lm, save_tiny_model
from kat_research.training.job import train

ROOT = Path(__file__).resolve().parent.parent

# Few problems (of the vendored slices), short responses: each evaluation takes about a second.
SMALL = [
    f"paths.data_dir={FIXTURE_DATA}",
    "eval.evaluator.limit=3",
    "eval.evaluator.max_new_tokens=8",
]
# Small CPU vLLM engines that hold the character-level benchmark prompts (hundreds of tokens).
VLLM_EVAL = {**VLLM_TEST_SETTINGS, "max_model_len": 2048}
# The training student with one attention head of size 32, the smallest vLLM's CPU kernels take.
ONE_HEAD = ["model.student.num_heads=1", "model.student.num_kv_heads=1"]


def vllm_overrides(node: str, settings: dict) -> list[str]:
    """``settings`` as overrides of ``node`` (``eval.vllm`` is an empty node: keys are added)."""
    plus = "+" if node == "eval.vllm" else ""
    return [f"{plus}{node}.{k}={str(v).lower()}" for k, v in settings.items()]


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def eval_backend(request) -> list[str]:
    """Overrides choosing the evaluation backend: the same tests run over HF and vLLM."""
    if request.param == "hf":
        return ["eval.backend=hf"]
    return ["eval.backend=vllm", *vllm_overrides("eval.vllm", VLLM_EVAL)]


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
    """A training-run-like folder holding a tiny random student (one head) in ``student/``."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_model(run / "student", char_tokenizer, hidden_size=32, num_heads=1, num_kv_heads=1)
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


def test_tiny_model_on_math500_and_aime24(tmp_path: Path, tiny_dir: Path, eval_backend) -> None:
    cfg = compose_config(
        "evaluate",
        f"student={tiny_dir}",
        "eval=quick",
        f"paths.output_dir={tmp_path}",
        *SMALL,
        *eval_backend,
    )
    summary = evaluate(cfg)
    assert summary["backend"] == cfg.eval.backend
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

    def generate(model, tok, prompts, *, sampling, n_samples, batch_size, seed, vllm):
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


def test_entry_point_writes_its_files(tmp_path: Path, tiny_dir: Path, eval_backend) -> None:
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
        *eval_backend,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "math500" in done.stdout and "aime24" in done.stdout
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2 * 2
    assert json.loads((out / "summary.json").read_text())["model"] == str(tiny_dir / "student")
    assert (out / "summary.csv").exists() and (out / ".hydra" / "config.yaml").exists()


def training_config(output_dir: Path, *overrides: str):
    """One OPD step of the tiny random pair (`debug=fast`) with the quick suite before and
    after it."""
    return compose_config(
        "train",
        "debug=fast",
        f"paths.output_dir={output_dir}",
        f"paths.cache_dir={output_dir.parent / 'cache'}",
        "method=opd",
        "logger=csv",
        "trainer.max_steps=1",
        "eval=quick",
        *SMALL,
        "eval.evaluator.limit=2",
        *overrides,
    )


def test_eval_callback_runs_the_suite_during_training(tmp_path: Path, eval_backend) -> None:
    summary = train(training_config(tmp_path, *ONE_HEAD, *eval_backend))
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


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, char_tokenizer) -> Path:
    """A tiny student with an untied output head: with a tied one, a random tiny model greedily
    repeats its last input token, so greedy completions would all look alike."""
    return save_tiny_model(
        tmp_path_factory.mktemp("untied"),
        char_tokenizer,
        hidden_size=32,
        num_heads=1,
        num_kv_heads=1,
        seed=1,
        tie_word_embeddings=False,
    )


@pytest.mark.vllm
def test_greedy_completions_are_the_same_on_both_backends(untied_dir: Path) -> None:
    student = load_causal_lm(str(untied_dir), trainable=False)
    results = {}
    for backend in ("hf", "vllm"):
        evaluator = BenchmarkEvaluator(
            ["math500", "aime24"],
            data_dir=str(FIXTURE_DATA),
            limit=3,
            n_samples=2,
            temperature=0.0,
            max_new_tokens=16,
            stop_tokens=["<|im_end|>"],
            backend=backend,
            vllm=VLLM_EVAL,
        )
        results[backend] = evaluator(student.model, student.tokenizer)
    hf, vllm = ([r.to_dict() for r in results[b].records] for b in ("hf", "vllm"))
    assert len(hf) == 2 * 3 * 2 and hf == vllm
    assert len({r["completion"] for r in hf}) > 1  # not one degenerate completion everywhere
    columns = ["k", "n_problems", "avg@k", "pass@k", "mean_length"]
    pd.testing.assert_frame_equal(results["hf"].table[columns], results["vllm"].table[columns])


@pytest.mark.vllm
def test_vllm_samples_of_one_request_differ_and_follow_the_seed(untied_dir: Path) -> None:
    """The k samples of one request are k different draws (pass@k would be wrong otherwise),
    and the evaluator's seed fixes them."""
    student = load_causal_lm(str(untied_dir), trainable=False)

    def completions(seed: int) -> list[list[str]]:
        evaluator = BenchmarkEvaluator(
            ["aime24"],
            data_dir=str(FIXTURE_DATA),
            limit=2,
            n_samples=4,
            temperature=1.0,
            max_new_tokens=12,
            seed=seed,
            backend="vllm",
            vllm=VLLM_EVAL,
        )
        by_problem: dict[str, list[str]] = {}
        for r in evaluator(student.model, student.tokenizer).records:
            by_problem.setdefault(r.problem_id, []).append(r.completion)
        return list(by_problem.values())

    first = completions(0)
    assert len(first) == 2 and all(len(set(samples)) == 4 for samples in first)
    assert completions(0) == first
    assert completions(1) != first


@pytest.mark.vllm
def test_vllm_evaluation_follows_training_and_shares_the_rollout_engine(
    tmp_path: Path, untied_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy evaluation before and after a large optimizer step: the vLLM evaluator's own
    engine (HF rollouts) and the engine it shares with vLLM rollouts give the HF evaluator's
    completions both times, so each got the trained weights; one engine starts per run."""
    from kat_research.rollout.backends.vllm import VLLMBackend

    starts: list[VLLMBackend] = []
    start = VLLMBackend._start

    def counted_start(self):
        starts.append(self)
        return start(self)

    monkeypatch.setattr(VLLMBackend, "_start", counted_start)
    student = [  # the untied student, loaded from its folder by the hub-model preset
        "model/student=qwen3_1.7b_base",
        f"model.student.name_or_path={untied_dir}",
        "model.student.gradient_checkpointing=false",
    ]
    greedy = ["rollout.temperature=0", "eval.evaluator.temperature=0", "optimizer.lr=0.1"]
    runs = {}
    for rollout, evaluation in (("hf", "hf"), ("hf", "vllm"), ("vllm", "vllm")):
        starts.clear()
        out = tmp_path / f"{rollout}_{evaluation}"
        overrides = [f"rollout.backend={rollout}", f"eval.backend={evaluation}", *greedy]
        if rollout == "vllm":  # its engine serves the evaluation too: it must hold the prompts
            overrides += vllm_overrides("rollout.vllm", VLLM_EVAL)
        elif evaluation == "vllm":
            overrides += vllm_overrides("eval.vllm", VLLM_EVAL)
        train(training_config(out, *student, *overrides))
        assert len(starts) == int("vllm" in (rollout, evaluation))
        runs[rollout, evaluation] = [
            read_records(out / "eval" / f"step{s:06d}.jsonl") for s in (0, 1)
        ]
    before, after = runs["hf", "hf"]
    assert before != after  # the step changed what the student generates
    assert runs["hf", "vllm"] == runs["hf", "hf"]
    assert runs["vllm", "vllm"] == runs["hf", "hf"]
