"""The fork engine's kept workers: jobs on files and stores are sent to
workers forked once, which map each job's inputs and column buffers
themselves and hold only the buffers this process keeps."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from dask_labelissues import find_label_issues
from dask_labelissues.engines import START, fork, make_engine
from dask_labelissues.engines.local import BUFFERS
from dask_labelissues.inputs import RawFile
from dask_labelissues.kernels import ScoreSpec

from .conftest import assert_identical, make_dataset

pytestmark = pytest.mark.skipif(not fork.fork_available(), reason="needs the fork start method")


@pytest.fixture
def files(tmp_path):
    data = make_dataset(6000, 5, seed=51, dtype=np.float32)
    np.save(tmp_path / "labels.npy", data.labels)
    np.save(tmp_path / "probs.npy", data.pred_probs)
    return data, str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy")


@pytest.fixture(autouse=True)
def no_pool_before_or_after():
    fork._stop_pool()
    yield
    fork._stop_pool()


def pool_pids() -> list[int]:
    assert fork._POOL is not None
    return [process.pid for process, _ in fork._POOL.workers]


def test_later_jobs_on_files_and_stores_run_on_the_same_workers(files, tmp_path):
    data, labels, probs = files
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    first = find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    assert_identical(reference, first)
    pids = pool_pids()
    assert len(pids) == 2 and os.getpid() not in pids
    store = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    store.create_array("labels", data=data.labels, chunks=(1000,))
    store.create_array("probs", data=data.pred_probs, chunks=(1000, 5))
    for chunk_rows in (999, None):
        again = find_label_issues(store["labels"], store["probs"], backend="fork", n_jobs=2, chunk_rows=chunk_rows)
        assert_identical(reference, again)
        assert pool_pids() == pids
    # Arrays in memory cannot reach a worker that is already running: the
    # job forks its own, and the kept ones stay.
    in_memory = find_label_issues(data.labels, data.pred_probs, backend="fork", n_jobs=2, chunk_rows=700)
    assert_identical(reference, in_memory)
    assert pool_pids() == pids
    # Another worker count is another pool.
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=3, chunk_rows=700))
    assert len(pool_pids()) == 3 and not set(pool_pids()) & set(pids)


def memfd_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("memfd:dask-labelissues" in line for line in maps)


def settled_mappings(pids: list[int], expected: int) -> list[int]:
    """Each worker's memfd mappings once it has handled the job's end,
    which it is sent as the job returns (waiting at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = [memfd_mappings(pid) for pid in pids]
        if found == [expected] * len(pids) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/<pid>/maps")
def test_kept_workers_unmap_buffers_this_process_no_longer_keeps(files):
    data, labels, probs = files
    gc.collect()
    BUFFERS.clear()
    # Buffers of results still held here: the workers inherit them.
    held = memfd_mappings(os.getpid())
    first = find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    listed = len(BUFFERS.shared_keys())
    assert listed >= 2
    assert settled_mappings(pool_pids(), held + listed) == [held + listed] * 2
    # Let go here, the first job's buffers live on in the workers until
    # the next job ends, which maps buffers of its own (none is free).
    BUFFERS.clear()
    second = find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    assert_identical(first, second)
    assert len(BUFFERS.shared_keys()) == listed
    assert settled_mappings(pool_pids(), held + listed) == [held + listed] * 2
    # Nor do they keep the job's files mapped (a file removed would keep
    # its disk space).
    for pid in pool_pids():
        with open(f"/proc/{pid}/maps") as maps:
            assert not [line for line in maps if probs in line or labels in line]


def test_workers_that_exited_idle_or_were_killed_are_replaced(files, monkeypatch):
    data, labels, probs = files
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    monkeypatch.setattr(fork, "IDLE_SECONDS", 0.2)
    find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    idle = list(fork._POOL.workers)
    for process, _ in idle:
        process.join(10)
        assert process.exitcode == 0
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))
    assert not set(pool_pids()) & {process.pid for process, _ in idle}
    # A worker found alive that is gone by the time it is sent the job.
    monkeypatch.setattr(fork, "IDLE_SECONDS", 60.0)
    fork._stop_pool()
    find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    gone = pool_pids()
    os.kill(gone[1], signal.SIGKILL)
    fork._POOL.workers[1][0].join(10)
    monkeypatch.setattr(fork._Pool, "alive", lambda self: True)
    # That job forks workers of its own; the next one, a new pool.
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))
    assert fork._POOL is None
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))
    assert not set(pool_pids()) & set(gone)


def block_start(start: int) -> int:
    return start


def fail_at_block_two(start: int) -> int:
    if start == 2:
        raise ValueError("block two failed")
    return start


def test_a_failed_stage_stops_the_kept_workers_and_the_next_job_runs(files, tmp_path):
    data, labels, probs = files
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    # Rows refused by the merged states: the workers finished their
    # blocks and are kept.
    bad = data.pred_probs.copy()
    bad[4321, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="4321"):
        find_label_issues(labels, str(tmp_path / "bad.npy"), backend="fork", n_jobs=2, chunk_rows=700)
    kept = pool_pids()
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))
    assert pool_pids() == kept
    # A task that raises in a worker: the others may still be sending
    # results, so the workers are stopped.
    engine, _, _ = make_engine(
        "fork", RawFile.from_npy(labels), RawFile.from_npy(probs), ScoreSpec(), chunk_rows=1, n_jobs=2
    )
    try:
        with pytest.raises(ValueError, match="block two failed"):
            engine.compute(engine.map(fail_at_block_two, START))
    finally:
        engine.close()
    assert fork._POOL is None
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))


class DiesInWorker(RawFile):
    """A file whose blocks, once read, kill any process but the one that
    opened it."""

    def release(self, start: int, stop: int) -> None:
        if os.getpid() != self.parent:
            os._exit(3)
        super().release(start, stop)


def test_a_kept_worker_that_dies_fails_the_job_and_the_next_job_runs(files):
    from concurrent.futures.process import BrokenProcessPool

    data, labels, probs = files
    dying = DiesInWorker.from_npy(probs)
    dying.parent = os.getpid()
    with pytest.raises(BrokenProcessPool):
        find_label_issues(labels, dying, backend="fork", n_jobs=2, chunk_rows=700)
    assert fork._POOL is None
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))


def test_jobs_in_two_threads_at_once_both_run(files):
    """One job holds the kept workers; the other forks its own."""
    data, labels, probs = files
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    results, errors = [], []

    def job() -> None:
        try:
            for _ in range(3):
                results.append(find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=500))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(results) == 6
    for result in results:
        assert_identical(reference, result)
    assert fork._POOL_LOCK.acquire(blocking=False)
    fork._POOL_LOCK.release()


def test_relative_paths_are_read_from_the_callers_working_directory(tmp_path, monkeypatch):
    """Kept workers were forked in another working directory than the
    job's: they read its relative paths from the caller's."""
    results = {}
    for name, seed in (("a", 61), ("b", 62)):
        (tmp_path / name).mkdir()
        data = make_dataset(3000, 4, seed=seed, dtype=np.float32)
        np.save(tmp_path / name / "labels.npy", data.labels)
        np.save(tmp_path / name / "probs.npy", data.pred_probs)
        results[name] = find_label_issues(data.labels, data.pred_probs, backend="serial")
    for name in ("a", "b", "a"):
        monkeypatch.chdir(tmp_path / name)
        got = find_label_issues("labels.npy", "probs.npy", backend="fork", n_jobs=2, chunk_rows=500)
        assert_identical(results[name], got)
    assert memfd_mappings(pool_pids()[0]) > 0  # the kept workers ran them


def test_a_kept_worker_waits_between_its_job_s_stages(files, monkeypatch):
    """The idle limit counts only while a worker has no job."""
    data, labels, probs = files
    monkeypatch.setattr(fork, "IDLE_SECONDS", 0.2)
    engine, _, _ = make_engine(
        "fork", RawFile.from_npy(labels), RawFile.from_npy(probs), ScoreSpec(), chunk_rows=1000, n_jobs=2
    )
    try:
        assert engine.pool is not None
        first = engine.compute(engine.map(block_start, START))
        time.sleep(0.8)
        assert engine.compute(engine.map(block_start, START)) == first
        assert engine.workers == fork._POOL.workers
    finally:
        engine.close()


def test_a_forked_child_leaves_the_kept_workers_alone(files):
    import multiprocessing.util

    data, labels, probs = files
    find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    pids = pool_pids()
    pid = os.fork()
    if pid == 0:  # what multiprocessing does as a child exits normally
        try:
            multiprocessing.util._exit_function()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert fork._POOL.alive()
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    assert_identical(reference, find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700))
    assert pool_pids() == pids


def test_a_store_held_in_memory_is_not_sent_to_the_kept_workers(files, monkeypatch):
    data, labels, probs = files
    find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    pids, sent = pool_pids(), []
    send_job = fork._Pool.send_job

    def spy(self, handles, count, payload):
        sent.append(len(payload))
        return send_job(self, handles, count, payload)

    monkeypatch.setattr(fork._Pool, "send_job", spy)
    monkeypatch.setattr(fork, "JOB_BYTES", 1 << 16)
    store = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    store.create_array("labels", data=data.labels, chunks=(1000,))
    store.create_array("probs", data=data.pred_probs, chunks=(1000, 5))
    got = find_label_issues(store["labels"], store["probs"], backend="fork", n_jobs=2, chunk_rows=700)
    assert_identical(find_label_issues(data.labels, data.pred_probs, backend="serial"), got)
    assert sent == [] and pool_pids() == pids
    # The same arrays in files go to the kept workers, small.
    find_label_issues(labels, probs, backend="fork", n_jobs=2, chunk_rows=700)
    assert len(sent) == 1 and sent[0] < 1 << 16


def test_the_buffer_pool_lists_a_bounded_number_of_buffers():
    from dask_labelissues.engines.local import MAX_SLOTS, BufferPool

    pool = BufferPool(1 << 30)
    for _ in range(MAX_SLOTS + 10):
        pool.adopt(("private",), mmap.mmap(-1, 4096))
    assert len(pool._slots) == MAX_SLOTS
