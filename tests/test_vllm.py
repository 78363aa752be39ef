"""What only the vLLM backend does: pushing the student's weights into the running engine, and
OPD training with vLLM rollouts, synchronous and partial (the backend-agnostic engine and
partial-rollout tests are in test_engine.py and test_partial_rollouts.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import VLLM_TEST_SETTINGS

from kat_research.models import load_causal_lm
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.training.job import train

pytestmark = pytest.mark.vllm


def vllm_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """vLLM's log p(ids[t] | ids[:t]) for t >= 1 (prompt scoring)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return torch.tensor(
        [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    )


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_weight_sync_reaches_the_next_rollouts(tiny_dirs, char_tokenizer):
    from kat_research.rollout.backends.vllm import VLLMBackend, VLLMSettings

    student = load_causal_lm(tiny_dirs["student"]).model
    backend = VLLMBackend(student, VLLMSettings(**VLLM_TEST_SETTINGS))
    # longer than a KV-cache block, so a stale prefix cache would be reused after the update
    text = "".join(f"{a}*{a + 3}-7=" for a in range(10, 30))
    ids = char_tokenizer(text).input_ids[:200]
    enc = char_tokenizer([text[:150], text[:140]], return_tensors="pt", padding=True)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)

    def rollout(backend=None) -> torch.Tensor:
        eng = RolloutEngine(
            student, sampling=greedy, pad_token_id=char_tokenizer.pad_token_id, backend=backend
        )
        return eng.generate(enc.input_ids, enc.attention_mask).tokens

    before = vllm_logprobs(backend.llm, ids)
    torch.testing.assert_close(before, hf_logprobs(student, ids), atol=1e-4, rtol=1e-4)
    tokens_before = rollout(backend)
    assert torch.equal(tokens_before, rollout())

    with torch.no_grad():  # a large update of every weight, the tied embedding/head included
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    updated = hf_logprobs(student, ids)
    assert (updated - before).abs().max() > 0.5
    torch.testing.assert_close(vllm_logprobs(backend.llm, ids), before)  # not synced yet

    backend.sync_weights()
    torch.testing.assert_close(vllm_logprobs(backend.llm, ids), updated, atol=1e-4, rtol=1e-4)
    tokens_after = rollout(backend)
    assert torch.equal(tokens_after, rollout())  # vLLM samples what the updated student would
    assert not torch.equal(tokens_after, tokens_before)


@pytest.mark.parametrize("mode", ["sync", "partial"])
def test_opd_trains_with_vllm_rollouts_like_hf(debug_config, tmp_path, monkeypatch, mode):
    """Greedy rollouts make both backends sample the same tokens, so the two runs log the same
    losses, in partial mode too (the same rows finish first, carried rows continue from the
    same tokens with the updated weights); after each optimizer step the engine is out of date
    until the weights are pushed, then it scores like the trained student."""
    from kat_research.rollout.backends.vllm import VLLMBackend

    probe = list(range(4, 60))
    gaps: list[tuple[float, float]] = []  # (before, after) the push, per optimizer step
    push = VLLMBackend.sync_weights

    def checked_push(self):
        before = (vllm_logprobs(self.llm, probe) - hf_logprobs(self.student, probe)).abs().max()
        push(self)
        after = (vllm_logprobs(self.llm, probe) - hf_logprobs(self.student, probe)).abs().max()
        gaps.append((float(before), float(after)))

    monkeypatch.setattr(VLLMBackend, "sync_weights", checked_push)
    overrides = [
        "method=kat",
        "logger=csv",
        "rollout.temperature=0",
        "model.student.num_heads=1",  # head size 32, the smallest vLLM's CPU kernels take
        "model.student.num_kv_heads=1",
        f"rollout.mode={mode}",
        "rollout.max_staleness=1",
        "trainer.max_steps=3",  # KAT cuts from step 1 on, so rows finish apart and carry over
    ]
    vllm = [f"rollout.vllm.{k}={v}" for k, v in VLLM_TEST_SETTINGS.items()]
    runs = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        extra = vllm if backend == "vllm" else []
        summary = train(debug_config(out, *overrides, f"rollout.backend={backend}", *extra))
        assert summary["steps"] == 3
        df = pd.read_csv(out / "csv" / "metrics.csv").dropna(subset=["train/loss"])
        columns = ["train/loss", "train/kl", "len/generated"]
        if mode == "partial":
            columns += ["partial/staleness_0", "partial/staleness_max", "partial/carried"]
        runs[backend] = df.groupby("step")[columns].last()
    pd.testing.assert_frame_equal(runs["hf"], runs["vllm"], rtol=1e-4)
    if mode == "partial":  # rows carried over an update and were trained within the bound
        partial = runs["vllm"]
        assert partial["partial/carried"].iloc[1] > 0
        assert partial["partial/staleness_max"].tolist() == [0, 0, 1]
    assert len(gaps) == 3
    assert all(before > 1e-3 and after < 1e-4 for before, after in gaps), gaps
