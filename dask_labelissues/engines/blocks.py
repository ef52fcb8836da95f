"""Blocks: how a job's rows are cut, and how a task reads its block.

:func:`plan_blocks` is the one place a job's blocks (bounds, the pieces a
block is read in, runs of a dask array's small chunks) and kernel are
decided, from the :class:`BlockConfig` the engines fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .. import fused, numba_cache
from ..kernels import ScoreSpec
from ..kinds import ROWS, Kind

#: About how many bytes of pred_probs a block holds.
TARGET_BLOCK_BYTES = 64 * 2**20

#: Most pieces of ``read_rows`` in one block of :func:`dask_block_rows`.
MAX_PIECES_PER_BLOCK = 4

#: Jobs with fewer cells (N x K) than this run the numpy kernel unless numba
#: is loaded in this process already: loading numba's cached kernels costs
#: a fresh process more than numpy's extra time (docs/design.md, "Kernels").
NUMBA_MIN_CELLS = 50_000_000

#: Jobs with fewer cells than this run the numpy kernel while numba's cache
#: lacks the kernels (:func:`dask_labelissues.numba_cache.compiled`),
#: compiled meanwhile in the background: below it, numpy's extra time is
#: less than the compile (docs/design.md, "Kernels").
COLD_NUMBA_MAX_CELLS = 1_000_000_000

#: Workers with less memory than this run the pure-numpy kernel: importing
#: numba and loading its compiled code costs a process about 150 MB.
SMALL_WORKER_BYTES = 1 << 30


@dataclass(frozen=True)
class BlockConfig:
    """What the engines know of a job when they plan its blocks, in stored
    rows of pred_probs (an image's pixels are one row)."""

    n_rows: int
    #: Bytes of one stored row of pred_probs.
    row_bytes: int
    #: Bytes of one stored row's pass-one records.
    record_bytes: int
    spec: ScoreSpec
    #: Items (rows x items per row) times classes: the job's size.
    cells: int
    #: Rows per storage chunk of pred_probs (files, stores), if any.
    storage_rows: int | None = None
    #: Rows per block the user asked for.
    chunk_rows: int | None = None
    #: The workers' smallest memory limit (a Dask cluster), if known.
    worker_memory: int | None = None
    #: The memory this process may use, where the tasks run in it or in forks
    #: of it (:func:`~dask_labelissues.system.usable_memory`).
    process_memory: int | None = None
    #: Worker threads running the blocks, 0 if unknown.
    threads: int = 0
    #: The tasks read the inputs themselves (files and stores on Dask).
    reads_in_tasks: bool = False
    #: pred_probs is read once: blocks may hold several pieces.
    single_read: bool = True
    #: A dask array input's own row chunks, kept unless ``chunk_rows``.
    array_chunks: tuple[int, ...] | None = None
    #: The job runs in this process (its numba kernels may be loaded).
    in_process: bool = True
    #: Problems run side by side on every block (multi-label's classes,
    #: :mod:`dask_labelissues.lockstep`): the kernel is chosen for ``cells``
    #: times this, as each problem's kernels run over the whole block, and
    #: such jobs never run numpy while numba compiles, which would cost them
    #: far more than the compile (docs/design.md, "Kernels").
    problems: int = 1
    #: The job may run numpy while numba compiles (:func:`choose_kernel`).
    numpy_while_compiling: bool = True
    #: Rows a block may end at (besides ``n_rows``), non-decreasing: a token
    #: job's sentence offsets, so that no sentence is split; None: any row.
    cuts: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def of_job(cls, pred_probs: Any, spec: ScoreSpec, kind: Kind = ROWS, **known: Any) -> "BlockConfig":
        """The config of a job on ``pred_probs`` (its shape, dtype and
        ``storage_rows`` if any) with the kernel ``spec``, plus ``known``."""
        shape = tuple(int(s) for s in pred_probs.shape)
        return cls(
            n_rows=shape[0],
            row_bytes=int(np.prod(shape[1:])) * np.dtype(pred_probs.dtype).itemsize,
            record_bytes=kind.items_per_row(shape) * spec.record_dtype().itemsize,
            spec=spec,
            cells=int(np.prod(shape)),
            storage_rows=getattr(pred_probs, "storage_rows", None),
            **known,
        )


@dataclass(frozen=True)
class BlockPlan:
    """A job's blocks, in stored rows, and the kernel its tasks run."""

    bounds: tuple[tuple[int, int], ...]
    spec: ScoreSpec
    #: Scan a block in pieces cut at multiples of this many rows; None: whole.
    read_rows: int | None = None
    #: Blocks as runs of a dask array's chunks ``(first, end)``; None: one each.
    groups: tuple[tuple[int, int], ...] | None = None

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.bounds)


def plan_blocks(config: BlockConfig) -> BlockPlan:
    """The blocks of a job, and the kernel its tasks run.

    - Blocks hold about :data:`TARGET_BLOCK_BYTES` of pred_probs in whole
      storage chunks, less where a worker's or this process's memory is
      small (a block and its temporaries must fit each thread several
      times over), or ``chunk_rows``; in a multiple of the threads where
      known (:func:`balanced_chunks`).  Where the tasks read files or
      stores and pred_probs is read once, a block holds several such
      pieces (:func:`dask_block_rows`).
    - A dask array's own chunks are kept, small ones in runs of about the
      automatic size (a block costs milliseconds of scheduling).
    - The kernel: :func:`choose_kernel`, and numpy on small workers.
    - With ``cuts``, block ends move to the nearest cut (:func:`snap_blocks`).
    """
    c = config
    if c.chunk_rows is not None and c.chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {c.chunk_rows}")
    spec = choose_kernel(c.spec, c.cells * c.problems, in_process=c.in_process,
                         numpy_while_compiling=c.numpy_while_compiling and c.problems == 1)
    target = TARGET_BLOCK_BYTES
    if c.worker_memory:
        target = min(target, max(c.worker_memory // 16, 1 << 20))
        if c.worker_memory < SMALL_WORKER_BYTES:
            spec = replace(spec, kernel="numpy")
    if c.process_memory:
        # A multi-label task holds its block about four times over (read,
        # copied column-major, labels, a problem's records).
        target = min(target, max(c.process_memory // (8 * max(c.threads, 1)), 1 << 20))
    read_rows = auto_chunk_rows(c.row_bytes, c.storage_rows, target)
    groups = None
    if c.chunk_rows is not None:
        chunks = even_chunks(c.n_rows, c.chunk_rows)
        read_rows = read_rows if c.reads_in_tasks else None
    elif c.reads_in_tasks and c.single_read:
        rows = dask_block_rows(c.n_rows, read_rows, c.row_bytes, c.record_bytes, c.threads)
        chunks = balanced_chunks(c.n_rows, rows, read_rows, c.threads)
    elif c.array_chunks is not None and not c.reads_in_tasks:
        chunks, read_rows = c.array_chunks, None
        rows = auto_chunk_rows(c.row_bytes, None, target)
        rows = min(rows, max(1, -(-c.n_rows // (2 * max(c.threads, 1)))))
        if chunks and 2 * max(chunks) <= rows:
            groups = tuple(group_chunks(chunks, rows))
            chunks = tuple(sum(chunks[a:b]) for a, b in groups)
    else:  # each block read whole, in one piece
        chunks, read_rows = balanced_chunks(c.n_rows, read_rows, c.storage_rows, c.threads), None
    plan = BlockPlan(block_bounds(chunks), spec, read_rows, groups)
    return plan if c.cuts is None else snap_blocks(plan, c.n_rows, c.cuts)


def snap_blocks(plan: BlockPlan, n_rows: int, cuts: np.ndarray) -> BlockPlan:
    """``plan`` with each block end moved to the nearest of ``cuts``
    (:func:`snap_ends`), by at most half the sentence it falls in.

    Where ends move, a dask array is rechunked to the blocks, and both
    blocks around an end inside a storage chunk decode that chunk: the
    price of whole sentences.  An end that is a cut already does not move.
    """
    ends = snap_ends(np.cumsum(plan.chunks)[:-1], cuts, n_rows)
    bounds = block_bounds(np.diff(np.concatenate([[0], ends, [n_rows]])))
    return plan if bounds == plan.bounds else replace(plan, bounds=bounds, groups=None)


def snap_ends(ends: np.ndarray, cuts: np.ndarray, n_rows: int) -> np.ndarray:
    """Block ends, each moved to the nearest cut strictly inside ``0:n_rows``
    (the lower one of two as near), without repeats, ascending.

    ``cuts`` are non-decreasing (sentence offsets: repeats for empty
    sentences).  Ends in one sentence all move to its start or its end, so
    a sentence longer than a block stays whole, in one block; with no cut
    inside, there are no ends (one block).
    """
    cuts = np.asarray(cuts, dtype=np.int64)
    inner = cuts[np.searchsorted(cuts, 0, side="right") : np.searchsorted(cuts, n_rows, side="left")]
    ends = np.asarray(ends, dtype=np.int64)
    if inner.size == 0 or ends.size == 0:
        return np.zeros(0, dtype=np.int64)
    at = np.searchsorted(inner, ends, side="left")
    below = inner[np.maximum(at - 1, 0)]
    above = inner[np.minimum(at, inner.size - 1)]
    return np.unique(np.where(np.abs(ends - below) <= np.abs(above - ends), below, above))


def choose_kernel(spec: ScoreSpec, cells: int, *, in_process: bool, numpy_while_compiling: bool = True) -> ScoreSpec:
    """``spec`` with the kernel a job of ``cells`` (N x K, times its
    problems) values should run.

    Explicit kernels are kept.  ``"auto"`` (numba where it imports) becomes
    ``"numpy"`` below :data:`NUMBA_MIN_CELLS` unless numba is loaded in this
    process, or, for an ``in_process`` job that allows it
    (``numpy_while_compiling``), below :data:`COLD_NUMBA_MAX_CELLS` while
    numba's kernels compile in the background
    (:func:`dask_labelissues.numba_cache.compile_in_background`, started
    here).  Both kernels give the same bits.
    """
    if spec.kernel != "auto" or (in_process and fused.numba_loaded()):
        return spec
    if cells < NUMBA_MIN_CELLS:
        return replace(spec, kernel="numpy")
    if (in_process and numpy_while_compiling and cells < COLD_NUMBA_MAX_CELLS and fused.numba_allowed()
            and not numba_cache.compiled() and numba_cache.compile_in_background()):
        return replace(spec, kernel="numpy")
    return spec


def auto_chunk_rows(row_bytes: int, storage_rows: int | None, target_bytes: int = TARGET_BLOCK_BYTES) -> int:
    """Rows per block: about ``target_bytes`` of pred_probs, rounded to whole
    storage chunks so no chunk is decoded twice."""
    rows = max(1, target_bytes // max(row_bytes, 1))
    if storage_rows:
        rows = max(storage_rows, rows // storage_rows * storage_rows)
    return int(rows)


def dask_block_rows(n_rows: int, read_rows: int, row_bytes: int, record_bytes: int, threads: int) -> int:
    """Rows per block when the tasks read file or store inputs themselves,
    in pieces of ``read_rows`` (:func:`auto_chunk_rows`).

    A task costs the scheduler and a worker milliseconds of CPU, so a block
    holds several pieces, but leaves at least two blocks per worker thread
    (``threads``; 0 if unknown: one piece a block), at most
    :data:`MAX_PIECES_PER_BLOCK`, and its records (``record_bytes`` a row)
    no larger than one piece (``row_bytes`` a row).
    """
    if threads < 1 or read_rows < 1:
        return max(read_rows, 1)
    pieces = -(-n_rows // read_rows)
    most = max(1, min(MAX_PIECES_PER_BLOCK, row_bytes // max(record_bytes, 1)))
    return read_rows * max(1, min(most, pieces // (2 * threads)))


def balanced_chunks(n_rows: int, rows: int, unit: int | None, threads: int) -> tuple[int, ...]:
    """Block sizes of at most ``rows`` rows in whole units of ``unit`` rows
    (storage chunks, or a task's pieces; the last block may end inside one),
    as even as whole units allow, and a multiple of ``threads`` blocks where
    there are units enough: a stage ends when its busiest thread does.  With
    one thread or none known, or data within one block: blocks of ``rows``.
    """
    unit = max(1, unit or 1)
    units = -(-n_rows // unit)
    blocks = -(-units // max(1, rows // unit))
    if threads < 2 or blocks < 2:  # data that fits one block is not cut for idle threads
        return even_chunks(n_rows, rows)
    blocks = min(units, -(-blocks // threads) * threads)
    base, extra = divmod(units, blocks)
    sizes = [(base + (i < extra)) * unit for i in range(blocks)]
    sizes[-1] -= units * unit - n_rows
    return tuple(sizes)


def block_bounds(chunks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``((start, stop), ...)`` of consecutive blocks with the given sizes."""
    stops = np.cumsum(chunks).tolist()
    return tuple(zip([0, *stops[:-1]], stops))


def even_chunks(n_rows: int, chunk_rows: int) -> tuple[int, ...]:
    """Row chunk sizes of ``chunk_rows`` each, the last one shorter."""
    full, rest = divmod(n_rows, chunk_rows)
    return (chunk_rows,) * full + ((rest,) if rest else ())


def piece_bounds(start: int, stop: int, piece_rows: int | None) -> list[tuple[int, int]]:
    """Rows ``start:stop`` cut where a row index is a multiple of
    ``piece_rows`` (None: one piece), the pieces a block is read in.

    On that grid, not from ``start``: ``piece_rows`` is whole storage
    chunks, so no two pieces of a block decode the same chunk.
    """
    if piece_rows is None or stop <= start:
        return [(start, stop)]
    first = (start // piece_rows + 1) * piece_rows
    edges = [start, *range(first, stop, piece_rows), stop]
    return list(zip(edges[:-1], edges[1:]))


def group_chunks(chunks: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """Consecutive chunks grouped into blocks of about ``rows`` rows:
    ``[(first chunk, end chunk), ...]``.  A group closes once it holds
    ``rows`` rows, so every group but the last holds ``rows`` to ``rows``
    plus one chunk.
    """
    groups, first, held = [], 0, 0
    for i, size in enumerate(chunks):
        held += size
        if held >= rows:
            groups.append((first, i + 1))
            first, held = i + 1, 0
    if first < len(chunks):
        groups.append((first, len(chunks)))
    return groups


def join_adjacent(parts: Sequence[np.ndarray]) -> np.ndarray | None:
    """Consecutive row pieces as one array, without a copy, where they lie
    end to end in one C-contiguous buffer (as the chunks of a dask array of
    one numpy array or memory map do), so that a block of many small chunks
    is scanned in one kernel call; else None.
    """
    first = parts[0]
    if len(parts) == 1:
        return first
    if not all(isinstance(part, np.ndarray) for part in parts) or first.dtype.hasobject:
        return None
    root = first
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags.c_contiguous:
        return None
    start = end = first.ctypes.data
    for part in parts:
        if (
            part.dtype != first.dtype or part.shape[1:] != first.shape[1:]
            or not part.flags.c_contiguous or part.ctypes.data != end
        ):
            return None
        end += part.nbytes
    offset = start - root.ctypes.data
    if offset < 0 or end - root.ctypes.data > root.nbytes:
        return None
    rows = sum(part.shape[0] for part in parts)
    return np.ndarray((rows, *first.shape[1:]), dtype=first.dtype, buffer=root, offset=offset)


class BlockReader:
    """One block of the job's inputs, as its task reads it: items of
    ``kind`` (:mod:`dask_labelissues.kinds`).

    ``labels`` and ``probs`` are sources sliced by stored rows
    ``start:stop`` in the task (files and stores: read where the block is
    used, never held between tasks), or lists of the block's chunks
    already read (a dask array's).
    """

    def __init__(
        self, labels: Any, probs: Any, start: int, stop: int, kind: Kind = ROWS, items_per_row: int = 1,
        read_rows: int | None = None, *, release: Callable[[int, int], None] | None = None,
    ) -> None:
        self._labels, self._probs = labels, probs
        self.start, self.stop = start, stop
        self.kind = kind
        self.items_per_row = items_per_row
        self.read_rows = read_rows
        self._release = release
        self._read: dict[int, np.ndarray] = {}

    @property
    def item_start(self) -> int:
        """The job's index of the block's first item."""
        return self.start * self.items_per_row

    def _whole(self, source: Any) -> np.ndarray:
        # Read once per task: a task may ask for a block both as items and
        # as stored (a pooling kind checks the stored values it pooled).
        key = id(source)
        if key not in self._read:
            if isinstance(source, list):
                joined = join_adjacent(source)
                self._read[key] = joined if joined is not None else np.concatenate(source)
            else:
                self._read[key] = np.asarray(source[self.start : self.stop])
        return self._read[key]

    def labels(self) -> np.ndarray:
        """The block's labels, one per item."""
        return self.kind.labels(self._whole(self._labels))

    def probs(self) -> np.ndarray:
        """The block's pred_probs, items x classes, at once."""
        return self._items(self._whole(self._probs), 0)

    def stored_labels(self) -> np.ndarray:
        """The block's labels as stored (an image's, not its items)."""
        return self._whole(self._labels)

    def stored_probs(self) -> np.ndarray:
        """The block's pred_probs as stored."""
        return self._whole(self._probs)

    def _items(self, probs: np.ndarray, first_row: int, scan: bool = False) -> Any:
        """Stored rows ``first_row:`` (of the block) of pred_probs as items
        (as the scan reads them, with ``scan``: :meth:`Kind.scan_view`)."""
        read = self.kind.scan_view if scan else self.kind.probs
        if not self.kind.probs_need_labels:
            return read(probs)
        return read(probs, self._whole(self._labels)[first_row : first_row + len(probs)])

    def pieces(self) -> Iterator[tuple[int, Any]]:
        """``(first item from the block's start, pred_probs)`` of each piece
        of the block in turn, as pass one's scan reads them
        (:meth:`Kind.scan_view`); one piece is held at a time."""
        parts: Iterable[np.ndarray]
        if isinstance(self._probs, list):
            joined = join_adjacent(self._probs)
            parts = [joined] if joined is not None else self._probs
        elif len(bounds := piece_bounds(self.start, self.stop, self.read_rows)) == 1:
            parts = [self._whole(self._probs)]
        else:
            parts = (np.asarray(self._probs[a:b]) for a, b in bounds)
        row = 0
        for part in parts:
            rows, items = len(part), self._items(part, row, scan=True)
            del part  # freed before the next piece is read, where the caller drops it too
            yield row * self.items_per_row, items
            row, items = row + rows, None

    def views(
        self, kinds: Sequence[Kind], *, layout: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> list["BlockReader"]:
        """The block, read once and whole, as items of each of ``kinds``
        (each class of multi-label rows, say), one reader a kind; ``layout``
        is applied once to the stored labels and pred_probs first.  Only the
        engine's reader closes the block: the views hold no pages
        (``layout``: :func:`dask_labelissues.lockstep.column_major_copy`)."""
        labels, probs = self.stored_labels(), self.stored_probs()
        if layout is not None:
            labels, probs = layout(labels), layout(probs)
        # One-piece lists: a reader takes a list as pieces already read.
        n = self.items_per_row
        return [BlockReader([labels], [probs], self.start, self.stop, kind=kind, items_per_row=n) for kind in kinds]

    def close(self) -> None:
        """Let go of the block's pages of memory-mapped inputs, once read."""
        self._read.clear()
        if self._release is not None:
            self._release(self.start, self.stop)
