"""dask_labelissues.rank against cleanlab.rank, on every engine."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from cleanlab import rank as cl_rank

from dask_labelissues import rank

from .conftest import make_dataset, runs_on

METHODS = ["self_confidence", "normalized_margin", "confidence_weighted_entropy"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("adjust", [False, True])
def test_scores_equal_cleanlabs(method, adjust):
    if adjust and method == "confidence_weighted_entropy":
        with pytest.raises(ValueError, match="adjust_pred_probs does not go with"):
            rank.get_label_quality_scores([0, 1], [[0.9, 0.1], [0.2, 0.8]], method=method, adjust_pred_probs=True)
        return
    d = make_dataset(4000, 7, seed=21, imbalance=0.5)
    expected = cl_rank.get_label_quality_scores(d.labels, d.pred_probs, method=method, adjust_pred_probs=adjust)
    got = rank.get_label_quality_scores(d.labels, d.pred_probs, method=method, adjust_pred_probs=adjust)
    assert got.dtype == np.float64 and got.shape == (4000,)
    # Bit for bit where the score is one probability or a difference of
    # two; the others add up terms in another order than cleanlab.
    exact = not adjust and method != "confidence_weighted_entropy"
    np.testing.assert_allclose(got, expected, rtol=0, atol=0 if exact else 1e-15)


@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
def test_every_engine_and_chunking_gives_the_same_bits(method, tmp_path):
    d = make_dataset(3000, 5, seed=22, dtype=np.float32)
    np.save(tmp_path / "labels.npy", d.labels)
    np.save(tmp_path / "probs.npy", d.pred_probs)
    expected = rank.get_label_quality_scores(d.labels, d.pred_probs, method=method, adjust_pred_probs=True)
    for backend, options in [("serial", {"chunk_rows": 7}), ("threads", {"chunk_rows": 1000}),
                             ("fork", {"chunk_rows": 501}), ("dask", {"chunk_rows": 333})]:
        with dask.config.set(scheduler="threads"):
            got = rank.get_label_quality_scores(str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy"),
                                                method=method, adjust_pred_probs=True, backend=backend, **options)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_dask_in_dask_out():
    d = make_dataset(2000, 4, seed=23)
    with dask.config.set(scheduler="threads"):
        got = rank.get_label_quality_scores(da.from_array(d.labels, chunks=300),
                                            da.from_array(d.pred_probs, chunks=(300, 4)))
        assert isinstance(got, da.Array) and got.chunks[0][0] == 300
        np.testing.assert_array_equal(got.compute(), cl_rank.get_label_quality_scores(d.labels, d.pred_probs))


def test_a_class_nobody_is_labelled_with_is_adjusted_as_cleanlab_does():
    d = make_dataset(2000, 5, seed=24, absent=(3,))
    got = rank.get_label_quality_scores(d.labels, d.pred_probs, adjust_pred_probs=True)
    expected = cl_rank.get_label_quality_scores(d.labels, d.pred_probs, adjust_pred_probs=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_bad_values_are_named_by_row():
    d = make_dataset(500, 3, seed=25)
    probs = d.pred_probs.copy()
    probs[123] = [0.5, 0.6, -0.1]
    with pytest.raises(ValueError, match=r"pred_probs\[123, 2\] = -0.1 is negative"):
        rank.get_label_quality_scores(d.labels, probs)
    with pytest.raises(ValueError, match="method='margin' is not one of"):
        rank.get_label_quality_scores(d.labels, d.pred_probs, method="margin")


def test_find_top_issues_ranks_as_cleanlab_with_ties_by_index():
    scores = np.array([0.5, 0.1, 0.9, 0.1, 0.3, np.nan, 0.1])
    assert rank.find_top_issues(scores, top=4).tolist() == [1, 3, 6, 4]
    assert rank.find_top_issues(scores, top=None).tolist() == [1, 3, 6, 4, 0, 2, 5]
    d = make_dataset(3000, 6, seed=26)
    s = cl_rank.get_label_quality_scores(d.labels, d.pred_probs)
    np.testing.assert_array_equal(rank.find_top_issues(s, top=25), cl_rank.find_top_issues(s, top=25))
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(rank.find_top_issues(da.from_array(s, chunks=271), top=40),
                                      rank.find_top_issues(s, top=40))


def test_on_a_cluster_the_workers_read_the_store(local_cluster, tmp_path):
    """Zarr inputs on a real 2-worker cluster: the scores stay on the
    workers as a dask array and equal the in-memory ones."""
    import zarr

    d = make_dataset(3000, 6, seed=27)
    group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w", zarr_format=3)
    group.create_array("labels", data=d.labels, chunks=(700,))
    group.create_array("pred_probs", data=d.pred_probs, chunks=(700, 6))
    with runs_on(local_cluster):
        got = rank.get_label_quality_scores(group["labels"], group["pred_probs"], method="normalized_margin",
                                            adjust_pred_probs=True, client=local_cluster)
    assert isinstance(got, da.Array)
    expected = rank.get_label_quality_scores(d.labels, d.pred_probs, method="normalized_margin", adjust_pred_probs=True)
    np.testing.assert_array_equal(got.compute(), expected)
    mask = expected < 0.4
    ordered = rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by="normalized_margin")
    # The cluster's blocks are found through the client that holds them,
    # whatever scheduler is current.
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(rank.find_top_issues(got, top=30), rank.find_top_issues(expected, top=30))
        with runs_on(local_cluster):
            got_order = rank.order_label_issues(mask, group["labels"], group["pred_probs"],
                                                rank_by="normalized_margin", client=local_cluster)
        np.testing.assert_array_equal(got_order, ordered)


@pytest.mark.parametrize("rank_by", ["self_confidence", "normalized_margin"])
def test_order_label_issues_equals_cleanlabs(rank_by):
    from cleanlab.filter import find_label_issues as cl_find

    d = make_dataset(4000, 6, seed=28, dtype=np.float32)
    mask = cl_find(d.labels, d.pred_probs)
    kwargs = {"adjust_pred_probs": True}
    expected = cl_rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by=rank_by, rank_by_kwargs=kwargs)
    got = rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by=rank_by, rank_by_kwargs=kwargs)
    assert got.dtype == np.int64 and len(got) == mask.sum() > 100
    # float32 scores: cleanlab's differ from these float64 ones by ~1e-8, so
    # near ties may swap; the set and the order up to them are the same.
    assert set(got.tolist()) == set(expected.tolist())
    scores = rank.get_label_quality_scores(d.labels, d.pred_probs, method=rank_by, adjust_pred_probs=True)
    assert (np.diff(scores[got]) >= 0).all()
    with dask.config.set(scheduler="threads"):
        lazy = rank.order_label_issues(da.from_array(mask, chunks=900), da.from_array(d.labels, chunks=900),
                                       da.from_array(d.pred_probs, chunks=(900, 6)), rank_by=rank_by,
                                       rank_by_kwargs=kwargs)
    np.testing.assert_array_equal(lazy, got)
    with pytest.raises(NotImplementedError, match="rank_by_kwargs"):
        rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by_kwargs={"method": "x"})


def test_order_label_issues_of_float64_rows_is_cleanlabs_order():
    from cleanlab.filter import find_label_issues as cl_find

    d = make_dataset(4000, 6, seed=29)
    mask = cl_find(d.labels, d.pred_probs)
    expected = cl_rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by="normalized_margin")
    got = rank.order_label_issues(mask, d.labels, d.pred_probs, rank_by="normalized_margin")
    np.testing.assert_array_equal(got, expected)  # continuous scores: no ties to order


def test_the_per_method_functions_are_cleanlabs():
    d = make_dataset(2000, 5, seed=30)
    for name in ("get_self_confidence_for_each_label", "get_normalized_margin_for_each_label",
                 "get_confidence_weighted_entropy_for_each_label"):
        np.testing.assert_allclose(getattr(rank, name)(d.labels, d.pred_probs),
                                   getattr(cl_rank, name)(d.labels, d.pred_probs), rtol=0, atol=1e-15)


def test_masks_as_lists_indices_and_lazy_arrays_of_unknown_length():
    d = make_dataset(300, 3, seed=31)
    mask = (np.arange(300) % 7 == 0)
    expected = rank.order_label_issues(mask, d.labels, d.pred_probs)
    np.testing.assert_array_equal(rank.order_label_issues(mask.tolist(), d.labels, d.pred_probs), expected)
    index = np.flatnonzero(mask)
    np.testing.assert_array_equal(rank.order_label_issues(index, d.labels, d.pred_probs),
                                  cl_rank.order_label_issues(index, d.labels, d.pred_probs))
    with pytest.raises(TypeError, match="boolean mask or row indices"):
        rank.order_label_issues(mask.astype(float), d.labels, d.pred_probs)
    unknown = da.from_array(np.arange(300.0), chunks=50)
    unknown = unknown[unknown >= 0]
    with pytest.raises(ValueError, match="unknown chunk sizes; call quality_scores.compute_chunk_sizes"):
        rank.find_top_issues(unknown)
