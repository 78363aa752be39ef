"""Generate completions with the project's rollout engine (no teacher) and grade them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.eval.benchmarks import Gold
from kat_research.rollout import RolloutEngine, SamplingConfig


@dataclass(frozen=True)
class SampleRecord:
    """One graded sample: what the per-sample JSONL holds."""

    benchmark: str
    problem_id: str
    sample_index: int
    completion: str
    answer: str | None
    correct: bool
    length: int
    stop_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    length: int
    stop_reason: str


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    sampling: SamplingConfig,
    n_samples: int = 1,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[Completion]]:
    """``n_samples`` completions per chat-formatted prompt, batched across prompts and samples.

    Jobs are sorted by prompt length so each batch pads little; results come back in order.
    """
    engine = RolloutEngine(model, sampling=sampling, pad_token_id=tokenizer.pad_token_id)
    device = engine.device
    generator = torch.Generator(device=device).manual_seed(seed)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    jobs = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(n_samples)),
        key=lambda job: lengths[job[0]],
    )
    out: list[list[Completion | None]] = [[None] * n_samples for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i, _ in batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        rollout = engine.generate(enc.input_ids, enc.attention_mask, generator)
        for row, (i, s) in enumerate(batch):
            length = int(rollout.lengths[row])
            ids = rollout.tokens[row, :length].tolist()
            out[i][s] = Completion(
                text=tokenizer.decode(ids, skip_special_tokens=True),
                length=length,
                stop_reason=rollout.stop_reason[row],
            )
    return out  # type: ignore[return-value]


def grade_completions(
    benchmark: str,
    problem_ids: Sequence[str],
    golds: Sequence[Gold],
    completions: Sequence[Sequence[Completion]],
    *,
    extract: Callable[[str], str | None],
    grade_many: Callable[[list[tuple[str | None, Gold]]], list[bool]],
) -> list[SampleRecord]:
    """Extract each completion's answer, grade all pairs in one call, build the records."""
    flat = [
        (pid, gold, s, c)
        for pid, gold, samples in zip(problem_ids, golds, completions, strict=True)
        for s, c in enumerate(samples)
    ]
    answers = [extract(c.text) for _, _, _, c in flat]
    correct = grade_many([(a, gold) for a, (_, gold, _, _) in zip(answers, flat, strict=True)])
    return [
        SampleRecord(benchmark, pid, s, c.text, a, bool(ok), c.length, c.stop_reason)
        for (pid, _, s, c), a, ok in zip(flat, answers, correct, strict=True)
    ]
