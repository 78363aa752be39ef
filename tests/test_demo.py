"""The offline demo at reduced size (committed testbed models: OPD, KAT, RandomTerm, trap
statistics, table) and the SFT that builds demo models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kat_research.building import train_sft_model
from kat_research.config import ConfigError
from kat_research.data.running_sum import form_shares
from kat_research.demo import jobs as demo_jobs
from kat_research.demo.__main__ import main, trap_text
from kat_research.demo.jobs import accuracy_change, realised_saving, run_trap
from kat_research.eval.tasks import SyntheticEvaluator
from kat_research.layout import eval_file
from kat_research.lit.eval_callback import target_reached
from kat_research.models import load_causal_lm


def test_demo_pipeline_reduced(tmp_path, capsys):
    """The demo on the committed running-sum models, 2 steps of 4 prompts per method."""
    overrides = [
        "trainer.max_steps=2",
        "data.batch_size=4",
        "rollout.max_new_tokens=64",
        "eval.evaluator.n_problems=4",
        "termination.kat.min_buffer=4",
        "termination.kat.warmup_steps=1",
        "logger=csv",
    ]
    out = tmp_path / "out"
    main(["--output-dir", str(out), "--trap-rollouts", "8", *overrides])
    printed = capsys.readouterr().out
    for run in ("teacher", "opd", "kat", "random_term"):
        assert f"| {run} |" in printed
    assert "kat against OPD:" in printed and "realised saving" in printed
    assert "Agreement trap, student before OPD (8 uncut rollouts" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["opd", "kat", "random_term"]
    for run in results["runs"]:
        assert run["steps"] == 2 and run["rollouts"] == 2 * 4  # steps x prompts per step
        assert 0 < run["tokens_kept"] <= run["tokens_generated"] <= 2 * 4 * 64  # length cap
        for key, step in (("eval_before", 0), ("eval_after", 2)):  # accuracy = graded samples
            lines = eval_file(run["output_dir"], step).read_text().splitlines()
            correct = [json.loads(line)["correct"] for line in lines]
            assert len(correct) == 4
            assert run[key]["running_sum/accuracy"] == sum(correct) / 4
    opd, kat, random_term = results["runs"]  # the same student, greedily evaluated alike
    assert opd["eval_before"] == kat["eval_before"] == random_term["eval_before"]
    # RandomTerm ran at KAT's mean generated length
    saved = OmegaConf.load(Path(random_term["output_dir"]) / "config.yaml")
    assert saved.termination.random.mean_length == round(kat["mean_generated_length"])
    wall = 1 - kat["fit_time_s"] / opd["fit_time_s"]
    tokens = 1 - kat["tokens_generated"] / opd["tokens_generated"]
    realised = results["realised_saving"]["kat"]["realised"]
    # within 64 tokens KAT may cut no row of these 8: then the saving is undefined
    assert math.isnan(realised) if tokens == 0 else realised == pytest.approx(wall / tokens)
    for run in results["runs"]:  # longest row per batch, and live share of its row slots
        assert 1 <= run["mean_decode_steps"] <= 64
        slots = run["mean_decode_steps"] * run["rollouts"]  # one rank, equal batches
        assert run["occupancy"] == pytest.approx(run["tokens_generated"] / slots)
        assert 0 < run["occupancy"] <= 1
    assert re.search(r"batches ran \d+% (fewer|more) decode steps", printed)
    assert (out / "demo_table.md").read_text().startswith("| run |")
    for run in results["runs"]:  # the phrasing shares of each evaluation's addition lines
        for when, step in (("before", 0), ("after", 2)):
            lines = eval_file(run["output_dir"], step).read_text().splitlines()
            completions = [json.loads(line)["completion"] for line in lines]
            assert results["phrasing"][run["method"]][when] == list(form_shares(completions))
    assert "- opd: before " in printed and "the teacher was trained on 6:2:2" in printed
    for run in results["runs"]:  # the paired test counts what the evaluations graded
        change, before, after = (
            results["accuracy_change"][run["method"]],
            *(run[key]["running_sum/accuracy"] * 4 for key in ("eval_before", "eval_after")),
        )
        assert change["gained"] - change["lost"] == pytest.approx(after - before)
    assert "exact McNemar test" in printed
    trap = results["trap"]
    assert trap["n_rollouts"] == 8 and sum(trap["categories"].values()) == 8


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


def test_realised_saving_by_hand():
    opd = {"fit_time_s": 100.0, "tokens_generated": 1000, "mean_decode_steps": 250.0}
    kat = {"fit_time_s": 80.0, "tokens_generated": 600, "mean_decode_steps": 225.0}
    saving = realised_saving(opd, kat)
    assert saving["wall_saving"] == pytest.approx(0.2)
    assert saving["token_saving"] == pytest.approx(0.4)
    assert saving["realised"] == pytest.approx(0.5)  # time fell half as fast as tokens
    assert saving["decode_step_saving"] == pytest.approx(0.1)
    assert math.isnan(realised_saving(opd, opd)["realised"])  # no token saving: undefined


def test_trap_statistics_refuse_a_task_without_the_testbed_verifier(tmp_path):
    with pytest.raises(ConfigError, match="data.source.kind='synthetic'"):
        run_trap(8, tmp_path, ["data=synthetic"], threads=1)


def test_trap_statistics_on_the_running_sum_testbed(tmp_path):
    """The demo's trap job judges the running-total task with its own verifier."""
    # the larger student: about a quarter of its T=1 rollouts are correct, so both groups occur
    overrides = ["model/student=testbed_running_sum_large"]
    trap = run_trap(16, tmp_path, overrides, threads=1)
    assert trap["n_rollouts"] == 16
    assert set(trap["categories"]) == {"correct", "wrong", "degenerate", "capped"}
    assert sum(trap["categories"].values()) == 16
    assert trap["threshold"] > 0  # the q-quantile of these rollouts' window minima
    assert 0 <= trap["recall"] <= 1 and 0 <= trap["cut_correct"] <= 1


def test_trap_text_names_a_difference_only_where_its_test_does():
    trap = {
        "n_rollouts": 10,
        "categories": {"correct": 4, "wrong": 6},
        "horizon": 32,
        "kl_after_derailment": 0.040,
        "kl_correct_same_positions": 0.045,
        "n_compared": 6,
        "sign_test_p": 0.3,
        "quantile": 0.7,
        "threshold": 0.01,
        "recall": 0.5,
        "cut_correct": 0.25,
        "fisher_p": 0.5,
        "precision": 0.75,
    }
    text = trap_text(trap)
    assert "not distinguishable from correct rollouts" in text
    assert "no detectable preference between derailed and correct" in text
    text = trap_text({**trap, "sign_test_p": 0.01, "fisher_p": 0.01})
    assert "below correct rollouts" in text and "it cuts derailed rollouts more often" in text
    text = trap_text({**trap, "fisher_p": 0.01, "recall": 0.1})
    assert "it cuts correct rollouts more often than derailed ones" in text


def test_accuracy_change_counts_the_discordant_problems_by_hand(tmp_path):
    def write(step, correct):
        lines = [
            json.dumps({"problem_id": f"p{i}", "sample_index": 0, "correct": c})
            for i, c in enumerate(correct)
        ]
        eval_file(tmp_path, step).parent.mkdir(parents=True, exist_ok=True)
        eval_file(tmp_path, step).write_text("\n".join(lines) + "\n")

    write(0, [True, True, True, False, False, True])
    write(4, [False, False, False, False, True, True])  # 3 lost, 1 gained
    change = accuracy_change({"output_dir": str(tmp_path), "steps": 4})
    assert (change["lost"], change["gained"]) == (3, 1)
    assert change["p"] == pytest.approx(10 / 16)  # P(k<=1 or k>=3 | n=4, 1/2) = (1+4+4+1)/16
    write(4, [True] * 5)  # one problem fewer: a different evaluation
    with pytest.raises(ValueError, match="graded different problems"):
        accuracy_change({"output_dir": str(tmp_path), "steps": 4})


def test_a_job_run_not_fresh_is_read_back_when_finished_and_continued_otherwise(
    tmp_path, monkeypatch
):
    """scripts/bench_partial_rollouts.py splits its jobs over sessions: a finished job's summary
    is read back without training, an unfinished job's folder (its checkpoints) is kept for
    train() to resume; the demo (fresh) replaces an old folder."""
    trained = []
    monkeypatch.setattr(demo_jobs, "train", lambda cfg: trained.append(cfg) or {"steps": 3})
    folder = tmp_path / "opd"
    folder.mkdir()
    (folder / "checkpoints").mkdir()
    assert demo_jobs.run_method("opd", tmp_path, [], 1, "table1", fresh=False) == {"steps": 3}
    assert len(trained) == 1 and (folder / "checkpoints").exists()
    (folder / "summary.json").write_text(json.dumps({"steps": 150}))
    assert demo_jobs.run_method("opd", tmp_path, [], 1, "table1", fresh=False) == {"steps": 150}
    assert len(trained) == 1
    demo_jobs.run_method("opd", tmp_path, [], 1, "table1")  # fresh: the old folder goes
    assert len(trained) == 2 and not folder.exists()
