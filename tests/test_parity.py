"""Parity with cleanlab 2.9, the test oracle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cleanlab.count import get_confident_thresholds
from cleanlab.experimental.label_issues_batched import (
    LabelInspector as CleanlabInspector,
    find_label_issues_batched as cleanlab_batched,
)
from cleanlab.filter import find_label_issues as cleanlab_filter
from cleanlab.rank import get_label_quality_scores

from dask_labelissues import find_label_issues

from .conftest import make_dataset

SETTINGS = [
    (m, a)
    for m, a in itertools.product(
        ["self_confidence", "normalized_margin", "confidence_weighted_entropy"], [False, True]
    )
    if not (m == "confidence_weighted_entropy" and a)
]
ESTIMATIONS = ["off_diagonal", "off_diagonal_calibrated"]

DATASETS = {
    "k2": dict(n=4000, k=2, seed=10),
    "k10": dict(n=20000, k=10, seed=11),
    "k100": dict(n=20000, k=100, seed=12, signal=4.0),
    "imbalanced": dict(n=20000, k=10, seed=13, imbalance=0.3),
    "k10-float32": dict(n=20000, k=10, seed=14, dtype=np.float32),
    "k100-float32-imbalanced": dict(n=10000, k=100, seed=15, dtype=np.float32, imbalance=0.02),
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def data(request):
    return make_dataset(**DATASETS[request.param])


def _rtol(pred_probs: np.ndarray) -> float:
    # cleanlab averages float32 input in float32; float64 must agree to 1e-12.
    return 1e-12 if pred_probs.dtype == np.float64 else 2e-6


def _cleanlab_scores(labels, pred_probs, method, adjust):
    scores = get_label_quality_scores(
        labels, pred_probs, method=method, adjust_pred_probs=adjust
    )
    return np.asarray(scores, dtype=np.float64)


def _same_up_to_cutoff_ties(ours: np.ndarray, theirs: np.ndarray, ref_scores: np.ndarray, t: int) -> None:
    """Both sets come from the ``t`` lowest scores: they may differ only
    among rows tied at the ``t``-th lowest (cleanlab breaks ties by an
    unstable sort), and ours may be smaller by at most the rows it takes at
    that score (cleanlab keeps the rows whose given label would win a near
    tie, and ours drops them)."""
    cutoff = np.sort(ref_scores)[max(t - 1, 0)]
    below = np.count_nonzero(ref_scores < cutoff)
    assert 0 <= len(theirs) - len(ours) <= t - below, (len(ours), len(theirs), t, below)
    differ = np.setxor1d(ours, theirs)
    assert np.all(ref_scores[differ] == cutoff), (
        f"{differ.size} rows differ and not all sit at the cutoff score {cutoff}: "
        f"{differ[:10]} with scores {ref_scores[differ[:10]]}"
    )


def test_thresholds_equal_full_data_cleanlab(data):
    result = find_label_issues(data.labels, data.pred_probs, backend="serial", chunk_rows=777)
    expected = get_confident_thresholds(data.labels, data.pred_probs)
    np.testing.assert_allclose(
        result.confident_thresholds, expected, rtol=_rtol(data.pred_probs), atol=0
    )


@pytest.mark.parametrize("method,adjust", SETTINGS)
def test_scores_match_cleanlab_rank(data, method, adjust):
    result = find_label_issues(
        data.labels, data.pred_probs, method=method, adjust_pred_probs=adjust,
        backend="serial", chunk_rows=4999,
    ).compute()
    expected = _cleanlab_scores(data.labels, data.pred_probs, method, adjust)
    # For float32 input cleanlab computes in float32 (thresholds included),
    # so agreement is to float32 precision there.
    exact = data.pred_probs.dtype == np.float64
    np.testing.assert_allclose(
        result.label_quality_scores, expected,
        rtol=1e-10 if exact else 1e-5, atol=1e-12 if exact else 1e-7,
    )


@pytest.mark.parametrize("estimation", ESTIMATIONS)
@pytest.mark.parametrize("method,adjust", SETTINGS)
def test_issues_match_cleanlab_batched(data, method, adjust, estimation):
    kwargs = dict(
        quality_score_kwargs={"method": method, "adjust_pred_probs": adjust},
        num_issue_kwargs={"estimation_method": estimation},
    )
    # One cleanlab batch makes its running-mean thresholds the full-data means.
    theirs = cleanlab_batched(
        labels=data.labels, pred_probs=data.pred_probs, batch_size=data.n, verbose=False, **kwargs
    )
    ours = find_label_issues(
        data.labels, data.pred_probs, method=method, adjust_pred_probs=adjust,
        estimation_method=estimation, backend="serial", chunk_rows=3001,
    )

    inspector = CleanlabInspector(num_class=data.k, verbose=False, **kwargs)
    inspector.update_confident_thresholds(data.labels, data.pred_probs)
    their_scores = inspector.score_label_quality(data.labels, data.pred_probs)
    assert ours.estimated_num_issues == inspector.get_num_issues(silent=True)

    _same_up_to_cutoff_ties(
        ours.issues, theirs, np.asarray(their_scores, dtype=np.float64), ours.estimated_num_issues
    )


def test_issues_are_ranked_by_score_then_index(data):
    result = find_label_issues(data.labels, data.pred_probs, backend="serial").compute()
    scores = result.label_quality_scores[result.issues]
    np.testing.assert_array_equal(scores, result.issue_scores)
    order = np.lexsort((result.issues, scores))
    np.testing.assert_array_equal(order, np.arange(len(order)))


def test_per_row_and_per_class_outputs(data):
    result = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=3333).compute()
    np.testing.assert_array_equal(result.given_label, data.labels)
    np.testing.assert_array_equal(result.predicted_label, data.pred_probs.argmax(axis=1))
    np.testing.assert_array_equal(result.per_class_count, np.bincount(data.labels, minlength=data.k))
    np.testing.assert_array_equal(
        result.per_class_issues, np.bincount(data.labels[result.issues], minlength=data.k)
    )
    np.testing.assert_array_equal(np.flatnonzero(result.is_label_issue), np.sort(result.issues))
    assert result.num_issues <= result.estimated_num_issues


def test_many_batches_of_cleanlab_agree(data):
    """cleanlab's running-mean thresholds differ from the exact ones by
    rounding only; on real data that does not change the issues."""
    theirs = cleanlab_batched(
        labels=data.labels, pred_probs=data.pred_probs, batch_size=997, verbose=False
    )
    ours = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=997)
    scores = data.pred_probs[np.arange(data.n), data.labels].astype(np.float64)
    _same_up_to_cutoff_ties(ours.issues, theirs, scores, ours.estimated_num_issues)


def test_jaccard_with_cleanlab_filter(data):
    """cleanlab's in-memory low_self_confidence filter counts issues from the
    confident joint and skips nothing for near ties, so it is a different
    method; the two agree closely unless classes are very imbalanced (at a
    90:1 prior ratio cleanlab's batched and in-memory results themselves
    have Jaccard 0.90)."""
    ours = find_label_issues(data.labels, data.pred_probs, backend="serial")
    mask = cleanlab_filter(data.labels, data.pred_probs, filter_by="low_self_confidence")
    theirs = np.flatnonzero(mask)
    inter = np.intersect1d(ours.issues, theirs).size
    union = np.union1d(ours.issues, theirs).size
    assert union > 0
    assert inter / union >= 0.95, f"Jaccard {inter / union:.3f}"


def test_absent_class_keeps_full_data_thresholds():
    """A class nobody is labelled with gets threshold 2.0 (full-data cleanlab);
    cleanlab's batched code gives it 2e-6 and reports thousands of false issues."""
    data = make_dataset(20000, 10, seed=21, absent=(3,))
    assert not np.any(data.labels == 3)
    ours = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=2500)
    full = get_confident_thresholds(data.labels, data.pred_probs)
    assert full[3] == 2.0 and ours.confident_thresholds[3] == 2.0
    np.testing.assert_allclose(ours.confident_thresholds, full, rtol=1e-12)

    # T from the full-data thresholds, computed independently of our code.
    pred = data.pred_probs.argmax(axis=1)
    p_pred = data.pred_probs[np.arange(data.n), pred]
    expected_t = int(np.sum((pred != data.labels) & (p_pred >= full[pred] - 1e-6)))
    assert ours.estimated_num_issues == expected_t

    theirs = cleanlab_batched(
        labels=data.labels, pred_probs=data.pred_probs, batch_size=2500, verbose=False
    )
    # The defect being pinned: cleanlab's batched count is far larger.
    assert len(theirs) > 1.5 * ours.num_issues
    assert set(ours.issues) <= set(theirs)


def test_validation_rejects_what_cleanlab_accepts():
    data = make_dataset(500, 3, seed=5)
    probs = data.pred_probs.copy()
    probs[123, 1] = np.nan
    # cleanlab's batched function silently returns a result...
    cleanlab_batched(labels=data.labels, pred_probs=probs, batch_size=100, verbose=False)
    # ...we name the row and value.
    with pytest.raises(ValueError, match=r"pred_probs\[123, 1\] = nan is not finite"):
        find_label_issues(data.labels, probs, backend="serial")
