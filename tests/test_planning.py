"""The compute planner: parameter counts against hand counts, memory and FLOPs formulas, and
whole plans composed from the training configs (no weights are loaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kat_research.config import CONFIG_DIR
from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.models.tiny import COMPACT_CHAT_TEMPLATE, tiny_qwen3_config
from kat_research.planning.configs import architecture_key, model_config, pretrained_config
from kat_research.planning.estimate import make_plan
from kat_research.planning.flops import FlopsModel, opd_flops, sequence_flops
from kat_research.planning.memory import (
    activation_bytes,
    kv_cache_bytes,
    loss_chunk_bytes,
    training_state_bytes,
)
from kat_research.planning.params import ModelShape, count_params

ROOT = Path(__file__).resolve().parent.parent


def qwen3_layer(hidden: int, heads: int, kv_heads: int, intermediate: int, head_dim=128) -> int:
    """Hand count of one Qwen3 block: q, k, v, o, q/k norms, gate/up/down, two RMSNorms."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim
    return attn + 3 * hidden * intermediate + 2 * hidden


def test_qwen3_8b_counts_by_hand():
    counts = count_params(pretrained_config("Qwen/Qwen3-8B"))  # the package's facts, offline
    embedding = 2 * 151_936 * 4096  # untied LM head
    non_embedding = 36 * qwen3_layer(4096, 32, 8, 12288) + 4096  # + final norm
    assert counts.embedding == embedding
    assert counts.non_embedding == non_embedding
    assert counts.total == 8_190_735_360  # ~8.19B


def test_base_checkpoints_use_their_siblings_architecture():
    assert architecture_key("Qwen/Qwen3-4B-Base") == "Qwen3-4B"
    counts = count_params(pretrained_config("Qwen/Qwen3-1.7B-Base"))
    assert counts.embedding == 151_936 * 2048  # tied: counted once
    assert counts.total == counts.embedding + 28 * qwen3_layer(2048, 16, 8, 6144) + 2048


def test_tiny_config_counted_by_hand_and_like_the_built_model(char_tokenizer):
    arch = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    counts = count_params(tiny_qwen3_config(char_tokenizer, **arch))
    vocab = len(char_tokenizer)
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 2 * 8 + 3 * 32 * 96 + 2 * 32  # head_dim 8, mlp 96
    assert counts.embedding == vocab * 32
    assert counts.total == vocab * 32 + 2 * layer + 32
    built = build_tiny_qwen3(char_tokenizer, **arch)
    assert counts.total == sum(p.numel() for p in built.parameters())


def test_memory_formulas():
    shape = ModelShape(
        layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=10
    )
    assert kv_cache_bytes(shape, tokens=1, element_bytes=2) == 36 * 2 * 8 * 128 * 2
    state = training_state_bytes(1000, weight_bytes=2, fp32_master=True)
    assert sum(state.values()) == 16 * 1000  # bf16 weights + grads, fp32 master + moments
    assert sum(training_state_bytes(1000, 2, fp32_master=False).values()) == 8 * 1000
    per_layer = 4 * 4096 + 3 * 4096 + 3 * 1024 + 4 * 12288
    assert activation_bytes(shape, tokens=3, element_bytes=2) == 36 * per_layer * 2 * 3
    # gradient checkpointing: every layer's input plus one layer's full set
    checkpointed = activation_bytes(shape, tokens=3, element_bytes=2, checkpointed=True)
    assert checkpointed == (36 * 4096 + per_layer) * 2 * 3
    assert loss_chunk_bytes(128, 151_936, blocks=6) == 6 * 128 * 151_936 * 4


def test_flops_formula():
    assert sequence_flops(FlopsModel(10, layers=2, attn_dim=4), 3) == 2 * 10 * 3 + 2 * 2 * 4 * 9
    flops = opd_flops(FlopsModel(1e9), FlopsModel(8e9), rollouts=2, generated=100, kept=40)
    assert flops.rollout == 2 * 2e9 * 100
    assert flops.scoring == 2 * 16e9 * 100
    assert flops.training == 2 * 6e9 * 40
    with_prompt = opd_flops(
        FlopsModel(1e9), FlopsModel(8e9), rollouts=1, generated=100, kept=40, prompt=10
    )
    assert with_prompt.training == 6e9 * 50


def plan_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("plan", overrides=list(overrides))


def test_paper_plan():
    cfg = plan_config(
        "experiment=table1",
        "scale=paper",
        "model/student=1.6b",
        "trainer.devices=8",
        "data.batch_size=8",  # global: one prompt per rank
        "rollout.group_size=8",
        "plan.rollout_length=1947",
        "plan.train_prompts=17000",
    )
    plan = make_plan(cfg)
    assert plan["student"]["params"]["total"] == 4_022_468_096
    assert plan["layout"] == {
        "ranks": 8,
        "rollouts_per_rank": 8,
        "rollouts_per_step": 64,
        "max_tokens_per_rollout": 1024 + 8192,
        "steps": 3 * (17000 // 8),  # trainer=gpu: 3 epochs of 8-prompt batches
    }
    memory = plan["memory_per_rank_bytes"]
    # the paper presets keep fp32 weights (the master copy itself) under bf16-mixed autocast
    assert memory["student_weights"] == 4 * 4_022_468_096
    assert memory["student_fp32_master"] == 0
    assert memory["kv_cache_student"] == 36 * 2 * 8 * 128 * 2 * 8 * (1024 + 8192)  # bf16 compute
    assert memory["kv_cache_teacher"] == 36 * 2 * 8 * 128 * 2 * 8 * (1024 + 8192)
    step = plan["flops_per_step"]
    assert step["total"] == pytest.approx(step["rollout"] + step["scoring"] + step["training"])
    assert plan["flops_per_run"] == pytest.approx(step["total"] * plan["layout"]["steps"])
    assert plan["fits"] is (plan["need_gib"] <= 80)


def test_lengths_from_a_run(tmp_path):
    summary = {"mean_generated_length": 30.5, "mean_kept_length": 20.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    plan = make_plan(plan_config(f"plan.from_run={tmp_path}", "plan.attention_flops=false"))
    assert plan["lengths"]["generated"] == 30.5 and plan["lengths"]["kept"] == 20.0
    n_s, n_t = plan["student"]["params"]["total"], plan["teacher"]["params"]["total"]
    rollouts = plan["layout"]["rollouts_per_step"]
    expected = rollouts * ((2 * n_s + 2 * n_t) * 30.5 + 6 * n_s * 20.0)
    assert plan["flops_per_step"]["total"] == pytest.approx(expected)


def test_plan_entry_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "kat_research.plan", "trainer.max_steps=3", f"plan.out={out}"]
    done = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "non-embedding params" in done.stdout and "fits: yes" in done.stdout
    plan = json.loads(out.read_text())
    assert plan["layout"]["steps"] == 3 and plan["fits"] is True
    assert not list(tmp_path.glob("*.log"))  # no job folder or log file
    assert plan["flops_per_run"] == pytest.approx(3 * plan["flops_per_step"]["total"])


def test_fsdp_shards_the_student_state_but_not_its_weights():
    common = ("experiment=table1", "scale=paper", "model/student=1.6b", "data.batch_size=64")
    ddp = make_plan(plan_config(*common, "trainer=ddp"))["memory_per_rank_bytes"]
    fsdp = make_plan(plan_config(*common, "trainer=fsdp"))["memory_per_rank_bytes"]
    assert fsdp["student_weights"] == ddp["student_weights"]  # gathered for the whole step
    for part in ("student_grads", "student_adamw"):
        assert fsdp[part] == -(-ddp[part] // 8)
    assert fsdp["kv_cache_student"] == ddp["kv_cache_student"]  # 8 prompts per rank in both


def test_demo_models_are_described_as_the_demo_builds_them():
    """The planner describes the demo's models from models/ (without importing the demo)."""
    cfg = plan_config("model/student=demo", "model/teacher=demo")
    for role in ("student", "teacher"):
        arch = OmegaConf.to_container(cfg.model[role].architecture)
        tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)  # as train_sft_model
        built = build_tiny_qwen3(tokenizer, **arch)
        config = model_config(cfg.model[role])
        assert count_params(config).total == sum(p.numel() for p in built.parameters())


def test_a_missing_architectures_file_names_the_knob(tmp_path):
    cfg = plan_config("scale=paper", f"plan.architectures={tmp_path / 'none.json'}")
    with pytest.raises(FileNotFoundError, match="plan.architectures"):
        make_plan(cfg)
