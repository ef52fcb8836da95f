"""The cleanlab-compatible surface: find_label_issues_batched and LabelInspector."""

from __future__ import annotations

import numpy as np
import pytest
from cleanlab.experimental.label_issues_batched import (
    LabelInspector as CleanlabInspector,
    find_label_issues_batched as cleanlab_batched,
)

from dask_labelissues import LabelInspector, find_label_issues, find_label_issues_batched

from .conftest import make_dataset


@pytest.fixture(scope="module")
def data():
    return make_dataset(15000, 7, seed=61)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_batched_returns_cleanlab_set_ranked_by_score(data, n_jobs):
    theirs = cleanlab_batched(labels=data.labels, pred_probs=data.pred_probs, batch_size=2000, verbose=False)
    ours = find_label_issues_batched(
        labels=data.labels, pred_probs=data.pred_probs, batch_size=2000, n_jobs=n_jobs, verbose=False
    )
    assert set(ours.tolist()) == set(theirs.tolist())
    # cleanlab 2.9 returns index order although it documents a ranking.
    assert np.all(np.diff(theirs) > 0)
    scores = data.pred_probs[ours, data.labels[ours]]
    assert np.all(np.diff(scores) >= 0)


def test_batched_files_mask_and_kwargs(data, tmp_path):
    np.save(tmp_path / "l.npy", data.labels)
    np.save(tmp_path / "p.npy", data.pred_probs)
    kwargs = dict(
        quality_score_kwargs={"method": "normalized_margin"},
        num_issue_kwargs={"estimation_method": "off_diagonal_calibrated"},
        return_mask=True,
    )
    theirs = cleanlab_batched(
        labels_file=str(tmp_path / "l.npy"), pred_probs_file=str(tmp_path / "p.npy"),
        batch_size=3000, verbose=False, **kwargs,
    )
    ours = find_label_issues_batched(
        labels_file=str(tmp_path / "l.npy"), pred_probs_file=str(tmp_path / "p.npy"),
        batch_size=3000, verbose=False, **kwargs,
    )
    assert ours.dtype == bool and ours.shape == (data.n,)
    np.testing.assert_array_equal(ours, theirs)


def test_batched_argument_errors(data):
    with pytest.raises(ValueError, match="not both"):
        find_label_issues_batched(labels=data.labels, labels_file="x.npy", pred_probs=data.pred_probs)
    with pytest.raises(ValueError, match="pred_probs .* is required"):
        find_label_issues_batched(labels=data.labels)
    with pytest.raises(TypeError, match="unsupported keyword"):
        find_label_issues_batched(
            labels=data.labels, pred_probs=data.pred_probs, quality_score_kwargs={"rank_by": "x"}
        )


def test_batched_progress_bars_go_to_stderr(data, capsys):
    find_label_issues_batched(labels=data.labels, pred_probs=data.pred_probs, batch_size=5000, verbose=True)
    captured = capsys.readouterr()
    assert "pass 1" in captured.err and "pass 2" in captured.err
    # Only cleanlab's informational line goes to stdout; the bars do not.
    assert captured.out == f"Total number of examples whose labels have been evaluated: {data.n}\n"


SETTINGS = [
    ({}, {}),
    ({"method": "normalized_margin", "adjust_pred_probs": True}, {"estimation_method": "off_diagonal_calibrated"}),
    ({"method": "confidence_weighted_entropy"}, {}),
]


@pytest.mark.parametrize("qkw,ikw", SETTINGS)
def test_inspector_matches_cleanlab(data, qkw, ikw):
    ours = LabelInspector(num_class=data.k, verbose=False, quality_score_kwargs=qkw, num_issue_kwargs=ikw)
    theirs = CleanlabInspector(num_class=data.k, verbose=False, quality_score_kwargs=qkw, num_issue_kwargs=ikw)
    bounds = [0, 4000, 4001, 9000, data.n]
    for a, b in zip(bounds, bounds[1:]):
        ours.update_confident_thresholds(data.labels[a:b], data.pred_probs[a:b])
        theirs.update_confident_thresholds(data.labels[a:b], data.pred_probs[a:b])
    np.testing.assert_allclose(ours.get_confident_thresholds(), theirs.get_confident_thresholds(), rtol=1e-12)
    for a, b in zip(bounds, bounds[1:]):
        np.testing.assert_allclose(
            ours.score_label_quality(data.labels[a:b], data.pred_probs[a:b]),
            theirs.score_label_quality(data.labels[a:b], data.pred_probs[a:b]),
            rtol=1e-10,
        )
    assert ours.get_num_issues() == theirs.get_num_issues()
    assert isinstance(ours.get_quality_scores(), np.ndarray)
    np.testing.assert_allclose(ours.get_quality_scores(), theirs.get_quality_scores(), rtol=1e-10)
    assert set(ours.get_label_issues()) == set(theirs.get_label_issues())


def test_inspector_merge_equals_one_pass(data):
    whole = LabelInspector(num_class=data.k, verbose=False)
    whole.update_confident_thresholds(data.labels, data.pred_probs)
    whole.score_label_quality(data.labels, data.pred_probs)

    # Two "machines" each see part of the rows for the thresholds...
    left = LabelInspector(num_class=data.k, verbose=False)
    right = LabelInspector(num_class=data.k, verbose=False)
    left.update_confident_thresholds(data.labels[:6000], data.pred_probs[:6000])
    right.update_confident_thresholds(data.labels[6000:], data.pred_probs[6000:])
    merged = left.merge(right)
    # Exact sums: the merged thresholds are bit-identical to one pass.
    np.testing.assert_array_equal(merged.get_confident_thresholds(), whole.get_confident_thresholds())

    # ...then score their parts with copies of the merged thresholds.
    a, b = merged.scoring_copy(), merged.scoring_copy()
    a.score_label_quality(data.labels[:6000], data.pred_probs[:6000])
    b.score_label_quality(data.labels[6000:], data.pred_probs[6000:])
    a.merge(b)
    np.testing.assert_array_equal(a.get_quality_scores(), whole.get_quality_scores())
    assert a.get_num_issues() == whole.get_num_issues()
    np.testing.assert_array_equal(a.get_label_issues(), whole.get_label_issues())

    # Scores made with different thresholds cannot be merged.
    partial = LabelInspector(num_class=data.k, verbose=False)
    partial.update_confident_thresholds(data.labels[:6000], data.pred_probs[:6000])
    partial.score_label_quality(data.labels[:10], data.pred_probs[:10])
    with pytest.raises(ValueError, match="different thresholds"):
        partial.merge(b)


def test_inspector_issues_agree_with_find_label_issues(data):
    insp = LabelInspector(num_class=data.k, verbose=False)
    insp.update_confident_thresholds(data.labels, data.pred_probs)
    insp.score_label_quality(data.labels, data.pred_probs)
    result = find_label_issues(data.labels, data.pred_probs, backend="serial")
    # The inspector's list is the top of the ranking before the near-tie rule.
    top = insp.get_label_issues()
    assert len(top) == result.estimated_num_issues
    assert set(result.issues) <= set(top)
    np.testing.assert_array_equal(insp.get_confident_thresholds(), result.confident_thresholds)


def test_inspector_errors(data):
    insp = LabelInspector(num_class=data.k, verbose=False)
    with pytest.raises(ValueError, match="update_confident_thresholds"):
        insp.get_confident_thresholds()
    with pytest.raises(ValueError, match="num_class=7"):
        insp.update_confident_thresholds(data.labels[:10], data.pred_probs[:10, :5])
    bad = data.pred_probs[:100].copy()
    bad[40, 2] = -0.5
    insp.update_confident_thresholds(data.labels[:100], data.pred_probs[:100])
    with pytest.raises(ValueError, match=r"pred_probs\[140, 2\] = -0.5 is negative"):
        insp.update_confident_thresholds(data.labels[:100], bad)
    with pytest.raises(ValueError, match="score_label_quality"):
        insp.get_num_issues()
    with pytest.raises(ValueError, match="same num_class"):
        insp.merge(LabelInspector(num_class=3))



# -- verbose output ------------------------------------------------------------
# cleanlab prints its informational lines with print() (stdout) and its
# progress bars with tqdm (stderr); ours must print the same lines on stdout.

THRESH_LINE = "Total number of examples used to estimate confident thresholds: {}\n"
SCORED_LINE = "Total number of examples whose labels have been evaluated: {}\n"
MMAP_LINE = "mmap-loaded numpy arrays have: {} examples, {} classes\n"
BOUNDS = [0, 1200, 2500, 2501, 5000]  # uneven batches, one of a single row


@pytest.fixture(scope="module")
def small():
    # No absent class, so cleanlab's 2e-6 threshold defect cannot change the
    # counts; the printed numbers are row counts, checked against BOUNDS too.
    return make_dataset(5000, 5, seed=17)


def _steps(inspector, data):
    """cleanlab's LabelInspector recipe, yielding (step, result) after each call."""
    batches = list(zip(BOUNDS, BOUNDS[1:]))
    for a, b in batches[:2]:
        yield f"update {a}:{b}", inspector.update_confident_thresholds(data.labels[a:b], data.pred_probs[a:b])
    yield "thresholds after 2 batches", inspector.get_confident_thresholds()
    for a, b in batches[2:]:
        yield f"update {a}:{b}", inspector.update_confident_thresholds(data.labels[a:b], data.pred_probs[a:b])
    yield "thresholds", inspector.get_confident_thresholds()
    yield "thresholds silent", inspector.get_confident_thresholds(silent=True)
    for a, b in batches[:2]:
        yield f"score {a}:{b}", inspector.score_label_quality(data.labels[a:b], data.pred_probs[a:b])
    yield "num issues after 2 batches", inspector.get_num_issues()
    for a, b in batches[2:]:
        yield f"score {a}:{b}", inspector.score_label_quality(data.labels[a:b], data.pred_probs[a:b])
    yield "num issues", inspector.get_num_issues()
    yield "num issues silent", inspector.get_num_issues(silent=True)
    yield "quality scores", inspector.get_quality_scores()
    yield "label issues", inspector.get_label_issues()


def _printed(cls, data, capfd, **kwargs):
    """[(step, stdout, stderr, result)] of one inspector class over :func:`_steps`."""
    capfd.readouterr()
    inspector = cls(num_class=data.k, **kwargs)
    captured = capfd.readouterr()
    rows = [("init", captured.out, captured.err, None)]
    for name, result in _steps(inspector, data):
        captured = capfd.readouterr()
        rows.append((name, captured.out, captured.err, result))
    return rows


@pytest.mark.parametrize("n_jobs", [1, None])
def test_inspector_verbose_prints_cleanlab_lines(small, capfd, n_jobs):
    theirs = _printed(CleanlabInspector, small, capfd, n_jobs=n_jobs)
    ours = _printed(LabelInspector, small, capfd, n_jobs=n_jobs)
    # The counts agree, so the printed lines must too, step by step.
    assert {n: r for n, _, _, r in ours}["num issues"] == {n: r for n, _, _, r in theirs}["num issues"]
    assert [(n, o) for n, o, _, _ in ours] == [(n, o) for n, o, _, _ in theirs]
    # Independently of cleanlab: what each step prints, from the batch sizes.
    expected = {
        "thresholds after 2 batches": THRESH_LINE.format(2500),
        "thresholds": THRESH_LINE.format(5000),
        "num issues after 2 batches": SCORED_LINE.format(2500),
        "num issues": SCORED_LINE.format(5000),
        "label issues": SCORED_LINE.format(5000),
    }
    assert {n: o for n, o, _, _ in ours if o} == expected
    assert all(e == "" for _, _, e, _ in ours)


def test_inspector_merged_prints_merged_counts(small, capfd):
    left = LabelInspector(num_class=small.k)
    right = LabelInspector(num_class=small.k)
    left.update_confident_thresholds(small.labels[:3000], small.pred_probs[:3000])
    right.update_confident_thresholds(small.labels[3000:], small.pred_probs[3000:])
    merged = left.merge(right)
    a, b = merged.scoring_copy(), merged.scoring_copy()
    a.score_label_quality(small.labels[:1000], small.pred_probs[:1000])
    b.score_label_quality(small.labels[1000:], small.pred_probs[1000:])
    assert capfd.readouterr().out == ""
    merged.get_confident_thresholds()
    a.merge(b).get_label_issues()
    assert capfd.readouterr().out == THRESH_LINE.format(5000) + SCORED_LINE.format(5000)


@pytest.mark.parametrize("files", ["none", "both", "labels", "pred_probs"])
def test_batched_verbose_prints_cleanlab_lines(small, tmp_path, capfd, files):
    np.save(tmp_path / "l.npy", small.labels)
    np.save(tmp_path / "p.npy", small.pred_probs)
    kwargs = {}
    if files in ("both", "labels"):
        kwargs["labels_file"] = str(tmp_path / "l.npy")
    else:
        kwargs["labels"] = small.labels
    if files in ("both", "pred_probs"):
        kwargs["pred_probs_file"] = str(tmp_path / "p.npy")
    else:
        kwargs["pred_probs"] = small.pred_probs
    capfd.readouterr()
    theirs = cleanlab_batched(batch_size=1500, verbose=True, **kwargs)
    cl = capfd.readouterr()
    ours = find_label_issues_batched(batch_size=1500, verbose=True, **kwargs)
    us = capfd.readouterr()
    assert set(ours.tolist()) == set(theirs.tolist())
    assert us.out == cl.out
    mapped = MMAP_LINE.format(small.n, small.k) if "pred_probs_file" in kwargs else ""
    assert us.out == mapped + SCORED_LINE.format(small.n)
    # stderr holds the progress bars only.
    assert "Total number" not in us.err and "mmap" not in us.err and "pass 2" in us.err


def test_batched_verbose_threads_and_non_npy_file(small, tmp_path, capfd):
    import zarr

    capfd.readouterr()
    find_label_issues_batched(labels=small.labels, pred_probs=small.pred_probs, batch_size=1500, n_jobs=2)
    assert capfd.readouterr().out == SCORED_LINE.format(small.n)
    # A Zarr store is read, not memory-mapped: the line says only its size.
    zarr.create_array(str(tmp_path / "p.zarr"), data=small.pred_probs, chunks=(1000, 5))
    find_label_issues_batched(labels=small.labels, pred_probs_file=str(tmp_path / "p.zarr"), batch_size=1500)
    assert capfd.readouterr().out == (
        f"pred_probs_file has: {small.n} examples, {small.k} classes\n" + SCORED_LINE.format(small.n)
    )


def test_not_verbose_prints_nothing(small, tmp_path, capfd):
    np.save(tmp_path / "l.npy", small.labels)
    np.save(tmp_path / "p.npy", small.pred_probs)
    capfd.readouterr()
    find_label_issues_batched(
        labels_file=str(tmp_path / "l.npy"), pred_probs_file=str(tmp_path / "p.npy"), batch_size=1500, verbose=False
    )
    find_label_issues_batched(labels=small.labels, pred_probs=small.pred_probs, n_jobs=2, verbose=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    rows = _printed(LabelInspector, small, capfd, verbose=False)
    assert all(o == "" and e == "" for _, o, e, _ in rows)
