"""The offline demo pipeline at reduced size: SFT-prepared teacher/student, OPD and KAT, table."""

from __future__ import annotations

import json

from kat_research.demo.__main__ import main


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
    assert "Agreement trap" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["opd", "kat"]
    for run in results["runs"]:
        assert run["steps"] == 2
        assert 0 <= run["eval_before"]["synthetic/accuracy"] <= 1
        assert 0 <= run["eval_after"]["synthetic/accuracy"] <= 1
        assert run["tokens_generated"] > 0
    assert (out / "demo_table.md").read_text().startswith("| run |")
    assert set(results["trap"]) >= {"kl_at_error", "kl_after_error", "teacher_agrees_after"}
    # teacher and student are trained once and cached (one folder per role)
    cached = sorted(p.name.split("-")[0] for p in (cache / "demo").iterdir())
    assert cached == ["student", "teacher"]
    assert all((p / "demo_model.json").exists() for p in (cache / "demo").iterdir())
