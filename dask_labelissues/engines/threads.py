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

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .local import LocalDriver, LocalJob


def default_threads() -> int:
    """The threads a job gets by default: the cores this process may use,
    within its CPU affinity and any cgroup CPU quota (what
    ``dask.system.CPU_COUNT`` counts, without importing dask for it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpus() -> int | None:
    """Whole CPUs a cgroup quota allows (v2 ``cpu.max``, v1 ``cfs_quota``), if any."""
    for path, pair in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(path) as f:
                fields = f.read().split()
            if pair is not None:
                with open(pair) as f:
                    fields += f.read().split()
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            quota, period = int(fields[0]), int(fields[1])
            if quota > 0 and period > 0:
                return max(1, math.ceil(quota / period))
        return None
    return None


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
    """A driver running on ``n_jobs`` threads of this process (default:
    :func:`default_threads`)."""
    if n_jobs is None:
        n_jobs = default_threads()
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    job = LocalJob(labels, pred_probs, spec, chunk_rows, shared=False, spill_dir=spill_dir, fspec=fspec)
    return ThreadDriver(job, n_jobs, progress=progress)
