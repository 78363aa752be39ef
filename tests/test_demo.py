"""The offline demo pipeline at reduced size: SFT-prepared teacher/student, OPD and KAT, table."""

from __future__ import annotations

import json

import pytest

from kat_research.demo.__main__ import main
from kat_research.demo.models import train_sft_model
from kat_research.eval.tasks import SyntheticEvaluator
from kat_research.layout import eval_file
from kat_research.lit.eval_callback import target_reached
from kat_research.models import load_causal_lm


def test_demo_pipeline_reduced(tmp_path, capsys):
    cache = tmp_path / "cache"
    overrides = [
        f"paths.cache_dir={cache}",
        "model.teacher.sft.steps=3",
        "model.teacher.sft.n_problems=64",
        "model.student.sft.steps=3",
        "model.student.sft.n_problems=64",
        "trainer.max_steps=2",
        "data.source.n=64",
        "data.batch_size=8",
        "eval.evaluator.n_problems=8",
        "callbacks.progress_bar.refresh_rate=0",
        "logger=csv",
    ]
    out = tmp_path / "out"
    main(["--output-dir", str(out), *overrides])
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| opd |" in printed and "| kat |" in printed
    assert "After the student's first error" in printed and "low-KL trap" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["opd", "kat"]
    for run in results["runs"]:
        assert run["steps"] == 2 and run["rollouts"] == 2 * 8  # steps x prompts per step
        assert 0 < run["tokens_kept"] <= run["tokens_generated"] <= 2 * 8 * 48  # length cap 48
        for key, step in (("eval_before", 0), ("eval_after", 2)):  # accuracy = graded samples
            lines = eval_file(run["output_dir"], step).read_text().splitlines()
            correct = [json.loads(line)["correct"] for line in lines]
            assert len(correct) == 8
            assert run[key]["synthetic/accuracy"] == sum(correct) / 8
    opd, kat = results["runs"]  # the same student, greedily evaluated on the same problems
    assert opd["eval_before"] == kat["eval_before"]
    assert (out / "demo_table.md").read_text().startswith("| run |")
    assert set(results["trap"]) >= {"kl_at_error", "kl_after_error", "teacher_agrees_after"}
    # teacher and student are trained once and cached (one folder per role)
    cached = sorted(p.name.split("-")[0] for p in (cache / "demo").iterdir())
    assert cached == ["student", "teacher"]
    assert all((p / "demo_model.json").exists() for p in (cache / "demo").iterdir())


def test_target_reached_checks_every_listed_metric():
    metrics = {"synthetic/accuracy": 0.95, "synthetic/mean_length": 20.0}
    assert target_reached(metrics, {"synthetic/accuracy": 0.95})
    assert not target_reached(metrics, {"synthetic/accuracy": 0.96})
    assert not target_reached(metrics, {"synthetic/accuracy": 0.5, "synthetic/mean_length": 21})
    with pytest.raises(KeyError, match="synthetic/acc"):
        target_reached(metrics, {"synthetic/acc": 0.5})  # a misspelt target never stops


def test_sft_stops_at_the_first_check_reaching_the_target(tmp_path):
    sft = {
        "steps": 6,
        "eval_every": 2,
        "target_accuracy": 0.0,  # any accuracy reaches it: stop at the first check
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "n_problems": 32,
        "seed": 0,
    }
    architecture = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    meta = train_sft_model(tmp_path / "m", architecture=architecture, sft=sft, task={})
    assert meta["sft_steps"] == 2
    # the accuracy reported is the saved model's: evaluate it again from disk
    saved = load_causal_lm(str(tmp_path / "m"), trainable=False)
    again = SyntheticEvaluator(n_problems=256, task={})(saved.model, saved.tokenizer)
    assert meta["synthetic/accuracy"] == again.metrics["synthetic/accuracy"]
    # without a target every step runs
    meta = train_sft_model(
        tmp_path / "n", architecture=architecture, sft={**sft, "target_accuracy": None}, task={}
    )
    assert meta["sft_steps"] == 6
