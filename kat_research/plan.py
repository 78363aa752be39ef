"""`python -m kat_research.plan [overrides]`: parameter counts, GPU memory per rank and FLOPs of
a training config, and what in it would only fail on the cluster, without loading weights
(knobs: conf/plan.yaml; formulas and checks: kat_research/planning/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kat_research.config import CONFIG_DIR
from kat_research.planning.checks import cluster_problems
from kat_research.planning.estimate import make_plan
from kat_research.planning.memory import GIB


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a readable text table."""
    models = plan["student"], plan["teacher"]
    lines = [f"{'':<26}{'student':>22}{'teacher':>22}"]
    lines.append(f"{'model':<26}" + "".join(f"{m['name'][-21:]:>22}" for m in models))
    lines.append(f"{'dtype':<26}" + "".join(f"{m['dtype']:>22}" for m in models))
    for kind in ("total", "embedding", "non_embedding"):
        row = "".join(f"{_count(m['params'][kind]):>22}" for m in models)
        lines.append(f"{kind.replace('_', '-') + ' params':<26}{row}")
    layout, lengths = plan["layout"], plan["lengths"]
    lines += [
        "",
        f"ranks {layout['ranks']}, rollouts per rank {layout['rollouts_per_rank']}, per step "
        f"{layout['rollouts_per_step']}, at most {layout['max_tokens_per_rollout']} tokens each",
        f"expected tokens per rollout: {lengths['generated']:.0f} generated, "
        f"{lengths['kept']:.0f} kept, {lengths['prompt']:.0f} prompt ({lengths['source']})",
        "",
        f"{'memory per rank':<26}{'GiB':>10}",
    ]
    lines += [f"  {k:<24}{v / GIB:>10.2f}" for k, v in plan["memory_per_rank_bytes"].items()]
    lines.append(f"  {'total':<24}{plan['need_gib']:>10.2f}")
    lines += ["", f"{'FLOPs':<26}{'per step':>12}{'per run':>12}"]
    steps = layout["steps"]
    for phase, value in plan["flops_per_step"].items():
        run = "n/a" if steps is None else f"{value * steps:.3e}"
        lines.append(f"  {phase:<24}{value:>12.3e}{run:>12}")
    if steps is None:
        lines.append("  (steps per run unknown: set trainer.max_steps or plan.train_prompts)")
    else:
        lines.append(f"  over {steps} steps = {plan['flops_per_run'] / 1e18:.4g} EFLOPs")
    verdict = "yes" if plan["fits"] else "no"
    lines += [
        "",
        f"fits: {verdict} (need {plan['need_gib']:.1f} GiB of {plan['device_gib']:.0f} GiB "
        "per device)",
    ]
    decode = plan.get("decode_seconds_per_batch")
    if decode:
        lines += ["", f"{'decode s per batch':<26}{'sync':>10}{'partial':>10}{'sync/partial':>14}"]
        for method, p in decode.items():
            lines.append(
                f"  {method:<24}{p['sync_s']:>10.2f}{p['partial_s']:>10.2f}"
                f"{p['sync_over_partial']:>14.2f}"
            )
    lines += [f"problem: {problem}" for problem in plan["problems"]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the plan (and write it as JSON to ``plan.out``)."""
    plan = make_plan(cfg)
    plan["problems"] = cluster_problems(cfg, plan)
    print(format_plan(plan))
    if cfg.plan.out:
        Path(cfg.plan.out).write_text(json.dumps(plan, indent=2))


if __name__ == "__main__":
    main()
