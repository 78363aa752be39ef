"""Planted-trap benchmark for the KAT detector (not in the paper): how to set W and patience.

Over a grid of noise levels and trap lengths, synthetic KL traces with known trap onsets
(:mod:`kat_research.analysis.trap.planted`) are scored for three detectors at each window size W:

- ``kat``: adaptive threshold (the ``quantile`` of calibration traces' minimum window means,
  i.e. a full KAT buffer) with ``patience`` consecutive low windows;
- ``fixed_threshold``: the same persistence with a fixed absolute threshold;
- ``no_persistence``: the adaptive threshold with patience 1.

    python -m kat_research.analysis.trap.benchmark

Writes ``benchmark.csv`` (one row per cell x window x detector) and ``benchmark.png``.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import output_dir
from kat_research.analysis.trap.planted import TraceSpec, planted_traces, score
from kat_research.config import CONFIG_DIR
from kat_research.plotting import new_figure, save_figure
from kat_research.termination import kat_calibrated, kat_cuts, kat_rule

DETECTORS = ("kat", "fixed_threshold", "no_persistence")
METRICS = ("precision", "recall", "delay_mean")


def benchmark(cfg: DictConfig) -> pd.DataFrame:
    """Score every detector on every (noise, segment length, window) cell."""
    grid = cfg.analysis.benchmark
    det = grid.detectors
    spec = TraceSpec(**OmegaConf.to_container(grid.traces, resolve=True))
    rows = []
    cells = itertools.product(grid.noise_levels, grid.segment_lengths)
    for cell, (noise, segment_length) in enumerate(cells):
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + cell)
        draw = dict(noise=noise, segment_length=segment_length, generator=generator)
        test = planted_traces(grid.n, spec, **draw)
        calibration = planted_traces(grid.n_calibration, spec, **draw)
        for window in det.windows:
            base = kat_rule(
                window=window, stride=det.stride, patience=det.patience, quantile=det.quantile
            )
            adaptive = kat_calibrated(base, calibration.kl)  # a full buffer of calibration minima
            rules = {
                "kat": adaptive,
                "fixed_threshold": base.with_fixed_threshold(det.fixed_threshold),
                "no_persistence": replace(adaptive, patience=1),
            }
            for name, rule in rules.items():
                cuts = kat_cuts(test.kl, rule)
                metrics = score(cuts, test.onsets, segment_length=segment_length, rule=rule)
                rows.append(
                    {
                        "noise": noise,
                        "segment_length": segment_length,
                        "window": window,
                        "detector": name,
                        "threshold": rule.threshold.fixed,
                        "patience": rule.patience,
                        **metrics,
                    }
                )
    return pd.DataFrame(rows)


def plot_benchmark(table: pd.DataFrame) -> Figure:
    """Rows: precision / recall / delay; columns: noise level; x: window; color: detector;
    line style: trap length."""
    noises = sorted(table.noise.unique())
    lengths = sorted(table.segment_length.unique())
    styles = ["-", "--", ":", "-."]
    fig = new_figure(len(METRICS), len(noises), width=3.6, height=2.6)
    axes = np.atleast_2d(fig.subplots(len(METRICS), len(noises), sharex=True, sharey="row"))
    for (r, metric), (c, noise) in itertools.product(enumerate(METRICS), enumerate(noises)):
        ax = axes[r, c]
        for (d, name), (s, length) in itertools.product(enumerate(DETECTORS), enumerate(lengths)):
            df = table[
                (table.noise == noise) & (table.detector == name) & (table.segment_length == length)
            ].sort_values("window")
            ax.plot(
                df.window,
                df[metric],
                color=f"C{d}",
                ls=styles[s % len(styles)],
                marker="o",
                ms=3,
                label=f"{name}, trap {length}",
            )
        ax.set_xscale("log", base=2)
    for c, noise in enumerate(noises):
        axes[0, c].set_title(f"noise {noise}", fontsize=9)
        axes[-1, c].set_xlabel("window W")
    for r, metric in enumerate(METRICS):
        axes[r, 0].set_ylabel(metric.replace("_mean", " (tokens)"))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right", fontsize=7)
    return fig


def run(cfg: DictConfig) -> pd.DataFrame:
    """The benchmark end to end; returns its table (also written to disk)."""
    out = output_dir(cfg)
    table = benchmark(cfg)
    table.to_csv(out / "benchmark.csv", index=False)
    save_figure(plot_benchmark(table), out / "benchmark.png")
    mean = table.groupby(["detector", "window"], sort=False)[
        ["precision", "recall", "false_alarm_rate", "delay_mean"]
    ].mean()
    print(f"planted-trap benchmark, mean over noise levels and trap lengths ({len(table)} rows):")
    print(mean.round(3).to_string())
    print(f"results in {out}")
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_trap_benchmark")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
