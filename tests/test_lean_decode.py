"""Lean decode steps against transformers' own forward (the oracle): the same logits, step by
step, for Llama, Qwen2 (biased projections) and Qwen3 (per-head norms), left-padded prompts,
rows dropped mid-way and a cache that grows; the backend's check and its fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kat_research.rollout import RolloutEngine, SamplingConfig, row_cache
from kat_research.rollout import lean_decode as lean_module
from kat_research.rollout.backends import hf as hf_backend
from kat_research.rollout.backends.hf import HFBackend
from kat_research.rollout.cached_lm import CachedLM, prompt_positions
from kat_research.rollout.lean_decode import LeanDecoder, lean_decode_mismatch, lean_unsupported
from kat_research.rollout.partial import PartialRollouts

VOCAB = 97
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, norms included (their init is all ones, which hides mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (p == 1).float())
    return model.eval()


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **SIZES))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SIZES))
    return _randomised(model, seed=1)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 5, 3 and 1 tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [0, 0, 0, 0, 14]])
    return ids, (ids != 0).long()


def full_forward_logits(model, rows: list[torch.Tensor]) -> torch.Tensor:
    """The oracle: each row's whole sequence through transformers' forward, no cache; the
    logits after its last token."""
    return torch.stack([model(input_ids=row[None]).logits[0, -1] for row in rows])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_steps_give_transformers_logits(kind, monkeypatch):
    monkeypatch.setattr(lean_module, "CACHE_BLOCK", 2)  # the cache grows several times
    model = tiny(kind)
    assert lean_unsupported(model) is None
    ids, mask = prompts()
    steps = 7
    with torch.inference_mode():
        lm = CachedLM(model)
        hidden = lm.forward(ids, mask, prompt_positions(mask))[:, -1]
        full_mask = torch.cat([mask, torch.ones(3, steps, dtype=torch.long)], 1)
        lean = LeanDecoder(model, lm.cache, full_mask, ids.shape[1] + steps)
        rows = [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
        alive = torch.arange(3)
        head = model.get_output_embeddings()
        for t in range(steps):
            expected = full_forward_logits(model, [rows[i] for i in alive.tolist()])
            torch.testing.assert_close(head(hidden), expected, atol=1e-5, rtol=1e-5)
            tokens = (17 * t + 3 * alive + 1) % VOCAB
            for i, token in zip(alive.tolist(), tokens, strict=True):
                rows[i] = torch.cat([rows[i], token[None]])
            hidden = lean.step(tokens, mask[alive].sum(-1) + t)
            if t == 3:  # the middle row ends
                keep = torch.tensor([0, 2])
                lean.keep_rows(keep)
                alive, hidden = alive[keep], hidden[keep]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_steps_equal_the_cached_forward_bit_for_bit(kind):
    ids, mask = prompts()
    assert lean_decode_mismatch(tiny(kind), ids, mask, steps=6) == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training under bf16 autocast runs
        assert lean_decode_mismatch(tiny(kind), ids, mask, steps=6) == 0.0


def test_other_architectures_and_wrapped_projections_are_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in lean_unsupported(gpt2)
    model = tiny("llama")

    class Adapter(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    model.model.layers[1].self_attn.q_proj = Adapter(model.model.layers[1].self_attn.q_proj)
    assert "Adapter projections" in lean_unsupported(model)


def engine_rollout(model, lean: bool, seed: int = 3):
    engine = RolloutEngine(
        model,
        sampling=SamplingConfig(1.0, 1.0, 12, (96,)),
        pad_token_id=0,
        backend=HFBackend(model, lean=lean),
    )
    ids, mask = prompts()
    return engine, engine.generate(ids, mask, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_lean_rollout_samples_what_transformers_forward_samples(kind, caplog):
    model = tiny(kind)
    with caplog.at_level(logging.INFO, logger=hf_backend.__name__):
        engine, lean = engine_rollout(model, lean=True)
    assert engine.backend.lean and "lean decode steps" in caplog.text
    _, reference = engine_rollout(model, lean=False)
    assert torch.equal(lean.tokens, reference.tokens)
    assert torch.equal(lean.student_logprobs.nan_to_num(), reference.student_logprobs.nan_to_num())


def test_a_mismatch_falls_back_to_transformers_forward_and_says_so(monkeypatch, caplog):
    model = tiny("qwen3")
    monkeypatch.setattr(hf_backend, "lean_decode_mismatch", lambda *a, **k: 0.5)
    with caplog.at_level(logging.WARNING, logger=hf_backend.__name__):
        engine, fallback = engine_rollout(model, lean=True)
    assert not engine.backend.lean
    assert (
        "differ from it by 0.5" in caplog.text and "rollout.lean_decode=false skips" in caplog.text
    )
    _, reference = engine_rollout(model, lean=False)
    assert torch.equal(fallback.tokens, reference.tokens)


def partial_batches(student, teacher, lean: bool, seed: int = 5) -> list:
    """Three partial-rollout batches of 3 rows from 4 slots, weights changed between them."""
    engine = RolloutEngine(
        student,
        teacher,
        sampling=SamplingConfig(1.0, 1.0, 10, (96,)),
        pad_token_id=0,
        score_every=3,
        teacher_keep="none",
        backend=HFBackend(student, lean=lean),
    )
    counter = iter(range(1000))

    def prompts() -> list[torch.Tensor]:
        return [torch.arange(1, 3 + next(counter) % 4) * 7 % VOCAB for _ in range(4)]

    driver = PartialRollouts(engine, slots=4, max_staleness=2, prompts=prompts)
    generator = torch.Generator().manual_seed(seed)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    batches = []
    try:
        for step in range(3):
            batches.append(driver.next_batch(3, generator))
            with torch.no_grad():  # an optimizer step: every weight moves, in place
                for p in student.parameters():
                    p.mul_(1.0 + 0.01 * (step + 1))
            driver.weights_updated()
        assert (driver.student.cache.lean is not None) == lean
    finally:
        student.load_state_dict(original)
    return batches


@pytest.mark.parametrize("block", [64, 2])
def test_partial_rollouts_decode_the_same_tokens_with_lean_steps(block, monkeypatch):
    """Rows that join and leave a shared cache at their own depths (RowCache) and continue
    across weight updates sample the same tokens with lean steps as through transformers,
    whether the cache's spare columns outlast rows joining (64) or grow every other step (2)."""
    monkeypatch.setattr(row_cache, "CACHE_BLOCK", block)
    student, teacher = tiny("qwen3"), tiny("llama")
    lean = partial_batches(student, teacher, lean=True)
    reference = partial_batches(student, teacher, lean=False)
    for a, b in zip(lean, reference, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.policy_step, b.policy_step)


def test_a_lean_step_that_fails_falls_back_and_says_why(monkeypatch, caplog):
    def missing_attribute(*args, **kwargs):
        raise AttributeError("'Qwen3Attention' object has no attribute 'scaling'")

    monkeypatch.setattr(hf_backend, "lean_decode_mismatch", missing_attribute)
    model = tiny("qwen3")
    with caplog.at_level(logging.WARNING, logger=hf_backend.__name__):
        engine, fallback = engine_rollout(model, lean=True)
    assert not engine.backend.lean and "AttributeError" in caplog.text
    _, reference = engine_rollout(model, lean=False)
    assert torch.equal(fallback.tokens, reference.tokens)


def test_the_check_runs_the_student_as_it_decodes_and_restores_its_mode(monkeypatch):
    """Partial rollouts make the check before the driver puts the student in eval mode."""
    model = tiny("qwen3").train()
    seen = []
    monkeypatch.setattr(
        hf_backend, "lean_decode_mismatch", lambda m, *a, **k: seen.append(m.training) or 0.0
    )
    backend = HFBackend(model)
    backend.begin_slots(SamplingConfig(1.0, 1.0, 4, ()))
    assert seen == [False] and model.training and backend.lean
