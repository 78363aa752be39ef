"""What would only fail on the cluster, found from a training config and its plan: no weights,
no network, no accelerator.

- the global batch (``data.batch_size``) must divide by the data-parallel ranks (the sampler
  refuses it when training starts);
- a fixed-prefix budget above ``rollout.max_new_tokens`` never cuts (the method silently
  becomes OPD);
- a hub data source needs a hub id, and every evaluation benchmark must be a known one;
- on accelerators, the planned memory per rank (at the length cap: a batch is padded to its
  longest rollout) must fit ``plan.device_memory_gib``.

Models are checked by the plan itself: a hub id that is neither a local folder nor listed in the
architectures file needs the hub, and fails offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kat_research.eval.benchmarks import BENCHMARKS
from kat_research.planning.estimate import shards_student_state, world_size

FIXED_PREFIX = "kat_research.termination.FixedPrefix"


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside ``value`` (a resolved config container), ``value`` included."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _nodes(child)


def config_problems(cfg: DictConfig) -> list[str]:
    """The problems of ``cfg`` that need no plan, each naming the keys to change."""
    problems = []
    ranks, batch = world_size(cfg.trainer), cfg.data.batch_size
    if batch % ranks:
        problems.append(
            f"data.batch_size={batch} (the global batch) is not divisible by the {ranks} ranks "
            "(trainer.devices x trainer.num_nodes): the sampler refuses it when training starts"
        )
    cap = cfg.rollout.max_new_tokens
    terminator = OmegaConf.to_container(cfg.method.terminator, resolve=True)
    for node in _nodes(terminator):
        if node.get("_target_") == FIXED_PREFIX and node["budget"] > cap:
            problems.append(
                f"fixed-prefix budget {node['budget']} (termination.fixed_prefix.budget) exceeds "
                f"rollout.max_new_tokens={cap}: it never cuts a rollout"
            )
    source = cfg.data.source
    if source.kind == "hub" and not source.get("hub_id"):
        problems.append("data.source.kind=hub needs data.source.hub_id")
    if cfg.eval.get("enabled", False):
        unknown = sorted(set(cfg.eval.evaluator.get("benchmarks") or {}) - set(BENCHMARKS))
        if unknown:
            problems.append(
                f"unknown evaluation benchmarks {unknown} (eval.evaluator.benchmarks); known: "
                f"{sorted(BENCHMARKS)}"
            )
    return problems


def memory_problem(cfg: DictConfig, plan: dict[str, Any]) -> str | None:
    """Why the plan does not fit one device (None if it does, or the job runs on the CPU)."""
    if cfg.trainer.get("accelerator") == "cpu" or plan["fits"]:
        return None
    layout = plan["layout"]
    fixes = [
        "fewer rollouts per rank (data.batch_size, keeping the prompts per optimizer step with "
        "trainer.accumulate_grad_batches)",
        *([] if shards_student_state(cfg.trainer) else ["a sharded student (trainer=fsdp)"]),
        "a lower rollout.max_new_tokens",
    ]
    return (
        f"the plan needs {plan['need_gib']:.1f} GiB per rank, more than "
        f"plan.device_memory_gib={plan['device_gib']:g} ({layout['rollouts_per_rank']} rollouts "
        f"per rank of up to {layout['max_tokens_per_rollout']} tokens; parts: python -m "
        f"kat_research.plan); try {', or '.join(fixes)}"
    )


def cluster_problems(cfg: DictConfig, plan: dict[str, Any]) -> list[str]:
    """Everything in ``cfg`` and its ``plan`` that would only fail on the cluster."""
    memory = memory_problem(cfg, plan)
    return [*config_problems(cfg), *([memory] if memory else [])]
