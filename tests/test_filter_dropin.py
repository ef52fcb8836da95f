"""dask_labelissues.filter.find_label_issues against cleanlab.filter.find_label_issues."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cleanlab.filter import find_label_issues as cleanlab_find

from dask_labelissues import filter as dropin
from dask_labelissues import filters
from dask_labelissues import multilabel_classification as ml

from .conftest import make_dataset
from .test_multilabel_classification import examples

SCORES = ["self_confidence", "normalized_margin", "confidence_weighted_entropy"]


def cleanlab(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cleanlab_find(*args, n_jobs=1, **kwargs)


@pytest.fixture(scope="module")
def data():
    return make_dataset(6000, 7, seed=71)  # float64, continuous: no ties for cleanlab's sort to break


@pytest.mark.parametrize("filter_by", filters.FILTERS)
def test_masks_and_rankings_equal_cleanlabs(data, filter_by):
    expected = cleanlab(data.labels, data.pred_probs, filter_by=filter_by)
    assert 0 < expected.sum() < len(expected)
    got = dropin.find_label_issues(data.labels, data.pred_probs, filter_by=filter_by, backend="threads", chunk_rows=777)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)
    for score in SCORES:
        np.testing.assert_array_equal(
            dropin.find_label_issues(data.labels, data.pred_probs, filter_by=filter_by,
                                     return_indices_ranked_by=score, backend="serial"),
            cleanlab(data.labels, data.pred_probs, filter_by=filter_by, return_indices_ranked_by=score),
        )


@pytest.mark.parametrize("score", ["self_confidence", "normalized_margin"])
def test_adjusted_rankings_equal_cleanlabs(data, score):
    kwargs = dict(filter_by="both", return_indices_ranked_by=score, rank_by_kwargs={"adjust_pred_probs": True})
    got = dropin.find_label_issues(data.labels, data.pred_probs, **kwargs)
    np.testing.assert_array_equal(got, cleanlab(data.labels, data.pred_probs, **kwargs))
    unadjusted = dropin.find_label_issues(data.labels, data.pred_probs, filter_by="both", return_indices_ranked_by=score)
    assert not np.array_equal(got, unadjusted)  # the keyword is not ignored


def test_multi_label_is_the_multilabel_job_and_deprecated():
    labels, probs, _ = examples(5)
    with pytest.warns(DeprecationWarning, match="multilabel_classification"):
        got = dropin.find_label_issues(labels, probs, multi_label=True, return_indices_ranked_by="self_confidence")
    np.testing.assert_array_equal(got, ml.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"))
    np.testing.assert_array_equal(
        got, cleanlab(labels, probs, multi_label=True, return_indices_ranked_by="self_confidence")
    )


@pytest.mark.parametrize("filter_by", filters.PRUNE_FILTERS)
def test_a_given_confident_joint_counts_the_issues_as_cleanlabs(data, filter_by):
    from cleanlab.count import compute_confident_joint

    import dask_labelissues

    # Another joint than the data's, as another model or a hand-made
    # estimate would give: more rows of class 0 counted as 1, of 3 as 2.
    joint = compute_confident_joint(data.labels, data.pred_probs)
    joint[0, 1], joint[0, 0] = joint[0, 1] + 60, joint[0, 0] - 60
    joint[3, 2], joint[3, 3] = joint[3, 2] + 40, joint[3, 3] - 40
    expected = cleanlab(data.labels, data.pred_probs, filter_by=filter_by, confident_joint=joint)
    assert not np.array_equal(expected, cleanlab(data.labels, data.pred_probs, filter_by=filter_by))
    got = dropin.find_label_issues(data.labels, data.pred_probs, filter_by=filter_by, confident_joint=joint,
                                   backend="threads", chunk_rows=777)
    np.testing.assert_array_equal(got, expected)
    ranked = dask_labelissues.find_label_issues(data.labels, data.pred_probs, filter_by=filter_by,
                                                confident_joint=joint, backend="serial")
    np.testing.assert_array_equal(ranked.issues, cleanlab(data.labels, data.pred_probs, filter_by=filter_by,
                                                          confident_joint=joint,
                                                          return_indices_ranked_by="self_confidence"))
    # Counted from as given, and kept for the health views calibrated to
    # the labels, as cleanlab's estimate_joint takes a joint given.
    from cleanlab.count import calibrate_confident_joint

    np.testing.assert_array_equal(ranked.confident_joint, calibrate_confident_joint(joint, data.labels))
    assert ranked.confident_joint is not joint


def test_a_given_confident_joint_is_checked_and_used_only_where_cleanlab_uses_it(data):
    import dask_labelissues

    joint = np.full((7, 7), 5)
    with pytest.warns(UserWarning, match="estimates the joint from the data"):
        got = dropin.find_label_issues(data.labels, data.pred_probs, filter_by="confident_learning",
                                       confident_joint=joint)
    np.testing.assert_array_equal(got, cleanlab(data.labels, data.pred_probs, filter_by="confident_learning"))
    np.testing.assert_array_equal(
        dropin.find_label_issues(data.labels, data.pred_probs, filter_by="predicted_neq_given", confident_joint=joint),
        cleanlab(data.labels, data.pred_probs, filter_by="predicted_neq_given"),
    )
    with pytest.raises(ValueError, match=r"shape \(7, 7\).*got \(6, 6\)"):
        dropin.find_label_issues(data.labels, data.pred_probs, confident_joint=np.eye(6, dtype=int))
    with pytest.raises(ValueError, match="finite counts >= 0"):
        dropin.find_label_issues(data.labels, data.pred_probs, confident_joint=-np.eye(7))
    with pytest.raises(ValueError, match="pass filter_by"):
        dask_labelissues.find_label_issues(data.labels, data.pred_probs, confident_joint=joint)


def test_what_is_not_supported_says_so(data):
    with pytest.raises(NotImplementedError, match="temperature"):
        dropin.find_label_issues(data.labels, data.pred_probs, return_indices_ranked_by="self_confidence",
                                 rank_by_kwargs={"temperature": 0.1})


def test_a_dask_job_gives_the_same_numpy_mask(data):
    import dask

    with dask.config.set(scheduler="threads"):
        got = dropin.find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, dropin.find_label_issues(data.labels, data.pred_probs, backend="serial"))


def test_one_array_of_a_result_is_computed_alone(data):
    from dask_labelissues import find_label_issues

    result = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000)
    assert hasattr(result.label_quality_scores, "dask")
    np.testing.assert_array_equal(result.array("label_quality_scores"), result.compute().label_quality_scores)
    with pytest.raises(ValueError, match="'issues' is not one of"):
        result.array("issues")
