"""dask_labelissues.multilabel_classification against cleanlab.multilabel_classification."""

from __future__ import annotations

import functools
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from cleanlab.multilabel_classification import filter as cl_filter
from cleanlab.multilabel_classification import rank as cl_rank

import dask_labelissues
from dask_labelissues import multilabel_classification as ml

from .conftest import runs_on

FILTERS = ["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"]


@functools.lru_cache(maxsize=None)
def examples(k: int, n: int = 1500, seed: int = 0, dtype: str = "float64"):
    """``n`` examples with about 30% of the K labels each, a model surer
    where it is right, and 3% of the labels toggled; continuous scores."""
    rng = np.random.default_rng([seed, k])
    truth = rng.random((n, k)) < 0.3
    probs = np.where(truth, rng.beta(5, 2, (n, k)), rng.beta(2, 5, (n, k))).astype(dtype)
    given = truth.copy()
    toggle = rng.random((n, k)) < 0.03
    given[toggle] = ~given[toggle]
    labels = [np.flatnonzero(row).tolist() for row in given]
    return labels, probs, given.astype(np.uint8)


def cleanlab_find(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cl_filter.find_label_issues(*args, n_jobs=1, **kwargs)


# -- find_label_issues -------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 6, 15])
@pytest.mark.parametrize("filter_by", FILTERS)
def test_masks_and_rankings_equal_cleanlabs(k, filter_by):
    labels, probs, _ = examples(k)
    expected = cleanlab_find(labels, probs, filter_by=filter_by)
    assert 0 < expected.sum() < len(labels)
    np.testing.assert_array_equal(ml.find_label_issues(labels, probs, filter_by=filter_by, backend="serial"), expected)
    for ranked_by in ("self_confidence", "normalized_margin", "confidence_weighted_entropy"):
        np.testing.assert_array_equal(
            ml.find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by=ranked_by),
            cleanlab_find(labels, probs, filter_by=filter_by, return_indices_ranked_by=ranked_by),
        )


@pytest.mark.parametrize("filter_by", ["low_self_confidence", "low_normalized_margin"])
def test_low_score_filters_rank_by_the_score_asked_where_cleanlab_mixes_two_orders(filter_by):
    labels, probs, _ = examples(6, seed=1, dtype="float32")
    np.testing.assert_array_equal(ml.find_label_issues(labels, probs, filter_by=filter_by),
                                  cleanlab_find(labels, probs, filter_by=filter_by))
    ours = ml.find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="normalized_margin")
    theirs = cleanlab_find(labels, probs, filter_by=filter_by, return_indices_ranked_by="normalized_margin")
    scores = ml.get_label_quality_scores(labels, probs, method="normalized_margin")
    assert set(ours.tolist()) == set(theirs.tolist())
    assert (np.diff(scores[ours]) >= 0).all()
    # cleanlab sorts the issues' scores in row order, then indexes the
    # issues in the order of the default score with that sort.
    default_order = np.argsort(ml.get_label_quality_scores(labels, probs), kind="stable")[: len(ours)]
    np.testing.assert_array_equal(theirs, default_order[np.argsort(scores[np.sort(default_order)], kind="stable")])
    assert not (np.diff(scores[theirs]) >= 0).all()


def test_cleanlabs_filter_options_per_class():
    labels, probs, _ = examples(4, seed=2)
    for options in ({"num_to_remove_per_class": [3, 0, 5, 1]}, {"frac_noise": 0.5}, {"min_examples_per_class": 400}):
        for filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
            np.testing.assert_array_equal(
                ml.find_label_issues(labels, probs, filter_by=filter_by, **options),
                cleanlab_find(labels, probs, filter_by=filter_by, **options),
            )


def test_issues_per_class_equal_cleanlabs():
    labels, probs, _ = examples(5, seed=3)
    np.testing.assert_array_equal(ml.find_multilabel_issues_per_class(labels, probs),
                                  cl_filter.find_multilabel_issues_per_class(labels, probs, n_jobs=1))
    ours = ml.find_multilabel_issues_per_class(labels, probs, return_indices_ranked_by="self_confidence")
    theirs = cl_filter.find_multilabel_issues_per_class(labels, probs, return_indices_ranked_by="self_confidence",
                                                         n_jobs=1)
    for a, b in zip(ours, theirs):
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# -- scores ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
@pytest.mark.parametrize("aggregator", [None, {"method": "exponential_moving_average", "alpha": 0.5},
                                        {"method": "exponential_moving_average", "alpha": None},
                                        {"method": "softmin", "temperature": 0.2}])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_scores_equal_cleanlabs(method, aggregator, dtype):
    labels, probs, _ = examples(6, seed=4, dtype=dtype)
    kwargs = {} if aggregator is None else {"aggregator_kwargs": aggregator}
    # float32 logarithms (the entropy's) are scipy's in cleanlab, numpy's here.
    atol = 1e-6 if (dtype, method) == ("float32", "confidence_weighted_entropy") else 1e-12
    np.testing.assert_allclose(ml.get_label_quality_scores(labels, probs, method=method, **kwargs),
                               cl_rank.get_label_quality_scores(labels, probs, method=method, **kwargs),
                               rtol=0, atol=atol)
    np.testing.assert_allclose(ml.get_label_quality_scores_per_class(labels, probs, method=method),
                               cl_rank.get_label_quality_scores_per_class(labels, probs, method=method),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-12), ("float32", 1e-6)])
@pytest.mark.parametrize(("backend", "chunk_rows"), [("serial", 97), ("threads", None), ("dask", 400)])
def test_adjusted_scores_equal_cleanlabs(method, dtype, atol, backend, chunk_rows):
    # float32: cleanlab adjusts in float32, this package in float64.
    labels, probs, _ = examples(6, seed=4, dtype=dtype)
    options = dict(backend=backend, chunk_rows=chunk_rows)
    aggregator = {"method": "softmin", "temperature": 0.2}
    with dask.config.set(scheduler="threads"):
        got = ml.get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=True, **options)
        softmin = ml.get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=True,
                                              aggregator_kwargs=aggregator, **options)
        per_class = ml.get_label_quality_scores_per_class(labels, probs, method=method, adjust_pred_probs=True,
                                                          **options)
    np.testing.assert_allclose(got, cl_rank.get_label_quality_scores(labels, probs, method=method,
                                                                     adjust_pred_probs=True), rtol=0, atol=atol)
    np.testing.assert_allclose(softmin, cl_rank.get_label_quality_scores(
        labels, probs, method=method, adjust_pred_probs=True, aggregator_kwargs=aggregator), rtol=0, atol=atol)
    np.testing.assert_allclose(per_class, cl_rank.get_label_quality_scores_per_class(
        labels, probs, method=method, adjust_pred_probs=True), rtol=0, atol=atol)
    assert not np.allclose(got, ml.get_label_quality_scores(labels, probs, method=method))  # it adjusts


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "low_self_confidence"])
def test_rankings_by_adjusted_scores_equal_cleanlabs(filter_by):
    labels, probs, _ = examples(6)
    kwargs = dict(filter_by=filter_by, return_indices_ranked_by="normalized_margin",
                  rank_by_kwargs={"adjust_pred_probs": True})
    ours, theirs = ml.find_label_issues(labels, probs, **kwargs), cleanlab_find(labels, probs, **kwargs)
    if filter_by.startswith("low_"):  # cleanlab's ranking defect for these filters, pinned above
        assert set(ours.tolist()) == set(theirs.tolist())
    else:
        np.testing.assert_array_equal(ours, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_per_class = cl_filter.find_multilabel_issues_per_class(
            labels, probs, return_indices_ranked_by="self_confidence", rank_by_kwargs={"adjust_pred_probs": True},
            n_jobs=1)[0]
    ours_per_class = ml.find_multilabel_issues_per_class(
        labels, probs, return_indices_ranked_by="self_confidence", rank_by_kwargs={"adjust_pred_probs": True})[0]
    for a, b in zip(ours_per_class, theirs_per_class):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(NotImplementedError, match="temperature"):
        ml.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence",
                             rank_by_kwargs={"temperature": 0.1})


# -- dask_labelissues.find_label_issues(multi_label=True) ----------------------------------
def cleanlab_filter_find(*args, **kwargs):
    """cleanlab.filter.find_label_issues, the function whose multi_label=True the top level mirrors."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_label_issues(*args, multi_label=True, n_jobs=1, **kwargs)


@pytest.mark.parametrize("filter_by", [*FILTERS, "low_self_confidence", "low_normalized_margin"])
def test_the_top_level_multi_label_job_equals_cleanlab_filters(filter_by):
    labels, probs, _ = examples(6, seed=4)
    mask = cleanlab_filter_find(labels, probs, filter_by=filter_by)
    ranked = cleanlab_filter_find(labels, probs, filter_by=filter_by, return_indices_ranked_by="normalized_margin")
    assert 0 < mask.sum() < len(labels)
    got = dask_labelissues.find_label_issues(labels, probs, multi_label=True, filter_by=filter_by,
                                             method="normalized_margin", backend="serial")
    assert isinstance(got, ml.MultilabelIssues)
    np.testing.assert_array_equal(got.is_label_issue, mask)
    assert got.num_issues == mask.sum() and got.per_class is None
    scores = ml.get_label_quality_scores(labels, probs, method="normalized_margin")
    np.testing.assert_array_equal(got.label_quality_scores, scores)
    if filter_by.startswith("low_"):  # cleanlab's ranking defect for these filters, pinned above
        assert set(got.issues.tolist()) == set(ranked.tolist())
        assert (np.diff(scores[got.issues]) >= 0).all()
        assert got.given_flagged is None and got.left_out_flagged is None
    else:
        np.testing.assert_array_equal(got.issues, ranked)
        per_class = ml.find_multilabel_issues_per_class(labels, probs, filter_by=filter_by)
        matrix = np.zeros(per_class.shape, dtype=bool)
        for i, present in enumerate(labels):
            matrix[i, present] = True
        np.testing.assert_array_equal(got.given_flagged, (per_class & matrix).sum(axis=0))
        np.testing.assert_array_equal(got.left_out_flagged, (per_class & ~matrix).sum(axis=0))
    unranked = dask_labelissues.find_label_issues(labels, probs, multi_label=True, filter_by=filter_by,
                                                  return_indices_ranked_by=None)
    np.testing.assert_array_equal(unranked.issues, np.flatnonzero(mask))


def test_the_top_level_multi_label_defaults_and_options_are_cleanlabs():
    labels, probs, _ = examples(4, seed=2)
    # filter_by=None (the single-label batched method) means cleanlab's default filter.
    got = dask_labelissues.find_label_issues(labels, probs, multi_label=True)
    np.testing.assert_array_equal(got.issues, cleanlab_filter_find(labels, probs,
                                                                   return_indices_ranked_by="self_confidence"))
    np.testing.assert_array_equal(got.flagged, cleanlab_filter_find(labels, probs, filter_by="prune_by_noise_rate"))
    # One number as num_to_remove_per_class applies to every class.
    one = dask_labelissues.find_label_issues(labels, probs, multi_label=True, filter_by="both",
                                             num_to_remove_per_class=3)
    np.testing.assert_array_equal(one.flagged, cleanlab_filter_find(labels, probs, filter_by="both",
                                                                    num_to_remove_per_class=[3] * 4))
    # adjust_pred_probs ranks by the adjusted score, as cleanlab's rank_by_kwargs.
    adjusted = dask_labelissues.find_label_issues(labels, probs, multi_label=True, filter_by="both",
                                                  return_indices_ranked_by="self_confidence", adjust_pred_probs=True)
    np.testing.assert_array_equal(adjusted.issues, cleanlab_filter_find(
        labels, probs, filter_by="both", return_indices_ranked_by="self_confidence",
        rank_by_kwargs={"adjust_pred_probs": True}))
    assert adjusted.reads == got.reads + 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimation_method": "off_diagonal_calibrated"}, "batched single-label"),
        ({"health": True}, "multilabel_health_summary"),
        ({"adjust_pred_probs": True, "return_indices_ranked_by": None}, "changes only the ranking"),
        ({"method": "normalized_margin", "return_indices_ranked_by": "confidence_weighted_entropy"}, "disagree"),
        ({"method": "margin"}, "is not one of"),
        ({"backend": "gpu"}, "is not one of"),
    ],
)
def test_the_top_level_multi_label_job_refuses_what_does_not_apply(kwargs, match):
    labels, probs, _ = examples(3)
    with pytest.raises(ValueError, match=match):
        dask_labelissues.find_label_issues(labels, probs, multi_label=True, **kwargs)


def test_a_given_confident_joint_per_class_counts_the_issues_as_cleanlabs():
    from cleanlab.count import compute_confident_joint

    labels, probs, _ = examples(4, seed=5)
    # Each class's joint with 25 more of its present labels counted absent than the data's.
    joint = compute_confident_joint(labels, probs, multi_label=True)
    joint[:, 1, 0] += 25
    joint[:, 1, 1] -= 25
    for filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
        expected = cleanlab_find(labels, probs, filter_by=filter_by, confident_joint=joint)
        assert not np.array_equal(expected, cleanlab_find(labels, probs, filter_by=filter_by))
        np.testing.assert_array_equal(
            ml.find_label_issues(labels, probs, filter_by=filter_by, confident_joint=joint), expected)
        np.testing.assert_array_equal(
            ml.find_label_issues(labels, probs, filter_by=filter_by, confident_joint=joint, backend="dask",
                                 chunk_rows=400, return_indices_ranked_by="normalized_margin"),
            cleanlab_find(labels, probs, filter_by=filter_by, confident_joint=joint,
                          return_indices_ranked_by="normalized_margin"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cl_filter.find_multilabel_issues_per_class(labels, probs, confident_joint=joint, n_jobs=1)
    np.testing.assert_array_equal(ml.find_multilabel_issues_per_class(labels, probs, confident_joint=joint), theirs)
    # As cleanlab: a (K, K) joint is ignored, and confident_learning estimates its own.
    with pytest.warns(UserWarning, match="single-label form"):
        got = ml.find_label_issues(labels, probs, confident_joint=np.ones((4, 4)))
    np.testing.assert_array_equal(got, cleanlab_find(labels, probs))
    with pytest.warns(UserWarning, match="estimates each class's joint"):
        got = ml.find_label_issues(labels, probs, filter_by="confident_learning", confident_joint=joint)
    np.testing.assert_array_equal(got, cleanlab_find(labels, probs, filter_by="confident_learning"))


@pytest.mark.parametrize("method", [np.min, np.mean, np.median])
def test_a_callable_aggregator_reduces_each_row_as_cleanlabs(method):
    labels, probs, _ = examples(3, seed=5)
    got = ml.get_label_quality_scores(labels, probs, aggregator_kwargs={"method": method}, chunk_rows=100)
    np.testing.assert_array_equal(got, method(ml.get_label_quality_scores_per_class(labels, probs), axis=1))
    np.testing.assert_allclose(
        got, cl_rank.get_label_quality_scores(labels, probs, aggregator_kwargs={"method": method}), rtol=0, atol=1e-15
    )
    with pytest.raises(ValueError, match="must reduce axis 1 to one score a row"):
        ml.get_label_quality_scores(labels, probs, aggregator_kwargs={"method": lambda s, axis: s})


# -- stores, engines, a cluster ----------------------------------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    labels, probs, matrix = examples(6, n=2500, seed=6, dtype="float32")
    root = tmp_path_factory.mktemp("multilabel")
    np.save(root / "labels.npy", matrix)
    np.save(root / "probs.npy", probs)
    group = zarr.open_group(str(root / "data.zarr"), mode="w", zarr_format=3)
    group.create_array("labels", data=matrix.astype(bool), chunks=(333, 6))
    group.create_array("pred_probs", data=probs, chunks=(333, 6))
    return root, labels, probs


@pytest.mark.parametrize(
    ("backend", "options"),
    [("serial", {"chunk_rows": 97}), ("threads", {"chunk_rows": 1000}), ("fork", {}), ("dask", {"chunk_rows": 400})],
)
def test_a_label_matrix_in_a_store_gives_the_lists_results(stored, backend, options):
    root, labels, probs = stored
    expected = cleanlab_find(labels, probs, return_indices_ranked_by="self_confidence")
    with dask.config.set(scheduler="threads"):
        for lab, prob in ((str(root / "labels.npy"), str(root / "probs.npy")),
                          (f"{root / 'data.zarr'}:labels", f"{root / 'data.zarr'}:pred_probs")):
            got = ml.find_label_issues(lab, prob, return_indices_ranked_by="self_confidence", backend=backend,
                                       **options)
            np.testing.assert_array_equal(got, expected)
            top = dask_labelissues.find_label_issues(lab, prob, multi_label=True, backend=backend, **options)
            np.testing.assert_array_equal(top.issues, expected)


def test_dask_arrays_on_a_cluster(stored, local_cluster):
    root, labels, probs = stored
    expected = cleanlab_find(labels, probs, filter_by="both")
    matrix = np.load(root / "labels.npy")
    with runs_on(local_cluster):
        got = ml.find_label_issues(da.from_array(matrix, chunks=(700, 6)), da.from_array(probs, chunks=(700, 6)),
                                   filter_by="both", client=local_cluster)
    np.testing.assert_array_equal(got, expected)
    with runs_on(local_cluster):
        top = dask_labelissues.find_label_issues(
            da.from_array(matrix, chunks=(700, 6)), da.from_array(probs, chunks=(700, 6)),
            multi_label=True, filter_by="both", client=local_cluster,
        )
        flagged = np.asarray(top.flagged)
    np.testing.assert_array_equal(flagged, expected)
    # Rankings by scores made in the filter's last read, and by adjusted scores.
    for kwargs in ({}, {"rank_by_kwargs": {"adjust_pred_probs": True}}):
        with runs_on(local_cluster):
            ranked = ml.find_label_issues(str(root / "labels.npy"), str(root / "probs.npy"), filter_by="both",
                                          return_indices_ranked_by="normalized_margin", client=local_cluster,
                                          **kwargs)
        np.testing.assert_array_equal(ranked, cleanlab_find(labels, probs, filter_by="both",
                                                            return_indices_ranked_by="normalized_margin", **kwargs))


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_bad_values_are_named_by_row_and_class(backend):
    labels, probs, matrix = examples(4, seed=7)
    probs = probs.copy()
    probs[321, 2] = 1.7
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=r"pred_probs\[321, 2\] = 1\.7 is not a probability in \[0, 1\]: .*sigmoid"):
            ml.find_label_issues(labels, probs, backend=backend)
        probs[321, 2] = 0.5
        bad = matrix.copy()
        bad[55, 1] = 2
        with pytest.raises(ValueError, match=r"labels\[55, 1\] = 2 is not 0 or 1"):
            ml.find_label_issues(bad, probs, backend=backend)


def test_malformed_inputs_are_refused():
    labels, probs, matrix = examples(4, seed=8)
    with pytest.raises(ValueError, match="labels has 1499 examples but pred_probs 1500"):
        ml.find_label_issues(labels[:-1], probs)
    broken = list(labels)
    broken[9] = [0, 4]
    with pytest.raises(ValueError, match=r"labels\[9\] holds 4, not a class in 0\.\.3"):
        ml.find_label_issues(broken, probs)
    with pytest.raises(ValueError, match=r"an \(N, K\) = \(1500, 4\) 0/1 matrix, got shape \(1500, 3\)"):
        ml.find_label_issues(matrix[:, :3], probs)
    with pytest.raises(ValueError, match=r"num_to_remove_per_class\[0\] = 2.5 is not a whole number"):
        ml.find_label_issues(labels, probs, num_to_remove_per_class=2.5)
    with pytest.raises(ValueError, match=r"num_to_remove_per_class\[1\] = True is not a whole number"):
        ml.find_issues(labels, probs, num_to_remove_per_class=[1, True, 0, 0])
    with pytest.raises(ValueError, match="not supported with method='confidence_weighted_entropy'"):
        ml.find_label_issues(labels, probs, return_indices_ranked_by="confidence_weighted_entropy",
                             rank_by_kwargs={"adjust_pred_probs": True}, backend="serial", chunk_rows=1)
    with pytest.raises(ValueError, match=r"confident_joint must have shape \(4, 2, 2\)"):
        ml.find_label_issues(labels, probs, confident_joint=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"confident_joint\[0\] must hold finite counts"):
        ml.find_label_issues(labels, probs, confident_joint=np.full((4, 2, 2), np.nan))
    with pytest.raises(ValueError, match="pred_probs has no rows"):
        ml.find_label_issues(matrix[:0], probs[:0])


# -- dataset views -----------------------------------------------------------------------
def _normalized(frame):
    """A table in one row order, whatever order ties were left in."""
    return frame.sort_values(by=list(frame.columns)).reset_index(drop=True)


@pytest.mark.parametrize("class_names", [None, ["a", "b", "c", "d", "e"]])
def test_dataset_views_equal_cleanlabs(class_names, capsys):
    import pandas as pd
    from cleanlab.multilabel_classification import dataset as cl_dataset

    from dask_labelissues import dataset

    labels, probs, matrix = examples(5, seed=9)
    ours = dataset.common_multilabel_issues(labels, probs, class_names=class_names)
    theirs = cl_dataset.common_multilabel_issues(labels, probs, class_names=class_names)
    pd.testing.assert_frame_equal(_normalized(ours), _normalized(theirs), check_dtype=False)
    assert (np.diff(ours["Issue Probability"].to_numpy()) <= 0).all()

    ours = dataset.rank_classes_by_multilabel_quality(labels, probs, class_names=class_names)
    theirs = cl_dataset.rank_classes_by_multilabel_quality(labels, probs, class_names=class_names)
    pd.testing.assert_frame_equal(_normalized(ours), _normalized(theirs), check_dtype=False)

    score = dataset.overall_multilabel_health_score(labels, probs)
    assert score == pytest.approx(cl_dataset.overall_multilabel_health_score(labels, probs), abs=1e-15)
    # From the label matrix too, on another engine.
    assert dataset.overall_multilabel_health_score(matrix, probs, backend="threads", chunk_rows=211) == score

    summary = dataset.multilabel_health_summary(labels, probs, class_names=class_names)
    assert summary["overall_multilabel_health_score"] == score
    pd.testing.assert_frame_equal(summary["common_multilabel_issues"],
                                  dataset.common_multilabel_issues(labels, probs, class_names=class_names))
    printed = capsys.readouterr().out
    assert "overall multi-label health score" in printed and "Classes by label quality" in printed


def test_scores_refuse_bad_values_by_row_and_class():
    labels, probs, matrix = examples(4, seed=10)
    bad = probs.copy()
    bad[77, 3] = 1.5
    with pytest.raises(ValueError, match=r"pred_probs\[77, 3\] = 1\.5 is not a probability"):
        ml.get_label_quality_scores(labels, bad)
    twos = matrix.copy()
    twos[12, 0] = 2
    with pytest.raises(ValueError, match=r"labels\[12, 0\] = 2 is not 0 or 1"):
        ml.get_label_quality_scores_per_class(twos, probs)


@pytest.mark.parametrize(("backend", "chunk_rows"), [("serial", 97), ("threads", 500), ("fork", 333), ("dask", 256)])
def test_scores_run_on_every_engine_reading_pred_probs_once(stored, backend, chunk_rows):
    from .test_single_read import CountingArray

    root, labels, probs = stored
    expected = ml.get_label_quality_scores(labels, probs, method="normalized_margin")
    expected_per_class = ml.get_label_quality_scores_per_class(labels, probs)
    group = zarr.open_group(str(root / "data.zarr"), mode="r")
    counted = CountingArray(probs)
    with dask.config.set(scheduler="threads"):
        got = ml.get_label_quality_scores(group["labels"], counted, method="normalized_margin", backend=backend,
                                          chunk_rows=chunk_rows)
        per_class = ml.get_label_quality_scores_per_class(str(root / "labels.npy"), str(root / "probs.npy"),
                                                          backend=backend, chunk_rows=chunk_rows)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(per_class, expected_per_class)
    assert counted.served.value == probs.nbytes


def test_the_first_bad_score_value_is_named_whichever_block_finds_it():
    labels, probs, _ = examples(4, seed=10)
    bad = probs.copy()
    bad[1400, 0] = -1.0
    bad[300, 2] = np.nan
    with pytest.raises(ValueError, match=r"pred_probs\[300, 2\] = nan"):
        ml.get_label_quality_scores(labels, bad, backend="threads", chunk_rows=100)


def test_float16_probabilities_are_complemented_in_float16_as_cleanlabs():
    labels, probs, _ = examples(4, seed=11)
    half = probs.astype(np.float16)
    np.testing.assert_array_equal(ml.find_label_issues(labels, half, return_indices_ranked_by="self_confidence"),
                                  cleanlab_find(labels, half, return_indices_ranked_by="self_confidence"))


@pytest.fixture(scope="module")
def label_sets(tmp_path_factory):
    labels, probs, _ = examples(6, n=2500, seed=12, dtype="float32")
    root = tmp_path_factory.mktemp("label_sets")
    indices = np.concatenate([np.asarray(s, dtype=np.int32) for s in labels])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in labels])]).astype(np.int64)
    np.save(root / "indices.npy", indices)
    np.save(root / "offsets.npy", offsets)
    np.save(root / "probs.npy", probs)
    return root, labels, probs


@pytest.mark.parametrize(("backend", "options"), [("serial", {"chunk_rows": 101}), ("threads", {}),
                                                  ("dask", {"chunk_rows": 700})])
def test_compressed_label_sets_give_the_lists_results(label_sets, backend, options):
    root, labels, probs = label_sets
    sets = ml.LabelSets(str(root / "indices.npy"), str(root / "offsets.npy"))
    expected = cleanlab_find(labels, probs, return_indices_ranked_by="self_confidence")
    with dask.config.set(scheduler="threads"):
        got = ml.find_label_issues(sets, str(root / "probs.npy"), return_indices_ranked_by="self_confidence",
                                   backend=backend, **options)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(ml.get_label_quality_scores(sets, probs),
                                  cl_rank.get_label_quality_scores(labels, probs))


def test_compressed_label_sets_are_checked(label_sets):
    root, labels, probs = label_sets
    indices = np.load(root / "indices.npy")
    offsets = np.load(root / "offsets.npy")
    bad = indices.copy()
    bad[int(offsets[40])] = 6
    with pytest.raises(ValueError, match="labels of example 40 hold 6, not a class in 0..5"):
        ml.find_label_issues(ml.LabelSets(bad, offsets), probs)
    with pytest.raises(ValueError, match="label offsets must run from 0 to the number of label indices"):
        ml.find_label_issues(ml.LabelSets(indices[:-1], offsets), probs)
    with pytest.raises(ValueError, match="label offsets give 2499 examples but pred_probs has 2500"):
        ml.find_label_issues(ml.LabelSets(indices[: offsets[-2]], offsets[:-1]), probs)
