"""The one rollout engine: the student samples, the teacher scores online, a terminator stops rows.

The engine works chunk by chunk: a student backend samples up to ``score_every`` tokens for
every active row (HF: KV-cache decoding one token per forward; vLLM: one generation call per
chunk), the teacher consumes the new chunk in one incremental forward with its own KV cache
(or a served teacher returns its top-k log-probs: :mod:`kat_research.rollout.teachers`),
which yields the per-token reverse KL d_t = KL(p_t || q_t) of each token in the chunk, and
the terminator acts at that chunk boundary. Rows that finish leave the active batch (their
cache rows are dropped), so a stopped rollout stops costing compute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from kat_research.losses.kl import teacher_topk_tail_kl
from kat_research.models.vocab_check import check_finite_weights
from kat_research.rollout.backends import ChunkSample, HFBackend, StudentBackend
from kat_research.rollout.cached_lm import chunk_inputs
from kat_research.rollout.teachers import HFTeacher, TeacherChunk, TeacherScorer
from kat_research.rollout.token_scores import score_tokens
from kat_research.rollout.types import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_TERMINATED,
    Rollout,
    SamplingConfig,
)
from kat_research.termination.base import SIGNALS, Terminator, observe_rule
from kat_research.termination.drift import topk_overlap, topk_overlap_with

TeacherKeep = Literal["none", "hidden", "topk"]
DEFAULT_SCORE_EVERY = 64


def check_head_reproduces_logits(model: PreTrainedModel, name: str) -> None:
    """Fail clearly if logits are not ``output_embeddings(final hidden state)`` for ``model``.

    The engine and the chunked losses recompute logits from hidden states; a model that
    post-processes its logits (e.g. soft-capping) would silently get a different KL. Logits
    that are not finite are reported as such (NaN/inf weights, or activations that overflow).
    """
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None] % model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        recomputed = model.get_output_embeddings()(
            model.base_model(input_ids=ids).last_hidden_state
        )
    if not bool(torch.isfinite(full).all()):
        check_finite_weights(name, model)
        raise ValueError(
            f"{name}: its logits on a 4-token probe hold NaN or inf although its weights are "
            f"finite: its activations overflow in {full.dtype}; load it in a wider dtype "
            f"(model.{name}.dtype)."
        )
    if not torch.allclose(full.float(), recomputed.float(), atol=1e-3, rtol=1e-3):
        raise ValueError(
            f"{name}: logits differ from output_embeddings(last hidden state) "
            f"(max abs diff {(full - recomputed).abs().max().item():.3g}); this model post-"
            "processes its logits, which the rollout engine and chunked losses do not support."
        )


@dataclass
class _Buffers:
    """Per original row storage for one batch (max_new_tokens columns, trimmed at the end)."""

    tokens: torch.Tensor
    student_logprobs: torch.Tensor
    kl: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_finite: torch.Tensor
    topk_overlap: torch.Tensor | None  # only when the terminator reads it or overlap_k is set

    @classmethod
    def allocate(
        cls, batch: int, width: int, pad_id: int, device: torch.device, overlap: bool = False
    ) -> _Buffers:
        nan = torch.full((batch, width), float("nan"), device=device)
        return cls(
            tokens=torch.full((batch, width), pad_id, dtype=torch.long, device=device),
            student_logprobs=nan.clone(),
            kl=nan.clone(),
            teacher_logprobs=nan.clone(),
            teacher_finite=torch.ones(batch, width, dtype=torch.bool, device=device),
            topk_overlap=nan.clone() if overlap else None,
        )


class RolloutEngine:
    """Batched sampling from the student, with optional online teacher scoring and termination.

    Args:
        student: any ``AutoModelForCausalLM`` with a KV cache.
        teacher: frozen teacher sharing the student's vocabulary (scored in this process), a
            :class:`TeacherScorer` (e.g. a served teacher's top-k log-probs, whose KL is
            then the top-k + tail estimate), or None (evaluation).
        sampling: temperature / top-p / max new tokens / stop token ids.
        terminator: when rows stop and which prefix is kept; None = no rule.
        pad_token_id: id written after a row's end.
        score_every: chunk size in generated tokens; default = the terminator's
            ``chunk_hint`` (KAT's stride) or 64; 1 = strict per-token lockstep.
        teacher_keep: what the loss needs from the teacher besides log q(y_t): ``hidden``
            (final hidden states, for full-vocabulary losses), ``topk`` (top-K log-probs
            and ids) or ``none``.
        teacher_topk: K for ``teacher_keep="topk"`` (required with it).
        masked_token_ids: generated positions holding these ids are left out of ``loss_mask``.
        backend: where the student's tokens come from (default: the student decodes itself,
            :class:`HFBackend`); see :func:`kat_research.rollout.build_backend`.
        overlap_k: record the ``topk_overlap`` signal at this k (``Rollout.topk_overlap``) even
            when no rule reads it (offline analyses); a rule that reads it sets its own k.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | TeacherScorer | None = None,
        *,
        sampling: SamplingConfig,
        pad_token_id: int,
        terminator: Terminator | None = None,
        score_every: int | None = None,
        teacher_keep: TeacherKeep = "none",
        teacher_topk: int | None = None,
        masked_token_ids: Sequence[int] = (),
        backend: StudentBackend | None = None,
        overlap_k: int | None = None,
    ):
        if teacher_keep not in ("none", "hidden", "topk"):
            raise ValueError(f"teacher_keep must be none/hidden/topk, got {teacher_keep!r}")
        if terminator is not None and terminator.observes and teacher is None:
            raise ValueError(
                f"{terminator!r} needs the teacher (it observes rows at teacher-scoring chunks); "
                "pass a teacher"
            )
        signals = terminator.signals if terminator is not None else ()
        unknown = set(signals) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown terminator signals {sorted(unknown)}; valid: {SIGNALS}")
        if "topk_overlap" in signals and not terminator.overlap_k:
            raise ValueError(f"{terminator!r} reads topk_overlap but sets no overlap_k >= 1")
        if "topk_overlap" in signals and overlap_k not in (None, terminator.overlap_k):
            raise ValueError(f"overlap_k={overlap_k} but {terminator!r} reads another k")
        if overlap_k is not None and (overlap_k < 1 or teacher is None):
            raise ValueError(f"overlap_k needs a teacher and k >= 1, got {overlap_k}")
        if teacher is None and teacher_keep != "none":
            raise ValueError("teacher_keep needs a teacher")
        if teacher_keep == "topk" and (teacher_topk is None or teacher_topk < 1):
            raise ValueError(f"teacher_keep='topk' needs teacher_topk >= 1, got {teacher_topk}")
        scorer = HFTeacher(teacher) if isinstance(teacher, PreTrainedModel) else teacher
        if scorer is not None and not scorer.full_vocabulary:
            if teacher_keep == "hidden":
                raise ValueError("teacher_keep='hidden' needs a teacher model, not top-k scores")
            if teacher_keep == "topk" and teacher_topk > scorer.topk:
                raise ValueError(
                    f"teacher_topk={teacher_topk} exceeds the {scorer.topk} log-probs per "
                    "position the teacher returns (teacher.topk)"
                )
        hint = getattr(terminator, "chunk_hint", None)
        self.score_every = int(
            score_every if score_every is not None else hint or DEFAULT_SCORE_EVERY
        )
        if self.score_every < 1:
            raise ValueError(f"score_every must be >= 1, got {self.score_every}")
        self.student = student
        self.teacher = teacher
        self.teacher_scorer = scorer
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.terminator = terminator
        self.overlap_k = terminator.overlap_k if "topk_overlap" in signals else overlap_k
        self.teacher_keep = teacher_keep
        self.teacher_topk = teacher_topk
        self.masked_token_ids = tuple(masked_token_ids)
        self.backend = backend or HFBackend(student)
        self._checked_heads = False

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def sync_weights(self) -> None:
        """Make the next rollouts use the student's current weights (after an optimizer step)."""
        self.backend.sync_weights()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample one continuation per prompt row (prompts left-padded)."""
        if not self._checked_heads:
            check_head_reproduces_logits(self.student, "student")
            if isinstance(self.teacher, PreTrainedModel):
                check_head_reproduces_logits(self.teacher, "teacher")
            self._checked_heads = True
        was_training = self.student.training
        self.student.eval()
        try:
            return _RolloutRun(
                self, prompt_ids.to(self.device), prompt_mask.to(self.device), generator
            ).run()
        finally:
            self.student.train(was_training)


class _RolloutRun:
    """State of one ``generate`` call: the chunk loop, teacher scoring and termination."""

    def __init__(
        self,
        engine: RolloutEngine,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        generator: torch.Generator | None,
    ):
        self.e = engine
        self.cfg = engine.sampling
        self.device = prompt_ids.device
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask.long()
        self.generator = generator
        batch = prompt_ids.shape[0]
        self.width = self.cfg.max_new_tokens
        terminator = engine.terminator
        self.signals = terminator.signals if terminator is not None else ()
        self.buf = _Buffers.allocate(
            batch, self.width, engine.pad_token_id, self.device, engine.overlap_k is not None
        )
        self.prompt_len = self.prompt_mask.sum(-1)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cut = torch.full((batch,), -1, dtype=torch.long, device=self.device)
        self.stop_reason: list[str] = [""] * batch
        caps = (
            terminator.begin_batch(batch, self.width, generator)
            if terminator is not None
            else torch.full((batch,), self.width, dtype=torch.long)
        )
        self.limit = caps.to(self.device).clamp(max=self.width)  # tokens each row may generate
        self.s_rows = torch.arange(batch, device=self.device)  # rows the student still samples
        self.chunk_start = 0
        self.t_time = 0.0
        self.kept_hidden: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self.kept_topk: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    # ---------------------------------------------------------------- chunk loop
    def run(self) -> Rollout:
        start = time.perf_counter()
        has_teacher = self.e.teacher is not None
        self.sampler = self.e.backend.begin(
            self.prompt_ids, self.prompt_mask, self.cfg, keep_logits=has_teacher
        )
        self.teacher = None
        if has_teacher:
            t0 = time.perf_counter()
            self.teacher = self.e.teacher_scorer.begin(self.prompt_ids, self.prompt_mask)
            self.t_time += time.perf_counter() - t0
        while self.s_rows.numel():
            self._chunk()
        rollout = self._assemble()
        rollout.timings = {"total": time.perf_counter() - start, "teacher": self.t_time}
        return rollout

    def _chunk(self) -> None:
        """Sample the next chunk of the active rows, record it, score it, apply the rule."""
        rows, start = self.s_rows, self.chunk_start
        n_steps = min(self.e.score_every, self.width - start)
        remaining = self.limit[rows] - start
        sample = self.sampler.sample(start, n_steps, remaining, self.generator)
        counts = sample.counts
        valid = torch.arange(n_steps, device=self.device)[None, :] < counts[:, None]
        for name, values in (("tokens", sample.tokens), ("student_logprobs", sample.logprobs)):
            block = getattr(self.buf, name)[rows, start : start + n_steps]
            block[valid] = values[valid]
            getattr(self.buf, name)[rows, start : start + n_steps] = block
        self.lengths[rows] = start + counts
        end = start + int(counts.max())

        at_max = self.lengths[rows] >= self.width
        for i in sample.ended.nonzero().flatten().tolist():
            at_stop = sample.at_stop[i]
            reason = STOP_EOS if at_stop else STOP_MAX_TOKENS if at_max[i] else STOP_TERMINATED
            self.stop_reason[rows[i]] = reason
        self.s_rows = rows[~sample.ended]  # the sampler dropped ended rows itself
        if self.teacher is not None:
            self._score_chunk(rows, start, end, sample)
        self.chunk_start = end

    def _keep_student(self, keep: torch.Tensor) -> None:
        """Stop student rows where ``keep`` is False (relative to the current order)."""
        if bool(keep.all()):
            return
        index = keep.nonzero().flatten()
        self.s_rows = self.s_rows[index]
        if self.s_rows.numel():
            self.sampler.keep_rows(index)

    # ---------------------------------------------------------------- teacher scoring
    def _score_chunk(self, rows: torch.Tensor, start: int, end: int, sample: ChunkSample) -> None:
        """Teacher consumes tokens [start, end) of ``rows``; record KL; run the terminator."""
        t0 = time.perf_counter()
        _, _, valid = chunk_inputs(
            self.prompt_mask[rows], self.prompt_len[rows], self.lengths[rows], start, end
        )
        chunk = self.teacher.score(self.buf.tokens[rows, start:end], valid, start)
        s_logits = sample.logits[:, : end - start]
        self._record_chunk(rows, start, end, valid, s_logits, chunk)
        if self.e.teacher_keep == "hidden":
            self.kept_hidden.append((rows, start, chunk.hidden))
        self._apply_terminator(rows, end)
        keep = torch.isin(rows, self.s_rows).nonzero().flatten()
        if keep.numel() < rows.numel():
            self.teacher.keep_rows(keep)
        self.t_time += time.perf_counter() - t0

    def _record_chunk(
        self,
        rows: torch.Tensor,
        start: int,
        end: int,
        valid: torch.Tensor,
        s_logits: torch.Tensor,
        chunk: TeacherChunk,
    ) -> None:
        """Store d_t, log q(y_t), teacher finiteness and what the loss keeps, for valid tokens.
        d_t is exact from full-vocabulary logits, else the top-k + tail estimate."""
        tokens = self.buf.tokens[rows, start:end]
        flat_s, t_logits = s_logits[valid], chunk.logits
        if t_logits is not None:
            flat_t = t_logits[valid]
            kl, lq, finite, _ = score_tokens(flat_s, flat_t, tokens[valid])
        else:
            top_lp, top_ids = chunk.topk_logprobs[valid], chunk.topk_ids[valid]
            lq = chunk.token_logprobs[valid]
            finite = torch.isfinite(top_lp).all(dim=-1) & torch.isfinite(lq)
            kl = torch.full(finite.shape, float("nan"), device=self.device)
            kl[finite] = teacher_topk_tail_kl(flat_s[finite], top_lp[finite], top_ids[finite])
        recorded = [("kl", kl), ("teacher_logprobs", lq), ("teacher_finite", finite)]
        if self.buf.topk_overlap is not None:
            k = self.e.overlap_k
            if t_logits is not None:
                overlap = topk_overlap(flat_s, flat_t, k)
            elif chunk.topk_ids.shape[-1] >= k:
                overlap = topk_overlap_with(flat_s, chunk.topk_ids[valid][:, :k])
            else:
                raise ValueError(
                    f"the rule's top-k overlap needs the teacher's top-{k}, the served teacher "
                    f"returns {chunk.topk_ids.shape[-1]}: raise teacher.topk"
                )
            recorded.append(("topk_overlap", overlap.masked_fill(~finite, float("nan"))))
        for name, values in recorded:
            block = getattr(self.buf, name)[rows, start:end]
            block[valid] = values
            getattr(self.buf, name)[rows, start:end] = block
        if self.e.teacher_keep == "topk" and t_logits is not None:
            k = min(self.e.teacher_topk, t_logits.shape[-1])
            top = torch.log_softmax(t_logits.float(), dim=-1).topk(k, dim=-1)
            self.kept_topk.append((rows, start, top.values, top.indices))
        elif self.e.teacher_keep == "topk":
            k = self.e.teacher_topk
            top_lp, top_ids = chunk.topk_logprobs[..., :k], chunk.topk_ids[..., :k]
            self.kept_topk.append((rows, start, top_lp, top_ids))

    def _apply_terminator(self, rows: torch.Tensor, end: int) -> None:
        terminator = self.e.terminator
        if terminator is None or not terminator.observes:
            return
        signals = {
            "student_logprob": self.buf.student_logprobs,
            "topk_overlap": self.buf.topk_overlap,
        }
        signals = {name: signals[name][rows, :end] for name in self.signals}
        cuts = observe_rule(
            terminator, rows, self.buf.kl[rows, :end], self.lengths[rows], signals
        ).to(self.device)
        fired = (cuts >= 0).nonzero().flatten()
        for i in fired.tolist():
            self.cut[rows[i]] = cuts[i]
            self.stop_reason[rows[i]] = STOP_TERMINATED
        if fired.numel():
            self._keep_student(~torch.isin(self.s_rows, rows[fired]))

    # ---------------------------------------------------------------- output
    def _assemble(self) -> Rollout:
        terminator = self.e.terminator
        width = int(self.lengths.max())
        buf = self.buf
        cut = torch.where(self.cut >= 0, self.cut, self.lengths)
        has_teacher = self.teacher is not None
        if terminator is not None:
            kl = buf.kl[:, :width] if has_teacher else None
            cut = terminator.kept_tokens(cut, kl, self.lengths).to(self.device)
        steps = torch.arange(width, device=self.device)
        tokens = buf.tokens[:, :width]
        loss_mask = steps[None, :] < cut[:, None]
        if self.e.masked_token_ids:
            masked = torch.tensor(self.e.masked_token_ids, device=self.device)
            loss_mask &= ~torch.isin(tokens, masked)
        n_nonfinite = 0
        if has_teacher:
            finite = buf.teacher_finite[:, :width]
            n_nonfinite = int((loss_mask & ~finite).sum())
            loss_mask &= finite
        return Rollout(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            tokens=tokens,
            lengths=self.lengths,
            cut=cut,
            loss_mask=loss_mask,
            student_logprobs=buf.student_logprobs[:, :width],
            stop_reason=self.stop_reason,
            kl=buf.kl[:, :width] if has_teacher else None,
            teacher_logprobs=buf.teacher_logprobs[:, :width] if has_teacher else None,
            teacher_hidden=self._gather_kept_hidden(width),
            teacher_topk_logprobs=self._gather_kept_topk(width, 0),
            teacher_topk_ids=self._gather_kept_topk(width, 1),
            n_teacher_nonfinite=n_nonfinite,
            topk_overlap=None if buf.topk_overlap is None else buf.topk_overlap[:, :width],
            terminator_metrics=terminator.end_batch() if terminator is not None else {},
        )

    def _gather_kept_hidden(self, width: int) -> torch.Tensor | None:
        if not self.kept_hidden:
            return None
        first = self.kept_hidden[0][2]
        out = first.new_zeros((self.prompt_ids.shape[0], width, first.shape[-1]))
        for rows, start, block in self.kept_hidden:
            out[rows, start : start + block.shape[1]] = block
        return out

    def _gather_kept_topk(self, width: int, which: int) -> torch.Tensor | None:
        if not self.kept_topk:
            return None
        first = self.kept_topk[0][2 + which]
        out = first.new_zeros((self.prompt_ids.shape[0], width, first.shape[-1]))
        for rows, start, *blocks in self.kept_topk:
            out[rows, start : start + blocks[which].shape[1]] = blocks[which]
        return out
