"""Gradient projection (KAT paper §3.2): how much of each phase's OPD gradient lies in the
subspace where training actually moved the weights.

For every selected weight matrix, U_k = top-k left singular vectors of ΔW = θ_final − θ_init.
On rollouts of the student at checkpoint ``gradient_at``, each rollout is split into
pre-agreement / agreement / post-agreement tokens by the KAT detector, and g_phase is the
gradient of the run's OPD loss restricted to that phase's tokens (token mean over all
rollouts). ρ_k = ‖U_k U_kᵀ g‖² / ‖g‖² per matrix and per group (attention, MLP, each layer,
all), beside a random Gaussian direction's ρ as the baseline.

    python -m kat_research.analysis.gradient_projection run_dir=outputs/kat/<time>

Writes ``rho.csv`` (per group), ``rho_per_matrix.csv`` and ``rho.png``.
"""

from __future__ import annotations

import dataclasses
import re

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig

from kat_research.analysis.context import AnalysisContext, kl_traces, output_dir
from kat_research.analysis.detector import segment_traces
from kat_research.analysis.figures import PHASE_COLORS
from kat_research.analysis.projection import (
    group_ratios,
    parameter_groups,
    projection_ratios,
    top_left_singular_vectors,
)
from kat_research.config import CONFIG_DIR
from kat_research.plotting import new_figure, save_figure
from kat_research.termination import KATRule
from kat_research.termination.phases import PHASES, phase_id_matrix

RANDOM = "random"


def selected_parameters(module: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Parameter]:
    """2-D trainable parameters whose name matches ``pattern`` (``re.search``)."""
    chosen = {
        name: p
        for name, p in module.named_parameters()
        if p.ndim == 2 and p.requires_grad and re.search(pattern, name)
    }
    if not chosen:
        raise ValueError(f"no 2-D trainable parameter of the student matches {pattern!r}")
    return chosen


def _on(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    return weight.to(device=device, dtype=torch.float64)


def update_bases(
    init: dict[str, torch.Tensor],
    final: dict[str, torch.Tensor],
    names: list[str],
    k: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """U_k (CPU) of ΔW = final − init for each named matrix, decomposed on ``device``."""
    return {
        n: top_left_singular_vectors(_on(final[n], device) - _on(init[n], device), k).cpu()
        for n in names
    }


def phase_gradients(
    ctx: AnalysisContext, detector: KATRule, params: dict[str, torch.nn.Parameter], label: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Per phase: the token-mean OPD-loss gradient of each parameter (CPU float32) over the
    prompt set's rollouts (progress lines labelled ``label``), and the number of tokens it
    averages."""
    module = ctx.module
    sums = {p: {n: torch.zeros(w.shape) for n, w in params.items()} for p in PHASES}
    tokens = dict.fromkeys(PHASES, 0)
    for rollout in ctx.rollouts(label, teacher_keep=module.engine.teacher_keep):
        segments = segment_traces(kl_traces(rollout), detector)
        ids = phase_id_matrix(segments, rollout.tokens.shape[1]).to(rollout.loss_mask.device)
        for p, phase in enumerate(PHASES):
            mask = rollout.loss_mask & (ids == p)
            if not bool(mask.any()):
                continue
            module.student.zero_grad(set_to_none=True)
            out = module.distillation_loss(dataclasses.replace(rollout, loss_mask=mask))
            (out.loss * out.n_tokens).backward()  # token sum: batches add up to a token mean
            for n, w in params.items():
                sums[phase][n] += w.grad.detach().float().cpu()
            tokens[phase] += out.n_tokens
    module.student.zero_grad(set_to_none=True)
    means = {p: {n: g / max(tokens[p], 1) for n, g in grads.items()} for p, grads in sums.items()}
    return means, tokens


def random_directions(params: dict[str, torch.nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(w.shape, generator=generator) for n, w in params.items()}


def rho_tables(
    gradients: dict[str, dict[str, torch.Tensor]],
    bases: dict[str, torch.Tensor],
    ks: list[int],
    tokens: dict[str, int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per group, per matrix) long tables of ρ_k for every phase (and the random baseline)."""
    groups, matrices = [], []
    for phase, grads in gradients.items():
        if phase != RANDOM and not tokens[phase]:
            continue
        for group, rho in group_ratios(grads, bases, ks).items():
            groups += [
                {"phase": phase, "group": group, "k": k, "rho": float(r), "tokens": tokens[phase]}
                for k, r in zip(ks, rho, strict=True)
            ]
        for name, g in grads.items():
            rho = projection_ratios(g, bases[name], ks)
            matrices += [
                {
                    "phase": phase,
                    "parameter": name,
                    "groups": " ".join(parameter_groups(name)[1:]),
                    "k": k,
                    "k_used": min(k, bases[name].shape[1]),
                    "rho": float(r),
                }
                for k, r in zip(ks, rho, strict=True)
            ]
    return pd.DataFrame(groups), pd.DataFrame(matrices)


def plot_rho(table: pd.DataFrame) -> Figure:
    """Bars of ρ_k per group, one panel per k, one bar per phase (+ random)."""
    ks = sorted(table.k.unique())
    groups = list(dict.fromkeys(table.group))
    phases = list(dict.fromkeys(table.phase))
    fig = new_figure(len(ks), 1, width=max(5.0, 0.7 * len(groups) * len(phases) / 2), height=2.6)
    axes = np.atleast_1d(fig.subplots(len(ks), 1, sharex=True))
    width = 0.8 / len(phases)
    x = np.arange(len(groups))
    for ax, k in zip(axes, ks, strict=True):
        for i, phase in enumerate(phases):
            rows = table[(table.k == k) & (table.phase == phase)].set_index("group")
            values = [rows.rho.get(g, np.nan) for g in groups]
            ax.bar(
                x + (i - (len(phases) - 1) / 2) * width,
                values,
                width,
                label=phase,
                color=PHASE_COLORS.get(phase),
            )
        ax.set_ylabel(f"ρ (k={k})")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8, ncols=len(phases))
    axes[-1].set_xticks(x, groups, rotation=45, ha="right")
    return fig


def run(cfg: DictConfig) -> pd.DataFrame:
    """The analysis end to end; returns the per-group table (also written to disk)."""
    out = output_dir(cfg)
    ctx = AnalysisContext.from_config(cfg)
    params = selected_parameters(ctx.module.student, cfg.parameters)
    ks = sorted(int(k) for k in cfg.ranks)
    init, final = ctx.weights(cfg.delta.init), ctx.weights(cfg.delta.final)
    bases = update_bases(init, final, list(params), ks[-1], ctx.module.device)
    checkpoint = ctx.use(cfg.gradient_at)
    detector, source = ctx.resolved_detector(
        lambda: [t for r in ctx.rollouts(f"threshold ({checkpoint})") for t in kl_traces(r)]
    )
    gradients, tokens = phase_gradients(ctx, detector, params, f"gradients ({checkpoint})")
    gradients[RANDOM] = random_directions(params, cfg.random_seed)
    tokens[RANDOM] = 0
    table, per_matrix = rho_tables(gradients, bases, ks, tokens)
    table = table.assign(gradient_at=checkpoint, threshold=detector.threshold.fixed)
    table.to_csv(out / "rho.csv", index=False)
    per_matrix.to_csv(out / "rho_per_matrix.csv", index=False)
    save_figure(plot_rho(table), out / "rho.png")
    print(
        f"ρ = ‖U_k U_kᵀ g‖²/‖g‖² of per-phase OPD gradients at {checkpoint} "
        f"({len(params)} matrices; tokens per phase: "
        + ", ".join(f"{p} {tokens[p]}" for p in PHASES)
        + f"; threshold {detector.threshold.fixed:.4g} from {source})"
    )
    shown = table[table.group.isin(["all", "attention", "mlp"])]
    print(
        shown.pivot_table(index=["group", "phase"], columns="k", values="rho", sort=False)
        .round(4)
        .to_string()
    )
    print(f"results in {out}")
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_gradient_projection")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
