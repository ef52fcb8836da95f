"""The one-machine engine the serial, threads and fork engines share.

Blocks are row ranges of one mapping of each file for the whole job.
Columns are item-long buffers allocated before any worker process starts,
so forked workers write their rows in place and only states travel back.
A map runs when something needs its results; a reduction merges states as
they arrive (:class:`_Folds`).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..aggregations import Aggregation, held_bytes
from ..kinds import ROWS, Kind
from ..system import give_back_freed_memory, held_elsewhere, keep_freed_memory, usable_cores, usable_memory
from .base import INPUTS, SPLIT_EVERY, START, Blocks, Column, Engine, PerBlock, Value, data_of
from .blocks import BlockPlan, BlockReader

#: Buffers larger than ``SPILL_BYTES``, a 32nd of the memory the process
#: may use, go to a file in ``spill_dir``, whose pages the kernel can write
#: back, so a job's columns in memory are at most about a twenty-fifth of
#: it (the records are 32 of an item's 41 bytes of columns).  Not smaller
#: ones: a spill file's pages, once written out, fault anew every job.
SPILL_SHARE = 32
SPILL_BYTES = usable_memory() // SPILL_SHARE

#: Buffers from this size on ask for transparent huge pages.
HUGE_PAGE_BYTES = 2 << 20


def allocate(n: int, dtype: np.dtype, *, shared: bool, spill_dir: str | None, descriptor: bool = False) -> np.ndarray:
    """An uninitialized length-``n`` buffer, from :class:`BufferPool` where
    it has a free one.

    Large buffers are an unlinked temporary file, so that the page cache,
    not anonymous memory, holds them.  Others are anonymous mappings,
    shared with forked workers if ``shared`` (and with other processes, as
    a memfd, if ``descriptor``); private ones ask for transparent huge
    pages from :data:`HUGE_PAGE_BYTES`, several times faster to fault in.
    """
    dtype = np.dtype(dtype)
    nbytes = max(n * dtype.itemsize, 1)
    if nbytes > SPILL_BYTES:
        kind: tuple = ("file", spill_dir)
    else:
        kind = (("memfd",) if descriptor else ("shared",)) if shared else ("private",)
    buf = BUFFERS.take(kind, nbytes)
    if buf is None:
        buf = _new_buffer(kind, nbytes)
        BUFFERS.adopt(kind, buf)
    return np.frombuffer(buf, dtype=dtype, count=n)


def _new_buffer(kind: tuple, nbytes: int) -> mmap.mmap:
    if kind[0] == "private":
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if nbytes >= HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # a kernel without transparent huge pages: 4 KiB pages
                buf.madvise(mmap.MADV_HUGEPAGE)
        return buf
    if kind[0] == "shared":
        return mmap.mmap(-1, nbytes)
    if kind[0] == "file":
        import tempfile  # a few milliseconds of start-up, for large jobs only

        fd, path = tempfile.mkstemp(prefix="dask-labelissues-", dir=kind[1])
        os.unlink(path)
    else:
        try:
            fd = os.memfd_create("dask-labelissues", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # none here: shared, without one
            return mmap.mmap(-1, nbytes)
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    # The descriptor stays open while the buffer lives (with the duplicate
    # mmap keeps, two a buffer), for processes that did not inherit the
    # mapping (the fork engine's kept workers).
    _SHARED[buf] = (next(_KEYS), fd)
    weakref.finalize(buf, os.close, fd)
    return buf


#: Shared buffers that have a file descriptor: ``(key, fd)`` by buffer.
_SHARED: "weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int]]" = weakref.WeakKeyDictionary()
_KEYS = itertools.count()


def shared_handle(array: np.ndarray) -> tuple[int, int, int] | None:
    """``(key, fd, size)`` of the shared buffer ``array`` was allocated
    over (by :func:`allocate`), or None if it has no descriptor."""
    buf = getattr(array.base, "obj", None)
    found = _SHARED.get(buf) if isinstance(buf, mmap.mmap) else None
    return None if found is None else (*found, len(buf))


#: The most buffers listed at once: a shared one with a descriptor holds
#: two open files, and many small jobs would list hundreds within the bytes.
MAX_SLOTS = 64

#: The most bytes of column buffers this process keeps for later jobs, in
#: memory and again in spill files: an eighth of usable memory (four columns
#: of the largest in-memory size), at most 4 GiB.  With less, jobs of two
#: engines in one process let go of each other's buffers.
POOL_BYTES = min(4 << 30, usable_memory() // 8)


class BufferPool:
    """This process's recent jobs' column buffers, for later jobs to reuse.

    A fresh mapping's pages are faulted in and zeroed on first write, job
    after job (on 10,000,000 x 100, a quarter of the warm job).  A later
    job takes a listed buffer of the same kind (private, shared, or a spill
    file in the same directory) once no array refers to it.  Memory
    buffers and spill files each have ``limit`` bytes; beyond it, free
    buffers of that kind are let go oldest first, then older ones in use.

    Shared buffers may still be read by a process forked while a result
    held them: they are let go at every fork but of the fork engine's
    workers (:meth:`workers_forked`), which stop before their job returns.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        # Set in the forking thread, where fork handlers run, while the fork engine forks workers.
        self._local = threading.local()

    def take(self, kind: tuple, nbytes: int) -> mmap.mmap | None:
        """A free buffer of ``kind`` holding ``nbytes`` (at most twice as large), or None."""
        with self._lock:
            fits = [s.buf for s in self._slots if s.kind == kind and nbytes <= len(s.buf) <= 2 * nbytes and s.free()]
            # The caller's reference marks it taken for every other caller.
            return min(fits, key=len, default=None)

    def adopt(self, kind: tuple, buf: mmap.mmap) -> None:
        """List ``buf`` for later jobs if it fits in the limit."""
        if len(buf) > self.limit:
            return
        spill = kind[0] == "file"
        with self._lock:
            self._slots.append(_Slot(kind, buf))
            total = sum(len(s.buf) for s in self._slots if (s.kind[0] == "file") == spill)
            # Free slots first (a stable sort keeps them oldest first): bytes
            # of one kind make room for that kind; any slot, to bring the
            # count under MAX_SLOTS.
            for slot in sorted(self._slots[:-1], key=lambda s: not s.free()):
                over_slots = len(self._slots) > MAX_SLOTS
                if total <= self.limit and not over_slots:
                    return
                alike = (slot.kind[0] == "file") == spill
                if alike or over_slots:
                    self._slots.remove(slot)
                    total -= len(slot.buf) if alike else 0

    def shared_keys(self) -> set[int]:
        """The keys (:func:`shared_handle`) of the listed shared buffers."""
        with self._lock:
            return {_SHARED[s.buf][0] for s in self._slots if s.buf in _SHARED}

    def clear(self) -> None:
        """Let go of every listed buffer (those in use stay with their arrays)."""
        with self._lock:
            self._slots = []

    @contextlib.contextmanager
    def workers_forked(self) -> Iterator[None]:
        """Forks in this block are of fork engine workers, which touch a
        buffer only in a job's tasks, all finished before the job returns
        (:meth:`~.fork.ForkEngine.close`): the buffers stay listed."""
        self._local.workers = True
        try:
            yield
        finally:
            self._local.workers = False

    def drop_shared(self, in_use_only: bool = False) -> None:
        """Let go of the buffers shared with other processes (or of those
        an array holds, ``in_use_only``)."""
        with self._lock:
            self._slots = [s for s in self._slots if s.kind[0] == "private" or (in_use_only and s.free())]

    def before_fork(self) -> None:
        if not getattr(self._local, "workers", False):
            self.drop_shared(in_use_only=True)

    def in_child(self) -> None:
        """A forked child starts with no buffers listed (the shared ones are
        also the parent's to write again) and a lock no thread holds."""
        self._lock = threading.Lock()
        self._slots = []
        self._local = threading.local()


@dataclass(slots=True)
class _Slot:
    kind: tuple
    buf: mmap.mmap

    def free(self) -> bool:
        return not held_elsewhere(self, "buf")


#: This process's kept column buffers.
BUFFERS = BufferPool(POOL_BYTES)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=BUFFERS.before_fork, after_in_child=BUFFERS.in_child)


#: Bytes of unmerged states :class:`_Folds` holds before it merges some.
FOLD_BYTES = 32 * 2**20


def pool_size(n_jobs: int | None) -> int:
    """Threads or processes for a one-machine pool: ``n_jobs``, checked, or one per usable core."""
    if n_jobs is None:
        return usable_cores()
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    return int(n_jobs)


def _job_view(source: Any) -> Any:
    """What a job slices its blocks from: a memory-mapped file's whole
    mapping (forked workers inherit it), any other source itself."""
    mapped = getattr(source, "mapped", None)
    if mapped is not None and getattr(source, "order", "C") == "C":
        return mapped()
    return source


# A placeholder a task's arguments carry to the process that runs it (as
# they carry INPUTS), which resolves it against the job it holds.
@dataclass(frozen=True)
class _Rows:
    column: int


class LocalBlocks(Blocks):
    """A map's task and arguments, and its results once run."""

    def __init__(self, task: Callable, args: tuple, out: Column | None, label: str | None) -> None:
        self.task, self.args, self.out, self.label = task, args, out, label
        self.results: list[Any] | None = None
        self.reduced = False
        self.states_dropped = False  # a reduction took a column map's states: only its rows are kept
        self.kept = False  # a compute asked to keep these blocks for later stages


class LocalValue(Value):
    """A reduction, run when its value is first needed: by a compute, which
    knows by then which maps to keep, or by a later map's task."""

    def __init__(self, reduce: Callable[[], Any]) -> None:
        self._reduce: Callable[[], Any] | None = reduce
        self._value: Any = None

    @property
    def value(self) -> Any:
        if self._reduce is not None:
            self._value, self._reduce = self._reduce(), None
        return self._value


class _Folds:
    """A reduction's states, merged as they come, in runs of consecutive
    blocks (:meth:`LocalEngine._runs`) whose states arrive in order.

    A run's states are merged at :data:`~.base.SPLIT_EVERY`, or sooner:
    while the unmerged states hold more than :data:`FOLD_BYTES` and more
    than the merged ones (large states, a selection's candidates), the
    run with the most waiting is merged.
    """

    def __init__(self, aggregation: Aggregation, runs: Sequence[tuple[int, int]]) -> None:
        self.aggregation = aggregation
        self.ends = np.array([b for _, b in runs])
        self.acc: list[list[Any]] = [[] for _ in runs]
        self.waiting, self.merged = [0] * len(runs), [0] * len(runs)

    def add(self, block: int, state: Any) -> None:
        r = int(np.searchsorted(self.ends, block, side="right"))
        self.acc[r].append(state)
        self.waiting[r] += held_bytes(state)
        if len(self.acc[r]) > SPLIT_EVERY:
            self._merge(r)
        while sum(self.waiting) > max(FOLD_BYTES, sum(self.merged)):
            r = max(range(len(self.acc)), key=lambda q: self.waiting[q] if len(self.acc[q]) > 1 else -1)
            if len(self.acc[r]) < 2:
                break
            self._merge(r)

    def _merge(self, r: int) -> None:
        self.acc[r] = [self.aggregation.combine(self.acc[r])]
        self.merged[r], self.waiting[r] = held_bytes(self.acc[r][0]), 0

    def root(self, *args: Any) -> Any:
        return self.aggregation.root([state for acc in self.acc for state in acc], *args)


class LocalEngine(Engine):
    """Runs block tasks through :meth:`_map`, which yields ``(block,
    result)`` pairs, each run of blocks (:meth:`_runs`) in order: here one
    after another (the serial engine, the others' reference), on threads
    (:mod:`.threads`) or in forked processes (:mod:`.fork`)."""

    shared_columns = False
    #: Columns get descriptors (:func:`shared_handle`) for processes not
    #: forked from this one.
    descriptors = False

    def __init__(
        self, labels: Any, pred_probs: Any, plan: BlockPlan, *,
        kind: Kind = ROWS, progress: bool = False, spill_dir: str | None = None,
    ) -> None:
        super().__init__(labels, pred_probs, plan, kind)
        keep_freed_memory()
        # One mapping of each file for the whole job (mapping every block
        # anew cost a tenth of a scan); a block's pages go once it is read.
        self._labels_rows, self._probs_rows = _job_view(labels), _job_view(pred_probs)
        self.progress = progress
        self.spill_dir = spill_dir
        self.columns: list[np.ndarray] = []
        self.started = False

    def column(self, dtype: Any) -> Column:
        if self.started:
            raise RuntimeError("columns are declared before the job's first map")
        self.columns.append(allocate(
            self.n_items, dtype, shared=self.shared_columns, spill_dir=self.spill_dir, descriptor=self.descriptors,
        ))
        return Column(len(self.columns) - 1, self.columns[-1].dtype)

    def map(self, task: Callable[..., Any], *args: Any, out: Column | None = None, label: str | None = None) -> Blocks:
        return LocalBlocks(task, args, out, label)

    def reduce(self, blocks: Blocks, aggregation: Aggregation, *args: Any) -> Value:
        assert isinstance(blocks, LocalBlocks)
        if blocks.reduced:
            raise RuntimeError("a map's states are reduced once")
        blocks.reduced = True

        def run() -> Any:
            folds = _Folds(aggregation, self._runs())
            for i, state in self._run(blocks, fold=True):
                folds.add(i, state)
            return folds.root(*args)

        return LocalValue(run)

    def compute(self, *handles: Blocks | Value, keep: Sequence[Blocks] = ()) -> list[Any]:
        for blocks in keep:
            assert isinstance(blocks, LocalBlocks)
            blocks.kept = True
        out = [h.value if isinstance(h, LocalValue) else list(self._finished(h)) for h in handles]
        # Checked once every handle has run: a reduction listed before its
        # blocks takes their states in this very call.
        if any(isinstance(h, LocalBlocks) and h.states_dropped for h in handles):
            raise RuntimeError("a reduction took these blocks' states: the one-machine engines keep only their rows")
        return out

    def to_array(self, blocks: Blocks, dtype: Any, row_shape: tuple[int, ...] | None = None) -> np.ndarray:
        results = self._finished(blocks)
        if blocks.out is not None:
            array = self.columns[blocks.out.index]
        else:
            array = np.concatenate([np.asarray(data_of(r)).reshape(-1) for r in results]).astype(dtype, copy=False)
        return array if row_shape is None else array.reshape((-1, *row_shape))

    def _run(self, blocks: LocalBlocks, fold: bool = False) -> Iterator[tuple[int, Any]]:
        """The blocks' ``(block, result)`` pairs as :meth:`_map` yields them,
        run now unless their results are held already, keeping for later
        stages a column's rows (a view of it) or the results whole.  With
        ``fold`` (a reduction taking the states as they come), results are
        kept only where a compute asked (as the Dask engine keeps them), a
        column map's states never; a reduced map's blocks not kept run
        again for a later map."""
        if blocks.results is not None:
            yield from enumerate(blocks.results)
            return
        for arg in blocks.args:
            if isinstance(arg, LocalBlocks):
                self._finished(arg)
        n = len(self.plan.bounds)
        tasks = [self._task(i, blocks) for i in range(n)]
        self.started = True
        give_back_freed_memory()
        results = self._map(tasks)
        if self.progress and blocks.label is not None:
            results = _progress(results, n, blocks.label)
        drop = fold and blocks.out is not None
        keep = not fold or blocks.kept or drop
        kept: list[Any] = [None] * n
        for i, result in results:
            yield i, result
            if keep:
                kept[i] = None if drop else result
        blocks.results = kept if keep else None
        blocks.states_dropped = drop

    def _finished(self, blocks: LocalBlocks) -> list[Any]:
        """The blocks' results, run now unless kept."""
        for _ in self._run(blocks):
            pass
        return blocks.results

    def _runs(self) -> list[tuple[int, int]]:
        """Runs of blocks ``(first, end)`` whose results :meth:`_map` yields
        in block order, the runs in any order between them."""
        return [(0, len(self.plan.bounds))]

    def _task(self, i: int, blocks: LocalBlocks) -> tuple:
        """Block ``i``'s task as sent to the process that runs it:
        ``(i, task, args, out)``."""
        args = []
        for arg in blocks.args:
            if isinstance(arg, LocalBlocks):
                arg = _Rows(arg.out.index) if arg.out is not None else data_of(arg.results[i])
            elif isinstance(arg, LocalValue):
                arg = data_of(arg.value)
            elif arg is START:
                arg = self.starts[i]
            elif isinstance(arg, PerBlock):
                arg = arg.values[i]
            args.append(arg)
        return i, blocks.task, tuple(args), None if blocks.out is None else blocks.out.index

    def call(self, i: int, task: Callable, args: tuple, out: int | None) -> Any:
        """Run block ``i``'s task (see :meth:`_task`) here."""
        a, b = self.item_bounds[i]
        readers, resolved = [], []
        for arg in args:
            if isinstance(arg, _Rows):
                arg = self.columns[arg.column][a:b]
            elif arg is INPUTS:
                bounds = self.plan.bounds[i]
                arg = BlockReader(self._labels_rows, self._probs_rows, *bounds, self.kind, self.items_per_row,
                                  release=self._release)
                readers.append(arg)
            resolved.append(arg)
        result = task(*resolved) if out is None else task(*resolved, out=self.columns[out][a:b]).state
        for reader in readers:
            reader.close()
        return result

    def _release(self, start: int, stop: int) -> None:
        for source, rows in ((self.labels, self._labels_rows), (self.pred_probs, self._probs_rows)):
            if rows is not source:
                source.release(start, stop)

    def _map(self, tasks: Sequence[tuple]) -> Iterable[tuple[int, Any]]:
        return ((task[0], self.call(*task)) for task in tasks)


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a reason to fail
        return items
    return tqdm(items, total=total, desc=desc, unit="block", file=sys.stderr)
