"""Print the running-total task's numbers quoted in docs/running_sum_task.md: the size of its
problem space, the distinct totals and answer spread of the full splits (the data preset's
training split with every seed of conf/testbed_models_running_sum.yaml, and the evaluator's
held-out problems), solution lengths, and the smallest avg@8 difference detectable at 3 seeds.

    python scripts/running_sum_stats.py
"""

from __future__ import annotations

import math
from collections import Counter

from omegaconf import OmegaConf

from kat_research.building.stages import stage_settings
from kat_research.config import compose
from kat_research.data import running_sum as rs
from kat_research.data.sources import Row, SourceSpec, load_rows


def minimum_detectable_difference(n_problems: int, k: int = 8, seeds: int = 3) -> float:
    """Smallest avg@k difference between two methods on the same ``n_problems`` that a
    two-sided 5% test detects with 80% power, from sampling alone at accuracy 0.5 (the worst
    case; seed-to-seed training variance comes on top)."""
    return 2.8 * math.sqrt(2 * 0.25 / (n_problems * k * seeds))


def describe(name: str, rows: list[Row]) -> str:
    answer, count = Counter(r.answer for r in rows).most_common(1)[0]
    chars = [len(r.solution) for r in rows]
    return (
        f"{name}: {len(rows)} problems; most common answer {answer} x{count} "
        f"({100 * count / len(rows):.2f}%); solution characters {min(chars)}-{max(chars)}, "
        f"mean {sum(chars) / len(chars):.0f}; longest prompt {max(len(r.problem) for r in rows)}"
    )


def main() -> None:
    cfg = compose(["data=running_sum", "eval=running_sum"])
    chain = compose([], config_name="testbed_models_running_sum")
    task = rs.RunningSumConfig(**OmegaConf.to_container(cfg.data.source.task))
    n_items = task.item_max - task.item_min + 1
    space = (task.start_max - task.start_min + 1) * sum(
        math.perm(n_items, k) for k in range(task.min_items, task.max_items + 1)
    )
    print(f"possible problems: {space:.3g}")
    seeds = sorted({s["sft"]["seed"] for s in stage_settings(chain).values()})
    train = {
        seed: load_rows(SourceSpec(kind="running_sum", n=cfg.data.source.n, seed=seed, task=task))[
            0
        ]
        for seed in seeds
    }
    heldout = load_rows(
        SourceSpec(kind="running_sum", split="eval", n=cfg.eval.evaluator.n_problems, task=task)
    )[0]
    problems = [rs.parse_problem(r.problem) for rows in train.values() for r in rows]
    print(f"training problems over the chain's seeds {seeds}: {len(set(problems))} distinct")
    totals = {v for p in problems for v in p.totals()}
    first = {v for r in train[seeds[0]] for v in rs.parse_problem(r.problem).totals()}
    print(f"distinct totals: {len(first)} in the seed-{seeds[0]} split, {len(totals)} in all")
    print(describe(f"train (seed {seeds[0]})", train[seeds[0]]))
    print(describe("held-out", heldout))
    for n in (39, len(heldout), 1024, 2048):
        print(
            f"avg@8 difference detectable at 3 seeds, {n} problems: "
            f"{100 * minimum_detectable_difference(n):.1f} points"
        )


if __name__ == "__main__":
    main()
