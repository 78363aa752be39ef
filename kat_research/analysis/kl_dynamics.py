"""KL dynamics (KAT paper §3.1): the per-token KL of N rollouts from an early and a late
checkpoint; which rollouts hold an extended low-KL segment, where it starts, whether KL stays
low after it.

    python -m kat_research.analysis.kl_dynamics run_dir=outputs/kat/<time>

Writes ``rollouts.csv`` (one row per rollout), ``traces.csv`` (per token: KL and phase),
``summary.csv`` (per checkpoint), ``example_traces.png`` and ``onset_histogram.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig

from kat_research.analysis.context import AnalysisContext, kl_traces, output_dir
from kat_research.analysis.detector import segment_traces
from kat_research.analysis.figures import shade_phases, window_means
from kat_research.config import CONFIG_DIR
from kat_research.plotting import new_figure, save_figure
from kat_research.termination import KATRule
from kat_research.termination.phases import PHASES, PhaseSegments

STAGES = ("early", "late")


@dataclass
class Stage:
    """The rollouts of one checkpoint and their phase boundaries."""

    name: str  # early / late
    checkpoint: str  # e.g. step120
    traces: list[torch.Tensor]
    segments: list[PhaseSegments]


def rollout_table(stage: Stage) -> pd.DataFrame:
    """One row per rollout: length, segment found, onset, end, stays low, mean KL per phase."""
    records = []
    for i, (kl, seg) in enumerate(zip(stage.traces, stage.segments, strict=True)):
        record = {
            "stage": stage.name,
            "checkpoint": stage.checkpoint,
            "rollout": i,
            "length": seg.length,
            "has_segment": seg.detected,
            "onset": seg.pre_end if seg.detected else np.nan,
            "agreement_end": seg.agreement_end if seg.detected else np.nan,
            "stays_low": seg.stays_low,
            "mean_kl": float(kl.nanmean()),
        }
        ids = seg.phase_ids()
        for p, name in enumerate(PHASES):
            record[f"mean_kl_{name}"] = (
                float(kl[ids == p].nanmean()) if (ids == p).any() else np.nan
            )
        records.append(record)
    return pd.DataFrame(records)


def trace_table(stage: Stage) -> pd.DataFrame:
    """Per token: stage, rollout, position, KL, phase name."""
    frames = [
        pd.DataFrame(
            {
                "stage": stage.name,
                "rollout": i,
                "t": np.arange(seg.length),
                "kl": kl.numpy(),
                "phase": np.array(PHASES)[seg.phase_ids().numpy()],
            }
        )
        for i, (kl, seg) in enumerate(zip(stage.traces, stage.segments, strict=True))
    ]
    return pd.concat(frames, ignore_index=True)


def summarise(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per stage: share with a segment (the paper reports > 60%), onset distribution, share
    staying low after the segment (of those with one), share of tokens in each phase."""
    rows = []
    for (stage, checkpoint), df in rollouts.groupby(["stage", "checkpoint"], sort=False):
        seg = df[df.has_segment]
        pre = seg.onset.sum() + df[~df.has_segment].length.sum()
        agreement = (seg.agreement_end - seg.onset).sum()
        total = df.length.sum()
        rows.append(
            {
                "stage": stage,
                "checkpoint": checkpoint,
                "n_rollouts": len(df),
                "share_with_segment": df.has_segment.mean(),
                "share_stays_low": seg.stays_low.mean() if len(seg) else np.nan,
                "onset_median": seg.onset.median(),
                "onset_mean": seg.onset.mean(),
                "relative_onset_median": (seg.onset / seg.length).median(),
                "mean_length": df.length.mean(),
                "share_tokens_pre": pre / total,
                "share_tokens_agreement": agreement / total,
                "share_tokens_post": 1 - (pre + agreement) / total,
            }
        )
    return pd.DataFrame(rows)


def describe(s: Any) -> str:
    """One line of the summary table, in words."""
    line = (
        f"{s.stage} ({s.checkpoint}): {100 * s.share_with_segment:.0f}% of {s.n_rollouts} "
        "rollouts hold an extended low-KL segment"
    )
    if s.share_with_segment:
        line += (
            f"; onset median {s.onset_median:.0f} tokens ({100 * s.relative_onset_median:.0f}% "
            f"of the rollout); KL stays low after it in {100 * s.share_stays_low:.0f}%"
        )
    return line + (
        f"; tokens pre/agreement/post {100 * s.share_tokens_pre:.0f}/"
        f"{100 * s.share_tokens_agreement:.0f}/{100 * s.share_tokens_post:.0f}%"
    )


def plot_examples(stages: list[Stage], detector: KATRule, n_examples: int) -> Figure:
    """Example traces per stage (rollouts with a segment first), phases shaded."""
    fig = new_figure(n_examples, len(stages), width=5.0, height=2.2)
    axes = fig.subplots(n_examples, len(stages), squeeze=False, sharey=True)
    for col, stage in enumerate(stages):
        order = sorted(range(len(stage.traces)), key=lambda i: not stage.segments[i].detected)
        for row in range(n_examples):
            ax = axes[row, col]
            if row >= len(order):
                ax.set_axis_off()
                continue
            i = order[row]
            kl = stage.traces[i].numpy()
            ax.plot(np.arange(len(kl)), kl.clip(min=1e-6), lw=0.8, color="tab:blue", label="$d_t$")
            starts, z = window_means(kl, detector.window, detector.stride)
            ax.hlines(z, starts, starts + detector.window, color="tab:red", label="window mean")
            ax.axhline(detector.threshold.fixed, color="k", ls="--", lw=0.8, label="threshold")
            shade_phases(ax, stage.segments[i])
            ax.set_yscale("log")
            ax.set_title(f"{stage.name} ({stage.checkpoint}), rollout {i}", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("generated token")
    for ax in axes[:, 0]:
        ax.set_ylabel("reverse KL")
    return fig


def plot_onsets(rollouts: pd.DataFrame) -> Figure:
    """Histograms of the segment onset (tokens, and relative to the rollout length)."""
    fig = new_figure(1, 2)
    ax_abs, ax_rel = fig.subplots(1, 2)
    seg = rollouts[rollouts.has_segment]
    top = max(1.0, float(rollouts.length.max()))
    for i, stage in enumerate(STAGES):
        df = seg[seg.stage == stage]
        if df.empty:
            continue
        style = dict(
            alpha=0.5, color=f"C{i}", label=f"{stage} ({df.checkpoint.iloc[0]}, n={len(df)})"
        )
        ax_abs.hist(df.onset, bins=np.linspace(0, top, 21), **style)
        ax_rel.hist(df.onset / df.length, bins=np.linspace(0, 1, 21), **style)
    ax_abs.set_xlabel("onset (generated token)")
    ax_rel.set_xlabel("onset / rollout length")
    for ax in (ax_abs, ax_rel):
        ax.set_ylabel("rollouts")
        if len(seg):
            ax.legend(fontsize=8)
    return fig


def run(cfg: DictConfig) -> pd.DataFrame:
    """The analysis end to end; returns the summary table (also written to disk)."""
    out = output_dir(cfg)
    ctx = AnalysisContext.from_config(cfg)
    sampled = {}
    for name in STAGES:
        checkpoint = ctx.use(cfg.checkpoints[name])
        traces = [t for r in ctx.rollouts(f"{name} ({checkpoint})") for t in kl_traces(r)]
        sampled[name] = (checkpoint, traces)
    detector, source = ctx.resolved_detector(lambda: [t for _, ts in sampled.values() for t in ts])
    stages = [
        Stage(name, checkpoint, traces, segment_traces(traces, detector))
        for name, (checkpoint, traces) in sampled.items()
    ]
    rollouts = pd.concat([rollout_table(s) for s in stages], ignore_index=True)
    summary = summarise(rollouts).assign(
        threshold=detector.threshold.fixed, threshold_source=source
    )
    rollouts.to_csv(out / "rollouts.csv", index=False)
    pd.concat([trace_table(s) for s in stages]).to_csv(out / "traces.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    save_figure(plot_examples(stages, detector, cfg.n_examples), out / "example_traces.png")
    save_figure(plot_onsets(rollouts), out / "onset_histogram.png")
    print(f"detector: {detector} (threshold from {source})")
    for row in summary.itertuples():
        print(describe(row))
    print(f"results in {out}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_kl_dynamics")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
