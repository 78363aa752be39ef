"""Every training rollout's lengths logged per step (kat_research/lit/rollout_lengths.py) and the
planner's decode-time model fed from a run folder (plan.decode.from_runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kat_research.layout import LENGTHS_FILE
from kat_research.lit.rollout_lengths import read_generated, trim_lengths
from kat_research.planning.estimate import make_plan
from kat_research.training.job import train

ROWS = 4 * 2  # debug=fast: 4 prompts x 2 rollouts per step
PAPER = ["experiment=table1", "scale=paper", "model/student=0.7b", "trainer.devices=8"]


@pytest.fixture(scope="module")
def kat_run(tmp_path_factory, debug_config):
    """A 2-step KAT run of the debug preset (TensorBoard and CSV loggers)."""
    run = tmp_path_factory.mktemp("kat_run")
    train(debug_config(run, "method=kat", "export_student=false"))
    return run


def check_rows(run: Path, reasons: set[str]) -> pd.DataFrame:
    """The run's lengths file: one line per rollout row and step, whose per-step means and
    stop shares are the run's logged ``len/*`` and ``stop/*`` metrics."""
    rows = pd.read_csv(run / LENGTHS_FILE)
    assert list(rows.columns) == ["step", "row", "generated", "kept", "stop_reason"]
    assert rows.groupby("step")["row"].apply(list).to_dict() == {
        0: list(range(ROWS)),
        1: list(range(ROWS)),
    }
    assert ((rows.kept <= rows.generated) & (rows.generated <= 12) & (rows.kept >= 0)).all()
    assert set(rows.stop_reason) <= reasons
    metrics = pd.read_csv(run / "csv" / "metrics.csv").dropna(subset=["len/generated"])
    metrics = metrics.set_index("step")
    means = rows.groupby("step")[["generated", "kept"]].mean()
    for step in (0, 1):
        assert means.loc[step, "generated"] == pytest.approx(metrics.loc[step, "len/generated"])
        assert means.loc[step, "kept"] == pytest.approx(metrics.loc[step, "len/kept"])
        stops = rows[rows.step == step].stop_reason.value_counts(normalize=True)
        for reason, share in stops.items():
            assert share == pytest.approx(metrics.loc[step, f"stop/{reason}"])
    return rows


def test_a_run_logs_every_rows_lengths_per_step(kat_run):
    rows = check_rows(kat_run, {"eos", "max_tokens", "terminated"})
    assert (rows.kept < rows.generated).any()  # KAT cut rows at step 1 (after its warm-up)


def test_a_partial_mode_run_logs_its_finished_rows(debug_config, tmp_path):
    """rollout.mode=partial: the rows each step trains on (finished over several steps)."""
    overrides = ["method=kat", "rollout.mode=partial", "rollout.max_staleness=1", "logger=csv"]
    train(debug_config(tmp_path, *overrides, "export_student=false"))
    check_rows(tmp_path, {"eos", "max_tokens", "terminated", "stale"})


def test_the_generated_lengths_go_to_a_tensorboard_histogram(kat_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(kat_run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Histograms("rollout/generated_length")
    rows = pd.read_csv(kat_run / LENGTHS_FILE)
    assert [h.step for h in histograms] == [0, 1]
    for h in histograms:
        step = rows[rows.step == h.step].generated
        assert (h.histogram_value.num, h.histogram_value.sum) == (ROWS, step.sum())


def test_a_resumed_run_logs_each_step_once(kat_run, debug_config, tmp_path):
    """Killed after step 1's lengths but before its checkpoint: the resumed run drops them and
    logs step 1 again, leaving the file an uninterrupted run writes."""
    killed = tmp_path / "killed"
    shutil.copytree(kat_run, killed)
    (killed / "summary.json").unlink()
    for name in ("step000002.ckpt", "last.ckpt"):
        (killed / "checkpoints" / name).unlink()
    with open(killed / LENGTHS_FILE, "a") as f:  # a line the resumed run must not keep
        f.write("1,8,5,5,eos\n")
    train(debug_config(killed, "method=kat", "export_student=false"))
    resumed = (killed / LENGTHS_FILE).read_text()
    assert resumed == (kat_run / LENGTHS_FILE).read_text()


def test_micro_batches_of_one_step_continue_its_row_count(debug_config, tmp_path):
    train(debug_config(tmp_path, "trainer.accumulate_grad_batches=2", "export_student=false"))
    rows = pd.read_csv(tmp_path / LENGTHS_FILE)
    assert rows.groupby("step")["row"].apply(list).to_dict() == {
        0: list(range(2 * ROWS)),
        1: list(range(2 * ROWS)),
    }


def test_trim_and_read_a_lengths_file(tmp_path):
    path = tmp_path / LENGTHS_FILE
    path.parent.mkdir()
    path.write_text(
        "step,row,generated,kept,stop_reason\n"
        "0,0,5,5,eos\n0,1,9,4,terminated\n1,0,7,7,max_tokens\n2,0,3,3,eos\n2,1,8,8,eos\n"
    )
    assert read_generated(tmp_path) == [5, 9, 7, 3, 8]
    assert read_generated(tmp_path, last_steps=2) == [7, 3, 8]
    assert read_generated(tmp_path, last_steps=5) == [5, 9, 7, 3, 8]
    assert trim_lengths(path, 1) == 3
    assert read_generated(tmp_path) == [5, 9]
    assert trim_lengths(path, 1) == 0


def test_the_planner_predicts_from_a_run_as_from_its_lengths_json(
    kat_run, compose_config, tmp_path
):
    """plan.decode.from_runs={kat: <run>} gives the prediction of a JSON file holding the run's
    logged generated lengths; with last_steps=1, of the last step's only."""
    rows = pd.read_csv(kat_run / LENGTHS_FILE)
    for last, subset in ((None, rows), (1, rows[rows.step == 1])):
        path = tmp_path / f"lengths_{last}.json"
        path.write_text(json.dumps({"kat": subset.generated.tolist()}))
        by_file = compose_config(*PAPER, f"plan.decode.lengths={path}", config_name="plan")
        by_run = compose_config(
            *PAPER,
            f"plan.decode.from_runs={{kat: '{kat_run}'}}",
            f"plan.decode.last_steps={'null' if last is None else last}",
            config_name="plan",
        )
        expected = make_plan(by_file)["decode_seconds_per_batch"]
        assert make_plan(by_run)["decode_seconds_per_batch"] == expected
        assert set(expected) == {"kat"}


def test_the_planner_names_the_key_of_a_folder_without_lengths(compose_config, tmp_path):
    cfg = compose_config(*PAPER, f"plan.decode.from_runs={{opd: '{tmp_path}'}}", config_name="plan")
    with pytest.raises(FileNotFoundError, match="plan.decode.from_runs.opd=.*rollouts/lengths"):
        make_plan(cfg)
    bad = compose_config(*PAPER, "plan.decode.last_steps=0", config_name="plan")
    with pytest.raises(ValueError, match="plan.decode.last_steps=0"):
        make_plan(bad)
    path = tmp_path / "lengths.json"
    path.write_text('{"opd": [5, 7]}')
    twice = compose_config(*PAPER, f"plan.decode.lengths={path}", config_name="plan")
    twice.plan.decode.from_runs = {"opd": str(tmp_path)}
    with pytest.raises(ValueError, match="plan.decode.from_runs.opd: opd is also in"):
        make_plan(twice)
