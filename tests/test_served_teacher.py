"""A served teacher without vLLM: the top-k + tail KL, the engine and the loss on top-k scores,
the teacher server's client (round trip, retries, failures) and training with a served teacher
against a fake server (the vLLM engine itself: test_vllm_teacher.py, `make test-vllm`)."""

from __future__ import annotations

import json

import pytest
import torch
from served_teacher import HFTopKSource, running_server

from kat_research.config import ConfigError
from kat_research.config.checks import check_runnable
from kat_research.losses import TeacherTargets, opd_loss, per_token_reverse_kl, teacher_topk_tail_kl
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.rollout.teachers import (
    ServedTeacher,
    TeacherServerClient,
    TeacherServerFailed,
    TeacherServerUnavailable,
)
from kat_research.termination import KATTerminator, kat_rule
from kat_research.training.job import train


def test_topk_tail_kl_by_hand():
    """V=3, teacher top-1 = token 0: head p0 log(p0/q0) plus tail (p1+p2) log((p1+p2)/(q1+q2))."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.7, 0.2, 0.1])
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.7)) + 0.5 * torch.log(torch.tensor(0.5 / 0.3))
    value = teacher_topk_tail_kl(p.log()[None], q[:1].log()[None], torch.tensor([[0]]))
    torch.testing.assert_close(value, expected[None])


def test_topk_tail_kl_equals_the_teacher_support_estimate_and_its_gradient():
    torch.manual_seed(0)
    student = torch.randn(6, 50, requires_grad=True)
    teacher = torch.randn(6, 50) * 2
    top = teacher.log_softmax(-1).topk(8, dim=-1)
    served = teacher_topk_tail_kl(student, top.values, top.indices)
    oracle = per_token_reverse_kl(student, teacher, kind="topk_tail", k=8, support="teacher")
    torch.testing.assert_close(served, oracle)
    (g1,) = torch.autograd.grad(served.sum(), student)
    (g2,) = torch.autograd.grad(oracle.sum(), student)
    torch.testing.assert_close(g1, g2)
    # with every token in the support the tail is empty and the estimate is the exact KL
    full = teacher.log_softmax(-1).topk(50, dim=-1)
    torch.testing.assert_close(
        teacher_topk_tail_kl(student, full.values, full.indices),
        per_token_reverse_kl(student, teacher, kind="full"),
    )


def test_opd_loss_topk_tail_from_topk_only_matches_the_hidden_path():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    t_head = torch.nn.Linear(16, 40, bias=False)
    hidden, t_hidden = torch.randn(10, 16), torch.randn(10, 16)
    top = t_head(t_hidden).log_softmax(-1).topk(12, dim=-1)
    weights = torch.full((10,), 0.1)
    targets = torch.zeros(10, dtype=torch.long)
    from_hidden = opd_loss(
        hidden,
        head,
        targets,
        weights,
        TeacherTargets(hidden=t_hidden, lm_head=t_head),
        kind="topk_tail",
        k=12,
        support="teacher",
        chunk_size=4,
    )
    from_topk = opd_loss(
        hidden,
        head,
        targets,
        weights,
        TeacherTargets(topk_logprobs=top.values.detach(), topk_ids=top.indices),
        kind="topk_tail",
        k=12,
        support="teacher",
        chunk_size=4,
    )
    torch.testing.assert_close(from_topk.loss, from_hidden.loss)
    with pytest.raises(ValueError, match="support='teacher'"):
        opd_loss(
            hidden,
            head,
            targets,
            weights,
            TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices),
            kind="topk_tail",
            k=12,
            support="student",
        )


def _engine(student, teacher, k=None, **kw):
    scorer = teacher if k is None else ServedTeacher(HFTopKSource(teacher), k)
    return RolloutEngine(
        student,
        scorer,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=20),
        pad_token_id=0,
        score_every=7,
        **kw,
    )


def test_engine_with_a_served_teacher_scores_like_the_hf_teacher(tiny_pair, prompts):
    """The served chunks (sequences re-scored from scratch by the oracle source) give the HF
    teacher's log q(y_t); with k = the vocabulary the KL is exact, and a KAT rule with a fixed
    threshold cuts every row at the same token."""
    student, teacher = tiny_pair[0].model, tiny_pair[1].model
    vocab = teacher.config.vocab_size

    def run(k, threshold=None):
        rule = (
            None
            if threshold is None
            else KATTerminator(kat_rule(window=4, stride=2, patience=1, threshold=threshold))
        )
        eng = _engine(student, teacher, k, terminator=rule, teacher_keep="topk", teacher_topk=5)
        generator = torch.Generator().manual_seed(3)
        return eng.generate(prompts.input_ids, prompts.attention_mask, generator)

    free = run(None)  # no rule: a threshold at the median KL makes the rule cut some rows
    threshold = float(free.kl[free.gen_mask].median())
    hf, served, top8 = run(None, threshold), run(vocab, threshold), run(8, threshold)
    assert torch.equal(hf.tokens, served.tokens) and torch.equal(hf.cut, served.cut)
    assert (hf.stop_reason.count("terminated")) > 0
    gen = hf.gen_mask
    torch.testing.assert_close(served.kl[gen], hf.kl[gen], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(served.teacher_logprobs[gen], hf.teacher_logprobs[gen])
    torch.testing.assert_close(served.teacher_topk_ids[gen], hf.teacher_topk_ids[gen])
    # top-8 of the 100 tokens: the same tokens (same sampling RNG) until a cut differs. The
    # top-k + tail estimate merges the tail into one bucket, which never raises a KL (log-sum
    # inequality): at every shared position it is <= the exact KL, so a fixed threshold cuts
    # no later
    n = min(top8.tokens.shape[1], hf.tokens.shape[1])
    same = (top8.tokens[:, :n] == hf.tokens[:, :n]).cumprod(1).bool()
    shared = same & top8.gen_mask[:, :n] & gen[:, :n]
    assert shared.sum() >= 8
    assert bool((top8.kl[:, :n][shared] <= hf.kl[:, :n][shared] + 1e-5).all())
    assert bool((top8.cut <= hf.cut).all())


def test_engine_refuses_hidden_and_a_larger_k_from_a_served_teacher(tiny_pair):
    student, teacher = tiny_pair[0].model, tiny_pair[1].model
    with pytest.raises(ValueError, match="teacher model"):
        _engine(student, teacher, 8, teacher_keep="hidden")
    with pytest.raises(ValueError, match="teacher.topk"):
        _engine(student, teacher, 8, teacher_keep="topk", teacher_topk=16)


def test_client_round_trip_through_the_server(tiny_pair):
    source = HFTopKSource(tiny_pair[1].model)
    sequences, first = [[3, 4, 5, 6, 7], [8, 9, 10]], [2, 1]
    with running_server(source) as url:
        client = TeacherServerClient(url, timeout_s=10, retries=0, retry_wait_s=0)
        assert client.check()["vocab_size"] == tiny_pair[1].model.config.vocab_size
        rows = client.score(sequences, first, 6)
    for got, want in zip(rows, source.score(sequences, first, 6), strict=True):
        assert got.topk_ids.shape == (want.token_logprobs.shape[0], 6)
        torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs)
        torch.testing.assert_close(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.token_logprobs, want.token_logprobs)


class FlakySource(HFTopKSource):
    """Fails (HTTP 500) on the calls listed in ``fail_on`` (1-based)."""

    def __init__(self, model, fail_on):
        super().__init__(model)
        self.fail_on = set(fail_on)

    def score(self, sequences, first, k):
        if self.calls + 1 in self.fail_on:
            self.calls += 1
            raise RuntimeError("engine crashed")
        return super().score(sequences, first, k)


def test_client_retries_then_fails_with_a_named_error(tiny_pair, caplog):
    model = tiny_pair[1].model
    with running_server(FlakySource(model, fail_on={1})) as url:  # one failure, one retry: ok
        client = TeacherServerClient(url, timeout_s=10, retries=1, retry_wait_s=0)
        assert len(client.score([[3, 4, 5]], [1], 4)) == 1
    assert "retry 1 of 1" in caplog.text
    source = FlakySource(model, fail_on={1, 2, 3})
    with running_server(source) as url:
        client = TeacherServerClient(url, timeout_s=10, retries=2, retry_wait_s=0)
        with pytest.raises(TeacherServerFailed, match="3 attempts"):
            client.score([[3, 4, 5]], [1], 4)
    assert source.calls == 3  # bounded: 1 + retries
    client = TeacherServerClient(url, timeout_s=10, retries=0, retry_wait_s=0)  # server gone
    with pytest.raises(TeacherServerUnavailable, match="teacher.vllm.url"):
        client.check()
    with pytest.raises(TeacherServerFailed, match="resume"):
        client.score([[3, 4, 5]], [1], 4)


def test_client_times_out(tiny_pair):
    class Slow(HFTopKSource):
        def score(self, *args):
            import time

            time.sleep(1.0)
            return super().score(*args)

    with running_server(Slow(tiny_pair[1].model)) as url:
        client = TeacherServerClient(url, timeout_s=0.2, retries=0, retry_wait_s=0)
        with pytest.raises(TeacherServerFailed, match="timeout 0.2 s"):
            client.score([[3, 4, 5]], [1], 4)


def test_config_refuses_full_and_student_support_with_a_served_teacher(compose_config):
    served = ["teacher.backend=vllm", "teacher.vllm.url=http://127.0.0.1:1"]
    with pytest.raises(ConfigError, match="loss=topk_tail loss.support=teacher, loss=topk_lsm or"):
        check_runnable(compose_config("loss=full", *served))
    with pytest.raises(ConfigError, match="loss.support=teacher"):
        check_runnable(compose_config("loss=topk_tail", *served))
    with pytest.raises(ConfigError, match="teacher.topk"):
        check_runnable(compose_config("method=topk_lsm", "teacher.topk=8", *served))
    check_runnable(compose_config("loss=topk_tail", "loss.support=teacher", *served))
    check_runnable(compose_config("loss=sampled_token", *served))


SERVED = ["loss=topk_tail", "loss.support=teacher", "teacher.backend=vllm", "logger=csv"]


def test_training_with_a_served_teacher(debug_config, tmp_path, tiny_pair):
    """Two KAT-OPD steps scored by a (fake) teacher server; no teacher model is loaded."""
    cfg0 = debug_config(tmp_path / "probe")
    from hydra.utils import instantiate

    teacher = instantiate(cfg0.model.teacher).model
    source = HFTopKSource(teacher)
    with running_server(source) as url:
        cfg = debug_config(tmp_path / "run", *SERVED, f"teacher.vllm.url={url}")
        summary = train(cfg)
    assert summary["steps"] == 2 and source.calls > 2


def test_server_down_at_start_fails_before_any_model_loads(debug_config, tmp_path, monkeypatch):
    import kat_research.training.job as training

    loaded = []
    monkeypatch.setattr(training, "instantiate", lambda node, **kw: loaded.append(node))
    cfg = debug_config(tmp_path / "run", *SERVED, "teacher.vllm.url=http://127.0.0.1:9")
    with pytest.raises(TeacherServerUnavailable, match="does not answer"):
        train(cfg)
    assert loaded == []


def test_server_dying_mid_run_keeps_a_checkpoint_and_the_run_resumes(debug_config, tmp_path):
    from hydra.utils import instantiate

    teacher = instantiate(debug_config(tmp_path / "probe").model.teacher).model
    run = tmp_path / "run"
    # step 1 takes a few chunk requests; the server then fails every request of step 2
    source = FlakySource(teacher, fail_on=range(7, 100))
    extra = [*SERVED, "teacher.vllm.retries=1", "teacher.vllm.retry_wait_s=0"]
    with running_server(source) as url:
        with pytest.raises(TeacherServerFailed):
            train(debug_config(run, *extra, f"teacher.vllm.url={url}"))
    saved = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert any(name.startswith("teacher-failure-step") for name in saved), saved
    with running_server(HFTopKSource(teacher)) as url:
        summary = train(debug_config(run, *extra, f"teacher.vllm.url={url}"))
    assert summary["steps"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
