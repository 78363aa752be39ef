"""Sample analysis rollouts: a fixed set of the run's training prompts, no termination rule,
the teacher scoring every token (so each rollout's full KL trace is known). Sampling reports
its progress (rollouts done, tokens/s, time left) as :class:`kat_research.console.Progress`
lines."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.console import Progress
from kat_research.data.prompts import PromptCollator
from kat_research.lit import OPDModule
from kat_research.lit.opd_module import token_ids
from kat_research.rollout import Rollout, RolloutEngine, SamplingConfig
from kat_research.rollout.engine import TeacherKeep


@dataclass(frozen=True)
class RolloutSpec:
    """How many rollouts and how they are sampled; None values follow the run's ``rollout``."""

    n: int = 100
    batch_size: int = 25
    seed: int = 0
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


def prompt_batches(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, spec: RolloutSpec
) -> list[dict]:
    """``spec.n`` training prompts of the run config ``cfg`` (drawn with ``spec.seed``),
    encoded by its data settings, in batches."""
    data = instantiate(cfg.data)
    data.attach_tokenizer(tokenizer)
    data.setup("fit")
    rows = data.train_rows
    if spec.n > len(rows):
        raise ValueError(f"asked for {spec.n} rollouts but the run has {len(rows)} prompts")
    chosen = [rows[i] for i in random.Random(spec.seed).sample(range(len(rows)), spec.n)]
    collate = PromptCollator(tokenizer, data.max_prompt_tokens, data.instruction, data.system)
    return [collate(chosen[i : i + spec.batch_size]) for i in range(0, spec.n, spec.batch_size)]


def uncut_rollouts(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[dict],
    sampling: SamplingConfig,
    *,
    seed: int,
    masked_token_ids: Sequence[int] = (),
    teacher_keep: TeacherKeep = "none",
    teacher_topk: int | None = None,
    progress: Progress | None = None,
    overlap_k: int | None = None,
) -> Iterator[Rollout]:
    """The one way the analyses sample: rollouts of ``student`` over prompt ``batches``
    (:class:`PromptCollator` outputs) with no termination rule, the teacher scoring every token;
    one per batch, on the CPU unless ``teacher_keep="hidden"`` (the loss needs it on device).
    Each records the per-token KL and the student's log-prob of the sampled token, and with
    ``overlap_k`` the top-k overlap (what the termination rules read, ``termination.SIGNALS``).
    ``progress`` (unit: rollout; default a ``rollouts`` line without a total) is told the
    rollouts done and tokens generated after each batch; its clock starts at the first batch,
    so time the caller spends on each yielded rollout counts towards the pace."""
    if progress is None:
        progress = Progress("rollouts", None, unit="rollout")
    engine = RolloutEngine(
        student,
        teacher,
        sampling=sampling,
        pad_token_id=tokenizer.pad_token_id,
        teacher_keep=teacher_keep,
        teacher_topk=teacher_topk,
        masked_token_ids=masked_token_ids,
        overlap_k=overlap_k,
    )
    generator = torch.Generator(device=student.device).manual_seed(seed)
    done = tokens = 0
    progress.start()
    for batch in batches:
        rollout = engine.generate(batch["input_ids"], batch["attention_mask"], generator)
        done += len(rollout.lengths)
        tokens += int(rollout.lengths.sum())
        progress.update(done, tokens)
        yield rollout if teacher_keep == "hidden" else rollout.to("cpu")


def sample_rollouts(
    module: OPDModule,
    batches: list[dict],
    spec: RolloutSpec,
    *,
    teacher_keep: TeacherKeep = "none",
    teacher_topk: int | None = None,
    label: str = "rollouts",
) -> Iterator[Rollout]:
    """:func:`uncut_rollouts` of the module's current student, sampled as the run's ``rollout``
    settings say unless ``spec`` overrides them; progress lines start with ``label``."""
    run = module.rollout_settings
    tokenizer = module.tokenizer
    sampling = SamplingConfig(
        run.temperature if spec.temperature is None else spec.temperature,
        run.top_p if spec.top_p is None else spec.top_p,
        run.max_new_tokens if spec.max_new_tokens is None else spec.max_new_tokens,
        (tokenizer.eos_token_id,),
    )
    return uncut_rollouts(
        module.student,
        module.teacher,
        tokenizer,
        batches,
        sampling,
        seed=spec.seed,
        masked_token_ids=token_ids(tokenizer, run.masked_tokens),
        teacher_keep=teacher_keep,
        teacher_topk=teacher_topk,
        progress=Progress(label, sum(len(b["input_ids"]) for b in batches), unit="rollout"),
    )
