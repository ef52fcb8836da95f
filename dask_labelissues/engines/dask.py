"""The Dask engine: blocks are the row chunks of dask arrays.

Pass one runs one task per block that reads pred_probs (file and store
inputs are read inside the task itself, a piece of about 64 MB, in whole
storage chunks, at a time; a dask array's blocks come from its own graph)
and returns a :class:`Pair` of the block's records and its threshold
state; the records are persisted (kept in worker memory, spilled by Dask
if need be) and the states go up a tree of ``split_every``-way merges.
Pass two maps over the records, with the thresholds made by the last merge
of pass one's tree, and the selection's first bucket is gathered in the
same graph: the two passes and the usual selection are one graph,
with no stop at the client between them (two graphs for a score that reads
pred_probs again).  When the records hold the scores (no
``adjust_pred_probs``), T is the ``off_diagonal`` count and there are at
most :data:`OUTLOOK_MAX_CLASSES` classes, pass one's tree also picks a
bucket sure to hold the T lowest scores, and pass two's task per block
counts T and takes that bucket's rows at once
(:meth:`DaskDriver._outlook_passes`); otherwise pass two's tree picks the
bucket and a third stage takes its rows.  Further selection rounds, when a
bucket is too large, are tree reductions and per-block tasks over the
blocks' scores, so no process ever holds all N scores.  Each stage is one
graph layer of plain tasks (:func:`layer`), so
building a graph costs the client little even with tens of thousands of
blocks.

It runs on whatever scheduler is active: the ``client`` passed in, else
Dask's current default (a distributed Client, threads or processes).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph
from dask.sizeof import sizeof

from .. import filters, inputs, states
from ..filters import FilterSpec, JointState, MaskRule
from ..kernels import ScoreSpec
from ..states import CountState, HistogramState, OutlookState, ScoreState, ThresholdState, Winners
from .base import Driver, block_bounds, distributed_client, group_chunks, join_adjacent, piece_bounds

#: Fan-in of every tree reduction.
SPLIT_EVERY = 16

#: Most classes for which :meth:`DaskDriver._outlook_passes` runs.  Each kept
#: block also keeps its :class:`OutlookState`, K x 16 or more counts: at most
#: 128 KB up to here, where a block's records (32 bytes a row, about 64 MB of
#: pred_probs a block) are about 500 KB; with more classes the state would
#: outgrow the records it sits beside.
OUTLOOK_MAX_CLASSES = 1024


@dataclass(frozen=True)
class Pair:
    """A block task's two results as one task output: per-row ``data`` that
    stays on the worker, and the small ``state`` that goes up the tree.

    One output instead of two saves a ``getitem`` task per block (of the two
    ``delayed(..., nout=2)`` adds); the state reaches the tree reduction
    through a :func:`block_state` task, which runs beside the Pair.
    """

    data: Any
    state: Any


@sizeof.register(Pair)
def _sizeof_pair(pair: Pair) -> int:
    # Without this Dask would count a kept block as a few dozen bytes, and
    # neither spill it when memory runs short nor weigh moving it.
    return int(sizeof(pair.data)) + int(sizeof(pair.state))


def _data(x: Any) -> Any:
    return x.data if isinstance(x, Pair) else x


def block_state(pair: Pair) -> Any:
    """A block task's state, as a task of its own: it runs where the
    :class:`Pair` is, so only the state crosses the network to the merges
    (merging the Pairs themselves pulled every block's records to the
    merging worker)."""
    return pair.state


@functools.lru_cache(maxsize=None)
def block_task(fn: Callable) -> Callable:
    """``fn`` as a task that takes :class:`Pair` outputs for their data.

    Keeps ``fn``'s name, which Dask uses for the task keys a user sees on the
    dashboard; cached so every task of a stage shares one wrapper.
    """

    @functools.wraps(fn)
    def task(*args: Any) -> Any:
        return fn(*(_data(a) for a in args))

    return task


def _ref(arg: Any, deps: dict[Any, Delayed]) -> Any:
    """A task argument: a Delayed becomes its key (and a dependency)."""
    if isinstance(arg, Delayed):
        deps.setdefault(arg.key, arg)
        return arg.key
    if isinstance(arg, list):
        return [_ref(a, deps) for a in arg]
    return arg


def layer(fn: Callable, rows: Sequence[tuple]) -> list[Delayed]:
    """One task ``fn(*row)`` per row, as one graph layer; Delayed arguments
    (and lists of them) are passed by key.

    Built as a plain dict rather than with ``delayed(fn)(...)``, whose cost
    per call (tokenizing the arguments, merging the graphs of its inputs)
    grows with the inputs: a tree reduction over 77 blocks took 55 ms to
    build that way, and the graph of a billion-row job has tens of
    thousands of tasks.  Every literal argument is a number, an array or a
    plain object, never a key or a task.
    """
    name = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:16]}"
    deps: dict[Any, Delayed] = {}
    tasks = {(name, i): (fn, *(_ref(a, deps) for a in row)) for i, row in enumerate(rows)}
    graph = _with_inputs(name, tasks, deps.values())
    return [Delayed(key, graph, layer=name) for key in tasks]


def _with_inputs(name: str, tasks: dict, inputs: Iterable[Delayed]) -> HighLevelGraph:
    """The graph of layer ``name`` over the graphs of its ``inputs``.

    What ``HighLevelGraph.from_collections`` does, without its
    ``is_dask_collection`` check: on a Delayed that check asks for
    attributes a Delayed lacks, and each miss builds (and tokenizes) a new
    Delayed; that was most of the time it took to build each layer.
    """
    inputs = list(inputs)
    graph = merged_graph(inputs)
    layers = {**graph.layers, name: tasks}
    dependencies = {**graph.dependencies, name: {k for d in inputs for k in d.__dask_layers__()}}
    return HighLevelGraph(layers, dependencies)


def merged_graph(collections: Iterable[Delayed]) -> HighLevelGraph:
    """One graph holding the graphs of all ``collections``."""
    layers: dict[str, Any] = {}
    dependencies: dict[str, set] = {}
    # The graphs are held, not only their ids: a DelayedLeaf makes a new
    # graph each time it is asked, and a freed graph's id can come back as
    # the id of the next one, whose layers would then be left out.
    seen: dict[int, HighLevelGraph] = {}
    for d in collections:
        graph = d.dask
        if isinstance(graph, HighLevelGraph):
            if id(graph) in seen:  # the blocks of one stage share a graph
                continue
            seen[id(graph)] = graph
            layers.update(graph.layers)
            dependencies.update(graph.dependencies)
        else:
            (key,) = d.__dask_layers__()
            layers[key] = graph
            dependencies.setdefault(key, set())
    return HighLevelGraph(layers, dependencies)


#: A stage's common argument is copied into each of its tasks if all its
#: copies together pickle to at most this many bytes, else it is one key
#: (a limit per argument).
INLINE_BYTES = 1 << 20


def shared(value: Any, copies: int) -> Any:
    """An argument all ``copies`` tasks of a stage take.

    Small values (the spec, the thresholds of a job with few blocks) go into
    each task: a key of their own is a task that must run, and then travel
    to every other worker, before the stage can start.  Large ones, or many
    copies (tens of thousands of blocks), are one key.  Only small opaque
    objects and arrays come here (each copy is unpickled on its own), never
    containers, which Dask would search for tasks and keys.  The file and
    store row sources come here too
    (:func:`dask_labelissues.inputs.reads_in_tasks`): a copy reopens its
    file or store in its task, 0.02 to 0.33 ms more than a read from an
    open one (``.npy``, HDF5, Zarr).
    """
    if isinstance(value, (tuple, list, dict, set, frozenset)):
        raise TypeError(f"shared() takes opaque values, not {type(value).__name__}")
    try:
        small = len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)) * copies <= INLINE_BYTES
    except Exception:  # not picklable: fine for local schedulers, as one key
        small = False
    return value if small else delayed(value, pure=False)


def merge_states(
    pairs: Sequence[Delayed], combine: Callable, split_every: int, root: Callable | None = None, root_args: tuple = ()
) -> Delayed:
    """The tree reduction of the states of :class:`Pair` outputs, each taken
    out by a :func:`block_state` task beside its Pair (``root``: see
    :func:`tree_reduce`)."""
    return tree_reduce(layer(block_state, [(p,) for p in pairs]), combine, split_every, root, root_args)


def tree_reduce(
    parts: Sequence[Delayed], combine: Callable, split_every: int, root: Callable | None = None, root_args: tuple = ()
) -> Delayed:
    """Merge delayed states ``split_every`` at a time until one is left;
    always at least one merge, so the result is a state even for a single
    block.

    With ``root``, the last merge is ``root(states, *root_args)`` instead,
    which merges and also computes what the next stage needs from the
    merged state, in the same task: a task of its own would be one more
    trip through the scheduler on the way from one pass to the next.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    level = list(parts)
    while True:
        if root is not None and len(level) <= split_every:
            return layer(root, [(level, *root_args)])[0]
        level = layer(combine, [(level[i : i + split_every],) for i in range(0, len(level), split_every)])
        if len(level) == 1:
            return level[0]


def scan_block(
    labels: Any,
    probs: Any,
    start: int,
    spec: ScoreSpec,
    stop: int | None = None,
    outlook: bool = False,
    read_rows: int | None = None,
) -> Pair:
    """Pass one on a block (:func:`dask_labelissues.states.scan_block`).

    ``labels`` and ``probs`` may be lists of consecutive chunks (a block
    of a dask array's small chunks, :func:`~.base.group_chunks`), scanned
    one chunk at a time.  With ``stop``, ``labels`` and ``probs`` are row sources and rows
    ``start:stop`` are read here: reading where the block is scanned keeps
    the block out of worker memory between tasks and off the network, and
    saves two read tasks per block.  pred_probs is read, and scanned, in
    pieces cut at multiples of ``read_rows`` (:func:`~.base.piece_bounds`),
    so the task holds one piece of it at a time however large its block;
    the labels (a few bytes a row, chunked on a grid of their own) are read
    once.  With ``outlook``, the state is ``(threshold state, the block's
    OutlookState)``.
    """
    if stop is None and isinstance(probs, list):
        # A block of several chunks of a dask array: one view over them when
        # they lie end to end in memory, else scanned chunk by chunk into one
        # record buffer (no copy of the chunks into one block either way).
        labels = _concatenate(labels)
        joined = join_adjacent(probs)
        if joined is not None:
            probs = [joined]
        rec = np.empty(len(labels), dtype=spec.record_dtype())
        parts, a = [], 0
        for piece in probs:
            b = a + len(piece)
            parts.append(states.scan_block(labels[a:b], piece, start + a, spec, out=rec[a:b])[1])
            a = b
        state = parts[0] if len(parts) == 1 else ThresholdState.combine(parts)
    elif stop is None:
        rec, state = states.scan_block(labels, probs, start, spec)
    else:
        labels = np.asarray(labels[start:stop])
        rec = np.empty(stop - start, dtype=spec.record_dtype())
        parts = [
            states.scan_block(
                labels[a - start : b - start], probs[a:b], a, spec, out=rec[a - start : b - start]
            )[1]
            for a, b in piece_bounds(start, stop, read_rows)
        ]
        state = parts[0] if len(parts) == 1 else ThresholdState.combine(parts)
    if outlook:
        return Pair(rec, (state, OutlookState.chunk(rec, len(state.counts))))
    return Pair(rec, state)


def score_block(rec: Any, thresholds: Any, spec: ScoreSpec, *raw: Any) -> Pair:
    """Pass two on a block (:func:`dask_labelissues.states.score_block`).

    ``thresholds`` may come as the data of a :class:`Pair`
    (:func:`combine_thresholds`).  None (pass one found bad input): no
    scores, and a state that selects nothing.
    """
    thresholds = _data(thresholds)
    if thresholds is None:
        return Pair(None, ScoreState.empty())
    return Pair(*states.score_block(_data(rec), thresholds, spec, *raw))


def joint_block(rec: Any, probs: Any, thresholds: np.ndarray, fspec: FilterSpec, kernel: str) -> Pair:
    """A filter's second read of a block (:func:`dask_labelissues.filters.joint_block`)."""
    return Pair(*filters.joint_block(_data(rec), probs, thresholds, fspec, kernel))


#: Workers with less memory than this run the pure-numpy kernel: importing
#: numba and loading its compiled code costs a process about 150 MB.
SMALL_WORKER_BYTES = 1 << 30


def cluster_workers(client: Any) -> tuple[int | None, int]:
    """The smallest worker memory limit (None if none is set) and the total
    worker threads of a distributed ``client``; without one, Dask's local
    scheduler's threads."""
    if client is None:
        import dask.system

        return None, int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    limits = [m for m in limits if m > 0]
    threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
    return (min(limits) if limits else None), threads


def block_bytes_for(smallest: int | None) -> int:
    """Automatic block size: about 64 MB, less on workers with little memory.

    A block and its temporaries must fit a worker several times over, or a
    small memory limit would pause the worker instead of streaming.
    """
    target = inputs.TARGET_BLOCK_BYTES
    if smallest:
        target = min(target, max(smallest // 16, 1 << 20))
    return target


def dask_driver(
    labels: Any,
    pred_probs: Any,
    spec: ScoreSpec,
    fspec: FilterSpec | None,
    *,
    chunk_rows: int | None = None,
    client: Any = None,
    progress: bool = False,
) -> "DaskDriver":
    """The Dask engine's driver for a job, with its blocks and kernel chosen.

    Workers with less than :data:`SMALL_WORKER_BYTES` run the numpy kernel
    (``spec`` comes with the kernel the job's size calls for,
    :func:`~.plan.choose_kernel`).  File and store
    inputs are read inside the scan tasks, in pieces of about 64 MB in
    whole storage chunks (``read_rows``); when pass one is the only read of
    pred_probs and ``chunk_rows`` is not given, a block holds several
    pieces (:func:`dask_labelissues.inputs.dask_block_rows`).
    """
    client = distributed_client(client)
    smallest, threads = cluster_workers(client)
    n, k = (int(s) for s in pred_probs.shape)
    if smallest is not None and smallest < SMALL_WORKER_BYTES:
        spec = replace(spec, kernel="numpy")
    target = block_bytes_for(smallest)
    direct = inputs.reads_in_tasks(labels, pred_probs)
    read_rows = None
    if direct:
        itemsize = np.dtype(pred_probs.dtype).itemsize
        read_rows = inputs.auto_chunk_rows(k, itemsize, pred_probs.storage_rows, target)
        # Other reads of pred_probs (the adjusted margin's second pass,
        # a filter's) take a whole block at once: only a job the scan
        # reads for alone gets blocks of several pieces.
        single_read = not spec.rereads and (fspec is None or not fspec.needs_joint)
        if chunk_rows is None:
            chunk_rows = read_rows
            if single_read:
                chunk_rows = inputs.dask_block_rows(
                    n, read_rows, k * itemsize, spec.record_dtype().itemsize, threads
                )
    lab_d, probs_d = inputs.as_dask_arrays(labels, pred_probs, chunk_rows, target_bytes=target)
    groups = None
    if not direct and chunk_rows is None:
        # A dask array's own chunks, when small, are grouped into blocks of
        # about the automatic size: each block costs a few milliseconds of
        # scheduling whatever its size, which 2,000-row chunks multiply.
        rows = inputs.auto_chunk_rows(k, np.dtype(pred_probs.dtype).itemsize, None, target)
        rows = min(rows, max(1, -(-n // (2 * max(threads, 1)))))
        if 2 * max(probs_d.chunks[0]) <= rows:
            groups = group_chunks(probs_d.chunks[0], rows)
    return DaskDriver(
        lab_d, probs_d, spec, client=client, progress=progress,
        sources=(labels, pred_probs) if direct else None, read_rows=read_rows, groups=groups,
    )


#: Longest :func:`cancel_and_drain` waits for running tasks to end.
DRAIN_SECONDS = 60.0


def cancel_and_drain(client: Any, futures: Sequence[Any], graphs: Iterable[Any] | None = None) -> None:
    """Cancel ``futures`` and wait, up to :data:`DRAIN_SECONDS`, until no
    worker still runs a task of the dask collections ``graphs`` (None: any
    task).

    A worker finishes a task it has started even when it is cancelled: a
    store write would then land after its temporary store is removed.
    Never raises: a cluster that is gone runs nothing.
    """
    try:
        if futures:
            client.cancel(list(futures))
        deadline = time.monotonic() + DRAIN_SECONDS
        wanted = None
        if graphs is not None:
            wanted = sorted({_layer_name(k) for g in graphs for k in dict(g.__dask_graph__())})
        while time.monotonic() < deadline:
            if not any(client.run(_running_tasks, names=wanted).values()):
                return
            time.sleep(0.05)
    except Exception:
        return


def _running_tasks(dask_worker: Any, names: list[str] | None) -> list[str]:
    """This worker's tasks (of layers ``names``, if given) that it is running
    or still finishing after a cancel."""
    busy = ("executing", "long-running", "cancelled", "resumed")
    # Graph optimization renames fused layers around the original names
    # (``store-map-<token>`` runs as ``data-store-map-<token>``), whose
    # tokens are unique: a layer is ours when it holds one of the names.
    return [
        str(ts.key) for ts in list(dask_worker.state.tasks.values())
        if ts.state in busy and (names is None or any(n in _layer_name(ts.key) for n in names))
    ]


def _layer_name(key: Any) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


class DaskDriver(Driver):
    """Runs the job's block tasks as Dask graphs.

    Parameters
    ----------
    labels, pred_probs
        Dask arrays with the same row chunks; pred_probs in one column chunk.
    spec
        What to compute.
    client
        A ``distributed.Client`` to run on; None uses Dask's current scheduler.
    split_every
        Fan-in of the tree reductions.
    progress
        Show a progress bar on stderr for each pass.
    sources
        The row sources (files, Zarr arrays) the two dask arrays were made
        from, if any: pass one then reads each block inside its scan task
        instead of in separate read tasks.
    read_rows
        With ``sources``, the scan task reads its block in pieces cut at
        multiples of this many rows (whole storage chunks); None reads the
        block at once.  Blocks can then be larger than what a worker
        should hold of pred_probs at a time (see
        :func:`dask_labelissues.inputs.dask_block_rows`).
    groups
        Blocks as runs of the arrays' row chunks, ``[(first, end), ...]``
        (:func:`~.base.group_chunks`); None: one chunk a block.
    """

    def __init__(
        self,
        labels: da.Array,
        pred_probs: da.Array,
        spec: ScoreSpec,
        *,
        client: Any = None,
        split_every: int = SPLIT_EVERY,
        progress: bool = False,
        sources: tuple[Any, Any] | None = None,
        read_rows: int | None = None,
        groups: list[tuple[int, int]] | None = None,
    ) -> None:
        if labels.chunks[0] != pred_probs.chunks[0] or len(pred_probs.chunks[1]) != 1:
            raise ValueError("labels and pred_probs must share row chunks, one column chunk")
        self.labels = labels
        self.pred_probs = pred_probs
        self.spec = spec
        self.client = distributed_client(client)
        self.split_every = split_every
        self.progress = progress
        self.n_rows, self.n_classes = (int(s) for s in pred_probs.shape)
        chunks = pred_probs.chunks[0]
        self.groups = groups
        if groups is not None:
            chunks = tuple(sum(chunks[a:b]) for a, b in groups)
        self.chunks = chunks
        self.bounds = block_bounds(self.chunks)
        self.block_starts = [a for a, _ in self.bounds]
        self.sources = sources
        self.read_rows = read_rows
        # Per-block outputs, one Delayed per block: persisted Pairs on the
        # cluster, except score_blocks on the path of _outlook_passes, a
        # task per block that copies the scores out of the kept records.
        # Arrays over them are built only for the outputs.
        self.rec_blocks: list[Delayed] | None = None
        self.score_blocks: list[Delayed] | None = None
        self.joint_blocks: list[Delayed] | None = None
        # ((shift, prefix), rows) gathered by first_passes(select=True).
        self._prefetched: tuple[tuple[int, int], Winners] | None = None

    # Built only when a stage reads the arrays' own blocks: to_delayed()
    # optimizes the array's graph, and file inputs are read by the scan tasks.
    @functools.cached_property
    def _label_pieces(self) -> list[list[Delayed]]:
        return self._pieces(self.labels)

    @functools.cached_property
    def _prob_pieces(self) -> list[list[Delayed]]:
        return self._pieces(self.pred_probs)

    def _pieces(self, array: da.Array) -> list[list[Delayed]]:
        """Each block's chunks of ``array``, in order."""
        chunks = array.to_delayed().ravel().tolist()
        groups = self.groups or [(i, i + 1) for i in range(len(chunks))]
        return [chunks[a:b] for a, b in groups]

    # The stages after pass one that read the inputs again take a block
    # whole: a block of several chunks is joined by a task of its own.
    @functools.cached_property
    def _label_blocks(self) -> list[Delayed]:
        return _joined(self._label_pieces)

    @functools.cached_property
    def _prob_blocks(self) -> list[Delayed]:
        return _joined(self._prob_pieces)

    # -- scheduling ----------------------------------------------------------
    @contextlib.contextmanager
    def _local_bar(self) -> Iterator[None]:
        if self.progress and self.client is None:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                yield
        else:
            yield

    def _persist(self, blocks: list[Delayed], wanted: list[Delayed]) -> tuple[list[Delayed], list[Any]]:
        """Persist per-block outputs and compute the ``wanted`` values (merged
        states, a first bucket's rows) in one graph: the blocks stay on the
        cluster, the values come back."""
        # No graph optimization: fusing would give the blocks and the merged
        # state separate copies of the block task, running pass one twice.
        if self.client is not None:
            # The graph as it is (Client.get does not optimize it), sent as
            # one graph.  Client.persist first makes and tokenizes an
            # expression of each Delayed: sending the first graph of a job
            # on (a) took the client 11 to 14 ms that way, 3 to 6 ms this way.
            everything = [*blocks, *wanted]
            futures = self.client.get(merged_graph(everything), [d.key for d in everything], sync=False)
            if self.progress:
                from distributed import progress

                progress(futures, notebook=False)
            self._watch(futures)
            values = self.client.gather(futures[len(blocks):])
            # As Client.persist returns a Delayed (its key, on a future), but
            # all the blocks' futures in one shared layer: a graph over
            # thousands of kept blocks then has one layer for them, not one
            # each (the scheduler's intake of such graphs grows with layers
            # times keys).
            kept = futures[: len(blocks)]
            name = f"kept-{uuid.uuid4().hex[:16]}"
            graph = HighLevelGraph({name: {f.key: f for f in kept}}, {name: set()})
            return [Delayed(f.key, graph, layer=name) for f in kept], list(values)
        with self._local_bar():
            out = dask.persist(*blocks, *wanted, optimize_graph=False)
        values = dask.compute(*out[len(blocks):])
        return list(out[: len(blocks)]), list(values)

    def _compute(self, *collections: Any) -> tuple:
        if self.client is not None:
            futures = self.client.compute(list(collections))
            self._watch(futures)
            return tuple(self.client.gather(futures))
        return dask.compute(*collections)

    def _watch(self, futures: list) -> None:
        """Wait for ``futures``, failing if the cluster has no workers for too long.

        Dask waits forever for workers to return; a batch job should not, so
        after ``labelissues.no-workers-timeout`` seconds (default 60) without
        a single worker the job is cancelled with a clear error.
        """
        limit = float(dask.config.get("labelissues.no-workers-timeout", 60))
        since: float | None = None
        for future in futures:
            while future.status != "finished":  # read locally: no round trip
                try:
                    # Waits on this future's own client (not the default one)
                    # and moves no data; a task error is raised here.
                    if future.exception(timeout=1.0) is not None:
                        future.result()
                    break
                except TimeoutError:
                    pass
                if self.client.nthreads():
                    since = None
                    continue
                since = since if since is not None else time.monotonic()
                if time.monotonic() - since > limit:
                    self.client.cancel(futures)
                    raise RuntimeError(
                        f"the Dask cluster at {self.client.scheduler.address} has had no "
                        f"workers for {limit:g} s; the job was stopped"
                    )

    def _array(self, blocks: Sequence[Delayed], dtype: Any) -> da.Array:
        """One array over per-block outputs (the data of :class:`Pair` outputs)."""
        parts = layer(_data, [(b,) for b in blocks])
        # The layer's keys are (name, i), as a dask array's chunks are named.
        return da.Array(parts[0].dask, parts[0].key[0], chunks=(tuple(self.chunks),), dtype=dtype)

    # -- stages --------------------------------------------------------------
    def _scan_layer(self, outlook: bool = False) -> list[Delayed]:
        """Pass one's tasks, one per block (``outlook``: see :func:`scan_block`)."""
        n = len(self.bounds)
        spec = shared(self.spec, n)
        if self.sources is not None:
            # Copies in every task while they pickle small: as keys of their
            # own they were two more tasks, which each worker but one then
            # had to fetch before its first scan.
            lab_src, prob_src = (shared(src, n) for src in self.sources)
            rows = [(lab_src, prob_src, start, spec, stop, outlook, self.read_rows) for start, stop in self.bounds]
        else:
            rows = [
                (lab, prob, start, spec, None, outlook)
                for (start, _), lab, prob in zip(self.bounds, self._label_pieces, self._prob_pieces)
            ]
        return layer(scan_block, rows)

    def _score_layer(self, recs: Sequence[Delayed], thresholds: Any) -> list[Delayed]:
        """Pass two's tasks, one per block, over pass one's ``recs``."""
        n = len(self.bounds)
        spec = shared(self.spec, n)
        # The adjusted margin needs pred_probs cell by cell: read it again.
        if self.spec.rereads:
            rows = [
                (rec, thresholds, spec, lab, prob)
                for rec, lab, prob in zip(recs, self._label_blocks, self._prob_blocks)
            ]
        else:
            rows = [(rec, thresholds, spec) for rec in recs]
        return layer(score_block, rows)

    def scan(self) -> ThresholdState:
        pairs = self._scan_layer()
        merged = merge_states(pairs, ThresholdState.combine, self.split_every)
        # One graph for both, so each block of pred_probs is read by one task.
        self.rec_blocks, (state,) = self._persist(pairs, [merged])
        return state

    def score(self, thresholds: np.ndarray) -> ScoreState:
        assert self.rec_blocks is not None, "scan() first"
        pairs = self._score_layer(self.rec_blocks, shared(thresholds, len(self.bounds)))
        merged = merge_states(pairs, ScoreState.combine, self.split_every)
        self.score_blocks, (state,) = self._persist(pairs, [merged])
        return state

    def first_passes(self, select: bool) -> tuple[ThresholdState, ScoreState]:
        """Both passes, and with ``select`` the rows of the selection's first
        bucket, as one graph.

        The last merge of pass one's tree also makes the thresholds, and
        the last merge of pass two's picks the first bucket, so the workers
        go from one stage to the next without waiting for the client (or,
        for the default count and scores, pass one's tree picks the bucket
        and pass two takes its rows: :meth:`_outlook_passes`).  Each
        separate stage had cost a round trip through the client (gather the
        state, build and send the next graph) during which the workers sat
        idle.  Bad input found in pass one leaves the thresholds empty
        and pass two idle, and its error is raised here, on the client.

        A score that reads pred_probs again runs the passes as two graphs,
        with no bucket gathered ahead.  In one graph, each block's second
        read would either be the first read's task (an array input: the
        same key), whose output Dask would hold until pass two, or a task
        with no inputs that Dask may run early and hold just as long:
        every block of pred_probs in memory.
        """
        self._prefetched = None
        if self.spec.rereads:
            return super().first_passes(select)
        outlook = not self.spec.adjust_pred_probs and self.spec.estimation_method == "off_diagonal"
        if select and outlook and self.n_classes <= OUTLOOK_MAX_CLASSES:
            return self._outlook_passes()
        scan_pairs = self._scan_layer()
        # Pair(thresholds, merged state): the score tasks take the first.
        scan_root = merge_states(scan_pairs, ThresholdState.combine, self.split_every, combine_thresholds)
        score_pairs = self._score_layer(scan_pairs, scan_root)
        if select:
            # Pair(first bucket, merged state): the bucket's row tasks take the first.
            args = (self.spec.estimation_method, self.n_rows)
            score_root = merge_states(score_pairs, ScoreState.combine, self.split_every, combine_first_bucket, args)
            rows = [
                (rec, sc, score_root, start)
                for rec, sc, (start, _) in zip(scan_pairs, score_pairs, self.bounds)
            ]
            wanted = [scan_root, score_root, *layer(block_task(_bucket_rows), rows)]
        else:
            wanted = [scan_root, merge_states(score_pairs, ScoreState.combine, self.split_every)]
        n = len(self.bounds)
        kept, small = self._persist([*scan_pairs, *score_pairs], wanted)
        self.rec_blocks, self.score_blocks = kept[:n], kept[n:]
        scan, score, *rows_gathered = small
        scan = scan.state
        scan.raise_problem()
        if select:
            bucket, score = score.data, score.state
            if bucket is not None:
                self._prefetched = (bucket, Winners.combine(rows_gathered))
        return scan, score

    def _outlook_passes(self) -> tuple[ThresholdState, ScoreState]:
        """Both passes and the first bucket's rows as one stage after pass one,
        for scores that pass one's records already hold.

        Pass one's tasks also make each block's
        :class:`~dask_labelissues.states.OutlookState`; the root of its tree
        makes the thresholds and, from the merged outlook, a bucket whose
        rows include the T lowest scores whatever T turns out to be
        (:meth:`OutlookState.bucket`).  Then one task per block counts T
        and takes that bucket's rows
        (:func:`dask_labelissues.states.outlook_count_block`), and the
        client gets both.  The selection then finds its bucket's rows among
        them (:meth:`gather_prefix`).  Against :meth:`first_passes`'s other
        graph, this has no pass-two tree and no stage after pass two: from
        the end of pass one to the end of the last task, 2 workers on (a)
        took 0.24 s there, for 0.08 s of work each, and 0.12 s this way, for
        0.06 s each (task-stream traces, medians of 4 jobs).

        The scores are the records' own (one ``float64`` copy per block for
        each later stage that reads them), so none are kept on the cluster.
        """
        n = len(self.bounds)
        spec = shared(self.spec, n)
        scan_pairs = self._scan_layer(outlook=True)
        root = merge_states(
            scan_pairs, combine_scan_outlook, self.split_every, combine_thresholds_outlook, (self.n_rows,)
        )
        counts = layer(
            block_task(count_block),
            [(rec, root, spec, start) for rec, (start, _) in zip(scan_pairs, self.bounds)],
        )
        self.rec_blocks, (root, *parts) = self._persist(scan_pairs, [root, *counts])
        scan, outlook = root.state
        scan.raise_problem()
        thresholds, bucket = root.data
        common = shared(thresholds, n)
        self.score_blocks = layer(block_task(states.block_scores), [(rec, common, spec) for rec in self.rec_blocks])
        if bucket is not None:
            self._prefetched = (bucket, Winners.combine([rows for _, rows in parts]))
        return scan, ScoreState(CountState.combine([c for c, _ in parts]), outlook.digits)

    def histogram(self, round_index: int, prefix: int) -> HistogramState:
        assert self.score_blocks is not None, "score() first"
        parts = layer(block_task(HistogramState.chunk), [(b, round_index, prefix) for b in self.score_blocks])
        (state,) = self._compute(tree_reduce(parts, HistogramState.combine, self.split_every))
        return state

    def equal_counts(self, cutoff: int) -> list[int]:
        assert self.score_blocks is not None, "score() first"
        parts = layer(block_task(states.equal_count_block), [(b, cutoff) for b in self.score_blocks])
        return [int(c) for c in self._compute(*parts)]

    def gather(self, cutoff: int, quotas: list[int]) -> Winners:
        assert self.score_blocks is not None and self.rec_blocks is not None
        rows = [
            (rec, sc, cutoff, q, start)
            for rec, sc, q, (start, _) in zip(self.rec_blocks, self.score_blocks, quotas, self.bounds)
        ]
        return Winners.combine(list(self._compute(*layer(block_task(states.top_winners), rows))))

    def gather_prefix(self, shift: int, prefix: int) -> Winners:
        assert self.score_blocks is not None and self.rec_blocks is not None
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            rows = states.narrow_prefix(prefetched[1], prefetched[0], shift, prefix)
            if rows is not None:
                return rows
        rows = [
            (rec, sc, shift, prefix, start)
            for rec, sc, (start, _) in zip(self.rec_blocks, self.score_blocks, self.bounds)
        ]
        return Winners.combine(list(self._compute(*layer(block_task(states.prefix_winners), rows))))

    def outputs(self, cutoff: int, quotas: list[int]) -> dict[str, da.Array]:
        assert self.score_blocks is not None and self.rec_blocks is not None
        quotas = quotas or [0] * len(self.bounds)
        rows = [(rec, sc, cutoff, q) for rec, sc, q in zip(self.rec_blocks, self.score_blocks, quotas)]
        return self._outputs(layer(block_task(states.issue_mask_block), rows))

    def _outputs(self, masks: list[Delayed]) -> dict[str, da.Array]:
        # Built from the persisted blocks, whose graphs hold the futures:
        # the data stays on the cluster as long as these arrays exist.
        records = self._array(self.rec_blocks, self.spec.record_dtype())
        return {
            "label_quality_scores": self._array(self.score_blocks, np.float64),
            "is_label_issue": self._array(masks, np.bool_),
            "given_label": records["label"],
            "predicted_label": records["pred"],
        }

    # -- filters -------------------------------------------------------------
    def joint(self, thresholds: np.ndarray, fspec: FilterSpec) -> JointState:
        assert self.rec_blocks is not None, "scan() first"
        n = len(self.bounds)
        args = (shared(thresholds, n), shared(fspec, n), self.spec.kernel)
        rows = layer(joint_block, [(rec, prob, *args) for rec, prob in zip(self.rec_blocks, self._prob_blocks)])
        merged = merge_states(rows, JointState.combine, self.split_every)
        self.joint_blocks, (state,) = self._persist(rows, [merged])
        return state

    def _sources(self, needs: Sequence[str]) -> list[list[Any]]:
        per_source = {
            "rec": lambda: self.rec_blocks,
            "joint": lambda: self.joint_blocks,
            "joint_or_none": lambda: self.joint_blocks or [None] * len(self.bounds),
            "scores": lambda: self.score_blocks,
            "start": lambda: list(self.block_starts),
            "labels": lambda: self._label_blocks,
            "probs": lambda: self._prob_blocks,
        }
        columns = [per_source[name]() for name in needs]
        return [list(row) for row in zip(*columns)]

    def reduce_blocks(
        self, fn: Callable[..., Any], combine: Callable[[list], Any], needs: Sequence[str], args: tuple
    ) -> Any:
        # Each argument enters the graph once, not once per block.
        common = [delayed(a, pure=False) for a in args]
        parts = layer(block_task(fn), [(*row, *common) for row in self._sources(needs)])
        (state,) = self._compute(tree_reduce(parts, combine, self.split_every))
        return state

    def _masks(self, rule: MaskRule) -> list[Delayed]:
        # Each task gets only its own block's share of the selected rows.
        joint = self.joint_blocks or [None] * len(self.bounds)
        rows = [
            (rule.restrict(start, stop), rec, jr, start)
            for rec, jr, (start, stop) in zip(self.rec_blocks, joint, self.bounds)
        ]
        return layer(block_task(filters.mask_block), rows)

    def gather_mask(self, rule: MaskRule) -> Winners:
        rows = [
            (rule.restrict(start, stop), rec, joint, sc, start)
            for (rec, joint, sc), (start, stop) in zip(self._sources(("rec", "joint_or_none", "scores")), self.bounds)
        ]
        return Winners.combine(list(self._compute(*layer(block_task(_flagged), rows))))

    def filter_outputs(self, rule: MaskRule) -> dict[str, da.Array]:
        assert self.score_blocks is not None and self.rec_blocks is not None
        return self._outputs(self._masks(rule))


def _joined(pieces: list[list[Delayed]]) -> list[Delayed]:
    """One Delayed per block: its one chunk, or a task joining its chunks."""
    if all(len(p) == 1 for p in pieces):
        return [p[0] for p in pieces]
    return layer(_concatenate, [(p,) for p in pieces])


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    joined = join_adjacent(parts)
    return joined if joined is not None else np.concatenate(parts)


def _flagged(
    rule: MaskRule, rec: np.ndarray, joint: np.ndarray | None, scores: np.ndarray, start: int
) -> Winners:
    return Winners.chunk(rec, scores, filters.mask_block(rule, rec, joint, start), start)


def combine_thresholds(parts: list[ThresholdState]) -> Pair:
    """The root of pass one's tree: ``Pair(thresholds, merged state)``.

    The thresholds are None when pass one found bad input.  The client
    raises that error itself from the merged state: a task that raised
    would also be logged by its worker, traceback and all, beside the
    one-line error a user should see.
    """
    state = ThresholdState.combine(parts)
    return Pair(None if state.problem is not None else state.finalize(), state)


def combine_first_bucket(parts: list[ScoreState], estimation_method: str, n_rows: int) -> Pair:
    """The root of pass two's tree: ``Pair(first bucket, merged state)``
    (:func:`dask_labelissues.states.first_bucket`)."""
    state = ScoreState.combine(parts)
    return Pair(states.first_bucket(state, estimation_method, n_rows), state)


def combine_scan_outlook(parts: list[tuple[ThresholdState, OutlookState]]) -> tuple[ThresholdState, OutlookState]:
    """Merge the states of :func:`scan_block` with ``outlook``, part by part."""
    return ThresholdState.combine([p[0] for p in parts]), OutlookState.combine([p[1] for p in parts])


def combine_thresholds_outlook(parts: list[tuple[ThresholdState, OutlookState]], n_rows: int) -> Pair:
    """The root of pass one's tree in :meth:`DaskDriver._outlook_passes`:
    ``Pair((thresholds, bucket), (threshold state, outlook))``, with
    ``(None, None)`` when pass one found bad input (see
    :func:`combine_thresholds`)."""
    scan = combine_thresholds([p[0] for p in parts])
    outlook = OutlookState.combine([p[1] for p in parts])
    thresholds = scan.data
    bucket = None if thresholds is None else outlook.bucket(thresholds, n_rows)
    return Pair((thresholds, bucket), (scan.state, outlook))


def count_block(
    rec: np.ndarray, root: tuple[np.ndarray | None, tuple[int, int] | None], spec: ScoreSpec, start: int
) -> tuple[CountState | None, Winners | None]:
    """Pass two's task in :meth:`DaskDriver._outlook_passes`:
    :func:`dask_labelissues.states.outlook_count_block` with the thresholds
    and bucket of :func:`combine_thresholds_outlook` (the data of its Pair);
    nothing when pass one found bad input."""
    thresholds, bucket = root
    if thresholds is None:
        return None, None
    return states.outlook_count_block(rec, thresholds, spec, bucket, start)


def _bucket_rows(rec: np.ndarray, scores: np.ndarray, bucket: tuple[int, int] | None, start: int) -> Winners | None:
    """:func:`dask_labelissues.states.prefix_winners` for the bucket
    :func:`dask_labelissues.states.first_bucket` chose, if any."""
    return None if bucket is None else states.prefix_winners(rec, scores, *bucket, start)
