"""Several problems in lockstep: each problem's results are those of its own
run_filter, and each stage reads pred_probs once for all of them."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest

from dask_labelissues import filters, lockstep
from dask_labelissues import multilabel_classification as ml
from dask_labelissues.engines import make_engine
from dask_labelissues.kernels import ScoreSpec
from dask_labelissues.kinds import ROWS, OneVsRest
from dask_labelissues.lockstep import run_filters
from dask_labelissues.pipelines import run_filter

from .conftest import make_dataset
from .test_multilabel_classification import FILTERS, examples
from .test_single_read import CountingArray

ALL_FILTERS = [*FILTERS, "low_self_confidence", "low_normalized_margin"]


def _engine(backend, labels, probs, kind, chunk_rows, single_read):
    return make_engine(backend, labels, probs, ScoreSpec(), single_read=single_read, chunk_rows=chunk_rows,
                       n_jobs=2, kind=kind)[0]


def alone(labels, probs, kind, fspec, chunk_rows):
    """One problem's own job: the reference."""
    engine = _engine("serial", labels, probs, kind, chunk_rows, not fspec.needs_joint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_filter(engine, engine.plan.spec, fspec, probs.dtype)
    finally:
        engine.close()


def together(backend, labels, probs, kinds, fspecs, chunk_rows):
    engine = _engine(backend, labels, probs, kinds[0], chunk_rows, False)
    try:
        with warnings.catch_warnings(), dask.config.set(scheduler="threads"):
            warnings.simplefilter("ignore")
            return run_filters(engine, engine.plan.spec, kinds, fspecs)
    finally:
        engine.close()


def assert_each_alone(got, labels, probs, kinds, fspecs, chunk_rows=None):
    mask = np.asarray(got.mask)
    assert mask.shape == (probs.shape[0], len(kinds))
    for p, (kind, fspec) in enumerate(zip(kinds, fspecs)):
        ref = alone(labels, probs, kind, fspec, chunk_rows or 389)
        np.testing.assert_array_equal(mask[:, p], np.asarray(ref.arrays["is_label_issue"]))
        np.testing.assert_array_equal(got.issues[p], ref.issues)
        np.testing.assert_array_equal(got.issue_scores[p], ref.issue_scores)
        np.testing.assert_array_equal(got.thresholds[p], ref.thresholds)
        np.testing.assert_array_equal(got.per_class_count[p], ref.per_class_count)
        if fspec.selects:
            np.testing.assert_array_equal(got.confident_joints[p], ref.confident_joint)


@pytest.mark.parametrize("filter_by", ALL_FILTERS)
@pytest.mark.parametrize(("backend", "chunk_rows"), [("serial", 97), ("threads", 500), ("fork", 1499), ("dask", 256)])
def test_every_class_gets_what_its_own_job_gives(filter_by, backend, chunk_rows):
    _, probs, matrix = examples(6)
    kinds = [OneVsRest(k=c) for c in range(6)]
    fspecs = [filters.FilterSpec(filter_by)] * 6
    got = together(backend, matrix, probs, kinds, fspecs, chunk_rows)
    assert got.issues[0].size and got.issues[5].size
    assert_each_alone(got, matrix, probs, kinds, fspecs)


@pytest.mark.parametrize("backend", ["serial", "threads", "dask"])
def test_a_job_without_the_mask_keeps_no_block_for_it(backend, monkeypatch):
    """Ten classes by buckets (prune_by_noise_rate with its own candidates
    unset) give the rows' filter's issues; without the mask, the last
    read's blocks are not kept."""
    d = make_dataset(6000, 10, seed=63)
    fspec = filters.FilterSpec("prune_by_noise_rate")
    assert lockstep.by_buckets(fspec, 10)
    engine = _engine(backend, d.labels, d.pred_probs, ROWS, 700, False)
    kept = []
    compute = type(engine).compute

    def spy(self, *handles, keep=()):
        kept.extend(keep)
        return compute(self, *handles, keep=keep)

    monkeypatch.setattr(type(engine), "compute", spy)
    try:
        with dask.config.set(scheduler="threads"):
            got = run_filters(engine, engine.plan.spec, [ROWS], [fspec], mask=False)
    finally:
        engine.close()
    assert got.mask is None and kept == []
    ref = alone(d.labels, d.pred_probs, ROWS, fspec, 389)
    np.testing.assert_array_equal(got.issues[0], ref.issues)
    np.testing.assert_array_equal(got.issue_scores[0], ref.issue_scores)


def test_problems_with_other_filters_and_undecided_cells():
    """Any kinds and any mix of filters; with one kept candidate a row, noise-
    rate cells are undecided and one more read decides them for all."""
    d = make_dataset(8000, 10, seed=62)
    kinds = [ROWS, ROWS, ROWS, ROWS]
    fspecs = [
        filters.FilterSpec("prune_by_noise_rate", candidates=1),
        filters.FilterSpec("both"),
        filters.FilterSpec("confident_learning"),
        filters.FilterSpec("low_normalized_margin"),
    ]
    assert alone(d.labels, d.pred_probs, ROWS, fspecs[0], 1000).reads == 3  # undecided cells alone, too
    got = together("threads", d.labels, d.pred_probs, kinds, fspecs, 1000)
    # thresholds, joints, the selections, the undecided cells, the flags
    assert got.reads == 5
    assert_each_alone(got, d.labels, d.pred_probs, kinds, fspecs, 1000)


@pytest.mark.parametrize("backend", ["serial", "fork", "dask"])
@pytest.mark.parametrize(("filter_by", "reads"), [("prune_by_noise_rate", 4), ("confident_learning", 2),
                                                  ("predicted_neq_given", 2)])
def test_pred_probs_is_read_once_a_stage_whatever_the_classes(backend, filter_by, reads):
    for k in (2, 12):
        _, probs, matrix = examples(k, n=900)
        counted = CountingArray(probs.astype(np.float32))
        with dask.config.set(scheduler="threads"):
            ml.find_label_issues(matrix, counted, filter_by=filter_by, backend=backend, chunk_rows=200)
        assert counted.served.value == reads * counted.array.nbytes, (k, counted.served.value)


def test_the_first_bad_value_is_named_by_row_then_class():
    _, probs, matrix = examples(6, n=600)
    probs = probs.copy()
    probs[400, 1] = 1.5
    probs[250, 5] = -0.1
    probs[250, 3] = 2.0
    with pytest.raises(ValueError, match=r"pred_probs\[250, 3\] = 2.0 .*logit"):
        ml.find_label_issues(matrix, probs, backend="threads", chunk_rows=100)


def test_the_kernel_is_chosen_for_the_work_of_every_problem():
    from dask_labelissues.engines.blocks import NUMBA_MIN_CELLS, BlockConfig, plan_blocks

    job = dict(n_rows=1000, row_bytes=400, record_bytes=32, spec=ScoreSpec(), cells=NUMBA_MIN_CELLS // 10,
               in_process=False)
    assert plan_blocks(BlockConfig(**job)).spec.kernel == "numpy"
    assert plan_blocks(BlockConfig(**job, problems=10)).spec.kernel == "auto"  # numba where it imports


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 3), (4096, 7), (10_001, 50)])
def test_a_column_major_copy_holds_the_same_values(dtype, shape):
    from dask_labelissues.lockstep import column_major_copy

    a = (np.random.default_rng(3).random(shape) * 100).astype(dtype)
    out = column_major_copy(a)
    assert out.flags.f_contiguous and out.dtype == a.dtype
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(column_major_copy(a[::2]), a[::2])  # a strided view too


@pytest.mark.parametrize("backend", ["serial", "threads", "dask"])
def test_the_ranking_scores_come_from_the_masks_last_read(backend):
    _, probs, matrix = examples(7, n=1200)
    counted = CountingArray(probs)
    with dask.config.set(scheduler="threads"):
        ranked = ml.find_label_issues(matrix, counted, return_indices_ranked_by="normalized_margin",
                                      backend=backend, chunk_rows=300)
        found = ml.find_issues(matrix, probs, score_method="normalized_margin", backend=backend, chunk_rows=300)
    assert counted.served.value == 4 * probs.nbytes  # thresholds, joints, selections, flags and scores
    assert found.reads == 4
    np.testing.assert_array_equal(found.scores, ml.get_label_quality_scores(matrix, probs, method="normalized_margin"))
    np.testing.assert_array_equal(found.per_class, ml.find_multilabel_issues_per_class(matrix, probs))
    issues = np.flatnonzero(found.per_class.any(axis=1))
    np.testing.assert_array_equal(ranked, issues[np.argsort(found.scores[issues], kind="stable")])


@pytest.mark.parametrize(("backend", "chunk_rows"), [("serial", 97), ("fork", 333), ("dask", 256)])
def test_counting_the_flagged_without_gathering_them_gives_the_same_masks_and_counts(backend, chunk_rows):
    _, probs, matrix = examples(5, n=1200, seed=9)
    kinds = [OneVsRest(k=c) for c in range(5)]
    for filter_by in ("prune_by_noise_rate", "confident_learning"):
        fspecs = [filters.FilterSpec(filter_by)] * 5
        results = []
        for issues in (True, False):
            engine = _engine(backend, matrix, probs, kinds[0], chunk_rows, False)
            try:
                with dask.config.set(scheduler="threads"):
                    results.append(run_filters(engine, engine.plan.spec, kinds, fspecs, issues=issues))
            finally:
                engine.close()
        gathered, counted = results
        assert counted.issues is None and counted.issue_scores is None
        np.testing.assert_array_equal(np.asarray(counted.mask), np.asarray(gathered.mask))
        np.testing.assert_array_equal(counted.flagged_by_label, gathered.flagged_by_label)
        assert counted.flagged_by_label.sum() == np.asarray(gathered.mask).sum() > 0
        assert counted.reads == gathered.reads


def test_the_flagged_examples_alone_are_one_column():
    _, probs, matrix = examples(6, n=900)
    both = ml.find_issues(matrix, probs, backend="threads", chunk_rows=250)
    union = ml.find_issues(matrix, probs, per_class=False, backend="threads", chunk_rows=250)
    assert union.per_class is None and union.flagged.shape == (900,)
    np.testing.assert_array_equal(union.flagged, both.per_class.any(axis=1))
    np.testing.assert_array_equal(both.flagged, union.flagged)
    from dask_labelissues import dataset

    given, left_out = dataset.flagged_by_class(both.per_class, matrix, probs)
    assert given.sum() and left_out.sum()
    for found in (both, union):  # counted from the gathered issues, not from an (N, K) mask
        np.testing.assert_array_equal(found.given_flagged, given)
        np.testing.assert_array_equal(found.left_out_flagged, left_out)


# -- noise-rate selections by key buckets -------------------------------------------------
def test_key_counts_of_numba_and_numpy_agree_by_off_diagonal_cell():
    from dask_labelissues import fused

    rng = np.random.default_rng(4)
    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")  # loads numba
    for k, dtype in ((2, np.float32), (5, np.float64)):
        probs = np.round(rng.dirichlet(np.full(k, 0.4), size=3000), 2).astype(dtype)
        labels = rng.integers(0, k, 3000)
        fast = filters.key_counts(probs, labels)
        codes, key = filters._pairs(probs, labels)
        assert fast.dtype == np.int32 and fast.shape == (k * (k - 1), filters.KEY_BUCKETS + 1)
        cells = filters.off_diagonal_cells(*np.divmod(codes, k), k)
        want = np.zeros_like(fast)
        np.add.at(want, (cells, filters.key_bucket(key)), 1)
        np.testing.assert_array_equal(fast, want)


def test_key_buckets_never_fall_as_keys_rise():
    keys = np.array([-np.inf, -5.0, -1.0, -0.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 1.0, 3.0, np.inf, np.nan])
    buckets = filters.key_bucket(keys)
    assert (np.diff(buckets) >= 0).all()
    assert buckets[0] == 0 and buckets[-1] == filters.KEY_BUCKETS
    assert buckets[5] == buckets[6]  # -0.0 and 0.0 tie, as the sort ties them
    float32 = filters.key_bucket(np.float32(-0.3))
    assert float32 == filters.key_bucket(np.float64(np.float32(-0.3)))


def test_a_bucket_cut_takes_the_lower_buckets_whole_and_the_rest_from_the_boundary():
    width = filters.KEY_BUCKETS + 1
    counts = np.zeros((2, width), dtype=np.int32)
    counts[0, [3, 7, 9]] = [5, 4, 2]  # cell (0, 1)
    counts[1, [0, 1]] = [1, 1]  # cell (1, 0)
    cells = filters.Cells(np.array([0, 1]), np.array([1, 0]), np.array([7, 5]), 2)
    cut = filters.BucketCut.plan(cells, counts)
    np.testing.assert_array_equal(cut.low, [7, width])  # the second cell has 2 rows for 5: all
    np.testing.assert_array_equal(cut.need, [2, 0])


def _ties(n=3000, k=5, seed=3, dtype="float32"):
    """Multi-label data whose probabilities take few values: keys tie within
    and across blocks, and bucket edges fall on keys."""
    rng = np.random.default_rng(seed)
    truth = rng.random((n, k)) < 0.3
    probs = np.round(np.where(truth, rng.beta(5, 2, (n, k)), rng.beta(2, 5, (n, k))), 2).astype(dtype)
    given = truth ^ (rng.random((n, k)) < 0.04)
    return given.astype(np.uint8), probs


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both"])
@pytest.mark.parametrize(("backend", "chunk_rows"), [("serial", 97), ("threads", 700), ("fork", 1499), ("dask", 256)])
def test_bucketed_selections_choose_what_the_candidates_chose(monkeypatch, filter_by, backend, chunk_rows):
    import dask_labelissues.lockstep as lockstep

    for dtype in ("float32", "float64"):
        matrix, probs = _ties(dtype=dtype)
        kinds = [OneVsRest(k=c) for c in range(probs.shape[1])]
        fspecs = [filters.FilterSpec(filter_by)] * len(kinds)
        got = {}
        for bucketed in (False, True):
            monkeypatch.setattr(lockstep, "BUCKETED_SELECTIONS", bucketed)
            got[bucketed] = together(backend, matrix, probs, kinds, fspecs, chunk_rows)
        assert np.asarray(got[True].mask).any()
        np.testing.assert_array_equal(np.asarray(got[True].mask), np.asarray(got[False].mask))
        for p in range(len(kinds)):
            np.testing.assert_array_equal(got[True].issues[p], got[False].issues[p])
            np.testing.assert_array_equal(got[True].issue_scores[p], got[False].issue_scores[p])


def test_bucketed_selections_gather_only_their_boundary_buckets(monkeypatch):
    """The selections' read brings back a small part of the candidates it
    used to: those of each cell's boundary bucket."""
    import dask_labelissues.lockstep as lockstep

    matrix, probs = _ties(n=20000, k=4, dtype="float64")
    probs = np.clip(probs + np.random.default_rng(5).random(probs.shape) * 1e-3, 0, 1)  # few ties
    kinds = [OneVsRest(k=c) for c in range(4)]
    fspecs = [filters.FilterSpec("prune_by_noise_rate")] * 4
    gathered = {}
    real = filters.noise_rate_block
    for bucketed in (False, True):
        sizes = []

        def counting(*args, **kwargs):
            top = real(*args, **kwargs)
            sizes.append(top.index.size)
            return top

        monkeypatch.setattr(filters, "noise_rate_block", counting)
        monkeypatch.setattr(lockstep, "BUCKETED_SELECTIONS", bucketed)
        got = together("serial", matrix, probs, kinds, fspecs, 2500)
        gathered[bucketed] = sum(sizes)
    flagged = int(np.asarray(got.mask).sum())
    assert gathered[False] >= flagged > 0
    assert gathered[True] < gathered[False] / 20
