"""dask_labelissues.token_classification against cleanlab.token_classification."""

from __future__ import annotations

import functools
from dataclasses import replace

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from cleanlab.token_classification import filter as cl_filter
from cleanlab.token_classification import rank as cl_rank

from dask_labelissues import api, lockstep, pipelines, sentences as sm, token_classification as tc
from dask_labelissues.engines import blocks
from dask_labelissues.engines import make_engine
from dask_labelissues.engines.blocks import BlockConfig, even_chunks, plan_blocks, snap_ends
from dask_labelissues.kernels import ScoreSpec

from .conftest import runs_on


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
@pytest.fixture(params=["buckets", "kept candidates"])
def selection(request, monkeypatch):
    """Both ways prune_by_noise_rate's issues are selected: by key buckets
    with no item-long column (where the job runs numba's kernels), or from
    each token's kept candidates (numpy's).  Yields how many jobs took the
    buckets."""
    taken = []

    def run_filters(engine, *args, **kwargs):
        taken.append(engine)
        return lockstep.run_filters(engine, *args, **kwargs)

    # Spied in both modes, so that the candidates' mode is seen not to take the buckets.
    monkeypatch.setattr(tc, "run_filters", run_filters)
    if request.param == "buckets":
        monkeypatch.setattr(blocks, "NUMBA_MIN_CELLS", 0)
    else:
        monkeypatch.setattr(blocks, "choose_kernel", lambda spec, cells, **where: replace(spec, kernel="numpy"))
    yield taken
    assert (len(taken) > 0) == (request.param == "buckets")


@pytest.mark.parametrize("k", [2, 5, 20])
@pytest.mark.parametrize("ranked_by", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
def test_issues_equal_cleanlabs(k, ranked_by, selection):
    labels, probs = sentences(k)
    expected = cl_filter.find_label_issues(labels, probs, return_indices_ranked_by=ranked_by, n_jobs=1)
    got = tc.find_label_issues(labels, probs, return_indices_ranked_by=ranked_by, backend="serial")
    assert len(expected) > 20
    assert got == expected


@pytest.mark.parametrize("backend", ["serial", "fork"])
def test_the_bucket_selection_keeps_no_item_long_column(monkeypatch, backend):
    from dask_labelissues.engines.local import LocalEngine

    labels, probs = sentences(20, n=500, seed=4, dtype="float32")
    expected = cl_filter.find_label_issues(labels, probs, n_jobs=1, frac_noise=0.5, min_examples_per_class=30)
    monkeypatch.setattr(blocks, "NUMBA_MIN_CELLS", 0)

    def column(self, dtype):
        raise AssertionError("an item-long column")

    monkeypatch.setattr(LocalEngine, "column", column)
    got = tc.find_label_issues(
        labels, probs, frac_noise=0.5, min_examples_per_class=30, chunk_rows=999, backend=backend
    )
    assert len(expected) > 20
    assert got == expected


def test_options_the_bucket_selection_does_not_take_go_to_the_filter_on_rows(monkeypatch):
    labels, probs = sentences(5, seed=5, dtype="float32")
    monkeypatch.setattr(blocks, "NUMBA_MIN_CELLS", 0)
    remove = [3, 0, 5, 2, 1]
    expected = cl_filter.find_label_issues(labels, probs, num_to_remove_per_class=remove, n_jobs=1)
    assert tc.find_label_issues(labels, probs, num_to_remove_per_class=remove) == expected
    expected = cl_filter.find_label_issues(labels, probs, n_jobs=1, frac_noise=0.6)
    assert tc.find_label_issues(labels, probs, frac_noise=0.6, row_sum_tolerance=1e-2) == expected


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
def test_stored_tokens_with_offsets_give_the_in_memory_results(stored, backend, options, selection):
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
    with runs_on(local_cluster):
        got = tc.find_label_issues(da.from_array(y, chunks=600), da.from_array(p, chunks=(600, 5)),
                                   sentence_offsets=offsets, client=local_cluster)
    assert got == expected
    # The workers read the Zarr store themselves.
    z = root / "tokens.zarr"
    with runs_on(local_cluster):
        got = tc.find_label_issues(f"{z}:labels", f"{z}:pred_probs", sentence_offsets=f"{z}:offsets",
                                   client=local_cluster, chunk_rows=900)
    assert got == expected
    want, want_tokens = tc.get_label_quality_scores(y, p, sentence_offsets=offsets, backend="serial")
    # On a cluster the token scores stay there, lazy, whatever the input.
    for inputs, options in [
        ((f"{z}:labels", f"{z}:pred_probs"), {"chunk_rows": 900}),
        ((da.from_array(y, chunks=600), da.from_array(p, chunks=(600, 5))), {}),
    ]:
        with runs_on(local_cluster):
            scores, tokens = tc.get_label_quality_scores(*inputs, sentence_offsets=offsets, client=local_cluster,
                                                         **options)
        assert isinstance(tokens, da.Array)
        assert set(np.cumsum(tokens.chunks[0]).tolist()) <= set(offsets.tolist())
        assert np.array_equal(scores, want)
        assert np.array_equal(local_cluster.compute(tokens).result(), want_tokens)


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
        # Found by the block holding the sentence, among many.
        with pytest.raises(ValueError, match=rf"labels at sentence {bad}, token 4 = 7 is not a class index in 0\.\.4"):
            tc.get_label_quality_scores(labels, probs, backend=backend, chunk_rows=40)


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
    with pytest.raises(ValueError, match=f"labels has {len(y) - 1:,} tokens but pred_probs {len(y):,}"):
        tc.find_label_issues(y[:-1], p, sentence_offsets=offsets)
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


# -- sentence scores per block -------------------------------------------------------------
def whole(y, p, offsets, token_method, sentence_method, temperature):
    """Today's way: every token's score (the classification job's), then
    the sentence scores from all of them at once."""
    tokens = np.asarray(api.find_label_issues(y, p, method=token_method, backend="serial").label_quality_scores)
    if sentence_method == "min" or temperature == 0:
        return tc.sentence_min(tokens, offsets), tokens
    if np.isinf(temperature):
        return tc.sentence_mean(tokens, offsets), tokens
    return tc.sentence_softmin(tokens, offsets, temperature), tokens


SCORES = [("self_confidence", "min", 0.05), ("normalized_margin", "softmin", 0.05),
          ("confidence_weighted_entropy", "softmin", 0.5), ("self_confidence", "softmin", 0.0),
          ("normalized_margin", "softmin", np.inf)]


@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_sentence_scores_per_block_equal_the_whole_arrays(backend):
    labels, probs = sentences(5, n=300, seed=9, dtype="float32", empty=True)
    probs = [p if len(p) else np.zeros((0, 5), np.float32) for p in probs]
    y, p, offsets = flat(labels, probs)
    longest = int(np.diff(offsets).max())
    wanted = {score: whole(y, p, offsets, *score) for score in SCORES}
    for chunk_rows in (1, 5, longest - 3, 97, 1000, None):
        if chunk_rows is not None:
            # Cuts on the plain grid of chunk_rows would split sentences.
            assert not set(range(chunk_rows, len(y), chunk_rows)) <= set(offsets.tolist())
        for token_method, sentence_method, temperature in SCORES:
            want, want_tokens = wanted[token_method, sentence_method, temperature]
            with dask.config.set(scheduler="threads"):
                got, tokens = tc.get_label_quality_scores(
                    y, p, sentence_offsets=offsets, token_score_method=token_method,
                    sentence_score_method=sentence_method, sentence_score_kwargs={"temperature": temperature},
                    backend=backend, chunk_rows=chunk_rows,
                )
            assert type(tokens) is np.ndarray and tokens.dtype == np.float64
            assert np.array_equal(tokens, want_tokens), (chunk_rows, token_method)
            assert got.dtype == np.float64 and np.array_equal(got, want), (chunk_rows, token_method, temperature)


def test_a_dask_array_gives_lazy_token_scores_in_blocks_of_whole_sentences():
    labels, probs = sentences(5, n=400, seed=3, dtype="float32")
    y, p, offsets = flat(labels, probs)
    want, want_tokens = whole(y, p, offsets, "self_confidence", "softmin", 0.05)
    assert 600 not in offsets  # the array's chunks cut sentences
    with dask.config.set(scheduler="threads"):
        for chunk_rows in (None, 250):
            scores, tokens = tc.get_label_quality_scores(
                da.from_array(y, chunks=600), da.from_array(p, chunks=(600, 5)), sentence_offsets=offsets,
                sentence_score_method="softmin", chunk_rows=chunk_rows,
            )
            assert isinstance(tokens, da.Array) and tokens.dtype == np.float64
            assert set(np.cumsum(tokens.chunks[0]).tolist()) <= set(offsets.tolist())
            assert np.array_equal(scores, want)
            assert np.array_equal(tokens.compute(), want_tokens)


def config(n, cuts, **fields):
    # Rows of 64 KB: about 1,000 rows a block by default.
    return BlockConfig(n_rows=n, row_bytes=2**16, record_bytes=32, spec=ScoreSpec(), cells=n, cuts=cuts, **fields)


@pytest.mark.parametrize("fields", [
    {"chunk_rows": 1}, {"chunk_rows": 7}, {"chunk_rows": 100}, {"chunk_rows": 10**6}, {},
    {"storage_rows": 997}, {"storage_rows": 64, "reads_in_tasks": True, "threads": 2},
    {"storage_rows": 64, "reads_in_tasks": True, "worker_memory": 2**24},
    {"array_chunks": 600}, {"array_chunks": 50, "threads": 2},
], ids=str)
def test_planned_blocks_end_at_sentence_offsets(fields):
    offsets = flat(*sentences(5, n=400, seed=3, dtype="float32"))[2]
    if "array_chunks" in fields:
        fields = {**fields, "array_chunks": even_chunks(int(offsets[-1]), fields["array_chunks"])}
    n = int(offsets[-1])
    plan = plan_blocks(config(n, offsets, **fields))
    unsnapped = plan_blocks(config(n, None, **fields))
    ends = [b for _, b in plan.bounds]
    if fields.get("chunk_rows") != 10**6:
        assert not {b for _, b in unsnapped.bounds} <= set(offsets.tolist())  # mid-sentence before snapping
    assert plan.bounds[0][0] == 0 and ends[-1] == offsets[-1]
    assert all(a < b for a, b in plan.bounds)
    assert all(b == c for (_, b), (c, _) in zip(plan.bounds, plan.bounds[1:]))
    assert set(ends) <= set(offsets.tolist())
    # Each end is the sentence offset nearest to an end the plan would
    # otherwise have: blocks about the size it chose.
    longest = int(np.diff(offsets).max())
    for end in ends[:-1]:
        assert min(abs(end - b) for _, b in unsnapped.bounds) <= longest // 2
    if plan.bounds != unsnapped.bounds:
        # The inputs are cut to the blocks, not the array's chunks.
        assert plan.groups is None


def test_ends_move_to_the_nearest_sentence_offset():
    offsets = np.array([0, 5, 12, 12, 30, 31, 40])
    assert snap_ends(np.array([10, 21, 25, 30]), offsets, 40).tolist() == [12, 30]  # 21 is as near to 12 as to 30
    assert snap_ends(np.array([2, 3]), offsets, 40).tolist() == [5]
    assert snap_ends(np.array([36, 39]), offsets, 40).tolist() == [31]
    # A sentence longer than the blocks stays whole, in one block.
    assert snap_ends(np.arange(1, 40), np.array([0, 3, 37, 40]), 40).tolist() == [3, 37]
    assert snap_ends(np.arange(1, 40), np.array([0, 40]), 40).tolist() == []
    assert snap_ends(np.arange(1, 40), np.array([0, 0, 40, 40]), 40).tolist() == []


def test_sentences_of_a_block_are_its_own():
    offsets = np.array([0, 0, 3, 3, 8, 10, 10, 10])
    parts = sm.block_offsets(offsets, [(0, 3), (3, 8), (8, 10)])
    assert [q.tolist() for q in parts] == [[0, 0, 3], [0, 0, 5], [0, 2, 2, 2]]
    with pytest.raises(ValueError, match=r"block 1 \(tokens 3:7\) cuts a sentence"):
        sm.block_offsets(offsets, [(0, 3), (3, 7), (7, 10)])


@pytest.mark.parametrize("backend", ["serial", "dask"])
def test_blocks_that_cut_sentences_are_refused(backend):
    labels, probs = sentences(5, n=50, seed=1)
    y, p, offsets = flat(labels, probs)
    engine, _, _ = make_engine(backend, y, p, ScoreSpec(), chunk_rows=7)
    try:
        with pytest.raises(ValueError, match="cuts a sentence: blocks must end at sentence offsets"):
            pipelines.run_sentence_scores(engine, engine.plan.spec, offsets, "min", 0.05)
    finally:
        engine.close()


@pytest.mark.parametrize("backend", ["serial", "threads", "fork"])
def test_the_sentence_job_keeps_token_scores_and_no_records(backend):
    labels, probs = sentences(5, n=200, seed=2)
    y, p, offsets = flat(labels, probs)
    engine, _, _ = make_engine(backend, y, p, ScoreSpec(), chunk_rows=300, cuts=offsets)
    try:
        got, tokens = pipelines.run_sentence_scores(engine, engine.plan.spec, offsets, "min", 0.05)
        assert [column.dtype for column in engine.columns] == [np.dtype(np.float64)]  # 8 bytes a token
    finally:
        engine.close()
    expected_sentences, expected_tokens = tc.get_label_quality_scores(y, p, sentence_offsets=offsets, backend="serial")
    np.testing.assert_array_equal(got, expected_sentences)
    np.testing.assert_array_equal(tokens, expected_tokens)


def test_options_the_scores_do_not_take_are_refused():
    labels, probs = sentences(5, n=20, seed=1)
    with pytest.raises(TypeError, match="unexpected keyword arguments: adjust_pred_probs"):
        tc.get_label_quality_scores(labels, probs, adjust_pred_probs=True)


# -- summaries ---------------------------------------------------------------------------
def words_of(labels, seed: int = 0):
    """A word per token from a small vocabulary, cases mixed, so words repeat."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "The", "Paris", "paris", "run", "?odd", "x"]
    return [[str(w) for w in rng.choice(vocab, len(s))] for s in labels]


@pytest.mark.parametrize("kwargs", [
    {},
    {"given": True},
    {"given": True, "class_names": ["PER", "LOC", "ORG", "MISC", "O"], "exclude": [(0, 1), (4, 2)]},
])
def test_common_label_issues_equal_cleanlabs_table(kwargs, capsys):
    from cleanlab.token_classification import summary as cl_summary

    labels, probs = sentences(5, seed=4)
    tokens = words_of(labels)
    issues = tc.find_label_issues(labels, probs)
    options = {k: v for k, v in kwargs.items() if k != "given"}
    if kwargs.get("given"):
        options.update(labels=labels, pred_probs=probs)
    expected = cl_summary.common_label_issues(issues, tokens, **options)
    capsys.readouterr()
    got = tc.common_label_issues(issues, tokens, verbose=False, **options)
    assert capsys.readouterr().out == ""
    assert len(got) > 3 and got.equals(expected)
    tc.common_label_issues(issues, tokens, top=2, **options)
    assert capsys.readouterr().out.count("tokens flagged") == 2


def test_summaries_read_the_flat_form_from_a_store(stored):
    from cleanlab.token_classification import summary as cl_summary

    root, labels, probs = stored
    tokens = words_of(labels, seed=1)
    issues = tc.find_label_issues(labels, probs)
    flat_form = {"labels": f"{root / 'tokens.zarr'}:labels", "pred_probs": f"{root / 'tokens.zarr'}:pred_probs",
                 "sentence_offsets": np.load(root / "offsets.npy")}
    got = tc.common_label_issues(np.asarray(issues), tokens, verbose=False, **flat_form)
    expected = cl_summary.common_label_issues(issues, tokens, labels=labels, pred_probs=probs, verbose=False)
    assert got.equals(expected)


def test_rows_are_read_in_slices_of_nearby_rows():
    source = np.arange(100_000)
    rows = np.array([99_999, 5, 7, 60_000, 5, 0])
    assert (tc._rows_at(source, rows) == rows).all()
    reads = []

    class Counting:
        shape, dtype = source.shape, source.dtype

        def __getitem__(self, key):
            reads.append(key)
            return source[key]

    assert (tc._rows_at(Counting(), rows) == rows).all()
    assert reads == [slice(0, 8), slice(60_000, 60_001), slice(99_999, 100_000)]


def test_filter_by_token_and_display_issues(capsys):
    from cleanlab.token_classification import summary as cl_summary

    labels, probs = sentences(5, seed=5)
    tokens = words_of(labels, seed=2)
    issues = tc.find_label_issues(labels, probs)
    assert tc.filter_by_token("PARIS", issues, tokens) == cl_summary.filter_by_token("PARIS", issues, tokens)
    assert len(tc.filter_by_token("paris", issues, tokens)) > 0
    i, j = issues[0]
    tc.display_issues(issues, tokens, labels=labels, pred_probs=probs, class_names=list("ABCDE"), top=3)
    out = capsys.readouterr().out
    assert out.count("Sentence") == 3
    assert f"Sentence {i}, token {j}: '{tokens[i][j]}'" in out
    assert f"given label: {'ABCDE'[labels[i][j]]}" in out
    assert f"predicted label: {'ABCDE'[int(np.argmax(probs[i][j]))]}" in out
    tc.display_issues([4, 0], tokens)
    assert capsys.readouterr().out.splitlines() == [f"Sentence 4: {' '.join(tokens[4])}", f"Sentence 0: {' '.join(tokens[0])}"]


def test_rank_by_kwargs_as_cleanlab_passes_them():
    labels, probs = sentences(5, seed=6)
    options = {"rank_by_kwargs": {"adjust_pred_probs": True}}
    assert tc.find_label_issues(labels, probs, **options) == cl_filter.find_label_issues(labels, probs, n_jobs=1, **options)
    with pytest.raises(NotImplementedError, match="rank_by_kwargs"):
        tc.find_label_issues(labels, probs, rank_by_kwargs={"method": "x"})


def test_summaries_of_the_flat_form_refuse_pairs_that_name_no_token():
    labels, probs = sentences(5, seed=7)
    y, p, offsets = flat(labels, probs)
    tokens = words_of(labels)
    for bad in [(3, -1), (3, len(labels[3])), (len(labels), 0), (-1, 0)]:
        with pytest.raises(ValueError, match=rf"issue \({bad[0]}, {bad[1]}\) names no token"):
            tc.common_label_issues([bad], tokens, labels=y, pred_probs=p, sentence_offsets=offsets, verbose=False)


def test_display_issues_of_the_flat_form_without_labels_prints_the_sentences(capsys):
    labels, probs = sentences(5, seed=7)
    _, _, offsets = flat(labels, probs)
    tc.display_issues([(2, 0)], words_of(labels), sentence_offsets=offsets)
    out = capsys.readouterr().out
    assert out.startswith("Sentence 2, token 0:") and "label" not in out
