"""On-policy distillation as a LightningModule: rollout engine + terminator + loss.

Every method of the papers (standard OPD, random termination, fixed prefix, Top-K
truncated reverse KL, KAT, KAT on a fixed prefix) is this module with a different
terminator and loss configuration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.first_error import FirstErrorTask
from kat_research.distributed import all_gather_cat, all_reduce_sum, world_size
from kat_research.lit.cut_verdicts import rollout_counts, verdict_metrics
from kat_research.lit.divergence import divergence_error, global_grad_norm, grad_scaler_active
from kat_research.lit.length_buckets import bucketed_hidden
from kat_research.lit.schedule import optimizers_config
from kat_research.losses import (
    DEFAULT_K,
    LOSS_KINDS,
    TEACHER_KEEP,
    LossOutput,
    TeacherTargets,
    opd_loss,
    token_weights,
)
from kat_research.models import freeze
from kat_research.rollout import (
    BACKENDS,
    STOP_REASONS,
    STOP_STALE,
    Rollout,
    RolloutEngine,
    SamplingConfig,
    build_backend,
)
from kat_research.rollout.partial import PartialRollouts
from kat_research.rollout.sampling import NonFiniteLogitsError
from kat_research.rollout.teachers import TeacherScorer
from kat_research.termination import NoTermination
from kat_research.termination.base import Terminator


@dataclass(frozen=True)
class LossSettings:
    """The distillation loss (see ``conf/loss``)."""

    kind: str = "full"
    k: int | None = None
    support: str = "student"
    aggregation: str = "token_mean"
    discount: float = 0.0
    chunk_size: int = 128
    length_buckets: int = 1  # the training forward's row groups by kept length (length_buckets.py)

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {self.kind!r}; valid: {', '.join(LOSS_KINDS)}")


ROLLOUT_MODES = ("sync", "partial")


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled during training (``rollout`` in ``conf/train.yaml``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    group_size: int = 1
    score_every: int | None = None
    teacher_keep: str = "auto"
    masked_tokens: tuple[str, ...] = field(default_factory=tuple)
    backend: str = "hf"
    lean_decode: bool = True
    vllm: dict[str, Any] = field(default_factory=dict)
    mode: str = "sync"
    max_staleness: int = 2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown rollout.backend {self.backend!r}; valid: {', '.join(BACKENDS)}"
            )
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"unknown rollout.mode {self.mode!r}; valid: sync, partial")

    def sampling(self, stop_token_ids: tuple[int, ...]) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens, stop_token_ids)


class FinalHidden(torch.nn.Module):
    """The student's final hidden states: the forward whose graph the loss back-propagates.

    Under FSDP this module is the sharded unit, so that forward runs FSDP's hooks (gradient
    reduce-scatter); calling the student's submodules directly would skip them.
    """

    def __init__(self, student: PreTrainedModel):
        super().__init__()
        self.student = student

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state


class OPDModule(L.LightningModule):
    """Samples rollouts from the current student, scores them with the teacher online, and
    trains the student on the kept tokens.

    The teacher is held outside the module's registered children: it never receives
    gradients, is never in ``state_dict`` (so never in a checkpoint), and is moved to the
    student's device at the start of fitting (one full replica per rank).

    Data parallelism (DDP, or FSDP through Lightning's ``ModelParallelStrategy``): each rank
    rolls out its share of the global batch with its own sampling RNG; the KAT buffer, the
    loss normalisation and the logged metrics are global (see ``setup`` and ``_log_rollout``).
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | TeacherScorer,
        tokenizer: PreTrainedTokenizerBase,
        *,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        terminator: Terminator | None = None,
        loss: dict[str, Any] | LossSettings | None = None,
        rollout: dict[str, Any] | RolloutSettings | None = None,
        seed: int = 0,
        verdict_task: FirstErrorTask | None = None,
    ):
        super().__init__()
        self.student = student.train()
        # a served teacher (top-k log-probs, e.g. ServedTeacher) holds no weights here
        held = isinstance(teacher, PreTrainedModel)
        self.__dict__["teacher"] = freeze(teacher) if held else teacher
        self.__dict__["final_hidden"] = FinalHidden(student)
        self.tokenizer = tokenizer
        self.terminator = terminator or NoTermination()
        self.loss_settings = _as(LossSettings, loss)
        self.rollout_settings = _as(RolloutSettings, rollout)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seed = seed
        self.verdict_task = verdict_task  # logs cut verdicts each step when set
        keep = self.rollout_settings.teacher_keep
        if keep == "auto":
            keep = TEACHER_KEEP[self.loss_settings.kind]
            keep = "topk" if keep == "hidden" and not held else keep  # topk_tail from top-k
        self.engine = RolloutEngine(
            student,
            teacher,
            sampling=self.rollout_settings.sampling((tokenizer.eos_token_id,)),
            pad_token_id=tokenizer.pad_token_id,
            terminator=self.terminator,
            score_every=self.rollout_settings.score_every,
            teacher_keep=keep,
            teacher_topk=self.loss_settings.k or DEFAULT_K.get(self.loss_settings.kind),
            masked_token_ids=token_ids(tokenizer, self.rollout_settings.masked_tokens),
            backend=build_backend(
                self.rollout_settings.backend,
                student,
                self.rollout_settings.vllm,
                self.rollout_settings.lean_decode,
            ),
        )
        self.save_hyperparameters(
            {
                "loss": asdict(self.loss_settings),
                "rollout": asdict(self.rollout_settings),
                "terminator": repr(self.terminator),
                "seed": seed,
            }
        )
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self.totals = {"tokens_generated": 0, "tokens_kept": 0, "rollouts": 0, "rollout_s": 0.0}
        # decode steps (each batch's longest row) and row slots, with the tokens of the same
        # batches: a run resumed from a checkpoint without them counts them from the resume on
        self.totals |= {"batches": 0, "decode_steps": 0.0, "row_slots": 0, "slot_tokens": 0}
        self._step_start = 0.0
        # the latest training rollout without its teacher targets, for callbacks (KL traces)
        self.last_rollout: Rollout | None = None
        # the latest step's global gradient norm before clipping, for callbacks (divergence)
        self.grad_norm: float | None = None
        self._warned_teacher_nonfinite = False
        # partial rollouts (rollout.mode=partial): the slot driver, built at the first step; its
        # prompts come from a loader of its own whose batches drawn are checkpointed; rows in
        # flight at a checkpoint are not saved: a resumed run drops them and counts them
        self.partial: PartialRollouts | None = None
        self.partial_batches = 0
        self._prompt_iter: Iterator[dict[str, Any]] | None = None
        self._dropped_on_resume = 0

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if world_size() > 1:
            self.terminator.set_gather(self._gather)

    def configure_model(self) -> None:
        """Under FSDP (a device mesh is set), shard the student as one unit that keeps its
        weights gathered from the first forward of a step until backward: rollouts run a
        different number of forwards on each rank, so no forward may need a collective."""
        if self.device_mesh is None or isinstance(self.final_hidden, FSDPModule):
            return
        fully_shard(
            self.final_hidden, mesh=self.device_mesh["data_parallel"], reshard_after_forward=False
        )

    @contextmanager
    def full_student(self) -> Iterator[None]:
        """Gather the student's weights on every rank (FSDP) for code that runs it outside a
        training step, e.g. evaluation on rank 0; a no-op without sharding. Call on all ranks."""
        sharded = isinstance(self.final_hidden, FSDPModule)
        if sharded:
            self.final_hidden.unshard()
        try:
            yield
        finally:
            if sharded:
                self.final_hidden.reshard()

    def on_fit_start(self) -> None:
        if isinstance(self.teacher, PreTrainedModel):
            self.teacher.to(self.device)

    def rollout_generator(self) -> torch.Generator:
        """The sampling RNG, seeded per rank (seed + 1000 * rank, so that runs with
        neighbouring seeds share no stream); its state is checkpointed per rank."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.seed + 1000 * self.global_rank)
            if self._pending_generator_state is not None:
                self._generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
        return self._generator

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor over ranks (through the module's device, as NCCL needs)."""
        return all_gather_cat(x.to(self.device)).to(x.device)

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizers_config(
            self.student.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if isinstance(self.final_hidden, FSDPModule):
            self.final_hidden.unshard()  # the step's one all-gather, on every rank
        group = self.rollout_settings.group_size
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        try:
            if self.rollout_settings.mode == "partial":
                rollout = self._partial_driver().next_batch(
                    prompt_ids.shape[0], self.rollout_generator()
                )
            else:
                rollout = self.engine.generate(prompt_ids, prompt_mask, self.rollout_generator())
        except NonFiniteLogitsError as error:
            raise divergence_error(
                self.trainer, "the student's logits are NaN or inf while sampling rollouts"
            ) from error
        out = self.distillation_loss(rollout)
        self._log_rollout(rollout, out)
        if self.verdict_task is not None:
            self._log_cut_verdicts(rollout, [p for p in batch["problems"] for _ in range(group)])
        self.last_rollout = replace(
            rollout, teacher_hidden=None, teacher_topk_logprobs=None, teacher_topk_ids=None
        )
        return out.loss

    def _partial_driver(self) -> PartialRollouts:
        """The partial-rollout driver (slots = this rank's rollouts per step), built once."""
        if self.partial is None:
            slots = self.trainer.datamodule.batch_size // world_size()
            self.partial = PartialRollouts(
                self.engine,
                slots=slots * self.rollout_settings.group_size,
                max_staleness=self.rollout_settings.max_staleness,
                prompts=self._next_prompts,
            )
            self.partial.version = self.trainer.global_step
        return self.partial

    def _next_prompts(self) -> list[torch.Tensor]:
        """The next batch of this rank's prompts for partial rollouts (1-D token ids each, every
        prompt ``group_size`` times), in the order sync mode would train on them."""
        batch = next(self._prompt_iter, None) if self._prompt_iter is not None else None
        if batch is None:  # first call, or the end of an epoch
            loader = self.trainer.datamodule.train_dataloader(lambda: self.partial_batches)
            self._prompt_iter = iter(loader)
            batch = next(self._prompt_iter)
        self.partial_batches += 1
        group = self.rollout_settings.group_size
        ids = batch["input_ids"].repeat_interleave(group, dim=0)
        mask = batch["attention_mask"].repeat_interleave(group, dim=0).bool()
        return [row[keep] for row, keep in zip(ids, mask, strict=True)]

    def distillation_loss(self, rollout: Rollout) -> LossOutput:
        """The configured loss on the kept tokens of ``rollout`` (student forward with grad)."""
        s = self.loss_settings
        keep = rollout.loss_mask
        hidden = bucketed_hidden(  # [B, width, H]: position t predicts generated token t
            self.final_hidden,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_ids.shape[1],
            keep,
            s.length_buckets,
        )
        rows = torch.arange(rollout.batch_size, device=keep.device)[:, None].expand_as(keep)
        teacher = TeacherTargets(
            hidden=None if rollout.teacher_hidden is None else rollout.teacher_hidden[keep],
            lm_head=self.teacher.get_output_embeddings()
            if isinstance(self.teacher, PreTrainedModel)
            else None,
            topk_logprobs=None
            if rollout.teacher_topk_logprobs is None
            else rollout.teacher_topk_logprobs[keep],
            topk_ids=None if rollout.teacher_topk_ids is None else rollout.teacher_topk_ids[keep],
            sampled_logprobs=rollout.teacher_logprobs[keep],
        )
        return opd_loss(
            hidden[keep],
            self.student.get_output_embeddings(),
            rollout.tokens[keep],
            token_weights(
                keep, s.aggregation, sum_over_ranks=all_reduce_sum, world_size=world_size()
            )[keep],
            teacher,
            kind=s.kind,
            k=s.k,
            support=s.support,
            discount=s.discount,
            row_index=rows[keep],
            chunk_size=s.chunk_size,
        )

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Measure and log the gradient norm before clipping; stop if it is NaN or inf
        (except under float16 loss scaling, whose scaler skips such steps itself)."""
        self.grad_norm = float(global_grad_norm(self.student.parameters()))
        self.log("train/grad_norm", self.grad_norm, on_step=True)
        if not math.isfinite(self.grad_norm) and not grad_scaler_active(self.trainer):
            raise divergence_error(
                self.trainer, f"the gradient norm before clipping is {self.grad_norm}"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.terminator.on_optimizer_step()
        self.engine.sync_weights()  # the next rollouts sample from the updated student
        if self.partial is not None:
            self.partial.weights_updated()  # carried rows continue with the new weights

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step_time = time.perf_counter() - self._step_start
        self.log("perf/step_time_s", step_time, on_step=True, sync_dist=True)

    def _log_rollout(self, rollout: Rollout, out: LossOutput) -> None:
        """Log the step's metrics over all ranks: counts and token totals are sums, rates
        are global ratios, times are means over ranks (every rank logs the same values).

        ``len/longest`` is the batch's longest generated row, which is how many decode steps
        the batch ran (mean over ranks); ``perf/occupancy`` is the share of those steps' row
        slots that held a live row, generated / (rollouts x longest): dropping stopped rows
        saves the time of their slots only as far as a decode step's cost scales with its rows.
        """
        seconds = rollout.timings.get("total", float("nan"))
        kl = rollout.kl[rollout.gen_mask] if rollout.kl is not None else torch.zeros(0)
        # decode steps, row slots and tokens decoded: the batch's in sync mode, in partial mode
        # the driver's during this step (rows in flight included)
        longest, slots, decoded = rollout.lengths.max(), rollout.batch_size, rollout.lengths.sum()
        if rollout.partial_metrics:
            longest = rollout.partial_metrics["partial/decode_steps"]
            decoded = rollout.partial_metrics["partial/tokens"]
            slots = self.partial.slots
        local = {
            "rollouts": rollout.batch_size,
            "generated": rollout.lengths.sum(),
            "decoded": decoded,
            "kept": rollout.cut.sum(),
            "longest": longest,
            "row_slots": slots * longest,
            "loss": out.loss.detach(),
            "loss_tokens": out.n_tokens,
            "nonfinite": rollout.n_teacher_nonfinite + out.n_nonfinite,
            "kl_sum": kl.nansum(),
            "kl_count": (~kl.isnan()).sum(),
            "tokens_per_s": decoded / seconds,
            "rollout_s": seconds,
            "teacher_s": rollout.timings.get("teacher", 0.0),
            **{f"stop/{r}": c for r, c in rollout.stop_counts().items()},
        }
        values = torch.tensor([float(v) for v in local.values()], dtype=torch.float64)
        g = dict(zip(local, all_reduce_sum(values.to(self.device)).tolist(), strict=True))
        ranks = world_size()
        self._check_finite(g)
        self.totals["tokens_generated"] += int(g["generated"])
        self.totals["tokens_kept"] += int(g["kept"])
        self.totals["rollouts"] += int(g["rollouts"])
        self.totals["rollout_s"] += g["rollout_s"] / ranks
        self.totals["batches"] += 1
        self.totals["decode_steps"] += g["longest"] / ranks
        self.totals["row_slots"] += int(g["row_slots"])
        self.totals["slot_tokens"] += int(g["decoded"])
        if rollout.kl is None:
            mean_kl = 0.0
        else:
            mean_kl = g["kl_sum"] / g["kl_count"] if g["kl_count"] else math.nan
        metrics = {
            "train/loss": g["loss"] / ranks,
            "train/kl": mean_kl,
            "train/loss_tokens": g["loss_tokens"],
            "train/teacher_nonfinite": g["nonfinite"],
            "len/generated": g["generated"] / g["rollouts"],
            "len/kept": g["kept"] / g["rollouts"],
            "len/longest": g["longest"] / ranks,
            "perf/occupancy": g["decoded"] / g["row_slots"] if g["row_slots"] else math.nan,
            "perf/tokens_per_s": g["tokens_per_s"],
            "perf/rollout_s": g["rollout_s"] / ranks,
            "perf/teacher_s": g["teacher_s"] / ranks,
            "total/tokens_generated": float(self.totals["tokens_generated"]),
        }
        metrics.update({f"stop/{r}": g[f"stop/{r}"] / g["rollouts"] for r in STOP_REASONS})
        metrics.update(rollout.terminator_metrics)  # global already (see Terminator.set_gather)
        if rollout.partial_metrics:
            metrics.update(self._partial_metrics(rollout))
        self.log_dict(metrics, on_step=True, batch_size=rollout.batch_size)
        self.log("kl", metrics["train/kl"], prog_bar=True, on_step=True, logger=False)
        self.log("len", metrics["len/generated"], prog_bar=True, on_step=True, logger=False)

    def _log_cut_verdicts(self, rollout: Rollout, problems: list[str]) -> None:
        """The verifier's verdicts on this step's cuts (``lit/cut_verdicts.py``), summed over
        ranks; their run totals (``verdict/<count>`` in ``totals``) go to the summary."""
        local = rollout_counts(self.verdict_task, self.tokenizer, rollout, problems)
        values = torch.tensor(list(local.values()), dtype=torch.float64, device=self.device)
        counts = dict(zip(local, all_reduce_sum(values).tolist(), strict=True))
        for name, value in counts.items():
            self.totals[f"verdict/{name}"] = self.totals.get(f"verdict/{name}", 0.0) + value
        self.log_dict(verdict_metrics(counts), on_step=True, batch_size=rollout.batch_size)

    def _partial_metrics(self, rollout: Rollout) -> dict[str, float]:
        """Partial mode: the driver's metrics (means over ranks, the staleness maximum this
        rank's), the share of rows ended at the staleness bound, rows dropped on resume (once)."""
        keys = list(rollout.partial_metrics)
        local = torch.tensor([rollout.partial_metrics[k] for k in keys], dtype=torch.float64)
        ranks = world_size()
        g = dict(zip(keys, (all_reduce_sum(local.to(self.device)) / ranks).tolist(), strict=True))
        g["partial/staleness_max"] = float(rollout.partial_metrics["partial/staleness_max"])
        g["partial/dropped_on_resume"] = float(self._dropped_on_resume)
        self._dropped_on_resume = 0
        g["stop/stale"] = sum(r == STOP_STALE for r in rollout.stop_reason) / rollout.batch_size
        return g

    def _check_finite(self, totals: dict[str, float]) -> None:
        """Stop on a NaN/inf loss; warn (once) when teacher values were NaN/inf. ``totals``
        are sums over ranks, so every rank decides alike (a non-finite loss anywhere makes
        the sum non-finite) before the backward pass."""
        if not math.isfinite(totals["loss"]):
            loss = totals["loss"] / world_size()
            raise divergence_error(self.trainer, f"the loss (train/loss) is {loss}")
        if totals["nonfinite"] and not self._warned_teacher_nonfinite:
            self._warned_teacher_nonfinite = True
            rank_zero_warn(
                f"step {self.trainer.global_step}: the teacher's logits are NaN or inf at "
                f"{int(totals['nonfinite'])} kept tokens; they are left out of the loss "
                "(counted in train/teacher_nonfinite at every step). The teacher holds NaN/inf "
                "weights, or its activations overflow in its dtype (model.teacher.dtype). "
                "(Warned once per run.)"
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs on every rank (Lightning writes rank 0's dict): the terminator state is the
        same everywhere, the rollout RNG states are gathered into [ranks, state] rows."""
        checkpoint["terminator"] = self.terminator.state_dict()
        rng = self.rollout_generator().get_state()
        checkpoint["rollout_rng"] = self._gather(rng).view(world_size(), -1)
        checkpoint["totals"] = dict(self.totals)
        if self.partial is not None:
            carried = self.partial.live_rows() + len(self.partial.finished)
            checkpoint["partial"] = {"prompt_batches": self.partial_batches, "carried": carried}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.terminator.load_state_dict(checkpoint["terminator"])
        self._generator = None
        states = torch.atleast_2d(checkpoint["rollout_rng"])
        if states.shape[0] == world_size():
            self._pending_generator_state = states[self.global_rank].contiguous()
        else:
            rank_zero_warn(
                f"the checkpoint holds rollout RNG states of {states.shape[0]} ranks, this run "
                f"has {world_size()}: rollout sampling restarts from the seed"
            )
            self._pending_generator_state = None
        self.totals.update(checkpoint.get("totals", {}))
        partial = checkpoint.get("partial", {})
        self.partial_batches = int(partial.get("prompt_batches", 0))
        self._dropped_on_resume = int(partial.get("carried", 0))


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...]) -> tuple[int, ...]:
    """Ids of single vocabulary tokens; an unknown token is a configuration error."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"rollout.masked_tokens {missing} are not tokens of the student's vocabulary; "
            "remove them or list tokens this tokenizer has"
        )
    return tuple(vocab[t] for t in tokens)


def _as(cls: type, value: Any) -> Any:
    """Build a settings dataclass from a dict / DictConfig (lists become tuples)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(value).items()})
