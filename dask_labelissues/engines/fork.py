"""The fork engine: processes forked from this one, which inherit the inputs.

Workers are forked at the job's first map, once its columns (shared output
buffers) are in place, so no array is pickled: a task is a function, small
arguments and a block index; a result is a small state.  Each worker owns
a contiguous run of blocks for every stage, so it reads the records it
wrote: a worker touching another's records faulted in every page of them,
and pass two took 2 to 5 times as long.  A worker that dies fails the job
with ``BrokenProcessPool`` instead of leaving it waiting.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import warnings
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator, Sequence

from .local import BUFFERS, LocalEngine, pool_size

# Engines whose workers are alive, by id; each worker inherits the registry
# as it was when it was forked, its own engine included.
_ENGINES: dict[int, LocalEngine] = {}


def _serve(conn: Any, engine_id: int) -> None:
    """A worker's loop: run each request's tasks on the inherited engine,
    sending back one ``(ok, value)`` per task, in order; a task that raises
    ends its request.  ``None`` or a closed pipe ends it."""
    # Ctrl-C reaches the whole process group; the parent reports it and
    # stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = _ENGINES[engine_id]
    while True:
        try:
            tasks = conn.recv()
        except (EOFError, OSError):
            return
        if tasks is None:
            return
        for task in tasks:
            try:
                reply = (True, engine.call(*task))
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


class ForkEngine(LocalEngine):
    """A :class:`~.local.LocalEngine` whose block tasks run in ``n_jobs``
    forked processes (default: one per usable core), each owning a
    contiguous run of blocks.

    ``warm_up``, if given, runs here just before the fork: the workers
    then inherit what it loaded (numba's compiled kernels), where each
    would otherwise load it again in every job.
    """

    shared_columns = True

    def __init__(
        self, *args: Any, n_jobs: int | None = None, warm_up: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.n_jobs = pool_size(n_jobs)
        self.warm_up = warm_up
        self.workers: list[tuple[Any, Any]] = []
        # A stage whose results were not all taken (an error, Ctrl-C): its
        # workers are stopped at close rather than waited for.
        self.busy = False

    def _start(self) -> None:
        if self.warm_up is not None:
            self.warm_up()
        _ENGINES[id(self)] = self
        context = mp.get_context("fork")
        try:
            with BUFFERS.workers_forked():
                for _ in self._runs():
                    parent, child = context.Pipe()
                    process = context.Process(target=_serve, args=(child, id(self)), daemon=True)
                    process.start()
                    child.close()
                    self.workers.append((process, parent))
        except BaseException:
            self.close()
            raise

    def _runs(self) -> list[tuple[int, int]]:
        """Each worker's blocks: an even share, in order."""
        n = len(self.plan.bounds)
        workers = max(1, min(self.n_jobs, n))
        ends = [-(-(w + 1) * n // workers) for w in range(workers)]
        return list(zip([0, *ends[:-1]], ends))

    def _map(self, tasks: Sequence[tuple]) -> Iterable[tuple[int, Any]]:
        if self.busy:
            # Its workers may still hold results of the stage that failed.
            raise RuntimeError("a fork engine is not used again after a stage failed")
        if not self.workers:
            self._start()
        # Every task's first item is its block's index.
        mine = [[task for task in tasks if a <= task[0] < b] for a, b in self._runs()]
        self.busy = True
        for (_, conn), own in zip(self.workers, mine):
            if own:
                conn.send(own)
        return self._results([[task[0] for task in own] for own in mine])

    def _results(self, mine: list[list[int]]) -> Iterator[tuple[int, Any]]:
        """``(block, result)`` as the workers send them, each worker's in
        its blocks' order.

        Taken as they come, so that a reduction merges each worker's
        states as they arrive: yielded in block order, every later
        worker's results waited here for the blocks before them, and a
        stage of large states (a selection's candidates) held about half
        of them at once.
        """
        pending = {w: list(reversed(blocks)) for w, blocks in enumerate(mine) if blocks}
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
                block = pending[w].pop()
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
        for process, conn in self.workers:
            if self.busy:
                process.terminate()
            else:
                try:
                    conn.send(None)
                except OSError:
                    pass
        stuck = False
        for process, conn in self.workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
                stuck = stuck or process.is_alive()
            conn.close()
        if stuck:
            # A worker that outlived SIGKILL (blocked in the kernel) keeps
            # every shared buffer it inherited mapped, and a system call it
            # is in may still touch one: none is written again.
            BUFFERS.drop_shared()
        self.workers = []
        _ENGINES.pop(id(self), None)


def fork_engine(*args: Any, n_jobs: int | None = None, warm_up: Callable[[], None] | None = None, **kwargs: Any) -> LocalEngine:
    """The fork engine; where ``fork`` does not exist, a warning and the
    serial engine."""
    if fork_available():
        return ForkEngine(*args, n_jobs=n_jobs, warm_up=warm_up, **kwargs)
    warnings.warn(
        "backend='fork' needs the fork start method, which this platform lacks; running serially",
        RuntimeWarning,
        stacklevel=3,
    )
    return LocalEngine(*args, **kwargs)
