"""The math layer on its own: exact sums, score keys, radix selection."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from dask_labelissues import kernels
from dask_labelissues.states import HistogramState, Selection, ThresholdState, scan_block
from dask_labelissues.kernels import ScoreSpec


UNIT = 2**137


def test_fixed_point_sums_are_exact_and_grouping_free():
    rng = np.random.default_rng(0)
    values = rng.random(50000) ** 3  # many tiny values
    labels = rng.integers(0, 4, values.size)
    whole = kernels.fixed_point_class_sums(labels, values, 4)
    pieces = [kernels.fixed_point_class_sums(labels[a:a + 333], values[a:a + 333], 4)
              for a in range(0, values.size, 333)]
    assert sum(pieces).tolist() == whole.tolist()
    for k in range(4):
        exact = sum(Fraction(v) for v in values[labels == k])
        assert Fraction(int(whole[k]), UNIT) == exact


def test_fixed_point_extremes():
    values = np.array([2.0**-85, math.nextafter(2.0**31, 0.0), math.nextafter(1.0, 0.0), 0.0, 1e-300, 5e-324])
    labels = np.zeros(values.size, dtype=np.intp)
    total = kernels.fixed_point_class_sums(labels, values, 1)[0]
    exact_part = sum(Fraction(v) for v in values[:4])
    # Everything at or above 2**-85 is exact; the two tiny values are truncated away.
    assert Fraction(int(total), UNIT) == exact_part


def test_small_thresholds_are_correctly_rounded():
    rng = np.random.default_rng(4)
    values = rng.uniform(1e-7, 5e-6, 20000)
    labels = np.zeros(values.size, dtype=np.intp)
    sums = kernels.fixed_point_class_sums(labels, values, 1)
    mean = kernels.exact_means(sums, np.array([values.size]))[0]
    assert mean == float(sum(Fraction(v) for v in values) / values.size)


def test_exact_means_are_correctly_rounded():
    values = np.array([0.1, 0.2, 0.3, 0.7])
    labels = np.array([0, 0, 0, 1])
    sums = kernels.fixed_point_class_sums(labels, values, 3)
    means = kernels.exact_means(sums, np.array([3, 1, 0]))
    # The naive float mean is 0.20000000000000004; the exact one rounds to 0.2.
    assert means[0] == float(sum(Fraction(v) for v in values[:3]) / 3) == 0.2
    assert means[1] == 0.7
    assert means[2] == kernels.ABSENT_CLASS_THRESHOLD


def test_thresholds_identical_for_any_block_split():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=4000)
    labels = rng.integers(0, 5, 4000)
    spec = ScoreSpec()

    def thresholds(step):
        parts = [scan_block(labels[a:a + step], probs[a:a + step], a, spec)[1]
                 for a in range(0, 4000, step)]
        return ThresholdState.combine(parts[::-1]).finalize()

    reference = thresholds(4000)
    for step in (1, 7, 999, 2000):
        np.testing.assert_array_equal(thresholds(step), reference)


def test_score_keys_preserve_order():
    values = np.array([-np.inf, -1.5, -1e-300, -0.0, 0.0, 5e-324, 1e-300, 0.5, 1.0, np.inf])
    keys = kernels.score_keys(values)
    assert np.all(np.diff(keys.astype(object)) >= 0)
    assert keys[3] == keys[4]  # -0.0 and 0.0 tie, as the floats do
    assert len(set(keys.tolist())) == len(values) - 1


def _select(scores: np.ndarray, target: int, blocks: int, cap: int | None = None) -> np.ndarray:
    """Run the selection as the engines do, on blocks of ``scores``."""
    from dask_labelissues import states
    from dask_labelissues.states import Winners

    parts = np.array_split(scores, blocks)
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()
    recs = []
    for p in parts:
        rec = np.zeros(len(p), dtype=[("label", "i4"), ("reduce", "?")])
        recs.append(rec)
    old_cap = states.CANDIDATE_CAP
    if cap is not None:
        states.CANDIDATE_CAP = cap
    try:
        sel = Selection(target)
        while sel.wants_round():
            sel.advance(HistogramState.combine(
                [HistogramState.chunk(p, sel.round_index, sel.prefix) for p in parts]
            ))
        if sel.bucket <= states.CANDIDATE_CAP:
            gathered = Winners.combine([
                states.prefix_winners(r, p, sel.shift, sel.prefix, s) for r, p, s in zip(recs, parts, starts)
            ])
            winners, cutoff, quotas = sel.finish(gathered, starts)
        else:
            cutoff = sel.prefix
            eq = [int((kernels.score_keys(p) == np.uint64(cutoff)).sum()) for p in parts]
            quotas = sel.quotas(eq)
            winners = None
    finally:
        states.CANDIDATE_CAP = old_cap
    masks = [kernels.selected_rows(kernels.score_keys(p), cutoff, q) for p, q in zip(parts, quotas)]
    chosen = np.flatnonzero(np.concatenate(masks))
    if winners is not None:
        np.testing.assert_array_equal(np.sort(winners.index), chosen)
        by_rank = np.lexsort((np.arange(scores.size), scores))[:target]
        np.testing.assert_array_equal(winners.ranked().index, by_rank)
    return chosen


def test_rank_order_is_by_value_then_index_whatever_the_given_order():
    from dask_labelissues import fused
    from dask_labelissues.states import rank_order

    # With numba loaded, rows in no ranked order are sorted by radix.
    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")
    rng = np.random.default_rng(5)
    values = np.round(rng.random(8000), 2)  # many ties
    values[rng.choice(8000, 40, replace=False)] = np.nan
    values[rng.choice(8000, 40, replace=False)] = -0.0
    values[rng.choice(8000, 40, replace=False)] = 0.0
    index = np.arange(values.size) * 3 + 7
    runs = np.array_split(np.arange(values.size), 9)
    ranked_runs = np.concatenate([r[np.lexsort((index[r], values[r]))] for r in runs])
    orders = {
        "index order": np.arange(values.size),
        "ranked runs": ranked_runs,
        "shuffled": rng.permutation(values.size),  # ties out of index order: the fallback
        "reversed": np.arange(values.size)[::-1],
    }
    real_key_order = fused.key_order
    radix = []

    def spy(keys):
        radix.append(keys.size)
        return real_key_order(keys)

    fused.key_order = spy
    try:
        for name, given in orders.items():
            v, i = values[given], index[given]
            got = rank_order(v, i)
            expected = np.lexsort((i, v))
            np.testing.assert_array_equal(i[got], i[expected], err_msg=name)
    finally:
        fused.key_order = real_key_order
    # Every order but the ranked runs (a merge for numpy's sort) by radix.
    assert radix == [values.size] * 3
    # Only NaNs tie, out of index order: NaN != NaN must still count as a tie.
    v = np.array([0.5, np.nan, 0.1, np.nan, 0.3])
    np.testing.assert_array_equal(rank_order(v, np.array([0, 9, 2, 4, 1])), [2, 4, 0, 3, 1])
    keys = np.array([5, 3, 5, 3, 1], dtype=np.uint64)
    np.testing.assert_array_equal(rank_order(keys, np.array([4, 3, 2, 1, 0])), [4, 3, 1, 2, 0])


@pytest.mark.parametrize("cap", [None, 0, 5])
@pytest.mark.parametrize("blocks", [1, 3, 17])
@pytest.mark.parametrize("target", [1, 2, 50, 999, 1000])
def test_selection_equals_stable_sort(target, blocks, cap):
    rng = np.random.default_rng(target)
    scores = np.round(rng.random(1000), 2)  # many ties
    expected = np.sort(np.argsort(scores, kind="stable")[:target])
    np.testing.assert_array_equal(_select(scores, target, blocks, cap), expected)


@pytest.mark.parametrize("cap", [None, 0])
def test_selection_all_equal_and_extremes(cap):
    scores = np.full(100, 0.25)
    np.testing.assert_array_equal(_select(scores, 10, 7, cap), np.arange(10))
    scores = np.array([0.0, 1.0, 0.0, 1e-300, 5e-324])
    np.testing.assert_array_equal(_select(scores, 3, 2, cap), [0, 2, 4])


def test_reduce_flag_matches_cleanlab_rule():
    from cleanlab.count import _reduce_issues

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64, np.float16):
        probs = rng.dirichlet(np.ones(4), size=5000).astype(dtype)
        # Near ties the rule must judge exactly as cleanlab does.
        probs[:1000, 1] = probs[:1000, 2]
        probs[1000:2000, 0] = probs[1000:2000, 3] + dtype(1e-6)
        labels = rng.integers(0, 4, 5000)
        rec, *_ = kernels.row_records(labels, probs, ScoreSpec(row_sum_tolerance=None))
        np.testing.assert_array_equal(rec["reduce"], _reduce_issues(probs, labels))


def test_nan_scores_rank_last():
    keys = kernels.score_keys(np.array([np.nan, -np.nan, np.inf, 0.5, -np.inf]))
    assert keys[0] == keys[1]
    assert keys[0] > keys[2] > keys[3] > keys[4]


def _outlook_records(seed: int, k: int, absent: tuple[int, ...] = ()):
    from tests.conftest import make_dataset

    data = make_dataset(6000, k, seed=seed, absent=absent, noise=0.2, signal=1.5)
    rec, state = scan_block(data.labels, data.pred_probs, 0, ScoreSpec())
    return rec, state.finalize()


@pytest.mark.parametrize("k, absent", [(3, ()), (7, (2, 5)), (120, ()), (2000, ())])
def test_outlook_bounds_the_off_diagonal_count_from_above(k, absent):
    """The bucket gathered with pass two's count must hold the T lowest
    scores, so the outlook's count may be too high but never too low, and
    too high by at most the rows of one bin per class; its states merge
    exactly, however the rows are split."""
    from dask_labelissues.states import CountState, OutlookState

    rec, thresholds = _outlook_records(k, k, absent)
    # Rows exactly at a threshold's edge count (>=): put some there.
    rows = np.flatnonzero(rec["pred"] != rec["label"])[:50]
    rec["p_pred"][rows] = (thresholds - kernels.FLOATING_POINT_COMPARISON)[rec["pred"][rows]]
    outlook = OutlookState.chunk(rec, k)
    bins = OutlookState.n_bins(k)
    assert outlook.off_diagonal.shape == (k, bins) and outlook.off_diagonal.size * 8 <= 1 << 18
    for t in (thresholds, np.full(k, 2.0), np.full(k, kernels.THRESHOLD_FLOOR), np.random.default_rng(k).random(k)):
        exact = CountState.chunk(rec, t).finalize("off_diagonal")
        bound = outlook.count_bounds(t)[1]
        # The slack: rows below their class's threshold in that threshold's bin.
        off = rec["pred"] != rec["label"]
        p, c = rec["p_pred"][off], rec["pred"][off]
        edge = t - kernels.FLOATING_POINT_COMPARISON
        same_bin = OutlookState._bin(p, bins) == OutlookState._bin(edge, bins)[c]
        assert exact <= bound == exact + int(np.count_nonzero(same_bin & (p < edge[c])))
        assert outlook.count_bounds(t) == (exact - int(np.count_nonzero(same_bin & (p >= edge[c]))), bound)
        assert CountState.off_diagonal_total(rec, t).finalize("off_diagonal") == exact
    parts = [OutlookState.chunk(rec[a:b], k) for a, b in ((0, 1), (1, 2500), (2500, 2500), (2500, 6000))]
    merged = OutlookState.combine(parts)
    np.testing.assert_array_equal(merged.off_diagonal, outlook.off_diagonal)
    np.testing.assert_array_equal(merged.digits.dense(), outlook.digits.dense())
    np.testing.assert_array_equal(outlook.digits.dense(), HistogramState.chunk(rec["score"], 0, 0).dense())


def test_outlook_of_bad_values_does_not_fail():
    """Bad input is reported by pass one's threshold state; the outlook of
    the same block must not raise first."""
    from dask_labelissues.states import OutlookState

    rec, thresholds = _outlook_records(3, 4)
    rec["p_pred"][:4] = [np.nan, np.inf, -1.0, 7.0]
    outlook = OutlookState.chunk(rec, 4)
    assert outlook.off_diagonal.sum() == np.count_nonzero(rec["pred"] != rec["label"])
    assert outlook.count_bounds(thresholds)[1] >= 0


@pytest.mark.parametrize("cap", [None, 3])
def test_outlook_bucket_covers_the_selection_and_narrows_exactly(monkeypatch, cap):
    """The rows of the outlook's bucket, narrowed to the bucket the
    selection ends on, are exactly (and in the order of) what a gather of
    that bucket from the blocks would return."""
    from dask_labelissues import states
    from dask_labelissues.states import CountState, OutlookState, Winners, narrow_prefix, prefix_winners

    if cap is not None:
        monkeypatch.setattr(states, "CANDIDATE_CAP", cap)
    rec, thresholds = _outlook_records(11, 9)
    rec["score"] = np.round(rec["score"], 3)  # ties, across blocks too
    n = rec.size
    starts = [0, 1000, 1001, 4000]
    bounds = list(zip(starts, [*starts[1:], n]))
    outlook = OutlookState.combine([OutlookState.chunk(rec[a:b], 9) for a, b in bounds])
    bucket = outlook.bucket(thresholds, n)
    if cap is not None:
        assert bucket is None  # too many rows share the bound's bucket
        return
    assert bucket is not None
    scores = rec["score"].astype(np.float64)
    held = Winners.combine([prefix_winners(rec[a:b], scores[a:b], *bucket, a) for a, b in bounds])
    target = CountState.chunk(rec, thresholds).finalize("off_diagonal")
    assert 0 < target <= held.index.size
    keys = kernels.score_keys(scores)
    for shift in (48, 32, 16):
        # The prefix of the target-th lowest key, and one below it.
        kth = np.sort(keys)[target - 1] >> np.uint64(shift)
        for prefix in (int(kth), int(kth) - 1):
            fresh = Winners.combine([prefix_winners(rec[a:b], scores[a:b], shift, prefix, a) for a, b in bounds])
            narrowed = narrow_prefix(held, bucket, shift, prefix)
            for field in ("index", "score", "label", "reduce"):
                np.testing.assert_array_equal(getattr(narrowed, field), getattr(fresh, field))
    # Rows the held ones need not include are never answered from them.
    assert narrow_prefix(held, bucket, bucket[0], bucket[1] + 1) is None
    assert narrow_prefix(held, bucket, 64, 0) is None
