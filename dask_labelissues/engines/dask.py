"""The Dask engine: blocks are row ranges, tasks run on any Dask scheduler.

Each primitive adds graph layers of plain tasks (:func:`layer`): a map
is a task per block, a reduction a tree of merges (:func:`tree_reduce`).
:meth:`DaskEngine.compute` runs everything built since the last compute as
one graph, so pass one, its thresholds and pass two need no stop at the
client; the blocks later stages read stay on the workers.  Tasks read
files and stores themselves; a dask array's blocks come from its graph.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import pickle
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Iterable, Sequence

import dask
import dask.array as da
import dask.system
import numpy as np
from dask.core import flatten
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.sizeof import sizeof

from .. import inputs
from ..aggregations import Aggregation, Pair
from ..kernels import ScoreSpec
from ..kinds import ROWS, Kind
from ..system import usable_memory
from .base import INPUTS, SPLIT_EVERY, START, Blocks, Column, Engine, PerBlock, Value, data_of, distributed_client
from .blocks import BlockConfig, BlockPlan, BlockReader, plan_blocks


def _rows_of(x: Any, row_shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(data_of(x)).reshape((-1, *row_shape))


def block_state(pair: Pair) -> Any:
    """A block task's state, as a task of its own that runs where the
    :class:`~dask_labelissues.aggregations.Pair` is, so the merges fetch
    only the state, not the block's rows."""
    return pair.state


class BlockTask:
    """A block task's function, with ``fn``'s name for the dashboard's task
    keys.  It gives ``fn`` the data of
    :class:`~dask_labelissues.aggregations.Pair` arguments and, for each
    argument ``readers`` marks, a :class:`~.blocks.BlockReader` built in the
    task from the list of its arguments (a list, not a tuple: Dask resolves
    the keys in a list and never takes it for a task)."""

    def __init__(self, fn: Callable, readers: tuple[bool, ...]) -> None:
        self.fn, self.readers = fn, readers
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args: Any) -> Any:
        return self.fn(*(BlockReader(*a) if reader else data_of(a) for reader, a in zip(self.readers, args)))


# One task function for every task of a stage.
_block_task = functools.lru_cache(maxsize=None)(BlockTask)


def _ref(arg: Any, deps: dict[Any, Delayed]) -> Any:
    """A task argument: a Delayed becomes its key (and a dependency)."""
    if isinstance(arg, Delayed):
        deps.setdefault(arg.key, arg)
        return arg.key
    if isinstance(arg, list):
        return [_ref(a, deps) for a in arg]
    return arg


def layer(fn: Callable, rows: Sequence[tuple], suffix: tuple[int, ...] = (), name: str | None = None,
          annotations: dict[str, Any] | None = None) -> list[Delayed]:
    """One task ``fn(*row)`` per row, as one graph layer named ``name`` (or
    ``fn``'s name: what the dashboard shows) with ``annotations``; Delayed
    arguments (and lists of them) go by key, literals never as keys or tasks.

    A plain dict, not ``delayed(fn)(...)``, whose tokenizing and graph
    merging grow with the inputs, nor ``HighLevelGraph.from_collections``,
    whose ``is_dask_collection`` check builds and tokenizes a new Delayed
    for each attribute a Delayed lacks.
    """
    name = f"{name or getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:16]}"
    deps: dict[Any, Delayed] = {}
    tasks = {(name, i, *suffix): (fn, *(_ref(a, deps) for a in row)) for i, row in enumerate(rows)}
    inputs = merged_graph(deps.values())
    needs = {k for d in deps.values() for k in d.__dask_layers__()}
    layers = {**inputs.layers, name: MaterializedLayer(tasks, annotations)}
    graph = HighLevelGraph(layers, {**inputs.dependencies, name: needs})
    return [Delayed(key, graph, layer=name) for key in tasks]


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


def held(futures: Sequence[Any], prefix: str) -> list[Delayed]:
    """Futures as Delayed, as ``Client.persist`` returns them, but in one
    shared layer, not one each: the scheduler's intake of a graph grows
    with layers times keys."""
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    graph = HighLevelGraph({name: {f.key: f for f in futures}}, {name: set()})
    return [Delayed(f.key, graph, layer=name) for f in futures]


#: Values Dask searches for keys and tasks: such task arguments go as keys.
CONTAINERS = (tuple, list, dict, set, frozenset)

#: A stage's common argument is copied into each task if all the copies
#: pickle to at most this many bytes, else it is one key.
INLINE_BYTES = 1 << 20


def shared(value: Any, copies: int) -> Any:
    """An argument all ``copies`` tasks of a stage take.

    Small values go into each task, since a key of their own must run and
    travel to every worker before the stage starts; :data:`CONTAINERS` and
    values whose copies together exceed :data:`INLINE_BYTES` are one key.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        small = not isinstance(value, CONTAINERS) and len(pickle.dumps(value, -1)) * copies <= INLINE_BYTES
    except Exception:  # not picklable: fine for local schedulers, as one key
        small = False
    return value if small else delayed(value, pure=False)


def tree_reduce(parts: Sequence[Delayed], aggregation: Aggregation, args: tuple = ()) -> Delayed:
    """Merge delayed states :data:`~.base.SPLIT_EVERY` at a time, one layer
    a level; the last merge is the root, which also finalizes with ``args``
    (always one, so the result is finalized even for a single block)."""
    level = list(parts)
    while len(level) > SPLIT_EVERY:
        groups = [(level[i : i + SPLIT_EVERY],) for i in range(0, len(level), SPLIT_EVERY)]
        level = layer(aggregation.combine, groups, name=f"{aggregation.name}-combine")
    return layer(aggregation.root, [(level, *args)], name=aggregation.name)[0]


def in_block_order(base: Any, key: Any) -> float:
    """A task's priority where blocks read their inputs: the job's (``base``,
    a number or a function of the key; 0 unless set with ``dask.annotate``)
    less a fraction below one growing with the block index.  Blocks start in
    order, larger first (``dask.order`` may leave a large one alone at a
    stage's end), after the job's merges and other work of its priority."""
    return (base(key) if callable(base) else base) - key[1] / (key[1] + 1)


def cluster_workers(client: Any) -> tuple[int | None, int]:
    """The smallest worker memory limit (None if none is set) and the
    worker threads of a distributed ``client``, or of the local scheduler."""
    if client is None:
        return None, int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = [w["memory_limit"] for w in workers.values() if (w.get("memory_limit") or 0) > 0]
    threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
    return (min(limits) if limits else None), threads


class DaskBlocks(Blocks):
    """One Delayed per block; ``pairs``: each is a Pair of rows and state."""

    def __init__(self, parts: list[Delayed], pairs: bool) -> None:
        self.parts, self.pairs = parts, pairs

    def states(self) -> list[Delayed]:
        """Each block's state (its result, where it is no Pair)."""
        return layer(block_state, [(p,) for p in self.parts]) if self.pairs else self.parts


class DaskValue(Value):
    """A Delayed, until computed; then its value."""

    def __init__(self, part: Delayed) -> None:
        self.part: Delayed | None = part
        self.value: Any = None


class DaskEngine(Engine):
    """Runs a job's block tasks as Dask graphs.

    Parameters
    ----------
    labels, pred_probs
        The inputs: row sources the tasks read themselves (``direct``), or
        dask arrays with the plan's row chunks and whole rows.
    plan
        The job's blocks (:func:`~.blocks.plan_blocks`).
    client
        A ``distributed.Client`` to run on; None uses Dask's current scheduler.
    progress
        Show a progress bar on stderr for each computation.
    kind
        The data kind (:mod:`dask_labelissues.kinds`).
    """

    fuses_stages = True

    def __init__(
        self, labels: Any, pred_probs: Any, plan: BlockPlan, *,
        direct: bool, client: Any = None, progress: bool = False, kind: Kind = ROWS,
    ) -> None:
        super().__init__(labels, pred_probs, plan, kind)
        self.direct = direct
        self.client = distributed_client(client)
        self.progress = progress
        self._columns = itertools.count()

    def column(self, dtype: Any) -> Column:
        # Each task makes its block's rows, which stay on the worker.
        return Column(next(self._columns), np.dtype(dtype))

    def map(self, task: Callable[..., Any], *args: Any, out: Column | None = None, label: str | None = None) -> Blocks:
        n = len(self.plan.bounds)
        readers = tuple(arg is INPUTS for arg in args)
        columns: list[list[Any]] = []
        for arg in args:
            if arg is INPUTS:
                columns.append(self._readers)
            elif isinstance(arg, DaskBlocks):
                columns.append(arg.parts)
            elif isinstance(arg, DaskValue):
                common = arg.part if arg.part is not None else shared(data_of(arg.value), n)
                columns.append([common] * n)
            elif arg is START:
                columns.append(self.starts)
            elif isinstance(arg, PerBlock):
                # Literals in the tasks (containers as keys), or scattered first
                # where a distributed cluster would get more than INLINE_BYTES.
                values = arg.values
                if self.client is not None and sum(sizeof(v) for v in values) > INLINE_BYTES:
                    values = held(self.client.scatter(list(values), hash=False), "per-block")
                columns.append([delayed(v, pure=False) if isinstance(v, CONTAINERS) else v for v in values])
            else:
                columns.append([shared(arg, n)] * n)
        rows = [tuple(column[i] for column in columns) for i in range(n)]
        own = dask.get_annotations()  # the user's, which a layer's own annotations would replace
        order = {**own, "priority": functools.partial(in_block_order, own.get("priority", 0))} if self.direct else None
        return DaskBlocks(layer(_block_task(task, readers), rows, annotations=order), pairs=out is not None)

    def reduce(self, blocks: Blocks, aggregation: Aggregation, *args: Any) -> Value:
        assert isinstance(blocks, DaskBlocks)
        common = tuple(shared(a, 1) for a in args)
        return DaskValue(tree_reduce(blocks.states(), aggregation, common))

    def compute(self, *handles: Blocks | Value, keep: Sequence[Blocks] = ()) -> list[Any]:
        # What each handle asks of the graph: a Value computed already, nothing.
        asks = [h.states() if isinstance(h, DaskBlocks) else [h.part] if h.part is not None else [] for h in handles]
        kept, values = map(iter, self._run([p for b in keep for p in b.parts], [d for ask in asks for d in ask]))
        for b in keep:
            b.parts = list(itertools.islice(kept, len(b.parts)))
        out = []
        for h, ask in zip(handles, asks):
            got = list(itertools.islice(values, len(ask)))
            if isinstance(h, DaskValue) and got:
                h.value, h.part = got[0], None
            out.append(got if isinstance(h, DaskBlocks) else h.value)
        return out

    def to_array(self, blocks: Blocks, dtype: Any, row_shape: tuple[int, ...] | None = None) -> da.Array:
        shape, per_row = ((), self.items_per_row) if row_shape is None else (row_shape, 1)
        # Keys (name, i, 0, ...), as a dask array of that many axes names its chunks.
        parts = layer(_rows_of, [(b, shape) for b in blocks.parts], suffix=(0,) * len(shape))
        chunks = (tuple(c * per_row for c in self.plan.chunks), *((s,) for s in shape))
        return da.Array(parts[0].dask, parts[0].key[0], chunks=chunks, dtype=dtype)

    @functools.cached_property
    def _readers(self) -> list[list]:
        """Each block's :class:`~.blocks.BlockReader` arguments, as a list."""
        n = len(self.plan.bounds)
        per_block = (self.kind, self.items_per_row, self.plan.read_rows)
        if self.direct:
            lab, probs = shared(self.labels, n), shared(self.pred_probs, n)
            return [[lab, probs, a, b, *per_block] for a, b in self.plan.bounds]
        lab, probs = self._chunks(self.labels), self._chunks(self.pred_probs)
        groups = self.plan.groups or [(i, i + 1) for i in range(len(probs))]
        return [[lab[g:h], probs[g:h], a, b, *per_block] for (g, h), (a, b) in zip(groups, self.plan.bounds)]

    def _chunks(self, array: da.Array) -> list[Any]:
        """A dask array's row chunks, in order, as task arguments.

        Where the array's graph holds its chunks as data (``from_array`` of a
        numpy array) and runs in this process, the chunks themselves: a key a
        chunk costs the scheduler, most for many small chunks.  On a cluster
        they stay keys, sent once though a job reads them twice.  Else one
        Delayed a chunk (``to_delayed()``, which optimizes the graph).
        """
        top = array.__dask_graph__().layers.get(array.name)
        if self.client is None and top is not None and top.is_materialized():
            chunks = [top.get(key) for key in flatten(array.__dask_keys__())]
            if chunks and all(isinstance(chunk, np.ndarray) for chunk in chunks):
                return chunks
        return array.to_delayed().ravel().tolist()

    def _run(self, blocks: list[Delayed], wanted: list[Delayed]) -> tuple[list[Delayed], list[Any]]:
        """Keep ``blocks`` where they are computed and bring back ``wanted``, in one graph."""
        if not blocks and not wanted:
            return [], []
        # No graph optimization: fusing would give the blocks and the merged
        # state separate copies of the block task, running pass one twice.
        if self.client is not None:
            # The graph as it is (Client.get does not optimize it): Client.persist
            # would first make and tokenize an expression of each Delayed.
            everything = [*blocks, *wanted]
            futures = self.client.get(merged_graph(everything), [d.key for d in everything], sync=False)
            if self.progress:
                from distributed import progress

                progress(futures, notebook=False)
            self._watch(futures)
            values = self.client.gather(futures[len(blocks) :])
            return held(futures[: len(blocks)], "kept"), list(values)
        if self.progress:
            from dask.diagnostics import ProgressBar
        with ProgressBar(out=sys.stderr) if self.progress else contextlib.nullcontext():
            if not blocks:
                return [], list(dask.compute(*wanted, optimize_graph=False))
            out = dask.persist(*blocks, *wanted, optimize_graph=False)
        values = dask.compute(*out[len(blocks) :])
        return list(out[: len(blocks)]), list(values)

    def _watch(self, futures: list) -> None:
        """Wait for ``futures``, failing if the cluster has no workers for too long.

        Dask would wait forever for workers to return; a batch job fails after
        ``labelissues.no-workers-timeout`` seconds (default 60) without one.
        """
        limit = float(dask.config.get("labelissues.no-workers-timeout", 60))
        since: float | None = None
        for future in futures:
            while future.status != "finished":  # read locally: no round trip
                try:
                    # Waits on this future's own client (not the default one) and moves no data.
                    error = future.exception(timeout=1.0)
                except TimeoutError:  # still running
                    pass
                else:
                    if error is not None:
                        # Raised outside the try: a task's own TimeoutError
                        # (a store that did not answer) fails the job.
                        future.result()
                    break
                if self.client.nthreads():
                    since = None
                elif since is None:
                    since = time.monotonic()
                elif time.monotonic() - since > limit:
                    self.client.cancel(futures)
                    raise RuntimeError(
                        f"the Dask cluster at {self.client.scheduler.address} has had no "
                        f"workers for {limit:g} s; the job was stopped"
                    )


def dask_engine(
    labels: Any, pred_probs: Any, spec: ScoreSpec, settings: dict[str, Any], *,
    client: Any = None, progress: bool = False, kind: Kind = ROWS,
) -> DaskEngine:
    """The Dask engine for a job, with its blocks and kernel planned
    (:func:`~.blocks.plan_blocks`) from the cluster's workers and
    ``settings``, the :class:`~.blocks.BlockConfig` fields the caller set.
    Inputs other than files and stores become dask arrays of the plan's row
    chunks (a dask array keeps its own unless cut)."""
    client = distributed_client(client)
    smallest, threads = cluster_workers(client)
    stored = inputs.stored_rows(labels), inputs.stored_rows(pred_probs)
    if None not in stored and inputs.reads_in_tasks(*stored):
        labels, pred_probs = stored
    direct = inputs.reads_in_tasks(labels, pred_probs)
    plan = plan_blocks(BlockConfig.of_job(
        pred_probs, spec, kind, worker_memory=smallest, threads=threads, reads_in_tasks=direct,
        in_process=client is None, process_memory=usable_memory() if client is None else None,
        array_chunks=tuple(pred_probs.chunks[0]) if inputs.is_dask_array(pred_probs) else None, **settings,
    ))
    if not direct:
        # Runs of a dask array's chunks keep its chunks; else the blocks are the chunks.
        labels, pred_probs = as_dask_arrays(labels, pred_probs, None if plan.groups else plan.chunks or None)
    return DaskEngine(labels, pred_probs, plan, direct=direct, client=client, progress=progress, kind=kind)


def as_dask_arrays(labels: Any, pred_probs: Any, chunk_rows: tuple[int, ...] | None) -> tuple[da.Array, da.Array]:
    """Dask arrays of the two inputs with whole rows and the same row
    chunks: ``chunk_rows``, or a dask array's own (None).

    Row sources become dask arrays whose tasks slice them: memory-mapped
    and on-disk inputs are read block by block where the tasks run.
    """
    token = uuid.uuid4().hex[:12]

    def to_dask(src: Any, label: str, rows: tuple[int, ...] | None) -> da.Array:
        if inputs.is_dask_array(src):
            split = [axis for axis in range(1, src.ndim) if len(src.chunks[axis]) != 1]
            if split:
                where = "the class axis" if split == [1] else f"axes {split}"
                warnings.warn(
                    f"{label} is split into chunks along {where}; rechunking to whole rows "
                    "(a block needs all the classes of its rows, and whole images)", UserWarning, stacklevel=5,
                )
            return src.rechunk(dict.fromkeys(split, -1) | ({} if rows is None else {0: rows}))
        return da.from_array(
            src, chunks=(rows,) + tuple(src.shape[1:]), name=f"{label}-{token}", asarray=True, lock=False,
            inline_array=False, meta=np.empty((0,) * src.ndim, dtype=src.dtype),
        )

    probs = to_dask(pred_probs, "pred_probs", chunk_rows)
    labs = to_dask(labels, "labels", chunk_rows)
    if labs.chunks[0] != probs.chunks[0]:
        labs = labs.rechunk({0: probs.chunks[0]})
    return labs, probs
