"""Every accepted input kind, and clear errors for bad input."""

from __future__ import annotations

import warnings

import dask.array as da
import h5py
import numpy as np
import pytest
import zarr

from dask_labelissues import find_label_issues, find_label_issues_batched

from .conftest import make_dataset

BACKENDS = ["dask", "threads", "fork", "serial"]


@pytest.fixture(scope="module")
def data():
    return make_dataset(5000, 6, seed=31, dtype=np.float32)


@pytest.fixture(scope="module")
def reference(data):
    return find_label_issues(data.labels, data.pred_probs, backend="serial", chunk_rows=5000).compute()


def _check(result, reference):
    result = result.compute()
    np.testing.assert_array_equal(result.issues, reference.issues)
    np.testing.assert_array_equal(result.label_quality_scores, reference.label_quality_scores)
    np.testing.assert_array_equal(result.confident_thresholds, reference.confident_thresholds)


@pytest.fixture(scope="module")
def stores(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "labels.npy", data.labels)
    np.save(d / "probs.npy", data.pred_probs)
    zarr.create_array(str(d / "labels.zarr"), data=data.labels, chunks=(700,))
    zarr.create_array(str(d / "probs.zarr"), data=data.pred_probs, chunks=(700, 6))
    zarr.create_array(str(d / "labels2.zarr"), data=data.labels, chunks=(900,), zarr_format=2)
    zarr.create_array(str(d / "probs2.zarr"), data=data.pred_probs, chunks=(900, 6), zarr_format=2)
    with h5py.File(d / "data.h5", "w") as f:
        f.create_dataset("labels", data=data.labels, chunks=(500,))
        f.create_dataset("group/probs", data=data.pred_probs, chunks=(500, 6))
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_npy_paths_and_memmaps(stores, reference, backend):
    _check(
        find_label_issues(str(stores / "labels.npy"), str(stores / "probs.npy"), backend=backend, chunk_rows=1100),
        reference,
    )
    labels = np.load(stores / "labels.npy", mmap_mode="r")
    probs = np.load(stores / "probs.npy", mmap_mode="r")
    _check(find_label_issues(labels, probs, backend=backend, chunk_rows=1300), reference)


def test_memmap_row_slice_reads_the_right_rows(stores, data):
    probs = np.load(stores / "probs.npy", mmap_mode="r")[1000:4000]
    labels = np.load(stores / "labels.npy", mmap_mode="r")[1000:4000]
    expected = find_label_issues(
        data.labels[1000:4000], data.pred_probs[1000:4000].copy(), backend="serial"
    )
    for backend in BACKENDS:
        _check(find_label_issues(labels, probs, backend=backend, chunk_rows=777), expected.compute())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["", "2"])
def test_zarr_arrays(stores, reference, backend, fmt):
    labels = zarr.open_array(str(stores / f"labels{fmt}.zarr"), mode="r")
    probs = zarr.open_array(str(stores / f"probs{fmt}.zarr"), mode="r")
    _check(find_label_issues(labels, probs, backend=backend), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hdf5_datasets(stores, reference, backend):
    with h5py.File(stores / "data.h5", "r") as f:
        _check(find_label_issues(f["labels"], f["group/probs"], backend=backend), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dask_arrays_and_lists(data, reference, backend):
    probs = da.from_array(data.pred_probs, chunks=(800, 3))
    with pytest.warns(UserWarning, match="class axis") if backend == "dask" else warnings.catch_warnings():
        result = find_label_issues(list(data.labels), probs, backend=backend)
    _check(result, reference)


def _straight_from(kind, stores):
    """A (labels, pred_probs) pair of dask arrays made straight from Zarr arrays."""
    if kind == "from_zarr":
        return (da.from_zarr(str(stores / "labels.zarr"), chunks=100),
                da.from_zarr(str(stores / "probs.zarr"), chunks=(100, 3)))
    fmt = "2" if kind == "zarr2" else ""
    return (da.from_array(zarr.open_array(str(stores / f"labels{fmt}.zarr"), mode="r"), chunks=300),
            da.from_array(zarr.open_array(str(stores / f"probs{fmt}.zarr"), mode="r"), chunks=(300, 6),
                          asarray=False, fancy=False, lock=True))


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("kind", ["from_zarr", "zarr", "zarr2"])
def test_dask_arrays_straight_from_zarr_are_read_as_the_zarr_array(stores, reference, backend, kind):
    """``da.from_zarr``, or ``da.from_array`` of a Zarr array: the job reads
    the stored rows in its own blocks (chunks split along the classes need
    no rechunking then), with the same result, and its outputs stay lazy
    on the Dask engine."""
    from dask_labelissues import inputs

    labels, probs = _straight_from(kind, stores)
    assert isinstance(inputs.stored_rows(labels), inputs.ZarrArray)
    assert isinstance(inputs.stored_rows(probs), inputs.ZarrArray)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rechunking of the class axis
        result = find_label_issues(labels, probs, backend=backend)
    assert isinstance(result.is_label_issue, da.Array) == (backend in ("auto", "dask"))
    _check(result, reference)


def test_a_job_on_a_dask_array_straight_from_zarr_has_no_key_a_chunk(stores, reference):
    import dask
    from dask.callbacks import Callback

    def keys(rows: int) -> int:
        seen = []
        labels = da.from_zarr(str(stores / "labels.zarr"), chunks=rows)
        probs = da.from_zarr(str(stores / "probs.zarr"), chunks=(rows, 6))
        with dask.config.set(scheduler="threads"), Callback(start=lambda dsk: seen.append(len(dsk))):
            _check(find_label_issues(labels, probs), reference)
        return sum(seen)

    assert keys(50) == keys(2500)


def test_other_dask_arrays_are_not_taken_for_their_store(stores, data):
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from dask_labelissues import inputs

    stored = da.from_zarr(str(stores / "probs.zarr"), chunks=(1000, 6))
    graph = stored.__dask_graph__()
    keys = [k for (k,) in stored.__dask_keys__()]
    tasks = [graph.layers[stored.name][k] for k in keys]
    # The same two layers, the chunks' tasks in reverse order: not the store's rows.
    swapped = da.Array(
        HighLevelGraph({**graph.layers, stored.name: MaterializedLayer(dict(zip(keys, reversed(tasks))))},
                       graph.dependencies),
        stored.name, stored.chunks, dtype=stored.dtype,
    )
    with h5py.File(stores / "data.h5", "r") as h5:
        others = [
            stored + 0,                                    # computed from the store
            stored[::2],                                   # a view of part of it
            stored.rechunk((500, 6)),
            swapped,
            da.from_zarr(str(stores / "probs.zarr"), inline_array=True),  # the store inside each task
            da.from_array(data.pred_probs, chunks=(700, 6)),               # in memory
            # from_array copies a memory map into memory (it has .copy())
            da.from_array(np.load(stores / "probs.npy", mmap_mode="r"), chunks=(700, 6)),
            # read through the open dataset (see test_an_h5py_dataset_is_read_from_its_own_file)
            da.from_array(h5["group/probs"], chunks=(700, 6)),
            da.from_array(zarr.open_array(str(stores / "probs.zarr"), mode="r"), chunks=(700, 6),
                          getitem=lambda a, b: np.asarray(a[b]) * 2),       # a getter of its own
        ]
        assert [inputs.stored_rows(x) for x in others] == [None] * len(others)
    assert inputs.stored_rows(data.pred_probs) is None


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "dask-array"])
@pytest.mark.parametrize("change", ["directory", "file-replaced", "locking-off"])
def test_an_h5py_dataset_is_read_from_its_own_file(tmp_path, monkeypatch, backend, wrap, change):
    """The job reads the file the dataset was opened from: where its name
    now leads to another file (opened by a relative name before the working
    directory changed, or a file moved into place since), or the file was
    opened with other flags (``locking=False``), through the open dataset."""
    made = {d: make_dataset(900, 4, seed=s, dtype=np.float32) for d, s in (("a", 1), ("b", 2))}
    for d, data in made.items():
        (tmp_path / d).mkdir()
        with h5py.File(tmp_path / d / "data.h5", "w") as f:
            f.create_dataset("l", data=data.labels)
            f.create_dataset("p", data=data.pred_probs)
    monkeypatch.chdir(tmp_path / "a")
    with h5py.File("data.h5", "r", **({"locking": False} if change == "locking-off" else {})) as f:
        labels, probs = f["l"], f["p"]
        if wrap:
            labels, probs = da.from_array(labels, chunks=300), da.from_array(probs, chunks=(300, 4))
        if change == "directory":
            monkeypatch.chdir(tmp_path / "b")
        elif change == "file-replaced":
            (tmp_path / "b" / "data.h5").replace(tmp_path / "a" / "data.h5")
        got = find_label_issues(labels, probs, backend=backend).compute()
    expected = find_label_issues(made["a"].labels, made["a"].pred_probs, backend="serial")
    np.testing.assert_array_equal(got.label_quality_scores, expected.label_quality_scores)
    np.testing.assert_array_equal(got.issues, expected.issues)


def test_unsigned_labels(data, reference):
    _check(find_label_issues(data.labels.astype(np.uint8), data.pred_probs, backend="dask"), reference)


def test_cleanlab_compatible_function_takes_zarr3(stores, reference):
    labels = zarr.open_array(str(stores / "labels.zarr"), mode="r")
    probs = zarr.open_array(str(stores / "probs.zarr"), mode="r")
    # cleanlab 2.9 fails here with "object of type 'Array' has no len()".
    issues = find_label_issues_batched(labels=labels, pred_probs=probs, batch_size=1000, verbose=False)
    np.testing.assert_array_equal(issues, reference.issues)


def test_from_array_does_not_copy_memmap(stores, monkeypatch):
    """dask.array.from_array copies anything with .copy(); our sources hide it."""
    calls = []
    original = np.memmap.copy

    def spy(self, *a, **k):
        calls.append(self.shape)
        return original(self, *a, **k)

    monkeypatch.setattr(np.memmap, "copy", spy)
    probs = np.load(stores / "probs.npy", mmap_mode="r")
    labels = np.load(stores / "labels.npy", mmap_mode="r")
    find_label_issues(labels, probs, backend="dask", chunk_rows=1000).compute()
    assert not [s for s in calls if len(s) == 2 and s[0] == probs.shape[0]]


# -- bad input -----------------------------------------------------------------

def _bad(n=2000, k=4):
    d = make_dataset(n, k, seed=41)
    return d.labels.copy(), d.pred_probs.copy()


def _value_cases():
    cases = []
    labels, probs = _bad()
    probs[1234, 2] = np.nan
    cases.append(("nan", labels, probs, r"pred_probs\[1234, 2\] = nan is not finite"))
    labels, probs = _bad()
    probs[77, 0] = np.inf
    cases.append(("inf", labels, probs, r"pred_probs\[77, 0\] = inf is not finite"))
    labels, probs = _bad()
    probs[1500, 3] = -0.25
    cases.append(("negative", labels, probs, r"pred_probs\[1500, 3\] = -0.25 is negative"))
    labels, probs = _bad()
    probs[999] *= 1.2
    cases.append(("row sum", labels, probs, r"pred_probs row 999 sums to 1.2\d*, off 1 by more than 0.001"))
    labels, probs = _bad()
    labels[1801] = 4
    cases.append(("label too big", labels, probs, r"labels\[1801\] = 4 is not a class index in 0..3"))
    labels, probs = _bad()
    labels[3] = -1
    cases.append(("label -1", labels, probs, r"labels\[3\] = -1 is not a class index in 0..3"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _value_cases(), ids=lambda c: c[0])
def test_bad_values_name_row_and_value(case, backend):
    _, labels, probs, message = case
    with pytest.raises(ValueError, match=message):
        find_label_issues(labels, probs, backend=backend, chunk_rows=300, n_jobs=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_bad_row_is_reported_whatever_block_fails_first(backend):
    labels, probs = _bad(6000)
    probs[5990, 1] = np.nan  # last block
    probs[12, 0] = -1.0  # first block
    labels[3000] = 99
    with pytest.raises(ValueError, match=r"pred_probs\[12, 0\] = -1.0 is negative"):
        find_label_issues(labels, probs, backend=backend, chunk_rows=100, n_jobs=2)


def test_unnormalized_rows_accepted_on_purpose():
    labels, probs = _bad()
    normalized = find_label_issues(labels, probs, backend="serial")
    probs *= 3.0
    result = find_label_issues(labels, probs, backend="serial", row_sum_tolerance=None)
    # Scaled rows scale every score and threshold alike (up to rounding and
    # the absolute 1e-6 of near ties): on these rows, the same issues.
    assert result.num_issues > 0
    np.testing.assert_array_equal(result.issues, normalized.issues)
    with pytest.raises(ValueError, match="sums to 3"):
        find_label_issues(labels, probs, backend="serial")


@pytest.mark.parametrize(
    "labels,probs,exc,message",
    [
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), TypeError, "labels must be integer class indices, got dtype float64"),
        (np.array([0, 1], dtype=object), np.full((2, 2), 0.5), TypeError, "labels has object dtype"),
        (np.array([0, 1]), np.full((2, 2), 0.5).astype(object), TypeError, "pred_probs has object dtype"),
        (np.array([0, 1]), np.full((2, 2), 1, dtype=np.int64), TypeError, "pred_probs must be floating point"),
        (np.array([0, 1, 1]), np.full((2, 2), 0.5), ValueError, "labels has 3 rows but pred_probs has 2"),
        (np.array([0, 1]), np.full(2, 0.5), ValueError, r"pred_probs must be 2-D \(N, K\), got shape \(2,\)"),
        (np.array([0, 0]), np.ones((2, 1)), ValueError, "at least 2 classes"),
        (np.zeros(0, dtype=int), np.zeros((0, 3)), ValueError, r"no rows \(N = 0\)"),
        (np.zeros((2, 1), dtype=int), np.full((2, 2), 0.5), ValueError, "labels must be 1-D"),
    ],
)
def test_bad_shapes_and_types(labels, probs, exc, message):
    for backend in BACKENDS:
        with pytest.raises(exc, match=message):
            find_label_issues(labels, probs, backend=backend)


def test_bad_settings():
    labels, probs = _bad(100)
    with pytest.raises(ValueError, match="method='margin' is not one of"):
        find_label_issues(labels, probs, method="margin")
    with pytest.raises(ValueError, match="not supported for method='confidence_weighted_entropy'"):
        find_label_issues(labels, probs, method="confidence_weighted_entropy", adjust_pred_probs=True)
    with pytest.raises(ValueError, match="estimation_method='x'"):
        find_label_issues(labels, probs, estimation_method="x")
    with pytest.raises(ValueError, match="backend='gpu'"):
        find_label_issues(labels, probs, backend="gpu")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        find_label_issues(labels, probs, chunk_rows=0)
    with pytest.raises(FileNotFoundError, match="no such file: /nonexistent.npy"):
        find_label_issues("/nonexistent.npy", probs)


# -- edge cases found in review ------------------------------------------------

def test_fortran_ordered_npy_path(data, reference, tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(data.pred_probs))
    for backend in BACKENDS:
        _check(find_label_issues(data.labels, str(tmp_path / "f.npy"), backend=backend, chunk_rows=900), reference)


def test_copy_on_write_memmap_uses_the_edited_data(data, tmp_path):
    np.save(tmp_path / "p.npy", data.pred_probs * 3)
    edited = np.load(tmp_path / "p.npy", mmap_mode="c")
    edited /= 3  # in memory only; the file still holds rows summing to 3
    expected = find_label_issues(data.labels, np.asarray(edited).copy(), backend="serial").compute()
    _check(find_label_issues(data.labels, edited, backend="dask"), expected)


def test_in_memory_hdf5_file(data, reference):
    import io

    with h5py.File(io.BytesIO(), "w") as f:
        f.create_dataset("p", data=data.pred_probs)
        _check(find_label_issues(data.labels, f["p"], backend="serial"), reference)
        _check(find_label_issues(data.labels, f["p"], backend="dask"), reference)


def test_dask_unknown_chunks_are_explained(data):
    probs = da.from_array(data.pred_probs, chunks=(1000, 6))
    filtered = probs[da.from_array(np.ones(data.n, dtype=bool), chunks=1000)]
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"unknown chunk sizes; call pred_probs.compute_chunk_sizes\(\)"):
            find_label_issues(data.labels, filtered, backend=backend)


def test_zero_rows_and_huge_values_rejected_at_any_tolerance():
    labels, probs = _bad(100)
    probs[42] = 0.0
    with pytest.raises(ValueError, match="pred_probs row 42 is all zeros"):
        find_label_issues(labels, probs, backend="serial", row_sum_tolerance=None)
    labels, probs = _bad(100)
    probs[7, 1] = 4e9
    for tolerance in (None, 1e12):
        with pytest.raises(ValueError, match=r"pred_probs\[7, 1\] = 4000000000.0 is too large"):
            find_label_issues(labels, probs, backend="serial", row_sum_tolerance=tolerance)


def test_two_fork_jobs_at_once(data, reference):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(find_label_issues, data.labels, data.pred_probs, backend="fork", n_jobs=2,
                            chunk_rows=700) for _ in range(2)]
        for run in runs:
            _check(run.result(), reference)


def test_remote_npy_reads_byte_ranges(data, reference, tmp_path):
    """A .npy behind an fsspec URL is read by row ranges, not downloaded whole."""
    import fsspec

    from dask_labelissues.inputs import RemoteNpy

    np.save(tmp_path / "p.npy", data.pred_probs)
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/p.npy", (tmp_path / "p.npy").read_bytes())
    src = RemoteNpy("memory://remote/p.npy")
    assert src.shape == data.pred_probs.shape and src.dtype == data.pred_probs.dtype
    np.testing.assert_array_equal(src[10:20], data.pred_probs[10:20])
    np.testing.assert_array_equal(src[(slice(4990, 6000), slice(1, 3))], data.pred_probs[4990:, 1:3])
    with pytest.raises(TypeError, match="contiguous row slices"):
        src[[1, 2]]
    # The in-process schedulers see the same memory filesystem.
    _check(find_label_issues(data.labels, src, backend="serial", chunk_rows=1234), reference)
    _check(find_label_issues(data.labels, "memory://remote/p.npy", backend="dask", chunk_rows=999), reference)


def _likely_mistake(kind: str):
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), 3000)
    labels = rng.integers(0, 4, 3000)
    if kind == "logits":
        probs = np.log(probs) + 1.0  # raw scores: negative, rows far from 1
    elif kind == "scores above 1":
        probs = probs * 3.0 + 0.2
    elif kind == "percentages":
        probs = probs * 100.0
    elif kind == "one-based":
        labels = labels + 1
    return labels, probs


@pytest.mark.parametrize("kind,hint", [
    ("logits", r"is negative: this looks like logits or scores, not probabilities \(apply a softmax\)"),
    ("scores above 1", r"sums to .*: this looks like logits or scores"),
    ("percentages", r"sums to 100\.0\d*, off 1 by more than 0.001: percentages\? divide by 100"),
    ("one-based", r"= 4 is not a class index in 0..3 \(the labels here run from 1 to 4: 1-based labels\? subtract 1\)"),
])
@pytest.mark.parametrize("backend", ["serial", "threads"])
@pytest.mark.parametrize("kernel", ["numpy", "numba"])
def test_errors_name_the_likely_cause(kind, hint, backend, kernel, monkeypatch):
    from dask_labelissues import fused

    if kernel == "numpy":
        monkeypatch.setenv("DASK_LABELISSUES_KERNEL", "numpy")
    else:
        fused._kernels("auto")  # loaded: small jobs then take the numba loop too
    labels, probs = _likely_mistake(kind)
    with pytest.raises(ValueError, match=hint):
        find_label_issues(labels, probs, backend=backend)


def test_unnormalized_rows_point_at_both_options():
    labels, probs = _likely_mistake("none")
    probs = probs.copy()
    probs[7] *= 0.9
    with pytest.raises(ValueError, match=r"row 7 sums to 0\.9\d*.*row_sum_tolerance=None\) and find --row-sum-tolerance none"):
        find_label_issues(labels, probs, backend="serial")


def test_transposed_pred_probs_are_named():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), 500)
    with pytest.raises(ValueError, match=r"pred_probs transposed\? use pred_probs.T"):
        find_label_issues(rng.integers(0, 3, 500), probs.T)


def test_a_missing_hdf5_dataset_lists_the_datasets_there(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros(10, dtype=np.int64))
        f.create_dataset("model/probs", data=np.full((10, 2), 0.5))
    with pytest.raises(ValueError, match=r"has no dataset '/probs'; it holds /labels, /model/probs"):
        find_label_issues(f"{path}:/labels", f"{path}:/probs")
