"""Termination rules: KAT's offline/online scan, adaptive threshold, baselines, composition."""

from __future__ import annotations

import dataclasses
import io
import math
import random
from array import array

import pytest
import torch

from kat_research.termination import (
    CompositeTerminator,
    FixedPrefix,
    KATRule,
    KATTerminator,
    NoTermination,
    RandomTermination,
    Terminator,
    ThresholdPolicy,
    kat_calibrated,
    kat_cut,
    kat_cuts,
    kat_rule,
    kat_rule_from_settings,
    kat_window_minima,
    kat_window_minimum,
)
from kat_research.termination.marking import SUPERVISE, KATPhaseMarker
from kat_research.termination.phases import (
    AGREEMENT,
    PADDING,
    POST,
    PRE,
    segment_phases,
)

LOW, HIGH = 0.1, 1.0


def _run_batch(
    term: Terminator,
    kl: torch.Tensor,
    lengths: torch.Tensor,
    chunk_ends: list[int],
    garbage: float = math.nan,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Drive ``term`` like the engine: observe alive rows at each chunk end; return cuts."""
    batch, total = kl.shape
    caps = term.begin_batch(batch, total)
    lengths = torch.minimum(lengths, caps)
    cuts = torch.full((batch,), -1, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool)
    for end in chunk_ends:
        rows = alive.nonzero().flatten()
        if rows.numel() == 0:
            break
        seen = lengths[rows].clamp(max=end)
        window = kl[rows, :end].clone()
        window[torch.arange(end)[None, :] >= seen[:, None]] = garbage  # undefined entries
        out = term.observe(rows, window, seen)
        cuts[rows] = out
        alive[rows] = (out < 0) & (lengths[rows] > end)
    return cuts, term.end_batch()


def _planted(*segments: tuple[float, int]) -> list[float]:
    return [value for value, count in segments for _ in range(count)]


# --- kat_cut on planted sequences -----------------------------------------------------------


def test_kat_cut_run_reaching_patience() -> None:
    # windows of 4: [0,4)=1, [4,8)=1, [8,12), [12,16), [16,20) low -> 3rd low window at t=20
    kl = _planted((HIGH, 8), (LOW, 12), (HIGH, 4))
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=3)) == 8
    assert kat_cut(torch.tensor(kl), kat_rule(threshold=0.5, window=4, patience=2)) == 8


def test_kat_cut_run_broken_before_patience() -> None:
    kl = _planted((HIGH, 8), (LOW, 8), (HIGH, 4), (LOW, 8), (HIGH, 4))
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=3)) is None
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=2)) == 8


def test_kat_cut_threshold_is_strict() -> None:
    assert kat_cut([0.5] * 8, kat_rule(threshold=0.5, window=4, patience=1)) is None
    assert kat_cut([0.5] * 8, kat_rule(threshold=0.5 + 1e-9, window=4, patience=1)) == 0


def test_kat_cut_exemption() -> None:
    kl = _planted((LOW, 12), (HIGH, 4), (LOW, 4))
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=3)) == 0
    # windows must start at >= exempt: only [4,8), [8,12) are low before the high window
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=3, exempt=4)) is None
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, patience=3, exempt=1)) is None
    assert kat_cut([LOW] * 16, kat_rule(threshold=0.5, window=4, patience=3, exempt=3)) == 4
    assert kat_window_minimum(kl, kat_rule(window=4, exempt=4)) == pytest.approx(LOW)
    assert kat_window_minimum(kl, kat_rule(window=4, exempt=9), stop=19) == pytest.approx(HIGH)


def test_kat_cut_window_longer_than_sequence() -> None:
    assert kat_cut([0.0] * 5, kat_rule(threshold=1.0, window=10, patience=1)) is None
    assert kat_window_minimum([0.0] * 5, kat_rule(window=10)) is None
    assert kat_cut([], kat_rule(threshold=1.0, window=2, patience=1)) is None


def test_kat_cut_stride_one() -> None:
    # z_3 = 1, z_4 = 2/3, z_5 = 1/3 (run starts at t=5 -> window start 2), z_6 = 0
    kl = [1, 1, 1, 0, 0, 0, 0, 1]
    assert kat_cut(kl, kat_rule(threshold=0.5, window=3, stride=1, patience=2)) == 2
    assert kat_window_minimum(kl, kat_rule(window=3, stride=1)) == 0.0


def test_kat_cut_overlapping_windows() -> None:
    # window 4, stride 2: z_4=1, z_6=0.5 (not < 0.5), z_8=0, z_10=0, z_12=0.5, z_14=1
    kl = _planted((1.0, 4), (0.0, 6), (1.0, 4))
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, stride=2, patience=3)) is None
    assert kat_cut(kl, kat_rule(threshold=0.5, window=4, stride=2, patience=2)) == 4
    assert kat_cut(kl, kat_rule(threshold=0.6, window=4, stride=2, patience=3)) == 2


def test_kat_cut_nonfinite_window_resets_counter() -> None:
    kl = [LOW] * 12
    assert kat_cut(kl, kat_rule(threshold=0.5, window=2, patience=3)) == 0
    kl[4] = math.nan  # window [4,6) -> reset; run restarts at window [6,8)
    assert kat_cut(kl, kat_rule(threshold=0.5, window=2, patience=3)) == 6
    kl[4] = math.inf
    assert kat_cut(kl, kat_rule(threshold=0.5, window=2, patience=3)) == 6
    kl = [HIGH, HIGH, math.nan, 0.0, 0.3, 0.3]
    assert kat_window_minimum(kl, kat_rule(window=2)) == pytest.approx(
        0.3
    )  # NaN window not counted


def test_kat_window_minimum_stop() -> None:
    kl = _planted((0.4, 4), (0.2, 4), (0.0, 4))
    assert kat_window_minimum(kl, kat_rule(window=4)) == 0.0
    assert kat_window_minimum(kl, kat_rule(window=4), stop=11) == pytest.approx(0.2)
    assert kat_window_minimum(kl, kat_rule(window=4), stop=4) == pytest.approx(0.4)


# --- brute-force oracle -------------------------------------------------------------------
#
# KAT written out from its definition, one window at a time, with none of kat.py's code:
# window k holds generated tokens [k*stride, k*stride + window) and is evaluated once all of
# them exist; windows starting before ``exempt`` are never evaluated; a window is low when its
# mean is finite and < threshold; a finite window counts towards the rollout's minimum; a
# window that is not low (or not finite) resets the run; at ``patience`` consecutive low
# windows the rule fires and keeps the tokens before the run's first window.


def oracle_scan(
    kl: list[float], *, threshold: float, window: int, stride: int, patience: int, exempt: int
) -> tuple[int | None, float | None]:
    """(cut or None, minimum window mean up to the stop or None) of one finished rollout."""
    run, run_start, minimum = 0, 0, None
    for start in range(0, len(kl) - window + 1, stride):
        if start < exempt:
            continue
        mean = math.fsum(kl[start : start + window]) / window
        if not math.isfinite(mean):
            run = 0
            continue
        minimum = mean if minimum is None else min(minimum, mean)
        if mean < threshold:
            run_start = start if run == 0 else run_start
            run += 1
            if run == patience:
                return run_start, minimum
        else:
            run = 0
    return None, minimum


def oracle_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy/torch's default) of a non-empty list."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class OracleKAT:
    """The online rule over batches: threshold from the buffer at the start of each batch,
    active once the buffer holds ``min_buffer`` minima and ``warmup_steps`` steps were taken;
    each rollout pushes its finite minimum (in row order, FIFO of ``buffer_size``)."""

    def __init__(
        self,
        *,
        quantile: float = 0.7,
        buffer_size: int = 4096,
        min_buffer: int = 512,
        warmup_steps: int = 50,
        threshold: float | None = None,
        **rule: int,
    ) -> None:
        self.rule = rule
        self.quantile, self.buffer_size, self.min_buffer = quantile, buffer_size, min_buffer
        self.warmup_steps, self.threshold = warmup_steps, threshold
        self.buffer: list[float] = []
        self.steps = 0

    def batch(self, rows: list[list[float]]) -> tuple[list[int], dict[str, float]]:
        if self.threshold is not None:
            threshold, active = self.threshold, True
        else:
            threshold = oracle_quantile(self.buffer, self.quantile) if self.buffer else math.nan
            active = len(self.buffer) >= self.min_buffer and self.steps >= self.warmup_steps
        cuts = []
        for kl in rows:
            cut, minimum = oracle_scan(
                kl, threshold=threshold if active else -math.inf, **self.rule
            )
            cuts.append(-1 if cut is None else cut)
            if minimum is not None:
                self.buffer = (self.buffer + [minimum])[-self.buffer_size :]
        metrics = {
            "kat/threshold": threshold,
            "kat/buffer_size": float(len(self.buffer)),
            "kat/active": float(active),
            "kat/cut_rows": float(sum(c >= 0 for c in cuts)),
        }
        return cuts, metrics


def drive_like_engine(
    term: Terminator, rows: list[list[float]], chunks: list[int], garbage: float
) -> tuple[list[int], dict[str, float], list[int]]:
    """Run one batch through ``term`` as RolloutEngine does: every chunk (sizes cycling through
    ``chunks``, any alignment) the rows still generating gain up to a chunk of tokens, row i
    ending after ``len(rows[i])``; the rows sampled in the chunk are observed with the KL so far
    (``garbage`` past each row's length); a row that ends or is cut leaves the batch.
    Returns the cuts (-1: not cut), the batch's metrics and the tokens kept per row."""
    lengths = [len(kl) for kl in rows]
    width = max(lengths)
    kl = torch.full((len(rows), width), garbage, dtype=torch.float32)
    for i, values in enumerate(rows):
        kl[i, : lengths[i]] = torch.tensor(values, dtype=torch.float32)
    term.begin_batch(len(rows), width)
    cuts = [-1] * len(rows)
    alive, start, n = list(range(len(rows))), 0, 0
    while alive:
        step = chunks[n % len(chunks)]
        n += 1
        seen = [min(lengths[i], start + step) for i in alive]
        end = max(seen)
        view = kl[alive, :end].clone()
        for j, length in enumerate(seen):
            view[j, length:] = garbage  # the engine's buffer holds no KL there yet
        out = term.observe(torch.tensor(alive), view, torch.tensor(seen)).tolist()
        for i, cut in zip(alive, out, strict=True):
            cuts[i] = cut
        alive = [i for i, s, c in zip(alive, seen, out, strict=True) if c < 0 and s < lengths[i]]
        start = end
    cut = torch.tensor([c if c >= 0 else n for c, n in zip(cuts, lengths, strict=True)])
    kept = term.kept_tokens(cut, kl, torch.tensor(lengths)).tolist()
    return cuts, term.end_batch(), kept


def _trace(rng: random.Random, length: int) -> list[float]:
    """A KL trace mixing noise, planted low stretches, exact ties and non-finite values."""
    if length == 0:
        return []
    if rng.random() < 0.3:  # values whose window means hit a 0.5 threshold exactly
        return [rng.choice([0.0, 0.0, 1.0]) for _ in range(length)]
    kl = [rng.random() for _ in range(length)]
    for _ in range(rng.randint(0, 2)):
        start, span = rng.randrange(length), rng.randint(0, length // 2)
        for t in range(start, min(length, start + span)):
            kl[t] *= 0.15
    for _ in range(rng.choice([0, 0, 1, 2])):
        kl[rng.randrange(length)] = rng.choice([math.nan, math.inf])
    return array("f", kl).tolist()  # float32 values, as the engine records them


def _random_rule(rng: random.Random) -> dict[str, int]:
    window = rng.randint(1, 12)
    return dict(
        window=window,
        stride=rng.randint(1, window + 3),  # overlapping, adjacent and gapped windows
        patience=rng.randint(1, 5),
        exempt=rng.choice([0, 0, rng.randint(1, 15)]),
    )


def _chunkings(rng: random.Random, stride: int) -> list[list[int]]:
    """The engine's default (the stride), strict lockstep, and sizes that do not divide it."""
    odd = rng.choice([s for s in range(2, 2 * stride + 2) if stride % s])
    return [[stride], [1], [odd], [rng.randint(1, 9) for _ in range(5)]]


def test_oracle_on_hand_computed_cases() -> None:
    # window 4, stride 4: means 1, 1, 0.1, 0.1, 0.1, 1 -> third low window ends at t=20
    kl = _planted((HIGH, 8), (LOW, 12), (HIGH, 4))
    assert oracle_scan(kl, threshold=0.5, window=4, stride=4, patience=3, exempt=0) == (
        8,
        pytest.approx(LOW),
    )
    # window 3, stride 2: windows [0,3)=2/3, [2,5)=0, [4,7)=0, [6,9)=1/3 ([8,11) does not fit)
    kl = [1, 1, 0, 0, 0, 0, 0, 1, 0, 1]
    assert oracle_scan(kl, threshold=0.5, window=3, stride=2, patience=3, exempt=0) == (2, 0.0)
    assert oracle_scan(kl, threshold=0.5, window=3, stride=2, patience=4, exempt=0) == (None, 0.0)
    # exempt 3 skips the windows at 0 and 2: the run starts at 4 and lasts 2 windows
    assert oracle_scan(kl, threshold=0.5, window=3, stride=2, patience=2, exempt=3) == (4, 0.0)
    # stride 5 > window 2: windows [0,2), [5,7), [10,12); tokens 2-4 and 7-9 are never seen
    kl = [0, 0, 9, 9, 9, 0, 0, 9, 9, 9, 0, 0]
    assert oracle_scan(kl, threshold=0.5, window=2, stride=5, patience=3, exempt=0) == (0, 0.0)
    # a NaN window resets the run and is not a minimum: windows 0.2, nan, 0.3, 0.3
    kl = [0.2, 0.2, math.nan, 0.0, 0.3, 0.3, 0.3, 0.3]
    assert oracle_scan(kl, threshold=0.5, window=2, stride=2, patience=2, exempt=0) == (
        4,
        pytest.approx(0.2),
    )
    assert oracle_quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert oracle_quantile([0.0, 10.0], 0.7) == pytest.approx(7.0)
    assert oracle_quantile([5.0], 0.9) == 5.0


@pytest.mark.parametrize(
    ("kl", "rule", "cut"),
    [
        # window 4, stride 2: windows at 0, 2, ..., 10 have means 1, .5, 0, 0, .5, 1 -> cut 4
        (_planted((1.0, 4), (0.0, 6), (1.0, 4)), dict(window=4, stride=2, patience=2), 4),
        # same trace, patience 3: only two low windows (a mean of .5 is not < .5)
        (_planted((1.0, 4), (0.0, 6), (1.0, 4)), dict(window=4, stride=2, patience=3), None),
        # window 3, stride 2, exempt 3: windows at 4 and 6 (means 0, 1/3) -> cut 4
        ([1, 1, 0, 0, 0, 0, 0, 1, 0, 1], dict(window=3, stride=2, patience=2, exempt=3), 4),
        # window 2, stride 5: low windows [0,2), [5,7), [10,12) despite the 9s between them
        ([0, 0, 9, 9, 9, 0, 0, 9, 9, 9, 0, 0], dict(window=2, stride=5, patience=3), 0),
        # window 1, stride 1, patience 3: the first three consecutive tokens below 0.5 are 5-7
        ([0, 1, 0, 0, 1, 0, 0, 0, 1], dict(window=1, stride=1, patience=3), 5),
    ],
)
def test_kat_cut_and_online_rule_on_hand_computed_cases(kl, rule, cut) -> None:
    rule = {"exempt": 0, **rule}
    assert kat_cut(kl, kat_rule(threshold=0.5, **rule)) == cut
    for chunks in ([rule["stride"]], [1], [3], [7, 2]):
        found, _, _ = drive_like_engine(
            KATTerminator(kat_rule(threshold=0.5, **rule)), [kl], chunks, math.nan
        )
        assert found == [-1 if cut is None else cut]


def test_kat_cut_and_minimum_equal_the_oracle() -> None:
    rng = random.Random(0)
    outcomes = set()
    for _ in range(400):
        rule = _random_rule(rng)
        kl = _trace(rng, rng.randint(0, 80))
        threshold = 0.5 if rng.random() < 0.3 else rng.uniform(0.05, 0.6)
        cut, minimum = oracle_scan(kl, threshold=threshold, **rule)
        assert kat_cut(kl, kat_rule(threshold=threshold, **rule)) == cut, (kl, rule, threshold)
        outcomes.add(cut is None)
        stop = (
            None if cut is None else cut + rule["window"] + (rule["patience"] - 1) * rule["stride"]
        )
        found = kat_window_minimum(
            kl, kat_rule(**{k: rule[k] for k in ("window", "stride", "exempt")}), stop=stop
        )
        assert found == (None if minimum is None else pytest.approx(minimum, rel=1e-12)), (kl, rule)
    assert outcomes == {True, False}


def test_online_fixed_threshold_equals_the_oracle_under_any_chunking() -> None:
    rng = random.Random(1)
    fired = not_fired = 0
    for case in range(60):
        rule = _random_rule(rng)
        threshold = 0.5 if case % 3 == 0 else rng.uniform(0.1, 0.5)
        rows = [_trace(rng, rng.randint(1, 90)) for _ in range(rng.randint(1, 7))]
        expected, metrics = OracleKAT(threshold=threshold, **rule).batch(rows)
        fired += sum(c >= 0 for c in expected)
        not_fired += sum(c < 0 for c in expected)
        for chunks in _chunkings(rng, rule["stride"]):
            term = KATTerminator(kat_rule(threshold=threshold, **rule))
            garbage = rng.choice([math.nan, 0.0, 1e9])
            cuts, found, _ = drive_like_engine(term, rows, chunks, garbage)
            context = (rule, threshold, chunks, rows)
            assert cuts == expected, context
            assert found == pytest.approx(metrics), context
    assert fired > 30 and not_fired > 30


@pytest.mark.parametrize("seed", range(4))
def test_online_adaptive_threshold_equals_the_oracle_over_batches(seed: int) -> None:
    rng = random.Random(100 + seed)
    rule = _random_rule(rng)
    settings = dict(
        quantile=rng.choice([0.3, 0.5, 0.7, 0.9]),
        buffer_size=rng.randint(5, 30),
        warmup_steps=rng.randint(0, 3),
    )
    settings["min_buffer"] = rng.randint(1, settings["buffer_size"])
    term, oracle = KATTerminator(kat_rule(**settings, **rule)), OracleKAT(**settings, **rule)
    active = 0
    for _ in range(12):
        rows = [_trace(rng, rng.randint(1, 70)) for _ in range(rng.randint(1, 6))]
        chunks = rng.choice(_chunkings(rng, rule["stride"]))
        expected, metrics = oracle.batch(rows)
        cuts, found, _ = drive_like_engine(term, rows, chunks, rng.choice([math.nan, 0.0]))
        assert cuts == expected, (rule, settings, chunks, rows)
        assert found == pytest.approx(metrics, nan_ok=True)
        assert term.buffer.tolist() == pytest.approx(oracle.buffer, rel=1e-12)
        active += metrics["kat/active"] == 1.0
        if rng.random() < 0.7:
            term.on_optimizer_step()
            oracle.steps += 1
    assert active > 0


# --- phases (stage-wise supervision and the analyses) ---------------------------------------


def oracle_phases(
    kl: list[float], *, threshold: float, window: int, stride: int, patience: int, exempt: int
) -> tuple[int, int]:
    """(pre_end, agreement_end) by direct window means: the first run of ``patience`` low
    windows, extended while the next window is low; (length, length) without a detection."""
    starts = [s for s in range(0, len(kl) - window + 1, stride) if s >= exempt]
    means = [math.fsum(kl[s : s + window]) / window for s in starts]
    low = [math.isfinite(m) and m < threshold for m in means]
    run = 0
    for i in range(len(starts)):
        run = run + 1 if low[i] else 0
        if run == patience:
            last = i
            while last + 1 < len(starts) and low[last + 1]:
                last += 1
            end = len(kl) if last == len(starts) - 1 else starts[last] + window
            return starts[i - patience + 1], end
    return len(kl), len(kl)


def _segments(kl: list[float], **rule: float) -> tuple[int, int, int]:
    seg = segment_phases(kl, kat_rule(**rule))
    return seg.pre_end, seg.agreement_end, seg.length


@pytest.mark.parametrize(
    ("kl", "rule", "bounds"),
    [
        # trap then recovery: windows of 4 at 16..36 are low, the one at 40 is high
        (_planted((HIGH, 16), (LOW, 24), (HIGH, 8)), dict(window=4, patience=2), (16, 40, 48)),
        # trap to the end: the last 2 tokens fit no window, the run lasts to the last window
        (_planted((HIGH, 8), (LOW, 22)), dict(window=4, patience=3), (8, 30, 30)),
        # a dip of 7 tokens holds one low window of 4: no detection, all pre-agreement
        (_planted((HIGH, 10), (LOW, 7), (HIGH, 10)), dict(window=4, patience=2), (27, 27, 27)),
        # a short dip is skipped, the later trap (windows at 20..32) found
        (
            _planted((HIGH, 8), (LOW, 4), (HIGH, 8), (LOW, 16), (HIGH, 4)),
            dict(window=4, patience=2),
            (20, 36, 40),
        ),
        # stride 2: windows at 10..18 hold >= 3 low tokens; the one at 20 holds 2 (mean .55)
        (
            _planted((HIGH, 10), (LOW, 12), (HIGH, 10)),
            dict(window=4, stride=2, patience=2),
            (10, 22, 32),
        ),
        # a NaN in window [16, 20) ends the agreement like it resets KAT's counter
        (
            _planted((HIGH, 8), (LOW, 8), (math.nan, 1), (LOW, 15)),
            dict(window=4, patience=2),
            (8, 16, 32),
        ),
        # exempt tokens are never agreement
        (_planted((LOW, 32)), dict(window=4, patience=2, exempt=8), (8, 32, 32)),
    ],
)
def test_phases_on_hand_computed_traces(kl, rule, bounds) -> None:
    assert _segments(kl, threshold=0.5, **rule) == bounds
    seg = segment_phases(kl, kat_rule(threshold=0.5, **rule))
    pre, end, length = bounds
    assert (seg.detected, seg.stays_low) == (pre < length, pre < length and end == length)
    ids = seg.phase_ids(length + 2).tolist()
    assert ids == [PRE] * pre + [AGREEMENT] * (end - pre) + [POST] * (length - end) + [PADDING] * 2


def test_phases_equal_the_oracle() -> None:
    rng = random.Random(2)
    detected = 0
    for _ in range(300):
        rule = _random_rule(rng)
        kl = _trace(rng, rng.randint(0, 80))
        threshold = 0.5 if rng.random() < 0.3 else rng.uniform(0.05, 0.6)
        pre, end = oracle_phases(kl, threshold=threshold, **rule)
        assert _segments(kl, threshold=threshold, **rule) == (pre, end, len(kl)), (kl, rule)
        detected += pre < len(kl)
    assert detected > 50


def test_phase_marker_keeps_the_oracle_phases_under_any_chunking() -> None:
    rng = random.Random(3)
    for case in range(30):
        rule = _random_rule(rng)
        threshold = 0.5 if case % 2 else rng.uniform(0.1, 0.5)
        rows = [_trace(rng, rng.randint(1, 70)) for _ in range(rng.randint(1, 6))]
        phases = [oracle_phases(kl, threshold=threshold, **rule) for kl in rows]
        bounds = [(pre, end, len(kl)) for (pre, end), kl in zip(phases, rows, strict=True)]
        for column, supervise in enumerate(SUPERVISE):
            marker = KATPhaseMarker(kat_rule(threshold=threshold, **rule), supervise=supervise)
            chunks = rng.choice(_chunkings(rng, rule["stride"]))
            cuts, metrics, kept = drive_like_engine(marker, rows, chunks, math.nan)
            assert cuts == [-1] * len(rows)  # the engine is never asked to stop a row
            assert kept == [b[column] for b in bounds], (rule, threshold, chunks, rows)
            pre, end, length = (sum(b[i] for b in bounds) / len(rows) for i in range(3))
            assert metrics["kat/pre_tokens"] == pytest.approx(pre)
            assert metrics["kat/agreement_tokens"] == pytest.approx(end - pre)
            assert metrics["kat/post_tokens"] == pytest.approx(length - end)


def _random_kl(gen: torch.Generator, batch: int, total: int) -> torch.Tensor:
    """Uniform KL with planted low stretches, so that some rows fire and some do not."""
    kl = torch.rand(batch, total, generator=gen)
    for row in range(batch):
        start = int(torch.randint(0, total, (1,), generator=gen))
        span = int(torch.randint(0, total // 2, (1,), generator=gen))
        kl[row, start : start + span] *= 0.2
    kl[torch.rand(batch, total, generator=gen) < 0.005] = math.nan
    return kl


def test_observe_skips_fired_rows_and_returns_minus_one_elsewhere() -> None:
    term = KATTerminator(kat_rule(window=2, patience=1, threshold=0.5))
    term.begin_batch(2, 8)
    kl = torch.tensor([[LOW] * 4, [HIGH] * 4])
    rows, lengths = torch.tensor([0, 1]), torch.tensor([4, 4])
    assert term.observe(rows, kl, lengths).tolist() == [0, -1]
    assert term.observe(rows, kl, lengths).tolist() == [-1, -1]
    assert term.observe(rows[:0], kl[:0], lengths[:0]).tolist() == []


def test_observe_requires_begin_batch() -> None:
    term = KATTerminator(kat_rule(threshold=0.5))
    with pytest.raises(RuntimeError, match="begin_batch"):
        term.observe(torch.tensor([0]), torch.zeros(1, 4), torch.tensor([4]))


def test_observe_across_inference_mode_boundaries() -> None:
    term = KATTerminator(kat_rule(window=2, patience=2, threshold=0.5))
    with torch.inference_mode():
        term.begin_batch(1, 8)
    out = term.observe(torch.tensor([0]), torch.full((1, 2), LOW), torch.tensor([2]))
    with torch.inference_mode():
        out2 = term.observe(torch.tensor([0]), torch.full((1, 4), LOW), torch.tensor([4]))
    assert out.tolist() == [-1] and out2.tolist() == [0]
    assert term.end_batch()["kat/buffer_size"] == 1.0


# --- adaptive threshold -------------------------------------------------------------------


def _adaptive(**overrides: float) -> KATTerminator:
    settings = dict(window=2, patience=1, quantile=0.5, buffer_size=6, min_buffer=4, warmup_steps=0)
    return KATTerminator(kat_rule(**settings | overrides))


def _flat_batch(values: list[float], total: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    kl = torch.tensor(values, dtype=torch.float64)[:, None].expand(-1, total).contiguous()
    return kl, torch.full((len(values),), total)


def test_adaptive_inactive_until_min_buffer_but_collects_minima() -> None:
    term = _adaptive()
    kl, lengths = _flat_batch([0.0, 0.3])
    cuts, metrics = _run_batch(term, kl, lengths, [2, 4])
    assert cuts.tolist() == [-1, -1]
    assert math.isnan(metrics["kat/threshold"]) and metrics["kat/active"] == 0.0
    assert metrics["kat/buffer_size"] == 2.0 and metrics["kat/cut_rows"] == 0.0
    cuts, metrics = _run_batch(term, kl, lengths, [4])
    assert cuts.tolist() == [-1, -1] and metrics["kat/active"] == 0.0
    assert metrics["kat/threshold"] == pytest.approx(0.15)
    assert term.buffer.tolist() == pytest.approx([0.0, 0.3, 0.0, 0.3])
    # buffer [0, .3, 0, .3] -> median 0.15: row 0 (0.0) cut at 0, row 1 (0.3) kept
    cuts, metrics = _run_batch(term, kl, lengths, [4])
    assert cuts.tolist() == [0, -1]
    assert metrics["kat/active"] == 1.0 and metrics["kat/cut_rows"] == 1.0


def test_adaptive_inactive_until_warmup() -> None:
    term = _adaptive(warmup_steps=3, min_buffer=1)
    kl, lengths = _flat_batch([0.0, 0.3])
    assert _run_batch(term, kl, lengths, [4])[0].tolist() == [-1, -1]
    term.on_optimizer_step()
    term.on_optimizer_step()
    cuts, metrics = _run_batch(term, kl, lengths, [4])
    assert cuts.tolist() == [-1, -1] and metrics["kat/active"] == 0.0
    term.on_optimizer_step()
    cuts, metrics = _run_batch(term, kl, lengths, [4])
    assert cuts.tolist() == [0, -1] and metrics["kat/active"] == 1.0


def test_threshold_is_quantile_of_buffer_and_fifo_eviction() -> None:
    term = _adaptive(quantile=0.7, buffer_size=5, min_buffer=5)
    gen = torch.Generator().manual_seed(0)
    pushed: list[float] = []
    for _ in range(4):
        values = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).tolist()
        kl, lengths = _flat_batch(values)
        expected = torch.quantile(torch.tensor(pushed[-5:]), 0.7) if pushed else math.nan
        cuts, metrics = _run_batch(term, kl, lengths, [4])
        if pushed:
            assert metrics["kat/threshold"] == pytest.approx(float(expected))
        pushed += values
        assert term.buffer.tolist() == pytest.approx(pushed[-5:])  # oldest evicted, row order
        assert metrics["kat/buffer_size"] == min(len(pushed), 5)


def test_threshold_snapshot_fixed_during_batch() -> None:
    term = _adaptive(warmup_steps=1, min_buffer=2)
    kl, lengths = _flat_batch([0.5, 0.5])
    _run_batch(term, kl, lengths, [4])  # buffer [0.5, 0.5], no step yet
    term.begin_batch(2, 4)
    term.on_optimizer_step()  # warm-up completes mid-batch: takes effect next batch
    low = torch.zeros(2, 4)
    assert term.observe(torch.tensor([0, 1]), low, torch.tensor([4, 4])).tolist() == [-1, -1]
    assert term.end_batch()["kat/active"] == 0.0
    # now active with threshold quantile([.5, .5, 0, 0], .5) = 0.25, fixed for the whole batch
    term.begin_batch(2, 4)
    row0 = term.observe(torch.tensor([0]), torch.full((1, 2), 0.2), torch.tensor([2]))
    row1 = term.observe(torch.tensor([1]), torch.full((1, 4), 0.3), torch.tensor([4]))
    assert row0.tolist() == [0] and row1.tolist() == [-1]
    metrics = term.end_batch()
    assert metrics["kat/threshold"] == pytest.approx(0.25) and metrics["kat/cut_rows"] == 1.0


def test_fixed_threshold_ignores_buffer_state() -> None:
    term = KATTerminator(
        kat_rule(window=2, patience=1, threshold=0.05, min_buffer=512, warmup_steps=50)
    )
    kl, lengths = _flat_batch([0.0, 0.1])
    cuts, metrics = _run_batch(term, kl, lengths, [4])
    assert cuts.tolist() == [0, -1]
    assert metrics["kat/threshold"] == 0.05 and metrics["kat/active"] == 1.0


# --- state ---------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _drive(term: Terminator, seed: int, batches: int) -> list:
    """Several batches (random KL, lengths, chunking) with optimizer steps between them."""
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(batches):
        kl = _random_kl(gen, 6, 48)
        lengths = torch.randint(10, 49, (6,), generator=gen)
        ends = sorted(set(torch.randint(1, 48, (4,), generator=gen).tolist()) | {48})
        cuts, metrics = _run_batch(term, kl, lengths, ends)
        term.on_optimizer_step()
        history.append((cuts.tolist(), {k: round(v, 12) for k, v in metrics.items()}))
    return history


def _kat_for_state() -> KATTerminator:
    return KATTerminator(
        kat_rule(
            window=4,
            stride=2,
            patience=2,
            quantile=0.6,
            buffer_size=20,
            min_buffer=8,
            warmup_steps=3,
        )
    )


def test_kat_state_round_trip() -> None:
    term = _kat_for_state()
    warm = _drive(term, seed=1, batches=3)
    assert all(m["kat/active"] == 0.0 for _, m in warm)
    state = _roundtrip(term.state_dict())
    assert state["optimizer_steps"] == 3 and state["buffer"].numel() == term.buffer.numel()
    restored = _kat_for_state()
    restored.load_state_dict(state)
    later, later_restored = _drive(term, 2, 4), _drive(restored, 2, 4)
    assert later == later_restored
    assert any(m["kat/active"] == 1.0 and m["kat/cut_rows"] > 0 for _, m in later)
    assert torch.equal(term.buffer, restored.buffer)


def test_state_dict_is_a_copy() -> None:
    term = _adaptive()
    _run_batch(term, *_flat_batch([0.1, 0.2]), [4])
    state = term.state_dict()
    _run_batch(term, *_flat_batch([0.3]), [4])
    assert state["buffer"].tolist() == pytest.approx([0.1, 0.2])


# --- baselines ----------------------------------------------------------------------------


def test_no_termination() -> None:
    term = NoTermination()
    assert term.begin_batch(3, 17).tolist() == [17] * 3
    assert term.observe(torch.tensor([0]), torch.zeros(1, 4), torch.tensor([4])).tolist() == [-1]
    assert term.end_batch() == {} and not term.needs_kl


def test_fixed_prefix_caps() -> None:
    term = FixedPrefix(10)
    assert term.begin_batch(3, 5).tolist() == [5, 5, 5]
    caps = term.begin_batch(2, 20)
    assert caps.tolist() == [10, 10] and caps.dtype == torch.long
    assert not term.needs_kl


def test_random_termination_reproducible() -> None:
    term = RandomTermination(mean_length=30, exempt=5)
    caps = [term.begin_batch(64, 1000, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(caps[0], caps[1]) and not torch.equal(caps[0], caps[2])
    assert caps[0].dtype == torch.long and int(caps[0].min()) >= 6


def test_random_termination_mean_length_and_clipping() -> None:
    gen = torch.Generator().manual_seed(0)
    term = RandomTermination(mean_length=50, exempt=10)
    assert term.hazard == pytest.approx(1 / 40)
    caps = term.begin_batch(20000, 10**9, gen).double()
    assert caps.mean().item() == pytest.approx(50, abs=1.0)  # std error ~0.28
    assert caps.var().item() == pytest.approx((1 - 1 / 40) * 40**2, rel=0.1)  # geometric
    assert int(RandomTermination(hazard=0.01).begin_batch(500, 20, gen).max()) == 20
    assert RandomTermination(hazard=1.0, exempt=3).begin_batch(4, 100, gen).tolist() == [4] * 4
    same = RandomTermination(hazard=1 / 40, exempt=10)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(same.begin_batch(50, 500, g1), term.begin_batch(50, 500, g2))


# --- composition --------------------------------------------------------------------------


def test_composite_caps_are_elementwise_min() -> None:
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    random_caps = RandomTermination(mean_length=12).begin_batch(200, 100, gen_a)
    composite = CompositeTerminator([RandomTermination(mean_length=12), FixedPrefix(10)])
    caps = composite.begin_batch(200, 100, gen_b)
    assert torch.equal(caps, random_caps.clamp(max=10))
    assert not composite.needs_kl


def test_composite_earliest_stop_wins() -> None:
    gen = torch.Generator().manual_seed(5)
    kl = _random_kl(gen, 8, 80)
    lengths = torch.randint(20, 81, (8,), generator=gen)
    settings = [
        dict(window=4, patience=2, threshold=0.25),
        dict(window=6, stride=2, patience=3, threshold=0.3),
    ]
    composite = CompositeTerminator(
        [FixedPrefix(70)] + [KATTerminator(kat_rule(**s)) for s in settings]
    )
    assert composite.needs_kl
    cuts, metrics = _run_batch(composite, kl, lengths, [13, 40, 57, 80])
    for row in range(8):
        seq = kl[row, : min(int(lengths[row]), 70)]
        found = [kat_cut(seq, kat_rule(**s)) for s in settings]
        found = [c for c in found if c is not None]
        assert cuts[row].item() == (min(found) if found else -1)
    assert {"kat/threshold", "kat/buffer_size", "kat/active", "kat/cut_rows"} <= metrics.keys()


def test_composite_state_round_trip() -> None:
    def make() -> CompositeTerminator:
        return CompositeTerminator([FixedPrefix(40), _kat_for_state()])

    term = make()
    _drive(term, seed=3, batches=3)
    state = _roundtrip(term.state_dict())
    assert set(state) == {"0", "1"}
    restored = make()
    restored.load_state_dict(state)
    assert _drive(term, 4, 4) == _drive(restored, 4, 4)
    with pytest.raises(ValueError, match="children"):
        CompositeTerminator([FixedPrefix(4)]).load_state_dict(state)


# --- factory, validation, repr ------------------------------------------------------------


def test_rule_value_stride_defaults_to_window_and_is_frozen() -> None:
    rule = kat_rule(window=16, quantile=0.9)
    assert rule == KATRule(16, 16, 4, 0, ThresholdPolicy(quantile=0.9))
    assert rule.stride == 16 and rule.detection_lag == 16 + 3 * 16
    assert kat_rule(window=8, stride=2).stride == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.window = 8  # type: ignore[misc]
    fixed = rule.with_fixed_threshold(0.25)
    assert fixed.threshold.fixed == 0.25 and rule.threshold.fixed is None
    assert fixed.with_quantile(0.5).threshold == ThresholdPolicy(quantile=0.5)
    assert kat_rule_from_settings(
        {"_target_": "x", "window": 8, "stride": None, "patience": 2},
        {"patience": None, "exempt": 3},
    ) == kat_rule(window=8, patience=2, exempt=3)


def test_threshold_policy_of_a_buffer_and_when_active() -> None:
    adaptive = ThresholdPolicy(quantile=0.5, buffer_size=8, min_buffer=2, warmup_steps=1)
    assert adaptive.of(torch.tensor([3.0, 1.0, 2.0, 4.0])) == 2.5
    assert math.isnan(adaptive.of(torch.empty(0)))
    assert not adaptive.active(1, 5) and not adaptive.active(2, 0) and adaptive.active(2, 1)
    fixed = ThresholdPolicy(fixed=0.3)
    assert fixed.of(torch.tensor([9.0])) == 0.3 and fixed.active(0, 0)


def test_kat_calibrated_is_the_quantile_of_the_traces_minima() -> None:
    traces = [[0.4, 0.4, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3], [0.2]]  # minima 0.1, 0.3; none
    rule = kat_rule(window=2, patience=1, quantile=0.5)
    assert kat_calibrated(rule, traces).threshold.fixed == pytest.approx(0.2)
    assert kat_calibrated(rule.with_fixed_threshold(0.05), traces).threshold.fixed == 0.05
    assert kat_window_minima(traces, rule).tolist() == pytest.approx([0.1, 0.3, math.inf])
    assert kat_cuts(traces, rule, threshold=0.2).tolist() == [2, -1, -1]
    with pytest.raises(ValueError, match="no window of 2 tokens"):
        kat_calibrated(rule, [[0.1]])
    with pytest.raises(ValueError, match="needs a threshold"):
        kat_cut([0.1, 0.1], rule)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KATTerminator(kat_rule(window=0)), "window"),
        (lambda: KATTerminator(kat_rule(stride=0)), "stride"),
        (lambda: KATTerminator(kat_rule(patience=0)), "patience"),
        (lambda: KATTerminator(kat_rule(quantile=1.0)), "quantile"),
        (lambda: KATTerminator(kat_rule(quantile=0.0)), "quantile"),
        (lambda: KATTerminator(kat_rule(min_buffer=5000)), "min_buffer"),
        (lambda: KATTerminator(kat_rule(min_buffer=0)), "min_buffer"),
        (lambda: KATTerminator(kat_rule(warmup_steps=-1)), "warmup_steps"),
        (lambda: KATTerminator(kat_rule(exempt=-1)), "exempt"),
        (lambda: KATTerminator(kat_rule(threshold=math.nan)), "threshold"),
        (lambda: kat_cut([0.0], kat_rule(threshold=0.1, window=0, patience=1)), "window"),
        (lambda: kat_cut([[0.0]], kat_rule(threshold=0.1, window=1, patience=1)), "1-D"),
        (lambda: kat_window_minimum([0.0], kat_rule(window=1), stop=-1), "stop"),
        (lambda: FixedPrefix(0), "budget"),
        (lambda: RandomTermination(), "exactly one"),
        (lambda: RandomTermination(hazard=0.1, mean_length=10), "exactly one"),
        (lambda: RandomTermination(hazard=0.0), "hazard"),
        (lambda: RandomTermination(hazard=1.5), "hazard"),
        (lambda: RandomTermination(mean_length=5, exempt=5), "mean_length"),
        (lambda: RandomTermination(hazard=0.1, exempt=-1), "exempt"),
        (lambda: CompositeTerminator([]), "at least one"),
    ],
)
def test_validation_errors(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_reprs_show_settings() -> None:
    assert repr(FixedPrefix(1024)) == "FixedPrefix(budget=1024)"
    assert "hazard=0.01" in repr(RandomTermination(hazard=0.01, exempt=2))
    text = repr(KATTerminator(kat_rule(window=32, stride=8, exempt=16, threshold=0.1)))
    for part in (
        "window=32",
        "stride=8",
        "patience=4",
        "quantile=0.7",
        "exempt=16",
        "fixed=0.1",
    ):
        assert part in text
    both = CompositeTerminator([FixedPrefix(8), KATTerminator(kat_rule())])
    assert repr(both).startswith("CompositeTerminator([FixedPrefix(budget=8), KATTerminator(")
