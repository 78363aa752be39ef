"""The testbed's trap check (issue 14): whether KAT's cuts on a long-horizon task hit derailed
rollouts or correct ones. The task is a line-by-line one (the collatz chain or the running
total); what differs between tasks sits behind ``trap.tasks.TrapTask``, chosen by the task's
settings object (``CollatzTaskConfig`` / ``RunningSumConfig``) every function here takes.

Three measurements, all on the student's own uncut rollouts (nothing is planted):

1. the forced-loop probe of the teacher (:func:`forced_loop_accuracy`): ``k`` correct lines,
   then the last of them repeated; the teacher's top-1 accuracy on each repeated copy must rise
   with the copy index if it copies in context;
2. the KL after derailment (:func:`kl_after_derailment`) against correct rollouts' KL at the
   same token positions;
3. KAT's offline cut rate (:func:`offline_kat_cuts`, the threshold a quantile of the rollouts'
   window minima as in KAT's buffer) on derailed against correct rollouts, with Fisher's exact
   test (:func:`fisher_exact`).

Rollouts are classified by :func:`classify`: ``correct`` (the task's verifier accepts it),
``degenerate`` (the task's repetition rule: for collatz ``collatz.repetition_onset``, some line
text or step result value occurs a third time; for the running total
``running_sum.repetition_onset``, also a list item added a third time), ``capped`` (not
degenerate, ran to the token cap) and ``wrong`` (stopped by itself, rejected). The derailment
onset is the first token of the first line the verifier rejects; the KL "after" it starts at
the next line, so the error line itself (where KL spikes) is not counted.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.analysis.rollouts import uncut_rollouts
from kat_research.analysis.trap.tasks import TaskConfig, trap_task
from kat_research.console import Progress
from kat_research.data.prompts import PromptCollator, format_prompt
from kat_research.data.sources import Row
from kat_research.losses import per_token_reverse_kl
from kat_research.rollout import SamplingConfig
from kat_research.termination import KATRule, kat_calibrated, kat_cuts

CATEGORIES = ("correct", "wrong", "degenerate", "capped")


@dataclass(frozen=True)
class RolloutVerdict:
    """A rollout's category and where it derails (token index; None for correct ones)."""

    category: str
    onset: int | None  # first token of the first rejected line
    after: int | None  # first token of the line after it (where "after derailment" starts)
    loop_onset: int | None  # first token of the line where the repetition rule fires


@dataclass(frozen=True)
class ScoredRollout:
    """One uncut student rollout with the teacher's per-token KL and its verdict."""

    start: str  # the problem (its prompt text: the start value for collatz)
    text: str  # generated text, one character per token, the end token left out
    stop: str  # eos | max_tokens
    kl: torch.Tensor  # per generated token, float64 on the CPU
    verdict: RolloutVerdict


def token_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text of ``ids`` with one character per token (the testbed tokenizer is
    character-level); a special token (e.g. a stray ``<|im_start|>``) becomes U+FFFD, so
    character and token positions stay equal."""
    pieces = [tokenizer.decode([t]) for t in ids]
    return "".join(p if len(p) == 1 else "\ufffd" for p in pieces)


@torch.no_grad()
def sample_scored_rollouts(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    collate: PromptCollator,
    rows: Sequence[Row],
    cfg: TaskConfig,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> list[ScoredRollout]:
    """One uncut rollout per row (prompts encoded by ``collate``, the run's data settings),
    sampled by the analyses' one sampler (``rollouts.uncut_rollouts``: the student as OPD
    samples, the teacher scoring every token, full reverse KL), each classified by
    :func:`classify`."""
    tokenizer = collate.tokenizer
    sampling = SamplingConfig(temperature, top_p, max_new_tokens, (tokenizer.eos_token_id,))
    chunks = [rows[lo : lo + batch_size] for lo in range(0, len(rows), batch_size)]
    batches = (collate(chunk) for chunk in chunks)
    out = []
    progress = Progress("student rollouts", len(rows), unit="rollout")
    sampled = uncut_rollouts(
        student, teacher, tokenizer, batches, sampling, seed=seed, progress=progress
    )
    for batch, rollout in zip(chunks, sampled, strict=True):
        for b, row in enumerate(batch):
            length = int(rollout.lengths[b])
            stop = rollout.stop_reason[b]
            ids = rollout.tokens[b, :length].tolist()
            text = token_text(tokenizer, ids[: length - (stop == "eos")])
            kl = rollout.kl[b, :length].double().cpu()
            out.append(
                ScoredRollout(row.problem, text, stop, kl, classify(row.problem, text, stop, cfg))
            )
    return out


def _line_start(text: str, line: int) -> int:
    """Character index where line ``line`` (0-based) of ``text`` starts (len(text) if past)."""
    pos = 0
    for _ in range(line):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    return pos


def classify(
    start: int | str, completion: str, stop_reason: str, cfg: TaskConfig
) -> RolloutVerdict:
    """The category and derailment positions of one rollout (``start``: the problem);
    positions are character indices, which are token indices for the character-level testbed
    tokenizer."""
    task = trap_task(cfg)
    correct, first_error, n_valid = task.verify(str(start), completion)
    loop_line = task.repetition_line(str(start), completion)
    loop = None if loop_line is None else _line_start(completion, loop_line)
    if correct:
        return RolloutVerdict("correct", None, None, None)
    error = first_error if first_error is not None else n_valid
    onset, after = _line_start(completion, error), _line_start(completion, error + 1)
    if loop is not None:
        category = "degenerate"
    elif stop_reason == "max_tokens":
        category = "capped"
    else:
        category = "wrong"
    return RolloutVerdict(category, onset, after, loop)


@torch.no_grad()
def forced_loop_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    starts: Sequence[int | str],
    cfg: TaskConfig,
    *,
    k: int = 4,
    copies: int = 6,
    seed: int = 0,
) -> list[float]:
    """Top-1 accuracy of ``model`` on the tokens of each repeated copy (index 1..``copies``,
    the line's newline included) after ``k`` correct lines, the ``k``-th then repeated.
    Index 0 is the ``k``-th line itself (computed, not copied). Mean over ``starts`` (the
    problems; those whose solution has fewer than ``k`` lines are skipped)."""
    task = trap_task(cfg)
    rng = random.Random(seed)
    hits = [[0, 0] for _ in range(copies + 1)]
    for start in starts:
        lines = task.probe_lines(str(start), k, rng)
        if lines is None:
            continue
        prompt = format_prompt(tokenizer, str(start), "")
        prefix_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        prefix_ids += tokenizer("\n".join(lines[:-1]) + "\n", add_special_tokens=False).input_ids
        spans, ids = [], list(prefix_ids)
        for _ in range(copies + 1):
            line_ids = tokenizer(lines[-1] + "\n", add_special_tokens=False).input_ids
            spans.append((len(ids), len(ids) + len(line_ids)))
            ids += line_ids
        x = torch.tensor([ids], device=model.device)
        predicted = model(input_ids=x).logits[0].argmax(-1)
        for j, (lo, hi) in enumerate(spans):
            ok = predicted[lo - 1 : hi - 1] == x[0, lo:hi]
            hits[j][0] += int(ok.sum())
            hits[j][1] += hi - lo
    return [h / max(1, n) for h, n in hits]


def _token_kl(student: PreTrainedModel, teacher: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """KL(student || teacher) over the full vocabulary at each position of ``ids`` (the
    distribution predicting token i+1 sits at i), as the rollout engine computes d_t."""
    x = torch.tensor([ids], device=teacher.device)
    student_logits = student(input_ids=x.to(student.device)).logits[0]
    teacher_logits = teacher(input_ids=x).logits[0].to(student_logits.device)
    return per_token_reverse_kl(student_logits, teacher_logits, kind="full").cpu()


@torch.no_grad()
def forced_loop_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    starts: Sequence[int | str],
    cfg: TaskConfig,
    *,
    k: int = 4,
    copies: int = 6,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Per copy index 1..``copies``: the mean KL(student || teacher) on the tokens of the
    ``k``-th line repeated verbatim (a forced loop), and on the correct ``k+j``-th line of the
    same problem (the control: the lines a correct rollout writes there). Problems whose
    solution is shorter than ``k + copies`` lines are skipped."""
    task = trap_task(cfg)
    rng = random.Random(seed)
    loop = [[] for _ in range(copies)]
    control = [[] for _ in range(copies)]
    for start in starts:
        lines = task.probe_lines(str(start), k + copies, rng)
        if lines is None:
            continue
        prompt = tokenizer(format_prompt(tokenizer, str(start), ""), add_special_tokens=False)
        prefix = (
            prompt.input_ids
            + tokenizer("\n".join(lines[:k]) + "\n", add_special_tokens=False).input_ids
        )
        for target, continuation in ((loop, [lines[k - 1]] * copies), (control, lines[k:])):
            ids, spans = list(prefix), []
            for line in continuation:
                line_ids = tokenizer(line + "\n", add_special_tokens=False).input_ids
                spans.append((len(ids), len(ids) + len(line_ids)))
                ids += line_ids
            kl = _token_kl(student, teacher, ids)
            for j, (lo, hi) in enumerate(spans):
                target[j].append(float(kl[lo - 1 : hi - 1].mean()))
    return [mean(v) for v in loop], [mean(v) for v in control]


def mean(values: Sequence[float]) -> float:
    """The mean, NaN for no values."""
    return statistics.fmean(values) if values else math.nan


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles, linear interpolation (NaN for no values)."""
    if not values:
        return math.nan, math.nan, math.nan
    if len(values) == 1:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class AfterDerailment:
    """KL after derailment against correct rollouts at the same positions.

    ``derailed`` and ``control`` are per-derailed-rollout means over ``[after, after+horizon)``;
    a control is the mean over the correct rollouts long enough to cover that span (rollouts
    with no such control are left out, counted in ``n_without_control``)."""

    horizon: int
    derailed: list[float]
    control: list[float]
    n_without_control: int

    @property
    def share_below_control(self) -> float:
        pairs = list(zip(self.derailed, self.control, strict=True))
        return sum(d < c for d, c in pairs) / len(pairs) if pairs else math.nan

    @property
    def sign_test_p(self) -> float:
        """Two-sided sign test of derailed vs control (ties dropped)."""
        below = sum(d < c for d, c in zip(self.derailed, self.control, strict=True))
        above = sum(d > c for d, c in zip(self.derailed, self.control, strict=True))
        return binomial_two_sided(below, below + above)


def kl_after_derailment(
    kls: Sequence[torch.Tensor],
    verdicts: Sequence[RolloutVerdict],
    *,
    horizon: int,
    use_loop_onset: bool = False,
) -> AfterDerailment:
    """Per derailed rollout (``kls[i]`` its per-token KL, generated tokens only), the mean KL
    over ``horizon`` tokens from the line after its first error (or from its loop onset),
    against the mean of correct rollouts over the same positions."""
    correct = [kl for kl, v in zip(kls, verdicts, strict=True) if v.category == "correct"]
    derailed, control, missing = [], [], 0
    for kl, v in zip(kls, verdicts, strict=True):
        begin = v.loop_onset if use_loop_onset else v.after
        if v.category == "correct" or begin is None or begin + horizon > kl.numel():
            continue
        same = [
            float(c[begin : begin + horizon].mean())
            for c in correct
            if c.numel() >= begin + horizon
        ]
        if not same:
            missing += 1
            continue
        derailed.append(float(kl[begin : begin + horizon].mean()))
        control.append(mean(same))
    return AfterDerailment(horizon, derailed, control, missing)


@dataclass(frozen=True)
class OfflineCuts:
    """KAT applied offline to uncut rollouts at one threshold."""

    threshold: float
    cut: list[int | None]  # tokens kept per rollout, None when the rule never fires


def offline_kat_cuts(kls: Sequence[torch.Tensor], rule: KATRule) -> OfflineCuts:
    """KAT's cuts on uncut rollouts, its threshold (unless fixed) the rule's quantile of the
    rollouts' window minima (what KAT's buffer holds; :func:`kat_calibrated`)."""
    fixed = kat_calibrated(rule, kls)
    cuts = [c if c >= 0 else None for c in kat_cuts(kls, fixed).tolist()]
    return OfflineCuts(float(fixed.threshold.fixed), cuts)


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial test of ``k`` successes in ``n`` at p=1/2."""
    if n == 0:
        return math.nan
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher's exact test of the 2x2 table [[a, b], [c, d]]: the probability, under
    fixed margins, of tables at most as likely as the observed one."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x: int) -> float:
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    observed = prob(a)
    low, high = max(0, row1 - (n - col1)), min(row1, col1)
    return min(1.0, sum(p for x in range(low, high + 1) if (p := prob(x)) <= observed * (1 + 1e-9)))


def cut_rate_table(cuts: OfflineCuts, verdicts: Sequence[RolloutVerdict]) -> dict[str, float]:
    """Cut counts and rates of derailed (any category but correct) vs correct rollouts, the
    Fisher p-value, and per category its rate and its Fisher p-value against correct."""
    derailed = [
        c is not None for c, v in zip(cuts.cut, verdicts, strict=True) if v.category != "correct"
    ]
    correct = [
        c is not None for c, v in zip(cuts.cut, verdicts, strict=True) if v.category == "correct"
    ]
    a, b = sum(derailed), len(derailed) - sum(derailed)
    c, d = sum(correct), len(correct) - sum(correct)
    out = {
        "threshold": cuts.threshold,
        "n_derailed": len(derailed),
        "n_correct": len(correct),
        "cut_derailed": a,
        "cut_correct": c,
        "rate_derailed": a / len(derailed) if derailed else math.nan,
        "rate_correct": c / len(correct) if correct else math.nan,
        "fisher_p": fisher_exact(a, b, c, d),
    }
    for category in CATEGORIES:
        flags = [
            x is not None for x, v in zip(cuts.cut, verdicts, strict=True) if v.category == category
        ]
        out[f"rate_{category}"] = sum(flags) / len(flags) if flags else math.nan
        out[f"n_{category}"] = len(flags)
        if category != "correct":  # this category against the correct rollouts
            hit = sum(flags)
            out[f"fisher_p_{category}"] = fisher_exact(hit, len(flags) - hit, c, d)
    return out


def cut_offsets(cuts: OfflineCuts, verdicts: Sequence[RolloutVerdict]) -> list[int]:
    """Per cut derailed rollout, its cut minus its derailment onset in tokens: the cut is where
    its low-KL segment begins, so >= 0 means the segment begins at or after the first token of
    the first rejected line (> 0: the kept prefix reaches into that line)."""
    return [
        c - v.onset
        for c, v in zip(cuts.cut, verdicts, strict=True)
        if c is not None and v.category != "correct" and v.onset is not None
    ]


def cut_after_onset_share(cuts: OfflineCuts, verdicts: Sequence[RolloutVerdict]) -> float:
    """Among cut derailed rollouts, the share whose cut falls at or after the derailment
    onset (a cut before the onset discards the error along with the tokens before it)."""
    offsets = cut_offsets(cuts, verdicts)
    return sum(o >= 0 for o in offsets) / len(offsets) if offsets else math.nan


def carried_forward_share(completion: str, first_error: int, cfg: TaskConfig) -> float | None:
    """Among the step lines after line ``first_error``, the share that are a valid step from the
    previous line's own result (the wrong value carried forward); None if there are none."""
    task = trap_task(cfg)
    lines = completion.split("\n")
    previous = task.result(lines[first_error]) if first_error < len(lines) else None
    ok = total = 0
    for line in lines[first_error + 1 :]:
        value = task.result(line)
        if previous is not None and value is not None:
            total += 1
            ok += task.is_step_from(line, previous)
        previous = value
    return ok / total if total else None


def continuation_kind(line: str, wrong: int, right: int, cfg: TaskConfig) -> str:
    """What a next line does after an error line whose result is ``wrong`` (the correct result
    was ``right``): ``carried`` (a valid step from ``wrong``), ``reverted`` (a valid step from
    ``right``) or ``other``."""
    task = trap_task(cfg)
    if task.is_step_from(line, wrong):
        return "carried"
    if task.is_step_from(line, right):
        return "reverted"
    return "other"


def error_prefixes(
    start: int | str, completion: str, cfg: TaskConfig
) -> tuple[str, int, int] | None:
    """(the completion up to and including its first error line and a newline, the wrong
    result written there, the correct one) when the first rejected line is a parsable step
    from the right input with a wrong result; None otherwise."""
    task = trap_task(cfg)
    _, first_error, _ = task.verify(str(start), completion)
    if first_error is None:
        return None
    lines = completion.split("\n")
    if first_error >= len(lines) - 1:  # nothing after it in the rollout
        return None
    found = task.wrong_result(str(start), first_error, lines[first_error])
    if found is None:
        return None
    prefix = "\n".join(lines[: first_error + 1]) + "\n"
    return prefix, *found
