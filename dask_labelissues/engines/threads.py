"""The threads engine: block tasks on a pool of threads in this process.

The kernels release the GIL (numba's ``nogil`` loops, numpy's reductions
and the codecs that decompress Zarr chunks), so threads scan blocks in
parallel without starting a process, pickling anything or waiting on a
scheduler.  The job's columns are ordinary arrays (or, when large, an
unlinked file) that every thread writes its own rows of.  On one machine
this is the fastest engine the benchmarks found, and the default when no
Dask cluster is in use.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from .local import LocalEngine, pool_size


class ThreadEngine(LocalEngine):
    """A :class:`~.local.LocalEngine` whose block tasks run on ``n_jobs``
    threads (default: one per usable core)."""

    def __init__(self, *args: Any, n_jobs: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(pool_size(n_jobs), thread_name_prefix="dask-labelissues")

    def _map(self, tasks: Sequence[tuple]) -> Iterable[Any]:
        return self.pool.map(lambda task: self.call(*task), tasks)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
