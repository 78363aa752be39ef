"""Assemble a compute plan from a composed training config: models, per-rank memory, FLOPs
per step and per run, and whether it fits (the numbers ``python -m kat_research.plan`` shows).

Data-parallel layout: ``data.batch_size`` prompts per batch over all the
``trainer.devices x trainer.num_nodes`` ranks, each rank sampling its share
``batch_size / ranks x rollout.group_size`` rollouts; a run has ``trainer.max_steps`` optimizer
steps or ``max_epochs x prompts // (batch_size x accumulate_grad_batches)``. Every rank holds
both models; under a sharding strategy (``trainer=fsdp``) the student's gradients, AdamW
moments and master copy are split over the ranks, while its full weights are gathered for the
whole step (rollout and backward), so they count in full.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kat_research.lit.rollout_lengths import read_generated
from kat_research.losses import DEFAULT_K, TEACHER_KEEP
from kat_research.planning.configs import ARCHITECTURES, model_config
from kat_research.planning.decode_time import DecodeCosts, predict
from kat_research.planning.flops import FlopsModel, opd_flops
from kat_research.planning.memory import (
    GIB,
    activation_bytes,
    dtype_bytes,
    kv_cache_bytes,
    loss_chunk_bytes,
    teacher_target_bytes,
    training_state_bytes,
)
from kat_research.planning.params import ModelShape, count_params
from kat_research.rollout.engine import DEFAULT_SCORE_EVERY


def describe_model(node: DictConfig, architectures: Path | None) -> dict[str, Any]:
    """Name, dtype, parameter counts and shape of the model ``node`` builds."""
    config = model_config(node, architectures)
    counts = count_params(config)
    return {
        "name": node.get("name_or_path") or node._target_.rsplit(".", 1)[-1],
        "dtype": node.get("dtype", "float32"),
        "params": {
            "total": counts.total,
            "embedding": counts.embedding,
            "non_embedding": counts.non_embedding,
        },
        "shape": asdict(ModelShape.from_config(config)),
    }


def world_size(trainer: DictConfig) -> int:
    """Ranks of a Lightning trainer config (``devices`` an int or a list; others count 1)."""
    devices = trainer.get("devices", 1)
    count = len(devices) if not isinstance(devices, int | str) else devices
    return (count if isinstance(count, int) and count > 0 else 1) * trainer.get("num_nodes", 1)


def rows_per_rank(cfg: DictConfig) -> int:
    """Rollouts one rank samples per batch: its share of the global prompt batch x group size."""
    ranks = world_size(cfg.trainer)
    return -(-cfg.data.batch_size // ranks) * cfg.rollout.group_size


def shards_student_state(trainer: DictConfig) -> bool:
    """Whether the trainer's strategy shards the student's training state (FSDP)."""
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return any(name in str(target).lower() for name in ("fsdp", "modelparallel"))


def expected_lengths(cfg: DictConfig) -> dict[str, Any]:
    """Generated and kept tokens per rollout (knobs, else a run's summary.json, else the cap)
    and the mean prompt length counted in FLOPs."""
    plan, cap = cfg.plan, cfg.rollout.max_new_tokens
    generated, kept, source = cap, None, "rollout.max_new_tokens"
    if plan.from_run:
        summary = json.loads((Path(plan.from_run) / "summary.json").read_text())
        generated, kept = summary["mean_generated_length"], summary["mean_kept_length"]
        source = f"{plan.from_run}/summary.json"
    if plan.rollout_length is not None:
        generated, source = plan.rollout_length, "plan.rollout_length"
    if plan.kept_length is not None:
        kept = plan.kept_length
    return {
        "generated": float(generated),
        "kept": float(generated if kept is None else kept),
        "prompt": float(plan.prompt_length),
        "source": source,
    }


def run_steps(cfg: DictConfig) -> int | None:
    """Optimizer steps of the run (None if it depends on an unknown number of prompts)."""
    trainer = cfg.trainer
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    source = cfg.data.source
    prompts = cfg.plan.train_prompts or source.get("n") or source.get("limit")
    if not prompts or trainer.max_epochs is None or trainer.max_epochs < 0:
        return None
    per_step = cfg.data.batch_size * trainer.get("accumulate_grad_batches", 1)
    per_epoch = prompts // per_step
    return int(trainer.max_epochs * per_epoch)


def fp32_master(cfg: DictConfig, weight_bytes: int) -> bool:
    """``plan.fp32_master``, where ``auto`` means: mixed precision with 16-bit weights."""
    setting = cfg.plan.fp32_master
    if setting == "auto":
        return "mixed" in str(cfg.trainer.precision) and weight_bytes < 4
    return bool(setting)


def compute_bytes(cfg: DictConfig, weight_bytes: int) -> int:
    """Bytes per activation / KV-cache element: 2 under 16-bit mixed precision (autocast), else
    the weights' own size."""
    return 2 if "16-mixed" in str(cfg.trainer.precision) else weight_bytes


def rank_memory(
    cfg: DictConfig, student: dict[str, Any], teacher: dict[str, Any]
) -> dict[str, int]:
    """Bytes one rank needs, by component, at the longest rollouts."""
    s_shape, t_shape = ModelShape(**student["shape"]), ModelShape(**teacher["shape"])
    s_bytes, t_bytes = dtype_bytes(student["dtype"]), dtype_bytes(teacher["dtype"])
    rows = rows_per_rank(cfg)
    tokens = rows * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    keep = cfg.rollout.teacher_keep
    keep = TEACHER_KEEP[cfg.loss.kind] if keep == "auto" else keep
    # a served teacher (teacher.backend=vllm) holds no weights or KV cache on the training
    # ranks; the rollout keeps its top-k log-probs instead of hidden states
    served = OmegaConf.select(cfg, "teacher.backend", default="hf") == "vllm"
    keep = "topk" if served and keep == "hidden" else keep
    topk = cfg.loss.k or DEFAULT_K["topk_lsm"]
    state = training_state_bytes(student["params"]["total"], s_bytes, fp32_master(cfg, s_bytes))
    if shards_student_state(cfg.trainer):
        ranks = world_size(cfg.trainer)
        state = {k: v if k == "weights" else -(-v // ranks) for k, v in state.items()}
    s_act = compute_bytes(cfg, s_bytes)
    return {
        "teacher_weights": 0 if served else teacher["params"]["total"] * t_bytes,
        **{f"student_{k}": v for k, v in state.items()},
        "kv_cache_student": kv_cache_bytes(s_shape, tokens, s_act),
        "kv_cache_teacher": 0 if served else kv_cache_bytes(t_shape, tokens, t_bytes),
        "teacher_targets": teacher_target_bytes(
            keep,
            rows * cfg.rollout.max_new_tokens,
            t_shape.hidden,
            t_bytes,
            topk,
        ),
        "activations": activation_bytes(
            s_shape, tokens, s_act, bool(cfg.model.student.get("gradient_checkpointing", False))
        ),
        "loss_chunk": loss_chunk_bytes(cfg.loss.chunk_size, s_shape.vocab, cfg.plan.loss_blocks),
        "reserved": int(cfg.plan.reserved_gib * GIB),
    }


def flops_model(model: dict[str, Any], attention: bool) -> FlopsModel:
    shape = model["shape"]
    if not attention:
        return FlopsModel(model["params"]["total"])
    return FlopsModel(model["params"]["total"], shape["layers"], shape["heads"] * shape["head_dim"])


def decode_lengths(plan: DictConfig) -> dict[str, list[int]] | None:
    """Generated lengths per method for the decode-time model: the JSON file
    ``plan.decode.lengths`` and the runs of ``plan.decode.from_runs`` ({method: job folder},
    their ``rollouts/lengths.csv``, the last ``plan.decode.last_steps`` logged steps); None
    when neither is set."""
    node = plan.get("decode") or {}
    file, runs, last = node.get("lengths"), node.get("from_runs") or {}, node.get("last_steps")
    if last is not None and (not isinstance(last, int) or last < 1):
        raise ValueError(f"plan.decode.last_steps={last}: give a number of steps >= 1, or null")
    if not file and not runs:
        return None
    lengths = {}
    if file:
        path = Path(file)
        if not path.exists():
            raise FileNotFoundError(
                f"plan.decode.lengths={path} does not exist: give a JSON file mapping each "
                "method to its rollouts' generated lengths, or null"
            )
        lengths = json.loads(path.read_text())
    for method, folder in runs.items():
        if method in lengths:
            raise ValueError(
                f"plan.decode.from_runs.{method}: {method} is also in plan.decode.lengths "
                f"({file}); give each method once"
            )
        try:
            lengths[method] = read_generated(folder, last)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(
                f"plan.decode.from_runs.{method}={folder}: {error}; give a training run's folder"
            ) from None
    return lengths


def decode_prediction(
    cfg: DictConfig,
    lengths: dict[str, list[int]] | None,
    student: dict[str, Any],
    teacher: dict[str, Any],
    rows: int,
    prompt: float,
) -> dict[str, dict[str, float]] | None:
    """Sync against partial decode seconds per batch of ``rows`` rows for each method of
    ``lengths`` (:func:`decode_lengths`; None without any); see ``decode_time.py``."""
    if lengths is None:
        return None
    node = cfg.plan.decode
    costs = DecodeCosts.of(
        ModelShape(**student["shape"]),
        student["params"]["total"],
        ModelShape(**teacher["shape"]),
        teacher["params"]["total"],
        student_bytes=dtype_bytes(student["dtype"]),
        teacher_bytes=dtype_bytes(teacher["dtype"]),
        score_every=cfg.rollout.score_every or DEFAULT_SCORE_EVERY,
        bandwidth=node.bandwidth_gbs * 1e9,
    )
    return predict(lengths, rows, round(prompt), costs)


def make_plan(cfg: DictConfig) -> dict[str, Any]:
    """The whole plan of the training config ``cfg`` (with its ``plan`` knobs)."""
    decode = decode_lengths(cfg.plan)  # read first: a bad file or folder fails at once
    architectures = Path(cfg.plan.architectures) if cfg.plan.architectures else ARCHITECTURES
    student = describe_model(cfg.model.student, architectures)
    teacher = describe_model(cfg.model.teacher, architectures)
    ranks = world_size(cfg.trainer)
    rows = rows_per_rank(cfg)
    rollouts = rows * ranks * cfg.trainer.get("accumulate_grad_batches", 1)
    lengths = expected_lengths(cfg)
    attention = cfg.plan.attention_flops
    step = opd_flops(
        flops_model(student, attention),
        flops_model(teacher, attention),
        rollouts=rollouts,
        generated=lengths["generated"],
        kept=lengths["kept"],
        prompt=lengths["prompt"],
    )
    steps = run_steps(cfg)
    memory = rank_memory(cfg, student, teacher)
    need, have = sum(memory.values()), cfg.plan.device_memory_gib * GIB
    return {
        "student": student,
        "teacher": teacher,
        "layout": {
            "ranks": ranks,
            "rollouts_per_rank": rows,
            "rollouts_per_step": rollouts,
            "max_tokens_per_rollout": cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
            "steps": steps,
        },
        "lengths": lengths,
        "memory_per_rank_bytes": memory,
        "flops_per_step": {**asdict(step), "total": step.total},
        "flops_per_run": None if steps is None else step.total * steps,
        "fits": need <= have,
        "need_gib": need / GIB,
        "device_gib": float(cfg.plan.device_memory_gib),
        "decode_seconds_per_batch": decode_prediction(
            cfg, decode, student, teacher, rows, lengths["prompt"]
        ),
    }
