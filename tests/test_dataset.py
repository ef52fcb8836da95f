"""dask_labelissues.dataset against cleanlab.dataset, the oracle."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest

import cleanlab.dataset as cl_dataset
from cleanlab.count import compute_confident_joint, estimate_joint

from dask_labelissues import dataset, find_label_issues, open_results

from .conftest import make_dataset, runs_on

CASES = {
    "k2": dict(n=3000, k=2, seed=1),
    "k10": dict(n=6000, k=10, seed=2),
    "k100 imbalanced": dict(n=20000, k=100, seed=3, imbalance=0.02),
    "k10 absent class": dict(n=4000, k=10, seed=4, absent=(3,)),
}


def _oracle(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about absent classes
        return fn(*args, **kwargs)


def _same_table(ours: pd.DataFrame, theirs: pd.DataFrame, score: str, ascending: bool) -> None:
    """Same columns, the same rows in the same order (ties: ours by class
    index, cleanlab's as its quicksort leaves them), values to 1e-12."""
    assert list(ours.columns) == list(theirs.columns)
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(ours[score].to_numpy(float), theirs[score].to_numpy(float), rtol=0, atol=1e-12)
    index_cols = [c for c in ours.columns if c.startswith("Class Index")]
    # Ours is stable: within a run of equal scores, class order.
    for _, group in ours.groupby(score, sort=False):
        keys = list(group[index_cols].itertuples(index=False))
        assert keys == sorted(keys)
    key = [score, *index_cols]
    a = ours.sort_values(key, ascending=[ascending] + [True] * len(index_cols), kind="stable").reset_index(drop=True)
    b = theirs.sort_values(key, ascending=[ascending] + [True] * len(index_cols), kind="stable").reset_index(drop=True)
    for col in ours.columns:
        if ours[col].dtype.kind == "f":
            np.testing.assert_allclose(a[col], b[col], rtol=0, atol=1e-12)
        else:
            assert a[col].tolist() == b[col].tolist(), col


@pytest.mark.parametrize("name", list(CASES))
def test_every_view_matches_cleanlab(name: str) -> None:
    d = make_dataset(**CASES[name])
    names = [f"class {i}" for i in range(d.k)]
    ours = dataset.rank_classes_by_label_quality(d.labels, d.pred_probs, class_names=names)
    theirs = _oracle(cl_dataset.rank_classes_by_label_quality, d.labels, d.pred_probs, class_names=names)
    _same_table(ours, theirs, "Label Quality Score", True)
    for asymmetric in (False, True):
        ours = dataset.find_overlapping_classes(d.labels, d.pred_probs, asymmetric=asymmetric, class_names=names)
        theirs = _oracle(cl_dataset.find_overlapping_classes, labels=d.labels, pred_probs=d.pred_probs,
                         asymmetric=asymmetric, class_names=names)
        _same_table(ours, theirs, "Joint Probability", False)
    score = dataset.overall_label_health_score(d.labels, d.pred_probs, verbose=False)
    assert score == _oracle(cl_dataset.overall_label_health_score, d.labels, d.pred_probs, verbose=False)


@pytest.mark.parametrize("backend,chunk_rows", [("serial", 700), ("threads", 1999), ("fork", 512), ("dask", 1000)])
def test_health_summary_is_the_same_on_every_engine_and_chunking(backend: str, chunk_rows: int) -> None:
    d = make_dataset(5000, 7, seed=5, dtype=np.float32)
    ours = dataset.health_summary(d.labels, d.pred_probs, backend=backend, chunk_rows=chunk_rows, verbose=False)
    theirs = _oracle(cl_dataset.health_summary, d.labels, d.pred_probs, verbose=False)
    assert ours["overall_label_health_score"] == theirs["overall_label_health_score"]
    np.testing.assert_array_equal(ours["joint"], theirs["joint"])
    _same_table(ours["classes_by_label_quality"], theirs["classes_by_label_quality"], "Label Quality Score", True)
    _same_table(ours["overlapping_classes"], theirs["overlapping_classes"], "Joint Probability", False)


def test_on_a_dask_cluster_the_joint_is_computed_there() -> None:
    from distributed import Client, LocalCluster

    d = make_dataset(4000, 5, seed=6)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as client:
        with runs_on(client):
            ours = dataset.rank_classes_by_label_quality(d.labels, d.pred_probs, client=client, chunk_rows=900)
    theirs = cl_dataset.rank_classes_by_label_quality(d.labels, d.pred_probs)
    _same_table(ours, theirs, "Label Quality Score", True)


def test_from_a_joint_or_a_confident_joint_nothing_is_read() -> None:
    d = make_dataset(3000, 6, seed=7)
    cj = compute_confident_joint(d.labels, d.pred_probs)
    joint = estimate_joint(d.labels, d.pred_probs)
    for kwargs in (dict(joint=joint, num_examples=d.n), dict(confident_joint=cj, labels=d.labels)):
        ours = dataset.find_overlapping_classes(**kwargs)
        theirs = cl_dataset.find_overlapping_classes(**kwargs)
        _same_table(ours, theirs, "Joint Probability", False)
        assert dataset.overall_label_health_score(**kwargs, verbose=False) == pytest.approx(
            cl_dataset.overall_label_health_score(**kwargs, verbose=False), abs=1e-12)
    # A confident joint alone: N is its total, as cleanlab's docs promise
    # (its rank_classes_by_label_quality raises instead).
    with pytest.raises(ValueError):
        cl_dataset.rank_classes_by_label_quality(confident_joint=cj)
    ours = dataset.rank_classes_by_label_quality(confident_joint=cj)
    theirs = cl_dataset.rank_classes_by_label_quality(confident_joint=cj, num_examples=int(cj.sum()))
    _same_table(ours, theirs, "Label Quality Score", True)


def test_a_filter_result_has_the_views_and_keeps_them_in_its_store(tmp_path) -> None:
    d = make_dataset(4000, 8, seed=8)
    result = find_label_issues(d.labels, d.pred_probs, filter_by="prune_by_noise_rate")
    theirs = cl_dataset.health_summary(d.labels, d.pred_probs, verbose=False)
    opened = open_results(result.to_zarr(str(tmp_path / "r.zarr")))
    for r in (result, opened):
        out = io.StringIO()
        summary = r.health_summary(verbose=True, stream=out)
        assert summary["overall_label_health_score"] == theirs["overall_label_health_score"]
        assert r.overall_label_health_score() == theirs["overall_label_health_score"]
        _same_table(r.rank_classes_by_label_quality(), theirs["classes_by_label_quality"], "Label Quality Score", True)
        _same_table(r.find_overlapping_classes(), theirs["overlapping_classes"], "Joint Probability", False)
        assert "label health score" in out.getvalue()


def test_health_true_adds_the_joint_to_the_batched_method() -> None:
    d = make_dataset(4000, 8, seed=9)
    plain = find_label_issues(d.labels, d.pred_probs)
    with_health = find_label_issues(d.labels, d.pred_probs, health=True)
    assert plain.confident_joint is None and plain.reads == 1
    assert with_health.reads == 2
    np.testing.assert_array_equal(with_health.issues, plain.issues)
    theirs = cl_dataset.overall_label_health_score(d.labels, d.pred_probs, verbose=False)
    assert with_health.overall_label_health_score() == theirs
    with pytest.raises(ValueError, match="health=True"):
        plain.health_summary()


def test_inputs_given_together_are_taken_in_cleanlabs_order() -> None:
    from cleanlab.count import compute_confident_joint

    d = make_dataset(3000, 5, seed=11)
    cj = compute_confident_joint(d.labels, d.pred_probs)
    cj[0, 1] += 40  # not what the data would give, so it shows whether it was used
    joint = cj / cj.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab's: the confident joint is not used for the score
        theirs = cl_dataset.health_summary(d.labels, d.pred_probs, confident_joint=cj, verbose=False)
    ours = dataset.health_summary(d.labels, d.pred_probs, confident_joint=cj, verbose=False)
    assert ours["overall_label_health_score"] == theirs["overall_label_health_score"]
    assert ours["overall_label_health_score"] == dataset.overall_label_health_score(
        d.labels, d.pred_probs, confident_joint=cj, verbose=False
    ) == dataset.overall_label_health_score(d.labels, d.pred_probs, verbose=False)
    for name in ("classes_by_label_quality", "overlapping_classes"):
        assert (ours[name]["Label Issues" if name.startswith("classes") else "Num Overlapping Examples"].to_numpy()
                == theirs[name]["Label Issues" if name.startswith("classes") else "Num Overlapping Examples"].to_numpy()).all()
    assert not (ours["classes_by_label_quality"]["Label Issues"].to_numpy() ==
                dataset.rank_classes_by_label_quality(d.labels, d.pred_probs)["Label Issues"].to_numpy()).all()
    ours = dataset.find_overlapping_classes(labels=d.labels, joint=joint)
    theirs = cl_dataset.find_overlapping_classes(labels=d.labels, joint=joint)
    np.testing.assert_allclose(ours["Joint Probability"].to_numpy(), theirs["Joint Probability"].to_numpy())
    assert (ours["Num Overlapping Examples"].to_numpy() == theirs["Num Overlapping Examples"].to_numpy()).all()
    ours = dataset.rank_classes_by_label_quality(d.labels, d.pred_probs, joint=joint, confident_joint=cj)
    theirs = cl_dataset.rank_classes_by_label_quality(d.labels, d.pred_probs, joint=joint, confident_joint=cj)
    assert (ours["Label Issues"].to_numpy() == theirs["Label Issues"].to_numpy()).all()


def test_bad_calls_are_refused_with_what_to_give() -> None:
    d = make_dataset(500, 4, seed=10)
    with pytest.raises(ValueError, match="give one of.*pred_probs without labels"):
        dataset.health_summary(pred_probs=d.pred_probs)
    with pytest.raises(ValueError, match="num_examples"):
        dataset.find_overlapping_classes(joint=np.eye(4) / 4)
    with pytest.raises(ValueError, match="multi_label"):
        dataset.health_summary(d.labels, d.pred_probs, multi_label=True)
    bad = d.labels.copy()
    bad[123] = 9
    with pytest.raises(ValueError, match=r"labels\[123\]"):
        dataset.rank_classes_by_label_quality(bad, d.pred_probs)
    with pytest.raises(ValueError, match=r"labels\[123\]"):
        dataset.rank_classes_by_label_quality(labels=bad, confident_joint=np.eye(4, dtype=int))


@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
@pytest.mark.parametrize("filter_by", [None, "predicted_neq_given"])
def test_health_true_on_every_engine_where_no_filter_computes_the_joint(backend, filter_by) -> None:
    d = make_dataset(3000, 6, seed=12)
    result = find_label_issues(d.labels, d.pred_probs, backend=backend, chunk_rows=700,
                               filter_by=filter_by, health=True)
    np.testing.assert_array_equal(result.confident_joint, compute_confident_joint(d.labels, d.pred_probs,
                                                                                  calibrate=True))
    assert result.overall_label_health_score() == cl_dataset.overall_label_health_score(
        d.labels, d.pred_probs, verbose=False)
