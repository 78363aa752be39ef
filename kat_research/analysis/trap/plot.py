"""Redraw a trap analysis's figure from its committed tables (the figure is a function of
``rollouts.csv`` and ``cuts.csv`` only), e.g. for results folders whose PNG was not kept.

    python -m kat_research.analysis.trap.plot 'folders=[results/trap_analysis/smollm2_gsm8k]'

(one folder: ``folders=results/trap_analysis/smollm2_gsm8k``).
Writes ``trap_analysis.png`` into each folder. Settings: conf/analysis_trap_plot.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from kat_research.analysis.trap.analysis import Results, plot
from kat_research.config import CONFIG_DIR
from kat_research.plotting import save_figure

TABLES = ("rollouts", "crosstab", "onsets", "cuts")  # what ``write_results`` wrote


def read_results(folder: Path) -> Results:
    """The tables ``write_results`` wrote into ``folder``."""
    missing = [f"{name}.csv" for name in TABLES if not (folder / f"{name}.csv").exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a trap-analysis results folder: no {', '.join(missing)} "
            "(set folders=[...])"
        )
    return Results(**{name: pd.read_csv(folder / f"{name}.csv") for name in TABLES})


def redraw(folders: Sequence[str | Path]) -> list[Path]:
    """Write each folder's ``trap_analysis.png`` from its tables (every folder is read before
    any figure is drawn); the figures' paths."""
    results = {Path(f): read_results(Path(f)) for f in folders}
    written = []
    for folder, tables in results.items():
        save_figure(plot(tables), folder / "trap_analysis.png")
        written.append(folder / "trap_analysis.png")
        print(f"wrote {folder / 'trap_analysis.png'}")
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_trap_plot")
def main(cfg: DictConfig) -> None:
    folders = cfg.folders
    redraw([folders] if isinstance(folders, str) else list(folders))


if __name__ == "__main__":
    main()
