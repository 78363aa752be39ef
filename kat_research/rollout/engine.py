"""The one rollout engine: the student samples, the teacher scores online, a terminator stops rows.

Student and teacher each keep their own KV cache. The student decodes one token per step;
every ``score_every`` generated tokens the teacher consumes the new chunk in one incremental
forward, which yields the per-token reverse KL d_t = KL(p_t || q_t) of each token in the
chunk, and the terminator acts at that chunk boundary. Rows that finish leave the active
batch (their cache rows are dropped), so a stopped rollout stops costing compute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel

from kat_research.losses.kl import per_token_reverse_kl
from kat_research.rollout.sampling import sample_next_token
from kat_research.rollout.types import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_TERMINATED,
    Rollout,
    SamplingConfig,
)
from kat_research.termination.base import Terminator

TeacherKeep = Literal["none", "hidden", "topk"]
DEFAULT_SCORE_EVERY = 64


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts: 0 at each row's first real token."""
    return (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)


class _CachedLM:
    """A causal LM advanced incrementally over a shrinking set of rows, with its KV cache.

    Logits are computed from the final hidden states through the output embedding, only
    where they are needed; ``check_head`` verifies that this equals the model's own logits.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.cache = DynamicCache()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Feed new tokens [n, L]; return final hidden states [n, L, H]."""
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.last_hidden_state

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only cache rows ``index`` (positions in the current row order)."""
        self.cache.batch_select_indices(index)


def check_head_reproduces_logits(model: PreTrainedModel, name: str) -> None:
    """Fail clearly if logits are not ``output_embeddings(final hidden state)`` for ``model``.

    The engine and the chunked losses recompute logits from hidden states; a model that
    post-processes its logits (e.g. soft-capping) would silently get a different KL.
    """
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None] % model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        recomputed = model.get_output_embeddings()(
            model.base_model(input_ids=ids).last_hidden_state
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

    @classmethod
    def allocate(cls, batch: int, width: int, pad_id: int, device: torch.device) -> _Buffers:
        nan = torch.full((batch, width), float("nan"), device=device)
        return cls(
            tokens=torch.full((batch, width), pad_id, dtype=torch.long, device=device),
            student_logprobs=nan.clone(),
            kl=nan.clone(),
            teacher_logprobs=nan.clone(),
            teacher_finite=torch.ones(batch, width, dtype=torch.bool, device=device),
        )


class RolloutEngine:
    """Batched sampling from the student, with optional online teacher scoring and termination.

    Args:
        student: any ``AutoModelForCausalLM`` with a KV cache.
        teacher: frozen teacher sharing the student's vocabulary, or None (evaluation).
        sampling: temperature / top-p / max new tokens / stop token ids.
        terminator: when rows stop and which prefix is kept; None = no rule.
        pad_token_id: id written after a row's end.
        score_every: teacher chunk size in generated tokens; default = the terminator's
            ``chunk_hint`` (KAT's stride) or 64; 1 = strict per-token lockstep.
        teacher_keep: what the loss needs from the teacher besides log q(y_t): ``hidden``
            (final hidden states, for full-vocabulary losses), ``topk`` (top-K log-probs
            and ids) or ``none``.
        teacher_topk: K for ``teacher_keep="topk"``.
        masked_token_ids: generated positions holding these ids are left out of ``loss_mask``.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        *,
        sampling: SamplingConfig,
        pad_token_id: int,
        terminator: Terminator | None = None,
        score_every: int | None = None,
        teacher_keep: TeacherKeep = "none",
        teacher_topk: int = 32,
        masked_token_ids: Sequence[int] = (),
    ):
        if teacher_keep not in ("none", "hidden", "topk"):
            raise ValueError(f"teacher_keep must be none/hidden/topk, got {teacher_keep!r}")
        if terminator is not None and terminator.needs_kl and teacher is None:
            raise ValueError(f"{terminator!r} needs the teacher's per-token KL; pass a teacher")
        if teacher is None and teacher_keep != "none":
            raise ValueError("teacher_keep needs a teacher")
        hint = getattr(terminator, "chunk_hint", None)
        self.score_every = int(score_every or hint or DEFAULT_SCORE_EVERY)
        if self.score_every < 1:
            raise ValueError(f"score_every must be >= 1, got {self.score_every}")
        self.student = student
        self.teacher = teacher
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.terminator = terminator
        self.teacher_keep = teacher_keep
        self.teacher_topk = teacher_topk
        self.masked_token_ids = tuple(masked_token_ids)
        self._checked_heads = False

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

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
            if self.teacher is not None:
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
    """State of one ``generate`` call: the decode loop and the chunked teacher scoring."""

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
        self.buf = _Buffers.allocate(batch, self.width, engine.pad_token_id, self.device)
        self.prompt_len = self.prompt_mask.sum(-1)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cut = torch.full((batch,), -1, dtype=torch.long, device=self.device)
        self.stop_reason: list[str] = [""] * batch
        terminator = engine.terminator
        caps = (
            terminator.begin_batch(batch, self.width, generator)
            if terminator is not None
            else torch.full((batch,), self.width, dtype=torch.long)
        )
        self.caps = caps.to(self.device)
        self.stop_ids = torch.tensor(self.cfg.stop_token_ids, dtype=torch.long, device=self.device)
        self.student = _CachedLM(engine.student)
        self.teacher = _CachedLM(engine.teacher) if engine.teacher is not None else None
        self.s_rows = torch.arange(batch, device=self.device)  # rows the student still decodes
        self.t_rows = self.s_rows.clone()  # rows in the teacher cache (superset of s_rows)
        self.chunk_start = 0
        self.t_time = 0.0
        self.kept_hidden: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self.kept_topk: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    # ---------------------------------------------------------------- decode loop
    def run(self) -> Rollout:
        start = time.perf_counter()
        positions = prompt_positions(self.prompt_mask)
        hidden = self.student.forward(self.prompt_ids, self.prompt_mask, positions)
        s_logits = self.student.head(hidden[:, -1])
        if self.teacher is not None:
            t0 = time.perf_counter()
            t_hidden = self.teacher.forward(self.prompt_ids, self.prompt_mask, positions)[:, -1]
            self.t_next_hidden = t_hidden  # teacher state predicting each row's next token
            self.t_next_logits = self.teacher.head(t_hidden)
            self.pending_logits = s_logits.new_empty(
                (self.prompt_ids.shape[0], self.e.score_every, s_logits.shape[-1])
            )
            self.t_time += time.perf_counter() - t0
        for step in range(self.width):
            s_logits = self._decode_step(step, s_logits)
            if s_logits is None:
                break
        rollout = self._assemble()
        rollout.timings = {"total": time.perf_counter() - start, "teacher": self.t_time}
        return rollout

    def _decode_step(self, step: int, s_logits: torch.Tensor) -> torch.Tensor | None:
        """Sample token ``step`` for the active rows; return the next logits or None when done."""
        rows = self.s_rows
        tokens = sample_next_token(
            s_logits,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            generator=self.generator,
        )
        logprobs = torch.log_softmax(s_logits.float(), dim=-1)
        self.buf.tokens[rows, step] = tokens
        self.buf.student_logprobs[rows, step] = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        self.lengths[rows] = step + 1
        if self.teacher is not None:
            self.pending_logits[rows, step - self.chunk_start] = s_logits

        is_eos = torch.isin(tokens, self.stop_ids)
        at_max = torch.full_like(is_eos, step + 1 >= self.width)
        at_cap = (step + 1 >= self.caps[rows]) & ~at_max
        done = is_eos | at_max | at_cap
        for i in done.nonzero().flatten().tolist():
            reason = STOP_EOS if is_eos[i] else STOP_MAX_TOKENS if at_max[i] else STOP_TERMINATED
            self.stop_reason[rows[i]] = reason
        self._keep_student(~done)

        chunk_full = step + 1 - self.chunk_start == self.e.score_every
        if self.teacher is not None and (chunk_full or self.s_rows.numel() == 0):
            self._score_chunk(step + 1)
        if self.s_rows.numel() == 0:
            return None
        keep = torch.isin(rows, self.s_rows)
        new_tokens = tokens[keep][:, None]
        mask = torch.cat(
            [
                self.prompt_mask[self.s_rows],
                torch.ones(self.s_rows.numel(), step + 1, dtype=torch.long, device=self.device),
            ],
            dim=1,
        )
        pos = (self.prompt_len[self.s_rows] + step)[:, None]
        return self.student.head(self.student.forward(new_tokens, mask, pos)[:, -1])

    def _keep_student(self, keep: torch.Tensor) -> None:
        """Drop student rows where ``keep`` is False (relative to the current order)."""
        if bool(keep.all()):
            return
        index = keep.nonzero().flatten()
        self.s_rows = self.s_rows[index]
        if self.s_rows.numel():
            self.student.keep_rows(index)

    # ---------------------------------------------------------------- teacher scoring
    def _score_chunk(self, end: int) -> None:
        """Teacher consumes tokens [chunk_start, end) of its rows; record KL; run the terminator."""
        t0 = time.perf_counter()
        rows, start = self.t_rows, self.chunk_start
        lengths = self.lengths[rows]
        steps = torch.arange(start, end, device=self.device)
        valid = steps[None, :] < lengths[:, None]  # [n, C]: rows that ended mid-chunk are padded
        gen_mask = torch.arange(end, device=self.device)[None, :] < lengths[:, None]
        mask = torch.cat([self.prompt_mask[rows], gen_mask.long()], dim=1)
        pos = self.prompt_len[rows, None] + steps[None, :]
        hidden = self.teacher.forward(self.buf.tokens[rows, start:end], mask, pos)
        # hidden at chunk position j predicts token start+j+1; the state before the chunk
        # predicts token `start`.
        t_logits = torch.cat([self.t_next_logits[:, None], self.teacher.head(hidden[:, :-1])], 1)
        s_logits = self.pending_logits[rows, : end - start]
        self._record_chunk(rows, start, end, valid, s_logits, t_logits)
        if self.e.teacher_keep == "hidden":
            t_hidden = torch.cat([self.t_next_hidden[:, None], hidden[:, :-1]], dim=1)
            self.kept_hidden.append((rows, start, t_hidden))

        last = self.teacher.head(hidden[:, -1])
        self.t_next_hidden, self.t_next_logits = hidden[:, -1], last
        self._apply_terminator(rows, end)
        keep = torch.isin(self.t_rows, self.s_rows).nonzero().flatten()
        if keep.numel() < self.t_rows.numel():
            self.t_rows = self.t_rows[keep]
            self.t_next_hidden, self.t_next_logits = self.t_next_hidden[keep], last[keep]
            if keep.numel():
                self.teacher.keep_rows(keep)
        self.chunk_start = end
        self.t_time += time.perf_counter() - t0

    def _record_chunk(
        self,
        rows: torch.Tensor,
        start: int,
        end: int,
        valid: torch.Tensor,
        s_logits: torch.Tensor,
        t_logits: torch.Tensor,
    ) -> None:
        """Store d_t, log q(y_t), teacher finiteness and what the loss keeps, for valid tokens."""
        tokens = self.buf.tokens[rows, start:end]
        flat_s, flat_t = s_logits[valid], t_logits[valid]
        finite = torch.isfinite(flat_t).all(dim=-1)
        kl = torch.full(finite.shape, float("nan"), device=self.device)
        kl[finite] = per_token_reverse_kl(flat_s[finite], flat_t[finite], kind="full")
        t_logprobs = torch.log_softmax(flat_t.float(), dim=-1)
        lq = t_logprobs.gather(-1, tokens[valid][:, None]).squeeze(-1)
        for name, values in (("kl", kl), ("teacher_logprobs", lq), ("teacher_finite", finite)):
            block = getattr(self.buf, name)[rows, start:end]
            block[valid] = values
            getattr(self.buf, name)[rows, start:end] = block
        if self.e.teacher_keep == "topk":
            k = min(self.e.teacher_topk, t_logits.shape[-1])
            top = torch.log_softmax(t_logits.float(), dim=-1).topk(k, dim=-1)
            self.kept_topk.append((rows, start, top.values, top.indices))

    def _apply_terminator(self, rows: torch.Tensor, end: int) -> None:
        terminator = self.e.terminator
        if terminator is None or not terminator.needs_kl:
            return
        cuts = terminator.observe(rows, self.buf.kl[rows, :end], self.lengths[rows]).to(self.device)
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
