"""pred_probs is read from storage exactly once (twice for the adjusted margin)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from dask_labelissues import find_label_issues

from .conftest import make_dataset


class CountingArray:
    """An array-like that counts the bytes it serves.

    The counter is shared memory created before any fork, so reads made by
    fork-engine workers are counted too.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.served = mp.get_context("fork").Value("q", 0)

    def __getitem__(self, key):
        out = np.asarray(self.array[key])
        with self.served.get_lock():
            self.served.value += out.nbytes
        return out


@pytest.mark.parametrize("backend", ["dask", "fork", "serial"])
@pytest.mark.parametrize(
    "settings,reads",
    [
        (dict(), 1),
        (dict(method="normalized_margin"), 1),
        (dict(method="confidence_weighted_entropy", estimation_method="off_diagonal_calibrated"), 1),
        (dict(method="self_confidence", adjust_pred_probs=True), 1),
        (dict(method="normalized_margin", adjust_pred_probs=True), 2),
    ],
    ids=["default", "margin", "cwe-calibrated", "sc-adjusted", "margin-adjusted"],
)
def test_pred_probs_bytes_served(backend, settings, reads):
    data = make_dataset(12000, 8, seed=51, dtype=np.float32)
    probs = CountingArray(data.pred_probs)
    labels = CountingArray(data.labels)
    result = find_label_issues(labels, probs, backend=backend, chunk_rows=1000, n_jobs=2, **settings)
    result.compute()
    assert result.num_issues > 0
    assert probs.served.value == reads * data.pred_probs.nbytes
    assert labels.served.value == reads * data.labels.nbytes


def test_dask_runs_each_block_task_once(monkeypatch):
    """Persisting records and the threshold state together must not run the
    pass-one kernel twice per block (graph fusion would)."""
    from dask_labelissues import states

    calls = []
    original = states.scan_block

    def counting(labels, probs, start, spec):
        calls.append(start)
        return original(labels, probs, start, spec)

    monkeypatch.setattr(states, "scan_block", counting)
    data = make_dataset(10000, 5, seed=52)
    find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000).compute()
    assert sorted(calls) == list(range(0, 10000, 1000))


@pytest.mark.parametrize("storage", ["npy", "zarr"])
def test_dask_scan_tasks_read_file_inputs_themselves(tmp_path, monkeypatch, storage):
    """With files or stores as input, each pass-one task reads its own rows
    (no separate read tasks), and every row of pred_probs is read once."""
    import zarr

    from dask_labelissues import inputs
    from dask_labelissues.engines import dask as engine

    data = make_dataset(12000, 8, seed=53, dtype=np.float32)
    if storage == "npy":
        np.save(tmp_path / "labels.npy", data.labels)
        np.save(tmp_path / "probs.npy", data.pred_probs)
        labels, probs, cls = str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy"), inputs.RawFile
    else:
        for name, values, chunks in (("labels", data.labels, (3000,)), ("probs", data.pred_probs, (3000, 8))):
            z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=values.shape, chunks=chunks,
                                  dtype=values.dtype)
            z[...] = values
        labels, probs, cls = str(tmp_path / "labels.zarr"), str(tmp_path / "probs.zarr"), inputs.ZarrArray

    served, ranges = [0], []
    original_getitem = cls.__getitem__

    def counting_getitem(self, key):
        out = original_getitem(self, key)
        if out.ndim == 2:
            served[0] += out.nbytes
        return out

    original_scan = engine.scan_block

    def recording_scan(labels, probs, start, spec, stop=None, *rest):
        ranges.append((start, stop))
        return original_scan(labels, probs, start, spec, stop, *rest)

    monkeypatch.setattr(cls, "__getitem__", counting_getitem)
    monkeypatch.setattr(engine, "scan_block", recording_scan)
    result = find_label_issues(labels, probs, backend="dask", chunk_rows=5000).compute()
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial").compute()
    np.testing.assert_array_equal(result.issues, reference.issues)
    assert sorted(ranges) == [(0, 5000), (5000, 10000), (10000, 12000)]
    assert served[0] == data.pred_probs.nbytes


def test_dask_scan_tasks_take_small_sources_inline(tmp_path, monkeypatch):
    """File sources that pickle small go into each scan task, which then
    depends on nothing (no task per source to run and fetch first); with
    more copies than ``INLINE_BYTES`` allows they are one key each.  Both
    ways read the same rows and give the same result."""
    from dask_labelissues.engines import dask as engine

    data = make_dataset(12000, 8, seed=54, dtype=np.float32)
    np.save(tmp_path / "labels.npy", data.labels)
    np.save(tmp_path / "probs.npy", data.pred_probs)
    scan_deps = []
    original_persist = engine.DaskDriver._persist

    def recording_persist(self, blocks, wanted):
        deps = engine.merged_graph([*blocks, *wanted]).get_all_dependencies()
        scans = [key for key in deps if isinstance(key, tuple) and str(key[0]).startswith("scan_block-")]
        scan_deps.append([set(deps[key]) for key in scans])
        return original_persist(self, blocks, wanted)

    def run():
        return find_label_issues(str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy"),
                                 backend="dask", chunk_rows=5000)

    monkeypatch.setattr(engine.DaskDriver, "_persist", recording_persist)
    inline = run()
    monkeypatch.setattr(engine, "INLINE_BYTES", 0)
    keyed = run()
    assert [len(d) for d in scan_deps[0]] == [0, 0, 0]
    # The two sources and the spec, one key each, shared by the three tasks.
    assert [len(d) for d in scan_deps[1]] == [3, 3, 3] and len(set.union(*scan_deps[1])) == 3
    np.testing.assert_array_equal(inline.issues, keyed.issues)
    np.testing.assert_array_equal(inline.compute().label_quality_scores, keyed.compute().label_quality_scores)
