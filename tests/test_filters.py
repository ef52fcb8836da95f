"""cleanlab.filter's methods, distributed (issue 6): parity with
``cleanlab.filter.find_label_issues``, identical output for any chunking and
engine, the number of reads, the K x K math, and bad arguments."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings

import numpy as np
import pytest
from cleanlab.count import calibrate_confident_joint, compute_confident_joint
from cleanlab.filter import _keep_at_least_n_per_class
from cleanlab.filter import find_label_issues as cleanlab_filter
from cleanlab.experimental.label_issues_batched import find_label_issues_batched
from cleanlab.internal.util import round_preserving_row_totals

from dask_labelissues import filters, find_label_issues, open_results
from dask_labelissues.pipelines import run_filter
from dask_labelissues.engines import make_engine
from dask_labelissues.kernels import ScoreSpec

from .conftest import assert_identical, make_dataset
from .test_single_read import CountingArray

DATASETS = {
    "k2": dict(n=6000, k=2, seed=61),
    "k10": dict(n=20000, k=10, seed=62),
    "k100": dict(n=20000, k=100, seed=63),
    "imbalanced": dict(n=20000, k=10, seed=64, imbalance=0.5),
    "absent-class": dict(n=12000, k=10, seed=65, absent=(4,)),
    "float32": dict(n=20000, k=10, seed=66, dtype=np.float32),
}


@functools.lru_cache(maxsize=None)
def dataset(name: str):
    spec = dict(DATASETS[name])
    return make_dataset(spec.pop("n"), spec.pop("k"), **spec)


def reference(d, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cleanlab_filter(d.labels, d.pred_probs, n_jobs=1, **kwargs)


def ours(d, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs.setdefault("backend", "serial")
        kwargs.setdefault("chunk_rows", 1777)
        return find_label_issues(d.labels, d.pred_probs, **kwargs).compute()


# -- parity ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("filter_by", filters.FILTERS)
def test_mask_matches_cleanlab(name, filter_by):
    d = dataset(name)
    expected = reference(d, filter_by=filter_by)
    result = ours(d, filter_by=filter_by)
    assert expected.sum() > 0
    np.testing.assert_array_equal(result.is_label_issue, expected)
    np.testing.assert_array_equal(np.sort(result.issues), np.flatnonzero(expected))
    assert result.num_issues == int(expected.sum())
    assert result.per_class_issues.sum() == result.num_issues


@pytest.mark.parametrize("seed", range(12))
def test_small_data_prune_filters_match_cleanlab(seed):
    """Small data: calibrated cells land on exact halves and equal remainders,
    where the order of the float sums decides the rounding (the joint must be
    laid out as cleanlab's, column-major)."""
    d = make_dataset(2000, 10, seed=100 + seed, noise=0.2)
    for filter_by in ("prune_by_noise_rate", "prune_by_class"):
        result = ours(d, filter_by=filter_by, chunk_rows=333)
        np.testing.assert_array_equal(result.is_label_issue, reference(d, filter_by=filter_by))
        np.testing.assert_array_equal(result.confident_joint, compute_confident_joint(d.labels, d.pred_probs))


@pytest.mark.parametrize("name", ["k10", "imbalanced", "absent-class", "k100"])
def test_confident_joint_matches_cleanlab(name):
    d = dataset(name)
    result = ours(d, filter_by="prune_by_class")
    np.testing.assert_array_equal(
        result.confident_joint, compute_confident_joint(d.labels, d.pred_probs)
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(frac_noise=0.5),
        dict(frac_noise=0.1),
        dict(min_examples_per_class=900),
        dict(num_to_remove_per_class=[30, 0, 55, 10, 10, 10, 10, 10, 10, 200]),
        dict(num_to_remove_per_class=25),
    ],
    ids=["frac-0.5", "frac-0.1", "min-examples", "num-to-remove", "num-to-remove-scalar"],
)
@pytest.mark.parametrize("filter_by", filters.PRUNE_FILTERS)
def test_prune_options_match_cleanlab(filter_by, options):
    d = dataset("imbalanced")
    expected = reference(d, filter_by=filter_by, **options)
    result = ours(d, filter_by=filter_by, **options)
    np.testing.assert_array_equal(result.is_label_issue, expected)


def test_min_examples_per_class_warns_and_spares_small_classes():
    d = dataset("imbalanced")
    counts = np.bincount(d.labels, minlength=d.k)
    with pytest.warns(UserWarning, match="min_examples_per_class"):
        result = find_label_issues(
            d.labels, d.pred_probs, filter_by="prune_by_noise_rate", min_examples_per_class=900,
            backend="serial",
        )
    small = counts <= 900
    assert small.any() and (~small).any()
    assert result.per_class_issues[small].sum() == 0


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "confident_learning", "low_normalized_margin"])
@pytest.mark.parametrize("ranked_by", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
def test_ranking_matches_cleanlab(filter_by, ranked_by):
    d = dataset("k10")  # float64, continuous: no ties for cleanlab's unstable sort to break
    expected = reference(d, filter_by=filter_by, return_indices_ranked_by=ranked_by)
    result = ours(d, filter_by=filter_by, return_indices_ranked_by=ranked_by)
    assert result.method == ranked_by
    np.testing.assert_array_equal(result.issues, expected)
    scores = np.asarray(result.label_quality_scores)
    np.testing.assert_array_equal(result.issue_scores, scores[result.issues])


def test_row_order_when_not_ranked():
    d = dataset("k10")
    ranked = ours(d, filter_by="both")
    in_rows = ours(d, filter_by="both", return_indices_ranked_by=None)
    np.testing.assert_array_equal(in_rows.issues, np.sort(ranked.issues))
    assert not np.array_equal(in_rows.issues, ranked.issues)
    scores = np.asarray(in_rows.label_quality_scores)
    np.testing.assert_array_equal(in_rows.issue_scores, scores[in_rows.issues])


def test_low_self_confidence_filter_is_not_the_batched_default():
    """An explicit filter_by='low_self_confidence' is cleanlab.filter's method;
    without filter_by it is the batched one. On imbalanced data they differ."""
    d = make_dataset(40000, 10, seed=67, imbalance=0.5)
    as_filter = ours(d, filter_by="low_self_confidence")
    default = ours(d)
    np.testing.assert_array_equal(as_filter.is_label_issue, reference(d, filter_by="low_self_confidence"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = find_label_issues_batched(d.labels, d.pred_probs, batch_size=10000, n_jobs=1)
    np.testing.assert_array_equal(np.sort(default.issues), np.sort(batched))
    assert set(as_filter.issues) != set(default.issues)


# -- the same output everywhere --------------------------------------------------
@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "low_self_confidence", "confident_learning"])
def test_identical_across_chunkings_and_engines(filter_by):
    d = dataset("k100")
    base = ours(d, filter_by=filter_by, backend="serial", chunk_rows=20000)
    for backend, rows in (("serial", 997), ("threads", 1500), ("fork", 4096), ("dask", 3000), ("dask", 777)):
        other = ours(d, filter_by=filter_by, backend=backend, chunk_rows=rows, n_jobs=2)
        assert_identical(base, other)
        np.testing.assert_array_equal(base.confident_joint, other.confident_joint)
        assert base.reads == other.reads


def test_filters_on_a_local_cluster(monkeypatch, tmp_path):
    """A LocalCluster of two worker processes gives cleanlab's mask and the
    serial engine's result, for the default filter and the one-read one,
    and the default filter's per-block rules stay out of the graph."""
    import dask
    from distributed import Client, LocalCluster

    from dask_labelissues.engines import dask as dask_engine

    d = dataset("imbalanced")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        for filter_by in ("prune_by_noise_rate", "predicted_neq_given"):
            result = find_label_issues(
                d.labels, d.pred_probs, filter_by=filter_by, client=client, chunk_rows=3000
            )
            assert result.client is client
            np.testing.assert_array_equal(result.compute().is_label_issue, reference(d, filter_by=filter_by))
            assert_identical(ours(d, filter_by=filter_by), result)
        # The per-block rules hold the rows the filter selected: past a
        # size, they go to the workers before the graph, not inside it.
        # Files, read in the tasks: in-memory inputs would be in the graph.
        np.save(tmp_path / "labels.npy", d.labels)
        np.save(tmp_path / "pred_probs.npy", d.pred_probs)
        monkeypatch.setattr(dask_engine, "INLINE_BYTES", 2048)
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "16kB"}):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = find_label_issues(
                    str(tmp_path / "labels.npy"), str(tmp_path / "pred_probs.npy"),
                    filter_by="prune_by_noise_rate", client=client, chunk_rows=3000,
                )
        assert not [w for w in caught if "large graph" in str(w.message)]
        assert_identical(ours(d, filter_by="prune_by_noise_rate"), result)


def _run_with_candidates(d, filter_by: str, candidates: int, chunk_rows: int = 2500):
    fspec = filters.FilterSpec(filter_by, candidates=candidates)
    engine, _, _ = make_engine("serial", d.labels, d.pred_probs, ScoreSpec(), chunk_rows=chunk_rows)
    try:
        return run_filter(engine, engine.plan.spec, fspec, d.pred_probs.dtype)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["k10", "k100"])
def test_undecided_cells_are_recomputed_exactly(name):
    """With one candidate per row many cells are undecided and a third read
    recomputes them; the mask is the same as with every class kept."""
    d = dataset(name)
    expected = reference(d, filter_by="prune_by_noise_rate")
    few = _run_with_candidates(d, "prune_by_noise_rate", 1)
    full = _run_with_candidates(d, "prune_by_noise_rate", d.k - 1)
    assert few.reads == 3
    assert full.reads == 2  # every class kept: every cell decided
    np.testing.assert_array_equal(np.asarray(few.arrays["is_label_issue"]), expected)
    np.testing.assert_array_equal(np.asarray(full.arrays["is_label_issue"]), expected)
    np.testing.assert_array_equal(few.issues, full.issues)


@pytest.mark.parametrize("backend", ["dask", "threads", "fork", "serial"])
@pytest.mark.parametrize("filter_by,reads", [
    ("prune_by_noise_rate", 2), ("both", 2), ("low_normalized_margin", 2), ("predicted_neq_given", 1),
])
def test_pred_probs_read_at_most_twice(backend, filter_by, reads):
    # K = 8: every row keeps every other class, so no cell needs a third read.
    data = make_dataset(12000, 8, seed=68, dtype=np.float32)
    probs, labels = CountingArray(data.pred_probs), CountingArray(data.labels)
    result = find_label_issues(labels, probs, backend=backend, chunk_rows=1000, n_jobs=2, filter_by=filter_by)
    result.compute()
    assert result.num_issues > 0
    assert result.reads == reads
    assert probs.served.value == reads * data.pred_probs.nbytes


# -- K x K math ------------------------------------------------------------------
def test_calibration_and_prune_counts_match_cleanlab():
    rng = np.random.default_rng(69)
    for _ in range(200):
        k = int(rng.integers(2, 40))
        cj = rng.integers(0, 60, (k, k)) * (rng.random((k, k)) < 0.5)
        np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1) + rng.integers(0, 800, k))
        labels = np.repeat(np.arange(k), rng.integers(0, 900, k))
        counts = np.bincount(labels, minlength=k)
        calibrated = filters.calibrate(cj, counts)
        np.testing.assert_array_equal(calibrated, calibrate_confident_joint(cj, labels))
        n, frac = int(rng.integers(0, 6)), float(rng.choice([1.0, 0.7, 0.25]))
        np.testing.assert_array_equal(
            filters._keep_at_least(calibrated.T, n, frac),
            _keep_at_least_n_per_class(calibrated.T, n=n, frac_noise=frac),
        )
        floats = rng.random((k, k)) * 50
        np.testing.assert_array_equal(filters.round_rows(floats), round_preserving_row_totals(floats))


def test_group_top_keeps_the_smallest_per_group_ties_by_index():
    group = np.array([0, 0, 0, 1, 1, 0, 1])
    key = np.array([0.5, 0.1, 0.1, 0.3, 0.2, 0.9, 0.2])
    index = np.array([10, 12, 11, 13, 16, 15, 14])
    top = filters.GroupTop.chunk(group, key, index, np.array([2, 1]))
    assert top.index.tolist() == [11, 12, 14]
    halves = [filters.GroupTop.chunk(group[s], key[s], index[s], np.array([2, 1])) for s in (slice(0, 4), slice(4, 7))]
    merged = filters.GroupTop.combine(halves)
    assert merged.index.tolist() == top.index.tolist()


def _smallest_by_lexsort(group, key, index, limits):
    order = np.lexsort((index, key, group))
    g, k, i = group[order], key[order], index[order]
    keep = np.arange(g.size) - np.searchsorted(g, g, side="left") < limits[g]
    return g[keep], k[keep], i[keep]


@pytest.mark.parametrize("seed", range(40))
def test_group_top_is_the_lexicographic_smallest_however_it_is_fed(seed):
    """Rows in index order take a faster sort than others, and states of
    consecutive row ranges merged in order a faster merge than states in
    any order: each gives the (group, key, index) smallest rows, with many
    equal keys, -0.0 beside 0.0, and limits from none to all."""
    rng = np.random.default_rng(seed)
    n, groups = int(rng.integers(0, 2000)), int(rng.integers(1, 6))
    group = rng.integers(0, groups, n)
    key = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
    key[rng.random(n) < 0.05] = -0.0
    limits = rng.integers(0, n + 2, groups)
    index = np.sort(rng.integers(0, 10**6, n)) if seed % 2 else rng.permutation(n)
    want = _smallest_by_lexsort(group, key, index, limits)
    top = filters.GroupTop.chunk(group, key, index, limits)
    for got, expected in zip((top.group, top.key, top.index), want):
        np.testing.assert_array_equal(got, expected)
    rows = np.arange(n) * 3
    cuts = [0, *np.sort(rng.integers(0, n + 1, 3)), n]
    parts = [filters.GroupTop.chunk(group[a:b], key[a:b], rows[a:b], limits) for a, b in zip(cuts, cuts[1:])]
    want = _smallest_by_lexsort(group, key, rows, limits)
    for ordered in (parts, parts[::-1], parts[1:] + parts[:1]):
        merged = filters.GroupTop.combine(ordered)
        for got, expected in zip((merged.group, merged.key, merged.index), want):
            np.testing.assert_array_equal(got, expected)


# -- arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(filter_by="prune_by_magic"), "filter_by='prune_by_magic' is not one of"),
        (dict(filter_by="confident_learning", num_to_remove_per_class=[1] * 6),
         "not supported with filter_by='confident_learning'"),
        (dict(frac_noise=0.5), "need filter_by"),
        (dict(filter_by="both", frac_noise=1.5), "frac_noise must be in"),
        (dict(filter_by="both", num_to_remove_per_class=[1, 2]), "one entry per class"),
        (dict(filter_by="both", return_indices_ranked_by="entropy"), "return_indices_ranked_by='entropy'"),
        (dict(return_indices_ranked_by="normalized_margin"), "without filter_by the score chooses"),
        (dict(filter_by="both", method="normalized_margin", return_indices_ranked_by="self_confidence"),
         "disagree"),
        (dict(filter_by="prune_by_class", num_to_remove_per_class=[2.5, 1, 1, 1, 1, 1]),
         r"num_to_remove_per_class\[0\] = 2.5 is not a whole number"),
        (dict(filter_by="prune_by_class", num_to_remove_per_class=[2, 1, -1, 1, 1, 1]),
         r"num_to_remove_per_class\[2\] = -1 is not a whole number"),
        (dict(filter_by="both", min_examples_per_class=1.5), "min_examples_per_class = 1.5"),
    ],
)
def test_bad_arguments_fail_before_reading(kwargs, match):
    data = make_dataset(3000, 6, seed=70)
    probs = CountingArray(data.pred_probs)
    with pytest.raises(ValueError, match=match):
        find_label_issues(data.labels, probs, backend="serial", **kwargs)
    assert probs.served.value == 0


# -- store and CLI -----------------------------------------------------------------
def test_results_store_keeps_filter_outputs(tmp_path):
    d = dataset("k10")
    result = ours(d, filter_by="prune_by_noise_rate")
    result.to_zarr(str(tmp_path / "out.zarr"))
    back = open_results(str(tmp_path / "out.zarr"))
    assert back.filter_by == "prune_by_noise_rate"
    assert back.reads == result.reads
    np.testing.assert_array_equal(back.confident_joint, result.confident_joint)
    np.testing.assert_array_equal(np.asarray(back.is_label_issue), result.is_label_issue)


def test_cli_filter_by(tmp_path):
    d = dataset("imbalanced")
    np.save(tmp_path / "labels.npy", d.labels)
    np.save(tmp_path / "probs.npy", d.pred_probs)
    cmd = [
        sys.executable, "-m", "dask_labelissues", "find",
        "--labels", str(tmp_path / "labels.npy"), "--pred-probs", str(tmp_path / "probs.npy"),
        "--output", str(tmp_path / "out.zarr"), "--backend", "fork", "--n-jobs", "2",
        "--filter-by", "both", "--frac-noise", "0.5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "filter_by=both" in done.stdout
    assert "pred_probs read 2 times" in done.stdout
    back = open_results(str(tmp_path / "out.zarr"))
    np.testing.assert_array_equal(
        np.asarray(back.is_label_issue), reference(d, filter_by="both", frac_noise=0.5)
    )

    bad = cmd[:-4] + ["--filter-by", "both", "--num-to-remove-per-class", "1,x"]
    bad[bad.index("--output") + 1] = str(tmp_path / "bad.zarr")
    done = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --num-to-remove-per-class")
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("partition_pairs", [0, 2000, 10**9], ids=["all-partitioned", "mixed", "all-sorted"])
@pytest.mark.parametrize("slice_rows", [None, 128], ids=["one-slice", "slices-of-128-rows"])
def test_exact_cells_keep_what_sorting_every_row_and_cell_keeps(dtype, partition_pairs, slice_rows, monkeypatch):
    """The exact recomputation filters large classes' rows by a partition per
    cell before its selection: the result must be that of selecting from
    every (row, cell) pair, ties (many here: probabilities on a coarse grid)
    by row."""
    from dask_labelissues.filters import Cells, GroupTop, exact_cells_block

    monkeypatch.setattr(filters, "PARTITION_PAIRS", partition_pairs)
    if slice_rows:
        monkeypatch.setattr(filters.fused, "SUB_BLOCK_BYTES", 8 * 5 * slice_rows)
    rng = np.random.default_rng(5)
    n, k = 3000, 6
    probs = rng.integers(1, 5, (n, k)).astype(dtype)
    probs /= probs.sum(1, keepdims=True)
    # 1,500, 600, 300, 300 and 300 rows: 7,500 to 1,500 pairs each; class 4 has no rows
    labels = rng.choice(k, n, p=[0.5, 0.2, 0.1, 0.1, 0.0, 0.1])
    given, other = (a.ravel() for a in np.divmod(np.arange(k * k), k))
    off = (given != other) & (given != 5)  # class 5 has rows but no cell
    given, other = given[off], other[off]
    limits = rng.integers(0, 40, given.size)
    limits[given == 1] = [0, 1, 5, 2000, 3]  # none, one, a few, more rows than the class has
    cells = Cells(given, other, limits, k)
    rows = np.repeat(np.arange(n), k)
    cols = np.tile(np.arange(k), n)
    pairs = {(g, o): i for i, (g, o) in enumerate(zip(given, other))}
    keep = [(r, pairs[labels[r], c]) for r, c in zip(rows, cols) if (labels[r], c) in pairs]
    r, g = (np.array(a) for a in zip(*keep))
    margin = probs[r, other[g]] - probs[r, labels[r]]
    want = GroupTop.chunk(g, -margin.astype(np.float64), r + 100, limits)
    got = exact_cells_block(labels, probs, 100, cells)
    for field in ("group", "key", "index"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    found = np.bincount(got.group, minlength=given.size)[given == 1].tolist()
    assert found == [0, 1, 5, int((labels == 1).sum()), 3]
    assert not np.isin(got.group, np.flatnonzero(given == 4)).any()


@pytest.mark.parametrize("index", [[], [7], [5, 3, 5, 1, 3, 9], list(range(10, 0, -1))])
def test_a_selections_rows_are_ascending_without_repeats(index):
    index = np.asarray(index, dtype=np.int64)
    top = filters.GroupTop(np.zeros(index.size, dtype=np.int64), np.zeros(index.size), index, np.array([index.size]))
    rows = top.rows()
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, sorted(set(index.tolist())))


def test_noise_rate_candidates_by_search_are_those_by_table(monkeypatch):
    """Classes past 256 find each (given, other) pair's cell by a search,
    not a K x K table (and count the joint sparsely): the same candidates."""
    d = dataset("k100")
    dense = ours(d, filter_by="prune_by_noise_rate", backend="serial", chunk_rows=3000)
    monkeypatch.setattr(filters, "DENSE_CELLS", 0)
    searched = ours(d, filter_by="prune_by_noise_rate", backend="serial", chunk_rows=3000)
    assert_identical(dense, searched)
    np.testing.assert_array_equal(dense.confident_joint, searched.confident_joint)
