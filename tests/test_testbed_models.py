"""The testbed's committed models: their presets load them, their recorded training matches the
stage chain that rebuilds them, and the chain is checked before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kat_research.building import demo_model_info
from kat_research.building.stages import (
    _model_arguments,
    build_chain,
    stage_settings,
    weight_difference,
)
from kat_research.config import compose

SHIPPED = ("teacher", "student_large", "student_small")


def chain():
    return compose([], config_name="testbed_models")


CHAINS = [("testbed_models", SHIPPED), ("testbed_models_running_sum", SHIPPED)]


@pytest.mark.parametrize(("config_name", "shipped"), CHAINS)
def test_each_shipped_model_was_trained_as_its_stage_says(config_name, shipped):
    """The committed demo_model.json of each model holds the SFT settings of its stage in
    the chain's config (the parent's folder apart), so the chain rebuilds what ships."""
    cfg = compose([], config_name=config_name)
    stages = stage_settings(cfg)
    for name in shipped:
        stage = stages[cfg.shipped[name]]
        recorded = demo_model_info(Path(cfg.paths.assets_dir) / cfg.install_dir / name)
        sft = {k: v for k, v in recorded["sft"].items() if k != "init_from"}
        expected = {k: v for k, v in stage["sft"].items() if k in sft}
        assert sft == expected, name
        assert (recorded["sft"].get("init_from") is None) == (stage["from"] is None)
        if stage["from"] is None:
            assert recorded["architecture"] == stage["architecture"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["scale=tiny_collatz", "model/student=testbed_large"],
        ["scale=tiny_collatz"],  # its smaller student
        ["model/student=testbed_running_sum_large"],
        [],  # scale=tiny: the running-total teacher and smaller student
    ],
)
def test_presets_load_the_committed_models(overrides):
    cfg = compose(overrides)
    teacher, student = instantiate(cfg.model.teacher), instantiate(cfg.model.student)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.model.parameters())
    assert teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()


def test_a_missing_model_folder_names_the_fix(tmp_path):
    cfg = compose([f"paths.assets_dir={tmp_path}"])
    with pytest.raises(Exception, match="make testbed-models"):
        instantiate(cfg.model.teacher)


def test_stage_chain_is_checked_before_training():
    cfg = chain()
    OmegaConf.set_struct(cfg, False)  # as an edited conf/testbed_models.yaml would be
    bad_parent = OmegaConf.merge(cfg, {"stages": {"t1": {"from": "t7"}}})
    with pytest.raises(ValueError, match=r"stages.t1.from='t7'"):
        stage_settings(bad_parent)
    bad_key = OmegaConf.merge(cfg, {"stages": {"t2": {"sft": {"learning_rate": 1.0}}}})
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        stage_settings(bad_key)
    bad_task = OmegaConf.merge(cfg, {"stages": {"t2": {"task": {"start_lines": True}}}})
    with pytest.raises(ValueError, match=r"stages.t2.task: unknown keys \['start_lines'\]"):
        stage_settings(bad_task)
    bad_arch = OmegaConf.merge(cfg, {"stages": {"small": {"architecture": "huge"}}})
    with pytest.raises(ValueError, match="architecture='huge'"):
        stage_settings(bad_arch)


def test_stage_task_overrides_merge_over_the_data_preset():
    cfg = compose([], config_name="testbed_models_running_sum")
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, {"stages": {"t9": {"task": {"start_line": False}}}})
    stages = stage_settings(cfg)
    preset = OmegaConf.to_container(cfg.data.source.task)
    assert preset["start_line"] is True
    assert stages["t9"]["task"] == {**preset, "start_line": False}
    assert stages["t10"]["task"] == preset
    # t1-t8 keep the first design's phrasing and length bound (their YAML anchor)
    assert stages["t8"]["task"] == {**preset, "sum_first": True, "max_chars": 480}


def test_every_archived_stage_is_a_stage_of_the_chain_under_its_key():
    """A setting added to the task (sum_first) keeps the keys of the stages trained before it,
    so the committed archive still continues the chain."""
    cfg = compose([], config_name="testbed_models_running_sum")
    _, folders = _model_arguments(cfg, stage_settings(cfg))
    archived = {p.name for p in Path(cfg.archive_dir).iterdir() if p.is_dir()}
    assert archived and archived <= {folder.name for folder in folders.values()}


def _two_stage_chain(cache_dir: Path, archive_dir: Path):
    cfg = compose(
        [f"paths.cache_dir={cache_dir}", f"archive_dir={archive_dir}"],
        config_name="testbed_models_running_sum",
    )
    OmegaConf.set_struct(cfg, False)
    cfg.stages = {name: cfg.stages[name] for name in ("t1", "t2")}
    cfg.shipped = {"teacher": "t2"}
    return cfg


def test_a_fresh_cache_continues_the_chain_from_the_archive(tmp_path, monkeypatch):
    """Stages archived (committed) in one checkout are taken, not retrained, by a checkout whose
    cache lies elsewhere; a stage missing from both is trained under the same key as before."""
    from kat_research.building import models
    from kat_research.building.stages import archive
    from kat_research.models import build_char_tokenizer, build_tiny_qwen3
    from kat_research.models.cache import publish_folder
    from kat_research.models.tiny import COMPACT_CHAT_TEMPLATE

    trained: list[str] = []

    def fake_training(path: Path, *, architecture, sft, task, kind, checkpoint_every) -> dict:
        assert checkpoint_every == 100  # the chain config's cadence reaches the stage
        tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
        model = build_tiny_qwen3(
            tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=len(trained)
        )
        meta = {"sft_seconds": 0.0, "running_sum/accuracy": 0.0, "sft": sft}
        with publish_folder(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "demo_model.json").write_text(json.dumps(meta))
        trained.append(path.name)
        return meta

    monkeypatch.setattr(models, "train_sft_model", fake_training)
    archive_dir = tmp_path / "archive"
    first = build_chain(_two_stage_chain(tmp_path / "a", archive_dir))
    assert len(trained) == 2
    archive(first, ["t1", "t2"], archive_dir)
    assert sorted(p.name for p in archive_dir.iterdir()) == sorted(trained)

    second = build_chain(_two_stage_chain(tmp_path / "b", archive_dir), also=["t1"])
    assert len(trained) == 2  # nothing retrained
    for name in ("t1", "t2"):
        assert second[name].parent == tmp_path / "b" / "demo"
        assert weight_difference(second[name], archive_dir / first[name].name) == 0.0

    (archive_dir / first["t1"].name).rename(tmp_path / "t1-elsewhere")
    only_last = build_chain(_two_stage_chain(tmp_path / "c", archive_dir))
    assert list(only_last) == ["t2"] and len(trained) == 2  # t1 is not needed once t2 exists

    (tmp_path / "t1-elsewhere").rename(archive_dir / first["t1"].name)
    (archive_dir / first["t2"].name).rename(tmp_path / "t2-elsewhere")
    third = build_chain(_two_stage_chain(tmp_path / "d", archive_dir))
    assert trained[2:] == [first["t2"].name]  # the parent enters the key by name, not by path
    assert third["t2"].name == first["t2"].name
    with pytest.raises(ValueError, match=r"has no stages \['t9'\]"):
        build_chain(_two_stage_chain(tmp_path / "d", archive_dir), also=["t9"])
    with pytest.raises(ValueError, match=r"not built: \['t9'\]"):
        archive(first, ["t9"], archive_dir)


def test_weight_difference_by_hand(tmp_path):
    def folder(name: str, **tensors: torch.Tensor) -> Path:
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        return tmp_path / name

    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    a = folder("a", w=w, b=torch.zeros(2))
    assert weight_difference(a, folder("same", w=w.clone(), b=torch.zeros(2))) == 0.0
    moved = folder("moved", w=w + torch.tensor([[0.0, 0.25], [-0.5, 0.0]]), b=torch.zeros(2))
    assert weight_difference(a, moved) == 0.5
    assert weight_difference(a, folder("renamed", v=w, b=torch.zeros(2))) == float("inf")
    assert weight_difference(a, folder("reshaped", w=w.flatten(), b=torch.zeros(2))) == float("inf")


@pytest.mark.slow
def test_rebuilt_models_reach_the_committed_accuracy(tmp_path):
    """`make testbed-models` from scratch (~45 min, one thread): each rebuilt model's held-out
    greedy accuracy is within 2 of the 39 problems of the committed model's."""
    cfg = compose([f"paths.cache_dir={tmp_path}"], config_name="testbed_models")
    folders = build_chain(cfg)
    for name, stage in cfg.shipped.items():
        committed = json.loads(
            (Path(cfg.paths.assets_dir) / "testbed" / name / "demo_model.json").read_text()
        )["collatz/accuracy"]
        rebuilt = demo_model_info(folders[stage])["collatz/accuracy"]
        assert abs(rebuilt - committed) <= 2 / 39 + 1e-9, (name, rebuilt, committed)
