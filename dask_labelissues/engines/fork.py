"""The fork engine: processes forked from this one, which inherit the inputs.

Workers are forked after the job (inputs and shared output buffers) is in
place, so no array is ever pickled: a task is a method name and a block
index, and a result is a small state.  Each worker owns a contiguous run
of blocks and runs every stage's task for those blocks, so it reads the
records it wrote itself: in a pool that sent each task to any free worker,
a worker touching records another process wrote faulted in every page of
them, and pass two's tasks took 2 to 5 times as long as in one process.
A worker that dies (killed, out of memory, a crash in native code) fails
the job with ``BrokenProcessPool`` instead of leaving it waiting forever.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import warnings
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .. import fused, states
from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .local import LocalDriver, LocalJob, pool_size, serial_mapper

# Jobs whose workers are alive, by id; each worker inherits the registry
# as it was when it was forked, its own job included.
_JOBS: dict[int, LocalJob] = {}


def _serve(conn: Any, job_id: int) -> None:
    """A worker's loop: run ``(method name, [args, ...])`` requests on the
    inherited job, sending back one ``(ok, value)`` per task, in order; a
    task that raises ends its request.  ``None`` or a closed pipe ends it."""
    # Ctrl-C reaches the whole process group; the parent reports it and
    # stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = _JOBS[job_id]
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        name, tasks = request
        method = getattr(job, name)
        for args in tasks:
            try:
                reply = (True, method(*args))
            except BaseException as exc:  # sent to the parent, which raises it
                reply = (False, exc)
            try:
                conn.send(reply)
            except Exception as exc:  # a result or an error that does not pickle
                conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            if not reply[0]:
                break


def fork_available() -> bool:
    """True where the ``fork`` start method exists (not on Windows)."""
    return "fork" in mp.get_all_start_methods()


class ForkDriver(LocalDriver):
    """A :class:`LocalDriver` whose block tasks run in ``n_jobs`` forked
    processes, each owning a contiguous run of blocks."""

    def __init__(self, job: LocalJob, n_jobs: int, progress: bool = False) -> None:
        self.job_id = id(job)
        _JOBS[self.job_id] = job
        self.workers: list[tuple[Any, Any]] = []
        # A stage whose results were not all taken (an error, Ctrl-C): its
        # workers are stopped at close rather than waited for.
        self.busy = False
        n_blocks = len(job.bounds)
        context = mp.get_context("fork")
        try:
            for _ in range(max(1, min(n_jobs, n_blocks))):
                parent, child = context.Pipe()
                process = context.Process(target=_serve, args=(child, self.job_id), daemon=True)
                process.start()
                child.close()
                self.workers.append((process, parent))
        except BaseException:
            self.close()
            raise
        super().__init__(job, self._map, progress=progress)

    def _owner(self, block: int) -> int:
        return block * len(self.workers) // self.n_blocks

    def _map(self, name: str, args: Sequence[tuple]) -> Iterable[Any]:
        # Every task's first argument is its block's index.
        mine: list[list[int]] = [[] for _ in self.workers]
        for position, task in enumerate(args):
            mine[self._owner(task[0])].append(position)
        self.busy = True
        for (_, conn), positions in zip(self.workers, mine):
            if positions:
                conn.send((name, [args[p] for p in positions]))
        return self._results(mine, len(args))

    def _results(self, mine: list[list[int]], n: int) -> Iterator[Any]:
        """The stage's results in task order, as the workers send them."""
        done: dict[int, Any] = {}
        pending = {w: list(reversed(positions)) for w, positions in enumerate(mine) if positions}
        for position in range(n):
            while position not in done:
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
                    done[pending[w].pop()] = value
                    if not pending[w]:
                        del pending[w]
                if not got:  # results first: a worker that died may have sent some
                    self._died(sentinels[ready[0]])
            yield done.pop(position)
        self.busy = False

    def _died(self, w: int) -> None:
        process = self.workers[w][0]
        process.join(1)
        raise BrokenProcessPool(
            f"a fork worker (pid {process.pid}) died with exit code {process.exitcode} before finishing its blocks"
        )

    def close(self) -> None:
        for process, conn in self.workers:
            if self.busy:
                process.terminate()
            else:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for process, conn in self.workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self.workers = []
        _JOBS.pop(self.job_id, None)


def fork_driver(
    labels: Any,
    pred_probs: Any,
    spec: ScoreSpec,
    chunk_rows: int,
    *,
    n_jobs: int | None = None,
    progress: bool = False,
    spill_dir: str | None = None,
    fspec: FilterSpec | None = None,
) -> LocalDriver:
    """A driver running on ``n_jobs`` forked processes (default: one per
    usable core).

    Where ``fork`` does not exist, warns and returns the serial driver.
    """
    n_jobs = pool_size(n_jobs)
    if not fork_available():
        warnings.warn(
            "backend='fork' needs the fork start method, which this platform lacks; "
            "running serially",
            RuntimeWarning,
            stacklevel=3,
        )
        job = LocalJob(labels, pred_probs, spec, chunk_rows, shared=False, spill_dir=spill_dir, fspec=fspec)
        return LocalDriver(job, serial_mapper(job), progress=progress)
    job = LocalJob(labels, pred_probs, spec, chunk_rows, shared=True, spill_dir=spill_dir, fspec=fspec)
    _warm_up(job, fspec)
    return ForkDriver(job, n_jobs, progress=progress)


def _warm_up(job: LocalJob, fspec: FilterSpec | None) -> None:
    """Run every stage's kernels on one made-up row here, before the fork.

    The workers then inherit numba's compiled kernels; otherwise every
    worker of every job imports numba and loads them from its cache again
    (0.73 s per job on the development machine, whatever its size; 0.07 s
    with this).  The scan runs on a read-only row too: blocks of a
    memory-mapped file are read-only, and numba keeps a kernel per
    writeability of its arguments.
    """
    k = job.n_classes
    probs = np.full((1, k), 1.0 / k, dtype=job.pred_probs.dtype)
    label = np.zeros(1, dtype=np.int64)
    rec, _ = states.scan_block(label, probs, 0, job.spec)
    probs.setflags(write=False)
    label.setflags(write=False)
    states.scan_block(label, probs, 0, job.spec)
    if not job.spec.rereads:
        scores, _ = states.score_block(rec, np.full(k, 2.0), job.spec)
        states.prefix_rows_block(scores, 0, 0)
        states.issue_mask_block(rec, scores, 0, 0)
    if fspec is not None and fspec.needs_joint:
        fused.joint_rows(probs, label, label, np.full(k, 2.0), min(1, k - 1), job.spec.kernel)
