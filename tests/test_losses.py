"""Loss tests: hand-computed values on tiny vocabularies, chunking, masking, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kat_research.losses.opd as opd_module
from kat_research.losses import (
    DEFAULT_K,
    KL_KINDS,
    LOSS_KINDS,
    TeacherTargets,
    opd_loss,
    per_token_reverse_kl,
    token_weights,
)

LOG2 = math.log(2.0)


def logits_of(*probs: list[float]) -> torch.Tensor:
    """Rows of logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probs).log()


def identity_head(v: int) -> nn.Linear:
    """An LM head with logits == hidden, so tests can write logits by hand."""
    head = nn.Linear(v, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v))
    return head


def random_problem(n: int = 10, h: int = 8, v: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student_head, teacher_head = nn.Linear(h, v), nn.Linear(h, v)
    with torch.no_grad():
        for p in [*student_head.parameters(), *teacher_head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(n, h, generator=g)
    targets = torch.randint(v, (n,), generator=g)
    weights = torch.rand(n, generator=g) * (torch.arange(n) % 4 != 3)  # some masked
    return hidden, student_head, teacher_hidden, teacher_head, targets, weights


# --- per_token_reverse_kl ------------------------------------------------------------------


def test_constants():
    assert KL_KINDS == ("full", "topk_tail", "topk_lsm")
    assert DEFAULT_K == {"topk_tail": 64, "topk_lsm": 32}
    assert LOSS_KINDS == (*KL_KINDS, "sampled_token")


def test_full_by_hand():
    # p = [1/2, 1/4, 1/4], q = [1/4, 1/2, 1/4]:
    # KL = 1/2 log 2 + 1/4 log(1/2) + 0 = 1/4 log 2
    value = per_token_reverse_kl(logits_of([0.5, 0.25, 0.25]), logits_of([0.25, 0.5, 0.25]))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(0.25 * LOG2, abs=1e-6)


def test_full_matches_kl_div_and_only_student_gets_grad():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 7, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(5, 7, generator=g).bfloat16().requires_grad_()
    value = per_token_reverse_kl(student, teacher)
    log_p = F.log_softmax(student.float(), -1)
    log_q = F.log_softmax(teacher.float(), -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    assert value.dtype == torch.float32 and value.shape == (5,)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_topk_tail_student_support_by_hand():
    # p = [1/2, 1/4, 1/4], q = [1/4, 1/2, 1/4], k=1: S = {0} (student's top token).
    # head 1/2 log(1/2 / 1/4) = 1/2 log 2; tail r_p = 1/2, r_q = 3/4: 1/2 log(2/3).
    value = per_token_reverse_kl(
        logits_of([0.5, 0.25, 0.25]), logits_of([0.25, 0.5, 0.25]), kind="topk_tail", k=1
    )
    assert value.item() == pytest.approx(0.5 * LOG2 + 0.5 * math.log(2 / 3), abs=1e-6)


def test_topk_tail_teacher_support_by_hand():
    # Same p, q; S = {1} (teacher's top token): head 1/4 log(1/4 / 1/2) = -1/4 log 2;
    # tail r_p = 3/4, r_q = 1/2: 3/4 log(3/2).
    value = per_token_reverse_kl(
        logits_of([0.5, 0.25, 0.25]),
        logits_of([0.25, 0.5, 0.25]),
        kind="topk_tail",
        k=1,
        support="teacher",
    )
    assert value.item() == pytest.approx(-0.25 * LOG2 + 0.75 * math.log(1.5), abs=1e-6)


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_topk_tail_with_full_support_equals_full(support):
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    full = per_token_reverse_kl(student, teacher)
    for k in (5, 100):  # k > V is clamped to V
        tail = per_token_reverse_kl(student, teacher, kind="topk_tail", k=k, support=support)
        torch.testing.assert_close(tail, full)


def test_topk_tail_gradient_reaches_tail_and_negligible_tail_is_safe():
    student = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, -200.0, -200.0, -200.0]])
    student.requires_grad_()
    teacher = torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    value = per_token_reverse_kl(student, teacher, kind="topk_tail", k=1)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(student.grad).all()
    assert (student.grad[0, 1:] != 0).all()  # tail tokens get gradient through r_p
    # Row 2: the student's top token holds all but ~e^-200 of the mass: r_p underflows to 0
    # and the tail contributes 0, so KL = 1 * log(1 / (1/4)) = log 4.
    assert value[1].item() == pytest.approx(math.log(4.0), abs=1e-5)


def test_topk_lsm_by_hand_and_no_grad_outside_support():
    # q = [.4, .3, .2, .1], K=2: S = {0, 1}, q_hat = [4/7, 3/7].
    # p = [.1, .1, .4, .4]: p_hat = [1/2, 1/2].
    # KL = 1/2 log(1/2 / 4/7) + 1/2 log(1/2 / 3/7) = 1/2 log(49/48).
    student = logits_of([0.1, 0.1, 0.4, 0.4]).requires_grad_()
    value = per_token_reverse_kl(student, logits_of([0.4, 0.3, 0.2, 0.1]), kind="topk_lsm", k=2)
    assert value.item() == pytest.approx(0.5 * math.log(49 / 48), abs=1e-6)
    value.sum().backward()
    assert (student.grad[0, 2:] == 0).all() and (student.grad[0, :2] != 0).all()


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="full, topk_tail, topk_lsm"):
        per_token_reverse_kl(torch.zeros(1, 3), torch.zeros(1, 3), kind="forward")


# --- token_weights -------------------------------------------------------------------------


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # token_mean: 3 valid tokens in the batch -> 1/3 each.
    expected_token = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]) / 3
    torch.testing.assert_close(token_weights(mask, "token_mean"), expected_token)
    # seq_mean: 2 rows with tokens; row 0 has 2 tokens -> 1/(2*2), row 1 has 1 -> 1/(2*1).
    expected_seq = torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_weights(mask, "seq_mean"), expected_seq)
    for aggregation in ("token_mean", "seq_mean"):
        assert (token_weights(torch.zeros(2, 3, dtype=torch.bool), aggregation) == 0).all()
    with pytest.raises(ValueError, match="token_mean, seq_mean"):
        token_weights(mask, "sum")


# --- opd_loss: hand values -----------------------------------------------------------------


def test_single_token_full_by_hand():
    hidden = logits_of([0.5, 0.25, 0.25]).requires_grad_()
    teacher = TeacherTargets(hidden=logits_of([0.25, 0.5, 0.25]), lm_head=identity_head(3))
    out = opd_loss(hidden, identity_head(3), torch.tensor([0]), torch.ones(1), teacher)
    assert out.loss.item() == pytest.approx(0.25 * LOG2, abs=1e-6)
    assert out.n_tokens == 1 and out.n_nonfinite == 0
    assert out.mean_kl == pytest.approx(0.25 * LOG2, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all()


def sampled_token_problem():
    """Two rows (3 + 2 tokens) with p(y_t) and q(y_t) chosen so r_t is a multiple of log 2.

    p(y) = [1/2, 1/4, 1/2 | 1/2, 1/4], q(y) = [1/4, 1/4, 1 | 1/4, 1/4]
    r = log p - log q = [log 2, 0, -log 2 | log 2, 0].
    """
    hidden = logits_of(
        [0.5, 0.25, 0.25],
        [0.25, 0.5, 0.25],
        [0.5, 0.25, 0.25],
        [0.5, 0.25, 0.25],
        [0.25, 0.5, 0.25],
    ).requires_grad_()
    targets = torch.tensor([0, 0, 0, 0, 0])
    teacher = TeacherTargets(sampled_logprobs=torch.tensor([0.25, 0.25, 1.0, 0.25, 0.25]).log())
    return hidden, targets, teacher, torch.tensor([0, 0, 0, 1, 1])


@pytest.mark.parametrize(
    ("discount", "advantage"),
    [
        # A_t = -r_t
        (0.0, [-1.0, 0.0, 1.0, -1.0, 0.0]),
        # gamma = 1/2, per row from the end: row 0: A_2 = 1, A_1 = 0 + 1/2 * 1 = 1/2,
        # A_0 = -1 + 1/2 * 1/2 = -3/4; row 1 (restarts): A_4 = 0, A_3 = -1 + 0 = -1.
        (0.5, [-0.75, 0.5, 1.0, -1.0, 0.0]),
    ],
)
def test_sampled_token_advantage_by_hand(discount, advantage):
    hidden, targets, teacher, rows = sampled_token_problem()
    weights = torch.full((5,), 0.2)
    head = identity_head(3)
    out = opd_loss(
        hidden, head, targets, weights, teacher, "sampled_token", discount=discount, row_index=rows
    )
    advantage_t = torch.tensor(advantage) * LOG2
    log_p = F.log_softmax(hidden, -1)[torch.arange(5), targets]
    torch.testing.assert_close(out.per_token, torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0]) * LOG2)
    assert out.mean_kl == pytest.approx(LOG2 / 5, abs=1e-6)
    expected = -(weights * advantage_t * log_p).sum()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad, expected_grad)


def test_sampled_token_discount_needs_contiguous_rows():
    hidden, targets, teacher, _ = sampled_token_problem()
    args = (hidden, identity_head(3), targets, torch.ones(5), teacher, "sampled_token")
    with pytest.raises(ValueError, match="row_index"):
        opd_loss(*args, discount=0.5)
    with pytest.raises(ValueError, match="contiguous"):
        opd_loss(*args, discount=0.5, row_index=torch.tensor([0, 1, 0, 1, 1]))


# --- opd_loss: chunking --------------------------------------------------------------------


def reference_loss(
    hidden, student_head, teacher_hidden, teacher_head, targets, weights, kind, k, support
):
    """The unchunked computation: materialise all logits at once."""
    logits = student_head(hidden)
    teacher_logits = teacher_head(teacher_hidden).detach()
    if kind == "sampled_token":
        log_p = F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        log_q = F.log_softmax(teacher_logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        return (weights * (log_p - log_q).detach() * log_p).sum()
    value = per_token_reverse_kl(logits, teacher_logits, kind=kind, k=k, support=support)
    return (weights * value).sum()


@pytest.mark.parametrize(
    ("kind", "support"), [(kind, "student") for kind in LOSS_KINDS] + [("topk_tail", "teacher")]
)
def test_chunked_equals_unchunked(kind, support):
    hidden, student_head, teacher_hidden, teacher_head, targets, weights = random_problem()
    k = 3 if kind in DEFAULT_K else None
    expected = reference_loss(
        hidden, student_head, teacher_hidden, teacher_head, targets, weights, kind, k, support
    )
    params = [hidden, *student_head.parameters()]
    expected_grads = torch.autograd.grad(expected, params)
    teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    for chunk_size in (1, 3, 1000):
        out = opd_loss(
            hidden, student_head, targets, weights, teacher, kind, k, support, chunk_size=chunk_size
        )
        torch.testing.assert_close(out.loss, expected)
        for grad, expected_grad in zip(
            torch.autograd.grad(out.loss, params), expected_grads, strict=True
        ):
            torch.testing.assert_close(grad, expected_grad)
        assert out.n_tokens == int((weights != 0).sum()) and out.n_nonfinite == 0


@pytest.mark.parametrize("kind", ["full", "sampled_token"])
def test_only_a_loss_of_several_chunks_is_recomputed_in_backward(kind, monkeypatch):
    """Checkpointing one chunk would not lower peak memory (its recompute comes while the
    student's activations are all held), so it only runs with several chunks, once each."""
    calls = []

    def counting_checkpoint(function, *args, use_reentrant):
        calls.append(function.__name__)
        return function(*args)

    monkeypatch.setattr(opd_module, "checkpoint", counting_checkpoint)
    hidden, student_head, teacher_hidden, teacher_head, targets, weights = random_problem()
    teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    n = hidden.shape[0]
    for chunk_size, expected in ((n, 0), (1000, 0), (3, math.ceil(n / 3))):
        calls.clear()
        opd_loss(hidden, student_head, targets, weights, teacher, kind, chunk_size=chunk_size)
        assert len(calls) == expected, (chunk_size, calls)


def test_topk_lsm_from_topk_logprobs_equals_from_hidden():
    hidden, student_head, teacher_hidden, teacher_head, targets, weights = random_problem()
    top = F.log_softmax(teacher_head(teacher_hidden), -1).detach().topk(4, dim=-1)
    from_hidden = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    from_topk = TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices)
    outs = [
        opd_loss(hidden, student_head, targets, weights, teacher, "topk_lsm", k=4, chunk_size=3)
        for teacher in (from_hidden, from_topk)
    ]
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    torch.testing.assert_close(outs[0].per_token, outs[1].per_token)
    grads = [torch.autograd.grad(out.loss, hidden)[0] for out in outs]
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="exceeds the 4 teacher top-K"):
        opd_loss(hidden, student_head, targets, weights, from_topk, "topk_lsm", k=5)


# --- opd_loss: masking and bad inputs ------------------------------------------------------


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("n", [0, 4])
def test_all_masked_batch_is_exact_zero(kind, n):
    hidden, student_head, teacher_hidden, teacher_head, targets, _ = random_problem(n=n)
    teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    weights = token_weights(torch.zeros(1, n, dtype=torch.bool)).flatten()
    out = opd_loss(hidden, student_head, targets, weights, teacher, kind, k=2)
    assert out.loss.item() == 0.0 and out.n_tokens == 0 and math.isnan(out.mean_kl)
    out.loss.backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in student_head.parameters())


def nan_teacher(kind, teacher_hidden, teacher_head, bad):
    """The teacher output each kind uses, with NaN at position ``bad``."""
    if kind == "sampled_token":
        log_q = F.log_softmax(teacher_head(teacher_hidden), -1).detach()
        return TeacherTargets(sampled_logprobs=log_q[:, 0].index_fill(0, bad, math.nan))
    if kind == "topk_lsm":
        top = F.log_softmax(teacher_head(teacher_hidden), -1).detach().topk(3, dim=-1)
        values = top.values.index_fill(0, bad, math.nan)
        return TeacherTargets(topk_logprobs=values, topk_ids=top.indices)
    return TeacherTargets(hidden=teacher_hidden.index_fill(0, bad, math.nan), lm_head=teacher_head)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_nan_teacher_position_is_dropped_and_counted(kind):
    hidden, student_head, teacher_hidden, teacher_head, _, weights = random_problem()
    targets = torch.zeros(10, dtype=torch.long)  # sampled_token: teacher log q of token 0
    weights = torch.ones(10)
    bad = torch.tensor([2])
    teacher = nan_teacher(kind, teacher_hidden, teacher_head, bad)
    out = opd_loss(hidden, student_head, targets, weights, teacher, kind, k=3, chunk_size=4)
    assert out.n_nonfinite == 1 and out.n_tokens == 9 and out.per_token[2] == 0
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()
    assert (hidden.grad[2] == 0).all()
    # Same loss as giving that position weight 0 and a finite teacher value.
    finite = nan_teacher(kind, teacher_hidden, teacher_head, torch.tensor([], dtype=torch.long))
    clean_weights = weights.index_fill(0, bad, 0.0)
    clean = opd_loss(hidden, student_head, targets, clean_weights, finite, kind, k=3)
    torch.testing.assert_close(out.loss, clean.loss)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_nan_student_raises(kind):
    hidden, student_head, teacher_hidden, teacher_head, targets, weights = random_problem()
    hidden = hidden.detach().index_fill(0, torch.tensor([5]), math.nan)
    teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    with pytest.raises(FloatingPointError, match="diverging"):
        opd_loss(hidden, student_head, targets, weights, teacher, kind, k=2)


@pytest.mark.parametrize(
    ("kind", "teacher", "missing"),
    [
        ("full", TeacherTargets(sampled_logprobs=torch.zeros(10)), "hidden states"),
        ("topk_tail", TeacherTargets(topk_logprobs=torch.zeros(10, 2)), "hidden states"),
        ("topk_lsm", TeacherTargets(sampled_logprobs=torch.zeros(10)), "top-K log-probs"),
        ("sampled_token", TeacherTargets(), "sampled-token log-probs"),
    ],
)
def test_missing_teacher_output_raises(kind, teacher, missing):
    hidden, student_head, _, _, targets, weights = random_problem()
    with pytest.raises(ValueError, match=missing):
        opd_loss(hidden, student_head, targets, weights, teacher, kind)


def test_vocab_mismatch_and_unknown_kind_raise():
    hidden, student_head, teacher_hidden, _, targets, weights = random_problem()
    teacher = TeacherTargets(hidden=teacher_hidden, lm_head=nn.Linear(8, 12))
    with pytest.raises(ValueError, match="share one tokenizer"):
        opd_loss(hidden, student_head, targets, weights, teacher)
    with pytest.raises(ValueError, match="sampled_token"):
        opd_loss(hidden, student_head, targets, weights, teacher, kind="forward_kl")
