"""Which engine, blocks and kernel a job gets, and that the choice changes
no result."""

from __future__ import annotations

import json
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest

from dask_labelissues import find_label_issues
from dask_labelissues.engines import blocks, choose_backend, make_engine
from dask_labelissues.engines.blocks import choose_kernel, group_chunks, join_adjacent
from dask_labelissues.system import usable_cores
from dask_labelissues.engines.threads import ThreadEngine
from dask_labelissues.kernels import ScoreSpec

from .conftest import assert_identical, make_dataset


def test_auto_runs_numpy_input_on_threads_and_returns_numpy():
    data = make_dataset(5000, 6, seed=3)
    result = find_label_issues(data.labels, data.pred_probs)
    assert result.backend == "threads"
    assert isinstance(result.label_quality_scores, np.ndarray)
    assert_identical(find_label_issues(data.labels, data.pred_probs, backend="serial"), result)


def test_auto_runs_dask_input_on_dask_and_stays_lazy():
    data = make_dataset(5000, 6, seed=3)
    labels = da.from_array(data.labels, chunks=1000)
    probs = da.from_array(data.pred_probs, chunks=(1000, 6))
    result = find_label_issues(labels, probs)
    assert result.backend == "dask"
    assert isinstance(result.label_quality_scores, da.Array)
    assert_identical(find_label_issues(data.labels, data.pred_probs, backend="serial"), result.compute())


def test_auto_runs_on_a_current_distributed_client():
    from distributed import Client, LocalCluster

    data = make_dataset(3000, 5, seed=4)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert choose_backend("auto", data.labels, data.pred_probs) == "dask"
        result = find_label_issues(data.labels, data.pred_probs)
        assert result.backend == "dask" and result.client is client
    assert choose_backend("auto", data.labels, data.pred_probs) == "threads"


def test_backend_names_are_checked_before_any_input_is_opened():
    with pytest.raises(ValueError, match="backend='gpu' is not one of auto, dask, threads, fork, serial"):
        find_label_issues("/no/such/labels.npy", "/no/such/probs.npy", backend="gpu")


def test_small_jobs_get_the_numpy_kernel_unless_numba_is_loaded(monkeypatch):
    from dask_labelissues import fused, numba_cache

    # With numba's cache filled (the cold case: tests/test_numba_cache.py).
    monkeypatch.setattr(numba_cache, "compiled", lambda: True)
    auto = ScoreSpec()
    small, large = blocks.NUMBA_MIN_CELLS - 1, blocks.NUMBA_MIN_CELLS
    monkeypatch.setattr(fused, "numba_loaded", lambda: False)
    assert choose_kernel(auto, small, in_process=True).kernel == "numpy"
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    monkeypatch.setattr(fused, "numba_loaded", lambda: True)
    assert choose_kernel(auto, small, in_process=True).kernel == "auto"
    # Loaded here says nothing of a cluster's workers.
    assert choose_kernel(auto, small, in_process=False).kernel == "numpy"
    for kernel in ("numba", "numpy"):
        assert choose_kernel(ScoreSpec(kernel=kernel), small, in_process=False).kernel == kernel
        assert choose_kernel(ScoreSpec(kernel=kernel), large, in_process=True).kernel == kernel


FRESH = r"""
import json, sys
import numpy as np
from dask_labelissues import find_label_issues
rng = np.random.default_rng(0)
probs = rng.dirichlet(np.ones(10), 10_000).astype(np.float32)
labels = rng.integers(0, 10, 10_000)
result = find_label_issues(labels, probs)
print(json.dumps({"backend": result.backend, "issues": result.issues.tolist(),
                  "modules": sorted(m for m in ("numba", "dask", "dask.array", "distributed", "zarr",
                                                "dask_labelissues.filters", "dask_labelissues.store")
                                    if m in sys.modules)}))
"""


def test_a_small_first_call_imports_no_numba_dask_or_zarr():
    """What makes the first call in a fresh process cheap: a small job
    loads neither numba's kernels nor Dask, nor the modules of the
    filters and of results stores, which it does not use."""
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["backend"] == "threads"
    assert out["modules"] == []
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 10_000).astype(np.float32)
    labels = rng.integers(0, 10, 10_000)
    assert out["issues"] == find_label_issues(labels, probs, backend="serial").issues.tolist()


FRESH_FILTER = r"""
import json
import numpy as np
from dask_labelissues import find_label_issues
rng = np.random.default_rng(1)
probs = rng.dirichlet(np.ones(6), 6_000)
labels = rng.integers(0, 6, 6_000)
out = {}
for backend in ("serial", "fork"):
    result = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", health=True, backend=backend)
    out[backend] = [result.issues.tolist(), result.confident_joint.tolist()]
print(json.dumps(out))
"""


def test_a_filter_job_in_a_fresh_process_loads_what_it_needs():
    """The filters' module and blueprints load with the first job that runs
    one, in this process and in forked workers, with the results of a
    process that had them loaded from the start."""
    proc = subprocess.run([sys.executable, "-c", FRESH_FILTER], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(6), 6_000)
    labels = rng.integers(0, 6, 6_000)
    want = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", health=True, backend="serial")
    for backend in ("serial", "fork"):
        assert out[backend] == [want.issues.tolist(), want.confident_joint.tolist()], backend

def test_group_chunks():
    assert group_chunks([2000] * 10, 4500) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert group_chunks([2000] * 9, 6000) == [(0, 3), (3, 6), (6, 9)]
    assert group_chunks([5, 1, 1, 7, 2], 3) == [(0, 1), (1, 4), (4, 5)]
    assert group_chunks([10], 100) == [(0, 1)]
    assert group_chunks([], 10) == []


@pytest.mark.parametrize("settings", [dict(), dict(method="normalized_margin", adjust_pred_probs=True),
                                      dict(filter_by="prune_by_noise_rate")],
                         ids=["default", "margin-adjusted", "prune_by_noise_rate"])
@pytest.mark.parametrize("adjacent", [True, False], ids=["chunks-end-to-end", "chunks-apart"])
def test_small_dask_chunks_are_grouped_into_blocks_with_the_same_result(settings, adjacent, monkeypatch):
    from dask_labelissues import inputs

    data = make_dataset(24000, 8, seed=12, dtype=np.float32)
    if adjacent:  # chunks are views of one array: a block is scanned as one view
        labels = da.from_array(data.labels, chunks=500)
        probs = da.from_array(data.pred_probs, chunks=(500, 8))
    else:  # every chunk its own array: a block is scanned chunk by chunk
        labels = da.concatenate([da.from_array(data.labels[a:a + 500].copy()) for a in range(0, 24000, 500)])
        probs = da.concatenate([da.from_array(data.pred_probs[a:a + 500].copy()) for a in range(0, 24000, 500)])
    joined = []
    monkeypatch.setattr(blocks, "join_adjacent", lambda parts: joined.append(join_adjacent(parts)) or joined[-1])
    # Blocks of about 2,000 rows here (the automatic 64 MB would be one block).
    monkeypatch.setattr(blocks, "TARGET_BLOCK_BYTES", 2000 * 8 * 4)
    src_l, src_p = inputs.open_source(labels, "labels"), inputs.open_source(probs, "pred_probs")
    engine, _, _ = make_engine("dask", src_l, src_p, ScoreSpec())
    assert engine.plan.groups is not None
    assert list(engine.plan.chunks) == [2000] * 12
    grouped = find_label_issues(labels, probs, backend="dask", **settings)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial", **settings)
    assert_identical(reference, grouped.compute())
    if "filter_by" in settings:
        np.testing.assert_array_equal(reference.confident_joint, grouped.confident_joint)
    assert joined and all((j is not None) == adjacent for j in joined)


def test_chunks_held_as_data_in_the_graph_cost_no_key_each():
    """``from_array`` of a numpy array holds each chunk as data in its
    graph: the graphs of a job on 200 such chunks have as many keys as on
    the 4 chunks its blocks are (the scheduler orders and runs each key),
    none more a chunk, and the job finds the same issues."""
    import dask
    from dask.callbacks import Callback

    data = make_dataset(24000, 8, seed=3, dtype=np.float32)

    def job(rows: int) -> tuple[int, object]:
        keys = []
        labels = da.from_array(data.labels, chunks=rows)
        probs = da.from_array(data.pred_probs, chunks=(rows, 8))
        with dask.config.set(scheduler="threads", num_workers=2), Callback(start=lambda dsk: keys.append(len(dsk))):
            result = find_label_issues(labels, probs).compute()
        return sum(keys), result

    small, small_result = job(120)
    whole, whole_result = job(6000)
    assert small == whole
    assert_identical(whole_result, small_result)


def test_join_adjacent_makes_a_view_only_of_pieces_lying_end_to_end(tmp_path):
    whole = np.arange(60.0).reshape(20, 3)
    view = join_adjacent([whole[2:5], whole[5:6], whole[6:11]])
    assert view is not None and np.shares_memory(view, whole)
    np.testing.assert_array_equal(view, whole[2:11])
    assert join_adjacent([whole[4:9]]) is not None
    np.save(tmp_path / "whole.npy", whole)
    mapped = np.load(tmp_path / "whole.npy", mmap_mode="r")
    view = join_adjacent([mapped[0:7], mapped[7:20]])
    assert view is not None and np.shares_memory(view, mapped) and not view.flags.writeable
    np.testing.assert_array_equal(view, whole)
    for parts in (
        [whole[0:3], whole[4:6]],                 # a gap
        [whole[3:6], whole[0:3]],                 # out of order
        [whole[0:3], whole[3:6].copy()],          # another buffer
        [whole[0:3, :2], whole[3:6, :2]],         # not contiguous
        [whole[0:3], whole[3:6].astype(np.float32)],
        [whole[0:3], list(whole[3:6])],           # not an array
    ):
        assert join_adjacent(parts) is None
    fortran = np.asfortranarray(whole)
    assert join_adjacent([fortran[0:3], fortran[3:6]]) is None
    objects = np.array([object()] * 6)
    assert join_adjacent([objects[0:3], objects[3:6]]) is None


def test_threads_engine_uses_n_jobs_threads_and_closes_its_pool():
    data = make_dataset(6000, 5, seed=2)
    from dask_labelissues.inputs import InMemory

    lab, probs = InMemory(data.labels), InMemory(data.pred_probs)
    engine, _, _ = make_engine("threads", lab, probs, ScoreSpec(), chunk_rows=1000, n_jobs=3)
    assert isinstance(engine, ThreadEngine) and engine.pool._max_workers == 3
    engine.close()
    with pytest.raises(RuntimeError):
        engine.pool.submit(int)
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        make_engine("threads", lab, probs, ScoreSpec(), chunk_rows=1000, n_jobs=0)


def test_usable_cores_match_dask():
    import dask.system

    assert usable_cores() == dask.system.CPU_COUNT


_UNDER_LIMIT = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
import numpy as np
from dask_labelissues.engines import make_engine
from dask_labelissues.kernels import ScoreSpec
from dask_labelissues.system import usable_memory
probs = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (2_000_000, 100), (0, 0))
labels = np.zeros(2_000_000, dtype=np.int64)
engine, _, _ = make_engine("threads", labels, probs, ScoreSpec(), n_jobs=2)
engine.close()
print(json.dumps({"memory": usable_memory(), "rows": max(engine.plan.chunks)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits as Linux counts them")
def test_a_data_limit_shrinks_the_blocks_of_local_jobs():
    """Under ``ulimit -d`` (address space), each of a job's threads holds
    a block and its temporaries: blocks shrink to fit, where the 64 MiB a
    block holds otherwise took a multi-label job past half its data."""
    out = {}
    for limit in (2**40, 512 << 20):
        proc = subprocess.run(
            [sys.executable, "-c", _UNDER_LIMIT, str(limit)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        out[limit] = json.loads(proc.stdout)
    row = 100 * 4
    assert out[2**40]["rows"] * row == pytest.approx(blocks.TARGET_BLOCK_BYTES, rel=0.01)
    assert out[512 << 20]["memory"] == 512 << 20
    # 512 MiB over 8 x 2 threads: 32 MiB blocks.
    assert out[512 << 20]["rows"] * row == pytest.approx(32 << 20, rel=0.01)


def test_block_plans_fit_the_process_memory_per_thread():
    job = dict(n_rows=1_000_000, row_bytes=400, record_bytes=32, spec=ScoreSpec(), cells=100_000_000)
    free = blocks.plan_blocks(blocks.BlockConfig(**job, threads=2, process_memory=24 << 30))
    tight = blocks.plan_blocks(blocks.BlockConfig(**job, threads=2, process_memory=400 << 20))
    assert max(free.chunks) * 400 == pytest.approx(blocks.TARGET_BLOCK_BYTES, rel=0.01)
    assert max(tight.chunks) * 400 <= (400 << 20) // 16
    assert sum(tight.chunks) == 1_000_000


@pytest.mark.parametrize("n_rows", [1, 7, 999, 2_000_000, 2_000_001])
@pytest.mark.parametrize("rows, unit", [(160_000, 20_000), (167_772, None), (3, None), (20_000, 20_000)])
@pytest.mark.parametrize("threads", [0, 1, 2, 3, 8])
def test_balanced_blocks_split_whole_chunks_evenly_among_threads(n_rows, rows, unit, threads):
    sizes = blocks.balanced_chunks(n_rows, rows, unit, threads)
    assert sum(sizes) == n_rows and min(sizes) > 0
    assert max(sizes) <= max(rows, unit or 1)
    step = unit or 1
    assert all(s % step == 0 for s in sizes[:-1])
    planned = blocks.even_chunks(n_rows, rows)
    if threads < 2 or len(planned) < 2:
        assert sizes == planned
        return
    chunks = -(-n_rows // step)
    assert len(sizes) % threads == 0 or len(sizes) == chunks
    assert len(planned) <= len(sizes) < len(planned) + threads
    # As even as whole chunks allow (the last may end inside one).
    assert max(sizes[:-1]) - min(sizes) < 2 * step


def test_local_engines_balance_their_blocks_among_their_threads():
    labels, probs = np.zeros(1000, dtype=np.int64), np.full((1000, 4), 0.25)
    spec = ScoreSpec()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks, "TARGET_BLOCK_BYTES", 130 * 32)  # 130 rows: 8 blocks, the last short
        serial, _, _ = make_engine("serial", labels, probs, spec)
        threads, _, _ = make_engine("threads", labels, probs, spec, n_jobs=3)
    assert serial.plan.chunks == blocks.even_chunks(1000, 130)
    assert len(threads.plan.chunks) == 9 and max(threads.plan.chunks) - min(threads.plan.chunks) <= 1


@pytest.mark.parametrize("workers", [2, 3])
def test_dask_engine_chunks_in_memory_inputs_as_its_balanced_blocks(workers):
    """Blocks of uneven sizes (balanced among the scheduler's threads): the
    dask arrays the engine makes of numpy inputs have the same chunks, so
    each block's task reads its own rows."""
    import dask

    data = make_dataset(1001, 4, seed=3)
    want = find_label_issues(data.labels, data.pred_probs, backend="serial", filter_by="prune_by_noise_rate")
    with pytest.MonkeyPatch.context() as mp, dask.config.set(num_workers=workers, scheduler="threads"):
        mp.setattr(blocks, "TARGET_BLOCK_BYTES", 150 * 32)  # 150 rows of 4 float64
        engine, _, _ = make_engine("dask", data.labels, data.pred_probs, ScoreSpec())
        engine.close()
        assert len(set(engine.plan.chunks[:-1])) > 1  # uneven, as the test needs
        assert engine.labels.chunks[0] == engine.pred_probs.chunks[0] == engine.plan.chunks
        got = find_label_issues(data.labels, data.pred_probs, backend="dask", filter_by="prune_by_noise_rate")
    np.testing.assert_array_equal(got.issues, want.issues)
    np.testing.assert_array_equal(np.asarray(got.is_label_issue), np.asarray(want.is_label_issue))
    np.testing.assert_array_equal(np.asarray(got.label_quality_scores), np.asarray(want.label_quality_scores))
