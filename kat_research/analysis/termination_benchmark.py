"""The termination benchmark (issue 23 item 4): every termination rule applied offline to the
same uncut rollouts of a train config's student, scored against the task's verifier.

    python -m kat_research.analysis.termination_benchmark [rollouts=256] [label=...] ...

Rollouts: ``rollouts`` training prompts of the train config (``train_overrides``), sampled once
by the analyses' one sampler (``rollouts.uncut_rollouts``, the run's temperature and top-p),
recording the per-token KL, the student's log-prob of each sampled token and the top-k overlap.
Rules (each through its own online protocol, ``offline_rules.offline_kept``):

- ``kat q=...``: the train config's KAT rule, its threshold the quantile of these rollouts'
  minimum window means (``kat_calibrated``, as the trap analyses calibrate it), at each of
  ``kat_quantiles``; ``kat s=...``: at each fixed threshold of ``kat_thresholds``;
- ``random (matched)``: ``termination.random`` with the hazard at which it keeps, in
  expectation, as many tokens as the train config's KAT quantile (else the first KAT rule;
  ``offline_rules.matched_hazard``), drawn with ``seed``;
- every ``termination.<name>`` of ``rules``; ``progressive_horizon`` at each of ``horizon_steps``.

Scores per rule (:func:`score_rule`): tokens kept (mean, share of generated), and against the
verifier's first error ``e`` (token index of the first invalid line, ``data.first_error``) a
cut is *right* when its kept prefix already holds the error (``e < kept``, as the cut verdicts
logged in training): precision = right cuts / cuts, recall = right cuts / rollouts holding an
error, each with a Wilson 95% interval; the same cuts against the finished category
(``analysis.trap.verdicts.score_cuts``: derailed = not correct); and ``kept - e`` over cut
rollouts holding an error (median, IQR). Writes ``results/<name>.md`` and ``.csv`` (one row per
rule) and ``rollouts.csv`` (one row per rollout, tokens kept per rule) in ``output_dir``.
Settings: conf/analysis_termination_benchmark.yaml.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import output_dir
from kat_research.analysis.offline_rules import Traces, matched_hazard, offline_kept
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches, uncut_rollouts
from kat_research.analysis.runs import checkpoint_file, with_checkpoint_student
from kat_research.analysis.trap.check import quartiles
from kat_research.analysis.trap.verdicts import make_verifier, score_cuts, share
from kat_research.config import CONFIG_DIR, compose
from kat_research.console import Progress
from kat_research.data.first_error import first_error_task
from kat_research.lit.cut_verdicts import decoded, judge_row
from kat_research.provenance import code_commit
from kat_research.rollout import STOP_EOS, Rollout, SamplingConfig
from kat_research.runtime import set_torch_threads
from kat_research.termination import (
    KATRule,
    ProgressiveHorizon,
    RandomTermination,
    Terminator,
    kat_calibrated,
    kat_cuts,
    kat_rule_from_settings,
)


@dataclass(frozen=True)
class Judged:
    """One rollout as the verifier sees it: generated tokens (EOS included), the first error's
    token index (None: no error generated, or a task without a line verifier), its category."""

    generated: int
    error: int | None
    category: str


def score_rule(kept: Sequence[int], judged: Sequence[Judged]) -> dict[str, float]:
    """One rule's cuts (tokens ``kept`` per rollout) against the verifier (module docstring)."""
    if len(kept) != len(judged):
        raise ValueError(f"{len(kept)} cuts for {len(judged)} rollouts")
    generated = [j.generated for j in judged]
    if any(k < 0 or k > g for k, g in zip(kept, generated, strict=True)):
        raise ValueError("tokens kept must lie in [0, generated] for every rollout")
    cut = [k < j.generated for k, j in zip(kept, judged, strict=True)]
    right = sum(
        c and j.error is not None and j.error < k for c, k, j in zip(cut, kept, judged, strict=True)
    )
    with_error = sum(j.error is not None for j in judged)
    offsets = [
        float(k - j.error)
        for c, k, j in zip(cut, kept, judged, strict=True)
        if c and j.error is not None
    ]
    q1, median, q3 = quartiles(offsets)
    by_category = score_cuts(cut, [j.category for j in judged])
    return {
        "n": len(judged),
        "tokens_kept_mean": sum(kept) / len(kept) if kept else math.nan,
        "tokens_kept_share": sum(kept) / sum(generated) if sum(generated) else math.nan,
        "n_cut": sum(cut),
        "n_with_error": with_error,
        "right_cuts": right,
        **share(right, sum(cut), "precision"),
        **share(right, with_error, "recall"),
        **{
            f"{name}_derailed{suffix}": by_category[f"{name}{suffix}"]
            for name in ("precision", "recall")
            for suffix in ("", "_lo", "_hi")
        },
        "cut_rate_correct": by_category["cut_rate_correct"],
        "cut_rate_correct_lo": by_category["cut_rate_correct_lo"],
        "cut_rate_correct_hi": by_category["cut_rate_correct_hi"],
        "fisher_p": by_category["fisher_p"],
        "n_cut_with_error": len(offsets),
        "cut_minus_error_median": median,
        "cut_minus_error_q1": q1,
        "cut_minus_error_q3": q3,
    }


def judge(
    rollouts: Sequence[Rollout],
    batches: Sequence[dict],
    tokenizer,
    data_source: dict,
    verifier_settings: dict,
) -> list[Judged]:
    """Each rollout's verdict: with a line verifier (``data.first_error``) its first error and
    category; otherwise the task's grader (``trap.verdicts.make_verifier``) and no error."""
    task = first_error_task(data_source)
    verifier = None if task is not None else make_verifier(data_source, **verifier_settings)
    cache: dict[int, str] = {}
    out = []
    for rollout, batch in zip(rollouts, batches, strict=True):
        texts, all_ids = [], []
        for b in range(rollout.batch_size):
            stop, length = rollout.stop_reason[b], int(rollout.lengths[b])
            ids = rollout.tokens[b, : length - (stop == STOP_EOS)].tolist()
            text, ends = decoded(tokenizer, ids, cache)
            texts.append(text)
            all_ids.append(ids)
            if task is not None:
                v = judge_row(task, batch["problems"][b], text, ends, len(ends), stop)
                out.append(Judged(length, v.error, v.category))
        if verifier is not None:
            verdicts = verifier.judge(
                batch["problems"], batch["answers"], all_ids, texts, rollout.stop_reason
            )
            out.extend(
                Judged(int(n), None, v.category)
                for n, v in zip(rollout.lengths.tolist(), verdicts, strict=True)
            )
    return out


def rules_kept(
    cfg: DictConfig, train_cfg: DictConfig, traces: Traces, max_new_tokens: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tokens kept per rollout by every rule of the benchmark, and each rule's settings."""
    kept: dict[str, torch.Tensor] = {}
    settings: dict[str, str] = {}
    base = kat_rule_from_settings(OmegaConf.to_container(train_cfg.termination.kat, resolve=True))
    kl = traces.kl_list()
    kat_rules: list[tuple[str, KATRule]] = [
        (f"kat q={q}", kat_calibrated(base.with_quantile(q), kl))
        for q in (cfg.kat_quantiles or [base.threshold.quantile])
    ]
    kat_rules += [(f"kat s={s:g}", base.with_fixed_threshold(s)) for s in cfg.kat_thresholds]
    for name, rule in kat_rules:
        cuts = kat_cuts(kl, rule)
        kept[name] = torch.where(cuts >= 0, cuts, traces.lengths)
        settings[name] = str(rule)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    own = f"kat q={base.threshold.quantile}"  # the train config's own rule, if benchmarked
    matched_to = own if own in kept else kat_rules[0][0]
    random_cfg = train_cfg.termination.random
    exempt = int(random_cfg.exempt)
    target = float(kept[matched_to].double().mean())
    hazard = matched_hazard(traces.lengths, target, exempt)
    terminators: list[tuple[str, Terminator]] = [
        (f"random (matched to {matched_to})", RandomTermination(hazard=hazard, exempt=exempt))
    ]
    for name in cfg.rules:
        if name not in train_cfg.termination:
            raise ValueError(
                f"rules: {name!r} is not a termination.<name> of the train config; choose from "
                f"{sorted(train_cfg.termination)}"
            )
        rule = instantiate(train_cfg.termination[name])
        if isinstance(rule, ProgressiveHorizon):
            for step in cfg.horizon_steps:
                stepped = instantiate(train_cfg.termination[name])
                stepped.load_state_dict({"optimizer_steps": int(step)})
                terminators.append((f"{name} step={step}", stepped))
        else:
            terminators.append((name, rule))
    for name, rule in terminators:
        kept[name] = offline_kept(rule, traces, max_new_tokens, generator)
        settings[name] = repr(rule)
        if isinstance(rule, ProgressiveHorizon):
            step = rule.state_dict()["optimizer_steps"]
            settings[name] += f" at step {step}: cap {rule.horizon(step, max_new_tokens)}"
    return kept, settings


def _ci(row: pd.Series, name: str) -> str:
    if math.isnan(row[name]):
        return "–"
    return f"{row[name]:.2f} [{row[name + '_lo']:.2f}, {row[name + '_hi']:.2f}]"


def markdown(table: pd.DataFrame, header: Sequence[str]) -> str:
    """The benchmark table with its header lines."""
    lines = [
        *header,
        "",
        "| rule | tokens kept, mean | share kept | cut | precision (error before cut) | "
        "recall (of rollouts with an error) | precision (derailed) | recall (derailed) | "
        "cut rate, correct | kept − first error, median [IQR] (n) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.iterrows():
        position = (
            "–"
            if math.isnan(row["cut_minus_error_median"])
            else f"{row['cut_minus_error_median']:.0f} [{row['cut_minus_error_q1']:.0f}, "
            f"{row['cut_minus_error_q3']:.0f}] ({row['n_cut_with_error']:.0f})"
        )
        lines.append(
            f"| {name} | {row['tokens_kept_mean']:.1f} | {row['tokens_kept_share']:.3f} | "
            f"{row['n_cut']:.0f}/{row['n']:.0f} | {_ci(row, 'precision')} | "
            f"{_ci(row, 'recall')} | {_ci(row, 'precision_derailed')} | "
            f"{_ci(row, 'recall_derailed')} | {_ci(row, 'cut_rate_correct')} | {position} |"
        )
    lines += ["", "Rule settings:", ""]
    lines += [f"- `{name}`: {row['settings']}" for name, row in table.iterrows()]
    return "\n".join(lines)


def run(cfg: DictConfig, command: str) -> pd.DataFrame:
    """The benchmark ``cfg`` (conf/analysis_termination_benchmark.yaml) describes, recorded as
    run by ``command``; its table (one row per rule)."""
    set_torch_threads(cfg.threads)
    train_cfg = compose(list(cfg.train_overrides))
    if cfg.student_checkpoint:
        checkpoint_file(cfg.student_checkpoint)
    start = time.perf_counter()
    student = instantiate(train_cfg.model.student)
    if cfg.student_checkpoint:
        student = with_checkpoint_student(student, cfg.student_checkpoint)
    teacher = instantiate(train_cfg.model.teacher)
    tokenizer = student.tokenizer
    run_rollout = train_cfg.rollout
    max_new_tokens = int(cfg.max_new_tokens or run_rollout.max_new_tokens)
    spec = RolloutSpec(n=cfg.rollouts, batch_size=cfg.batch_size, seed=cfg.seed)
    batches = prompt_batches(train_cfg, tokenizer, spec)
    sampling = SamplingConfig(
        run_rollout.temperature, run_rollout.top_p, max_new_tokens, (tokenizer.eos_token_id,)
    )
    overlap_k = int(train_cfg.termination.overlap_drift.k)
    progress = Progress("termination benchmark", total=cfg.rollouts, unit="rollout")
    rollouts: list[Rollout] = list(
        uncut_rollouts(
            student.model,
            teacher.model,
            tokenizer,
            batches,
            sampling,
            seed=cfg.seed,
            overlap_k=overlap_k,
            progress=progress,
        )
    )
    sample_s = time.perf_counter() - start
    data_source = OmegaConf.to_container(train_cfg.data.source, resolve=True)
    judged = judge(rollouts, batches, tokenizer, data_source, dict(cfg.verifier))
    traces = Traces.of(rollouts)
    kept, settings = rules_kept(cfg, train_cfg, traces, max_new_tokens)
    table = pd.DataFrame(
        {
            name: {**score_rule(k.tolist(), judged), "settings": settings[name]}
            for name, k in kept.items()
        }
    ).T
    numeric = [c for c in table.columns if c != "settings"]
    table[numeric] = table[numeric].astype(float)
    table.index.name = "rule"

    counts = pd.Series([j.category for j in judged]).value_counts().to_dict()
    header = [
        *([f"**{cfg.label}**", ""] if cfg.label else []),
        f"command: `{command}`",
        f"commit: {code_commit()}",
        f"train config: {' '.join(cfg.train_overrides) or 'the defaults (scale=tiny)'}; "
        f"student {student.name}, "
        f"teacher {teacher.name}",
        f"{len(judged)} uncut rollouts (training prompts, seed {cfg.seed}; temperature "
        f"{sampling.temperature}, top-p {sampling.top_p}, cap {max_new_tokens}), "
        f"{float(traces.lengths.double().mean()):.1f} tokens each on average, sampled in "
        f"{sample_s:.0f} s; categories {counts}; rollouts holding an error: "
        f"{sum(j.error is not None for j in judged)}",
        "",
        "A cut is right when its kept prefix already holds the verifier's first error "
        "(token index e < tokens kept); kept − e > 0: the prefix runs past the error. "
        "Intervals: Wilson 95%.",
    ]
    out = output_dir(cfg)
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".md").write_text(markdown(table, header) + "\n")
    table.to_csv(report.with_suffix(".csv"))
    per_rollout = pd.DataFrame(
        {
            "generated": [j.generated for j in judged],
            "error": [j.error for j in judged],
            "category": [j.category for j in judged],
            **{f"kept[{name}]": k.tolist() for name, k in kept.items()},
        }
    )
    per_rollout.to_csv(out / "rollouts.csv", index_label="rollout")
    print(markdown(table, header))
    return table


@hydra.main(
    version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_termination_benchmark"
)
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    module = "kat_research.analysis.termination_benchmark"
    run(cfg, shlex.join(["python", "-m", module, *overrides]))


if __name__ == "__main__":
    main()
