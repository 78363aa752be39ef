"""Every config option composes, builds its objects, and bad values fail clearly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kat_research.config import CONFIG_DIR
from kat_research.termination.base import Terminator

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/kat-test", *overrides])


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def set_by_scale(cfg) -> set[str]:
    """The keys the composed config's scale file sets itself (a scale sizes everything, so it
    overrides group options' values on purpose)."""
    scale = OmegaConf.to_container(OmegaConf.load(CONF / "scale" / f"{cfg.scale.name}.yaml"))
    scale.pop("defaults", None)
    return {key for key, _ in _leaves(scale)}


def assert_file_applied(cfg, path: Path, package: str) -> None:
    """Every value ``path`` sets (its ``defaults`` list aside, ``???`` placeholders aside) is
    in the composed ``cfg`` under ``package`` (``""`` for ``# @package _global_`` files),
    unresolved: a later default or a wrong package that overrides an option shows here."""
    if "@package _global_" in path.read_text():
        package = ""
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    own.pop("defaults", None)  # an alias holds nothing else: its target is checked itself
    composed = OmegaConf.to_container(cfg, resolve=False)
    sized = set_by_scale(cfg) if path.parent.name != "scale" else set()
    for key, value in _leaves(own) if own else ():
        if value == "???" or f"{package}.{key}".strip(".") in sized:
            continue
        node = composed
        for part in filter(None, f"{package}.{key}".split(".")):
            node = node.get(part, "<missing>") if isinstance(node, dict) else "<missing>"
        assert node == value, f"{path.relative_to(CONF)}: {key} = {value!r}, composed {node!r}"


GROUPS = [
    "model/student",
    "model/teacher",
    "method",
    "loss",
    "data",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "eval",
    "paths",
    "scale",
    "debug",
]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_group_option_composes(group, option):
    cfg = compose_train(f"{group}={option}")
    assert_file_applied(cfg, CONF / group / f"{option}.yaml", group.replace("/", "."))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_train(f"experiment={experiment}")
    assert_file_applied(cfg, CONF / "experiment" / f"{experiment}.yaml", "")
    assert isinstance(instantiate(cfg.method.terminator), Terminator)


@pytest.mark.parametrize("method", options("method"))
def test_every_method_builds_its_terminator(method):
    cfg = compose_train(f"method={method}")
    rule = instantiate(cfg.method.terminator)
    assert isinstance(rule, Terminator)
    assert cfg.method.name == method


def test_objects_are_built_from_targets():
    cfg = compose_train("scale=paper")
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
    assert fixed.budget == 2048 and kat.rule.threshold.quantile == 0.9
    # every KAT method takes the one rule termination.kat builds, whole
    expected = instantiate(cfg.termination.kat)
    assert kat.rule == expected
    for method in ("kat", "kat_stagewise"):
        built = instantiate(
            compose_train(f"method={method}", "termination.kat.quantile=0.9").method.terminator
        )
        assert built.rule == expected


def test_unknown_option_fails_with_hydra_message():
    with pytest.raises(ConfigCompositionException, match="method"):
        compose_train("method=does_not_exist")
    with pytest.raises(ConfigCompositionException):
        compose_train("rollout.no_such_knob=3")
