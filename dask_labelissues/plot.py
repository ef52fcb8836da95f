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


# -- segmentation ---------------------------------------------------------------------
#: Width of one image panel of the segmentation figure, in inches.
SEGMENTATION_PANEL = 3.0
#: Resolution of the PNGs written (dots per inch).
DPI = 110
#: Most images ``summary --plot`` draws of a segmentation store (its
#: ``--top``, 20 by default, sizes the printed list).
SEGMENTATION_PLOT_TOP = 6
#: Colour of the flagged pixels, drawn on a grey copy of the given label map.
FLAG_COLOR = "#ff0a0a"
#: Colour of the pixels whose label is ``ignore_index`` (left out of the search).
IGNORED_COLOR = "#111111"
#: Grey levels the classes of the flagged-pixels panel are spread over
#: (darkest, lightest), so that red stands out on every one of them.
_GREY_RANGE = (0.42, 0.9)
#: tab10, tab20's light shades, then shades of tab20b and tab20c, without
#: reds (the flags' colour) and greys (the flagged panel's base): 32
#: colours, the first 16 clearly apart.
_CLASS_PALETTE = (
    [("tab10", i) for i in (0, 1, 2, 4, 5, 6, 8, 9)]
    + [("tab20", i) for i in (1, 3, 5, 9, 11, 13, 17, 19)]
    + [("tab20b", i) for i in (0, 4, 8, 16, 2, 6, 10, 18)]
    + [("tab20c", i) for i in (0, 4, 8, 12, 2, 6, 10, 14)]
)
#: Images of at most this many pixels a side are drawn pixel by pixel
#: (upsampled); larger ones are smoothed when shrunk to the panel.
_NEAREST_UP_TO = 400


def class_colors(classes: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """One colour per class, for the classes shown in one figure.

    Up to 32 classes get colours of :data:`_CLASS_PALETTE` (in the order
    given; the first 16 clearly apart), none of them red or grey; more get
    evenly spaced colours of the ``turbo`` colormap.

    Parameters
    ----------
    classes
        Distinct class indices.

    Returns
    -------
    dict of int to (float, float, float)
        RGB in [0, 1] for each class.
    """
    import matplotlib

    classes = [int(c) for c in classes]
    if len(classes) <= len(_CLASS_PALETTE):
        rgb = [matplotlib.colormaps[name](i)[:3] for name, i in _CLASS_PALETTE[: len(classes)]]
    else:
        # Neighbouring classes in the list are far apart on the colormap.
        n = len(classes)
        positions = (np.arange(n) * 7 % n + 0.5) / n if n % 7 else (np.arange(n) + 0.5) / n
        rgb = [matplotlib.colormaps["turbo"](float(p))[:3] for p in positions]
    return {c: tuple(float(v) for v in color) for c, color in zip(classes, rgb)}


def segmentation_figure(
    images: Sequence[int],
    labels: np.ndarray,
    predicted: np.ndarray,
    issues: np.ndarray,
    *,
    scores: Sequence[float] | None = None,
    class_names: Sequence[Any] | None = None,
    ignore_index: int | None = None,
) -> Any:
    """Given labels, predicted labels and flagged pixels of a few images, side by side.

    One row per image, three panels: ``"given labels"`` and ``"predicted"``
    in one colour per class (shared by the whole figure, with a legend of
    the classes shown), and ``"flagged pixels (n of H*W)"``: the given label
    map in greys with the flagged pixels in :data:`FLAG_COLOR`.  Pixels
    labelled ``ignore_index`` are :data:`IGNORED_COLOR` in both label-map
    panels.  Each row is
    titled by its image index, and score when given.  The panels' axes are
    labelled ``"given <image>"``, ``"predicted <image>"`` and
    ``"flagged <image>"``.

    Needs matplotlib.  The figure is made without pyplot: nothing is shown
    unless asked, and it is freed once unreferenced.

    Parameters
    ----------
    images
        Index of each image in its dataset, used in the titles (n,).
    labels
        Given label maps ``(n, H, W)``, integer class indices.
    predicted
        Predicted label maps ``(n, H, W)`` (the argmax of pred_probs over
        its class axis).
    issues
        ``(n, H, W)`` bool: the flagged pixels.
    scores
        A score per image (lower is worse), shown in the titles.
    class_names
        Names of the classes, by index; default ``"class <index>"``.
    ignore_index
        The label of pixels left out of the search (as in
        :func:`dask_labelissues.segmentation.find_label_issues`), if any.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    images = [int(i) for i in np.asarray(images).reshape(-1)]
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    issues = np.asarray(issues, dtype=bool)
    n = len(images)
    if labels.ndim != 3 or labels.shape[0] != n:
        raise ValueError(f"labels must be (n, H, W) for n = {n} images, got shape {labels.shape}")
    for name, arr in (("predicted", predicted), ("issues", issues)):
        if arr.shape != labels.shape:
            raise ValueError(f"{name} has shape {arr.shape}, labels {labels.shape}: they must be the same")
    if scores is not None and len(scores) != n:
        raise ValueError(f"scores has {len(scores)} values for {n} images")
    h, w = labels.shape[1:]
    if n == 0:
        fig = Figure(figsize=(3 * SEGMENTATION_PANEL + 0.6, 1.2))
        fig.text(0.5, 0.5, "no images to show: no pixel is flagged", ha="center", va="center")
        return fig

    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, dtype=bool)
    labels = np.where(ignored, predicted, labels)  # a class for the lookups below; drawn as ignored
    shown = np.union1d(np.unique(labels[~ignored]), np.unique(predicted)).astype(np.int64)
    if shown.min() < 0:
        raise ValueError(f"class indices must be >= 0, got {int(shown.min())}")
    if class_names is not None and shown.max() >= len(class_names):
        raise ValueError(f"class {int(shown.max())} is shown but class_names has {len(class_names)} names")
    colors = class_colors(shown)
    lut = np.zeros((int(shown.max()) + 1, 3))
    for c, rgb in colors.items():
        lut[c] = rgb
    # Greys by the classes' lightness, evenly spread so that neighbouring
    # regions stay apart.
    lightness = np.array([0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (colors[c] for c in shown)])
    levels = np.linspace(*_GREY_RANGE, shown.size) if shown.size > 1 else np.array([np.mean(_GREY_RANGE)])
    grey = np.zeros(lut.shape[0])
    grey[shown[np.argsort(lightness, kind="stable")]] = levels
    flag_rgb, ignored_rgb = np.array(_to_rgb(FLAG_COLOR)), np.array(_to_rgb(IGNORED_COLOR))

    def name(c: int) -> str:
        return textwrap.shorten(str(class_names[c]), 28) if class_names is not None else f"class {c}"

    handles = [Patch(facecolor=colors[c], edgecolor="0.3", linewidth=0.5, label=name(c)) for c in shown]
    if ignored.any():
        handles.append(Patch(facecolor=IGNORED_COLOR, edgecolor="0.3", linewidth=0.5,
                             label=f"ignored (label {ignore_index})"))
    handles.append(Patch(facecolor=FLAG_COLOR, edgecolor="0.3", linewidth=0.5, label="flagged pixel"))
    width = 3 * SEGMENTATION_PANEL + 0.6
    # As many columns as fit the longest entry, then as few as fill the
    # same number of rows, so that the last row is not a lone entry.
    entry_width = 0.55 + 0.075 * max(len(p.get_label()) for p in handles)
    legend_rows = -(-len(handles) // max(1, min(len(handles), int((width - 0.4) // entry_width))))
    ncol = -(-len(handles) // legend_rows)
    legend_height = 0.25 + 0.24 * legend_rows
    # Wide images are drawn as wide as the panel, tall ones at most 1.5 times as tall.
    panel_height = SEGMENTATION_PANEL * float(np.clip(h / w, 0.3, 1.5))
    row_height = panel_height + 0.75
    fig = Figure(figsize=(width, n * row_height + legend_height), layout="constrained")
    rows = fig.subfigures(n + 1, 1, squeeze=False, height_ratios=[row_height] * n + [legend_height])[:, 0]
    interpolation = "nearest" if max(h, w) <= _NEAREST_UP_TO else "antialiased"
    for j, (row, image) in enumerate(zip(rows[:n], images)):
        axes = row.subplots(1, 3)
        flagged = int(np.count_nonzero(issues[j]))
        given = lut[labels[j]]
        given[ignored[j]] = ignored_rgb
        on_grey = np.repeat(grey[labels[j]][..., None], 3, axis=-1)
        on_grey[ignored[j]] = ignored_rgb
        on_grey[issues[j]] = flag_rgb
        for ax, label, title, picture in (
            (axes[0], "given", "given labels", given),
            (axes[1], "predicted", "predicted", lut[predicted[j]]),
            (axes[2], "flagged", f"flagged pixels ({flagged:,} of {h * w:,})", on_grey),
        ):
            ax.imshow(picture, interpolation=interpolation)
            ax.set_label(f"{label} {image}")
            ax.set_title(title, fontsize="medium")
            ax.set_xticks([])
            ax.set_yticks([])
        heading = f"image {image}"
        if scores is not None:
            heading += f", image score {float(scores[j]):.4g}"
        row.suptitle(heading, fontweight="bold", fontsize="large")
    rows[n].legend(handles=handles, loc="center", ncol=ncol, frameon=False, fontsize="small",
                   handlelength=1.2, columnspacing=1.2)
    return fig


def plot_segmentation(store_path: str | os.PathLike, out_png: str | os.PathLike, top: int = 4) -> str:
    """Write :func:`segmentation_figure` of a segmentation results store's
    ``top`` worst images (lowest image score first) as a PNG.

    The store is one ``dask-labelissues segment`` wrote.  The label maps
    and predictions are read from the inputs it was made from (the paths in
    its ``inputs`` attribute, a relative path read from the current
    directory), one image at a time and only the images drawn.

    Needs matplotlib (``pip install 'dask-labelissues[plot]'``).

    Parameters
    ----------
    store_path
        The results store (a Zarr group).
    out_png
        Where to write the PNG.
    top
        How many of the worst images to draw.

    Returns
    -------
    str
        ``out_png``.

    Raises
    ------
    FileNotFoundError
        An input the store was made from is no longer where the store says.
    ValueError
        Not a segmentation results store, or inputs of other shapes than
        the store's.
    """
    import zarr

    from . import inputs

    _matplotlib()
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a whole number >= 1, got {top!r}")
    store_path = os.fspath(store_path)
    group = zarr.open_group(os.path.abspath(store_path), mode="r")
    attrs = dict(group.attrs)
    if not str(attrs.get("format", "")).startswith("dask_labelissues segmentation results"):
        raise ValueError(f"{store_path} is not a segmentation results store (one `dask-labelissues segment` writes)")
    n, k, h, w = (int(attrs[key]) for key in ("images", "classes", "height", "width"))
    sources = {}
    for name, shape in (("labels", (n, h, w)), ("pred_probs", (n, k, h, w))):
        path = str(attrs.get("inputs", {}).get(name) or "")
        if not path or _missing(path):
            where = f" (a relative path, read from {os.getcwd()})" if path and not _is_absolute(path) else ""
            raise FileNotFoundError(
                f"{name} input {path!r}{where} does not exist: the plot of {store_path} needs the inputs "
                "the store was made from (its labels and pred_probs), to draw the label maps and predictions"
            )
        source = inputs.open_path(path, name)
        if tuple(int(s) for s in source.shape) != shape:
            raise ValueError(
                f"{name} input {path} has shape {tuple(source.shape)}, but {store_path} was made from {name} "
                f"of shape {shape}: the plot needs the inputs the store was made from"
            )
        sources[name] = source
    chosen = np.asarray(group["ranked_images"][: min(top, n)], dtype=np.int64)
    scores_array, mask = group["image_scores"], group["is_label_issue"]
    labels = np.stack([np.asarray(sources["labels"][i : i + 1])[0] for i in chosen])
    predicted = np.stack([np.asarray(sources["pred_probs"][i : i + 1])[0].argmax(axis=0) for i in chosen])
    issues = np.stack([np.asarray(mask[int(i)], dtype=bool) for i in chosen])
    scores = [float(scores_array[int(i)]) for i in chosen]
    fig = segmentation_figure(
        chosen, labels, predicted, issues, scores=scores, class_names=attrs.get("class_names"),
        ignore_index=attrs.get("ignore_index"),
    )
    fig.suptitle(
        f"the {chosen.size} worst of {n:,} images by image score (lower is worse); "
        f"{int(attrs.get('num_pixel_issues', 0)):,} pixels flagged in all",
        fontsize="large",
    )
    fig.savefig(out_png, dpi=DPI)
    return os.fspath(out_png)


def _matplotlib() -> None:
    """matplotlib, drawing to files (Agg), or an ImportError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'dask-labelissues[plot]'") from None


def _to_rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def _is_absolute(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


def _missing(path: str) -> bool:
    """Whether a local input path (as :func:`~dask_labelissues.inputs.open_path`
    reads it) names no file; remote paths are left to open_path."""
    from .inputs import _H5_SUFFIXES

    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return False
    lowered = path.lower()
    for suffix in (".zarr",) + _H5_SUFFIXES:
        marker = suffix + ":"
        if marker in lowered:
            path = path[: lowered.rindex(marker) + len(suffix)]
            break
    return not os.path.exists(path)
