"""The summary plot: score histograms with the issues marked, issues per
class and, where the result holds a confident joint, the most confused
(given label, likely true label) pairs.

matplotlib is imported only inside the functions that draw, so that the
package works without it.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Sequence

import numpy as np

BINS = 60
#: Share of the issues the "low scores in detail" panel is sized to hold.
ZOOM_QUANTILE = 0.95
#: Room left right of the zoom quantile, so its issues do not end at the edge.
ZOOM_HEADROOM = 1.2
#: Narrowest zoom, for issues that all score (nearly) zero.
ZOOM_MIN = 1e-3
#: Multiples of a power of ten the zoom may end at: round tick labels, and
#: never more than 25% wider than asked.
_NICE_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
#: Confused pairs the last panel shows at most.
TOP_PAIRS = 15
#: Width, in characters, at which legend entries are wrapped.
LEGEND_WRAP = 30

ISSUE_COLOR = "#c33"
ROWS_COLOR = "#9ab"

#: The ``filter_by`` methods that take the rows of lowest raw score, and the
#: score each ranks by (the same names as ``method``).
_LOWEST_SCORE_FILTERS = {
    "low_self_confidence": "self_confidence",
    "low_normalized_margin": "normalized_margin",
}


def score_histograms(
    result: Any, edge_sets: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(all_rows, issue_rows)`` histograms of the scores for each set of bin edges.

    Computed block by block (dask) when the scores are lazy, so the N scores
    are never gathered in one place.

    Parameters
    ----------
    result
        A :class:`~dask_labelissues.results.LabelIssues`.
    edge_sets
        Bin edges, one array per histogram wanted.

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray)
        Per set of edges, the row counts of all rows and of the issues (int64).
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


def cuts_by_score(result: Any) -> bool:
    """Whether the issues are exactly the rows of lowest plotted score.

    True for the batched method (no ``filter_by``), where the score chooses
    the issues, and for ``low_self_confidence`` / ``low_normalized_margin``
    when the plotted score is the unadjusted score that filter ranks by.
    The other filters pick rows from the confident joint or the argmax, so
    a non-issue can score below an issue.

    Parameters
    ----------
    result
        A :class:`~dask_labelissues.results.LabelIssues`.

    Returns
    -------
    bool
    """
    if result.filter_by is None:
        return True
    ranked_by = _LOWEST_SCORE_FILTERS.get(result.filter_by)
    return ranked_by == result.method and not result.adjust_pred_probs


def highest_issue_label(result: Any, highest: float) -> str:
    """Legend text of the dashed line at the highest score among the issues.

    Says whether that line is a cut-off, so that it is not read as one where
    the filter does not choose the issues by this score.

    Parameters
    ----------
    result
        A :class:`~dask_labelissues.results.LabelIssues`.
    highest
        The highest score among the issues.

    Returns
    -------
    str
    """
    if cuts_by_score(result):
        return f"highest score among issues, {highest:.3g}: the cut-off (the issues are the lowest scores)"
    if result.filter_by in _LOWEST_SCORE_FILTERS:
        why = (
            f"{result.filter_by} ranks by unadjusted "
            f"{_LOWEST_SCORE_FILTERS[result.filter_by].replace('_', ' ')}, not by this score"
        )
    else:
        why = f"{result.filter_by} does not cut by score"
    return f"highest score among issues, {highest:.3g} (not a threshold: {why})"


def zoom_upper(issue_scores: np.ndarray, *, include_highest: bool) -> float:
    """Upper end of the "low scores in detail" panel, which starts at 0.

    Sized to where the issues are: :data:`ZOOM_QUANTILE` of their scores,
    with :data:`ZOOM_HEADROOM`, rounded up to a round number.
    The highest issue score would let one outlier stretch the panel over
    [0, 1] with filters that do not cut by score; where the issues are the
    lowest scores (``include_highest``) it is the cut-off and is kept in view.

    Parameters
    ----------
    issue_scores
        Scores of the issues.
    include_highest
        Keep the highest issue score inside the panel.

    Returns
    -------
    float
        In [:data:`ZOOM_MIN`, 1].
    """
    scores = np.asarray(issue_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return 0.1
    top = float(scores.max()) if include_highest else float(np.quantile(scores, ZOOM_QUANTILE))
    return min(1.0, _nice_ceil(max(top * ZOOM_HEADROOM, ZOOM_MIN)))


def _nice_ceil(x: float) -> float:
    """The smallest of :data:`_NICE_STEPS` times a power of ten that is >= ``x`` (> 0)."""
    power = 10.0 ** np.floor(np.log10(x))
    # The tolerance keeps x = 0.2 at 0.2 despite rounding in power * step;
    # the last step, 10, always qualifies.
    step = next(s for s in _NICE_STEPS if power * s >= x * (1 - 1e-9))
    # Through 12 digits so that 3 * 0.1 ends at 0.3, not 0.30000000000000004.
    return float(f"{power * step:.12g}")


def confused_pairs(joint: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, float]]:
    """The largest off-diagonal cells of a confident joint.

    Parameters
    ----------
    joint
        Confident joint (K, K): rows the given label, columns the likely
        true class.
    top
        How many cells at most.

    Returns
    -------
    list of (int, int, float)
        ``(given, true, rows)``, most rows first, ties by given then true
        label; cells of no rows are left out.
    """
    cj = np.asarray(joint, dtype=np.float64)
    given, true = np.nonzero(~np.eye(cj.shape[0], dtype=bool) & (cj > 0))
    counts = cj[given, true]
    order = np.lexsort((true, given, -counts))[:top]
    return [(int(given[i]), int(true[i]), float(counts[i])) for i in order]


def plot_summary(
    result: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    class_names: Sequence[Any] | None = None,
) -> str:
    """Write the summary plot (see :func:`summary_figure`) as a PNG.

    Needs matplotlib (``pip install 'dask-labelissues[plot]'``).

    Parameters
    ----------
    result
        A :class:`~dask_labelissues.results.LabelIssues`.
    path
        Where to write the PNG.
    title
        Title of the top panel instead of the issue count.
    class_names
        Names of the K classes, used in the confused-pairs panel.

    Returns
    -------
    str
        ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'dask-labelissues[plot]'") from None
    import matplotlib.pyplot as plt

    fig = summary_figure(result, title=title, class_names=class_names)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def summary_figure(
    result: Any,
    *,
    title: str | None = None,
    class_names: Sequence[Any] | None = None,
) -> Any:
    """The summary plot as a matplotlib Figure (for notebooks).

    Panels, each findable by its ``Axes.get_label()``:

    ``"scores"``
        Histogram of all scores over [0, 1], the issues in red.
    ``"zoom"``
        The same from 0 to where most issues are (:func:`zoom_upper`).
    ``"per_class"``
        Count of issues per given label.
    ``"confused_pairs"``
        The largest off-diagonal cells of the confident joint, only when the
        result holds one.

    Parameters
    ----------
    result
        A :class:`~dask_labelissues.results.LabelIssues`.
    title
        Title of the top panel instead of the issue count.
    class_names
        Names of the K classes, used in the confused-pairs panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if class_names is not None and len(class_names) != result.n_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {result.n_classes} classes")
    issue_scores = np.asarray(result.issue_scores, dtype=np.float64)
    cut = cuts_by_score(result)
    highest = float(issue_scores.max()) if issue_scores.size else None
    zoom_hi = zoom_upper(issue_scores, include_highest=cut)
    full_edges = np.linspace(0.0, 1.0, BINS + 1)
    zoom_edges = np.linspace(0.0, zoom_hi, BINS + 1)
    (full_all, full_issues), (zoom_all, zoom_issues) = score_histograms(result, [full_edges, zoom_edges])

    pairs = confused_pairs(result.confident_joint) if result.confident_joint is not None else []
    heights = [3.0, 3.0, 3.0] + ([1.2 + 0.25 * len(pairs)] if pairs else [])
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(11, sum(heights) + 1.0), constrained_layout=True,
        gridspec_kw={"height_ratios": heights},
    )
    ax_full, ax_zoom, ax_class = axes[:3]
    for ax, label, edges, all_rows, issues in (
        (ax_full, "scores", full_edges, full_all, full_issues),
        (ax_zoom, "zoom", zoom_edges, zoom_all, zoom_issues),
    ):
        ax.set_label(label)
        widths = np.diff(edges)
        ax.bar(edges[:-1], all_rows, width=widths, align="edge", color=ROWS_COLOR, label="all rows")
        ax.bar(edges[:-1], issues, width=widths, align="edge", color=ISSUE_COLOR, label="label issues")
        if highest is not None and highest <= edges[-1]:
            ax.axvline(highest, color="k", linestyle="--", linewidth=1,
                       label=highest_issue_label(result, highest))
        ax.set_xlim(edges[0], edges[-1])
        if all_rows.any():  # a log axis of no positive count warns and shows nothing
            ax.set_yscale("log")
            ax.set_ylabel("rows (log scale)")
        else:
            ax.set_ylabel("rows")
        _legend_outside(ax)
    adjusted = ", adjusted" if result.adjust_pred_probs else ""
    ax_full.set_xlabel(f"label quality score ({result.method}{adjusted})")
    ax_full.set_title(
        title
        or f"{result.num_issues:,} label issues in {result.n_rows:,} rows "
        f"({100 * result.num_issues / result.n_rows:.2f}%)"
    )
    ax_zoom.set_xlabel(f"label quality score, 0 to {zoom_hi:.3g}")
    ax_zoom.set_title(_zoom_title(issue_scores, zoom_hi, highest))

    _per_class_panel(ax_class, result)
    if pairs:
        _pairs_panel(axes[3], pairs, result.per_class_count, class_names)
    return fig


def _legend_outside(ax: Any) -> None:
    """A legend right of the axes: bars can reach any height in any bin, so
    no place inside is sure to be free of them."""
    handles, labels = ax.get_legend_handles_labels()
    labels = [textwrap.fill(text, LEGEND_WRAP) for text in labels]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              fontsize="small")


def _zoom_title(issue_scores: np.ndarray, zoom_hi: float, highest: float | None) -> str:
    """Title of the zoom panel: how many issues it holds, and where the
    highest issue score lies when it is out of view."""
    if highest is None:
        return "low scores in detail (no label issues)"
    inside = int(np.count_nonzero(issue_scores <= zoom_hi))
    text = (
        f"low scores in detail: {inside:,} of {issue_scores.size:,} issues "
        f"({100 * inside / issue_scores.size:.1f}%) score 0 to {zoom_hi:.3g}"
    )
    if highest > zoom_hi:
        text += f"\nthe highest issue score, {highest:.3g}, is right of this panel"
    return text


def _per_class_panel(ax: Any, result: Any) -> None:
    """Issue counts per given label; the title names the class of highest
    issue rate, which the counts alone would not show for small classes."""
    from matplotlib.ticker import MaxNLocator

    ax.set_label("per_class")
    k = result.n_classes
    classes = np.arange(k)
    issues = np.asarray(result.per_class_issues)
    ax.bar(classes, issues, color=ISSUE_COLOR, width=0.8 if k <= 200 else 1.0)
    ax.set_xlabel("given label")
    ax.set_ylabel("label issues (count)")
    rows = np.asarray(result.per_class_count)
    rate = np.divide(issues, np.maximum(rows, 1))
    worst = int(np.argmax(rate))
    if issues.any():
        ax.set_title(
            f"number of label issues per given label (highest rate: class {worst}, "
            f"{issues[worst]:,} of its {rows[worst]:,} rows, {100 * rate[worst]:.1f}%)"
        )
    else:
        ax.set_title("number of label issues per given label: none in any class")
    ax.set_xlim(-0.6, k - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if k <= 30:
        ax.set_xticks(classes)


def _pairs_panel(
    ax: Any,
    pairs: list[tuple[int, int, float]],
    per_class_count: np.ndarray,
    class_names: Sequence[Any] | None,
) -> None:
    """Horizontal bars of the most confused pairs, most rows at the top."""
    from matplotlib.ticker import MaxNLocator

    ax.set_label("confused_pairs")

    def name(c: int) -> str:
        return str(class_names[c]) if class_names is not None else str(c)

    counts = np.array([n for _, _, n in pairs])
    positions = np.arange(len(pairs))
    ax.barh(positions, counts, color=ISSUE_COLOR, height=0.7)
    ax.set_yticks(positions, [f"given {name(g)} → true {name(t)}" for g, t, _ in pairs])
    ax.invert_yaxis()
    for y, (g, _, n) in zip(positions, pairs):
        share = n / max(int(per_class_count[g]), 1)
        ax.annotate(f"{n:,.0f} ({100 * share:.1f}% of given {name(g)})", (n, y), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize="small")
    # Room right of the longest bar for its annotation.
    ax.set_xlim(0, counts.max() * 1.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rows (confident joint, calibrated)")
    ax.set_title(f"top {len(pairs)} confused pairs: given label → likely true label")
