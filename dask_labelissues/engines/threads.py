"""The threads engine: block tasks on a pool of threads in this process.

The kernels release the GIL (numba's ``nogil`` loops, numpy's reductions,
the codecs that decompress Zarr chunks), so threads scan blocks in parallel
without starting a process, pickling anything or waiting on a scheduler;
each writes its own rows of the job's columns.  On one machine this is the
fastest engine the benchmarks found, and the default without a Dask cluster.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Iterator, Sequence

from .local import LocalEngine, pool_size

#: Tasks submitted ahead of the result the caller waits for, per thread.
AHEAD_PER_THREAD = 2


class ThreadEngine(LocalEngine):
    """A :class:`~.local.LocalEngine` whose block tasks run on ``n_jobs``
    threads (default: one per usable core)."""

    def __init__(self, *args: Any, n_jobs: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_jobs = pool_size(n_jobs)
        self.pool = ThreadPoolExecutor(self.n_jobs, thread_name_prefix="dask-labelissues")

    def _map(self, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """The tasks' ``(block, result)`` in order, with at most
        :data:`AHEAD_PER_THREAD` tasks a thread submitted and not yet taken.

        Submitting every task at once let finished results wait for the
        caller: while it merged a selection's candidates, the threads ran
        on, and a job of 20,000,000 tokens held 576 MB of candidates at
        its peak, growing with the number of blocks.
        """
        # Lazy: a task is submitted only as the deque takes its future.
        futures = (self.pool.submit(self.call, *task) for task in tasks)
        running: deque[Future] = deque()
        try:
            running.extend(islice(futures, AHEAD_PER_THREAD * self.n_jobs))
            for task in tasks:
                result = running.popleft().result()
                running.extend(islice(futures, 1))
                yield task[0], result
        finally:
            for future in running:
                future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
