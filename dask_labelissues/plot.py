"""The summary plot: score histogram with the issues marked, issues per class."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

BINS = 50


def score_histograms(result: Any, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edges, all_rows, issue_rows)`` histograms of the scores.

    Computed block by block (dask) when the scores are lazy, so the N scores
    are never gathered in one place.
    """
    scores, mask = result.label_quality_scores, result.is_label_issue
    if hasattr(scores, "dask"):
        import dask
        import dask.array as da

        lo, hi = dask.compute(scores.min(), scores.max())
        edges = np.linspace(min(0.0, float(lo)), max(1.0, float(hi)), bins + 1)
        all_rows, _ = da.histogram(scores, bins=edges)
        issues, _ = da.histogram(scores, bins=edges, weights=mask.astype(np.float64))
        all_rows, issues = dask.compute(all_rows, issues)
    else:
        scores, mask = np.asarray(scores), np.asarray(mask)
        edges = np.linspace(min(0.0, float(scores.min())), max(1.0, float(scores.max())), bins + 1)
        all_rows, _ = np.histogram(scores, bins=edges)
        issues, _ = np.histogram(scores[mask], bins=edges)
    return edges, np.asarray(all_rows, dtype=np.int64), np.asarray(issues, dtype=np.int64)


def plot_summary(result: Any, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Write a PNG with the score histogram (issues in red) and issues per class.

    Needs matplotlib (``pip install 'dask-labelissues[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'dask-labelissues[plot]'") from None

    edges, all_rows, issues = score_histograms(result)
    k = result.n_classes
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    widths = np.diff(edges)
    ax1.bar(edges[:-1], all_rows, width=widths, align="edge", color="#9ab", label="all rows")
    ax1.bar(edges[:-1], issues, width=widths, align="edge", color="#c33", label="label issues")
    ax1.set_yscale("log")
    ax1.set_xlabel(f"label quality score ({result.method}{', adjusted' if result.adjust_pred_probs else ''})")
    ax1.set_ylabel("rows (log scale)")
    ax1.legend()
    ax1.set_title(
        title
        or f"{result.num_issues:,} label issues in {result.n_rows:,} rows "
        f"({100 * result.num_issues / result.n_rows:.2f}%)"
    )

    classes = np.arange(k)
    ax2.bar(classes, result.per_class_issues, color="#c33", width=0.8 if k <= 200 else 1.0)
    ax2.set_xlabel("given label")
    ax2.set_ylabel("label issues")
    rate = np.divide(result.per_class_issues, np.maximum(result.per_class_count, 1))
    worst = int(np.argmax(rate)) if k else 0
    ax2.set_title(f"issues per given label (highest rate: class {worst}, {100 * rate[worst]:.1f}%)")
    if k <= 30:
        ax2.set_xticks(classes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
