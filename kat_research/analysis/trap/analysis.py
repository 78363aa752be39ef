"""The phenomenon, measured (issue 14, item 2): do KAT's cuts hit derailed rollouts or correct
ones?

For the early and late checkpoint of a training run (any method; OPD is the main case; by
default the student before training and after its last step), N uncut rollouts (no
termination rule; the run's sampling settings and cap; the teacher scoring every token), each
judged by the task's verifier (``trap.verdicts``: correct / wrong / degenerate / capped),
and per checkpoint:

- the share with a persistent low-KL segment (``termination.phases``, KAT's own detector at
  the run's KAT settings) and where it starts (the onset = KAT's cut);
- a cross-tab of segment against category;
- the mean KL before and after the onset;
- KAT's offline cut (``kat_cut``) scored against the verifier: precision, recall, the cut rate
  of correct and of derailed rollouts, Fisher's exact p, Wilson 95% intervals; at the run's
  quantile and at ``quantiles``.

The threshold is the quantile of the KAT buffer saved in the analysed checkpoint (what KAT
itself used at that point of training); a checkpoint without one (an OPD run) uses the
quantile of its rollouts' own minimum window means. The output says which.

    python -m kat_research.analysis.trap.analysis run_dir=<training job folder>

Writes ``rollouts.csv``, ``crosstab.csv``, ``onsets.csv``, ``cuts.csv``, ``summary.md`` and
``trap_analysis.png`` into ``output_dir``.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import AnalysisContext, kl_traces, output_dir
from kat_research.analysis.detector import resolve_threshold, segment_traces
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches, sample_rollouts
from kat_research.analysis.trap.check import CATEGORIES
from kat_research.analysis.trap.verdicts import (
    LineVerifier,
    MathVerifier,
    Verdict,
    crosstab,
    make_verifier,
    score_cuts,
)
from kat_research.config import CONFIG_DIR
from kat_research.config.build import build_module
from kat_research.lit import OPDModule
from kat_research.models import LoadedModel, pick_device
from kat_research.plotting import new_figure, save_figure
from kat_research.provenance import code_commit
from kat_research.termination import KATRule, kat_cuts, kat_rule_from_settings

STAGES = ("early", "late")
Verifier = LineVerifier | MathVerifier


@dataclass
class StageRollouts:
    """The uncut rollouts of one checkpoint, their KL traces and verdicts."""

    name: str  # early / late / ...
    checkpoint: str  # e.g. step120
    traces: list[torch.Tensor]
    verdicts: list[Verdict]
    records: list[dict[str, Any]]  # problem_id, stop, length, text
    buffer: torch.Tensor | None = None  # the checkpoint's KAT buffer, if it has one


@dataclass
class Results:
    """Every table the analysis writes."""

    rollouts: pd.DataFrame
    crosstab: pd.DataFrame
    onsets: pd.DataFrame
    cuts: pd.DataFrame
    detectors: dict[str, tuple[KATRule, str]] = field(default_factory=dict)  # per stage


def decode(tokenizer: Any, ids: list[int], stop_reason: str) -> str:
    """A rollout's text without its closing EOS; special tokens elsewhere stay visible, so a
    stray one is not silently dropped before grading."""
    return tokenizer.decode(ids[: len(ids) - (stop_reason == "eos")], skip_special_tokens=False)


def sample_stage(
    name: str,
    checkpoint: str,
    module: OPDModule,
    batches: list[dict],
    spec: RolloutSpec,
    verifier: Verifier,
    buffer: torch.Tensor | None = None,
) -> StageRollouts:
    """Uncut rollouts of the module's current student over ``batches``, judged."""
    traces, verdicts, records = [], [], []
    sampled = sample_rollouts(module, batches, spec, label=f"{name} ({checkpoint})")
    for batch, rollout in zip(batches, sampled, strict=True):
        ids = [rollout.tokens[b, :n].tolist() for b, n in enumerate(rollout.lengths.tolist())]
        texts = [
            decode(module.tokenizer, t, s) for t, s in zip(ids, rollout.stop_reason, strict=True)
        ]
        verdicts += verifier.judge(
            batch["problems"], batch["answers"], ids, texts, rollout.stop_reason
        )
        traces += kl_traces(rollout)
        records += [
            {"problem_id": pid, "stop": stop, "length": len(t), "text": text}
            for pid, stop, t, text in zip(
                batch["problem_ids"], rollout.stop_reason, ids, texts, strict=True
            )
        ]
    return StageRollouts(name, checkpoint, traces, verdicts, records, buffer)


def _cuts(traces: Sequence[torch.Tensor], detector: KATRule) -> list[int | None]:
    return [c if c >= 0 else None for c in kat_cuts(traces, detector).tolist()]


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else math.nan


def rollout_table(
    stage: StageRollouts, detector: KATRule, cuts_at: dict[str, list[int | None]]
) -> pd.DataFrame:
    """One row per rollout: verdict, length, segment and its onset, KL before/after the onset,
    KAT's cut at each threshold label (NaN: not cut)."""
    segments = segment_traces(stage.traces, detector)
    rows = []
    for i, (kl, seg, verdict, record) in enumerate(
        zip(stage.traces, segments, stage.verdicts, stage.records, strict=True)
    ):
        onset = seg.pre_end if seg.detected else None
        rows.append(
            {
                "stage": stage.name,
                "checkpoint": stage.checkpoint,
                "rollout": i,
                "problem_id": record["problem_id"],
                "category": verdict.category,
                "answer_correct": verdict.answer_correct,
                "repetition_onset": verdict.repetition_onset,
                "stop": record["stop"],
                "length": record["length"],
                "has_segment": seg.detected,
                "onset": onset,
                "agreement_end": seg.agreement_end if seg.detected else None,
                "mean_kl": _mean(kl),
                "mean_kl_before": _mean(kl[:onset]) if onset is not None else math.nan,
                "mean_kl_after": _mean(kl[onset:]) if onset is not None else math.nan,
                **{f"cut_{label}": cut[i] for label, cut in cuts_at.items()},
                "text": record["text"],
            }
        )
    return pd.DataFrame(rows)


def onset_table(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per stage and category (and ``all``): rollouts, share with a segment, onset quartiles
    (tokens, and relative to the rollout length) and mean KL before / after the onset."""
    rows = []
    for (stage, checkpoint), df in rollouts.groupby(["stage", "checkpoint"], sort=False):
        for category in ("all", *CATEGORIES):
            part = df if category == "all" else df[df.category == category]
            seg = part[part.has_segment]
            onset, relative = seg.onset.astype(float), seg.onset / seg.length
            rows.append(
                {
                    "stage": stage,
                    "checkpoint": checkpoint,
                    "category": category,
                    "n": len(part),
                    "n_segment": len(seg),
                    "share_segment": len(seg) / len(part) if len(part) else math.nan,
                    "onset_q25": onset.quantile(0.25),
                    "onset_median": onset.median(),
                    "onset_q75": onset.quantile(0.75),
                    "relative_onset_median": relative.median(),
                    "mean_length": part.length.mean(),
                    "mean_kl": part.mean_kl.mean(),
                    "mean_kl_before_onset": seg.mean_kl_before.mean(),
                    "mean_kl_after_onset": seg.mean_kl_after.mean(),
                }
            )
    return pd.DataFrame(rows)


def stage_detectors(
    stage: StageRollouts, detector: KATRule, quantiles: Sequence[float]
) -> dict[str, tuple[KATRule, str]]:
    """The detector at the run's own setting (label ``run``) and at each of ``quantiles``
    (``q0.5`` ...), each with its threshold and where it came from: the stage's KAT buffer,
    else its rollouts' window minima (or the run's fixed threshold, for ``run``)."""
    out = {"run": resolve_threshold(detector, stage.buffer, lambda: stage.traces)}
    for q in quantiles:
        adaptive = detector.with_quantile(float(q))
        out[f"q{q:g}"] = resolve_threshold(adaptive, stage.buffer, lambda: stage.traces)
    return out


def measure(
    stages: Sequence[StageRollouts], detector: KATRule, quantiles: Sequence[float]
) -> Results:
    """All tables from the sampled stages (``detector``: the run's KAT settings)."""
    frames, crosstabs, cut_rows, detectors = [], [], [], {}
    for stage in stages:
        at = stage_detectors(stage, detector, quantiles)
        detectors[stage.name] = at["run"]
        cuts_at = {label: _cuts(stage.traces, d) for label, (d, _) in at.items()}
        table = rollout_table(stage, at["run"][0], cuts_at)
        frames.append(table)
        tab = crosstab(table.has_segment.tolist(), table.category.tolist())
        crosstabs.append(tab.rename_axis("segment").reset_index().assign(stage=stage.name))
        for label, (d, source) in at.items():
            flags = [c is not None for c in cuts_at[label]]
            cut_rows.append(
                {
                    "stage": stage.name,
                    "checkpoint": stage.checkpoint,
                    "threshold_label": label,
                    "quantile": d.threshold.quantile,
                    "threshold": d.threshold.fixed,
                    "threshold_source": source,
                    **score_cuts(flags, table.category.tolist()),
                }
            )
    rollouts = pd.concat(frames, ignore_index=True)
    return Results(
        rollouts=rollouts,
        crosstab=pd.concat(crosstabs, ignore_index=True),
        onsets=onset_table(rollouts),
        cuts=pd.DataFrame(cut_rows),
        detectors=detectors,
    )


def plot(results: Results) -> Figure:
    """Onset histogram, category shares with / without a segment, and precision / recall /
    cut rates (Wilson 95% intervals) against the threshold quantile, per stage."""
    fig = new_figure(2, 2)
    (ax_onset, ax_cat), (ax_pr, ax_rate) = fig.subplots(2, 2)
    r = results.rollouts
    top = max(1.0, float(r.length.max()))
    stages = list(dict.fromkeys(r.stage))
    for i, stage in enumerate(stages):
        seg = r[(r.stage == stage) & r.has_segment]
        if len(seg):
            ax_onset.hist(
                seg.onset.astype(float),
                bins=np.linspace(0, top, 21),
                alpha=0.5,
                color=f"C{i}",
                label=f"{stage} ({seg.checkpoint.iloc[0]}, n={len(seg)})",
            )
    ax_onset.set(xlabel="onset of the low-KL segment (token)", ylabel="rollouts")
    ax_onset.legend(fontsize=7)

    bars, labels = [], []
    for stage in stages:
        for seg, name in ((True, "seg"), (False, "no seg")):
            part = r[(r.stage == stage) & (r.has_segment == seg)]
            bars.append([(part.category == c).mean() if len(part) else 0.0 for c in CATEGORIES])
            labels.append(f"{stage}\n{name}\n(n={len(part)})")
    bottom = np.zeros(len(bars))
    for j, category in enumerate(CATEGORIES):
        heights = np.array([b[j] for b in bars])
        ax_cat.bar(range(len(bars)), heights, bottom=bottom, label=category, color=f"C{j}")
        bottom += heights
    ax_cat.set_xticks(range(len(bars)), labels, fontsize=7)
    ax_cat.set(ylabel="share of rollouts")
    ax_cat.legend(fontsize=7)

    cuts = results.cuts[results.cuts.threshold_label != "run"]
    for i, stage in enumerate(stages):
        part = cuts[cuts.stage == stage]
        for ax, metrics in ((ax_pr, ("precision", "recall")), (ax_rate, ("cut_rate_correct",))):
            for metric, style in zip(metrics, ("-o", "--s"), strict=False):
                yerr = np.clip(  # rounding can put a bound a hair past the value
                    [part[metric] - part[f"{metric}_lo"], part[f"{metric}_hi"] - part[metric]],
                    0,
                    None,
                )
                ax.errorbar(
                    part["quantile"],
                    part[metric],
                    yerr=yerr,
                    fmt=style,
                    color=f"C{i}",
                    capsize=3,
                    label=f"{metric.replace('_', ' ')} {stage}",
                )
        rates = part.cut_derailed / part.n_derailed.where(part.n_derailed > 0)
        ax_rate.plot(
            part["quantile"], rates, ":^", color=f"C{i}", label=f"cut rate derailed {stage}"
        )
    ax_pr.set(xlabel="threshold quantile", ylabel="share", ylim=(-0.02, 1.02))
    ax_rate.set(xlabel="threshold quantile", ylabel="cut rate", ylim=(-0.02, 1.02))
    ax_pr.legend(fontsize=7)
    ax_rate.legend(fontsize=7)
    return fig


def _ci(row: Any, name: str) -> str:
    value = getattr(row, name)
    if not math.isfinite(value):
        return "–"
    return f"{value:.2f} [{getattr(row, f'{name}_lo'):.2f}, {getattr(row, f'{name}_hi'):.2f}]"


def _num(x: float, fmt: str = ".3f") -> str:
    return "–" if x is None or not math.isfinite(float(x)) else format(float(x), fmt)


def markdown(results: Results, header: list[str], verifier: Verifier, detector: KATRule) -> str:
    """The Markdown summary: header lines, definitions, then every table."""
    lines = [*header, "- figure: trap_analysis.png beside this file (every number is below)", ""]
    lines += [
        "Definitions:",
        f"- verifier: {verifier.name}; degenerate = {verifier.repetition_rule}.",
        "- categories are exclusive, in the priority correct > degenerate > capped (ran to the "
        "length cap) > wrong (stopped by itself, rejected); derailed = not correct.",
        f"- low-KL segment = KAT's detector (termination.phases) with window {detector.window}, "
        f"stride {detector.stride}, patience {detector.patience}, exempt "
        f"{detector.exempt}; its onset is the cut KAT would make, so at the run's threshold "
        "'has a segment' and 'KAT cuts it' are the same rollouts.",
        "- precision = cut derailed / cut; recall = cut derailed / derailed; Wilson 95% "
        "intervals in brackets; Fisher = two-sided exact p of cut x derailed.",
        "",
    ]
    for stage, (d, source) in results.detectors.items():
        lines.append(
            f"- {stage}: threshold {d.threshold.fixed:.4g} = quantile {d.threshold.quantile} "
            f"of the {source}" + (" (fixed)" if source == "fixed" else "")
        )
    lines += ["", "## Categories against the low-KL segment (at the run's threshold)", ""]
    lines += [
        "| stage | segment | " + " | ".join(CATEGORIES) + " | total |",
        "|---|---|" + "---|" * (len(CATEGORIES) + 1),
    ]
    for row in results.crosstab.itertuples():
        counts = " | ".join(str(getattr(row, c)) for c in CATEGORIES)
        lines.append(f"| {row.stage} | {row.segment} | {counts} | {row.total} |")
    lines += [
        "",
        "## Segments, onsets and KL before / after the onset",
        "",
        "| stage | category | n | with segment | onset median [q25, q75] | relative onset "
        "median | mean length | mean KL | KL before onset | KL after onset |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in results.onsets.itertuples():
        share_text = f"{o.n_segment} ({_num(o.share_segment, '.2f')})" if o.n else "0"
        lines.append(
            f"| {o.stage} ({o.checkpoint}) | {o.category} | {o.n} | {share_text} | "
            f"{_num(o.onset_median, '.0f')} [{_num(o.onset_q25, '.0f')}, "
            f"{_num(o.onset_q75, '.0f')}] | {_num(o.relative_onset_median, '.2f')} | "
            f"{_num(o.mean_length, '.1f')} | {_num(o.mean_kl, '.4f')} | "
            f"{_num(o.mean_kl_before_onset, '.4f')} | {_num(o.mean_kl_after_onset, '.4f')} |"
        )
    lines += [
        "",
        "## KAT's offline cuts against the verifier",
        "",
        "| stage | threshold | value (source) | cut | precision | recall | cut rate correct "
        "| cut rate derailed | Fisher p | cut rate wrong / degenerate / capped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results.cuts.itertuples():
        derailed = c.cut_derailed / c.n_derailed if c.n_derailed else math.nan
        per = " / ".join(_num(getattr(c, f"cut_rate_{k}"), ".2f") for k in CATEGORIES[1:])
        label = "run's" if c.threshold_label == "run" else c.threshold_label
        lines.append(
            f"| {c.stage} ({c.checkpoint}) | {label} | {c.threshold:.4g} ({c.threshold_source})"
            f" | {c.n_cut}/{c.n} | {_ci(c, 'precision')} | {_ci(c, 'recall')} | "
            f"{c.cut_correct}/{c.n_correct}: {_ci(c, 'cut_rate_correct')} | "
            f"{c.cut_derailed}/{c.n_derailed} ({_num(derailed, '.2f')}) | "
            f"{_num(c.fisher_p, '.2g')} | {per} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    out: Path, results: Results, header: list[str], verifier: Verifier, detector: KATRule
) -> str:
    """Write the CSVs, the figure and the Markdown summary into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    results.rollouts.to_csv(out / "rollouts.csv", index=False)
    results.crosstab.to_csv(out / "crosstab.csv", index=False)
    results.onsets.to_csv(out / "onsets.csv", index=False)
    results.cuts.to_csv(out / "cuts.csv", index=False)
    text = markdown(results, header, verifier, detector)
    (out / "summary.md").write_text(text)
    save_figure(plot(results), out / "trap_analysis.png")
    return text


def sampling_text(module: OPDModule, spec: RolloutSpec) -> str:
    """The sampling settings the rollouts used (the spec's, else the run's)."""
    run = module.rollout_settings

    def pick(own: Any, default: Any) -> Any:
        return default if own is None else own

    return (
        f"sampling T={pick(spec.temperature, run.temperature)}, top-p "
        f"{pick(spec.top_p, run.top_p)}, cap {pick(spec.max_new_tokens, run.max_new_tokens)} "
        "tokens"
    )


def _verifier(data: DictConfig, settings: DictConfig) -> Verifier:
    return make_verifier(
        OmegaConf.to_container(data.source, resolve=True),
        ngram=settings.ngram,
        repeats=settings.repeats,
        timeout_s=settings.timeout_s,
    )


def run(cfg: DictConfig, command: str = "(called from Python)") -> Results:
    """The analysis of a training run's early and late checkpoint; writes and returns it."""
    out = output_dir(cfg)
    ctx = AnalysisContext.from_config(cfg)
    verifier = _verifier(ctx.run.cfg.data, cfg.verifier)
    stages = []
    for name in STAGES:
        checkpoint = ctx.use(cfg.checkpoints[name])
        buffer = ctx.kat_buffer(cfg.checkpoints[name])
        stages.append(
            sample_stage(name, checkpoint, ctx.module, ctx.batches, ctx.spec, verifier, buffer)
        )
    results = measure(stages, ctx.detector, cfg.quantiles)
    spec = ctx.spec
    header = [
        "# Trap analysis: KAT's cuts against the verifier",
        "",
        f"- command: `{command}`",
        f"- commit: {code_commit()}",
        f"- run: {ctx.run.path} (method {ctx.run.cfg.method.name}); checkpoints "
        + ", ".join(f"{s.name} {s.checkpoint}" for s in stages),
        f"- N = {spec.n} uncut rollouts per checkpoint (the same training prompts for each, "
        f"one rollout per prompt), prompt and sampling seed {spec.seed}; "
        f"{sampling_text(ctx.module, spec)}; the teacher scores every token",
    ]
    text = write_results(out, results, header, verifier, ctx.detector)
    print(text)
    print(f"results in {out}")
    return results


def measure_pair(
    cfg: DictConfig,
    student: LoadedModel,
    teacher: LoadedModel,
    *,
    n: int,
    batch_size: int,
    seed: int,
    out: Path,
    command: str,
    notes: Sequence[str] = (),
    quantiles: Sequence[float] = (0.5, 0.7, 0.9),
    ngram: int = 10,
    repeats: int = 3,
) -> Results:
    """The same analysis for one student/teacher pair outside a training run (``cfg``: a train
    config naming the data, the sampling settings and KAT's settings): ``n`` uncut rollouts
    of ``cfg.data``'s prompts; the threshold is the quantile of their window minima."""
    module = build_module(cfg, student, teacher)
    device = pick_device(None)
    module.to(device)
    module.teacher.to(device)
    spec = RolloutSpec(n=n, batch_size=batch_size, seed=seed)
    verifier = make_verifier(
        OmegaConf.to_container(cfg.data.source, resolve=True),
        ngram=ngram,
        repeats=repeats,
        timeout_s=5.0,
    )
    stage = sample_stage(
        "student", "pair", module, prompt_batches(cfg, module.tokenizer, spec), spec, verifier
    )
    detector = kat_rule_from_settings(OmegaConf.to_container(cfg.termination.kat, resolve=True))
    results = measure([stage], detector, quantiles)
    header = [
        "# Trap analysis: KAT's cuts against the verifier (a teacher/student pair)",
        "",
        f"- command: `{command}`",
        f"- commit: {code_commit()}",
        *[f"- {note}" for note in notes],
        f"- N = {n} uncut rollouts, one per prompt, prompt and sampling seed {seed}; "
        f"{sampling_text(module, spec)}; the teacher scores every token",
    ]
    text = write_results(out, results, header, verifier, detector)
    print(text)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_trap_analysis")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    run(cfg, shlex.join(["python", "-m", "kat_research.analysis.trap.analysis", *overrides]))


if __name__ == "__main__":
    main()
