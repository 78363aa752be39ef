"""The ``vllm`` student backend: vLLM as the student's sampler, colocated with training
(``rollout.backend: vllm``).

vLLM generates each chunk of ``score_every`` tokens in one call, continuing from the prompt
plus the tokens sampled so far. The engine's full-vocabulary losses and the KL that drives
termination need the student's whole distribution p_t at every generated position, which
vLLM does not return (only top log-probs), and its kernels differ numerically from the
trained model's; so, as verl and TRL do, each chunk is re-scored by the trained student
itself (one incremental no-grad forward over the chunk, with its KV cache). The training
loss therefore sees exactly the distributions of the model it differentiates, and vLLM only
chooses the tokens. Without a teacher (evaluation) only log p(y_t) is needed and vLLM's own
log-probs are used.

After every optimizer step the student's weights are pushed into the engine in place.

Partial rollouts (``rollout.mode: partial``) abort and resubmit at chunk granularity: each
chunk is a fresh request per live row for its prompt + tokens so far, so rows join and leave
between chunks and a row carried over an optimizer step continues with the new weights
(:class:`VLLMSlotSampler`).

Evaluation (``eval.backend: vllm``) samples whole completions instead: ``sample_n`` sends one
request per prompt for all of its k samples. A student has at most one engine
(:meth:`VLLMBackend.serving`), so when training rollouts also use vLLM the evaluator shares
their engine.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from vllm import LLM, SamplingParams

from kat_research.rollout.backends.base import ChunkSample, row_ends
from kat_research.rollout.cached_lm import ChunkScorer, chunk_inputs
from kat_research.rollout.row_cache import RowCache
from kat_research.rollout.types import SamplingConfig

log = logging.getLogger(__name__)

_SEED_RANGE = 2**31 - 1
# The engine serving each student (by id; the entry goes when its backend is collected).
_SERVING: weakref.WeakValueDictionary[int, VLLMBackend] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class VLLMSettings:
    """Arguments of the colocated ``vllm.LLM`` (see ``rollout.vllm`` in ``conf/train.yaml``)."""

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    dtype: str | None = None  # None: the student's dtype
    enable_prefix_caching: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VLLMBackend:
    """Owns a vLLM engine serving a snapshot of the student, kept in sync with its weights.

    The engine starts at the first rollout from the student's weights at that time (saved to
    a temporary folder), so a run resumed from a checkpoint starts from the restored weights.
    Tested with the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); in vLLM's default
    mode the weights are serialized to the engine process at every push.
    """

    def __init__(self, student: PreTrainedModel, settings: VLLMSettings):
        self.student = student
        self.settings = settings
        self._llm: LLM | None = None
        self._snapshot: tempfile.TemporaryDirectory | None = None

    @classmethod
    def serving(cls, student: PreTrainedModel, settings: VLLMSettings) -> VLLMBackend:
        """The backend of ``student``: the one already serving it if any (its engine and its
        settings are kept), else a new one. One engine per student, shared by the training
        rollouts and the evaluator."""
        backend = _SERVING.get(id(student))
        if backend is not None and backend.student is student:
            if backend.settings != settings:
                log.info(
                    "this student is already served by a vLLM engine; sharing it (its settings "
                    "%s are kept, %s ignored)",
                    backend.settings,
                    settings,
                )
            return backend
        backend = cls(student, settings)
        _SERVING[id(student)] = backend
        return backend

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            self._llm = self._start()
        return self._llm

    def _start(self) -> LLM:
        self._snapshot = tempfile.TemporaryDirectory(prefix="kat-vllm-")
        self.student.save_pretrained(self._snapshot.name)
        s = self.settings
        return LLM(
            model=self._snapshot.name,
            skip_tokenizer_init=True,  # the engine exchanges token ids only
            generation_config="vllm",  # no sampling defaults from the checkpoint
            dtype=s.dtype or str(self.student.dtype).removeprefix("torch."),
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_memory_bytes=s.kv_cache_memory_bytes,
            max_model_len=s.max_model_len,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=s.enable_prefix_caching,
            seed=s.seed,
            **s.extra,
        )

    def begin(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        keep_logits: bool,
    ) -> VLLMSampler:
        rescorer = ChunkScorer(self.student) if keep_logits else None
        return VLLMSampler(self.llm, prompt_ids, prompt_mask, sampling, rescorer)

    def begin_slots(self, sampling: SamplingConfig) -> VLLMSlotSampler:
        return VLLMSlotSampler(self.llm, self.student, sampling)

    def sync_weights(self) -> None:
        """Copy the student's current weights into the running engine (no-op before start)."""
        if self._llm is None:
            return
        weights = [(name, t.detach()) for name, t in self.student.state_dict().items()]
        self._llm.collective_rpc(_reload_weights, args=(weights,))
        self._llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights

    def sample_n(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        n: int,
        seeds: Sequence[int],
    ) -> list[list[tuple[list[int], bool]]]:
        """``n`` completions of each prompt, from one request per prompt
        (``SamplingParams(n=n, ...)``, request seed ``seeds[i]``; vLLM derives the samples'
        seeds from it): (generated ids, whether they end on a stop id rather than at
        ``max_new_tokens``).
        Greedy decoding (temperature 0) asks for one completion and repeats it, since vLLM
        takes n > 1 only when sampling (the n greedy completions are identical anyway)."""
        limit = self.llm.model_config.max_model_len
        longest = max(len(p) for p in prompts)
        if longest + sampling.max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={sampling.max_new_tokens} "
                f"exceeds the vLLM engine's max_model_len={limit}: raise max_model_len in the "
                "vLLM settings (eval.vllm, or rollout.vllm when the rollouts' engine is shared)"
            )
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else n,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=seed,
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=True,  # stop only at the configured stop ids, as the HF backend does
                detokenize=False,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for out in outputs:
            samples = []
            for completion in out.outputs:
                ids = list(completion.token_ids)
                budget, reason = sampling.max_new_tokens, completion.finish_reason
                samples.append((ids, _ends_at_stop(ids, budget, sampling, reason)))
            result.append(samples * n if greedy else samples)
        return result


def _ends_at_stop(
    ids: list[int], budget: int, sampling: SamplingConfig, finish_reason: str | None
) -> bool:
    """Whether vLLM's completion of a call for at most ``budget`` tokens ended on a stop id.
    By the row-end rule it must end there or after ``budget`` tokens; anything else means
    vLLM ran into its max_model_len where the HF backend would have continued: an error."""
    stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long)
    ended, at_stop = row_ends(torch.tensor(ids[-1:]), len(ids), budget, stop_ids)
    if not ids or not bool(ended.all()):
        raise RuntimeError(
            f"vLLM stopped a row after {len(ids)} of {budget} tokens ({finish_reason}); "
            "raise max_model_len in the vLLM settings (rollout.vllm or eval.vllm)"
        )
    return bool(at_stop.all())


def _reload_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs in vLLM's worker: load ``weights`` in place, then re-pack a tied output head.

    ``model.load_weights`` after start-up fails on CPU, where weights were re-packed for the
    kernels; the model runner's ``reload_weights`` repeats that processing. A head tied to
    the embeddings is not in the loaded names and keeps its stale packed copy unless it is
    re-processed (measured: logits then drift by tens of nats).
    """
    runner = worker.model_runner
    runner.reload_weights(weights_iterator=iter(weights))
    head = getattr(runner.get_model(), "lm_head", None)
    if head is not None and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def _generate_chunk(
    llm: LLM,
    sequences: list[list[int]],
    remaining: torch.Tensor,
    n_steps: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    keep_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vLLM call continuing every row's ``sequences[i]`` (token ids so far, extended in
    place) by at most ``min(remaining[i], n_steps)`` tokens, request seeds drawn from
    ``generator``: tokens [n, n_steps], counts [n] and log-probs [n, n_steps] (vLLM's own
    log p(y_t) if ``keep_logprobs``, else NaN, for the caller's re-scoring)."""
    device, n = remaining.device, remaining.numel()
    budget = remaining.clamp(max=n_steps).tolist()
    seeds = torch.randint(
        _SEED_RANGE, (n,), generator=generator, device=generator.device if generator else "cpu"
    ).tolist()
    params = [
        SamplingParams(
            max_tokens=b,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,  # stop only at the configured stop tokens, as the HF backend does
            logprobs=0 if keep_logprobs else None,  # 0: the sampled token's only
            detokenize=False,
        )
        for b, seed in zip(budget, seeds, strict=True)
    ]
    prompts = [{"prompt_token_ids": seq} for seq in sequences]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = torch.zeros(n, n_steps, dtype=torch.long, device=device)
    logprobs = torch.full((n, n_steps), float("nan"), device=device)
    counts = torch.zeros(n, dtype=torch.long, device=device)
    for i, out in enumerate(outputs):
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        _ends_at_stop(ids, budget[i], sampling, completion.finish_reason)
        tokens[i, : len(ids)] = torch.tensor(ids, device=device)
        counts[i] = len(ids)
        if keep_logprobs:
            logprobs[i, : len(ids)] = torch.tensor(
                [step[t].logprob for step, t in zip(completion.logprobs, ids, strict=True)],
                device=device,
            )
        sequences[i].extend(ids)
    return tokens, counts, logprobs


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(y_t) [n, C] of ``tokens`` [n, C] under ``logits`` [n, C, V]."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def _chunk_ends(
    tokens: torch.Tensor, counts: torch.Tensor, remaining: torch.Tensor, stop_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-end rule (:func:`row_ends`) applied to each row's last sampled token."""
    last = tokens.gather(1, (counts - 1)[:, None]).squeeze(1)
    return row_ends(last, counts, remaining, stop_ids)


class VLLMSampler:
    """One batch sampled by vLLM, chunk by chunk; rows that stop are not continued."""

    def __init__(
        self,
        llm: LLM,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        rescorer: ChunkScorer | None,
    ):
        self.llm = llm
        self.cfg = sampling
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long).to(prompt_ids)
        self.sequences = [
            ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ]
        self.prompt_mask = prompt_mask
        self.prompt_len = prompt_mask.sum(-1)
        self.rescorer = rescorer
        if rescorer is not None:
            rescorer.prefill(prompt_ids, prompt_mask)

    def sample(
        self,
        start: int,
        n_steps: int,
        remaining: torch.Tensor,
        generator: torch.Generator | None,
    ) -> ChunkSample:
        keep_logprobs = self.rescorer is None
        tokens, counts, logprobs = _generate_chunk(
            self.llm, self.sequences, remaining, n_steps, self.cfg, generator, keep_logprobs
        )
        logits = None
        if self.rescorer is not None:
            logits = self._rescore(tokens, counts, start)
            width = logits.shape[1]
            logprobs[:, :width] = _token_logprobs(logits, tokens[:, :width])
        ended, at_stop = _chunk_ends(tokens, counts, remaining, self.stop_ids)
        self.keep_rows((~ended).nonzero().flatten())
        return ChunkSample(tokens, counts, logprobs, logits, ended, at_stop)

    def _rescore(self, tokens: torch.Tensor, counts: torch.Tensor, start: int) -> torch.Tensor:
        """The trained student's logits [n, max(counts), V] predicting each sampled token."""
        end = start + int(counts.max())
        mask, pos, _ = chunk_inputs(self.prompt_mask, self.prompt_len, start + counts, start, end)
        return self.rescorer.head(self.rescorer.feed(tokens[:, : end - start], mask, pos))

    def keep_rows(self, index: torch.Tensor) -> None:
        if index.numel() == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in index.tolist()]
        self.prompt_mask, self.prompt_len = self.prompt_mask[index], self.prompt_len[index]
        if self.rescorer is not None:
            self.rescorer.keep_rows(index)


class VLLMSlotSampler:
    """Partial rollouts' rows sampled by vLLM, one call per chunk. Every chunk is a new request
    per row continuing its prompt + tokens so far (prefix caching spares recomputing them), so
    a row carried across an optimizer step simply continues with the pushed weights. The
    trained student re-scores each chunk in a :class:`RowCache` of the rows; the driver starts
    a new sampler after each step, which rebuilds that cache with the new weights."""

    def __init__(self, llm: LLM, student: PreTrainedModel, sampling: SamplingConfig):
        self.llm = llm
        self.cfg = sampling
        self.rescorer = RowCache(student)
        device = next(student.parameters()).device
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        self.sequences: list[list[int]] = []

    def add(self, contexts: list[torch.Tensor]) -> None:
        self.sequences += [c.tolist() for c in contexts]
        self.rescorer.add(contexts)

    def sample(
        self, n_steps: int, remaining: torch.Tensor, generator: torch.Generator | None
    ) -> ChunkSample:
        tokens, counts, logprobs = _generate_chunk(
            self.llm, self.sequences, remaining, n_steps, self.cfg, generator, keep_logprobs=False
        )
        width = int(counts.max())
        valid = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
        logits = self.rescorer.head(self.rescorer.feed(tokens[:, :width], valid))
        logprobs[:, :width] = _token_logprobs(logits, tokens[:, :width])
        ended, at_stop = _chunk_ends(tokens, counts, remaining, self.stop_ids)
        self.keep_rows((~ended).nonzero().flatten())
        return ChunkSample(tokens, counts, logprobs, logits, ended, at_stop)

    def keep_rows(self, index: torch.Tensor) -> None:
        if index.numel() == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in index.tolist()]
        self.rescorer.keep_rows(index)
