"""The threads engine: block tasks on a pool of threads in this process.

The kernels release the GIL (numba's ``nogil`` loops, numpy's reductions
and the codecs that decompress Zarr chunks), so threads scan blocks in
parallel without starting a process, pickling anything or waiting on a
scheduler.  The job's buffers are ordinary arrays (or, when large, an
unlinked file) that every thread writes its own rows of.  On one machine
this is the fastest engine the benchmarks found, and the default when no
Dask cluster is in use.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .local import LocalDriver, LocalJob, pool_size


class ThreadDriver(LocalDriver):
    """A :class:`LocalDriver` whose block tasks run on ``n_jobs`` threads."""

    def __init__(self, job: LocalJob, n_jobs: int, progress: bool = False) -> None:
        self.pool = ThreadPoolExecutor(n_jobs, thread_name_prefix="dask-labelissues")
        super().__init__(job, self._map, progress=progress)

    def _map(self, name: str, args: Sequence[tuple]) -> Iterable[Any]:
        method = getattr(self.job, name)
        return self.pool.map(lambda a: method(*a), args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def threads_driver(
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
    """A driver running on ``n_jobs`` threads of this process (default: one
    per usable core, :func:`~.local.usable_cores`)."""
    n_jobs = pool_size(n_jobs)
    job = LocalJob(labels, pred_probs, spec, chunk_rows, shared=False, spill_dir=spill_dir, fspec=fspec)
    return ThreadDriver(job, n_jobs, progress=progress)
