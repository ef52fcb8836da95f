"""The numba kernel and the pure-numpy kernel give the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dask_labelissues import find_label_issues, fused

from .conftest import make_dataset

SETTINGS = [
    dict(),
    dict(method="normalized_margin"),
    dict(method="normalized_margin", adjust_pred_probs=True),
    dict(method="self_confidence", adjust_pred_probs=True, estimation_method="off_diagonal_calibrated"),
    dict(method="confidence_weighted_entropy"),
    dict(filter_by="prune_by_noise_rate"),
    dict(filter_by="both", return_indices_ranked_by="normalized_margin"),
    dict(filter_by="low_normalized_margin"),
    dict(filter_by="confident_learning"),
]

DIGEST = """
import hashlib, sys, numpy as np
from dask_labelissues import find_label_issues, fused
from dask_labelissues.engines import blocks
# Small as the data are, the kernel the environment names runs.
blocks.NUMBA_MIN_CELLS = 0
data = np.load(sys.argv[1])
labels, probs = data["labels"], data["probs"]
for settings in {settings!r}:
    r = find_label_issues(labels, probs, backend="serial", chunk_rows=777, **settings).compute()
    h = hashlib.sha256()
    cj = r.confident_joint if r.confident_joint is not None else np.zeros(0)
    for a in (r.issues, r.label_quality_scores, r.is_label_issue, r.confident_thresholds,
              r.predicted_label, np.array([r.estimated_num_issues]), cj):
        h.update(np.ascontiguousarray(a).tobytes())
    print(h.hexdigest())
print("numba" if fused.numba_loaded() else "numpy")
"""


def _digests(path, kernel):
    env = dict(os.environ, DASK_LABELISSUES_KERNEL=kernel)
    out = subprocess.run([sys.executable, "-c", DIGEST.format(settings=SETTINGS), str(path)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    *digests, ran = out.stdout.split()
    return [ran, *digests]


def test_numba_is_the_default_kernel():
    assert fused.kernel_name() == "numba"
    assert fused.kernel_name("numpy") == "numpy"


def test_numba_and_numpy_kernels_agree(tmp_path):
    # 9 classes: every row keeps every other class; 30: rows keep 8.
    for dtype, k in ((np.float32, 9), (np.float64, 9), (np.float32, 30)):
        data = make_dataset(6000, k, seed=71, dtype=dtype)
        np.savez(tmp_path / "d.npz", labels=data.labels, probs=data.pred_probs)
        fast = _digests(tmp_path / "d.npz", "numba")
        slow = _digests(tmp_path / "d.npz", "numpy")
        assert fast[0] == "numba" and slow[0] == "numpy"
        assert fast[1:] == slow[1:]


def test_scan_rows_paths_agree_on_edge_rows():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(6), size=500).astype(np.float32)
    probs[:50, 2] = probs[:50, 4]  # ties for the argmax
    probs[50:60] = 1 / 6
    labels = rng.integers(0, 6, 500)
    fast = fused.scan_rows(probs, labels, True, "numba")
    slow = fused.scan_rows(probs, labels, True, "numpy")
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    ref = np.add.accumulate(probs.astype(np.float64), axis=1)[:, -1]
    np.testing.assert_array_equal(fast[4], ref)


def test_joint_rows_paths_agree_on_edge_rows():
    rng = np.random.default_rng(6)
    for k, m in ((6, 5), (40, 8), (40, 1)):
        probs = rng.dirichlet(np.full(k, 0.3), size=600).astype(np.float32)
        probs[:40, 1] = probs[:40, 3]  # ties
        probs[40:60] = np.float32(1 / k)  # all equal
        labels = rng.integers(0, k, 600)
        pred = probs.argmax(axis=1)
        cut = rng.uniform(0.05, 0.6, k)
        cells = {kernel: np.zeros((2, k * k), dtype=np.int64) for kernel in ("numba", "numpy")}
        fast = fused.joint_rows(probs, labels, pred, cut, m, "numba", cells["numba"])
        slow = fused.joint_rows(probs, labels, pred, cut, m, "numpy", cells["numpy"])
        for kernel, out in (("numba", fast), ("numpy", slow)):
            # The cells each path counts are those of its own outputs.
            guess, cand, margin = out[0], out[2], out[3]
            counted = guess >= 0
            np.testing.assert_array_equal(
                cells[kernel][0], np.bincount(labels[counted] * k + guess[counted], minlength=k * k)
            )
            rows, slots = np.nonzero(margin > 0)
            np.testing.assert_array_equal(
                cells[kernel][1], np.bincount(labels[rows] * k + cand[rows, slots], minlength=k * k)
            )
        assert cells["numba"][0].sum() > 0 and cells["numba"][1].sum() > 0
        for name, a, b in zip(("guess", "max_other", "cand", "margin", "bound"), fast, slow):
            if name == "cand":  # equal probabilities may keep different classes
                continue
            np.testing.assert_array_equal(a, b, err_msg=name)
        kept = fast[2][:, 0] >= 0
        # the kept margins are p_j - p_label of the kept classes, in float32
        own = probs[np.arange(600), labels]
        rows = np.flatnonzero(kept)
        np.testing.assert_array_equal(
            fast[3][rows], probs[rows[:, None], fast[2][rows]] - own[rows, None]
        )
        # the bound covers every class not kept
        for i in range(600):
            others = np.delete(np.arange(k), labels[i])
            missing = np.setdiff1d(others, fast[2][i])
            if missing.size:
                assert (probs[i, missing] - own[i]).max() <= fast[4][i]


def test_small_workers_get_the_numpy_kernel_and_the_same_result(monkeypatch):
    from dask_labelissues import api
    from dask_labelissues.engines import dask as dask_engine
    from dask_labelissues.engines import blocks

    # Out of the way: the rule that gives small jobs the numpy kernel anyway.
    monkeypatch.setattr(blocks, "NUMBA_MIN_CELLS", 0)
    data = make_dataset(5000, 7, seed=72)
    seen = []
    original = api.run

    def spy(engine, spec, **kwargs):
        seen.append(engine.plan.spec.kernel)
        return original(engine, spec, **kwargs)

    monkeypatch.setattr(api, "run", spy)
    monkeypatch.setattr(dask_engine, "cluster_workers", lambda client: (300 * 2**20, 2))
    small = find_label_issues(data.labels, data.pred_probs, backend="dask")
    monkeypatch.setattr(dask_engine, "cluster_workers", lambda client: (None, 2))
    default = find_label_issues(data.labels, data.pred_probs, backend="dask")
    assert seen == ["numpy", "auto"]
    np.testing.assert_array_equal(small.issues, default.issues)


def _edge_block(dtype, k=7, n=3000, seed=9):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k) * 0.3, size=n).astype(dtype)
    probs[:40, 1] = probs[:40, 3]  # argmax ties
    probs[40:60] = dtype(1 / k)  # flat rows
    labels = rng.integers(0, k, n)
    # Near ties of the label with the argmax, within the 1e-6 margin.
    rows = np.arange(60, 120)
    top = probs[rows].argmax(axis=1)
    probs[rows, labels[rows]] = probs[rows, top] - dtype(5e-7)
    # Rows sum to 1 again; equal values stay equal.
    probs /= probs.sum(axis=1, keepdims=True, dtype=np.float64).astype(dtype)
    return labels, probs


def _bad_block(dtype, bad, k=7, n=3000):
    """:func:`_edge_block` with one bad value of the kind ``bad`` names (None: none)."""
    labels, probs = _edge_block(dtype, k, n)
    if bad == "nan":
        probs[2500, 3] = np.nan
    elif bad == "negative":
        probs[1700, 0] = -0.25
    elif bad == "label":
        labels[1900] = k
    elif bad == "sum":
        probs[2100] *= dtype(1.01)
    elif bad == "zeros":
        probs[800] = 0
    elif bad == "huge":
        probs[1200, 2] = dtype(3e38) if dtype == np.float32 else 1e300
    elif bad == "label -1":
        labels[1900] = -1
    elif bad == "inf":
        probs[2300, 4] = np.inf
    elif bad == "minus zero":  # not bad: -0.0 >= 0
        probs[1000, 6] += probs[1000, 5]
        probs[1000, 5] = -0.0
    return labels, probs


#: The kinds of :func:`_bad_block` that are not bad input.
GOOD = (None, "minus zero")
BAD_KINDS = [None, "nan", "negative", "label", "sum", "zeros", "huge", "label -1", "inf", "minus zero"]


def _same_scans(a, b, bad):
    """Two pass-one scans of a :func:`_bad_block` (records, state) hold the
    same bits, and a problem exactly where the block has a bad value; the
    first one's state."""
    (rec_a, st_a), (rec_b, st_b) = a, b
    # A NaN row's records differ (numpy's argmax takes the NaN, the loop
    # passes over it); the job fails on that row whatever they hold.
    for name in rec_a.dtype.names:
        same = rec_a[name] == rec_b[name]
        if bad == "nan":
            same[2500] = True
        assert same.all(), name
    np.testing.assert_array_equal(st_a.counts, st_b.counts)
    assert st_a.sums.tolist() == st_b.sums.tolist()
    assert st_a.problem == st_b.problem
    assert (st_a.problem is None) == (bad in GOOD)
    return st_a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
@pytest.mark.parametrize("bad", BAD_KINDS)
def test_the_fused_pass_one_loop_gives_the_numpy_paths_bits(dtype, method, bad):
    from dask_labelissues import states
    from dask_labelissues.kernels import ScoreSpec

    labels, probs = _bad_block(dtype, bad)
    numba_spec, numpy_spec = ScoreSpec(method, kernel="numba"), ScoreSpec(method, kernel="numpy")
    assert fused.scan_records(probs, labels, np.empty(len(labels), numba_spec.record_dtype()),
                              method != "self_confidence", 1e-3, 2.0**31, 1e-6, (7, 24, 2.0**-7)) is not None
    st_a = _same_scans(states.scan_block(labels, probs, 1000, numba_spec),
                       states.scan_block(labels, probs, 1000, numpy_spec), bad)
    if bad not in GOOD:
        assert 1000 <= st_a.problem.row < 4000


@pytest.mark.parametrize("k", [128, 1000])
@pytest.mark.parametrize("bad", BAD_KINDS)
def test_the_wide_rows_loop_gives_the_row_by_row_loops_bits(k, bad, monkeypatch):
    """float32 rows of many classes are scanned four at a time, their
    values compared as integers: the same records, sums and first bad row as the
    row-by-row loop and numpy give, with a last group of fewer than four
    rows, ties, -0.0 and every kind of bad value."""
    from dask_labelissues import states
    from dask_labelissues.kernels import ScoreSpec

    dtype = np.float32
    assert k >= fused.RECORDS_WIDE_K  # the wide loop runs unless told not to
    labels, probs = _bad_block(dtype, bad, k, n=3003)
    # Zeros of either sign, in rows that stay good.
    rows = probs[300:340]
    rows[:, 10:20] = 0
    rows /= rows.sum(axis=1, keepdims=True, dtype=np.float64).astype(dtype)
    rows[:, 10:15] = -0.0
    spec = ScoreSpec("self_confidence", kernel="numba")
    wide = states.scan_block(labels, probs, 1000, spec)
    numpy = states.scan_block(labels, probs, 1000, ScoreSpec("self_confidence", kernel="numpy"))
    with monkeypatch.context() as m:
        m.setattr(fused, "RECORDS_WIDE_K", 10**9)
        by_row = states.scan_block(labels, probs, 1000, spec)
    for other in (by_row, numpy):
        _same_scans(wide, other, bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", BAD_KINDS)
def test_the_class_planes_loop_gives_the_row_loops_bits(dtype, bad):
    """Images' pred_probs scanned in place as class planes (30 images of 100
    pixels) give the bits of the row loop (and of numpy) on the same items
    moved to rows."""
    from dask_labelissues import states
    from dask_labelissues.kernels import Planes, ScoreSpec

    labels, rows = _bad_block(dtype, bad)
    planes = np.ascontiguousarray(np.moveaxis(rows.reshape(30, 100, 7), -1, 1))
    view = Planes(planes)
    np.testing.assert_array_equal(view.items(), rows)
    spec = ScoreSpec("self_confidence", kernel="numba")
    assert fused.scan_planes(planes, labels, np.empty(len(labels), spec.record_dtype()), 1e-3, 2.0**31, 1e-6,
                             (7, 24, 2.0**-7)) is not None
    planes.setflags(write=False)  # as memory-mapped blocks are
    got = [states.scan_block(labels, view, 1000, spec)]
    got += [states.scan_block(labels, rows, 1000, ScoreSpec("self_confidence", kernel=k)) for k in ("numba", "numpy")]
    for other in got[1:]:
        _same_scans(got[0], other, bad)


@pytest.mark.parametrize("bad", [b for b in BAD_KINDS if b != "huge"])
def test_float16_class_planes_are_scanned_by_the_loop_with_numpys_bits(bad, monkeypatch):
    """float16 images (segmentation models often store half precision) go
    to the class planes loop as float32, with the bits numpy gives on the
    same planes, the first bad pixel included."""
    from dask_labelissues import states
    from dask_labelissues.kernels import Planes, ScoreSpec

    labels, rows = _bad_block(np.float32, bad)
    rows = rows.astype(np.float16)
    planes = np.ascontiguousarray(np.moveaxis(rows.reshape(30, 100, 7), -1, 1))
    scanned = []
    original = fused.scan_planes
    monkeypatch.setattr(fused, "scan_planes", lambda p, *a, **k: scanned.append(p.dtype) or original(p, *a, **k))
    scans = [states.scan_block(labels, Planes(planes), 1000, ScoreSpec("self_confidence", kernel=k))
             for k in ("numba", "numpy")]
    assert scanned == [np.float32]
    _same_scans(*scans, bad)


@pytest.mark.parametrize("estimation", ["off_diagonal", "off_diagonal_calibrated"])
@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
def test_the_fused_pass_two_loop_gives_the_numpy_paths_values(method, estimation):
    from dask_labelissues import states
    from dask_labelissues.kernels import FLOATING_POINT_COMPARISON, ScoreSpec

    labels, probs = _edge_block(np.float32)
    numba_spec = ScoreSpec(method, estimation_method=estimation, kernel="numba")
    numpy_spec = ScoreSpec(method, estimation_method=estimation, kernel="numpy")
    rec, _ = states.scan_block(labels, probs, 0, numpy_spec)
    # Scores the keys must order like floats: both zeros, a negative, NaN.
    rec["score"][:4] = [0.0, -0.0, -0.5, np.nan]
    thresholds = np.bincount(rec["label"], weights=rec["p_pred"], minlength=probs.shape[1])
    thresholds /= np.maximum(np.bincount(rec["label"], minlength=probs.shape[1]), 1)
    # A row exactly at its class's cut is confident, as in the numpy path.
    rec["p_pred"][10] = thresholds[rec["pred"][10]] - FLOATING_POINT_COMPARISON
    assert fused.score_records(rec, thresholds, np.empty(len(rec)), 16, "numba") is not None
    out = np.full(len(rec), -7.0)
    sc_a, st_a = states.score_block(rec, thresholds, numba_spec, out=out)
    sc_b, st_b = states.score_block(rec, thresholds, numpy_spec)
    assert sc_a is out
    np.testing.assert_array_equal(sc_a, sc_b)
    for name in ("prune", "norm", "n"):
        np.testing.assert_array_equal(getattr(st_a.counts, name), getattr(st_b.counts, name))
    if estimation == "off_diagonal":
        # Only the total is counted, as one pseudo-class: the per-class
        # count's total, which the calibrated estimate's state also holds.
        calibrated = ScoreSpec(method, estimation_method="off_diagonal_calibrated")
        per_class = states.score_block(rec, thresholds, calibrated)[1].counts
        assert st_a.counts.prune.tolist() == [per_class.prune.sum()]
        assert st_a.counts.finalize(estimation) == per_class.prune.sum() > 0
    else:
        assert st_a.counts.norm.sum() > st_a.counts.prune.sum() > 0
        assert st_a.counts.prune.shape == (probs.shape[1],)
    np.testing.assert_array_equal(st_a.first_digits.digits, st_b.first_digits.digits)
    np.testing.assert_array_equal(st_a.first_digits.counts, st_b.first_digits.counts)


CACHED_CALL = """
import numpy as np
from dask_labelissues import states
from dask_labelissues.kernels import ScoreSpec
probs = np.full((4, 5), 0.2, dtype=np.float32)
rec, _ = states.scan_block(np.zeros(4, dtype=np.int64), probs, 0, ScoreSpec(kernel="numba"))
states.score_block(rec, np.full(5, 0.2), ScoreSpec(kernel="numba"))
"""


def test_a_new_process_loads_the_kernel_from_numbas_cache(tmp_path):
    """The first call in each new process must find the kernel numba
    compiled before, not compile (and cache) it again."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    entries = []
    for _ in range(3):
        subprocess.run([sys.executable, "-c", CACHED_CALL], env=env, check=True, timeout=300)
        entries.append(sorted(p.name for p in tmp_path.rglob("*.nbc")))
    assert entries[0], "numba cached nothing"
    assert entries[1] == entries[0] and entries[2] == entries[0]


def test_the_selection_loops_pick_the_rows_the_numpy_keys_pick(monkeypatch):
    from dask_labelissues import kernels, states

    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")  # loads numba
    rng = np.random.default_rng(3)
    scores = rng.random(20_000)
    scores[:6] = [0.0, -0.0, np.nan, -0.5, 0.25, 0.25]
    scores[100:200] = 0.25
    reduce = rng.random(scores.size) < 0.1
    keys = kernels.score_keys(scores)
    for shift, row in [(48, 4), (60, 3), (1, 7), (0, 4)]:
        prefix = int(keys[row] >> np.uint64(shift))
        want = (keys >> np.uint64(shift)) <= np.uint64(prefix)
        assert 0 < want.sum() < scores.size
        np.testing.assert_array_equal(fused.prefix_mask(scores, shift, prefix), want)
    cutoff = int(kernels.score_keys(np.array([0.25]))[0])
    dropped = np.flatnonzero(reduce)  # selected or not: rows outside the top set are skipped
    for quota in [0, 1, 50, 102, 500]:
        selected = kernels.selected_rows(keys, cutoff, quota)
        want = selected & ~reduce
        np.testing.assert_array_equal(fused.issue_mask(scores, cutoff, quota, dropped), want)
        np.testing.assert_array_equal(fused.issue_mask(scores, cutoff, quota, np.flatnonzero(reduce & selected)), want)
        out = np.ones(scores.size, dtype=bool)
        assert fused.issue_mask(scores, cutoff, quota, dropped, out=out) is out
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(states.issue_mask_block(scores, cutoff, quota, dropped), want)
        with monkeypatch.context() as m:
            m.setattr(fused, "issue_mask", lambda *args, **kwargs: None)  # the numpy path
            np.testing.assert_array_equal(states.issue_mask_block(scores, cutoff, quota, dropped), want)
    assert fused.issue_mask(scores[:0], cutoff, 3, dropped[:0]).shape == (0,)
    for outside in ([scores.size], [-1]):
        with pytest.raises(IndexError, match="outside the block"):
            states.issue_mask_block(scores, cutoff, 0, np.array(outside))


def test_the_radix_order_is_numpys_stable_order():
    from dask_labelissues import kernels

    loaded = fused.numba_loaded()
    assert (fused.key_order(np.zeros(3, dtype=np.uint64)) is None) == (not loaded)
    assert fused.numba_loaded() == loaded  # asking does not load numba
    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")  # loads numba
    rng = np.random.default_rng(11)
    scores = np.round(rng.random(30_000), 3)
    scores[:5] = [0.0, -0.0, np.nan, -np.inf, np.inf]
    cases = {
        "full range": rng.integers(0, 2**64 - 1, 20_000, dtype=np.uint64),
        "low bits only": rng.integers(0, 1 << 9, 20_000).astype(np.uint64) | np.uint64(5 << 40),
        "high bits only": rng.integers(0, 16, 20_000).astype(np.uint64) << np.uint64(60),
        "a bit on each digit's edge": np.uint64(1) << rng.integers(0, 64, 20_000).astype(np.uint64),
        "score keys with ties": kernels.score_keys(scores),
        "all equal": np.full(1000, 7, dtype=np.uint64),
        "one": np.array([3], dtype=np.uint64),
        "none": np.zeros(0, dtype=np.uint64),
    }
    for name, keys in cases.items():
        got = fused.key_order(keys)
        assert got is not None
        np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"), err_msg=name)


BLAS_AFTER_KERNELS = """
import sys
import numpy as np
from dask_labelissues import fused
fused.scan_rows(np.full((4, 5), 0.2), np.zeros(4, dtype=np.int64), kernel="numba")
print("loaded-scipy-linalg", "scipy.linalg" in sys.modules)
import numba
import numba.np.arraymath as arraymath
print("have-blas", arraymath._HAVE_BLAS)

@numba.njit
def dot(a, b):
    return np.dot(a, b)

a = np.arange(12.0).reshape(3, 4)
assert np.array_equal(dot(a, a.T), a @ a.T)
print("blas-after", "scipy.linalg" in sys.modules)
"""


def test_loading_the_kernels_skips_scipy_but_numba_blas_still_works(tmp_path):
    """With scipy installed, numba's one-off BLAS probe would import
    scipy.linalg on the first call; the kernels skip it, and numba code that
    uses BLAS afterwards still gets it."""
    pytest.importorskip("scipy")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", BLAS_AFTER_KERNELS], env=env, check=True, timeout=300,
                         capture_output=True, text=True).stdout.split()
    assert out == ["loaded-scipy-linalg", "False", "have-blas", "True", "blas-after", "True"]


@pytest.mark.parametrize("k", [4, fused.EXPONENT_SUMS_MAX_K + 1])
@pytest.mark.parametrize("planes", [False, True])
def test_float32_sums_by_exponent_are_the_limbs_exact_totals(planes, k):
    """The loops add float32 values by binary exponent and spread the sums
    over the limbs once a block: the class totals must be the integers the
    per-value limbs give, for values at every exponent (subnormals and
    values below the sums' unit, which the limbs cut; values of 1 to 2 and
    of 2 or more, unnormalized rows being allowed without a tolerance; and
    many equal values, whose sums carry across limbs)."""
    from dask_labelissues import states
    from dask_labelissues.kernels import Planes, ScoreSpec

    rng = np.random.default_rng(4)
    # Past EXPONENT_SUMS_MAX_K classes the loops cut every value into limbs.
    n = 6000
    exponents = rng.integers(-149, 3, size=(n, k)).astype(np.float64)
    probs = (rng.random((n, k)) * 2.0**exponents).astype(np.float32)
    probs[:500] = np.float32(0.7)  # sums that carry
    probs[500:520] = np.float32(1e-45)  # the smallest subnormal, below the unit
    probs[520:540] = np.float32(1.5)
    probs[540:560] = np.float32(3.0e5)
    probs[560:580, 1:] = 0  # zeros beside a value (a row of zeros is refused)
    labels = rng.integers(0, k, n)
    labels[560:570] = 2
    spec, reference = ScoreSpec("self_confidence", row_sum_tolerance=None, kernel="numba"), ScoreSpec(
        "self_confidence", row_sum_tolerance=None, kernel="numpy")
    view = Planes(np.ascontiguousarray(np.moveaxis(probs.reshape(60, 100, k), -1, 1))) if planes else probs
    _, got = states.scan_block(labels, view, 0, spec)
    _, want = states.scan_block(labels, probs, 0, reference)
    assert got.problem is None and want.problem is None
    assert [int(x) for x in got.sums] == [int(x) for x in want.sums]
    np.testing.assert_array_equal(got.counts, want.counts)


WARM_UP = """
import numpy as np
from dask_labelissues import fused, pipelines
from dask_labelissues.kernels import ScoreSpec
pipelines.warm_up(ScoreSpec(kernel="numba"), None, 5, np.float32)
names = ["scan", "limbs", "joint", "records", "scored", "select", "key_order"]
print(",".join(n for n, k in zip(names, fused._NUMBA) if not k.signatures))
"""


def test_warm_up_loads_every_kernel_a_rows_job_runs_in_its_workers():
    """The fork engine's workers inherit what warm_up loaded; a kernel it
    skips is loaded again by every worker of every job."""
    out = subprocess.run([sys.executable, "-c", WARM_UP], capture_output=True, text=True, timeout=300, check=True)
    skipped = set(out.stdout.strip().split(",")) - {""}
    # limbs and joint serve the numpy path's sums and the filters' joints.
    assert skipped <= {"limbs", "joint", "scan"}, skipped
    assert "key_order" not in skipped and "scored" not in skipped and "records" not in skipped


def test_group_selections_merge_as_numpys_sort_merges_them():
    """The numba merge of per-group selections keeps the rows, in the
    order, that sorting every candidate again keeps: ties (equal keys in
    one state and across states, -0.0 against 0.0) go to the lower row,
    groups past their limit, empty states and groups of no rows included."""
    from dask_labelissues.filters import GroupTop

    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")  # loads numba
    rng = np.random.default_rng(8)
    for trial in range(30):
        n_groups = int(rng.integers(1, 40))
        limits = rng.integers(0, 60, n_groups)
        states, start = [], 0
        for _ in range(int(rng.integers(1, 18))):
            n = int(rng.integers(0, 400))
            group = rng.integers(0, n_groups, n)
            key = -np.round(rng.random(n), 1 if trial % 2 else 6)  # coarse keys: many ties
            if trial % 3 == 0:  # keys of float32 pred_probs stay float32
                key = key.astype(np.float32)
            key[rng.random(n) < 0.05] = 0.0
            key[rng.random(n) < 0.05] = -0.0
            states.append(GroupTop.chunk(group, key, np.arange(start, start + n), limits))
            start += n + int(rng.integers(0, 3))
        merged = GroupTop.combine(states)
        edges = np.cumsum([0] + [s.index.size for s in states])
        keys = np.concatenate([s.key for s in states])
        assert fused.merge_top(
            np.concatenate([s.group for s in states]), keys, np.concatenate([s.index for s in states]), edges, limits
        ) is not None
        assert merged.group.dtype == np.int32 and merged.key.dtype == keys.dtype
        # numpy's path: every candidate sorted again.
        want = GroupTop._top(
            np.concatenate([s.group for s in states]), np.concatenate([s.key for s in states]),
            np.concatenate([s.index for s in states]), limits, None, True,
        )
        reference = GroupTop._top(
            np.concatenate([s.group for s in states]), np.concatenate([s.key for s in states]),
            np.concatenate([s.index for s in states]), limits, None, False,
        )
        for got in (merged, want):
            np.testing.assert_array_equal(got.group, reference.group)
            np.testing.assert_array_equal(got.index, reference.index)
            np.testing.assert_array_equal(got.key, reference.key)


def test_a_state_out_of_order_falls_back_to_sorting():
    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")
    values = np.array([0.5, -0.25])
    rows = np.array([10, 11])
    assert fused.merge_top(np.zeros(2, dtype=np.int32), values, rows, np.array([0, 2]), np.array([2])) is None
    got = fused.merge_top(np.zeros(2, dtype=np.int32), values, rows, np.array([0, 1, 2]), np.array([2]))
    np.testing.assert_array_equal(got[2], [11, 10])
    np.testing.assert_array_equal(got[1], [-0.25, 0.5])
    # NaN after every number; -0.0 and 0.0 tie, to the earlier state.
    for dtype in (np.float64, np.float32):
        values = np.array([np.nan, 0.0, -0.0, 1.0], dtype=dtype)
        got = fused.merge_top(
            np.zeros(4, dtype=np.int32), values, np.arange(4), np.array([0, 1, 2, 3, 4]), np.array([4])
        )
        np.testing.assert_array_equal(got[2], [1, 2, 3, 0])
        assert got[1].dtype == dtype


def test_selection_candidates_of_float32_data_are_held_in_4_byte_keys_groups_and_rows():
    """A candidate of float32 pred_probs holds a float32 key, an int32
    group and an int32 row (12 bytes, not 24), also after a merge with a
    block that had none, whose empty state has float64 keys; rows from
    2**31 on are int64."""
    from dask_labelissues.filters import GroupTop, _empty_top

    limits = np.array([2, 3])
    key = np.array([-0.5, -0.25, -0.75], dtype=np.float32)
    state = GroupTop.chunk(np.array([0, 1, 1]), key, np.array([4, 5, 6]), limits)
    assert (state.group.dtype, state.key.dtype, state.index.dtype) == (np.int32, np.float32, np.int32)
    merged = GroupTop.combine([_empty_top(limits), state, _empty_top(limits)])
    assert (merged.group.dtype, merged.key.dtype, merged.index.dtype) == (np.int32, np.float32, np.int32)
    np.testing.assert_array_equal(merged.index, [4, 6, 5])
    far = GroupTop.chunk(np.array([0, 1]), key[:2], np.array([2**31 - 1, 2**31]), limits)
    assert far.index.dtype == np.int64
    merged = GroupTop.combine([state, far])
    assert merged.index.dtype == np.int64
    np.testing.assert_array_equal(merged.index, [4, 2**31 - 1, 6, 5, 2**31])


def test_the_mask_of_a_block_past_2_31_rows_takes_rows_held_as_int32():
    """Selected rows all below 2**31 are int32; a block that starts past
    them (numpy 2 refuses int32 minus such a start) flags none of its own."""
    from dask_labelissues.filters import MaskRule, mask_block

    rec = np.zeros(3, dtype=[("label", "i4"), ("pred", "i4"), ("reduce", "?")])
    rule = MaskRule("prune_by_noise_rate", (np.array([5, 2**31 - 2], dtype=np.int32),))
    np.testing.assert_array_equal(mask_block(rule, rec, None, 2**31 - 3), [False, True, False])
    np.testing.assert_array_equal(mask_block(rule, rec, None, 2**31 + 7), [False, False, False])


def test_the_chunk_selection_ranks_keys_by_radix_as_numpy_does():
    from dask_labelissues import filters, kernels

    fused.scan_rows(np.full((2, 2), 0.5), np.zeros(2, dtype=np.int64), kernel="numba")
    rng = np.random.default_rng(9)
    n = kernels.RADIX_MIN_ROWS * 3
    group = rng.integers(0, 50, n)
    key = -np.round(rng.random(n), 3)
    key[::7] = -0.0
    limits = rng.integers(0, 400, 50)
    fast = filters.GroupTop.chunk(group, key, np.arange(n), limits)
    slow = filters.GroupTop._top(group, key, np.arange(n), limits, None, False)
    np.testing.assert_array_equal(fast.index, slow.index)
    np.testing.assert_array_equal(fast.group, slow.group)


BOUNDS_CHECKED = r"""
import numpy as np
from dask_labelissues import fused
rng = np.random.default_rng(1)
for k, m in ((3, 2), (20, 8), (20, 0)):
    probs = rng.dirichlet(np.full(k, 0.3), size=500).astype(np.float32)
    labels = rng.integers(0, k, 500)
    cut = rng.uniform(0.05, 0.6, k)
    for cells in (None, np.zeros((2, k * k), dtype=np.int64)):
        fused.joint_rows(probs, labels, probs.argmax(axis=1), cut, m, "numba", cells)
group = np.sort(rng.integers(0, 5, 300))
values = rng.random(300)
order = np.lexsort((values, group))
for g, v in ((group, values), (group.astype(np.int32), values.astype(np.float32))):
    assert fused.merge_top(g[order], v[order], order, np.array([0, 300]), np.full(5, 40)) is not None
fused.key_order(rng.integers(0, 1 << 62, 9000).astype(np.uint64))
for k in (2, 5):
    probs = rng.dirichlet(np.full(k, 0.5), size=400).astype(np.float32)
    labels = rng.integers(0, k, 400)
    counts = fused.pair_buckets(probs, labels, 64)
    groups = np.where(rng.random(k * k) < 0.7, np.arange(k * k), -1)
    low = rng.integers(0, 66, k * k)
    fused.pair_buckets(probs, labels, 64, (groups, low, rng.random(k * k).astype(np.float32), np.full(k * k, 200)), 0)
    fused.boundary_pairs(probs, labels, 64, groups, low)
print("ok")
"""


def test_the_selection_and_joint_kernels_stay_in_bounds(tmp_path):
    """The kernels compiled with numba's bounds checks: an index out of
    bounds raises there, where the cached build would write past an array."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", BOUNDS_CHECKED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 40), (2, 3), (63, 7), (64, 7), (257, 100), (33, 1000), (300, 1000)])
def test_row_sums_are_the_sequential_sums(dtype, shape):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    probs = (rng.random(shape) * 10.0 ** rng.integers(-30, 3, shape)).astype(dtype)
    if probs.size > 4:
        probs.flat[[1, 2]] = [np.nan, np.inf]
        probs[-1] = -0.0  # a sum of -0.0 alone stays -0.0
    want = np.add.accumulate(probs, axis=1, dtype=np.float64)[:, -1] if shape[1] else np.zeros(shape[0])
    got = fused.row_sums(probs)
    assert got.dtype == np.float64
    assert got.tobytes() == want.tobytes()
    # And as numba's kernel adds them, read-only and strided inputs too.
    view = np.asfortranarray(probs)
    view.flags.writeable = False
    assert fused.row_sums(view).tobytes() == want.tobytes()
    if shape[1]:
        every_other = probs[:, ::2]
        strided = np.add.accumulate(every_other, axis=1, dtype=np.float64)[:, -1]
        assert fused.row_sums(every_other).tobytes() == strided.tobytes()
    if shape[0] and shape[1]:
        numba_sum = fused.scan_rows(probs, np.zeros(shape[0], dtype=np.int64), kernel="numba")[4]
        assert numba_sum.tobytes() == want.tobytes()
