"""A vLLM engine scoring given sequences: top-k prompt log-probs of their newest positions,
reading the earlier positions from its prefix cache (imports vLLM; the colocated teacher and
the teacher server both use it).

vLLM 0.32 skips the prefix cache for requests that ask for prompt log-probs (its
``skip_reading_prefix_cache`` defaults to True for them: log-probs of cached positions are
not computed). Asking for the cache anyway, the log-probs of positions after the cached ones
are exact (measured: equal to an uncached request) and those of cached positions are garbage.
A request's cache hit reaches its first asked position when the chunk starts on a cache-block
edge (``num_cached_tokens == first``; a fraction ~C/block of chunks). That position is the one
the previous chunk's request decoded its one token at, whose top-k log-probs the engine keeps
(keyed by the sequence, a bounded LRU): it is filled from there when the token there is among
them; otherwise, or when the hit goes further, the request is sent again without the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import LLM, SamplingParams

from kat_research.rollout.teachers.served import RowTopK

NEXT_CACHE_SIZE = 65_536  # sequences whose next-position top-k is kept (~k floats each)


@dataclass(frozen=True)
class EngineSettings:
    """``vllm.LLM`` arguments of a teacher engine (``teacher.vllm.engine`` in conf/train.yaml)."""

    model: str
    dtype: str | None = None  # None: the checkpoint's dtype
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    block_size: int | None = None
    max_logprobs: int = 256  # the largest k a request may ask for (vLLM's default: 20)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VLLMTopKEngine:
    """Scores sequences with a ``vllm.LLM`` (a :class:`~.served.TopKSource`)."""

    def __init__(self, settings: EngineSettings):
        s = settings
        self.llm = LLM(
            model=s.model,
            skip_tokenizer_init=True,  # token ids only
            generation_config="vllm",
            dtype=s.dtype or "auto",
            max_model_len=s.max_model_len,
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_memory_bytes=s.kv_cache_memory_bytes,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=True,
            max_logprobs=s.max_logprobs,
            seed=s.seed,
            **({"block_size": s.block_size} if s.block_size else {}),
            **s.extra,
        )
        self.n_resent = 0  # requests sent again without the cache (see the module docstring)
        self.n_cached = 0  # prompt tokens read from the prefix cache, over all requests
        self.n_filled = 0  # chunks whose first position came from the previous request's decode
        # top-k log-probs at the position after each recent sequence (its request's decode step)
        self._next: OrderedDict[int, dict[int, Any]] = OrderedDict()

    def reset(self) -> None:
        """Forget every cached prefix (benchmarks: repeated runs would otherwise hit whole
        sequences, which no rollout does)."""
        self.llm.reset_prefix_cache()
        self._next.clear()

    def info(self) -> dict[str, int]:
        config = self.llm.llm_engine.vllm_config.model_config
        return {
            "vocab_size": config.get_vocab_size(),
            "max_model_len": config.max_model_len,
            "max_logprobs": config.max_logprobs,
        }

    def score(self, sequences: list[list[int]], first: list[int], k: int) -> list[RowTopK]:
        info = self.info()
        if not 1 <= k <= info["max_logprobs"]:
            raise ValueError(
                f"k={k} log-probs per position: the teacher engine allows 1 to "
                f"{info['max_logprobs']} (teacher.topk; raise teacher.vllm.engine.max_logprobs "
                "or the teacher server's --max-logprobs)"
            )
        limit = info["max_model_len"]
        for seq in sequences:
            if len(seq) + 1 > limit:  # the request also decodes one token
                raise ValueError(
                    f"a sequence of {len(seq)} tokens exceeds the teacher engine's "
                    f"max_model_len={limit}: raise it (teacher.vllm.engine.max_model_len, or "
                    "the teacher server's --max-model-len)"
                )
        outputs = self._generate(sequences, k, cached=True)
        self.n_cached += sum(out.num_cached_tokens or 0 for out in outputs)
        resend = []
        for i, out in enumerate(outputs):
            cached, seq, start = out.num_cached_tokens or 0, sequences[i], first[i]
            if cached < start:
                continue
            known = self._next.get(hash(tuple(seq[:start])))
            if cached == start and known is not None and seq[start] in known:
                out.prompt_logprobs[start] = known
                self.n_filled += 1
            else:
                resend.append(i)
        if resend:
            self.n_resent += len(resend)
            again = self._generate([sequences[i] for i in resend], k, cached=False)
            for i, out in zip(resend, again, strict=True):
                outputs[i] = out
        for seq, out in zip(sequences, outputs, strict=True):
            self._remember(seq, out.outputs[0].logprobs[0])
        return [
            row_topk(out.prompt_logprobs, seq, start, k)
            for out, seq, start in zip(outputs, sequences, first, strict=True)
        ]

    def _remember(self, sequence: list[int], entry: dict[int, Any]) -> None:
        key = hash(tuple(sequence))
        self._next[key] = entry
        self._next.move_to_end(key)
        while len(self._next) > NEXT_CACHE_SIZE:
            self._next.popitem(last=False)

    def _generate(self, sequences: list[list[int]], k: int, cached: bool) -> list[Any]:
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=k,  # of the decoded position: the next chunk's first (raw model log-probs)
            prompt_logprobs=k,
            detokenize=False,
            skip_reading_prefix_cache=not cached,
        )
        prompts = [{"prompt_token_ids": seq} for seq in sequences]
        return self.llm.generate(prompts, params, use_tqdm=False)


def row_topk(prompt_logprobs: list[Any], sequence: list[int], first: int, k: int) -> RowTopK:
    """vLLM's prompt log-probs of positions [first, len) as a :class:`RowTopK`. Each position's
    entry holds the top-k tokens and the sequence's own token (k + 1 entries when it is not
    among them); the k most probable are kept, most probable first."""
    top_lp, top_ids, token_lp = [], [], []
    for position in range(first, len(sequence)):
        entry = prompt_logprobs[position]
        best = sorted(entry.items(), key=lambda item: -item[1].logprob)[:k]
        top_ids.append([token for token, _ in best])
        top_lp.append([lp.logprob for _, lp in best])
        token_lp.append(entry[sequence[position]].logprob)
    return RowTopK(
        topk_logprobs=torch.tensor(top_lp, dtype=torch.float32).view(-1, k),
        topk_ids=torch.tensor(top_ids, dtype=torch.long).view(-1, k),
        token_logprobs=torch.tensor(token_lp, dtype=torch.float32),
    )
