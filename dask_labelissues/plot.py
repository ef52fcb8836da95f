"""The summary plot: score histogram with the issues marked, issues per class."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

BINS = 60


def score_histograms(
    result: Any, edge_sets: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(all_rows, issue_rows)`` histograms of the scores for each set of bin edges.

    Computed block by block (dask) when the scores are lazy, so the N scores
    are never gathered in one place.
    """
    scores, mask = result.label_quality_scores, result.is_label_issue
    if hasattr(scores, "dask"):
        import dask
        import dask.array as da

        weights = mask.astype(np.float64)
        lazy = [
            (da.histogram(scores, bins=e)[0], da.histogram(scores, bins=e, weights=weights)[0])
            for e in edge_sets
        ]
        out = result._compute(*lazy) if hasattr(result, "_compute") else dask.compute(*lazy)
    else:
        scores, mask = np.asarray(scores), np.asarray(mask)
        out = [(np.histogram(scores, bins=e)[0], np.histogram(scores[mask], bins=e)[0]) for e in edge_sets]
    return [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in out]


def plot_summary(result: Any, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Write a PNG with the score histogram (issues in red) and issues per class.

    Needs matplotlib (``pip install 'dask-labelissues[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'dask-labelissues[plot]'") from None
    import matplotlib.pyplot as plt

    fig = summary_figure(result, title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def summary_figure(result: Any, *, title: str | None = None) -> Any:
    """The summary plot as a matplotlib Figure (for notebooks)."""
    import matplotlib.pyplot as plt

    k = result.n_classes
    # Scores lie in [0, 1] for every method; the issues crowd the low end,
    # so the middle panel zooms in on it.
    cutoff = float(result.issue_scores.max()) if result.num_issues else 0.0
    zoom_hi = min(1.0, max(3 * cutoff, 1e-3))
    full_edges = np.linspace(0.0, 1.0, BINS + 1)
    zoom_edges = np.linspace(0.0, zoom_hi, BINS + 1)
    (full_all, full_issues), (zoom_all, zoom_issues) = score_histograms(result, [full_edges, zoom_edges])

    fig, (ax1, ax3, ax2) = plt.subplots(3, 1, figsize=(10, 11), constrained_layout=True)
    for ax, edges, all_rows, issues in (
        (ax1, full_edges, full_all, full_issues),
        (ax3, zoom_edges, zoom_all, zoom_issues),
    ):
        widths = np.diff(edges)
        ax.bar(edges[:-1], all_rows, width=widths, align="edge", color="#9ab", label="all rows")
        ax.bar(edges[:-1], issues, width=widths, align="edge", color="#c33", label="label issues")
        if result.num_issues:
            ax.axvline(cutoff, color="k", linestyle="--", linewidth=1, label=f"highest issue score {cutoff:.3g}")
        ax.set_yscale("log")
        ax.set_ylabel("rows (log scale)")
        ax.legend(loc="upper center")
    adjusted = ", adjusted" if result.adjust_pred_probs else ""
    ax1.set_xlabel(f"label quality score ({result.method}{adjusted})")
    ax3.set_xlabel(f"label quality score, 0 to {zoom_hi:.3g}")
    ax1.set_title(
        title
        or f"{result.num_issues:,} label issues in {result.n_rows:,} rows "
        f"({100 * result.num_issues / result.n_rows:.2f}%)"
    )
    ax3.set_title("low scores in detail")

    classes = np.arange(k)
    ax2.bar(classes, result.per_class_issues, color="#c33", width=0.8 if k <= 200 else 1.0)
    ax2.set_xlabel("given label")
    ax2.set_ylabel("label issues")
    rate = np.divide(result.per_class_issues, np.maximum(result.per_class_count, 1))
    worst = int(np.argmax(rate)) if k else 0
    ax2.set_title(f"issues per given label (highest rate: class {worst}, {100 * rate[worst]:.1f}%)")
    if k <= 30:
        ax2.set_xticks(classes)
    return fig
