"""notebooks/quickstart.ipynb runs top to bottom in the test environment's kernel."""

from __future__ import annotations

from pathlib import Path

from .notebooks import assert_committed_without_outputs, execute

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_without_outputs():
    assert_committed_without_outputs(NOTEBOOK)


def test_quickstart_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_ROWS", "60000")
    monkeypatch.setenv("QUICKSTART_CLASSES", "20")
    text, images = execute(NOTEBOOK, tmp_path, monkeypatch)
    assert "dashboard: http" in text
    assert "| label issues |" in text
    assert "Jaccard 1.0000" in text or "Jaccard 0.99" in text
    assert images, "the summary figure was not drawn"
    precision = float(text.split("precision ")[1].split(",")[0])
    assert precision > 0.9
