"""dask_labelissues.token_classification against cleanlab.token_classification."""

from __future__ import annotations

import functools

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from cleanlab.token_classification import filter as cl_filter
from cleanlab.token_classification import rank as cl_rank

from dask_labelissues import token_classification as tc


@functools.lru_cache(maxsize=None)
def sentences(k: int, n: int = 300, seed: int = 0, dtype: str = "float64", empty: bool = False):
    """``n`` sentences of 1 to 29 tokens (some of none, with ``empty``) of a
    model that is right about 80% of the time, with 10% of the labels
    changed; continuous probabilities, so no two scores tie."""
    rng = np.random.default_rng([seed, k])
    lengths = rng.integers(1, 30, n)
    if empty:
        lengths[rng.choice(n, 5, replace=False)] = 0
    labels, probs = [], []
    for length in lengths:
        truth = rng.integers(0, k, length)
        p = rng.dirichlet(np.ones(k) * 0.4, size=length)
        p[np.arange(length), truth] += rng.random(length) * 2
        p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
        given = truth.copy()
        flip = rng.random(length) < 0.1
        given[flip] = rng.integers(0, k, int(flip.sum()))
        labels.append([int(x) for x in given])
        probs.append(p)
    return labels, probs


def flat(labels, probs):
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in labels])]).astype(np.int64)
    return (np.concatenate([np.asarray(s, dtype=np.int64) for s in labels]),
            np.concatenate([p for p in probs if len(p)]), offsets)


# -- find_label_issues -------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 5, 20])
@pytest.mark.parametrize("ranked_by", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
def test_issues_equal_cleanlabs(k, ranked_by):
    labels, probs = sentences(k)
    expected = cl_filter.find_label_issues(labels, probs, return_indices_ranked_by=ranked_by, n_jobs=1)
    got = tc.find_label_issues(labels, probs, return_indices_ranked_by=ranked_by, backend="serial")
    assert len(expected) > 20
    assert got == expected


@pytest.mark.parametrize("filter_by", ["prune_by_class", "both", "confident_learning", "predicted_neq_given",
                                       "low_self_confidence", "low_normalized_margin"])
def test_cleanlabs_filter_keywords_pass_through(filter_by):
    labels, probs = sentences(5, seed=1, dtype="float32")
    expected = cl_filter.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
    got = tc.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=2)
    assert got == expected
    assert tc.find_label_issues(labels, probs, filter_by=filter_by, low_memory=True) == expected


def test_sentences_without_tokens_keep_everyone_elses_indices():
    labels, probs = sentences(4, seed=2, empty=True)
    probs = [p if len(p) else np.zeros((0, 4)) for p in probs]
    expected = cl_filter.find_label_issues(labels, probs, n_jobs=1)
    assert tc.find_label_issues(labels, probs) == expected
    scores, _ = tc.get_label_quality_scores(labels, probs)
    empty = [i for i, s in enumerate(labels) if not s]
    assert len(empty) == 5 and (scores[empty] == 1.0).all()


def test_pairs_as_an_array():
    labels, probs = sentences(5)
    pairs = tc.find_label_issues(labels, probs, as_array=True)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2
    assert [tuple(p) for p in pairs.tolist()] == tc.find_label_issues(labels, probs)


# -- the flat form, engines, a cluster -------------------------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    labels, probs = sentences(5, n=400, seed=3, dtype="float32")
    y, p, offsets = flat(labels, probs)
    root = tmp_path_factory.mktemp("tokens")
    np.save(root / "labels.npy", y)
    np.save(root / "probs.npy", p)
    np.save(root / "offsets.npy", offsets)
    group = zarr.open_group(str(root / "tokens.zarr"), mode="w", zarr_format=3)
    group.create_array("labels", data=y, chunks=(997,))
    group.create_array("pred_probs", data=p, chunks=(997, 5))
    group.create_array("offsets", data=offsets, chunks=(101,))
    return root, labels, probs


@pytest.mark.parametrize(
    ("backend", "options"),
    [("serial", {"chunk_rows": 7}), ("threads", {"chunk_rows": 500}), ("fork", {"chunk_rows": 1000}),
     ("dask", {"chunk_rows": 333})],
)
def test_stored_tokens_with_offsets_give_the_in_memory_results(stored, backend, options):
    root, labels, probs = stored
    expected = cl_filter.find_label_issues(labels, probs, n_jobs=1)
    exp_sentences, exp_tokens = cl_rank.get_label_quality_scores(labels, probs, sentence_score_method="softmin")
    sources = [
        (str(root / "labels.npy"), str(root / "probs.npy"), str(root / "offsets.npy")),
        (f"{root / 'tokens.zarr'}:labels", f"{root / 'tokens.zarr'}:pred_probs", f"{root / 'tokens.zarr'}:offsets"),
    ]
    with dask.config.set(scheduler="threads"):
        for y, p, offsets in sources:
            got = tc.find_label_issues(y, p, sentence_offsets=offsets, backend=backend, **options)
            assert got == expected
            scores, tokens = tc.get_label_quality_scores(
                y, p, sentence_offsets=offsets, sentence_score_method="softmin", backend=backend, **options
            )
            # float32 tokens: cleanlab's softmin runs in float32, ours in float64.
            np.testing.assert_allclose(scores, exp_sentences, rtol=1e-5, atol=0)
            np.testing.assert_array_equal(tokens, np.concatenate([t.values for t in exp_tokens]))


def test_dask_arrays_and_a_cluster(stored, local_cluster):
    root, labels, probs = stored
    expected = cl_filter.find_label_issues(labels, probs, n_jobs=1)
    y, p, offsets = flat(labels, probs)
    got = tc.find_label_issues(da.from_array(y, chunks=600), da.from_array(p, chunks=(600, 5)),
                               sentence_offsets=offsets, client=local_cluster)
    assert got == expected
    # The workers read the Zarr store themselves.
    z = root / "tokens.zarr"
    got = tc.find_label_issues(f"{z}:labels", f"{z}:pred_probs", sentence_offsets=f"{z}:offsets",
                               client=local_cluster, chunk_rows=900)
    assert got == expected


# -- scores ------------------------------------------------------------------------------
@pytest.mark.parametrize("token_method", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
@pytest.mark.parametrize(("sentence_method", "kwargs"),
                         [("min", {}), ("softmin", {}), ("softmin", {"temperature": 0.5}),
                          ("softmin", {"temperature": 0}), ("softmin", {"temperature": np.inf})])
def test_scores_equal_cleanlabs(token_method, sentence_method, kwargs):
    labels, probs = sentences(5, seed=4)
    words = [[f"w{i}.{j}" for j in range(len(s))] for i, s in enumerate(labels)]
    expected = cl_rank.get_label_quality_scores(
        labels, probs, tokens=words, token_score_method=token_method, sentence_score_method=sentence_method,
        sentence_score_kwargs=kwargs,
    )
    got = tc.get_label_quality_scores(
        labels, probs, tokens=words, token_score_method=token_method, sentence_score_method=sentence_method,
        sentence_score_kwargs=kwargs,
    )
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-9)
    assert len(got[1]) == len(expected[1])
    for ours, theirs in zip(got[1], expected[1]):
        assert list(ours.index) == list(theirs.index)
        np.testing.assert_allclose(ours.values, theirs.values, rtol=0, atol=1e-9)


def test_issues_from_scores_equal_cleanlabs():
    labels, probs = sentences(5, seed=5)
    sentence_scores, token_scores = cl_rank.get_label_quality_scores(labels, probs)
    for threshold in (0.05, 0.1, 0.3):
        expected = cl_rank.issues_from_scores(sentence_scores, token_scores=token_scores, threshold=threshold)
        assert tc.issues_from_scores(sentence_scores, token_scores=token_scores, threshold=threshold) == expected
        np.testing.assert_array_equal(tc.issues_from_scores(sentence_scores, threshold=threshold),
                                      cl_rank.issues_from_scores(sentence_scores, threshold=threshold))
    flat_scores = np.concatenate([t.values for t in token_scores])
    offsets = flat(labels, probs)[2]
    assert tc.issues_from_scores(sentence_scores, token_scores=flat_scores, sentence_offsets=offsets) == \
        cl_rank.issues_from_scores(sentence_scores, token_scores=token_scores)
    # Every sentence below the threshold: cleanlab's loop runs off its ranking.
    with pytest.raises(IndexError):
        cl_rank.issues_from_scores(sentence_scores, threshold=1.0)
    assert len(tc.issues_from_scores(sentence_scores, threshold=1.0)) == int((sentence_scores < 1.0).sum())


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_bad_values_are_named_by_sentence_and_token(backend):
    labels, probs = sentences(5, seed=6)
    labels = [list(s) for s in labels]
    probs = [p.copy() for p in probs]
    bad = [i for i, s in enumerate(labels) if len(s) > 4][3]
    probs[bad][2, 1] = np.nan
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=rf"pred_probs at sentence {bad}, token 2, class 1 = nan"):
            tc.find_label_issues(labels, probs, backend=backend)
        probs[bad][2, 1] = 0.0
        probs[bad][2] /= probs[bad][2].sum()
        labels[bad][4] = 7
        with pytest.raises(ValueError, match=rf"labels at sentence {bad}, token 4 = 7 is not a class index in 0\.\.4"):
            tc.get_label_quality_scores(labels, probs, backend=backend)


def test_malformed_inputs_are_refused():
    labels, probs = sentences(5, seed=7)
    with pytest.raises(ValueError, match="labels has 300 sentences but pred_probs 299"):
        tc.find_label_issues(labels, probs[:-1])
    short = list(probs)
    short[3] = short[3][:-1]
    with pytest.raises(ValueError, match=rf"sentence 3 has {len(labels[3])} labels but pred_probs\[3\] has shape"):
        tc.find_label_issues(labels, short)
    y, p, offsets = flat(labels, probs)
    with pytest.raises(ValueError, match="sentence_offsets must run from 0 to the number of tokens"):
        tc.find_label_issues(y, p, sentence_offsets=offsets[:-1])
    swapped = offsets.copy()
    swapped[[5, 6]] = swapped[[6, 5]]
    with pytest.raises(ValueError, match="sentence_offsets decrease at sentence 5"):
        tc.find_label_issues(y, p, sentence_offsets=swapped)
    with pytest.raises(ValueError, match="return_indices_ranked_by='margin' is not one of"):
        tc.find_label_issues(labels, probs, return_indices_ranked_by="margin")
    with pytest.raises(ValueError, match="sentence_score_method='max' is not one of min, softmin"):
        tc.get_label_quality_scores(labels, probs, sentence_score_method="max")


def test_a_sentence_without_labels_but_with_predictions_is_refused():
    labels, probs = sentences(5, seed=8)
    labels = [list(s) for s in labels]
    labels[4] = []
    with pytest.raises(ValueError, match=r"sentence 4 has 0 labels but pred_probs\[4\] has shape"):
        tc.find_label_issues(labels, probs)
