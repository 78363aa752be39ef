"""Partial rollouts (rollout.mode=partial, kat_research/rollout/partial.py) on tiny random
Qwen3 models: carried rows continue from their own tokens across weight updates and the
staleness bound holds, for both student backends (the ``backend`` fixture; vLLM in tests marked
``vllm``), KAT's per-row state survives carry-over, the slot scheduler trains on every
prompt it admits, and configurations it cannot run are refused before models load."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kat_research.config import ConfigError
from kat_research.config.checks import check_runnable
from kat_research.lit import RolloutSettings
from kat_research.rollout import STOP_STALE, RolloutEngine, SamplingConfig
from kat_research.rollout.cached_lm import prompt_positions
from kat_research.rollout.partial import PartialRollouts
from kat_research.termination import KATTerminator, kat_cut, kat_rule
from kat_research.termination.base import Terminator


class CyclingCaps(Terminator):
    """Test rule: row i admitted gets cap ``caps[i % len(caps)]``; records what it admitted."""

    supports_partial = True

    def __init__(self, caps: list[int]):
        self.caps = itertools.cycle(caps)
        self.admitted: list[int] = []

    def begin_batch(self, batch_size, max_new_tokens, generator=None):
        caps = [min(next(self.caps), max_new_tokens) for _ in range(batch_size)]
        self.admitted += caps
        return torch.tensor(caps)

    def __repr__(self) -> str:
        return "CyclingCaps"


def prompt_source(tokenizer, per_call: int = 4):
    """Distinct prompts of different lengths, ``per_call`` at a time; the list of all drawn."""
    drawn: list[torch.Tensor] = []
    counter = itertools.count()

    def draw() -> list[torch.Tensor]:
        out = []
        for _ in range(per_call):
            i = next(counter)
            out.append(torch.tensor(tokenizer(f"{i}*{i % 7}=" + "x" * (i % 5))["input_ids"]))
        drawn.extend(out)
        return out

    return draw, drawn


def driver(
    pair,
    tokenizer,
    *,
    terminator,
    slots=4,
    max_staleness=2,
    max_new_tokens=16,
    temperature=1.0,
    score_every=2,
    keep="hidden",
    backend=None,
):
    student, teacher = pair
    engine = RolloutEngine(
        student.model,
        teacher.model,
        sampling=SamplingConfig(temperature, 1.0, max_new_tokens, ()),
        pad_token_id=tokenizer.pad_token_id,
        terminator=terminator,
        score_every=score_every,
        teacher_keep=keep,
        backend=backend,
    )
    draw, drawn = prompt_source(tokenizer)
    return PartialRollouts(engine, slots, max_staleness, draw), drawn


def full_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits predicting each generated token, from one uncached forward of prompt + tokens."""
    ids = torch.cat([prompt, tokens])[None]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask)
        ).logits
    return logits[0, prompt.numel() - 1 : -1]


def perturb(model, seed: int) -> None:
    """An 'optimizer step': change every weight of the student."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_carried_rows_continue_from_their_own_tokens(tiny_pair, char_tokenizer, backend):
    """Greedy decoding: every token of every trained row is the argmax of the weights that
    sampled it (policy_step) given the row's own prompt + earlier tokens, and its recorded
    log p(y_t) is those weights' (the student's cache, or vLLM's re-scoring cache, rebuilt after
    each update), also for rows inserted next to other rows; the teacher's recorded log q(y_t)
    and hidden states match an uncached forward."""
    student, teacher = tiny_pair
    original = {k: v.clone() for k, v in student.model.state_dict().items()}
    try:
        d, _ = driver(
            tiny_pair,
            char_tokenizer,
            terminator=CyclingCaps([3, 16, 7, 12, 5]),
            temperature=0.0,
            max_staleness=3,
            backend=backend,
        )
        versions = [{k: v.clone() for k, v in student.model.state_dict().items()}]
        batches = []
        for step in range(4):
            batches.append((d.next_batch(3), d.version))
            perturb(student.model, step)
            d.e.sync_weights()  # as after an optimizer step: vLLM gets the new weights
            d.weights_updated()
            versions.append({k: v.clone() for k, v in student.model.state_dict().items()})
        carried = 0
        for rollout, _ in batches:
            for i in range(rollout.batch_size):
                n = int(rollout.lengths[i])
                prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
                tokens, steps = rollout.tokens[i, :n], rollout.policy_step[i, :n]
                carried += int(steps[0] != steps[-1])
                for v in steps.unique().tolist():
                    student.model.load_state_dict(versions[v])
                    s_logits = full_logits(student.model, prompt, tokens)
                    assert torch.equal(s_logits.argmax(-1)[steps == v], tokens[steps == v])
                    lp = torch.log_softmax(s_logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
                    torch.testing.assert_close(
                        rollout.student_logprobs[i, :n][steps == v],
                        lp[steps == v],
                        atol=1e-4,
                        rtol=1e-4,
                    )
                t_logits = full_logits(teacher.model, prompt, tokens)
                lq = torch.log_softmax(t_logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
                torch.testing.assert_close(
                    rollout.teacher_logprobs[i, :n], lq, atol=1e-4, rtol=1e-4
                )
                head = teacher.model.get_output_embeddings()
                torch.testing.assert_close(
                    head(rollout.teacher_hidden[i, :n]), t_logits, atol=1e-4, rtol=1e-4
                )
        assert carried > 0  # some rows did straddle a weight update
    finally:
        student.model.load_state_dict(original)
        if backend is not None:
            backend.sync_weights()


def test_staleness_never_exceeds_the_bound(tiny_pair, char_tokenizer, backend):
    for bound in (0, 1, 2):
        d, _ = driver(
            tiny_pair,
            char_tokenizer,
            terminator=CyclingCaps([2, 16, 4, 16, 3, 9]),
            max_staleness=bound,
            slots=6,
            backend=backend,
        )
        ended = 0
        for _ in range(6):
            rollout = d.next_batch(4)
            valid = rollout.gen_mask
            oldest = torch.where(valid, rollout.policy_step, d.version).amin(1)
            assert int((d.version - oldest).max()) <= bound
            assert (rollout.policy_step[valid] <= d.version).all()
            steps = torch.where(valid, rollout.policy_step, 10**6)
            assert (steps[:, 1:] >= steps[:, :-1]).all()  # never older after newer
            assert rollout.batch_size >= 4
            ended += sum(r == STOP_STALE for r in rollout.stop_reason)
            assert rollout.partial_metrics["partial/staleness_max"] <= bound
            d.weights_updated()
        if bound == 0:
            assert ended > 0  # the bound was reached and rows were ended, not dropped


def test_kat_state_survives_carry_over(tiny_pair, char_tokenizer):
    """With a fixed threshold, each trained row's kept tokens equal the offline kat_cut on its
    recorded KL trace, for rows carried across several weight updates too."""
    student, _ = tiny_pair
    original = {k: v.clone() for k, v in student.model.state_dict().items()}
    rule = dict(window=4, stride=2, patience=2)
    try:
        probe, _ = driver(
            tiny_pair,
            char_tokenizer,
            terminator=KATTerminator(kat_rule(**rule, threshold=-1.0)),
            max_new_tokens=24,
        )
        kl = probe.next_batch(4).kl
        threshold = float(kl[kl.isfinite()].median())
        d, _ = driver(
            tiny_pair,
            char_tokenizer,
            terminator=KATTerminator(kat_rule(**rule, threshold=threshold)),
            max_new_tokens=24,
            max_staleness=3,
        )
        cut_rows = carried = 0
        for step in range(5):
            rollout = d.next_batch(4)
            for i in range(rollout.batch_size):
                n = int(rollout.lengths[i])
                offline = kat_cut(rollout.kl[i, :n], kat_rule(threshold=threshold, **rule))
                assert int(rollout.cut[i]) == (n if offline is None else offline)
                cut_rows += offline is not None
                carried += int(rollout.policy_step[i, 0] != rollout.policy_step[i, n - 1])
            perturb(student.model, 100 + step)
            d.weights_updated()
        assert cut_rows > 0 and carried > 0
    finally:
        student.model.load_state_dict(original)


def test_kat_buffer_takes_rows_when_they_finish(tiny_pair, char_tokenizer):
    rule = KATTerminator(kat_rule(window=4, stride=2, patience=2, min_buffer=1, warmup_steps=0))
    d, _ = driver(tiny_pair, char_tokenizer, terminator=rule, max_new_tokens=12)
    sizes = []
    for _ in range(3):
        rollout = d.next_batch(4)
        sizes.append(rollout.terminator_metrics["kat/buffer_size"])
        d.weights_updated()
    # every finished row with a counted window (length >= 4) pushed one minimum
    assert sizes[0] >= 4 and sizes[0] < sizes[1] < sizes[2]
    assert math.isfinite(rollout.terminator_metrics["kat/threshold"])


def test_scheduler_trains_every_admitted_row_without_length_bias(tiny_pair, char_tokenizer):
    """Known length distribution (caps cycling 2 short : 1 long, no stop token). Every admitted
    row is trained exactly once or still in flight (at most ``slots``), so the mean intended
    length of the trained rows differs from the admitted rows' only by the rows in flight; rows
    are truncated only at the staleness bound, by at most what K+1 steps decode."""
    slots, batch, steps = 6, 4, 12
    caps = [3, 4, 16]
    rule = CyclingCaps(caps)
    d, drawn = driver(
        tiny_pair,
        char_tokenizer,
        terminator=rule,
        slots=slots,
        max_staleness=2,
        max_new_tokens=16,
        score_every=1,
    )
    rows: list[tuple[tuple[int, ...], int, str]] = []  # (prompt, length, reason)
    for _ in range(steps):
        rollout = d.next_batch(batch)
        for i in range(rollout.batch_size):
            prompt = tuple(rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist())
            rows.append((prompt, int(rollout.lengths[i]), rollout.stop_reason[i]))
        d.weights_updated()
    # prompts are admitted in the order drawn, so the i-th drawn prompt got the i-th cap
    index = {tuple(p.tolist()): i for i, p in enumerate(drawn)}
    assert len(index) == len(drawn)  # distinct prompts: the mapping is exact
    trained = [(rule.admitted[index[p]], n, reason) for p, n, reason in rows]
    in_flight = d.live_rows() + len(d.finished)
    admitted = len(rule.admitted)
    assert len(trained) + in_flight == admitted and in_flight <= slots
    for cap, length, reason in trained:
        assert length == cap if reason != STOP_STALE else length < cap
    mean_admitted = sum(rule.admitted) / admitted
    mean_trained = sum(c for c, _, _ in trained) / len(trained)
    # the only difference is the in-flight rows: at most `slots` rows of the longest cap
    assert abs(mean_trained - mean_admitted) <= in_flight * (max(caps) - min(caps)) / len(trained)
    share_long = sum(c == 16 for c, _, _ in trained) / len(trained)
    assert share_long >= 1 / 3 - slots / len(trained)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=sampled_token"], "loss.kind=sampled_token is refused"),
        (["method=kat_stagewise"], "no per-row state"),
        (["method=prune_opd"], "no per-row state"),
        (["teacher.backend=vllm", "loss=topk_lsm"], "needs teacher.backend=hf"),
        (["rollout.max_staleness=-1"], "rollout.max_staleness"),
        (["rollout.mode=async"], "rollout.mode"),
    ],
)
def test_partial_mode_refusals_before_models_load(debug_config, tmp_path, overrides, message):
    mode = [] if "rollout.mode=async" in overrides else ["rollout.mode=partial"]
    cfg = debug_config(tmp_path, *mode, *overrides)
    with pytest.raises(ConfigError, match=message):
        check_runnable(cfg)


def test_partial_mode_runs_on_both_backends(debug_config, tmp_path):
    """The vLLM backend is no refusal of partial mode (its training run: tests/test_vllm.py)."""
    for backend in ("hf", "vllm"):
        overrides = ["method=kat", "rollout.mode=partial", f"rollout.backend={backend}"]
        check_runnable(debug_config(tmp_path, *overrides))
        assert RolloutSettings(mode="partial", backend=backend).backend == backend


def test_partial_training_runs_and_resumes_dropping_carried_rows(debug_config, tmp_path):
    """debug=fast method=kat rollout.mode=partial trains; a run resumed from a mid-run
    checkpoint continues the prompt stream and drops (and counts) the rows that were in
    flight when the checkpoint was written."""
    import pandas as pd

    from kat_research.training.job import train

    steps = ["method=kat", "rollout.mode=partial", "rollout.max_staleness=1", "logger=csv"]
    full = tmp_path / "full"
    summary = train(debug_config(full, *steps, "trainer.max_steps=3"))
    assert summary["steps"] == 3
    metrics = pd.read_csv(full / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    for column in (
        "partial/staleness_0",
        "partial/staleness_1",
        "partial/occupancy",
        "partial/carried",
        "partial/tokens_per_s",
        "kat/buffer_size",
    ):
        assert metrics[column].notna().all(), column
    assert (metrics["partial/staleness_max"] <= 1).all()
    assert (metrics["partial/dropped_on_resume"] == 0).all()
    ckpt = torch.load(full / "checkpoints" / "step000002.ckpt", weights_only=False)
    carried = ckpt["partial"]["carried"]
    assert ckpt["partial"]["prompt_batches"] >= 2 and carried > 0

    resumed = tmp_path / "resumed"
    resume = f"resume={full / 'checkpoints' / 'step000002.ckpt'}"
    train(debug_config(resumed, *steps, "trainer.max_steps=3", resume))
    after = pd.read_csv(resumed / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    assert list(after["step"]) == [2]
    assert after["partial/dropped_on_resume"].iloc[0] == carried
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["partial"]["prompt_batches"] > ckpt["partial"]["prompt_batches"]
