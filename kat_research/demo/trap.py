"""The agreement trap on a line-verified testbed task (collatz or running_sum), measured on the
student's own rollouts before OPD: do derailed rollouts settle into agreement with the teacher,
and would KAT cut them rather than the correct ones? (``analysis.trap.check`` defines the
categories and the offline rule.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel

from kat_research.analysis.trap import check as tc
from kat_research.analysis.trap.tasks import TaskConfig
from kat_research.analysis.trap.verdicts import score_cuts
from kat_research.data.prompts import PromptCollator
from kat_research.data.sources import Row
from kat_research.termination import KATRule


@dataclass(frozen=True)
class TrapStats:
    """What the demo prints about the trap (rates are shares of rollouts)."""

    n_rollouts: int
    categories: dict[str, int]  # correct / wrong / degenerate / capped
    horizon: int  # tokens after derailment compared
    n_compared: int  # derailed rollouts with correct ones covering the same positions
    kl_after_derailment: float  # median over derailed rollouts of their mean KL after it
    kl_correct_same_positions: float  # median of the correct rollouts' mean KL there
    sign_test_p: float
    quantile: float  # KAT's threshold quantile of the rollouts' window minima
    threshold: float
    recall: float  # share of the derailed rollouts KAT would cut
    cut_correct: float  # share of the correct rollouts KAT would cut
    fisher_p: float  # Fisher's exact test of cut x derailed
    precision: float  # share of the cut rollouts that are derailed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trap_stats(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    collate: PromptCollator,
    rows: list[Row],
    task: TaskConfig,
    *,
    max_new_tokens: int,
    top_p: float,
    rule: KATRule,
    horizon: int = 32,
    seed: int = 0,
) -> TrapStats:
    """Sample one uncut rollout per row (temperature 1), classify it, compare the KL after
    derailment with correct rollouts at the same positions, and apply KAT's ``rule`` offline
    (its threshold the rule's quantile of these rollouts' window minima)."""
    scored = tc.sample_scored_rollouts(
        student,
        teacher,
        collate,
        rows,
        task,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        seed=seed,
    )
    kls, verdicts = [r.kl for r in scored], [r.verdict for r in scored]
    after = tc.kl_after_derailment(kls, verdicts, horizon=horizon)
    cuts = tc.offline_kat_cuts(kls, rule)
    scores = score_cuts([c is not None for c in cuts.cut], [v.category for v in verdicts])
    return TrapStats(
        n_rollouts=len(scored),
        categories={c: sum(v.category == c for v in verdicts) for c in tc.CATEGORIES},
        horizon=horizon,
        n_compared=len(after.derailed),
        kl_after_derailment=tc.median(after.derailed),
        kl_correct_same_positions=tc.median(after.control),
        sign_test_p=after.sign_test_p,
        quantile=rule.threshold.quantile,
        threshold=cuts.threshold,
        recall=scores["recall"],
        cut_correct=scores["cut_rate_correct"],
        fisher_p=scores["fisher_p"],
        precision=scores["precision"],
    )
