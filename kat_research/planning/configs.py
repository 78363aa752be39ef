"""The transformers config of the model a ``model.student`` / ``model.teacher`` node builds,
without weights, training or network.

- ``name_or_path`` naming a local folder: its ``config.json``;
- a hub id listed in the architectures file (``ARCHITECTURES``, this package's
  ``qwen3_architectures.json``: the Qwen3 facts from the models' public config.json files,
  keyed ``Qwen3-8B``; ``-Base`` checkpoints share their post-trained sibling's architecture;
  ``conf/plan.yaml: plan.architectures`` names another file): a ``Qwen3Config`` of those facts;
- another hub id: ``AutoConfig.from_pretrained`` (the local Hugging Face cache when offline);
- the in-code factories (tiny random, demo, SmolLM2): their config functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, PretrainedConfig, Qwen3Config

from kat_research.models import build_char_tokenizer
from kat_research.models.smollm2 import smollm2_config
from kat_research.models.tiny import demo_model_config, tiny_qwen3_config

ARCHITECTURES = Path(__file__).with_name("qwen3_architectures.json")
# Facts every Qwen3 dense model shares (the "_about" entry of qwen3_architectures.json).
QWEN3_SHARED = dict(
    head_dim=128,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    vocab_size=151_936,
    attention_bias=False,
)


def architecture_key(name_or_path: str) -> str:
    """``Qwen/Qwen3-4B-Base`` -> ``Qwen3-4B``: the key of a hub id in the architectures file."""
    return name_or_path.rsplit("/", 1)[-1].removesuffix("-Base")


def listed_config(name_or_path: str, architectures: Path | None) -> Qwen3Config | None:
    """The Qwen3 config of ``name_or_path`` from the architectures file, if listed there."""
    if architectures is None:
        return None
    if not Path(architectures).exists():
        raise FileNotFoundError(
            f"architectures file {architectures} does not exist: fix plan.architectures (null = "
            f"the package's {ARCHITECTURES.name})"
        )
    facts = json.loads(Path(architectures).read_text()).get(architecture_key(name_or_path))
    return None if facts is None else Qwen3Config(**QWEN3_SHARED, **facts)


def pretrained_config(
    name_or_path: str, architectures: Path | None = ARCHITECTURES
) -> PretrainedConfig:
    """Config of a local folder, a listed hub id, or (last) the hub / its local cache."""
    if (Path(name_or_path) / "config.json").exists():
        return AutoConfig.from_pretrained(name_or_path)
    listed = listed_config(name_or_path, architectures)
    return listed if listed is not None else AutoConfig.from_pretrained(name_or_path)


def _tiny_random(node: DictConfig) -> PretrainedConfig:
    arch = {k: node[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads")}
    return tiny_qwen3_config(build_char_tokenizer(), **arch)


def _demo(node: DictConfig) -> PretrainedConfig:
    return demo_model_config(OmegaConf.to_container(node.architecture, resolve=True))


def _shipped(node: DictConfig) -> PretrainedConfig:
    return AutoConfig.from_pretrained(node.path)


def _smollm2(node: DictConfig) -> PretrainedConfig:
    return smollm2_config(node.cache_dir, node.get("num_layers"))


# The in-code model factories, by the qualified name of the function a ``_target_`` names (it
# may name a re-export, e.g. kat_research.building.demo_model), and their config functions.
FACTORY_CONFIGS: dict[str, Callable[[DictConfig], PretrainedConfig]] = {
    "kat_research.models.tiny.tiny_random_model": _tiny_random,
    "kat_research.building.models.demo_model": _demo,
    "kat_research.building.testbed.shipped_model": _shipped,
    "kat_research.models.smollm2.smollm2_model": _smollm2,
}


def model_config(node: DictConfig, architectures: Path | None = ARCHITECTURES) -> PretrainedConfig:
    """The config of the model ``node`` (a ``model.*`` config node) instantiates."""
    if "name_or_path" in node:
        return pretrained_config(node.name_or_path, architectures)
    factory = get_method(node._target_)
    describe = FACTORY_CONFIGS.get(f"{factory.__module__}.{factory.__qualname__}")
    if describe is None:
        raise ValueError(
            f"cannot describe the model of {node._target_} without building it: give the node a "
            "name_or_path, or add its config function to kat_research/planning/configs.py"
        )
    return describe(node)
