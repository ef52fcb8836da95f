"""The fork engine: block tasks in worker processes forked from this one.

A task is a function, small arguments and a block index, and a result is
a small state.  The workers write the job's columns (shared buffers) in
place, so no array is pickled.  Each worker owns a contiguous run of
blocks for every stage, so it reads the records it wrote (pages another
worker wrote fault in again).  A worker that dies fails the job with
``BrokenProcessPool`` instead of leaving it waiting.

Workers reach a job in one of two ways:

* Inputs that pickle small (files and stores on disk), where the system
  has memfd: a pool forked once and kept is sent the job.  Each worker
  maps the files and the column buffers (from their descriptors) itself,
  and keeps a buffer mapped while this process keeps it.  Forking for
  every job costs forks, exits and page faults a kept worker pays once.
  A kept worker exits after :data:`IDLE_SECONDS` without a job, holding
  until then what this process held when the pool was forked.
* Other inputs (arrays in memory, a store held in memory, whose pickle
  exceeds :data:`JOB_BYTES`): workers forked at the job's first map,
  which inherit everything and exit when the job ends.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import warnings
import weakref
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import inputs
from .local import BUFFERS, LocalEngine, pool_size, shared_handle

#: Seconds a kept worker waits for its next job before it exits.
IDLE_SECONDS = 60.0

#: The name of every fork engine worker process.
WORKER_NAME = "dask-labelissues-fork-worker"


def _serve(conn: Any, engine: LocalEngine | None) -> None:
    """A worker's loop, for ``engine``'s job (inherited: forked for it), or
    kept (None) for the jobs it is sent.  Requests: ``("job", ...)`` (a kept
    worker's next job), ``("tasks", [...])`` (one ``(ok, value)`` reply per
    task, in order, up to the first that raises), ``("keep", keys)`` (the
    job ended: unmap other buffers).  ``None``, a closed pipe or the
    parent's exit ends it.  Each request is handled in a function of its
    own, so an idle worker holds nothing of the last one."""
    # Ctrl-C reaches the whole process group; the parent reports it and
    # stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mapped: dict[int, mmap.mmap] = {}
    # Later workers inherit earlier ones' ends of their pipes, so a parent
    # that dies does not close them: its sentinel says so.
    parent = mp.parent_process()
    while True:
        try:
            if conn not in wait([conn, parent.sentinel], IDLE_SECONDS if engine is None else None):
                return  # idle, or the parent is gone
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        op, body = request
        del request
        if op == "job":
            engine = _job(conn, body, mapped)
        elif op == "keep":
            engine = None
            mapped = {key: buf for key, buf in mapped.items() if key in body}
        else:
            _tasks(conn, engine, body)
        del body


def _job(conn: Any, body: tuple, mapped: dict[int, mmap.mmap]) -> LocalEngine | None:
    """A kept worker's next job: its new buffers mapped, its engine built
    in the parent's working directory (the job's paths may be relative)."""
    cwd, payload, new = body
    fds: list[int] = []
    if new:
        with _socket(conn) as sock:
            fds = socket.recv_fds(sock, 1, len(new))[1]
    try:
        if len(fds) != len(new):
            raise OSError(f"a kept fork worker received {len(fds)} of the job's {len(new)} buffer descriptors")
        for (key, size), fd in zip(new, fds):
            mapped[key] = mmap.mmap(fd, size)
        os.chdir(cwd)
        labels, pred_probs, plan, kind, columns = pickle.loads(payload)
        engine = LocalEngine(labels, pred_probs, plan, kind=kind)
        engine.columns = [np.frombuffer(mapped[key], dtype=dtype, count=n) for key, dtype, n in columns]
    except BaseException as exc:
        _send(conn, (False, exc))
        return None
    finally:
        for fd in fds:
            os.close(fd)
    _send(conn, (True, None))
    return engine


def _tasks(conn: Any, engine: LocalEngine, tasks: list[tuple]) -> None:
    for task in tasks:
        try:
            reply = (True, engine.call(*task))
        except BaseException as exc:  # sent to the parent, which raises it
            _send(conn, (False, exc))
            return
        _send(conn, reply)


def _send(conn: Any, reply: tuple[bool, Any]) -> None:
    try:
        conn.send(reply)
    except Exception as exc:  # a result or an error that does not pickle
        conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


def _socket(conn: Any) -> socket.socket:
    # A duplicate of the pipe's socket, so closing it leaves the pipe open.
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno()))


def _job_state(engine: LocalEngine, handles: Sequence[tuple[int, int, int]]) -> bytes:
    """What a kept worker needs of a job, pickled: its inputs, blocks, kind
    and columns (as the keys of their buffers' ``handles``), for :func:`_job`."""
    columns = [(key, c.dtype, len(c)) for (key, _, _), c in zip(handles, engine.columns)]
    return pickle.dumps((engine.labels, engine.pred_probs, engine.plan, engine.kind, columns))


#: Largest pickled job sent to kept workers: a store held in memory (a
#: Zarr MemoryStore) pickles whole, and workers forked for the job
#: inherit it instead.
JOB_BYTES = 4 << 20


def _start_workers(count: int, engine: LocalEngine | None) -> list[tuple[Any, Any]]:
    """``count`` forked workers of :func:`_serve`, as ``(process, pipe)``."""
    context = mp.get_context("fork")
    workers: list[tuple[Any, Any]] = []
    try:
        # These workers touch a buffer only in their job's tasks: the buffers stay listed.
        with BUFFERS.workers_forked():
            for _ in range(count):
                parent, child = context.Pipe()
                process = context.Process(target=_serve, args=(child, engine), name=WORKER_NAME, daemon=True)
                process.start()
                child.close()
                workers.append((process, parent))
    except BaseException:
        _stop(workers, kill=True)
        raise
    return workers


def _stop(workers: Sequence[tuple[Any, Any]], kill: bool) -> None:
    """Ask workers to exit (``kill``: terminate them) and wait for them."""
    for process, conn in workers:
        if kill:
            process.terminate()
        else:
            with contextlib.suppress(OSError):
                conn.send(None)
    stuck = False
    for process, conn in workers:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
            stuck = stuck or process.is_alive()
        conn.close()
    if stuck:
        # A worker that outlived SIGKILL (blocked in the kernel) keeps
        # every shared buffer it mapped, and a system call it is in may
        # still touch one: none is written again.
        BUFFERS.drop_shared()


class _Pool:
    """Workers kept for later jobs, and the buffers each has mapped."""

    def __init__(self, size: int) -> None:
        self.workers = _start_workers(size, None)
        self.mapped: list[set[int]] = [set() for _ in self.workers]

    def alive(self) -> bool:
        return all(process.is_alive() for process, _ in self.workers)

    def send_job(self, handles: Sequence[tuple[int, int, int]], count: int, payload: bytes) -> bool:
        """Give the first ``count`` workers the job (``payload``: its
        pickled :func:`_job_state`; ``handles``: its columns' buffers);
        False where one had exited (idle) before it read it."""
        cwd = os.getcwd()
        try:
            for (_, conn), has in zip(self.workers[:count], self.mapped):
                new = [(key, fd, size) for key, fd, size in handles if key not in has]
                conn.send(("job", (cwd, payload, [(key, size) for key, _, size in new])))
                if new:
                    with _socket(conn) as sock:
                        socket.send_fds(sock, [b"\0"], [fd for _, fd, _ in new])
                has.update(key for key, _, _ in new)
            # Every reply is read before one is raised: none is left for
            # the next request.
            replies = [conn.recv() for _, conn in self.workers[:count]]
        except (EOFError, OSError):
            return False
        for ok, value in replies:
            if not ok:
                raise value
        return True

    def end_job(self) -> None:
        keep = BUFFERS.shared_keys()
        for (process, conn), has in zip(self.workers, self.mapped):
            try:
                conn.send(("keep", keep))
            except OSError:  # exited idle (no job of its own): the next job finds it gone
                if process.is_alive():
                    raise
            has &= keep


_POOL: _Pool | None = None
# Held by the job using the pool; a job that finds it taken (another
# thread's) forks workers of its own.
_POOL_LOCK = threading.Lock()


def _stop_pool(kill: bool = False) -> None:
    global _POOL
    if _POOL is not None:
        pool, _POOL = _POOL, None
        _stop(pool.workers, kill)


def _forget_pool() -> None:
    # A forked child holds no pool and no workers: they are its parent's,
    # which multiprocessing would otherwise terminate as the child exits.
    global _POOL, _POOL_LOCK
    mp.process._children -= {p for p in mp.process._children if p.name == WORKER_NAME}
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def fork_available() -> bool:
    """True where the ``fork`` start method exists (not on Windows)."""
    return "fork" in mp.get_all_start_methods()


class ForkEngine(LocalEngine):
    """A :class:`~.local.LocalEngine` whose block tasks run in ``n_jobs``
    forked processes (default: one per usable core).

    ``warm_up``, if given, runs here before any worker gets the job: workers
    forked after it inherit what it loaded (numba's compiled kernels), and
    kept ones load them from numba's cache once.
    """

    shared_columns = True

    def __init__(
        self, labels: Any, pred_probs: Any, *args: Any, n_jobs: int | None = None,
        warm_up: Callable[[], None] | None = None, **kwargs: Any,
    ) -> None:
        self.n_jobs = pool_size(n_jobs)
        self.warm_up = warm_up or (lambda: None)
        self.workers: list[tuple[Any, Any]] = []
        # A stage whose results were not all taken (an error, Ctrl-C): close
        # terminates its workers.
        self.busy = False
        # Taken before this job maps its files and columns, which kept
        # workers forked now would otherwise keep mapped.
        self.pool = self._take_pool() if inputs.reads_in_tasks(labels, pred_probs) else None
        self.descriptors = self.pool is not None
        try:
            super().__init__(labels, pred_probs, *args, **kwargs)
        except BaseException:
            self._release_pool()
            raise

    def _take_pool(self) -> _Pool | None:
        """The kept workers, forked now if there are none; None where
        another job holds them."""
        global _POOL
        if not hasattr(os, "memfd_create") or not _POOL_LOCK.acquire(blocking=False):
            return None
        # Released at close, or when this engine is collected unclosed.
        self._held = weakref.finalize(self, _POOL_LOCK.release)
        try:
            if _POOL is not None and (len(_POOL.workers) != self.n_jobs or not _POOL.alive()):
                _stop_pool()
            if _POOL is None:
                self.warm_up()
                _POOL = _Pool(self.n_jobs)
            return _POOL
        except BaseException:
            self._held()
            raise

    def _start(self) -> None:
        self.warm_up()
        count = len(self._runs())
        if self.pool is not None:
            try:
                handles = [shared_handle(c) for c in self.columns]
                if None not in handles and len(payload := _job_state(self, handles)) <= JOB_BYTES:
                    if self.pool.send_job(handles, count, payload):
                        self.workers = self.pool.workers[:count]
                        return
                    # A kept worker had exited (idle): this job forks its
                    # own, the next one a new pool.
                    _stop_pool(kill=True)
            except BaseException:
                _stop_pool(kill=True)
                self._release_pool()
                raise
            self._release_pool()
        self.workers = _start_workers(count, self)

    def _release_pool(self) -> None:
        if self.pool is not None:
            self.pool = None
            self._held()

    def _runs(self) -> list[tuple[int, int]]:
        """Each worker's blocks: an even share, in order."""
        n = len(self.plan.bounds)
        workers = max(1, min(self.n_jobs, n))
        ends = [-(-(w + 1) * n // workers) for w in range(workers)]
        return list(zip([0, *ends[:-1]], ends))

    def _map(self, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """``(block, result)`` as the workers send them (each worker's in block
        order), so a reduction merges states as they arrive instead of holding
        later workers' until earlier blocks are done."""
        if self.busy:
            # Its workers may still hold results of the stage that failed.
            raise RuntimeError("a fork engine is not used again after a stage failed")
        if not self.workers:
            self._start()
        mine = [[task for task in tasks if a <= task[0] < b] for a, b in self._runs()]
        self.busy = True
        for (_, conn), own in zip(self.workers, mine):
            if own:
                conn.send(("tasks", own))
        pending = {w: own[::-1] for w, own in enumerate(mine) if own}
        while pending:
            conns = {self.workers[w][1]: w for w in pending}
            sentinels = {self.workers[w][0].sentinel: w for w in pending}
            ready = wait([*conns, *sentinels])
            got = [r for r in ready if r in conns]
            for conn in got:
                w = conns[conn]
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # its end of the pipe closed: it died
                    self._died(w)
                if not ok:
                    raise value
                block = pending[w].pop()[0]
                if not pending[w]:
                    del pending[w]
                yield block, value
            if not got:  # results first: a worker that died may have sent some
                self._died(sentinels[ready[0]])
        self.busy = False

    def _died(self, w: int) -> None:
        process = self.workers[w][0]
        process.join(1)
        raise BrokenProcessPool(
            f"a fork worker (pid {process.pid}) died with exit code {process.exitcode} before finishing its blocks"
        )

    def close(self) -> None:
        if self.pool is not None:
            try:
                if self.busy:
                    _stop_pool(kill=True)
                else:
                    self.pool.end_job()
            except OSError:  # a worker gone since its last result
                _stop_pool(kill=True)
            finally:
                self._release_pool()
        else:
            _stop(self.workers, kill=self.busy)
        self.workers = []


def fork_engine(*args: Any, n_jobs: int | None = None, warm_up: Callable[[], None] | None = None,
                **kwargs: Any) -> LocalEngine:
    """The fork engine; where ``fork`` does not exist, a warning and the
    serial engine."""
    if fork_available():
        return ForkEngine(*args, n_jobs=n_jobs, warm_up=warm_up, **kwargs)
    warnings.warn(
        "backend='fork' needs the fork start method, which this platform lacks; running serially",
        RuntimeWarning, stacklevel=3,
    )
    return LocalEngine(*args, **kwargs)
