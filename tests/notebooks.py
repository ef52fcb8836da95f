"""Running the repository's notebooks as a reader would, for their tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient


def assert_committed_without_outputs(path: Path) -> None:
    """Every code cell of the notebook at ``path`` is stored unrun."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def execute(path: Path, workdir: Path, monkeypatch: Any) -> tuple[str, list[dict]]:
    """Run the notebook top to bottom in ``workdir`` on this environment's
    Python; returns its code cells' text outputs joined, and the outputs
    holding a PNG."""
    # The kernel is this environment's Python, whatever "python" is on PATH.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        + str(out.get("data", {}).get("text/markdown", ""))
        for out in outputs
    )
    return text, [out for out in outputs if "image/png" in out.get("data", {})]
