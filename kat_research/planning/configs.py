"""The transformers config of the model a ``model.student`` / ``model.teacher`` node builds,
without weights, training or network.

- ``name_or_path`` naming a local folder: its ``config.json``;
- a hub id listed in the architectures file (``conf/plan.yaml: plan.architectures``, the
  Qwen3 facts of ``shared/models/qwen3_architectures.json``, keyed ``Qwen3-8B``; ``-Base``
  checkpoints share their post-trained sibling's architecture): a ``Qwen3Config`` of those facts;
- another hub id: ``AutoConfig.from_pretrained`` (the local Hugging Face cache when offline);
- the in-code factories (tiny random, demo, SmolLM2): their config functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig
from transformers import AutoConfig, PretrainedConfig, Qwen3Config

from kat_research.demo.models import demo_config, demo_model
from kat_research.models import build_char_tokenizer, tiny_random_model
from kat_research.models.smollm2 import smollm2_config, smollm2_model
from kat_research.models.tiny import tiny_qwen3_config

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
    if architectures is None or not Path(architectures).exists():
        return None
    facts = json.loads(Path(architectures).read_text()).get(architecture_key(name_or_path))
    return None if facts is None else Qwen3Config(**QWEN3_SHARED, **facts)


def pretrained_config(name_or_path: str, architectures: Path | None = None) -> PretrainedConfig:
    """Config of a local folder, a listed hub id, or (last) the hub / its local cache."""
    if (Path(name_or_path) / "config.json").exists():
        return AutoConfig.from_pretrained(name_or_path)
    listed = listed_config(name_or_path, architectures)
    return listed if listed is not None else AutoConfig.from_pretrained(name_or_path)


def model_config(node: DictConfig, architectures: Path | None = None) -> PretrainedConfig:
    """The config of the model ``node`` (a ``model.*`` config node) instantiates."""
    if "name_or_path" in node:
        return pretrained_config(node.name_or_path, architectures)
    factory = get_method(node._target_)
    if factory is tiny_random_model:
        arch = {k: node[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads")}
        return tiny_qwen3_config(build_char_tokenizer(), **arch)
    if factory is demo_model:
        return demo_config(node.architecture)
    if factory is smollm2_model:
        return smollm2_config(node.cache_dir, node.get("num_layers"))
    raise ValueError(
        f"cannot describe the model of {node._target_} without building it: give the node a "
        "name_or_path, or add its config function to kat_research/planning/configs.py"
    )
