"""notebooks/explore_results.ipynb runs top to bottom against the results fixture."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "explore_results.ipynb"
FIXTURE = ROOT / "tests" / "fixtures" / "reproduce" / "runs"


def test_notebook_executes_on_fixture(monkeypatch):
    monkeypatch.setenv("KAT_RUNS", str(FIXTURE))
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
    assert "19 jobs under" in text and "Table 1: main results" in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "missing: seed=1 (failed)" in html  # the fixture's failed job, reported
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # accuracy vs length, KL traces
