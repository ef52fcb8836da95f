"""pred_probs is read from storage exactly once (twice for the adjusted margin)."""

from __future__ import annotations

import multiprocessing as mp
import weakref

import dask
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


def write_inputs(tmp_path, data, storage: str, chunk_rows: int) -> tuple[str, str, type]:
    """The dataset's labels and pred_probs as ``.npy`` files, Zarr stores or
    HDF5 datasets (row chunks of ``chunk_rows``): the two paths as the API
    takes them, and the row source class that reads them."""
    from dask_labelissues import inputs

    k = data.pred_probs.shape[1]
    if storage == "npy":
        np.save(tmp_path / "labels.npy", data.labels)
        np.save(tmp_path / "probs.npy", data.pred_probs)
        return str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy"), inputs.RawFile
    if storage == "zarr":
        import zarr

        shapes = (("labels", data.labels, (chunk_rows,)), ("probs", data.pred_probs, (chunk_rows, k)))
        for name, values, chunks in shapes:
            z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=values.shape, chunks=chunks,
                                  dtype=values.dtype)
            z[...] = values
        return str(tmp_path / "labels.zarr"), str(tmp_path / "probs.zarr"), inputs.ZarrArray
    import h5py

    with h5py.File(tmp_path / "data.h5", "w") as f:
        f.create_dataset("labels", data=data.labels, chunks=(chunk_rows,))
        f.create_dataset("probs", data=data.pred_probs, chunks=(chunk_rows, k))
    return f"{tmp_path / 'data.h5'}:/labels", f"{tmp_path / 'data.h5'}:/probs", inputs.HDF5Dataset


def record_reads(monkeypatch, cls: type) -> dict[int, list[tuple[int, int]]]:
    """Every read of a ``cls`` source from now on, as ``(start, stop)`` rows,
    by the number of dimensions read (1: labels, 2: pred_probs)."""
    reads: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
    original_getitem = cls.__getitem__

    def recording_getitem(self, key):
        out = original_getitem(self, key)
        rows = key[0] if isinstance(key, tuple) else key
        reads[out.ndim].append(rows.indices(self.shape[0])[:2])
        return out

    monkeypatch.setattr(cls, "__getitem__", recording_getitem)
    return reads


@pytest.mark.parametrize("backend", ["dask", "threads", "fork", "serial"])
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

    def counting(labels, probs, start, spec, out=None):
        calls.append(start)
        return original(labels, probs, start, spec, out)

    monkeypatch.setattr(states, "scan_block", counting)
    data = make_dataset(10000, 5, seed=52)
    find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000).compute()
    assert sorted(calls) == list(range(0, 10000, 1000))


@pytest.mark.parametrize("storage", ["npy", "zarr"])
def test_dask_scan_tasks_read_file_inputs_themselves(tmp_path, monkeypatch, storage):
    """With files or stores as input, each pass-one task reads its own rows
    (no separate read tasks), and every row of pred_probs is read once."""
    from dask_labelissues import pipelines

    data = make_dataset(12000, 8, seed=53, dtype=np.float32)
    labels, probs, cls = write_inputs(tmp_path, data, storage, 3000)

    reference = find_label_issues(data.labels, data.pred_probs, backend="serial").compute()
    reads, ranges = record_reads(monkeypatch, cls), []
    original_scan = pipelines.scan_block

    def recording_scan(block, *rest, **kwargs):
        # A reader of rows the task slices itself, not chunks read by other tasks.
        assert not isinstance(block._probs, list)
        ranges.append((block.start, block.stop))
        return original_scan(block, *rest, **kwargs)

    monkeypatch.setattr(pipelines, "scan_block", recording_scan)
    result = find_label_issues(labels, probs, backend="dask", chunk_rows=5000).compute()
    np.testing.assert_array_equal(result.issues, reference.issues)
    assert sorted(ranges) == [(0, 5000), (5000, 10000), (10000, 12000)]
    served = sum(b - a for a, b in reads[2]) * data.pred_probs[0].nbytes
    assert served == data.pred_probs.nbytes


def test_dask_scan_tasks_take_small_sources_inline(tmp_path, monkeypatch):
    """File sources that pickle small go into each scan task, which then
    depends on nothing (no task per source to run and fetch first); with
    more copies than ``INLINE_BYTES`` allows they are one key each.  Both
    ways read the same rows and give the same result."""
    from dask_labelissues.engines import dask as engine

    data = make_dataset(12000, 8, seed=54, dtype=np.float32)
    labels, probs, _ = write_inputs(tmp_path, data, "npy", 12000)
    scan_deps = []
    original_run = engine.DaskEngine._run

    def recording_run(self, blocks, wanted):
        deps = engine.merged_graph([*blocks, *wanted]).get_all_dependencies()
        scans = [key for key in deps if isinstance(key, tuple) and str(key[0]).startswith("scan_block-")]
        if scans:
            scan_deps.append([set(deps[key]) for key in scans])
        return original_run(self, blocks, wanted)

    def run():
        return find_label_issues(labels, probs, backend="dask", chunk_rows=5000)

    monkeypatch.setattr(engine.DaskEngine, "_run", recording_run)
    inline = run()
    monkeypatch.setattr(engine, "INLINE_BYTES", 0)
    keyed = run()
    assert [len(d) for d in scan_deps[0]] == [0, 0, 0]
    # The two sources and the spec, one key each, shared by the three tasks.
    assert [len(d) for d in scan_deps[1]] == [3, 3, 3] and len(set.union(*scan_deps[1])) == 3
    np.testing.assert_array_equal(inline.issues, keyed.issues)
    np.testing.assert_array_equal(inline.compute().label_quality_scores, keyed.compute().label_quality_scores)


def test_piece_bounds_cut_on_the_grid_of_the_read_size():
    from dask_labelissues.engines.blocks import piece_bounds

    assert piece_bounds(0, 1000, 400) == [(0, 400), (400, 800), (800, 1000)]
    # A block that starts off the grid is cut at the next multiple, so no
    # piece shares a storage chunk with another piece of the block.
    assert piece_bounds(300, 1300, 400) == [(300, 400), (400, 800), (800, 1200), (1200, 1300)]
    assert piece_bounds(400, 800, 400) == [(400, 800)]
    assert piece_bounds(5, 17, None) == [(5, 17)]


def test_dask_block_rows():
    from dask_labelissues.engines.blocks import dask_block_rows

    # (a): 2,000,000 x 100 float32 in 131,072-row chunks, 2 worker threads:
    # 16 pieces, 4 blocks of 4.
    assert dask_block_rows(2_000_000, 131072, 400, 32, 2) == 4 * 131072
    # At least two blocks a thread: 3 threads, 16 pieces in 8 blocks; 5
    # threads, in 16; 9 pieces on 2 threads in 5 blocks (5 and 4 pieces a
    # thread, as with blocks of one; blocks of 3 would make it 6 and 3).
    assert dask_block_rows(2_000_000, 131072, 400, 32, 3) == 2 * 131072
    assert dask_block_rows(2_000_000, 131072, 400, 32, 5) == 131072
    assert dask_block_rows(9 * 131072, 131072, 400, 32, 2) == 2 * 131072
    # At most MAX_PIECES_PER_BLOCK, however few the threads.
    assert dask_block_rows(10_000_000, 131072, 400, 32, 1) == 4 * 131072
    # Records (32 bytes a row) may not outweigh a piece of pred_probs: with
    # 8 float32 classes, 32 bytes a row, one piece; with 16, two.
    assert dask_block_rows(2_000_000, 131072, 32, 32, 1) == 131072
    assert dask_block_rows(2_000_000, 131072, 64, 32, 1) == 2 * 131072
    # No threads known (a cluster still starting): one piece a block.
    assert dask_block_rows(2_000_000, 131072, 400, 32, 0) == 131072


def test_blocks_read_in_tasks_are_balanced_over_the_threads():
    from dask_labelissues.engines.blocks import BlockConfig, plan_blocks
    from dask_labelissues.kernels import ScoreSpec

    # (c): 10,000,000 x 100 float32 in 131,072-row chunks, 2 worker threads:
    # pieces of one chunk; 20 blocks, larger first, of 4 pieces and of 3
    # (the last ends inside one), not 19 of 4 and one of 38,528 rows, which
    # left a worker idle for a block's length at the end of pass one.
    chunk = 131072
    config = BlockConfig(n_rows=10_000_000, row_bytes=400, record_bytes=32, spec=ScoreSpec(), cells=10**9,
                         storage_rows=chunk, reads_in_tasks=True, threads=2)
    assert plan_blocks(config).chunks == (4 * chunk,) * 17 + (3 * chunk,) * 2 + (10_000_000 - 74 * chunk,)


@pytest.mark.parametrize("bad_piece", [0, 1])
def test_a_block_scanned_in_pieces_equals_one_scan(bad_piece):
    """Records and state of a block scanned piece by piece are those of one
    scan of the block, bad rows included (the first one is reported)."""
    from dask_labelissues.engines.blocks import BlockReader
    from dask_labelissues.kernels import ScoreSpec
    from dask_labelissues.pipelines import scan_block

    data = make_dataset(3000, 40, seed=55, dtype=np.float32)
    probs = data.pred_probs.copy()
    probs[1700, 3] = np.nan
    probs[400 + 1000 * bad_piece, 5] = -1.0
    spec = ScoreSpec()
    whole = scan_block(BlockReader(data.labels, probs, 300, 2900), spec, False)
    pieces = scan_block(BlockReader(data.labels, probs, 300, 2900, read_rows=512), spec, False)
    for field in whole.data.dtype.names:  # not the bytes: the records have padding
        np.testing.assert_array_equal(whole.data[field], pieces.data[field])
    np.testing.assert_array_equal(whole.state.counts, pieces.state.counts)
    np.testing.assert_array_equal(whole.state.sums, pieces.state.sums)
    assert whole.state.rows == pieces.state.rows == 2600
    assert whole.state.problem == pieces.state.problem
    assert pieces.state.problem.row == (400 if bad_piece == 0 else 1400)


def test_a_block_scanned_in_pieces_holds_one_piece_at_a_time():
    """Each piece of pred_probs is freed before the next is read: a task
    holds one piece, not two, however many its block has."""
    from dask_labelissues.engines.blocks import BlockReader
    from dask_labelissues.kernels import ScoreSpec
    from dask_labelissues.pipelines import scan_block

    class Source:
        """Rows read as new arrays, counting at each read the earlier ones
        still alive."""

        def __init__(self, values):
            self.values, self.given, self.alive_at_read = values, [], []

        def __getitem__(self, rows):
            self.alive_at_read.append(sum(ref() is not None for ref in self.given))
            piece = self.values[rows].copy()
            self.given.append(weakref.ref(piece))
            return piece

    data = make_dataset(3000, 40, seed=57, dtype=np.float32)
    source = Source(data.pred_probs)
    pieces = scan_block(BlockReader(data.labels, source, 300, 2900, read_rows=512), ScoreSpec(), False)
    # Cut at multiples of 512: 300, 512, 1024, ..., 2560, 2900.
    assert source.alive_at_read == [0] * 6
    whole = scan_block(BlockReader(data.labels, data.pred_probs, 300, 2900), ScoreSpec(), False)
    np.testing.assert_array_equal(whole.state.counts, pieces.state.counts)


@pytest.mark.parametrize("settings,several,expected_reads", [
    (dict(), True, 1),
    (dict(method="normalized_margin", adjust_pred_probs=True), False, 2),
    # The confident joint's read, and a third for the cells that 40
    # classes' kept candidates do not decide (docs/filters.md).
    (dict(filter_by="prune_by_noise_rate"), False, 3),
    (dict(filter_by="predicted_neq_given"), True, 1),
], ids=["default", "margin-adjusted", "prune_by_noise_rate", "predicted_neq_given"])
def test_dask_blocks_of_several_pieces_read_one_piece_at_a_time(tmp_path, monkeypatch, settings, several,
                                                                expected_reads):
    """With a Zarr input, the Dask engine's automatic blocks hold several
    pieces of the size a block would otherwise have, each read by itself on
    the storage grid, when pass one is the only read of pred_probs; results
    are those of the serial engine."""
    from dask_labelissues.engines import blocks

    data = make_dataset(12000, 40, seed=56, dtype=np.float32)  # 160 bytes a row
    labels, probs, cls = write_inputs(tmp_path, data, "zarr", 200)
    # Pieces of 64 KB: 409 rows, 400 in whole chunks; 30 pieces.
    monkeypatch.setattr(blocks, "TARGET_BLOCK_BYTES", 64 * 2**10)
    reads = record_reads(monkeypatch, cls)
    with dask.config.set(scheduler="threads", num_workers=2):
        lazy = find_label_issues(labels, probs, backend="dask", **settings)
        result = lazy.compute()
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial", **settings).compute()
    np.testing.assert_array_equal(result.issues, reference.issues)
    np.testing.assert_array_equal(result.label_quality_scores, reference.label_quality_scores)
    np.testing.assert_array_equal(result.is_label_issue, reference.is_label_issue)
    # 2 threads, 30 pieces: blocks of at most 4 pieces (30 // 4 = 7, at most
    # 4), 8 of them (a multiple of the threads) as even as whole pieces
    # allow, or one piece a block where pred_probs is read again.
    assert lazy.is_label_issue.chunks[0] == ((1600,) * 6 + (1200,) * 2 if several else (400,) * 30)
    # Every read of pred_probs is one piece of 400 rows on the grid.
    grid = [(a, a + 400) for a in range(0, 12000, 400)]
    assert result.reads == expected_reads
    assert sorted(reads[2]) == sorted(grid * expected_reads)


@pytest.mark.parametrize("storage", ["npy", "zarr", "hdf5"])
def test_blocks_off_the_read_grid_read_each_piece_and_labels_once(tmp_path, monkeypatch, storage):
    """A given chunk_rows off the grid of the read size: every block reads
    pred_probs in pieces cut on that grid and its labels once, with the
    serial engine's result."""
    from dask_labelissues.engines import blocks

    data = make_dataset(5000, 40, seed=57, dtype=np.float32)
    labels, probs, cls = write_inputs(tmp_path, data, storage, 200)
    # Pieces of 64 KB: 409 rows of 160 bytes, 400 where chunks are 200 rows.
    monkeypatch.setattr(blocks, "TARGET_BLOCK_BYTES", 64 * 2**10)
    read_rows = 409 if storage == "npy" else 400
    reads = record_reads(monkeypatch, cls)
    with dask.config.set(scheduler="threads", num_workers=2):
        result = find_label_issues(labels, probs, backend="dask", chunk_rows=1100).compute()
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial").compute()
    np.testing.assert_array_equal(result.issues, reference.issues)
    np.testing.assert_array_equal(result.label_quality_scores, reference.label_quality_scores)
    blocks = [(a, min(a + 1100, 5000)) for a in range(0, 5000, 1100)]
    assert sorted(reads[1]) == blocks
    edges = sorted({0, 5000, *range(0, 5000, read_rows), *(a for a, _ in blocks)})
    assert sorted(reads[2]) == list(zip(edges[:-1], edges[1:]))
