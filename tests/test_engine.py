"""Rollout engine invariants on tiny random-init Qwen3 models, for every student backend
(the ``backend`` fixture: HF decoding, and vLLM in tests marked ``vllm``)."""

from __future__ import annotations

import pytest
import torch

from kat_research.rollout import (
    STOP_EOS,
    STOP_MAX_TOKENS,
    STOP_TERMINATED,
    RolloutEngine,
    SamplingConfig,
    check_head_reproduces_logits,
    prompt_positions,
)
from kat_research.termination import KATTerminator, kat_cut, kat_rule
from kat_research.termination.base import Terminator


class FixedCaps(Terminator):
    """Test rule: a given length cap per row."""

    def __init__(self, caps: list[int]):
        self.caps = torch.tensor(caps)

    def begin_batch(self, batch_size, max_new_tokens, generator=None):
        return self.caps.clamp(max=max_new_tokens)

    def __repr__(self) -> str:
        return f"FixedCaps({self.caps.tolist()})"


class CutRowsOnce(Terminator):
    """Test rule needing the KL: at the first boundary with t >= ``after``, cut ``rows``."""

    needs_kl = True

    def __init__(self, rows: list[int], after: int, at: int):
        self.rows, self.after, self.at = rows, after, at
        self.calls: list[tuple[list[int], int]] = []

    def observe(self, rows, kl, lengths):
        self.calls.append((rows.tolist(), kl.shape[1]))
        fire = torch.isin(rows, torch.tensor(self.rows)) & (lengths >= self.after)
        return torch.where(fire, self.at, -1)

    def __repr__(self) -> str:
        return "CutRowsOnce"


def engine(pair, *, teacher=True, **kwargs) -> RolloutEngine:
    student, teacher_lm = pair
    sampling = kwargs.pop(
        "sampling", SamplingConfig(temperature=1.0, max_new_tokens=12, stop_token_ids=())
    )
    return RolloutEngine(
        student.model,
        teacher_lm.model if teacher else None,
        sampling=sampling,
        pad_token_id=student.tokenizer.pad_token_id,
        **kwargs,
    )


def full_forward_logits(model, rollout, row: int) -> torch.Tensor:
    """Logits predicting each generated token of ``row`` from one uncached forward."""
    ids, mask = rollout.input_ids[row : row + 1], rollout.attention_mask[row : row + 1]
    prompt_width, length = rollout.prompt_ids.shape[1], int(rollout.lengths[row])
    logits = model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask)).logits
    return logits[0, prompt_width - 1 : prompt_width - 1 + length].float()


@pytest.mark.parametrize("score_every", [1, 5, 64])
def test_online_scores_match_uncached_forward(tiny_pair, prompts, score_every, backend):
    student, teacher = tiny_pair
    eng = engine(tiny_pair, backend=backend, score_every=score_every, teacher_keep="hidden")
    r = eng.generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(0))
    for row in range(r.batch_size):
        length = int(r.lengths[row])
        tokens = r.tokens[row, :length, None]
        lp = full_forward_logits(student.model, r, row).log_softmax(-1)
        lq = full_forward_logits(teacher.model, r, row).log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        torch.testing.assert_close(r.kl[row, :length], kl, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r.student_logprobs[row, :length], lp.gather(-1, tokens)[:, 0])
        torch.testing.assert_close(r.teacher_logprobs[row, :length], lq.gather(-1, tokens)[:, 0])
        head = teacher.model.get_output_embeddings()
        torch.testing.assert_close(
            head(r.teacher_hidden[row, :length]).log_softmax(-1), lq, atol=1e-5, rtol=1e-4
        )


def test_topk_kept_matches_teacher_distribution(tiny_pair, prompts, backend):
    student, teacher = tiny_pair
    r = engine(tiny_pair, backend=backend, teacher_keep="topk", teacher_topk=5).generate(
        prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(1)
    )
    lq = full_forward_logits(teacher.model, r, 0).log_softmax(-1)
    top = lq.topk(5, dim=-1)
    torch.testing.assert_close(r.teacher_topk_logprobs[0], top.values, atol=1e-5, rtol=1e-4)
    assert torch.equal(r.teacher_topk_ids[0], top.indices)
    assert r.teacher_hidden is None


def test_masks_and_stop_reasons(tiny_pair, prompts, backend):
    student, _ = tiny_pair
    eos = student.tokenizer.convert_tokens_to_ids("1")
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, stop_token_ids=(eos,))
    caps = [16, 16, 16, 3]
    r = engine(
        tiny_pair, backend=backend, sampling=sampling, terminator=FixedCaps(caps), score_every=4
    ).generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(3))
    pad = student.tokenizer.pad_token_id
    for row, reason in enumerate(r.stop_reason):
        length = int(r.lengths[row])
        gen = r.tokens[row, :length]
        assert (r.tokens[row, length:] == pad).all()
        assert r.loss_mask[row, length:].sum() == 0
        assert r.loss_mask[row, :length].all()  # no rule cut and the teacher is finite
        assert int(r.cut[row]) == length
        if reason == STOP_EOS:
            assert gen[-1] == eos and (gen[:-1] != eos).all()
        elif reason == STOP_MAX_TOKENS:
            assert length == 16 and (gen != eos).all()
        else:
            assert reason == STOP_TERMINATED and length == caps[row]
    assert r.stop_reason[3] in (STOP_TERMINATED, STOP_EOS)
    # prompt tokens are never in the loss
    prompt_width = r.prompt_ids.shape[1]
    assert not r.sequence_loss_mask[:, :prompt_width].any()
    assert r.sequence_loss_mask.shape == r.input_ids.shape == r.attention_mask.shape
    assert sum(r.stop_counts().values()) == r.batch_size


def test_greedy_tokens_do_not_depend_on_neighbours_stopping(tiny_pair, prompts, backend):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=20)
    full = engine(tiny_pair, backend=backend, sampling=greedy, score_every=3).generate(
        prompts.input_ids, prompts.attention_mask
    )
    compacted = engine(
        tiny_pair,
        backend=backend,
        sampling=greedy,
        score_every=3,
        terminator=FixedCaps([2, 20, 7, 1]),
    ).generate(prompts.input_ids, prompts.attention_mask)
    assert compacted.lengths.tolist() == [2, 20, 7, 1]
    for row in range(4):
        length = int(compacted.lengths[row])
        assert torch.equal(compacted.tokens[row, :length], full.tokens[row, :length])
        torch.testing.assert_close(compacted.kl[row, :length], full.kl[row, :length])


def test_greedy_row_matches_row_decoded_alone(tiny_pair, prompts, backend):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    batch = engine(tiny_pair, backend=backend, sampling=greedy).generate(
        prompts.input_ids, prompts.attention_mask
    )
    real = prompts.attention_mask[1].bool()
    alone = engine(tiny_pair, backend=backend, sampling=greedy).generate(
        prompts.input_ids[1:2, real], prompts.attention_mask[1:2, real]
    )
    assert torch.equal(alone.tokens[0], batch.tokens[1, : alone.tokens.shape[1]])


def test_seed_reproducibility(tiny_pair, prompts, backend):
    eng = engine(tiny_pair, backend=backend)
    a = eng.generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(7))
    b = eng.generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(7))
    c = eng.generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.kl, b.kl)
    assert not torch.equal(a.tokens, c.tokens)


def test_without_teacher(tiny_pair, prompts, backend):
    r = engine(tiny_pair, backend=backend, teacher=False).generate(
        prompts.input_ids, prompts.attention_mask
    )
    assert r.kl is None and r.teacher_logprobs is None and r.teacher_hidden is None
    assert r.loss_mask.sum() == r.lengths.sum()
    with pytest.raises(ValueError, match="needs the teacher"):
        engine(tiny_pair, backend=backend, teacher=False, terminator=CutRowsOnce([0], 1, 0))


def test_terminator_cuts_at_chunk_boundary_and_stops_row(tiny_pair, prompts, backend):
    rule = CutRowsOnce(rows=[1, 2], after=6, at=2)
    r = engine(tiny_pair, backend=backend, terminator=rule, score_every=3).generate(
        prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(0)
    )
    assert r.stop_reason[1] == r.stop_reason[2] == STOP_TERMINATED
    assert r.lengths[1] == r.lengths[2] == 6  # stopped at the boundary where the rule fired
    assert r.cut[1] == r.cut[2] == 2
    assert r.loss_mask[1].sum() == 2 and not r.loss_mask[1, 2:].any()
    assert r.lengths[0] == r.lengths[3] == 12 and r.cut[0] == 12
    # boundaries every 3 tokens; rows 1 and 2 are not observed after they fired
    assert [t for _, t in rule.calls] == [3, 6, 9, 12]
    assert rule.calls[2][0] == [0, 3]


def test_masked_token_ids_leave_the_loss(tiny_pair, prompts, backend):
    student, _ = tiny_pair
    r = engine(
        tiny_pair, backend=backend, sampling=SamplingConfig(temperature=0.0, max_new_tokens=8)
    ).generate(prompts.input_ids, prompts.attention_mask)
    token = int(r.tokens[0, 0])
    masked = engine(
        tiny_pair,
        backend=backend,
        sampling=SamplingConfig(temperature=0.0, max_new_tokens=8),
        masked_token_ids=[token],
    ).generate(prompts.input_ids, prompts.attention_mask)
    assert torch.equal(masked.loss_mask, r.loss_mask & (r.tokens != token))


def test_nonfinite_teacher_positions_are_masked_and_counted(tiny_pair, prompts, backend):
    student, teacher = tiny_pair
    poison = student.tokenizer.convert_tokens_to_ids("=")
    embed = teacher.model.get_input_embeddings()

    def nan_after_poison(module, args, output):
        return output.masked_fill((args[0] == poison)[..., None], float("nan"))

    handle = embed.register_forward_hook(nan_after_poison)
    try:
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)
        r = engine(tiny_pair, backend=backend, sampling=sampling, score_every=2).generate(
            prompts.input_ids, prompts.attention_mask
        )
    finally:
        handle.remove()
    # prompt 0 ("1+2=") contains the poisoned token: every teacher position of row 0 is NaN
    assert torch.isnan(r.kl[0]).all() and not r.loss_mask[0].any()
    assert torch.isfinite(r.kl[2]).all() and r.loss_mask[2].all()
    assert r.n_teacher_nonfinite == int(torch.isnan(r.kl).sum())


def test_head_check_rejects_postprocessed_logits(tiny_pair):
    student, _ = tiny_pair

    class SoftCapped(type(student.model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    capped = SoftCapped(student.model.config)
    with pytest.raises(ValueError, match="post-processes its logits"):
        check_head_reproduces_logits(capped, "capped")
    check_head_reproduces_logits(student.model, "student")


def test_invalid_settings():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


@pytest.mark.parametrize("score_every", [None, 1, 3, 7])
def test_online_kat_matches_offline_kat_cut(tiny_pair, char_tokenizer, score_every, backend):
    enc = char_tokenizer(
        [f"{a}*{a + 3}-7=" for a in range(10, 26)], return_tensors="pt", padding=True
    )
    probe = engine(tiny_pair, backend=backend).generate(
        enc.input_ids, enc.attention_mask, torch.Generator().manual_seed(0)
    )
    threshold = float(probe.kl[probe.gen_mask].median())
    settings = dict(window=4, stride=2, patience=2, exempt=1)
    rule = KATTerminator(kat_rule(**settings, threshold=threshold))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24)
    eng = engine(
        tiny_pair, backend=backend, sampling=sampling, terminator=rule, score_every=score_every
    )
    assert eng.score_every == (score_every or 2)  # default: the KAT stride
    r = eng.generate(enc.input_ids, enc.attention_mask, torch.Generator().manual_seed(0))
    n_cut = 0
    for row in range(r.batch_size):
        length = int(r.lengths[row])
        offline = kat_cut(r.kl[row, :length], kat_rule(threshold=threshold, **settings))
        if offline is None:
            assert r.stop_reason[row] == STOP_MAX_TOKENS and int(r.cut[row]) == length
        else:
            n_cut += 1
            assert r.stop_reason[row] == STOP_TERMINATED and int(r.cut[row]) == offline
            assert int(r.loss_mask[row].sum()) == offline
            # detection point lies in the last scored chunk: nothing past that chunk was made
            detection = offline + 4 + (2 - 1) * 2
            assert length - detection < eng.score_every
    assert 0 < n_cut < r.batch_size
    assert r.terminator_metrics["kat/cut_rows"] == n_cut


def test_unknown_backend_is_a_clear_error(tiny_pair):
    from kat_research.lit import RolloutSettings
    from kat_research.rollout import build_backend

    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'; valid: hf, vllm"):
        build_backend("sglang", tiny_pair[0].model)
    with pytest.raises(ValueError, match="unknown rollout.backend 'sglang'"):
        RolloutSettings(backend="sglang")


def test_vllm_backend_without_vllm_says_how_to_install(tiny_pair, monkeypatch):
    import sys

    from kat_research.rollout import build_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # as in an environment without vLLM
    monkeypatch.delitem(sys.modules, "kat_research.rollout.backends.vllm", raising=False)
    with pytest.raises(ImportError, match="make install-vllm"):
        build_backend("vllm", tiny_pair[0].model)


def test_row_end_rule():
    from kat_research.rollout.backends import row_ends

    last = torch.tensor([5, 9, 5, 2])
    count = torch.tensor([3, 4, 4, 1])
    cap = torch.tensor([8, 4, 4, 6])
    ended, at_stop = row_ends(last, count, cap, stop_ids=torch.tensor([5, 7]))
    # row 0: stop token before its cap; 1: cap; 2: stop token at its cap; 3: neither
    assert ended.tolist() == [True, True, True, False]
    assert at_stop.tolist() == [True, False, True, False]
    ended, at_stop = row_ends(last, count, cap, stop_ids=torch.tensor([], dtype=torch.long))
    assert ended.tolist() == [False, True, True, False] and not at_stop.any()


def test_benchmark_workloads_cap_a_share_of_rows_and_time_side_by_side():
    from kat_research.rollout.workloads import StopShareEarly
    from kat_research.runtime import interleaved

    assert StopShareEarly(0.5, 0.25).begin_batch(4, 16).tolist() == [4, 4, 16, 16]
    assert StopShareEarly(1.0, 0.0).begin_batch(2, 16).tolist() == [1, 1]  # at least one token
    calls = []
    seconds = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert set(seconds) == {"a", "b"} and calls == ["a", "b", "a", "b", "a", "b"]


def test_arithmetic_prompts_are_seeded(char_tokenizer):
    from kat_research.rollout.workloads import arithmetic_prompts

    ids, mask = arithmetic_prompts(char_tokenizer, 3, seed=1)
    again, _ = arithmetic_prompts(char_tokenizer, 3, seed=1)
    assert ids.shape[0] == 3 and torch.equal(ids, again) and mask.shape == ids.shape
