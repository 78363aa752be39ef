"""The ``hf`` student backend: the trained model itself decodes, one token per forward, with
its KV cache (a batch's rows, or partial rollouts' rows at their own depths)."""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, PreTrainedModel

from kat_research.rollout.backends.base import ChunkSample, row_ends
from kat_research.rollout.cached_lm import CachedLM, prompt_positions
from kat_research.rollout.lean_decode import (
    LeanDecoder,
    LeanModel,
    lean_decode_mismatch,
    lean_unsupported,
)
from kat_research.rollout.row_cache import RowCache
from kat_research.rollout.sampling import sample_next_token
from kat_research.rollout.types import SamplingConfig

log = logging.getLogger(__name__)
# largest relative |logit| difference from transformers' forward that lean decoding may show
LEAN_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
LEAN_TOLERANCE_HALF = 1e-2  # bfloat16 / float16: kernels may round differently


class HFBackend:
    """The student itself decodes, one token per forward, with its KV cache.

    ``lean``: decode steps run through :class:`LeanDecoder` (the same operations as
    transformers' modules without their per-call overhead) where the student's architecture
    allows it and, checked once before the first rollout, its logits match transformers'
    forward (:func:`lean_decode_mismatch`); otherwise, or with ``lean=False``, transformers'
    forward decodes."""

    def __init__(self, student: PreTrainedModel, lean: bool = True):
        self.student = student
        self.lean = lean
        self.lean_checked = not lean  # lean=False: nothing to check

    def begin(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        keep_logits: bool,
    ) -> HFSampler:
        self._check_lean()
        return HFSampler(self.student, prompt_ids, prompt_mask, sampling, keep_logits, self.lean)

    def _check_lean(self) -> None:
        if not self.lean_checked:
            self.lean = self._lean_works()
            self.lean_checked = True

    def _lean_works(self) -> bool:
        """Whether lean decoding runs this student (said once on the console), checked on two
        probe prompts of 6 tokens, one left-padded by 2."""
        reason = lean_unsupported(self.student)
        if reason is not None:
            log.info(
                "the student decodes through transformers' forward: lean decoding does not "
                "support %s",
                reason,
            )
            return False
        device = self.student.get_output_embeddings().weight.device
        dtype = self.student.get_output_embeddings().weight.dtype
        if torch.is_autocast_enabled(device.type):  # matmuls run in the autocast dtype
            dtype = torch.get_autocast_dtype(device.type)
        tolerance = LEAN_TOLERANCE.get(dtype, LEAN_TOLERANCE_HALF)
        probe = torch.arange(1, 13, device=device).view(2, 6) % self.student.config.vocab_size
        probe_mask = torch.ones_like(probe)
        probe_mask[1, :2] = 0
        was_training = self.student.training
        self.student.eval()  # as it decodes (no dropout)
        try:
            mismatch = lean_decode_mismatch(self.student, probe, probe_mask)
        except (AttributeError, TypeError, RuntimeError) as error:  # another transformers layout
            log.warning(
                "the student decodes through transformers' forward: lean decoding failed on "
                "probe prompts (%s: %s); in training rollout.lean_decode=false skips this check",
                type(error).__name__,
                error,
            )
            return False
        finally:
            self.student.train(was_training)
        if mismatch > tolerance:
            log.warning(
                "the student decodes through transformers' forward: lean decoding's logits "
                "differ from it by %.3g (relative, tolerance %.0e for %s) on probe prompts; "
                "in training rollout.lean_decode=false skips this check",
                mismatch,
                tolerance,
                dtype,
            )
            return False
        log.info(
            "the student decodes with lean decode steps (logits checked against "
            "transformers' forward: largest relative difference %.3g)",
            mismatch,
        )
        return True

    def begin_slots(self, sampling: SamplingConfig) -> HFSlotSampler:
        self._check_lean()
        return HFSlotSampler(self.student, sampling, self.lean)

    def sync_weights(self) -> None:
        """Nothing to do: sampling runs on the trained module itself."""


class _TokenByToken:
    """The chunk loop of both HF samplers: one token per forward for every live row until it
    ends (:func:`row_ends`), outputs written column by column. Subclasses give the logits
    predicting the live rows' next token (feeding ``pending``, the token sampled last) and
    drop rows."""

    cfg: SamplingConfig
    keep_logits: bool
    stop_ids: torch.Tensor
    pending: torch.Tensor | None

    def _next_logits(self, position: int) -> torch.Tensor:
        """Logits [n_live, V] predicting the live rows' token at generated ``position``."""
        raise NotImplementedError

    def keep_rows(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def _decode(
        self,
        start: int,
        n_steps: int,
        remaining: torch.Tensor,
        generator: torch.Generator | None,
    ) -> ChunkSample:
        n = remaining.numel()
        device = remaining.device
        tokens = torch.zeros(n, n_steps, dtype=torch.long, device=device)
        logprobs = torch.full((n, n_steps), float("nan"), device=device)
        counts = torch.full((n,), n_steps, dtype=torch.long, device=device)  # ended rows: less
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        at_stop = torch.zeros(n, dtype=torch.bool, device=device)
        logits_out = None
        live = slice(None)  # chunk rows still decoding: all of them until one ends, then indices
        for j in range(n_steps):
            logits = self._next_logits(start + j)
            if logits_out is None and self.keep_logits:
                logits_out = logits.new_empty((n, n_steps, logits.shape[-1]))
            new = sample_next_token(
                logits, temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=generator
            )
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, new[:, None]).squeeze(-1)
            tokens[live, j], logprobs[live, j] = new, lp
            if logits_out is not None:
                logits_out[live, j] = logits
            ends, stops = row_ends(new, j + 1, remaining, self.stop_ids)
            self.pending = new
            if not bool(ends.any()):
                continue
            rows = torch.arange(n, device=device)[live]
            counts[rows[ends]], ended[rows], at_stop[rows] = j + 1, ends, stops
            keep = (~ends).nonzero().flatten()
            live, remaining = rows[keep], remaining[keep]
            self.keep_rows(keep)
            if live.numel() == 0:
                break
        return ChunkSample(tokens, counts, logprobs, logits_out, ended, at_stop)


class HFSampler(_TokenByToken):
    """KV-cache decoding of one batch. The token sampled last in a chunk is fed at the start
    of the next chunk, so rows the terminator stops in between cost no forward.

    Decoding runs under ``torch.inference_mode`` (nothing it makes is back-propagated; the
    same kernels, less autograd bookkeeping per op), and a decode step does only what the
    sampled tokens need: the attention mask is one buffer sliced per step, and the chunk's
    outputs are written column by column until a row ends. The prompt is prefilled by
    transformers' forward; with ``lean`` the decode steps then run through
    :class:`LeanDecoder` (the caller has checked that it reproduces transformers' logits)."""

    def __init__(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        keep_logits: bool,
        lean: bool = False,
    ):
        self.lm = CachedLM(model)
        self.cfg = sampling
        self.keep_logits = keep_logits
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long).to(prompt_ids)
        self.prompt_len = prompt_mask.sum(-1)
        self.width = prompt_mask.shape[1]
        # the prompts' mask followed by every generated position: step t attends to [: P + t]
        self.mask = torch.cat(
            [prompt_mask, prompt_mask.new_ones(len(prompt_mask), sampling.max_new_tokens)], 1
        )
        with torch.inference_mode():
            hidden = self.lm.forward(prompt_ids, prompt_mask, prompt_positions(prompt_mask))
            self.logits: torch.Tensor | None = self.lm.head(hidden[:, -1])
        self.lean = None
        if lean:  # the decoder takes over the prompt's cache; transformers' object lets go of it
            self.lean = LeanDecoder(model, self.lm.cache, self.mask, self.mask.shape[1])
            self.lm.cache = DynamicCache()
        self.pending: torch.Tensor | None = None  # last sampled tokens, not yet fed

    @torch.inference_mode()
    def sample(
        self,
        start: int,
        n_steps: int,
        remaining: torch.Tensor,
        generator: torch.Generator | None,
    ) -> ChunkSample:
        return self._decode(start, n_steps, remaining, generator)

    def _next_logits(self, position: int) -> torch.Tensor:
        """Logits predicting generated token ``position`` of the live rows."""
        if self.pending is not None:  # feed generated token position-1
            pos = self.prompt_len + position - 1
            if self.lean is not None:
                hidden = self.lean.step(self.pending, pos)
            else:
                mask = self.mask[:, : self.width + position]
                hidden = self.lm.forward(self.pending[:, None], mask, pos[:, None])[:, -1]
            self.logits, self.pending = self.lm.head(hidden), None
        return self.logits

    def keep_rows(self, index: torch.Tensor) -> None:
        if self.pending is not None:
            self.pending = self.pending[index]
        if index.numel() == self.mask.shape[0]:
            return
        self.mask, self.prompt_len = self.mask[index], self.prompt_len[index]
        if self.lean is not None:
            self.lean.keep_rows(index)
        else:
            self.lm.keep_rows(index)


class HFSlotSampler(_TokenByToken):
    """Partial rollouts' rows decoded by the student, one token per forward, in a
    :class:`RowCache` (rows join and leave at their own depths). As in :class:`HFSampler`, the
    token sampled last is fed only when the next one is needed, so rows stopped in between
    cost no forward. Runs under the caller's ``torch.no_grad`` (its cache outlives a chunk)."""

    def __init__(self, model: PreTrainedModel, sampling: SamplingConfig, lean: bool = False):
        self.model, self.lean = model, lean
        self.cache = RowCache(model)
        self.cfg = sampling
        self.keep_logits = True  # the driver always scores with a teacher
        device = next(model.parameters()).device
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        self.pending: torch.Tensor | None = None  # last sampled tokens, not yet fed

    def add(self, contexts: list[torch.Tensor]) -> None:
        if self.pending is not None:  # the cache has to be current before rows join
            self._read_weights()
            self._feed_pending()
        self.cache.add(contexts)

    def sample(
        self, n_steps: int, remaining: torch.Tensor, generator: torch.Generator | None
    ) -> ChunkSample:
        self._read_weights()
        return self._decode(0, n_steps, remaining, generator)  # rows keep their own positions

    def _read_weights(self) -> None:
        """Lean decoding reads the student's weights now (they change between steps)."""
        if self.lean:
            self.cache.lean = LeanModel(self.model)

    def _next_logits(self, position: int) -> torch.Tensor:
        if self.pending is not None:
            self._feed_pending()
        return self.cache.head(self.cache.next_hidden)

    def _feed_pending(self) -> None:
        ones = torch.ones_like(self.pending[:, None], dtype=torch.bool)
        self.cache.feed(self.pending[:, None], ones)
        self.pending = None

    def keep_rows(self, index: torch.Tensor) -> None:
        if self.pending is not None:
            self.pending = self.pending[index] if index.numel() else None
        self.cache.keep_rows(index)
