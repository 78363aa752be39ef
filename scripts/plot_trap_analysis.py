"""Redraw a trap analysis's figure from its committed tables (the figure is a function of
``rollouts.csv`` and ``cuts.csv`` only), e.g. for results folders whose PNG was not kept.

    python scripts/plot_trap_analysis.py results/trap_analysis/smollm2_gsm8k [...]

Writes ``trap_analysis.png`` into each folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kat_research.analysis.trap.analysis import Results, plot
from kat_research.plotting import save_figure


def read_results(folder: Path) -> Results:
    """The tables ``write_results`` wrote into ``folder``."""
    names = ("rollouts", "crosstab", "onsets", "cuts")
    return Results(**{name: pd.read_csv(folder / f"{name}.csv") for name in names})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        save_figure(plot(read_results(folder)), folder / "trap_analysis.png")
        print(f"wrote {folder / 'trap_analysis.png'}")


if __name__ == "__main__":
    main()
