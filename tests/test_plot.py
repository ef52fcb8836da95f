"""The summary plot: zoom range, the highest-issue line's label, legends
clear of the bars, the per-class panel and the confused-pairs panel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dask_labelissues import find_label_issues  # noqa: E402
from dask_labelissues.plot import (  # noqa: E402
    ZOOM_QUANTILE,
    confused_pairs,
    cuts_by_score,
    plot_summary,
    summary_figure,
    zoom_upper,
)
from dask_labelissues.results import open_results  # noqa: E402

from .conftest import make_dataset  # noqa: E402

NOT_CUT = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


@pytest.fixture(scope="module")
def data():
    return make_dataset(20_000, 10, seed=1)


@pytest.fixture(scope="module")
def results(data):
    """One result per filter, computed once for the module."""
    cache = {}

    def get(filter_by=None, **kwargs):
        key = (filter_by, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = find_label_issues(data.labels, data.pred_probs, filter_by=filter_by,
                                           backend="serial", **kwargs)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def panel(fig, name):
    found = [ax for ax in fig.axes if ax.get_label() == name]
    assert len(found) == 1, [ax.get_label() for ax in fig.axes]
    return found[0]


def legend_texts(ax):
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]


# -- the zoom ----------------------------------------------------------------
def test_zoom_holds_most_issues_where_filter_does_not_cut_by_score(results):
    r = results("prune_by_noise_rate")
    scores = r.issue_scores
    hi = panel(summary_figure(r), "zoom").get_xlim()[1]
    assert (scores <= hi).mean() >= ZOOM_QUANTILE
    # Much narrower than [0, 1]: three times the highest issue score would
    # span nearly all of it and show nothing in detail.
    assert hi <= 0.3
    assert hi < scores.max()


def test_zoom_keeps_the_cut_off_in_view_for_the_batched_method(results):
    r = results()
    highest = r.issue_scores.max()
    zoom = panel(summary_figure(r), "zoom")
    hi = zoom.get_xlim()[1]
    assert highest <= hi <= 1.5 * highest
    assert [line.get_xdata()[0] for line in zoom.get_lines()] == [highest]


def test_zoom_upper_ignores_an_outlier_unless_it_is_the_cut_off():
    scores = np.concatenate([np.linspace(0.0, 0.01, 1000), [0.9]])
    assert zoom_upper(scores, include_highest=False) <= 0.02
    assert zoom_upper(scores, include_highest=True) == 1.0
    assert zoom_upper(np.zeros(5), include_highest=True) > 0
    assert zoom_upper(np.zeros(0), include_highest=False) > 0
    assert zoom_upper(np.array([0.1]), include_highest=True) == pytest.approx(0.12)


# -- the dashed line -----------------------------------------------------------
@pytest.mark.parametrize("filter_by", [None, "low_self_confidence", *NOT_CUT, "low_normalized_margin"])
def test_highest_issue_line_says_whether_it_is_a_cut_off(results, filter_by):
    r = results(filter_by)
    # Ground truth: the line is a cut-off exactly when no non-issue scores lower.
    scores, mask = np.asarray(r.label_quality_scores), np.asarray(r.is_label_issue)
    is_cut = not np.any(~mask & (scores < r.issue_scores.max()))
    assert cuts_by_score(r) == is_cut
    [line] = [t for t in legend_texts(panel(summary_figure(r), "scores")) if "highest score" in t]
    if is_cut:
        assert "cut-off" in line and "not a threshold" not in line
    else:
        assert "not a threshold" in line and filter_by in line


def test_low_filter_is_no_cut_off_of_another_or_adjusted_score(results):
    r = results("low_self_confidence")
    assert cuts_by_score(r)
    assert not cuts_by_score(dataclasses.replace(r, adjust_pred_probs=True))
    assert not cuts_by_score(dataclasses.replace(r, method="normalized_margin"))


# -- legends -------------------------------------------------------------------
@pytest.mark.parametrize("filter_by", [None, "prune_by_noise_rate"])
def test_legends_cover_no_bars(results, filter_by):
    fig = summary_figure(results(filter_by))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 2
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            # Outside every panel's data area, so no bar, however tall, can be under it.
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_label()
            for bar in ax.patches:
                if bar.get_height() > 0 and bar.get_width() > 0:
                    assert not box.overlaps(bar.get_window_extent(renderer))


# -- the per-class panel -------------------------------------------------------
def test_per_class_panel_shows_counts_and_says_so(results):
    r = results("prune_by_noise_rate")
    ax = panel(summary_figure(r), "per_class")
    np.testing.assert_array_equal([b.get_height() for b in ax.patches], r.per_class_issues)
    assert "number of label issues" in ax.get_title()
    assert "count" in ax.get_ylabel()
    rate = r.per_class_issues / r.per_class_count
    worst = int(np.argmax(rate))
    assert f"class {worst}, {r.per_class_issues[worst]:,} of its {r.per_class_count[worst]:,} rows" in ax.get_title()


# -- the confused pairs ----------------------------------------------------------
def expected_pairs(joint, top):
    off = np.asarray(joint, dtype=np.float64).copy()
    np.fill_diagonal(off, -1)
    order = np.argsort(-off.ravel(), kind="stable")[:top]
    return [(int(i // off.shape[0]), int(i % off.shape[0]), off.ravel()[i]) for i in order if off.ravel()[i] > 0]


@pytest.mark.parametrize(
    "filter_by, kwargs, has_joint",
    [
        (None, {}, False),
        ("predicted_neq_given", {}, False),
        (None, {"health": True}, True),
        ("prune_by_noise_rate", {}, True),
        ("confident_learning", {}, True),
    ],
)
def test_confused_pairs_panel_exactly_when_there_is_a_joint(results, filter_by, kwargs, has_joint):
    r = results(filter_by, **kwargs)
    assert (r.confident_joint is not None) == has_joint
    fig = summary_figure(r)
    names = [ax.get_label() for ax in fig.axes]
    assert names == ["scores", "zoom", "per_class"] + (["confused_pairs"] if has_joint else [])
    for ax in fig.axes:  # no empty panel
        assert ax.patches
    if not has_joint:
        return
    ax = panel(fig, "confused_pairs")
    expected = expected_pairs(r.confident_joint, 15)
    assert len(expected) == 15
    assert [b.get_width() for b in ax.patches] == [n for _, _, n in expected]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"given {g} → true {t}" for g, t, _ in expected]
    # Largest at the top.
    ys = [b.get_y() for b in ax.patches]
    assert ax.yaxis_inverted() and ys == sorted(ys)


def test_confused_pairs_order_and_names(results):
    joint = np.array([[50, 3, 7], [7, 40, 0], [1, 9, 60]])
    assert confused_pairs(joint) == [(2, 1, 9.0), (0, 2, 7.0), (1, 0, 7.0), (0, 1, 3.0), (2, 0, 1.0)]
    assert confused_pairs(joint, top=2) == [(2, 1, 9.0), (0, 2, 7.0)]
    assert confused_pairs(np.diag([5, 5])) == []
    r = results("prune_by_noise_rate")
    names = [f"class-{c}" for c in range(r.n_classes)]
    ax = panel(summary_figure(r, class_names=names), "confused_pairs")
    g, t, _ = confused_pairs(r.confident_joint)[0]
    assert ax.get_yticklabels()[0].get_text() == f"given class-{g} → true class-{t}"


# -- whole figures -----------------------------------------------------------------
def test_from_a_results_store_as_in_memory(results, tmp_path):
    r = results("prune_by_noise_rate")
    r.to_zarr(str(tmp_path / "r.zarr"))
    opened = open_results(tmp_path / "r.zarr")
    assert hasattr(opened.label_quality_scores, "dask")
    a, b = summary_figure(r), summary_figure(opened)
    for name in ("scores", "zoom"):
        assert panel(a, name).get_xlim() == panel(b, name).get_xlim()
        np.testing.assert_array_equal([p.get_height() for p in panel(a, name).patches],
                                      [p.get_height() for p in panel(b, name).patches])
    assert ([p.get_width() for p in panel(a, "confused_pairs").patches]
            == [p.get_width() for p in panel(b, "confused_pairs").patches])
    png = plot_summary(opened, tmp_path / "s.png")
    image = plt.imread(png)
    # A drawn figure: large, and more than one colour.
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 2


def test_no_issues():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    probs = np.full((2000, 10), 0.01)
    probs[np.arange(2000), labels] = 0.91
    r = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", backend="serial")
    assert r.num_issues == 0
    fig = summary_figure(r)
    # The joint is diagonal: no pair to show, so no panel for them.
    assert [ax.get_label() for ax in fig.axes] == ["scores", "zoom", "per_class"]
    assert "no label issues" in panel(fig, "zoom").get_title()
    assert panel(fig, "per_class").get_title().endswith("none in any class")
    with pytest.raises(ValueError, match="class_names has 3 names for 10 classes"):
        summary_figure(r, class_names=["a", "b", "c"])
