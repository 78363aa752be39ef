"""Reproduction sweeps: every experiment composes at every scale, a reduced Table 1 runs end to
end and fills its table, re-runs skip finished jobs and re-run failed ones, and launchers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from kat_research.config import ConfigError
from kat_research.provenance import code_commit
from kat_research.reproduce import main as reproduce
from kat_research.reproduce import validate
from kat_research.sweep.job import job_config
from kat_research.sweep.launch import LOCAL, SUBPROCESS
from kat_research.sweep.spec import expand_jobs, load_spec, spec_names
from kat_research.sweep.state import DONE, PENDING, job_folder, job_state
from kat_research.sweep.submitit_launch import (
    JobRunner,
    launcher_file,
    launcher_names,
    launcher_settings,
    make_executor,
)
from kat_research.termination.marking import KATPhaseMarker

SCALES = ("paper", "tiny", "tiny_collatz")


def covering(jobs):
    """A few jobs holding every label of every axis at least once (composing all is slow)."""
    seen, chosen = set(), []
    for job in jobs:
        labels = {(job.kind, axis, label) for axis, label in job.axes.items()}
        if not labels <= seen:
            seen |= labels
            chosen.append(job)
    return chosen


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", spec_names())
def test_every_experiment_composes(tmp_path, name, scale):
    """Jobs covering every axis label compose and validate (all of them: the slow test)."""
    jobs = expand_jobs(load_spec(name), scale)
    launcher = SUBPROCESS if scale == "paper" else LOCAL  # paper jobs run on 8 ranks
    for job in covering(jobs):
        validate(job, job_folder(tmp_path, job), launcher)
    assert {job.scale for job in jobs} <= {scale}


def test_multi_rank_jobs_need_a_process_of_their_own(tmp_path):
    job = expand_jobs(
        load_spec("ablation_quantile"), "smoke", ["trainer=ddp", "trainer.devices=2"]
    )[0]
    with pytest.raises(ConfigError, match="--launcher subprocess"):
        validate(job, tmp_path, "local")
    validate(job, tmp_path, "subprocess")


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", spec_names())
def test_every_job_validates(tmp_path, name, scale):
    assert reproduce([name, f"--scale={scale}", f"--runs-dir={tmp_path}", "--dry-run"]) == 0


def test_sweep_sizes_at_paper_scale():
    sizes = {name: len(expand_jobs(load_spec(name), "paper")) for name in spec_names()}
    assert sizes == {
        "table1": 1 + 2 + 2 * 4 * 3,
        "table2": 0,
        "ablation_prefix": 3 * 3 + 3,
        "ablation_kat_prefix": 3 * 3,
        "ablation_quantile": 3 * 3,
        "ablation_stagewise": 3 * 3,
        "ablation_topk": 5 * 3,
    }


def config_of(name: str, scale: str, **axes: str):
    """The config of the first job of ``name`` whose axes hold ``axes``."""
    job = next(
        j
        for j in expand_jobs(load_spec(name), scale)
        if all(j.axes.get(k.replace("__", ".")) == v for k, v in axes.items())
    )
    return job_config(job, Path("/tmp/unused"))


def test_scale_decides_models_and_sizes():
    paper = config_of("table1", "paper", student="large", method="kat")
    assert paper.model.student.name_or_path == "Qwen/Qwen3-4B-Base"
    assert paper.model.teacher.name_or_path == "Qwen/Qwen3-8B"
    assert paper.trainer.max_epochs == 2 and paper.data.source.hub_id.endswith("DAPO-Math-17k")
    tiny = config_of("table1", "tiny", student="large", method="kat")
    assert tiny.model.student.path.endswith("assets/testbed_running_sum/student_large")
    assert tiny.model.teacher.path.endswith("assets/testbed_running_sum/teacher")
    assert tiny.data.source.kind == "running_sum" and tiny.eval.evaluator.n_samples == 8
    collatz = config_of("table1", "tiny_collatz", student="small", method="kat")
    assert collatz.model.student.path.endswith("assets/testbed/student_small")
    assert collatz.data.source.kind == "collatz" and collatz.rollout.max_new_tokens == 256
    prefix = config_of("ablation_prefix", "paper", termination__fixed_prefix__budget="4096")
    assert prefix.method.name == "fixed_prefix" and prefix.termination.fixed_prefix.budget == 4096
    # the Top-K ablation truncates below the teacher's support on the testbed (scale.topk_k)
    topk = [config_of("ablation_topk", scale, variant="topk_plain") for scale in SCALES]
    assert [c.loss.k for c in topk] == [32, 2, 32] and topk[1].loss.kind == "topk_lsm"
    assert config_of("ablation_topk", "tiny", variant="sampled_token").loss.kind == "sampled_token"
    stagewise = config_of("ablation_stagewise", "tiny", method__supervise="pre+agreement")
    rule = instantiate(stagewise.method.terminator)
    assert isinstance(rule, KATPhaseMarker) and rule.supervise == "pre+agreement"
    assert rule.rule.window == stagewise.termination.kat.window == 16


# A reduced Table 1: smoke scale (tiny random models, one seed, 2 steps), one student, shorter.
REDUCED = [
    "~scale.students.large",
    "data.batch_size=2",
    "rollout.group_size=1",
    "rollout.max_new_tokens=8",
    "eval.evaluator.n_problems=4",
]


def run(tmp_path: Path, *args: str) -> int:
    return reproduce(
        [
            *args,
            "--scale=smoke",
            f"--runs-dir={tmp_path / 'runs'}",
            f"--results-dir={tmp_path / 'results'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *REDUCED,
        ]
    )


def test_reduced_table1_end_to_end_and_resume(tmp_path, capsys):
    assert run(tmp_path, "table1") == 0
    printed = capsys.readouterr().out  # progress: jobs done and the time the rest will take
    assert re.search(r"sweep: job 1/6 \(17%\), [\d.]+ s/job, about [\d.]+ (s|min) left", printed)
    tidy = pd.read_csv(tmp_path / "results" / "table1.csv")
    accuracy = tidy[tidy["measure"].isin(["avg@k", "pass@k"])]
    assert len(accuracy) == 6 * 2  # every row x measure
    assert accuracy["mean"].notna().all() and accuracy["missing"].isna().all()
    lengths = tidy[
        (tidy["measure"] == "length") & ~tidy["method"].isin(["teacher", "student_before"])
    ]
    assert lengths["mean"].between(1, 8).all()
    for suffix in (".md", ".tex", ".png", ".jobs.csv"):
        assert (tmp_path / "results" / f"table1{suffix}").exists()
    # the table names its command and the code its jobs ran (recorded in each status.json)
    notes = (tmp_path / "results" / "table1.md").read_text()
    assert f"code: commit {code_commit()} (6 jobs)" in notes
    assert "command: `python -m kat_research.reproduce table1 --scale=smoke" in notes

    runs = tmp_path / "runs" / "smoke" / "table1"
    kat = runs / "student=small,method=kat,seed=0"
    assert json.loads((kat / "status.json").read_text())["n_params"]["teacher"] > 0
    assert (kat / ".hydra" / "config.yaml").exists() and (
        kat / "rollouts" / "kl_traces.jsonl"
    ).exists()
    assert len(list((kat / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # scalars + hparams

    summaries = {p: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}
    capsys.readouterr()
    assert run(tmp_path, "table1", "table2") == 0  # everything done: nothing runs again
    printed = capsys.readouterr().out
    assert "table1 @ smoke: 6 jobs (6 done); 0 to run" in printed
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")} == summaries
    assert (tmp_path / "results" / "table2.md").exists()

    (kat / "summary.json").unlink()  # a job killed before it finished
    assert run(tmp_path, "table1") == 0
    assert "1 interrupted" in capsys.readouterr().out
    assert (kat / "summary.json").exists()
    assert json.loads((kat / "status.json").read_text())["attempt"] == 2
    others = {p: t for p, t in summaries.items() if p.parent != kat}
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_changed_overrides_make_finished_jobs_stale(tmp_path, capsys):
    args = ["ablation_quantile", "scale.quantiles=[0.5]"]
    assert run(tmp_path, *args) == 0
    capsys.readouterr()
    assert run(tmp_path, *args, "optimizer.lr=0.01", "--dry-run") == 0
    assert "1 stale); 0 would run" in capsys.readouterr().out
    assert run(tmp_path, *args, "optimizer.lr=0.01") == 0  # kept, not re-run
    assert "1 stale); 0 to run" in capsys.readouterr().out
    assert run(tmp_path, *args, "optimizer.lr=0.01", "--rerun-stale") == 0
    assert "1 stale); 1 to run" in capsys.readouterr().out
    (folder,) = (tmp_path / "runs" / "smoke" / "ablation_quantile").iterdir()
    assert job_state(folder) == DONE
    assert "optimizer.lr=0.01" in json.loads((folder / "job.json").read_text())["overrides"]
    assert json.loads((folder / "status.json").read_text())["attempt"] == 1  # from scratch


def test_no_run_launches_nothing_and_says_so(tmp_path, capsys):
    assert run(tmp_path, "ablation_stagewise", "--no-run") == 0
    printed = capsys.readouterr().out
    assert "3 missing); 3 would run" in printed and "[    missing, would run]" in printed
    assert "--no-run: nothing launched" in printed
    assert not (tmp_path / "runs").exists()


def test_template_launcher_hands_jobs_over_once(tmp_path, capsys):
    template = "echo {cmd} > {dir}/submitted.txt"
    args = ["ablation_stagewise", "--no-run"]
    assert run(tmp_path, "ablation_stagewise", f"--launcher={template}") == 0
    jobs = expand_jobs(load_spec("ablation_stagewise"), "smoke")
    folders = [job_folder(tmp_path / "runs", job) for job in jobs]
    assert all("kat_research.sweep.job" in (f / "submitted.txt").read_text() for f in folders)
    assert {job_state(f) for f in folders} == {PENDING}
    capsys.readouterr()
    assert run(tmp_path, "ablation_stagewise", f"--launcher={template}") == 0
    assert "3 pending); 0 to run" in capsys.readouterr().out
    assert run(tmp_path, *args) == 0  # the table reports the pending cells as missing
    printed = capsys.readouterr().out
    assert "3 pending); 0 would run" in printed and "--no-run: nothing launched" in printed
    assert "missing cell" in (tmp_path / "results" / "ablation_stagewise.md").read_text()
    assert DONE not in {job_state(f) for f in folders}


def test_submitit_local_launcher_runs_jobs_and_aggregates(tmp_path):
    assert (
        run(tmp_path, "ablation_quantile", "scale.quantiles=[0.5]", "--launcher=submitit_local")
        == 0
    )
    folder = tmp_path / "runs" / "smoke" / "ablation_quantile" / "student=small,quantile=0.5,seed=0"
    assert job_state(folder) == DONE
    assert Path(json.loads((folder / "submitit.json").read_text())["stdout"]).exists()
    assert "1 of 1 jobs done" in (tmp_path / "results" / "ablation_quantile.md").read_text()


@pytest.mark.parametrize("name", launcher_names())
def test_launcher_files_follow_the_job_config(tmp_path, monkeypatch, name):
    """Every key of conf/launcher/<name>.yaml resolves against the job's config and is a
    parameter submitit knows (update_parameters rejects unknown ones)."""
    fake_slurm(tmp_path, monkeypatch)
    job = expand_jobs(load_spec("table1"), "paper", ["trainer=ddp", "trainer.devices=8"])[-1]
    settings = launcher_settings(launcher_file(name), job, tmp_path / "job")
    assert settings["gpus_per_node"] == 8
    assert settings["tasks_per_node"] == (8 if settings["cluster"] == "slurm" else 1)
    make_executor(tmp_path / "submitit", settings)


def test_submitted_jobs_resume_when_requeued(tmp_path):
    """On a timeout or preemption submitit requeues what ``checkpoint`` returns: the same job,
    which then resumes from its newest checkpoint."""
    requeued = JobRunner().checkpoint(tmp_path)
    assert isinstance(requeued.function, JobRunner) and requeued.args == (tmp_path,)


def fake_slurm(tmp_path: Path, monkeypatch) -> None:
    """A fake sbatch that records the submission file (and srun, which submitit checks for)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_submitit_slurm_launcher_submits_one_array_and_returns(tmp_path, monkeypatch, capsys):
    """Resources come from conf/launcher/submitit_slurm.yaml, resolved per job, with the
    command line's launcher.<key>=<value> settings."""
    fake_slurm(tmp_path, monkeypatch)
    args = ["ablation_stagewise", "--launcher=submitit_slurm", "launcher.slurm.partition=gpu"]
    assert run(tmp_path, *args) == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in (
        "--array=0-2%3",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--time=1440",
        "--partition=gpu",
        "--job-name=kat_ablation_stagewise",
    ):
        assert f"#SBATCH {line}" in script
    folders = [
        job_folder(tmp_path / "runs", j)
        for j in expand_jobs(load_spec("ablation_stagewise"), "smoke")
    ]
    assert {job_state(f) for f in folders} == {PENDING}
    assert [json.loads((f / "submitit.json").read_text())["job_id"] for f in folders] == [
        "4242_0",
        "4242_1",
        "4242_2",
    ]
    capsys.readouterr()
    assert run(tmp_path, *args) == 0
    assert "3 pending); 0 to run" in capsys.readouterr().out


def test_unknown_launcher_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="submitit_slurm"):
        run(tmp_path, "table1", "--launcher=slurm_cluster")


def test_parallel_subprocess_jobs_all_finish(tmp_path, capsys):
    """--parallel 2: the subprocess launcher runs two jobs at a time; every job finishes in its
    own folder, and --parallel above 1 without subprocess is refused."""
    args = ["ablation_quantile", "scale.quantiles=[0.5,0.9]"]
    assert run(tmp_path, *args, "--launcher=subprocess", "--parallel=2") == 0
    assert "sweep: job 1/2 (50%)" in capsys.readouterr().out
    runs = tmp_path / "runs" / "smoke" / "ablation_quantile"
    done = sorted(p.parent.name for p in runs.glob("*/summary.json"))
    assert len(done) == 2  # one per quantile (smoke: one student, one seed)
    for folder in runs.iterdir():
        assert json.loads((folder / "status.json").read_text())["state"] == "done"
    with pytest.raises(ValueError, match="--parallel 2: .* only with --launcher subprocess"):
        run(tmp_path, *args, "--parallel=2")


def test_evaluation_jobs_use_the_configured_threads(debug_config, tmp_path):
    """An evaluation-only job (Table 1's teacher row) sets torch's threads like a training job;
    torch's default would oversubscribe cores shared with the sweep's other jobs."""
    from kat_research.sweep.evaluate_model import evaluate_model

    before = torch.get_num_threads()
    try:
        cfg = debug_config(tmp_path, "eval=synthetic", "eval.evaluator.n_problems=2", "threads=1")
        torch.set_num_threads(2)
        summary = evaluate_model(cfg, "teacher")
        assert torch.get_num_threads() == 1 and summary["kind"] == "evaluate"
    finally:
        torch.set_num_threads(before)
