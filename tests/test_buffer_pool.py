"""The one-machine engines write later jobs' columns into the buffers of
earlier ones that nothing uses any more, and never into a result's."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest

from dask_labelissues import find_label_issues
from dask_labelissues.engines.local import BUFFERS, BufferPool, allocate

from .conftest import make_dataset

FIELDS = ("label_quality_scores", "is_label_issue", "given_label", "predicted_label")


def arrays(result):
    return {name: np.array(getattr(result, name)) for name in (*FIELDS, "issues")}


def kept_buffers() -> set[int]:
    return {id(slot.buf) for slot in BUFFERS._slots}


@pytest.mark.parametrize("backend", ["serial", "threads", "fork"])
def test_a_held_result_keeps_its_buffers_and_a_dropped_ones_are_written_again(backend):
    # The fork engine's workers are stopped before its job returns, so its
    # shared columns are written again too, unlike those in use at any
    # other fork (see the last test).
    first_data = make_dataset(n=3000, k=5, seed=1)
    second_data = make_dataset(n=3000, k=5, seed=2)
    kw = dict(backend=backend, chunk_rows=700)
    gc.collect()
    BUFFERS.clear()
    first = find_label_issues(first_data.labels, first_data.pred_probs, **kw)
    before = arrays(first)
    first_buffers = kept_buffers()
    assert first_buffers
    # The first result is held: the second job takes buffers of its own.
    second = find_label_issues(second_data.labels, second_data.pred_probs, **kw)
    for name, values in arrays(first).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    both = kept_buffers()
    assert first_buffers <= both and len(both) == 2 * len(first_buffers)
    expected = arrays(second)
    # Dropped, their buffers (holding their values) are the next job's.
    del first, second
    gc.collect()
    again = find_label_issues(second_data.labels, second_data.pred_probs, **kw)
    assert kept_buffers() == both
    for name, values in arrays(again).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


def held(pool: BufferPool, nbytes: int, kind: tuple = ("private",)) -> tuple[np.ndarray, int]:
    """An array over a new buffer the pool lists, and the buffer's id."""
    buf = mmap.mmap(-1, nbytes)
    pool.adopt(kind, buf)
    return np.frombuffer(buf, dtype=np.uint8), id(buf)


def listed(pool: BufferPool) -> set[int]:
    return {id(slot.buf) for slot in pool._slots}


def test_the_pool_gives_only_free_buffers_of_the_kind_and_size_asked():
    pool = BufferPool(limit=10_000)
    in_use, in_use_id = held(pool, 1000)
    dropped, dropped_id = held(pool, 1000)
    view = dropped[10:20]
    del dropped
    assert pool.take(("private",), 1000) is None  # a view still uses it
    del view
    assert pool.take(("shared",), 1000) is None  # another kind
    assert pool.take(("private",), 400) is None  # more than twice as large
    assert pool.take(("private",), 1001) is None  # too small
    taken = pool.take(("private",), 600)
    assert id(taken) == dropped_id != in_use_id
    # Taken, it is no one else's until let go.
    assert pool.take(("private",), 600) is None


def test_the_pool_lets_go_of_free_buffers_first_then_of_older_ones_in_use():
    pool = BufferPool(limit=2500)
    a, a_id = held(pool, 1000)
    b, b_id = held(pool, 1000)
    del b
    c, c_id = held(pool, 1000)  # over the limit: b, free, goes
    assert listed(pool) == {a_id, c_id}
    d, d_id = held(pool, 1000)  # none free: a, the oldest, goes (it stays a's)
    assert listed(pool) == {c_id, d_id}
    a[:] = 7
    assert a.sum() == 7000
    big = mmap.mmap(-1, 3000)
    pool.adopt(("private",), big)  # larger than the limit: never listed
    assert listed(pool) == {c_id, d_id}


def test_spill_files_count_against_their_own_limit():
    pool = BufferPool(limit=2500)
    memory, memory_id = held(pool, 1000)
    spill = ("file", None)
    f1, f1_id = held(pool, 1000, spill)
    f2, f2_id = held(pool, 1000, spill)  # 3,000 bytes, 2,000 of them files: under each limit
    assert listed(pool) == {memory_id, f1_id, f2_id}
    del f1
    f3, f3_id = held(pool, 1000, spill)  # over the files' limit: the free file goes, not memory
    assert listed(pool) == {memory_id, f2_id, f3_id}
    m2, m2_id = held(pool, 1000)
    m3, m3_id = held(pool, 1000)  # over the memory limit: memory goes, not files
    assert listed(pool) == {m2_id, m3_id, f2_id, f3_id}
    pool.adopt(spill, mmap.mmap(-1, 3000))  # larger than the limit
    assert listed(pool) == {m2_id, m3_id, f2_id, f3_id}


def test_many_small_buffers_make_room_by_count_not_at_a_spill_file_in_use():
    """Many small jobs list many small memory buffers; a spill file a result
    still holds stays listed when the count of slots is over."""
    from dask_labelissues.engines.local import MAX_SLOTS

    pool = BufferPool(limit=10**9)
    spill = ("file", None)
    f1, f1_id = held(pool, 1000, spill)
    small = [held(pool, 10)[1] for _ in range(MAX_SLOTS - 1)]  # their jobs are done: free
    f2, f2_id = held(pool, 1000, spill)
    assert len(pool._slots) == MAX_SLOTS
    assert {f1_id, f2_id} <= listed(pool) and small[0] not in listed(pool)
    busy = [held(pool, 10) for _ in range(2)]  # the count is over with every free slot gone
    assert len(pool._slots) == MAX_SLOTS and f2_id in listed(pool) and busy[1][1] in listed(pool)


def test_shared_buffers_in_use_at_a_fork_are_never_written_again():
    """A process forked while a result held shared memory may still read it
    after this one drops the result; private buffers are the child's own
    copy."""
    import os

    pool = BufferPool(limit=10_000)
    shared, shared_id = held(pool, 1000, ("shared",))
    private, private_id = held(pool, 1000, ("private",))
    dropped, dropped_id = held(pool, 1000, ("shared",))
    del dropped  # free at the fork: kept
    pool.before_fork()
    assert listed(pool) == {private_id, dropped_id}
    del shared, private
    assert id(pool.take(("private",), 1000)) == private_id
    # The process's own pool does so at every fork.
    BUFFERS.clear()
    in_use = allocate(4096, np.uint8, shared=True, spill_dir=None)
    free = allocate(8192, np.uint8, shared=True, spill_dir=None)
    del free
    before = kept_buffers()
    assert len(before) == 2
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child lists none, not even the free one the parent keeps.
        os.write(write, b"%d" % len(BUFFERS._slots))
        os._exit(0)
    os.close(write)
    in_child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert in_child == b"0"
    assert len(kept_buffers()) == 1 and kept_buffers() < before
    del in_use


def test_the_fork_engines_flag_is_the_forking_threads_own():
    """Inside workers_forked(), a fork from another thread still lets go of
    the shared buffers in use."""
    import threading

    pool = BufferPool(limit=10_000)
    shared, shared_id = held(pool, 1000, ("shared",))
    inside = threading.Event()
    done = threading.Event()
    seen = []

    def fork_engine_thread():
        with pool.workers_forked():
            pool.before_fork()  # the engine's own fork keeps it
            seen.append(listed(pool))
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=fork_engine_thread)
    thread.start()
    assert inside.wait(10)
    assert seen == [{shared_id}]
    pool.before_fork()  # another thread's fork
    done.set()
    thread.join(10)
    assert listed(pool) == set()
    del shared


def test_shared_buffers_are_let_go_when_a_fork_worker_cannot_be_stopped(monkeypatch):
    import multiprocessing.process

    data = make_dataset(n=3000, k=5, seed=4)
    gc.collect()
    BUFFERS.clear()
    private = allocate(4096, np.uint8, shared=False, spill_dir=None)
    del private  # free and private: kept
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "is_alive", lambda self: True)
    result = find_label_issues(data.labels, data.pred_probs, backend="fork", chunk_rows=700)
    monkeypatch.undo()
    kinds = {slot.kind[0] for slot in BUFFERS._slots}
    assert kinds == {"private"}
    del result
    gc.collect()
    again = find_label_issues(data.labels, data.pred_probs, backend="fork", chunk_rows=700)
    assert {slot.kind[0] for slot in BUFFERS._slots} >= {"shared"}
    del again
