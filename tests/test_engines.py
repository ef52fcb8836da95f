"""The engine contract: every engine gives the serial engine's bits.

The pipelines are written once against the engines' primitives
(:mod:`dask_labelissues.engines.base`), so each primitive is checked here on
its own, stage by stage, against the serial engine: pass one's merged state
and records, pass two's state and scores, per-block collects with
``START`` and ``PerBlock``, a reduction that finalizes with arguments, and
item-long columns.  Then a second data kind (pixels of segmentation masks)
runs the whole jobs through the same engines and must give what the rows
kind gives on the same pixels flattened, which cleanlab anchors.

The cases on a real distributed cluster come last in this file: the
cluster's Client stays the default scheduler until the module ends, and
the fork engine is best not forked from a process that holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import subprocess
import sys
import time
import warnings
from typing import Any, Iterator

import dask
import numpy as np
import pytest

from dask_labelissues import inputs, kernels, pipelines, states
from dask_labelissues.aggregations import FIRST_BUCKET, SCORES, THRESHOLDS, Aggregation, Pair
from dask_labelissues.engines import INPUTS, START, PerBlock, make_engine
from dask_labelissues.filters import FilterSpec
from dask_labelissues.kernels import ScoreSpec
from dask_labelissues.kinds import PIXELS, ROWS
from dask_labelissues.system import GIVE_BACK_MIN_BYTES


N, K = 37, 4

#: Blocks of one row (more blocks than a reduction's fan-in of 16, so the
#: trees have two levels), an odd size, and the whole data in one block.
BLOCK_ROWS = (1, 7, N)

#: One spec whose pass two reads the records only, one that reads
#: pred_probs again (its score map takes ``INPUTS``).  The kernel is pinned
#: so that which kernel runs does not depend on what an earlier test loaded.
SPECS = {
    "self_confidence": ScoreSpec(kernel="numpy"),
    "adjusted_margin": ScoreSpec("normalized_margin", True, "off_diagonal_calibrated", kernel="numpy"),
}

#: The engines that hold their columns in this machine's memory.
ONE_MACHINE = ("serial", "threads", "fork")


@functools.lru_cache(maxsize=None)
def contract_data() -> tuple[np.ndarray, np.ndarray]:
    """37 rows drawn from a palette of 5 probability vectors, labels the
    argmax with about a third flipped: scores tie exactly across block
    boundaries, and there are issues to select."""
    rng = np.random.default_rng(20)
    palette = rng.dirichlet(np.full(K, 0.8), size=5)
    probs = palette[rng.integers(0, len(palette), N)]
    labels = probs.argmax(axis=1)
    flip = rng.random(N) < 0.35
    labels[flip] = (labels[flip] + rng.integers(1, K, flip.sum())) % K
    # Every class labelled at least once: no threshold falls back to 2.0.
    labels[:K] = np.arange(K)
    return labels.astype(np.int64), probs


# -- small block tasks ------------------------------------------------------------
# Module-level, so that fork's pipes and distributed's workers can pickle
# them by reference.
def block_start(start: int) -> int:
    return start


def tag(start: int, value: Any) -> tuple[int, Any]:
    return start, value


def item_numbers(block, out: np.ndarray | None = None) -> Pair:
    """Each item's job index, written to the block's rows of a column;
    the state is the block's item count."""
    n = (block.stop - block.start) * block.items_per_row
    numbers = np.arange(block.item_start, block.item_start + n, dtype=np.int64)
    if out is not None:
        out[...] = numbers
        numbers = out
    return Pair(numbers, n)


def _total(parts: list[int]) -> int:
    return int(sum(parts))


#: An aggregation kept out of the registry: a test module may be imported
#: more than once, and a name is registered once.
TOTAL = Aggregation("test_total", _total)

#: Calls of :func:`counted_start`, in this process.
CALLS: list[int] = []


def counted_start(start: int) -> int:
    CALLS.append(start)
    return start


def plus_one(value: int) -> int:
    return value + 1


def fail(start: int) -> int:
    raise RuntimeError(f"the task of the block at {start} ran")


# -- engines ----------------------------------------------------------------------
@contextlib.contextmanager
def opened(
    backend: str, labels: Any, probs: Any, spec: ScoreSpec, rows: int | None, *,
    client: Any = None, kind=ROWS,
) -> Iterator[Any]:
    """An engine of ``backend`` on in-memory inputs, closed after.

    ``"dask"`` runs on Dask's local threaded scheduler even while a
    distributed Client is the default; ``"distributed"`` on ``client``.
    """
    scheduler = contextlib.nullcontext()
    if backend == "dask":
        scheduler = dask.config.set(scheduler="threads")
    elif backend == "distributed":
        # Lazy outputs hold the cluster's futures: computed on it, whatever
        # the default scheduler is.
        scheduler = dask.config.set(scheduler=client)
    name = "dask" if backend == "distributed" else backend
    with scheduler:
        engine, chosen, _ = make_engine(
            name, inputs.InMemory(labels), inputs.InMemory(probs), spec,
            chunk_rows=rows, n_jobs=2, client=client, kind=kind,
        )
        try:
            assert chosen == name
            if backend == "dask":
                assert engine.client is None
            if backend == "distributed":
                assert engine.client is client
            yield engine
        finally:
            engine.close()


def materialize(x: Any) -> Any:
    """A numpy array of an engine's output (a lazy one computed)."""
    return np.asarray(x.compute() if hasattr(x, "compute") else x)


# -- comparing to the bit -----------------------------------------------------------
def assert_same_bits(actual: Any, expected: Any, where: str = "result") -> None:
    """``actual`` is ``expected`` to the bit, through dataclasses, Pairs,
    tuples, lists and arrays: floats by their bytes (so NaN payloads and
    -0.0 count), structured arrays field by field (their padding bytes are
    not data), object arrays element by element with their types."""
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{where}: {type(actual)} vs {type(expected)}"
        for field in dataclasses.fields(expected):
            assert_same_bits(getattr(actual, field.name), getattr(expected, field.name), f"{where}.{field.name}")
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: {type(actual)} is not an array"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} vs {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} vs {expected.shape}"
        if expected.dtype.names:
            for name in expected.dtype.names:
                assert_same_bits(actual[name], expected[name], f"{where}[{name!r}]")
        elif expected.dtype.hasobject:
            for i, (a, e) in enumerate(zip(actual.ravel().tolist(), expected.ravel().tolist())):
                assert type(a) is type(e) and a == e, f"{where}[{i}]: {a!r} vs {e!r}"
        else:
            same = np.ascontiguousarray(actual).view(np.uint8) == np.ascontiguousarray(expected).view(np.uint8)
            assert np.all(same), f"{where}: differs\n{actual!r}\nvs\n{expected!r}"
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: {actual!r} vs {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_bits(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys {sorted(actual)} vs {sorted(expected)}"
        for key in expected:
            assert_same_bits(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (float, np.floating)):
        assert np.float64(actual).tobytes() == np.float64(expected).tobytes(), f"{where}: {actual!r} vs {expected!r}"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} vs {expected!r}"


# -- the stages -------------------------------------------------------------------
def run_stages(engine: Any, spec: ScoreSpec) -> dict[str, Any]:
    """Every primitive once, as the pipelines use them; what each stage gives.

    Pass one and pass two are built before anything is computed, pass two's
    thresholds straight from pass one's tree (an engine that fuses stages
    runs them as one job); the later stages take computed values.
    """
    reread = INPUTS if spec.rereads else None
    record_column = engine.column(spec.record_dtype())
    score_column = engine.column(np.float64)
    again_column = engine.column(np.float64)
    number_column = engine.column(np.int64)

    records = engine.map(pipelines.scan_block, INPUTS, spec, False, out=record_column)
    root = engine.reduce(records, THRESHOLDS)
    scores = engine.map(pipelines.score_block, records, root, spec, reread, out=score_column)
    score_root = engine.reduce(scores, SCORES)
    scan, score = engine.compute(root, score_root, keep=[records, scores])
    out: dict[str, Any] = {"scan": scan, "score": score}
    out["records"] = materialize(engine.to_array(records, spec.record_dtype()))
    out["scores"] = materialize(engine.to_array(scores, np.float64))

    # A reduction that finalizes with arguments.  Local engines reduce a
    # map's states once, so pass two is mapped again for it, into a column
    # of its own as the pipelines do (a reduction takes the state of a
    # column's Pair).
    again = engine.map(pipelines.score_block, records, root, spec, reread, out=again_column)
    (bucket,) = engine.compute(engine.reduce(again, FIRST_BUCKET, spec.estimation_method, engine.n_items))
    out["first_bucket"] = bucket

    # A map without a column, over a column's blocks, as one array.
    out["keys"] = materialize(engine.to_array(engine.map(kernels.score_keys, scores), np.uint64))

    # Per-block collects: one value per block, in block order.
    keys = kernels.score_keys(out["scores"])
    values, counts = np.unique(keys, return_counts=True)
    cutoff = int(values[np.argmax(counts)])  # the most tied key
    out["cutoff"] = cutoff
    (out["equal"],) = engine.compute(engine.map(states.equal_count_block, scores, cutoff))
    (out["lengths"],) = engine.compute(engine.map(len, scores))
    (out["starts"],) = engine.compute(engine.map(block_start, START))
    n_blocks = len(engine.plan.bounds)
    own = [(7 * i + 3, f"block {i}") for i in range(n_blocks)]
    (out["per_block"],) = engine.compute(engine.map(tag, START, PerBlock(own)))

    # A column a task fills from its reader, and the states beside it.
    numbers = engine.map(item_numbers, INPUTS, out=number_column)
    (out["total"],) = engine.compute(engine.reduce(numbers, TOTAL))
    out["numbers"] = materialize(engine.to_array(numbers, np.int64))
    return out


@functools.lru_cache(maxsize=None)
def serial_stages(spec_name: str, rows: int) -> dict[str, Any]:
    labels, probs = contract_data()
    with opened("serial", labels, probs, SPECS[spec_name], rows) as engine:
        return run_stages(engine, SPECS[spec_name])


def check_reference_is_meaningful(ref: dict[str, Any], rows: int) -> None:
    """The reference itself is what the stages should give, so agreeing
    with it means something."""
    labels, probs = contract_data()
    n_blocks = -(-N // rows)
    assert ref["scan"].state.rows == N
    np.testing.assert_array_equal(ref["scan"].state.counts, np.bincount(labels, minlength=K))
    own = probs[np.arange(N), labels]
    expected = np.array([own[labels == k].mean() for k in range(K)])
    np.testing.assert_allclose(ref["scan"].data, expected, rtol=1e-12)
    np.testing.assert_array_equal(ref["records"]["label"], labels)
    np.testing.assert_array_equal(ref["records"]["pred"], probs.argmax(axis=1))
    assert ref["score"].counts.finalize("off_diagonal") > 0
    assert ref["first_bucket"].data is not None
    assert_same_bits(ref["keys"], kernels.score_keys(ref["scores"]))
    assert ref["starts"] == list(range(0, N, rows))
    assert ref["lengths"] == [min(rows, N - a) for a in range(0, N, rows)]
    keys = kernels.score_keys(ref["scores"])
    assert ref["equal"] == [int(np.sum(keys[a : a + rows] == ref["cutoff"])) for a in range(0, N, rows)]
    assert sum(ref["equal"]) > 1
    assert ref["per_block"] == [(a, (7 * i + 3, f"block {i}")) for i, a in enumerate(range(0, N, rows))]
    assert len(ref["per_block"]) == n_blocks
    assert ref["total"] == N
    np.testing.assert_array_equal(ref["numbers"], np.arange(N))


def check_stages(engine: Any, spec_name: str, rows: int) -> None:
    spec = SPECS[spec_name]
    assert engine.plan.chunks == tuple(min(rows, N - a) for a in range(0, N, rows))
    got = run_stages(engine, spec)
    reference = serial_stages(spec_name, rows)
    check_reference_is_meaningful(reference, rows)
    # Finalizing on the engine gives what finalizing the merged state here gives.
    assert_same_bits(
        got["first_bucket"].data,
        states.first_bucket(got["score"], spec.estimation_method, N),
        "first bucket from the merged state",
    )
    for stage in reference:
        assert_same_bits(got[stage], reference[stage], stage)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("rows", BLOCK_ROWS)
@pytest.mark.parametrize("backend", ["threads", "fork", "dask"])
def test_every_stage_matches_serial(backend, rows, spec_name):
    labels, probs = contract_data()
    with opened(backend, labels, probs, SPECS[spec_name], rows) as engine:
        check_stages(engine, spec_name, rows)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("rows", BLOCK_ROWS[:-1])
def test_serial_stages_do_not_depend_on_blocks(rows, spec_name):
    """The merged states and item-long arrays of any blocks are those of
    one block: every merge is exact."""
    whole, cut = serial_stages(spec_name, N), serial_stages(spec_name, rows)
    for stage in ("scan", "score", "first_bucket", "records", "scores", "keys", "total", "numbers"):
        assert_same_bits(cut[stage], whole[stage], stage)


# -- columns ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ONE_MACHINE)
def test_columns_are_declared_before_any_map_runs(backend):
    """A one-machine engine allocates its columns before its first map runs:
    forked workers share only the buffers that exist when they are forked.
    ``column()`` after ``map()`` is still allowed while nothing has run (a
    map there runs when something needs it), and the column so declared is
    the one the workers write; once a map has run, ``column()`` raises."""
    labels, probs = contract_data()
    with opened(backend, labels, probs, SPECS["self_confidence"], 7) as engine:
        first = engine.column(np.int64)
        early = engine.map(item_numbers, INPUTS, out=first)
        second = engine.column(np.int64)
        late = engine.map(item_numbers, INPUTS, out=second)
        (total,) = engine.compute(engine.reduce(late, TOTAL))
        assert total == N
        np.testing.assert_array_equal(engine.to_array(late, np.int64), np.arange(N))
        with pytest.raises(RuntimeError, match="columns are declared before the job's first map"):
            engine.column(np.float64)
        np.testing.assert_array_equal(engine.to_array(early, np.int64), np.arange(N))


def test_local_engines_reduce_a_map_once():
    """A one-machine engine folds a map's states into its reduction as they
    come and keeps only the rows of a column map (or results a compute
    asks it to keep), so a second reduction of the same map raises rather
    than merge states it no longer holds."""
    labels, probs = contract_data()
    with opened("serial", labels, probs, SPECS["self_confidence"], 7) as engine:
        numbers = engine.map(item_numbers, INPUTS, out=engine.column(np.int64))
        engine.reduce(numbers, TOTAL)
        with pytest.raises(RuntimeError, match="reduced once"):
            engine.reduce(numbers, TOTAL)


class Held:
    """A state that says it holds ``HELD_BYTES``, counting those alive."""

    alive = most = 0

    def __init__(self) -> None:
        Held.alive += 1
        Held.most = max(Held.most, Held.alive)

    def __del__(self) -> None:
        Held.alive -= 1

    def __sizeof__(self) -> int:
        return HELD_BYTES

    def __reduce__(self) -> tuple:
        # Made anew where it arrives (from a forked worker), and counted there.
        return Held, ()


HELD_BYTES = 12 << 20


def held_state(start: int) -> Held:
    return Held()


def merge_held(parts: list) -> Held:
    time.sleep(0.005)  # a slow merge, while the threads run on
    return Held()


HELD = Aggregation("test_held", merge_held, lambda merged: None)


@pytest.mark.parametrize("backend", ONE_MACHINE)
def test_a_local_reduction_holds_few_large_states(backend):
    """States that hold much are merged before sixteen wait (here three of
    12 MiB, the first over the 32 MiB budget), threads run only a few
    blocks ahead of the merges, and a forked worker's states are merged as
    they come, not held until the blocks before them arrive: 37 blocks
    never have more than ten states alive at once in this process, where
    waiting for sixteen, or every finished block's state waiting for a
    slow merge, held 17 to 37."""
    from dask_labelissues.engines.local import FOLD_BYTES

    assert 2 * HELD_BYTES < FOLD_BYTES < 3 * HELD_BYTES
    labels, probs = contract_data()
    Held.alive = Held.most = 0
    with opened(backend, labels, probs, SPECS["self_confidence"], 1) as engine:
        assert len(engine.plan.bounds) == N
        engine.compute(engine.reduce(engine.map(held_state, START), HELD))
    assert 4 <= Held.most <= 10
    assert Held.alive == 0


def as_list(start: int) -> list[int]:
    return [start]


def _concatenated(parts: list) -> list:
    return [x for part in parts for x in part]


#: A merge whose result depends on the order of its states.
ORDERED = Aggregation("test_ordered", _concatenated)


@pytest.mark.parametrize("backend, n_jobs", [("serial", 1), ("threads", 3), ("fork", 3), ("fork", 8)])
def test_a_local_reduction_merges_states_in_block_order(backend, n_jobs, monkeypatch):
    """A merge that depends on the order of its states (a concatenation)
    gets them in block order, however the fork engine's workers' runs of
    blocks arrive and however often the byte budget merges (here at every
    second state)."""
    from dask_labelissues.engines import local

    monkeypatch.setattr(local, "FOLD_BYTES", 1)
    labels, probs = contract_data()
    engine, _, _ = make_engine(
        backend, inputs.InMemory(labels), inputs.InMemory(probs), SPECS["self_confidence"],
        chunk_rows=1, n_jobs=n_jobs,
    )
    try:
        (got,) = engine.compute(engine.reduce(engine.map(as_list, START), ORDERED))
    finally:
        engine.close()
    assert got == list(range(N))


def fail_at_block_two(start: int) -> int:
    if start == 2:
        raise ValueError("block two failed")
    return start


def test_a_fork_engine_refuses_a_stage_after_one_failed():
    """The workers of a failed stage may still hold its results, which the
    next stage would take for its own: it is refused instead."""
    labels, probs = contract_data()
    with opened("fork", labels, probs, SPECS["self_confidence"], 1) as engine:
        with pytest.raises(ValueError, match="block two failed"):
            engine.compute(engine.map(fail_at_block_two, START))
        with pytest.raises(RuntimeError, match="not used again after a stage failed"):
            engine.compute(engine.map(block_start, START))


@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_task_arguments_reach_tasks_as_given(backend):
    """Arguments are data, whatever their type: a tuple whose first item is
    callable, a string, containers holding either, an array.  A scheduler
    that reads its graph's literals as tasks or keys must get them wrapped;
    the same for one value all blocks share and for each block's own."""
    labels, probs = contract_data()
    with opened(backend, labels, probs, SPECS["self_confidence"], 7) as engine:
        starts = list(range(0, N, 7))
        own = [(max, 1, 2), "block 1", [3, (min, 4, 5)], {"k": (max, 6, 7)}, np.arange(3), (8, "nine")]
        assert len(own) == len(starts)
        for common in ((max, 1, 2), {"k": (min, 4, 5)}, "a string"):
            (got,) = engine.compute(engine.map(tag, START, common))
            assert_same_bits(got, [(a, common) for a in starts], f"common {common!r}")
        (got,) = engine.compute(engine.map(tag, START, PerBlock(own)))
        assert_same_bits(got, list(zip(starts, own)), "PerBlock")


# -- when tasks run -------------------------------------------------------------------
def test_dask_engine_runs_nothing_until_compute():
    """Maps, reductions and arrays of the Dask engine are graphs until
    ``compute``: a task that raises does so only then."""
    labels, probs = contract_data()
    with opened("dask", labels, probs, SPECS["self_confidence"], 7) as engine:
        CALLS.clear()
        failing = engine.map(fail, START)
        value = engine.reduce(failing, TOTAL)
        after = engine.map(plus_one, failing)
        array = engine.to_array(after, np.int64)
        counted = engine.map(counted_start, START)
        counted_total = engine.reduce(counted, TOTAL)
        assert CALLS == []
        with pytest.raises(RuntimeError, match="the task of the block at"):
            engine.compute(value)
        with pytest.raises(RuntimeError, match="the task of the block at"):
            engine.compute(after)
        with pytest.raises(RuntimeError, match="the task of the block at"):
            array.compute()
        assert CALLS == []
        (total,) = engine.compute(counted_total)
        assert total == sum(range(0, N, 7))
        assert sorted(CALLS) == list(range(0, N, 7))


@pytest.mark.parametrize("backend", ["serial", "threads", "dask"])
def test_kept_blocks_run_once(backend):
    """A map computed with a reduction of it and kept is not run again by
    the stages that read it later: pass one reads pred_probs once."""
    labels, probs = contract_data()
    with opened(backend, labels, probs, SPECS["self_confidence"], 7) as engine:
        CALLS.clear()
        starts = engine.map(counted_start, START)
        total = engine.reduce(starts, TOTAL)
        later = engine.map(plus_one, starts)
        (value, plus) = engine.compute(total, later, keep=[starts])
        assert value == sum(range(0, N, 7))
        assert plus == [a + 1 for a in range(0, N, 7)]
        (again,) = engine.compute(engine.map(plus_one, starts))
        assert again == plus
        assert sorted(CALLS) == list(range(0, N, 7))


def start_in_column(block: Any, start: int, out: Any = None) -> Pair:
    rows = np.empty(len(block.labels()), dtype=np.int64) if out is None else out
    rows[:] = start
    return Pair(rows, start)


@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_a_column_map_reduced_and_kept_keeps_its_rows(backend):
    """A reduction of a column map that a compute keeps leaves its rows for
    later stages; its states the one-machine engines do not keep (they
    would grow with the blocks), and asking for them is an error there,
    not a list of Nones."""
    labels, probs = contract_data()
    with opened(backend, labels, probs, SPECS["self_confidence"], 7) as engine:
        columns = [engine.column(np.int64) for _ in range(3)]
        blocks = engine.map(start_in_column, INPUTS, START, out=columns[0])
        (total,) = engine.compute(engine.reduce(blocks, TOTAL), keep=[blocks])
        assert total == sum(range(0, N, 7))
        assert (np.asarray(engine.to_array(blocks, np.int64)) == np.arange(N) // 7 * 7).all()
        if backend == "dask":
            assert engine.compute(blocks) == [list(range(0, N, 7))]
        else:
            with pytest.raises(RuntimeError, match="keep only their rows"):
                engine.compute(blocks)
        # In one compute: the blocks listed before their reduction give both
        # everywhere; listed after it, the one-machine engines refuse too.
        first = engine.map(start_in_column, INPUTS, START, out=columns[1])
        assert engine.compute(first, engine.reduce(first, TOTAL)) == [list(range(0, N, 7)), total]
        after = engine.map(start_in_column, INPUTS, START, out=columns[2])
        if backend == "dask":
            assert engine.compute(engine.reduce(after, TOTAL), after) == [total, list(range(0, N, 7))]
        else:
            with pytest.raises(RuntimeError, match="keep only their rows"):
                engine.compute(engine.reduce(after, TOTAL), after)


# -- pixels: a second kind through the same path ----------------------------------------
IMAGES, HEIGHT, WIDTH = 9, 3, 5


@functools.lru_cache(maxsize=None)
def pixel_data() -> tuple[np.ndarray, np.ndarray]:
    """Segmentation masks: labels (N, H, W), float32 pred_probs (N, K, H, W)
    whose every pixel sums to 1 over the classes, a quarter of the pixels
    mislabelled."""
    rng = np.random.default_rng(7)
    true = rng.integers(0, K, (IMAGES, HEIGHT, WIDTH))
    logits = rng.normal(size=(IMAGES, K, HEIGHT, WIDTH))
    logits += 2.5 * (np.arange(K)[None, :, None, None] == true[:, None])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = true.copy()
    flip = rng.random(true.shape) < 0.25
    labels[flip] = (true[flip] + rng.integers(1, K, flip.sum())) % K
    return labels.astype(np.int64), probs


def flattened(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels as rows, image by image, each image's in row-major order."""
    return labels.reshape(-1), np.ascontiguousarray(np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1]))


FILTER = FilterSpec("prune_by_noise_rate")


def job(engine: Any, pipeline: str, dtype: Any) -> pipelines.RawResult:
    spec = engine.plan.spec
    if pipeline == "run":
        return pipelines.run(engine, spec)
    return pipelines.run_filter(engine, spec, FILTER, dtype)


def result_of(raw: pipelines.RawResult) -> dict[str, Any]:
    """A job's result with its item-long arrays computed."""
    out = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw) if f.name != "arrays"}
    out.update({f"arrays[{name!r}]": materialize(a) for name, a in raw.arrays.items()})
    return out


@functools.lru_cache(maxsize=None)
def rows_reference(pipeline: str) -> dict[str, Any]:
    """The rows kind on the flattened pixels, serial, one block."""
    labels, probs = flattened(*pixel_data())
    with opened("serial", labels, probs, ScoreSpec(), None) as engine:
        assert len(engine.plan.bounds) == 1
        return result_of(job(engine, pipeline, probs.dtype))


@pytest.mark.parametrize("pipeline", ["run", "run_filter"])
@pytest.mark.parametrize("images", [1, 2, IMAGES])
@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_pixels_match_rows(backend, images, pipeline):
    labels, probs = pixel_data()
    with opened(backend, labels, probs, ScoreSpec(), images, kind=PIXELS) as engine:
        pixels = HEIGHT * WIDTH
        assert engine.n_items == IMAGES * pixels and engine.n_classes == K
        starts = list(range(0, IMAGES * pixels, images * pixels))
        assert engine.starts == starts
        got = result_of(job(engine, pipeline, probs.dtype))
        # START is the block's first item, not its first stored row.
        assert engine.compute(engine.map(block_start, START)) == [starts]
    expected = rows_reference(pipeline)
    assert expected["issues"].size > 0
    assert_same_bits(got, expected, pipeline)


@pytest.mark.parametrize("pipeline", ["run", "run_filter"])
@pytest.mark.parametrize("images", [None, 2])
@pytest.mark.parametrize("layout", ["views", "copies"])
def test_pixels_from_dask_arrays_match_rows(layout, images, pipeline):
    """Dask arrays of one image a chunk: on their own chunks the engine
    takes runs of them as one block (a task then gets a list of chunks,
    joined without a copy where they are views of one buffer, read one by
    one where not); with ``chunk_rows`` they are rechunked."""
    import dask.array as da

    labels, probs = pixel_data()
    lab = da.from_array(labels, chunks=(1, HEIGHT, WIDTH))
    pro = da.from_array(probs, chunks=(1, K, HEIGHT, WIDTH))
    if layout == "copies":
        lab, pro = lab + 0, pro * np.float32(1)
    # Two worker threads: the engine then groups the 9 chunks by three.
    with dask.config.set(scheduler="threads", num_workers=2):
        engine, _, _ = make_engine("dask", lab, pro, ScoreSpec(), chunk_rows=images, kind=PIXELS)
        try:
            assert (engine.plan.groups is not None) == (images is None)
            got = result_of(job(engine, pipeline, probs.dtype))
        finally:
            engine.close()
    assert_same_bits(got, rows_reference(pipeline), pipeline)


def test_rows_filter_matches_cleanlab():
    """The rows kind's filter on the flattened pixels flags cleanlab's pixels."""
    from cleanlab.filter import find_label_issues as cleanlab_filter

    labels, probs = flattened(*pixel_data())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cleanlab_filter(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    ours = rows_reference("run_filter")
    assert expected.sum() > 0
    np.testing.assert_array_equal(ours["arrays['is_label_issue']"], expected)
    np.testing.assert_array_equal(np.sort(ours["issues"]), np.flatnonzero(expected))


# -- a real distributed cluster (last: its Client is the default from here on) --------
@pytest.mark.parametrize(("spec_name", "rows"), [("self_confidence", 1), ("adjusted_margin", 7)])
def test_every_stage_matches_serial_on_a_cluster(local_cluster, spec_name, rows):
    labels, probs = contract_data()
    with opened("distributed", labels, probs, SPECS[spec_name], rows, client=local_cluster) as engine:
        check_stages(engine, spec_name, rows)


@pytest.mark.parametrize("pipeline", ["run", "run_filter"])
def test_pixels_match_rows_on_a_cluster(local_cluster, pipeline):
    labels, probs = pixel_data()
    with opened("distributed", labels, probs, ScoreSpec(), 2, client=local_cluster, kind=PIXELS) as engine:
        got = result_of(job(engine, pipeline, probs.dtype))
    assert_same_bits(got, rows_reference(pipeline), pipeline)


def test_blocks_start_in_their_order_on_a_cluster(tmp_path):
    """On a distributed cluster each stage's block tasks start in block
    order (``dask.order`` alone gives none), so the balanced plan's larger
    blocks run first and a stage's workers end together."""
    from distributed import Client, LocalCluster, get_task_stream

    from dask_labelissues import find_label_issues
    from dask_labelissues.synthetic import SyntheticSpec, write_zarr

    store = str(tmp_path / "data.zarr")
    write_zarr(SyntheticSpec(12000, 6, seed=8), store, chunk_rows=1024)
    # One worker thread: tasks start one at a time, in priority order.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client, get_task_stream(client) as stream:
        find_label_issues(f"{store}:labels", f"{store}:pred_probs", client=client, chunk_rows=1024)
    started: dict[str, list[int]] = {}
    for task in sorted(stream.data, key=lambda t: t["startstops"][0]["start"]):
        key = task["key"]
        if isinstance(key, tuple) and isinstance(key[1], int):
            started.setdefault(key[0], []).append(key[1])
    assert max(len(blocks) for blocks in started.values()) == 12  # 11 of 1,024 rows, 1 of 736
    assert all(blocks == sorted(blocks) for blocks in started.values()), started


def test_block_layers_add_their_order_to_the_users_annotations(tmp_path):
    """Blocks that read their own inputs rank by index below the priority in
    effect when the job is built, whose other annotations they keep (a
    layer's own would replace them); blocks of dask-array inputs keep Dask's
    order, which loads each chunk just before its block."""
    import dask.array as da

    labels, probs = contract_data()
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    sources = [inputs.open_source(str(tmp_path / f"{name}.npy"), name) for name in ("labels", "probs")]
    for pair, ordered in ((sources, True), ([da.from_array(labels, 10), da.from_array(probs, (10, -1))], False)):
        with dask.annotate(retries=2, priority=3):
            engine, _, _ = make_engine("dask", *pair, ScoreSpec(), chunk_rows=10)
            parts = engine.map(pipelines.scan_block, INPUTS, ScoreSpec(), False).parts
        annotations = parts[0].dask.layers[parts[0].key[0]].annotations
        assert annotations["retries"] == 2 and len(parts) > 2
        if ordered:
            assert [annotations["priority"](p.key) for p in parts] == [3 - i / (i + 1) for i in range(len(parts))]
        else:
            assert annotations["priority"] == 3


def test_block_priorities_stay_within_the_jobs():
    """Block tasks rank by index just below the job's priority (the user's,
    a number or a function of the key), never past the next whole one."""
    from dask_labelissues.engines.dask import in_block_order

    ranks = [in_block_order(0, ("scan", i)) for i in range(1000)]
    assert ranks[0] == 0 and all(-1 < b < a for a, b in zip(ranks, ranks[1:]))
    assert 4 < in_block_order(5, ("scan", 10**9)) < in_block_order(5, ("scan", 3)) < 5
    assert in_block_order(lambda key: len(key[0]), ("scan", 0)) == 4


FREED_MEMORY_PROBE = r"""
import ctypes, sys
import numpy as np
import dask_labelissues

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
rng = np.random.default_rng(0)
probs = rng.dirichlet(np.ones(4), size=5000)
dask_labelissues.find_label_issues(rng.integers(0, 4, 5000), probs, backend=sys.argv[1])
before = mallinfo2().hblkhd
a = np.ones(64 << 20, np.uint8)
print(mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_a_local_job_lets_the_allocator_keep_blocks_in_its_heap(backend, monkeypatch):
    """After a local job in a process, a 64 MiB array comes from the
    allocator's heap (reused when freed), not from a mapping of its own,
    which glibc's default makes for it (and faults in anew each time); a
    threshold the user set wins."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    run = [sys.executable, "-c", FREED_MEMORY_PROBE, backend]
    heap = int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    mapped = int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    assert heap == 0 and mapped >= 64 << 20, (heap, mapped)


GIVE_BACK_PROBE = r"""
import os, sys
import numpy as np
import dask_labelissues

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

rng = np.random.default_rng(0)
labels, probs = rng.integers(0, 4, 5000), rng.dirichlet(np.ones(4), size=5000)
dask_labelissues.find_label_issues(labels, probs, backend=sys.argv[1])  # sets the allocator, loads the kernels
a = np.ones(int(sys.argv[3]) << 20, np.uint8)  # from the heap, which keeps it when freed
del a
kept = rss()
if sys.argv[2] == "job":
    dask_labelissues.find_label_issues(labels, probs, backend=sys.argv[1])
print(kept - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
@pytest.mark.parametrize("backend", ["serial", "threads", "fork"])
def test_a_local_job_gives_back_the_memory_the_allocator_kept(backend, monkeypatch):
    """The heap keeps freed arrays for reuse (the test above), so a job's
    stages start by giving back what was freed before them: a thread's
    arena holds its frees for that thread alone, and held, they add to the
    job's peak.  Less than GIVE_BACK_MIN_BYTES stays, for the stages to
    reuse without faulting it in again."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    least = GIVE_BACK_MIN_BYTES >> 20

    def freed(then: str, mib: int) -> int:
        run = [sys.executable, "-c", GIVE_BACK_PROBE, backend, then, str(mib)]
        return int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    idle, after_job = freed("nothing", 2 * least), freed("job", 2 * least)
    assert idle < 4 << 20 and after_job >= (2 * least - 4) << 20, (idle, after_job)
    if hasattr(ctypes.CDLL(None), "mallinfo2"):  # glibc 2.33 and later; before, every stage gives back
        assert freed("job", least // 4) < 4 << 20
