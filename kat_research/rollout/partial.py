"""Partial rollouts (``rollout.mode: partial``): row slots stay busy across optimizer steps.

The engine's sync mode decodes a batch until its longest row ends, so a batch whose rows KAT
cut early still waits for its longest row. Here a fixed number of row slots decodes
continuously: a row that ends (stop token, its cap, a terminator's stop) frees its slot, which
takes the next prompt at the next chunk boundary. A training step takes the first B rows to
finish; unfinished rows carry over and continue, after the weight update, from their own
tokens. Every token records the optimizer step whose weights sampled it (``policy_step``).

Staleness. A row admitted while the weights were those of step ``b`` and trained at step ``V``
has staleness ``V - b``. ``max_staleness`` = K bounds it: when a step's rollouts are collected,
every live row with ``V + 1 - b > K`` (it could not be trained within the bound later) is
*ended* (stop reason ``stale``, all its tokens kept, as a length cap would) and trained in this
step, alongside the first B finishers; finished rows beyond the first B that would be too
stale next step join too. No sampled token is wasted and every admitted prompt is trained on;
the only bias is that rows longer than about K+1 steps' decoding are truncated there.

Chunk by chunk, as the sync engine: the engine's student backend samples up to
``score_every`` tokens per live row (a :class:`~kat_research.rollout.backends.base.SlotSampler`:
``hf`` decodes with the student's KV cache, a :class:`RowCache` whose rows are inserted and
dropped; ``vllm`` sends each chunk as a fresh request per row for its prompt + tokens so far,
which the student re-scores in its own :class:`RowCache`), the teacher scores each row's new
tokens in one incremental forward (its cache, frozen weights, stays valid across updates), the
terminator observes the per-token KL. After a weight update (pushed into vLLM by the engine)
the driver starts a new sampler: one prefill of every carried row's prompt + tokens with the
new weights, and vLLM's next requests continue those rows with them.

Terminator state is per slot (``Terminator.admit`` resets a slot for its new row; caps such as
a fixed-prefix budget are kept per slot), so a row's KAT windows continue across steps.
``finish`` hands a finished row to the rule (KAT's buffer takes its minimum) and ``end_step``
folds them in once per step, before the next step's threshold snapshot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kat_research.rollout.backends.base import SlotSampler
from kat_research.rollout.engine import RolloutEngine, check_head_reproduces_logits
from kat_research.rollout.row_cache import RowCache
from kat_research.rollout.token_scores import score_tokens
from kat_research.rollout.types import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_STALE,
    STOP_TERMINATED,
    Rollout,
)

PromptSource = Callable[[], list[torch.Tensor]]  # the next prompts (1-D real token ids each)


def _fill(name: str, pad_id: int) -> float | int | bool:
    """What a per-token buffer holds where no token was recorded."""
    if name in ("student_logprobs", "kl", "teacher_logprobs"):
        return float("nan")
    return {"tokens": pad_id, "policy_step": -1, "teacher_finite": True}.get(name, 0)


@dataclass
class _Finished:
    """A finished row, copied out of its slot (tensors trimmed to its length)."""

    prompt: torch.Tensor
    born: int  # policy step of its first token
    reason: str
    kept: int
    values: dict[str, torch.Tensor]  # per-token tensors [length, ...]


class PartialRollouts:
    """Slot-based rollout driver around a :class:`~kat_research.rollout.RolloutEngine`'s
    student backend, teacher, sampling settings and terminator.

    Args:
        engine: supplies models, sampling, terminator, chunk size, what the teacher keeps.
        slots: rows decoded at once.
        max_staleness: K, see the module docstring (>= 0).
        prompts: called whenever a slot is free and no prompt is queued.
    """

    def __init__(
        self, engine: RolloutEngine, slots: int, max_staleness: int, prompts: PromptSource
    ):
        if engine.teacher is None:
            raise ValueError("partial rollouts need a teacher (they exist for training)")
        if slots < 1 or max_staleness < 0:
            raise ValueError(
                f"need slots >= 1 and max_staleness >= 0, got {slots}, {max_staleness}"
            )
        terminator = engine.terminator
        if terminator is not None and not terminator.supports_partial:
            raise ValueError(
                f"{terminator!r} has no per-row state for partial rollouts; use rollout.mode=sync"
            )
        self.e, self.slots, self.max_staleness, self.prompts = engine, slots, max_staleness, prompts
        self.width = engine.sampling.max_new_tokens
        self.version = 0  # optimizer steps taken: the policy step of tokens sampled now
        self.queue: deque[torch.Tensor] = deque()
        self.finished: deque[_Finished] = deque()
        self._started = False
        self.totals = {"tokens": 0, "decode_steps": 0, "slot_steps": 0, "ended_stale": 0}

    @property
    def device(self) -> torch.device:
        return self.e.device

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        e, s, w, dev = self.e, self.slots, self.width, self.device
        check_head_reproduces_logits(e.student, "student")
        check_head_reproduces_logits(e.teacher, "teacher")
        dtypes = {"tokens": torch.long, "policy_step": torch.long, "teacher_finite": torch.bool}
        self.buf = {
            name: torch.full(
                (s, w), _fill(name, e.pad_token_id), dtype=dtypes.get(name), device=dev
            )
            for name in (*dtypes, "student_logprobs", "kl", "teacher_logprobs")
        }
        self.prompt: list[torch.Tensor | None] = [None] * s
        self.length = torch.zeros(s, dtype=torch.long, device=dev)
        self.limit = torch.zeros(s, dtype=torch.long, device=dev)
        self.cut = torch.full((s,), -1, dtype=torch.long, device=dev)
        self.born = torch.zeros(s, dtype=torch.long)
        self.live = torch.zeros(s, dtype=torch.bool)
        self.reason = [""] * s
        self.student: SlotSampler | None = None  # started at the first admission
        self.teacher = RowCache(e.teacher)
        self.rows = torch.zeros(0, dtype=torch.long, device=dev)  # slots in both caches' order
        self.student_stale = True
        if e.terminator is not None:
            e.terminator.begin_slots(s, w)
        self._started = True

    def weights_updated(self) -> None:
        """The student took an optimizer step (and the engine's backend got its weights):
        tokens sampled from now on carry the next policy step, and the student's sampler is
        restarted with the carried rows before the next token."""
        self.version += 1
        self.student_stale = True

    def live_rows(self) -> int:
        return int(self.live.sum()) if self._started else 0

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def next_batch(self, n: int, generator: torch.Generator | None = None) -> Rollout:
        """Decode until ``n`` rows finished; return them (plus the rows the staleness bound
        ends now) as one :class:`Rollout` with ``policy_step`` and ``partial_metrics``."""
        if not self._started:
            self._start()
        terminator = self.e.terminator
        if terminator is not None:
            terminator.begin_step()
        was_training = self.e.student.training
        self.e.student.eval()
        self.generator = generator
        start, self.t_time = time.perf_counter(), 0.0
        before = dict(self.totals)
        try:
            while len(self.finished) < n:
                self._admit()
                if not self.rows.numel():
                    raise RuntimeError("partial rollouts: no live row and no prompt to admit")
                self._chunk(generator)
            batch = self._take(n)
        finally:
            self.e.student.train(was_training)
        metrics = terminator.end_step() if terminator is not None else {}
        rollout = self._assemble(batch, metrics)
        seconds = time.perf_counter() - start
        rollout.timings = {"total": seconds, "teacher": self.t_time}
        rollout.partial_metrics = self._step_metrics(batch, before, seconds)
        return rollout

    def _admit(self) -> None:
        """Fill free slots with queued prompts; restart the student's sampler after an update."""
        free = (~self.live).nonzero().flatten().tolist()
        new: list[int] = []
        for slot in free:
            if not self.queue:
                self.queue.extend(p.to(self.device) for p in self.prompts())
            if not self.queue:
                break
            self.prompt[slot] = self.queue.popleft()
            new.append(slot)
        contexts = []
        if self.student_stale:  # a new sampler with the current weights, carried rows first
            self.student = self.e.backend.begin_slots(self.e.sampling)
            contexts = [
                torch.cat([self.prompt[s], self.buf["tokens"][s, : int(self.length[s])]])
                for s in self.rows.tolist()
            ]
            self.student_stale = False
        if new:
            self._start_rows(new)
            contexts += [self.prompt[s] for s in new]
        if contexts:
            self.student.add(contexts)

    def _start_rows(self, new: list[int]) -> None:
        """Reset slots ``new`` (their prompts set) for their new rows; the teacher takes them."""
        index = torch.tensor(new, dtype=torch.long)
        terminator = self.e.terminator
        caps = (
            terminator.admit(index, self.width, self.generator)
            if terminator is not None
            else torch.full((len(new),), self.width, dtype=torch.long)
        )
        slots = index.to(self.device)
        self.limit[slots] = caps.to(self.device).clamp(max=self.width)
        self.length[slots], self.cut[slots] = 0, -1
        for name, tensor in self.buf.items():
            tensor[slots] = _fill(name, self.e.pad_token_id)
        self.born[index], self.live[index] = self.version, True
        for slot in new:
            self.reason[slot] = ""
        self.teacher.add([self.prompt[s] for s in new])
        self.rows = torch.cat([self.rows, slots])

    # ------------------------------------------------------------------ chunk
    def _chunk(self, generator: torch.Generator | None) -> None:
        """Sample up to ``score_every`` tokens per live row, score them, apply the rule."""
        rows, c = self.rows, self.e.score_every
        start = self.length[rows].clone()
        sample = self.student.sample(c, self.limit[rows] - start, generator)
        counts = sample.counts
        valid = torch.arange(c, device=self.device)[None, :] < counts[:, None]
        cols = (start[:, None] + torch.arange(c, device=self.device)[None, :])[valid]
        slots = rows[:, None].expand(-1, c)[valid]
        self.buf["tokens"][slots, cols] = sample.tokens[valid]
        self.buf["student_logprobs"][slots, cols] = sample.logprobs[valid]
        self.buf["policy_step"][slots, cols] = self.version
        self.length[rows] += counts
        longest = int(counts.max())
        self.totals["decode_steps"] += longest
        self.totals["slot_steps"] += self.slots * longest
        self.totals["tokens"] += int(counts.sum())
        for i in sample.ended.nonzero().flatten().tolist():
            slot = int(rows[i])
            full = self.length[slot] >= self.width
            self.reason[slot] = (
                STOP_EOS if sample.at_stop[i] else STOP_MAX_TOKENS if full else STOP_TERMINATED
            )
        t0 = time.perf_counter()
        self._score(rows, start, counts, sample.logits)
        fired = self._observe(rows)
        self.t_time += time.perf_counter() - t0
        # rows the rule stopped leave the student (the others that ended left while sampling)
        stopped = torch.isin(rows[~sample.ended], fired)
        if bool(stopped.any()):
            self.student.keep_rows((~stopped).nonzero().flatten())
        done = sample.ended | torch.isin(rows, fired)
        self._finish(rows[done])
        keep = (~done).nonzero().flatten()
        self.teacher.keep_rows(keep)
        self.rows = rows[keep]

    def _score(
        self, rows: torch.Tensor, start: torch.Tensor, counts: torch.Tensor, s_logits: torch.Tensor
    ) -> None:
        """The teacher consumes each row's new tokens; record d_t, log q(y_t), what is kept."""
        c = s_logits.shape[1]
        steps = torch.arange(c, device=self.device)
        valid = steps[None, :] < counts[:, None]
        cols = (start[:, None] + steps[None, :]).clamp(max=self.width - 1)
        tokens = self.buf["tokens"][rows[:, None], cols]
        t_hidden = self.teacher.feed(tokens, valid)
        t_logits = self.teacher.head(t_hidden)
        kl, lq, finite, t_logprobs = score_tokens(s_logits[valid], t_logits[valid], tokens[valid])
        r, p = rows[:, None].expand_as(cols)[valid], cols[valid]
        self.buf["kl"][r, p], self.buf["teacher_logprobs"][r, p] = kl, lq
        self.buf["teacher_finite"][r, p] = finite
        keep = self.e.teacher_keep
        if keep == "hidden":
            self._kept("teacher_hidden", r, p, t_hidden[valid])
        elif keep == "topk":
            k = min(self.e.teacher_topk, t_logits.shape[-1])
            top = t_logprobs.topk(k, dim=-1)
            self._kept("teacher_topk_logprobs", r, p, top.values)
            self._kept("teacher_topk_ids", r, p, top.indices)

    def _kept(self, name: str, r: torch.Tensor, p: torch.Tensor, values: torch.Tensor) -> None:
        if name not in self.buf:
            shape = (self.slots, self.width, values.shape[-1])
            self.buf[name] = values.new_zeros(shape)
        self.buf[name][r, p] = values

    def _observe(self, rows: torch.Tensor) -> torch.Tensor:
        """Run the terminator on the scored rows; return the slots it stopped."""
        terminator = self.e.terminator
        if terminator is None or not terminator.needs_kl:
            return rows[:0]
        lengths = self.length[rows]
        kl = self.buf["kl"][rows, : int(lengths.max())]
        cuts = terminator.observe(rows.cpu(), kl, lengths).to(self.device)
        fired = rows[cuts >= 0]
        self.cut[fired] = cuts[cuts >= 0]
        for slot in fired.tolist():  # as in the sync engine, the rule's stop is the reason
            self.reason[slot] = STOP_TERMINATED
        return fired

    def _finish(self, slots: torch.Tensor, reason: str | None = None) -> None:
        """Copy finished rows out of their slots (in slot order of ``slots``) and free them."""
        if not slots.numel():
            return
        lengths = self.length[slots]
        cut = torch.where(self.cut[slots] >= 0, self.cut[slots], lengths)
        terminator = self.e.terminator
        if terminator is not None:
            kl = self.buf["kl"][slots, : int(lengths.max())]
            cut = terminator.finish(slots.cpu(), cut, kl, lengths).to(self.device)
        for i, slot in enumerate(slots.tolist()):
            length = int(lengths[i])
            if reason is not None:
                self.reason[slot] = reason
            self.finished.append(
                _Finished(
                    prompt=self.prompt[slot],
                    born=int(self.born[slot]),
                    reason=self.reason[slot],
                    kept=int(cut[i]),
                    values={k: v[slot, :length].clone() for k, v in self.buf.items()},
                )
            )
            self.live[slot] = False
            self.prompt[slot] = None

    def _take(self, n: int) -> list[_Finished]:
        """The step's rows: the first ``n`` finishers, later finishers and live rows that the
        staleness bound would exceed at the next step (live ones are ended now)."""
        bound = self.version + 1 - self.max_staleness  # born before this: too stale next step
        batch = [self.finished.popleft() for _ in range(n)]
        waiting = list(self.finished)
        batch += [r for r in waiting if r.born < bound]
        self.finished = deque(r for r in waiting if r.born >= bound)
        stale = self.rows[(self.born[self.rows.cpu()] < bound).to(self.device)]
        if stale.numel():
            keep = (~torch.isin(self.rows, stale)).nonzero().flatten()
            self.student.keep_rows(keep)
            self.teacher.keep_rows(keep)
            self.rows = self.rows[keep]
            self.totals["ended_stale"] += stale.numel()
            mark = len(self.finished)
            self._finish(stale, STOP_STALE)
            batch += [self.finished.pop() for _ in range(len(self.finished) - mark)][::-1]
        return batch

    # ------------------------------------------------------------------ output
    def _assemble(self, batch: list[_Finished], metrics: dict[str, float]) -> Rollout:
        dev, b = self.device, len(batch)
        p_width = max(r.prompt.numel() for r in batch)
        width = max(r.values["tokens"].shape[0] for r in batch)
        prompt_ids = torch.full((b, p_width), self.e.pad_token_id, dtype=torch.long, device=dev)
        prompt_mask = torch.zeros(b, p_width, dtype=torch.long, device=dev)
        out = {
            name: torch.full(
                (b, width, *values.shape[1:]),
                _fill(name, self.e.pad_token_id),
                dtype=values.dtype,
                device=dev,
            )
            for name, values in batch[0].values.items()
        }
        lengths = torch.zeros(b, dtype=torch.long, device=dev)
        for i, r in enumerate(batch):
            p = r.prompt.numel()
            prompt_ids[i, p_width - p :], prompt_mask[i, p_width - p :] = r.prompt, 1
            length = r.values["tokens"].shape[0]
            lengths[i] = length
            for name, values in r.values.items():
                out[name][i, :length] = values
        cut = torch.tensor([r.kept for r in batch], dtype=torch.long, device=dev)
        steps = torch.arange(width, device=dev)
        loss_mask = steps[None, :] < cut[:, None]
        if self.e.masked_token_ids:
            masked = torch.tensor(self.e.masked_token_ids, device=dev)
            loss_mask &= ~torch.isin(out["tokens"], masked)
        n_nonfinite = int((loss_mask & ~out["teacher_finite"]).sum())
        loss_mask &= out["teacher_finite"]
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            tokens=out["tokens"],
            lengths=lengths,
            cut=cut,
            loss_mask=loss_mask,
            student_logprobs=out["student_logprobs"],
            stop_reason=[r.reason for r in batch],
            kl=out["kl"],
            teacher_logprobs=out["teacher_logprobs"],
            teacher_hidden=out.get("teacher_hidden"),
            teacher_topk_logprobs=out.get("teacher_topk_logprobs"),
            teacher_topk_ids=out.get("teacher_topk_ids"),
            n_teacher_nonfinite=n_nonfinite,
            terminator_metrics=metrics,
            policy_step=out["policy_step"],
        )

    def _step_metrics(
        self, batch: list[_Finished], before: dict[str, int], seconds: float
    ) -> dict[str, float]:
        """Staleness histogram (share of the step's rows per staleness), slot occupancy,
        rows carried over and tokens per second of this step's decoding."""
        delta = {k: self.totals[k] - before[k] for k in self.totals}
        staleness = torch.tensor([self.version - r.born for r in batch], dtype=torch.float64)
        metrics = {
            f"partial/staleness_{k}": float((staleness == k).double().mean())
            for k in range(self.max_staleness + 1)
        }
        metrics |= {
            "partial/staleness_mean": float(staleness.mean()),
            "partial/staleness_max": float(staleness.max()),
            "partial/occupancy": delta["tokens"] / delta["slot_steps"]
            if delta["slot_steps"]
            else 0.0,
            "partial/carried": float(self.live_rows() + len(self.finished)),
            "partial/ended_stale": float(delta["ended_stale"]),
            "partial/decode_steps": float(delta["decode_steps"]),
            "partial/tokens": float(delta["tokens"]),
            "partial/tokens_per_s": delta["tokens"] / seconds if seconds > 0 else 0.0,
        }
        return metrics
