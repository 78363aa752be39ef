"""Generate completions (the rollout engine without a teacher, or vLLM) and grade them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.console import Progress
from kat_research.eval.benchmarks import Gold
from kat_research.rollout import STOP_EOS, STOP_MAX_TOKENS, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from kat_research.rollout.backends.vllm import VLLMBackend

_SEED_RANGE = 2**31 - 1  # vLLM request seeds; the k samples of a request use seed .. seed+k-1


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
    vllm: VLLMBackend | None = None,
) -> list[list[Completion]]:
    """``n_samples`` completions per chat-formatted prompt, in order.

    Without ``vllm`` the rollout engine decodes with ``model``, batching prompts x samples
    ``batch_size`` sequences at a time (sorted by prompt length so each batch pads little).
    With ``vllm`` (the student's vLLM backend) each prompt's samples come from one request
    whose seed is drawn from ``seed``; vLLM schedules the requests itself. Both decode the
    generated ids with ``tokenizer`` into the same ``Completion`` records.
    """
    if vllm is None:
        samples = _engine_samples(model, tokenizer, prompts, sampling, n_samples, batch_size, seed)
    else:
        encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        generator = torch.Generator().manual_seed(seed)
        seeds = torch.randint(_SEED_RANGE - n_samples, (len(prompts),), generator=generator)
        samples = [
            [(ids, STOP_EOS if at_stop else STOP_MAX_TOKENS) for ids, at_stop in row]
            for row in vllm.sample_n(encoded, sampling, n_samples, seeds.tolist())
        ]
    return [
        [
            Completion(tokenizer.decode(ids, skip_special_tokens=True), len(ids), reason)
            for ids, reason in row
        ]
        for row in samples
    ]


def _engine_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    n_samples: int,
    batch_size: int,
    seed: int,
) -> list[list[tuple[list[int], str]]]:
    """(generated ids, stop reason) per prompt and sample, from the rollout engine."""
    engine = RolloutEngine(model, sampling=sampling, pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    jobs = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(n_samples)),
        key=lambda job: lengths[job[0]],
    )
    out: list[list[tuple[list[int], str]]] = [[([], "")] * n_samples for _ in prompts]
    progress = Progress("evaluation", len(jobs), unit="sample")
    progress.start()
    tokens = 0
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
            ids = rollout.tokens[row, : int(rollout.lengths[row])].tolist()
            out[i][s] = (ids, rollout.stop_reason[row])
        tokens += int(rollout.lengths.sum())
        progress.update(start + len(batch), tokens)
    return out


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
