"""notebooks/quickstart.ipynb runs top to bottom in the test environment's kernel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_quickstart_executes(tmp_path, monkeypatch):
    # The kernel is this environment's Python, whatever "python" is on PATH.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("QUICKSTART_ROWS", "60000")
    monkeypatch.setenv("QUICKSTART_CLASSES", "20")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        + str(out.get("data", {}).get("text/markdown", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "dashboard: http" in text
    assert "| label issues |" in text
    assert "Jaccard 1.0000" in text or "Jaccard 0.99" in text
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert images, "the summary figure was not drawn"
    precision = float(text.split("precision ")[1].split(",")[0])
    assert precision > 0.9
