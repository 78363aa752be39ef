"""Every config option composes, builds its objects, and bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from kat_research.config import CONFIG_DIR
from kat_research.termination.base import Terminator

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/kat-test", *overrides])


GROUPS = [
    "model/student",
    "model/teacher",
    "method",
    "loss",
    "rollout",
    "termination",
    "data",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "eval",
    "paths",
]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_group_option_composes(group, option):
    cfg = compose_train(f"{group}={option}")
    assert cfg.method.name and cfg.loss.kind


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_train(f"experiment={experiment}")
    assert isinstance(instantiate(cfg.method.terminator), Terminator)


@pytest.mark.parametrize("method", options("method"))
def test_every_method_builds_its_terminator(method):
    cfg = compose_train(f"method={method}")
    rule = instantiate(cfg.method.terminator)
    assert isinstance(rule, Terminator)
    assert cfg.method.name == method


def test_objects_are_built_from_targets():
    cfg = compose_train()
    opt = instantiate(cfg.optimizer)
    assert opt.func.__name__ == "AdamW" and opt.keywords["lr"] == 1e-6
    assert opt.keywords["weight_decay"] == 0.0
    assert instantiate(cfg.scheduler).keywords["warmup_ratio"] == 0.03
    assert cfg.trainer.gradient_clip_val == 1.0


def test_paper_presets_name_their_hub_ids():
    assert compose_train("model/student=0.7b").model.student.name_or_path == "Qwen/Qwen3-1.7B-Base"
    assert compose_train("model/student=1.6b").model.student.name_or_path == "Qwen/Qwen3-4B-Base"
    assert compose_train("model/teacher=qwen3_8b").model.teacher.name_or_path == "Qwen/Qwen3-8B"


def test_topk_lsm_method_switches_loss_and_rollout():
    cfg = compose_train("method=topk_lsm")
    assert cfg.loss.kind == "topk_lsm" and cfg.loss.k == 32
    assert cfg.rollout.top_p == 0.9 and "<|im_start|>" in cfg.rollout.masked_tokens
    # the command line still wins over the method's loss
    assert compose_train("method=topk_lsm", "loss=sampled_token").loss.kind == "sampled_token"


def test_kat_settings_are_shared_by_kat_methods():
    cfg = compose_train(
        "method=kat_fixed_prefix",
        "termination.kat.quantile=0.9",
        "termination.fixed_prefix.budget=2048",
    )
    rule = instantiate(cfg.method.terminator)
    fixed, kat = rule.terminators
    assert fixed.budget == 2048 and kat.quantile == 0.9


def test_unknown_option_fails_with_hydra_message():
    with pytest.raises(ConfigCompositionException, match="method"):
        compose_train("method=does_not_exist")
    with pytest.raises(ConfigCompositionException):
        compose_train("rollout.no_such_knob=3")
