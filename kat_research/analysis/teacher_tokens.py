"""Teacher top tokens per phase (KAT paper §3.3): which tokens the teacher ranks in its top-k
(k=5) at the positions of each phase; in the agreement trap they are the student's own
continuation rather than corrective tokens.

    python -m kat_research.analysis.teacher_tokens run_dir=outputs/kat/<time>

Writes ``top_tokens.csv`` (top-N per phase) and ``wordcloud.png`` (one cloud per phase).
"""

from __future__ import annotations

from collections import Counter

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from wordcloud import WordCloud

from kat_research.analysis.context import AnalysisContext, kl_traces, output_dir
from kat_research.analysis.detector import segment_traces
from kat_research.config import CONFIG_DIR
from kat_research.plotting import new_figure, save_figure
from kat_research.termination.phases import PHASES, phase_id_matrix

_NAMED = {" ": "<space>", "\n": "<newline>", "\t": "<tab>", "": "<empty>"}


def count_top_tokens(topk_ids: torch.Tensor, phase_ids: torch.Tensor) -> dict[str, Counter]:
    """Per phase: how often each token id is among the teacher's top-k ([B, T, K] ids) at the
    positions of that phase ([B, T] phase ids; padding positions are never counted)."""
    return {
        name: Counter(topk_ids[phase_ids == p].flatten().tolist()) for p, name in enumerate(PHASES)
    }


def display_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as readable text (whitespace tokens by name, others stripped of edge spaces)."""
    text = tokenizer.decode([token_id])
    return _NAMED.get(text, text.strip() or repr(text))


def top_token_table(
    counts: dict[str, Counter], tokenizer: PreTrainedTokenizerBase, top_n: int
) -> pd.DataFrame:
    """The ``top_n`` tokens per phase with count and share of that phase's top-k slots."""
    rows = []
    for phase, counter in counts.items():
        total = sum(counter.values())
        for rank, (token_id, count) in enumerate(counter.most_common(top_n), start=1):
            rows.append(
                {
                    "phase": phase,
                    "rank": rank,
                    "token_id": token_id,
                    "token": display_token(tokenizer, token_id),
                    "count": count,
                    "share": count / total,
                }
            )
    return pd.DataFrame(rows, columns=["phase", "rank", "token_id", "token", "count", "share"])


def plot_wordclouds(table: pd.DataFrame, positions: dict[str, int], seed: int) -> Figure:
    """One word cloud per phase, word size proportional to the token's count."""
    fig = new_figure(1, len(PHASES), width=4.0, height=3.0)
    for ax, phase in zip(fig.subplots(1, len(PHASES)), PHASES, strict=True):
        rows = table[table.phase == phase]
        ax.set_axis_off()
        ax.set_title(f"{phase} ({positions[phase]} positions)", fontsize=9)
        if rows.empty:
            continue
        cloud = WordCloud(width=400, height=300, background_color="white", random_state=seed)
        cloud.generate_from_frequencies(dict(zip(rows.token, rows["count"], strict=True)))
        ax.imshow(np.asarray(cloud.to_array()), interpolation="bilinear")
    return fig


def run(cfg: DictConfig) -> pd.DataFrame:
    """The analysis end to end; returns the top-N table (also written to disk)."""
    out = output_dir(cfg)
    ctx = AnalysisContext.from_config(cfg)
    checkpoint = ctx.use(cfg.checkpoint)
    rollouts = list(
        ctx.rollouts(f"teacher tokens ({checkpoint})", teacher_keep="topk", teacher_topk=cfg.top_k)
    )
    detector, source = ctx.resolved_detector(lambda: [t for r in rollouts for t in kl_traces(r)])
    counts = {name: Counter() for name in PHASES}
    positions = dict.fromkeys(PHASES, 0)
    for r in rollouts:
        ids = phase_id_matrix(segment_traces(kl_traces(r), detector), r.tokens.shape[1])
        for name, counter in count_top_tokens(r.teacher_topk_ids, ids).items():
            counts[name].update(counter)
        for p, name in enumerate(PHASES):
            positions[name] += int((ids == p).sum())
    table = top_token_table(counts, ctx.module.tokenizer, cfg.top_n)
    table = table.assign(checkpoint=checkpoint, threshold=detector.threshold.fixed)
    table.to_csv(out / "top_tokens.csv", index=False)
    save_figure(plot_wordclouds(table, positions, cfg.seed), out / "wordcloud.png")
    print(
        f"teacher top-{cfg.top_k} tokens per phase at {checkpoint} (threshold "
        f"{detector.threshold.fixed:.4g} from {source}; positions "
        + ", ".join(f"{p} {n}" for p, n in positions.items())
        + ")"
    )
    for phase, rows in table.groupby("phase", sort=False):
        top = rows.head(cfg.top_k)
        shown = ", ".join(
            f"{t!r} {100 * s:.1f}%" for t, s in zip(top.token, top.share, strict=True)
        )
        print(f"  {phase}: {shown}")
    print(f"results in {out}")
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_teacher_tokens")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
