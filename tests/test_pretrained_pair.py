"""The pretrained pair's builder (issue 20, item 4) on a tiny random model: one fine-tune gives a
student checkpoint and the teacher, both saved with their held-out accuracy and cached."""

from __future__ import annotations

import json

import pytest
import torch

from kat_research.building.pretrained_sft import NoStudentInBand, build_pair
from kat_research.building.sft import SFTModule
from kat_research.config import compose
from kat_research.eval.tasks import RunningSumEvaluator
from kat_research.models import load_causal_lm

TINY = [
    "model._target_=kat_research.models.tiny_random_model",
    "+model.hidden_size=32",
    "+model.num_layers=2",
    "+model.num_heads=4",
    "+model.num_kv_heads=2",
    "~model.dtype",
    "sft.steps=3",
    "sft.snapshot_every=1",
    "sft.student_band=[0.0,1.0]",  # a random tiny model scores 0: the first snapshot
    "sft.batch_size=2",
    "sft.n_problems=8",
    "sft.warmup_steps=1",
    "evaluation.n_problems=2",
    "evaluation.max_new_tokens=8",
]


def test_build_pair_saves_student_and_teacher_and_caches(tmp_path):
    cfg = compose([f"paths.cache_dir={tmp_path}", *TINY], config_name="pretrained_pair_running_sum")
    folders = build_pair(cfg)
    metas = {role: json.loads((f / "demo_model.json").read_text()) for role, f in folders.items()}
    assert metas["student"]["sft_steps"] == 1 and metas["teacher"]["sft_steps"] == 3
    choice = metas["student"]["student_choice"]  # the first snapshot in the band is the student
    assert choice == {"band": [0.0, 1.0], "snapshots_evaluated": {"1": 0.0}}
    assert not (folders["student"].parent / "snapshots").exists()
    for meta in metas.values():
        assert 0.0 <= meta["running_sum/accuracy"] <= 1.0
        assert meta["settings"]["sft"]["steps"] == 3 and meta["task"]["start_line"] is True
    student = load_causal_lm(str(folders["student"])).model.state_dict()
    teacher = load_causal_lm(str(folders["teacher"])).model.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # two more steps
    stamp = (folders["teacher"] / "model.safetensors").stat().st_mtime
    assert build_pair(cfg) == folders  # cached: not retrained
    assert (folders["teacher"] / "model.safetensors").stat().st_mtime == stamp


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.snapshot_every=3", r"sft.snapshot_every=3 must lie in \(0, sft.steps=3\)"),
        ("sft.student_band=[0.6,0.25]", r"sft.student_band=\[0.6, 0.25\] must be \[low, high\]"),
    ],
)
def test_bad_student_settings_are_named(tmp_path, override, message):
    cfg = compose(
        [f"paths.cache_dir={tmp_path}", *TINY, override], config_name="pretrained_pair_running_sum"
    )
    with pytest.raises(ValueError, match=message):
        build_pair(cfg)


def test_no_snapshot_in_the_band_names_their_accuracies_and_keeps_the_teacher(tmp_path):
    cfg = compose(
        [f"paths.cache_dir={tmp_path}", *TINY, "sft.student_band=[0.5,1.0]"],
        config_name="pretrained_pair_running_sum",
    )
    with pytest.raises(NoStudentInBand, match=r"\{1: 0.0, 2: 0.0\}.*snapshot_every smaller"):
        build_pair(cfg)
    (pair,) = (tmp_path / "pretrained_sft").iterdir()
    assert json.loads((pair / "teacher" / "demo_model.json").read_text())["sft_steps"] == 3
    assert not (pair / "student").exists()


class Interrupted(Exception):
    """Stands in for a kill part-way through a long fine-tune."""


def _weights(folder):
    return load_causal_lm(str(folder)).model.state_dict()


def test_an_interrupted_fine_tune_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    overrides = [*TINY, "sft.steps=5", "sft.checkpoint_every=2"]
    name = "pretrained_pair_running_sum"
    whole = build_pair(compose([f"paths.cache_dir={tmp_path / 'whole'}", *overrides], name))
    cfg = compose([f"paths.cache_dir={tmp_path / 'cut'}", *overrides], name)
    train_step = SFTModule.training_step

    def killed_at_step_3(module, batch, batch_idx):
        if module.global_step == 3:
            raise Interrupted
        return train_step(module, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", killed_at_step_3)
    with pytest.raises(Interrupted):
        build_pair(cfg)
    root = tmp_path / "cut" / "pretrained_sft"
    (pair,) = root.iterdir()
    assert pair.name == whole["teacher"].parent.name  # the checkpoint cadence is not in the key
    assert torch.load(pair / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (pair / "teacher").exists()
    steps_run = []

    def recorded(module, batch, batch_idx):
        steps_run.append(module.global_step)
        return train_step(module, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", recorded)
    resumed = build_pair(cfg)
    assert steps_run == [2, 3, 4]  # continued after the checkpoint, not from the start
    for role in ("student", "teacher"):
        before, after = _weights(whole[role]), _weights(resumed[role])
        assert all(torch.equal(before[k], after[k]) for k in before), role
    assert not (pair / "checkpoints").exists()  # removed once the teacher is saved


def test_a_pair_whose_evaluation_was_interrupted_is_evaluated_not_retrained(tmp_path, monkeypatch):
    cfg = compose([f"paths.cache_dir={tmp_path}", *TINY], config_name="pretrained_pair_running_sum")

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(RunningSumEvaluator, "__call__", killed)
    with pytest.raises(Interrupted):
        build_pair(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(SFTModule, "training_step", killed)  # training again would fail
    folders = build_pair(cfg)
    for folder in folders.values():
        meta = json.loads((folder / "demo_model.json").read_text())
        assert 0.0 <= meta["running_sum/accuracy"] <= 1.0
