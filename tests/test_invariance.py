"""The output does not depend on chunking, engine or worker count."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from dask_labelissues import find_label_issues
from dask_labelissues.cluster import MALLOC_THRESHOLD

from .conftest import MALLOC_VARIABLES, Dataset, assert_identical, environment, make_dataset


def tied_dataset(n: int = 600, k: int = 5, seed: int = 3) -> Dataset:
    """Rows drawn from a palette of 12 probability vectors: scores tie
    exactly, many times over, across every block boundary."""
    rng = np.random.default_rng(seed)
    palette = rng.dirichlet(np.ones(k) * 0.7, size=12)
    rows = rng.integers(0, len(palette), n)
    probs = palette[rows]
    labels = rng.integers(0, k, n)
    return Dataset(labels, probs, np.zeros(0, dtype=np.int64))


SETTINGS = [
    dict(),
    dict(method="normalized_margin", adjust_pred_probs=True, estimation_method="off_diagonal_calibrated"),
    dict(method="self_confidence", adjust_pred_probs=True),
    dict(method="confidence_weighted_entropy"),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())) or "default")
@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_chunk_sizes_and_engines_agree(backend, settings):
    data = tied_dataset()
    n = data.n
    reference = find_label_issues(
        data.labels, data.pred_probs, backend="serial", chunk_rows=n, **settings
    )
    assert reference.num_issues > 0
    for rows in [1, 7, n // 4, n, n + 100]:
        other = find_label_issues(
            data.labels, data.pred_probs, backend=backend, chunk_rows=rows, n_jobs=2, **settings
        )
        assert_identical(reference, other)


@pytest.mark.parametrize("backend", ["serial", "threads", "fork", "dask"])
def test_tie_split_by_block_counts_agrees(backend, monkeypatch):
    """With no bucket small enough to gather, the tie at the cutoff is split
    by per-block counts; the output must not change."""
    from dask_labelissues import states

    data = tied_dataset()
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial", chunk_rows=data.n)
    monkeypatch.setattr(states, "CANDIDATE_CAP", 0)
    for rows in [7, data.n // 4]:
        other = find_label_issues(data.labels, data.pred_probs, backend=backend, chunk_rows=rows, n_jobs=2)
        assert_identical(reference, other)


def test_ties_are_broken_by_row_index():
    data = tied_dataset()
    result = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=7).compute()
    scores = result.label_quality_scores
    # Rows tied with the last selected score: the selected ones come first by index.
    cutoff = scores[result.issues[-1]]
    tied = np.flatnonzero(scores == cutoff)
    chosen = np.intersect1d(tied, result.issues)
    assert len(chosen) < len(tied), "dataset should tie across the cutoff"
    not_reduced = tied[~np.isin(tied, chosen)]
    # Every tied row not chosen either comes after the chosen ones or was
    # dropped by the near-tie rule (in the top set but not an issue: its
    # given label is its argmax once it gets 1e-6 more).
    before = not_reduced[not_reduced < chosen.max()]
    p = data.pred_probs[before]
    assert np.all(p[np.arange(len(before)), data.labels[before]] + 1e-6 >= p.max(axis=1))
    assert np.any(not_reduced > chosen.max())


def test_larger_dataset_dask_chunks_match_serial():
    data = make_dataset(30000, 20, seed=8, dtype=np.float32)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial", chunk_rows=30000)
    for rows in [1234, 7500, 30100]:
        assert_identical(
            reference,
            find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=rows),
        )
    assert_identical(
        reference,
        find_label_issues(data.labels, data.pred_probs, backend="fork", chunk_rows=999, n_jobs=2),
    )


def environment_reader(names=MALLOC_VARIABLES + ("PYTHONHASHSEED",)):
    """A function that reads ``names`` from its process's environment,
    defined here so that workers need not import this module."""

    def read(dask_worker=None):
        return {name: os.environ.get(name) for name in names}

    return read




def test_local_cluster_settings_reach_every_process(local_cluster):
    """The embedded cluster's background settings hold in its scheduler,
    its nannies and each worker process, and not in this process's config."""
    import dask

    from dask_labelissues.cluster import BATCH_SETTINGS

    def settings(dask_scheduler=None):
        return {key: dask.config.get(key) for key in BATCH_SETTINGS}

    def summary(server):
        return "profile" in server.periodic_callbacks, server._tick_interval, \
            server.periodic_callbacks["monitor"].callback_time

    def periodic(dask_worker=None, dask_scheduler=None):
        return summary(dask_worker or dask_scheduler)

    for per_worker in local_cluster.run(settings).values():
        assert per_worker == BATCH_SETTINGS

    for state in local_cluster.run(periodic).values():
        assert state == (False, 1.0, 2000)
    assert local_cluster.run_on_scheduler(periodic) == (False, 1.0, 2000)
    for nanny in local_cluster.cluster.workers.values():
        assert summary(nanny) == (False, 1.0, 2000)
    # Each worker started with the allocator's thresholds in its environment.
    threshold = str(MALLOC_THRESHOLD)
    for env in local_cluster.run(environment_reader(MALLOC_VARIABLES)).values():
        assert env == dict.fromkeys(MALLOC_VARIABLES, threshold)
    # This process's own configuration and environment are left as they were.
    assert dask.config.get("distributed.admin.tick.interval") != "1s"
    assert environment_reader()() == dict.fromkeys((*MALLOC_VARIABLES, "PYTHONHASHSEED"))


def test_local_cluster_leaves_a_set_allocator_variable_alone():
    """A threshold already in the environment wins (distributed's order), and
    the environment is the same after the cluster starts as before."""
    from distributed import Client

    from dask_labelissues.cluster import local_cluster as start

    mine = {"MALLOC_TRIM_THRESHOLD_": "1048576", "MALLOC_MMAP_THRESHOLD_": None, "PYTHONHASHSEED": None}
    read = environment_reader()
    with environment(**mine):
        with start(1, memory_limit="1GiB", dashboard_address=":0") as cluster, Client(cluster) as client:
            (env,) = client.run(read).values()
            assert read() == mine
        assert read() == mine
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1048576"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(MALLOC_THRESHOLD)


def test_local_cluster_matches_serial(local_cluster, tmp_path):
    data = make_dataset(20000, 10, seed=9)
    # Workers read the Zarr store from disk themselves.
    zarr.create_array(str(tmp_path / "labels.zarr"), data=data.labels, chunks=(3000,))
    zarr.create_array(str(tmp_path / "probs.zarr"), data=data.pred_probs, chunks=(3000, 10))
    labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    probs = zarr.open_array(str(tmp_path / "probs.zarr"), mode="r")

    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    for settings in SETTINGS[:2]:
        reference = find_label_issues(data.labels, data.pred_probs, backend="serial", **settings)
        on_cluster = find_label_issues(labels, probs, client=local_cluster, **settings)
        assert_identical(reference, on_cluster)
    # The default Client is picked up when none is passed.
    picked = find_label_issues(labels, probs, chunk_rows=6000)
    assert picked.backend == "dask" and picked.client is local_cluster
    assert_identical(find_label_issues(data.labels, data.pred_probs, backend="serial"), picked)


def test_processes_scheduler(tmp_path):
    import dask

    data = make_dataset(8000, 6, seed=10)
    np.save(tmp_path / "l.npy", data.labels)
    np.save(tmp_path / "p.npy", data.pred_probs)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    with dask.config.set(scheduler="processes", num_workers=2):
        result = find_label_issues(str(tmp_path / "l.npy"), str(tmp_path / "p.npy"), chunk_rows=1500)
        assert_identical(reference, result)


def test_fork_falls_back_to_serial_where_fork_is_missing(monkeypatch):
    from dask_labelissues.engines import fork

    monkeypatch.setattr(fork, "fork_available", lambda: False)
    data = make_dataset(3000, 4, seed=11)
    with pytest.warns(RuntimeWarning, match="fork start method.*running serially"):
        result = find_label_issues(data.labels, data.pred_probs, backend="fork", n_jobs=2)
    assert_identical(find_label_issues(data.labels, data.pred_probs, backend="serial"), result)


class DiesInWorker:
    """An array whose reads kill any process but the one that made it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.parent = os.getpid()

    def __getitem__(self, key):
        if os.getpid() != self.parent:
            os._exit(3)
        return self.array[key]


def test_fork_worker_that_dies_fails_the_job_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    data = make_dataset(4000, 5, seed=41)
    with pytest.raises(BrokenProcessPool):
        find_label_issues(data.labels, DiesInWorker(data.pred_probs), backend="fork", n_jobs=2, chunk_rows=1000)


def test_dask_sees_the_size_of_kept_blocks():
    """Block tasks return a Pair; Dask must count its arrays, or it would
    neither spill kept records under memory pressure nor weigh moving them."""
    from dask.sizeof import sizeof

    from dask_labelissues.aggregations import Pair

    records = np.zeros(100_000, dtype=np.float64)
    assert sizeof(Pair(records, None)) >= records.nbytes
    # A column's rows are a view, and a merge's result a tuple of arrays.
    view = np.zeros(200_000)[50_000:150_000]
    assert sizeof(Pair(view, None)) >= view.nbytes
    assert sizeof(Pair((records, view), None)) >= 2 * records.nbytes


@pytest.mark.parametrize("filter_by", [None, "prune_by_noise_rate"])
def test_merges_take_block_states_not_kept_blocks(monkeypatch, filter_by):
    """A tree reduction must depend on the small per-block states only: a
    merge that took the block tasks' outputs themselves would pull every
    block's kept records across the network to the merging worker."""
    from dask_labelissues.aggregations import AGGREGATIONS
    from dask_labelissues.engines.dask import DaskEngine

    seen: list = []
    run = DaskEngine._run

    def spy(self, blocks, wanted):
        if blocks:  # the graphs that keep blocks on the cluster
            seen.append({k: v for w in wanted for k, v in w.dask.dependencies.items()})
        return run(self, blocks, wanted)

    monkeypatch.setattr(DaskEngine, "_run", spy)
    data = make_dataset(6000, 6, seed=5)
    find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000, filter_by=filter_by)
    # Both passes; with the filter, its second read and its masks too.
    assert len(seen) == (3 if filter_by else 1)
    merge_names = tuple(f"{name}-" for name in AGGREGATIONS)
    # Six blocks, one merge each: pass one's root makes the thresholds (and
    # without a filter, the bucket to gather); with a filter, pass two's
    # tree follows.
    first = {str(name).rsplit("-", 1)[0] for name in seen[0] if str(name).startswith(merge_names)}
    assert first == ({"thresholds", "scores"} if filter_by else {"thresholds_outlook"})
    for dependencies in seen:
        merges = {name: deps for name, deps in dependencies.items() if str(name).startswith(merge_names)}
        assert merges
        for name, deps in merges.items():
            assert all(str(d).startswith((*merge_names, "block_state-")) for d in deps), (name, deps)


def test_shared_arguments_inlined_or_keyed_give_the_same_result(monkeypatch):
    """A stage's common arguments (spec, thresholds, filter spec) go into
    each task when small and are one graph key when large; both ways agree."""
    from dask.delayed import Delayed

    from dask_labelissues.engines import dask as engine

    data = make_dataset(5000, 7, seed=12)
    settings = dict(method="normalized_margin", adjust_pred_probs=True, filter_by="prune_by_noise_rate")
    inlined = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=700, **settings)
    assert isinstance(engine.shared(np.zeros(7), 8), np.ndarray)
    monkeypatch.setattr(engine, "INLINE_BYTES", 0)
    assert isinstance(engine.shared(np.zeros(7), 8), Delayed)
    keyed = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=700, **settings)
    assert_identical(inlined, keyed)
    # Containers, which Dask would search for keys and tasks, are one key.
    for container in ((1, 2), [1], {1: 2}, {1}, frozenset({1})):
        assert isinstance(engine.shared(container, 3), Delayed)
    assert engine.shared(None, 3) is None and engine.shared(2.5, 3) == 2.5


def test_layer_keeps_the_graph_of_every_input():
    """A layer over inputs that make a new graph each time they are asked
    (as ``delayed(value)`` does) holds every one of those graphs.

    Telling shared graphs apart by ``id`` alone dropped inputs whose new
    graph took the freed id of an earlier one: on a cluster, a KeyError
    when the graph was culled, seen as a flaky failure of a filter test.
    """
    from dask.delayed import delayed
    from dask.highlevelgraph import HighLevelGraph

    from dask_labelissues.engines.dask import layer, merged_graph

    class Fresh:
        def __init__(self, key: str) -> None:
            self.key = key

        @property
        def dask(self) -> HighLevelGraph:
            return HighLevelGraph({self.key: {self.key: 1}}, {self.key: set()})

        def __dask_layers__(self) -> tuple:
            return (self.key,)

    inputs = [Fresh(f"input-{i}") for i in range(300)]
    graph = merged_graph(inputs)
    assert all(x.key in graph.layers for x in inputs)

    values = [delayed(i, pure=False) for i in range(200)]
    (task,) = layer(lambda *xs: sum(xs), [tuple(values)])
    assert all(v.key in task.dask.layers for v in values)
    assert task.compute(scheduler="sync") == sum(range(200))


@pytest.mark.parametrize("cap", [None, 2])
def test_passes_and_first_bucket_run_as_one_graph(monkeypatch, cap):
    """The Dask engine runs both passes and gathers the selection's first
    bucket in one graph; when that bucket is too large to gather
    (``cap``), the selection goes on round by round as before, and the
    issues are the same either way.

    On threads: the cap is patched in this process only, and this module's
    cluster fixture may be the default client by now.
    """
    import dask

    from dask_labelissues import states
    from dask_labelissues.engines.dask import DaskEngine

    data = make_dataset(8000, 6, seed=31)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    if cap is not None:
        monkeypatch.setattr(states, "CANDIDATE_CAP", cap)
    graphs = []
    run = DaskEngine._run

    def spy(self, blocks, wanted):
        graphs.append(len(blocks))
        return run(self, blocks, wanted)

    monkeypatch.setattr(DaskEngine, "_run", spy)
    with dask.config.set(scheduler="threads"):
        result = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000)
    assert_identical(reference, result)
    assert graphs[0] == 8  # the passes, keeping the records of 8 blocks
    if cap is None:
        assert len(graphs) == 1  # nothing left to ask the cluster for
    else:
        assert len(graphs) >= 3  # histogram rounds, then the gather


def test_kept_blocks_enter_later_graphs_as_one_layer(local_cluster, monkeypatch):
    """A graph over the blocks a job keeps on the cluster (here the filter's
    second read, over pass one's records) holds them in one layer, not one
    layer per block: the scheduler's intake of a graph grows with its
    layers times its keys, seconds for a few thousand blocks."""
    from dask.highlevelgraph import HighLevelGraph
    from distributed import Client

    sent: list[int] = []
    original = Client.get

    def spy(self, dsk, keys, **kwargs):
        if isinstance(dsk, HighLevelGraph):  # ours; dask.compute passes expressions
            sent.append(len(dsk.layers))
        return original(self, dsk, keys, **kwargs)

    monkeypatch.setattr(Client, "get", spy)
    data = make_dataset(6000, 6, seed=44)
    layers = {}
    results = {}
    for chunk_rows in (1000, 500):
        sent.clear()
        results[chunk_rows] = find_label_issues(
            data.labels, data.pred_probs, client=local_cluster, chunk_rows=chunk_rows,
            filter_by="prune_by_noise_rate",
        )
        assert len(sent) >= 2  # both passes, then the second read and the selections
        layers[chunk_rows] = list(sent)
    # As many layers in each graph for 6 blocks as for 12.
    assert layers[1000] == layers[500]
    assert_identical(results[1000], results[500])


def test_many_classes_keep_the_two_stage_graph(monkeypatch):
    """Above OUTLOOK_MAX_CLASSES the outlook (K x bins per kept block) is
    not made, and pass two's tree picks the bucket, with the same issues."""
    import dask

    from dask_labelissues import pipelines
    from dask_labelissues.engines import dask as engine

    data = make_dataset(6000, 12, seed=45)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial")
    roots = []
    original = engine.tree_reduce

    def spy(parts, aggregation, *args, **kwargs):
        roots.append(aggregation.name)
        return original(parts, aggregation, *args, **kwargs)

    monkeypatch.setattr(engine, "tree_reduce", spy)
    with dask.config.set(scheduler="threads"):
        cases = ((12, ["thresholds_outlook"]), (11, ["thresholds", "first_bucket"]))
        for limit, expected in cases:
            roots.clear()
            monkeypatch.setattr(pipelines, "OUTLOOK_MAX_CLASSES", limit)
            result = find_label_issues(data.labels, data.pred_probs, backend="dask", chunk_rows=1000)
            assert roots == expected
            assert_identical(reference, result)
