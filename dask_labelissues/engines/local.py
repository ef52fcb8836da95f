"""The one-machine driver shared by the serial and fork engines.

Blocks are row ranges of the inputs.  The per-row records, scores and issue
mask live in buffers allocated before any worker process starts, so forked
workers share them (anonymous shared memory, or a file in ``spill_dir`` when
they are large) and write their rows in place; only states travel back.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .. import filters, states
from ..filters import FilterSpec, JointState, MaskRule
from ..inputs import RawFile
from ..kernels import ScoreSpec
from ..states import HistogramState, ScoreState, ThresholdState, Winners
from .base import Driver, block_bounds, even_chunks

#: Buffers larger than this go to a file in ``spill_dir`` instead of memory.
SPILL_BYTES = 256 * 2**20

#: Buffers from this size on ask for transparent huge pages.
HUGE_PAGE_BYTES = 2 << 20


def allocate(n: int, dtype: np.dtype, *, shared: bool, spill_dir: str | None) -> np.ndarray:
    """An uninitialized length-``n`` buffer.

    Large buffers are backed by an unlinked temporary file, so that the
    page cache, not anonymous memory, holds them and nothing is left on
    disk.  Others are anonymous mappings, shared with forked workers if
    ``shared``; private ones of 2 MiB or more ask for transparent huge
    pages, since a job's first write to each 4 KiB page of a fresh buffer
    is a page fault: touching a fresh 320 MB mapping took 0.12 to 0.13 s
    with 4 KiB pages and 0.02 to 0.04 s with huge pages (development
    machine, kernel 6.18, THP in madvise mode).
    """
    dtype = np.dtype(dtype)
    nbytes = max(n * dtype.itemsize, 1)
    if nbytes > SPILL_BYTES:
        fd, path = tempfile.mkstemp(prefix="dask-labelissues-", dir=spill_dir)
        try:
            os.ftruncate(fd, nbytes)
            buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
            os.unlink(path)
        return np.frombuffer(buf, dtype=dtype, count=n)
    if shared:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=n)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages
            pass
    return np.frombuffer(buf, dtype=dtype, count=n)


def _job_view(source: Any) -> Any:
    """What a local job slices its blocks from: a memory-mapped file's
    whole mapping (forked workers inherit it), any other source itself."""
    if isinstance(source, RawFile) and source.order == "C":
        return source.mapped()
    return source


class LocalJob:
    """Inputs, buffers and the block tasks of one job on one machine.

    Every method taking a block index runs one block task; the fork engine
    calls them in child processes that inherited this object.
    """

    def __init__(
        self,
        labels: Any,
        pred_probs: Any,
        spec: ScoreSpec,
        chunk_rows: int,
        *,
        shared: bool,
        spill_dir: str | None = None,
        fspec: FilterSpec | None = None,
    ) -> None:
        self.labels = labels
        self.pred_probs = pred_probs
        # Blocks are sliced from one mapping of each file for the whole job,
        # and a block's pages are let go once it is read: mapping every block
        # anew cost a tenth of a scan in mmap and munmap calls.
        self._labels_rows = _job_view(labels)
        self._probs_rows = _job_view(pred_probs)
        self.spec = spec
        self.n_rows, self.n_classes = (int(s) for s in pred_probs.shape)
        self.bounds = block_bounds(even_chunks(self.n_rows, chunk_rows))
        self.records = allocate(self.n_rows, spec.record_dtype(), shared=shared, spill_dir=spill_dir)
        self.scores = allocate(self.n_rows, np.float64, shared=shared, spill_dir=spill_dir)
        self.mask = allocate(self.n_rows, np.bool_, shared=shared, spill_dir=spill_dir)
        # Forked workers share only what exists before the fork, so the
        # joint records of a filter's second read are allocated now too.
        self.joint_records = None
        if fspec is not None and fspec.needs_joint:
            dtype = fspec.joint_dtype(self.n_classes, np.dtype(pred_probs.dtype))
            self.joint_records = allocate(self.n_rows, dtype, shared=shared, spill_dir=spill_dir)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.bounds[i]
        return np.asarray(self._labels_rows[a:b]), np.asarray(self._probs_rows[a:b])

    def _release(self, i: int) -> None:
        """Let go of block ``i``'s pages of the mapped inputs, once read."""
        a, b = self.bounds[i]
        for source, rows in ((self.labels, self._labels_rows), (self.pred_probs, self._probs_rows)):
            if rows is not source:
                source.release(a, b)

    def scan(self, i: int) -> ThresholdState:
        a, b = self.bounds[i]
        labels, probs = self._read(i)
        _, state = states.scan_block(labels, probs, a, self.spec, out=self.records[a:b])
        self._release(i)
        return state

    def score(self, i: int, thresholds: np.ndarray) -> ScoreState:
        a, b = self.bounds[i]
        labels = probs = None
        if self.spec.rereads:
            labels, probs = self._read(i)
        _, state = states.score_block(self.records[a:b], thresholds, self.spec, labels, probs, out=self.scores[a:b])
        if probs is not None:
            self._release(i)
        return state

    def histogram(self, i: int, round_index: int, prefix: int) -> HistogramState:
        a, b = self.bounds[i]
        return HistogramState.chunk(self.scores[a:b], round_index, prefix)

    def equal_count(self, i: int, cutoff: int) -> int:
        a, b = self.bounds[i]
        return states.equal_count_block(self.scores[a:b], cutoff)

    def gather(self, i: int, cutoff: int, quota: int) -> Winners:
        a, b = self.bounds[i]
        sc = self.scores[a:b]
        return states.top_winners(self.records[a:b], sc, cutoff, quota, a)

    def gather_prefix(self, i: int, shift: int, prefix: int) -> Winners:
        a, b = self.bounds[i]
        sc = self.scores[a:b]
        return states.prefix_winners(self.records[a:b], sc, shift, prefix, a)

    def write_mask(self, i: int, cutoff: int, quota: int) -> None:
        a, b = self.bounds[i]
        self.mask[a:b] = states.issue_mask_block(self.records[a:b], self.scores[a:b], cutoff, quota)

    def joint(self, i: int, thresholds: np.ndarray, fspec: FilterSpec) -> JointState:
        a, b = self.bounds[i]
        probs = self._source(i, "probs")  # the labels are in the records already
        rows, state = filters.joint_block(self.records[a:b], probs, thresholds, fspec, self.spec.kernel)
        self._release(i)
        self.joint_records[a:b] = rows
        return state

    def _source(self, i: int, name: str) -> Any:
        a, b = self.bounds[i]
        if name == "rec":
            return self.records[a:b]
        if name == "joint":
            return self.joint_records[a:b]
        if name == "scores":
            return self.scores[a:b]
        if name == "start":
            return a
        if name == "labels":
            return np.asarray(self._labels_rows[a:b])
        if name == "probs":
            return np.asarray(self._probs_rows[a:b])
        raise ValueError(f"unknown block source {name!r}")

    def apply(self, i: int, fn: Callable[..., Any], needs: Sequence[str], args: tuple) -> Any:
        out = fn(*(self._source(i, name) for name in needs), *args)
        if "labels" in needs or "probs" in needs:
            self._release(i)
        return out

    def flagged(self, i: int, rule: MaskRule) -> Winners:
        a, b = self.bounds[i]
        joint = None if self.joint_records is None else self.joint_records[a:b]
        mask = filters.mask_block(rule, self.records[a:b], joint, a)
        self.mask[a:b] = mask
        return Winners.chunk(self.records[a:b], self.scores[a:b], mask, a)


def usable_cores() -> int:
    """The cores this process may use,
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


def pool_size(n_jobs: int | None) -> int:
    """Threads or processes for a one-machine pool: ``n_jobs``, checked, or
    one per usable core."""
    if n_jobs is None:
        return usable_cores()
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    return int(n_jobs)


Mapper = Callable[[str, Sequence[tuple]], Iterable[Any]]


def _progress(items: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a reason to fail
        return items
    return tqdm(items, total=total, desc=desc, unit="block", file=sys.stderr)


def _fold(parts: Iterable[Any], combine: Callable[[list], Any], fan_in: int = 8) -> Any:
    """Merge states as they arrive, ``fan_in`` at a time (as the Dask
    engine's tree does, with its own fan-in), so memory holds at most
    ``fan_in + 1`` of them."""
    acc: list[Any] = []
    for part in parts:
        acc.append(part)
        if len(acc) > fan_in:
            acc = [combine(acc)]
    if not acc:
        return None
    return acc[0] if len(acc) == 1 else combine(acc)


class LocalDriver(Driver):
    """Runs a :class:`LocalJob`'s block tasks through ``mapper``.

    ``mapper(method_name, args_per_block)`` yields results in block order;
    the serial engine maps in-process, the fork engine through a pool.
    """

    def __init__(self, job: LocalJob, mapper: Mapper, progress: bool = False) -> None:
        self.job = job
        self.map = mapper
        self.progress = progress
        self.n_rows = job.n_rows
        self.n_classes = job.n_classes
        self.n_blocks = len(job.bounds)
        self.block_starts = [a for a, _ in job.bounds]

    def _each(self, name: str, *args: Any, desc: str | None = None) -> Iterable[Any]:
        results = self.map(name, [(i, *args) for i in range(self.n_blocks)])
        return _progress(results, self.n_blocks, desc or name, self.progress and desc is not None)

    def scan(self) -> ThresholdState:
        return _fold(self._each("scan", desc="pass 1: reading pred_probs"), ThresholdState.combine)

    def score(self, thresholds: np.ndarray) -> ScoreState:
        return _fold(self._each("score", thresholds, desc="pass 2: scoring"), ScoreState.combine)

    def histogram(self, round_index: int, prefix: int) -> HistogramState:
        return _fold(self._each("histogram", round_index, prefix), HistogramState.combine)

    def equal_counts(self, cutoff: int) -> list[int]:
        return list(self._each("equal_count", cutoff))

    def gather(self, cutoff: int, quotas: list[int]) -> Winners:
        args = [(i, cutoff, q) for i, q in enumerate(quotas)]
        return Winners.combine(list(self.map("gather", args)))

    def gather_prefix(self, shift: int, prefix: int) -> Winners:
        return Winners.combine(list(self._each("gather_prefix", shift, prefix)))

    def outputs(self, cutoff: int, quotas: list[int]) -> dict[str, np.ndarray]:
        quotas = quotas or [0] * self.n_blocks
        for _ in self.map("write_mask", [(i, cutoff, q) for i, q in enumerate(quotas)]):
            pass
        return self._outputs()

    def _outputs(self) -> dict[str, np.ndarray]:
        return {
            "label_quality_scores": self.job.scores,
            "is_label_issue": self.job.mask,
            "given_label": self.job.records["label"],
            "predicted_label": self.job.records["pred"],
        }

    def joint(self, thresholds: np.ndarray, fspec: FilterSpec) -> JointState:
        parts = self._each("joint", thresholds, fspec, desc="second read: confident joint")
        return _fold(parts, JointState.combine)

    def reduce_blocks(
        self, fn: Callable[..., Any], combine: Callable[[list], Any], needs: Sequence[str], args: tuple
    ) -> Any:
        return _fold(self._each("apply", fn, tuple(needs), args), combine)

    def gather_mask(self, rule: MaskRule) -> Winners:
        # Writes the mask buffer as it goes; filter_outputs hands it out.
        # Each task gets only its own block's share of the selected rows.
        args = [(i, rule.restrict(a, b)) for i, (a, b) in enumerate(self.job.bounds)]
        return Winners.combine(list(self.map("flagged", args)))

    def filter_outputs(self, rule: MaskRule) -> dict[str, np.ndarray]:
        return self._outputs()


def serial_mapper(job: LocalJob) -> Mapper:
    """Map block tasks in this process, one after another."""

    def mapper(name: str, args: Sequence[tuple]) -> Iterable[Any]:
        method = getattr(job, name)
        return (method(*a) for a in args)

    return mapper
