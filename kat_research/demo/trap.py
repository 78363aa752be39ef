"""The agreement trap on the synthetic task: what the per-token KL does after a student's first
mistake. Character-level tokens make "first mistake" exact: the first character where the
rollout leaves the reference worked solution."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.prompts import format_prompt
from kat_research.data.sources import Row
from kat_research.rollout import RolloutEngine, SamplingConfig


@dataclass(frozen=True)
class TrapStats:
    """Summary over the rollouts that leave the reference solution."""

    n_rollouts: int
    n_derailed: int  # rollouts that leave the reference solution
    kl_at_error: float  # median d_t at the first wrong token
    kl_after_error: float  # median over rollouts of mean d_t on the next `horizon` tokens
    kl_before_error: float  # median over rollouts of mean d_t before the error
    teacher_agrees_after: float  # share of the next `horizon` tokens where teacher top-1 == token
    horizon: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def first_divergence(completion: str, reference: str) -> int | None:
    """Index of the first character where ``completion`` leaves ``reference`` (None if never)."""
    for i, (a, b) in enumerate(zip(completion, reference, strict=False)):
        if a != b:
            return i
    return None if len(completion) <= len(reference) else len(reference)


@torch.no_grad()
def agreement_trap_stats(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    *,
    max_new_tokens: int = 48,
    horizon: int = 8,
    seed: int = 0,
) -> TrapStats:
    """Sample one rollout per row (temperature 1) with the teacher scoring, and measure the
    KL at and after each rollout's first departure from the reference solution."""
    engine = RolloutEngine(
        student,
        teacher,
        sampling=SamplingConfig(1.0, 1.0, max_new_tokens, (tokenizer.eos_token_id,)),
        pad_token_id=tokenizer.pad_token_id,
        teacher_keep="topk",
        teacher_topk=1,
    )
    enc = tokenizer(
        [format_prompt(tokenizer, r.problem, "") for r in rows],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    rollout = engine.generate(
        enc.input_ids, enc.attention_mask, torch.Generator().manual_seed(seed)
    )
    at, after, before, agree = [], [], [], []
    for b, row in enumerate(rows):
        length = int(rollout.lengths[b])
        chars = [tokenizer.decode([t]) for t in rollout.tokens[b, :length].tolist()]
        if any(len(c) != 1 for c in chars[:-1]):  # not character-level: no exact alignment
            continue
        error = first_divergence("".join(chars), row.solution or "")
        if error is None or error + 1 >= length:
            continue
        kl = rollout.kl[b, :length]
        window = slice(error + 1, min(length, error + 1 + horizon))
        at.append(float(kl[error]))
        after.append(float(kl[window].mean()))
        if error > 0:
            before.append(float(kl[:error].mean()))
        top1 = rollout.teacher_topk_ids[b, window, 0]
        agree.append(float((top1 == rollout.tokens[b, window]).float().mean()))
    nan = float("nan")
    return TrapStats(
        n_rollouts=len(rows),
        n_derailed=len(at),
        kl_at_error=statistics.median(at) if at else nan,
        kl_after_error=statistics.median(after) if after else nan,
        kl_before_error=statistics.median(before) if before else nan,
        teacher_agrees_after=statistics.mean(agree) if agree else nan,
        horizon=horizon,
    )
