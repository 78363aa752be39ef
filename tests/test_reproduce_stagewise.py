"""Stage-wise supervision: KAT's detector marks phases instead of stopping rollouts."""

from __future__ import annotations

import math

import pytest
import torch

from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.termination import KATTerminator, kat_rule
from kat_research.termination.marking import SUPERVISE, KATPhaseMarker


def run_batch(rule, kl: torch.Tensor, chunk: int = 4):
    """Drive ``rule`` through the engine's protocol on a fixed KL batch (no model)."""
    batch, width = kl.shape
    lengths = torch.full((batch,), width)
    rule.begin_batch(batch, width)
    rows, cuts = torch.arange(batch), torch.full((batch,), -1)
    for end in range(chunk, width + 1, chunk):
        fired = rule.observe(rows, kl[:, :end], torch.full((batch,), end))
        cuts = torch.where((cuts < 0) & (fired >= 0), fired, cuts)
    kept = rule.kept_tokens(torch.where(cuts >= 0, cuts, lengths), kl, lengths)
    return cuts, kept, rule.end_batch()


# Row 0: low from token 8 to 20, then high; row 1: never low; row 2: low from 4 to the end.
KL = torch.tensor(
    [
        [1.0] * 8 + [0.01] * 12 + [1.0] * 12,
        [1.0] * 32,
        [1.0] * 4 + [0.01] * 28,
    ]
)
RULE = dict(window=4, stride=4, patience=2, threshold=0.5)


@pytest.mark.parametrize("supervise", SUPERVISE)
def test_marker_never_stops_and_keeps_the_chosen_phases(supervise):
    cuts, kept, metrics = run_batch(KATPhaseMarker(kat_rule(**RULE), supervise=supervise), KL)
    assert (cuts < 0).all()  # the engine is never asked to stop a row
    expected = {"pre": [8, 32, 4], "pre+agreement": [20, 32, 32], "all": [32, 32, 32]}[supervise]
    assert kept.tolist() == expected
    assert metrics["kat/pre_tokens"] == pytest.approx((8 + 32 + 4) / 3)
    assert metrics["kat/agreement_tokens"] == pytest.approx((12 + 0 + 28) / 3)
    assert metrics["kat/post_tokens"] == pytest.approx((12 + 0 + 0) / 3)


def test_pre_keeps_what_kat_keeps_and_the_buffer_matches():
    adaptive = dict(window=4, stride=4, patience=2, quantile=0.5, min_buffer=1, warmup_steps=0)
    kat, marker = (
        KATTerminator(kat_rule(**adaptive)),
        KATPhaseMarker(kat_rule(**adaptive), supervise="pre"),
    )
    for rule in (kat, marker):
        run_batch(rule, KL)  # fills the buffer: the threshold becomes active
    kat_cuts, _, kat_metrics = run_batch(kat, KL)
    _, kept, marker_metrics = run_batch(marker, KL)
    assert kept.tolist() == torch.where(kat_cuts >= 0, kat_cuts, 32).tolist()
    assert torch.equal(kat.buffer, marker.buffer)
    assert kat_metrics["kat/threshold"] == marker_metrics["kat/threshold"]


def test_invalid_supervise_fails():
    with pytest.raises(ValueError, match="supervise"):
        KATPhaseMarker(kat_rule(**RULE), supervise="post")


def test_engine_runs_marked_rollouts_to_the_end(tiny_pair, prompts):
    student, teacher = tiny_pair
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, stop_token_ids=())

    def rollout(terminator):
        engine = RolloutEngine(
            student.model,
            teacher.model,
            sampling=sampling,
            pad_token_id=student.tokenizer.pad_token_id,
            terminator=terminator,
        )
        generator = torch.Generator().manual_seed(0)
        return engine.generate(prompts["input_ids"], prompts["attention_mask"], generator)

    plain = rollout(None)
    everything_low = dict(window=4, stride=4, patience=2, threshold=math.inf)
    for supervise, kept in (("pre", 0), ("pre+agreement", 12), ("all", 12)):
        marked = rollout(KATPhaseMarker(kat_rule(**everything_low), supervise=supervise))
        assert torch.equal(marked.tokens, plain.tokens)
        assert "terminated" not in marked.stop_reason
        assert marked.cut.tolist() == [kept] * 4
        assert int(marked.loss_mask.sum()) == 4 * kept
