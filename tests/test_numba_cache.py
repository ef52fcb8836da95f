"""A job that finds numba's cache without the kernels runs the numpy
kernels and has them compiled in the background; the next job loads them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

from dask_labelissues import fused, numba_cache
from dask_labelissues.engines.blocks import COLD_NUMBA_MAX_CELLS, NUMBA_MIN_CELLS, choose_kernel
from dask_labelissues.kernels import ScoreSpec

from .conftest import make_dataset

JOB = """
import hashlib, sys, numpy as np
from dask_labelissues import find_label_issues, fused, numba_cache
from dask_labelissues.engines import blocks
# Small as the data are, the job is planned as a large one.
blocks.NUMBA_MIN_CELLS = 0
data = np.load(sys.argv[1])
r = find_label_issues(data["labels"], data["probs"], chunk_rows=333)
h = hashlib.sha256()
for a in (r.issues, r.label_quality_scores, r.confident_thresholds, np.array([r.estimated_num_issues])):
    h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest(), "numba" if fused.numba_loaded() else "numpy", numba_cache.compiled())
"""


def _run_job(path, env):
    out = subprocess.run([sys.executable, "-c", JOB, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_a_cold_cache_runs_numpy_compiles_in_the_background_and_the_next_job_loads_numba(tmp_path):
    data = make_dataset(3_000, 6, seed=11, dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, labels=data.labels, probs=data.pred_probs)
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("DASK_LABELISSUES_KERNEL", None)

    digest, ran, compiled = _run_job(path, env)
    assert (ran, compiled) == ("numpy", "False")
    # The job's process has ended; its background compile goes on alone.
    stamps = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not stamps:
        stamps = list(cache.glob("dask_labelissues-numba-*.stamp"))
        time.sleep(0.25)
    assert len(stamps) == 1, "the background compile wrote no stamp"
    deadline = time.monotonic() + 60
    while list(cache.glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(cache.glob("*.lock")), "the background compile kept its lock"
    compiled_files = sorted(p.name for p in cache.rglob("*.nbc"))
    assert compiled_files

    again = _run_job(path, env)
    assert again == [digest, "numba", "True"]
    # The second job loaded every kernel it ran from the cache.
    assert sorted(p.name for p in cache.rglob("*.nbc")) == compiled_files


def test_the_kernel_a_job_runs_while_the_cache_is_cold(monkeypatch):
    started = []
    monkeypatch.setattr(numba_cache, "compiled", lambda: False)
    monkeypatch.setattr(numba_cache, "compile_in_background", lambda: started.append(1) or True)
    monkeypatch.setattr(fused, "numba_loaded", lambda: False)
    monkeypatch.setattr(fused, "numba_allowed", lambda: True)
    auto = ScoreSpec()
    large = NUMBA_MIN_CELLS
    assert choose_kernel(auto, large, in_process=True).kernel == "numpy"
    assert len(started) == 1
    # A job large enough that numpy would cost more than the compile,
    # one of many problems, or one on a Dask cluster, keeps numba.
    assert choose_kernel(auto, COLD_NUMBA_MAX_CELLS, in_process=True).kernel == "auto"
    assert choose_kernel(auto, large * 4, in_process=True, problems=4).kernel == "auto"
    assert choose_kernel(auto, large, in_process=False).kernel == "auto"
    for kernel in ("numba", "numpy"):
        assert choose_kernel(replace(auto, kernel=kernel), large, in_process=True).kernel == kernel
    assert len(started) == 1
    monkeypatch.setattr(numba_cache, "compiled", lambda: True)
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    monkeypatch.setattr(numba_cache, "compiled", lambda: False)
    # Where numba may not run, "auto" is numpy already: nothing to compile.
    monkeypatch.setattr(fused, "numba_allowed", lambda: False)
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    assert len(started) == 1


def test_numba_is_not_allowed_where_the_environment_says_numpy(monkeypatch):
    monkeypatch.setattr(fused, "_NUMBA_TRIED", False)
    monkeypatch.setenv("DASK_LABELISSUES_KERNEL", "numpy")
    assert not fused.numba_allowed()
    monkeypatch.delenv("DASK_LABELISSUES_KERNEL")
    assert fused.numba_allowed()


class _Spawned:
    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs, self.pid = argv, kwargs, os.getpid()

    def wait(self):
        return 0


def test_one_background_compile_at_a_time(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    spawned = []
    monkeypatch.setattr(numba_cache.subprocess, "Popen", lambda argv, **kw: spawned.append(_Spawned(argv, **kw)) or spawned[-1])
    monkeypatch.setattr(numba_cache, "_lowest_priority", lambda pid: None)
    monkeypatch.setattr(numba_cache, "_STARTED", False)
    assert not numba_cache.compiled()
    assert numba_cache.compile_in_background()
    assert spawned[0].argv[1:] == ["-m", "dask_labelissues.warmup"]
    assert spawned[0].kwargs["start_new_session"]
    lock = numba_cache.lock_path()
    assert lock.is_file() and lock.parent == tmp_path
    # Once per process; and another process's fresh lock is respected.
    assert not numba_cache.compile_in_background()
    monkeypatch.setattr(numba_cache, "_STARTED", False)
    assert not numba_cache.compile_in_background()
    assert len(spawned) == 1
    # A lock left by a compile that died long ago is taken over.
    old = time.time() - numba_cache.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    monkeypatch.setattr(numba_cache, "_STARTED", False)
    assert numba_cache.compile_in_background()
    assert len(spawned) == 2
    numba_cache.mark_compiled()
    assert numba_cache.compiled()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_the_stamp_belongs_to_one_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "one"))
    numba_cache.mark_compiled()
    assert numba_cache.compiled()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "two"))
    assert not numba_cache.compiled()
