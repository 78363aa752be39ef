"""notebooks/explore_results.ipynb runs top to bottom: on the committed results (what a fresh
clone has) and the job-folder fixture, and with cut-verdict series and a termination benchmark
present."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "explore_results.ipynb"
FIXTURE = ROOT / "tests" / "fixtures" / "reproduce" / "runs"
RESULTS = ROOT / "results"


def _execute(monkeypatch, results: Path) -> tuple[str, str, int]:
    """Run the notebook; return its printed text, its HTML and its number of images."""
    monkeypatch.setenv("KAT_RUNS", str(FIXTURE))
    monkeypatch.setenv("KAT_RESULTS", str(results))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, html, images


def test_notebook_executes_on_committed_results_and_fixture(monkeypatch):
    text, html, images = _execute(monkeypatch, RESULTS)
    tables = len(list(RESULTS.glob("*.jobs.csv")))
    assert f"{tables} committed tables under" in text
    assert "Table 2: training efficiency" in text  # a committed table, re-aggregated
    assert "KL after error, derailed / correct" in text  # the trap-check probes
    analyses = len(list((RESULTS / "trap_analysis").glob("*/cuts.csv")))
    assert f"{analyses} trap analyses" in text
    assert "19 jobs under" in text and "Table 1: main results" in text  # the job folders
    assert "missing: seed=1 (failed)" in html  # the fixture's failed job, reported
    verdict_figures = len(list(RESULTS.glob("*.verdicts.csv")))
    # Table 1 accuracy vs length, probes, trap analyses, verdicts, runs: accuracy, KL traces
    assert images == 5 + verdict_figures


def test_notebook_shows_verdict_series_and_benchmark(monkeypatch, tmp_path):
    for path in RESULTS.iterdir():  # the committed results, plus the files still to come
        (tmp_path / path.name).symlink_to(path)
    pd.DataFrame(
        {
            "job": ["a", "a", "b", "b"],
            "method": ["kat", "kat", "prune_opd", "prune_opd"],
            "seed": [0, 0, 0, 0],
            "step": [0, 1, 0, 1],
            "verdict/cut_rows": [0.1, 0.2, 0.3, 0.4],
            "verdict/cut_on_derailed": [0.5, 0.5, 1.0, 0.0],
        }
    ).to_csv(tmp_path / "table1.verdicts.csv", index=False)
    pd.DataFrame({"rule": ["kat"], "precision": [0.25]}).to_csv(
        tmp_path / "termination_benchmark.csv", index=False
    )
    text, html, images = _execute(monkeypatch, tmp_path)
    assert "table1.verdicts.csv: 2 jobs, steps 0-1" in text
    assert "precision" in html and "no termination benchmark" not in text
    assert images == 6
