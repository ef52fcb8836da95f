"""The fork engine: a pool of processes that inherit the inputs.

Workers are started with ``fork`` after the job (inputs and shared output
buffers) is in place, so no array is ever pickled: a task is a method name
and a block index, and a result is a small state.  The pool is a
``ProcessPoolExecutor``: a worker that dies (killed, out of memory, a crash
in native code) fails the job with ``BrokenProcessPool`` instead of leaving
it waiting forever, as ``multiprocessing.Pool`` would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np

from .. import fused, states
from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .local import LocalDriver, LocalJob, serial_mapper

# Jobs whose pools are alive, by id; each pool's children inherit the
# registry as it was when they were forked, their own job included.
_JOBS: dict[int, LocalJob] = {}


def _call(task: tuple[int, str, tuple]) -> Any:
    job_id, name, args = task
    return getattr(_JOBS[job_id], name)(*args)


def fork_available() -> bool:
    """True where the ``fork`` start method exists (not on Windows)."""
    return "fork" in mp.get_all_start_methods()


class ForkDriver(LocalDriver):
    """A :class:`LocalDriver` whose block tasks run in ``n_jobs`` forked processes."""

    def __init__(self, job: LocalJob, n_jobs: int, progress: bool = False) -> None:
        self.job_id = id(job)
        _JOBS[self.job_id] = job
        try:
            # With fork, the executor starts all its processes at the first
            # submit, before its own manager thread exists.
            self.pool = ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork"))
        except BaseException:
            del _JOBS[self.job_id]
            raise
        super().__init__(job, self._map, progress=progress)

    def _map(self, name: str, args: Sequence[tuple]) -> Iterable[Any]:
        return self.pool.map(_call, [(self.job_id, name, a) for a in args])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
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
    """A driver running on ``n_jobs`` forked processes (default: all cores).

    Where ``fork`` does not exist, warns and returns the serial driver.
    """
    if n_jobs is None:
        n_jobs = os.cpu_count() or 1
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
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
    """Run the block kernels on one made-up row here, before the fork.

    The workers then inherit numba's compiled kernels; otherwise every
    worker of every job imports numba and loads them from its cache again
    (0.73 s per job on the development machine, whatever its size; 0.07 s
    with this).
    """
    k = job.n_classes
    probs = np.full((1, k), 1.0 / k, dtype=job.pred_probs.dtype)
    label = np.zeros(1, dtype=np.int64)
    states.scan_block(label, probs, 0, job.spec)
    if fspec is not None and fspec.needs_joint:
        fused.joint_rows(probs, label, label, np.full(k, 2.0), min(1, k - 1), job.spec.kernel)
