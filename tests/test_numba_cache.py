"""A job that finds numba's cache without the kernels runs the numpy
kernels and has them compiled in the background; the next job loads them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
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
import hashlib, json, sys, numpy as np
from dask_labelissues import find_label_issues, fused, numba_cache
from dask_labelissues.engines import blocks
# Small as the data are, the job is planned as a large one.
blocks.NUMBA_MIN_CELLS = 0
if sys.argv[1].endswith(".npz"):
    data = np.load(sys.argv[1])
    labels, probs = data["labels"], data["probs"]
else:  # a directory of .npy files, read memory-mapped
    labels, probs = sys.argv[1] + "/labels.npy", sys.argv[1] + "/probs.npy"
options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
r = find_label_issues(labels, probs, chunk_rows=333, **options)
h = hashlib.sha256()
for a in (r.issues, r.label_quality_scores, r.confident_thresholds, np.array([r.estimated_num_issues])):
    h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest(), "numba" if fused.numba_loaded() else "numpy", numba_cache.compiled())
"""


def _run_job(path, env, **options):
    out = subprocess.run([sys.executable, "-c", JOB, str(path), json.dumps(options)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def _kill_left_compile(cache):
    """Stop a background compile a failed test left running (its PID is in
    its lock file)."""
    for lock in cache.glob("*.lock"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(lock.read_text().split()[0]), signal.SIGKILL)


def test_a_cold_cache_runs_numpy_compiles_in_the_background_and_the_next_job_loads_numba(tmp_path):
    data = make_dataset(3_000, 6, seed=11, dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, labels=data.labels, probs=data.pred_probs)
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("DASK_LABELISSUES_KERNEL", None)
    try:
        digest, ran, compiled = _run_job(path, env)
        assert (ran, compiled) == ("numpy", "False")
        # The job's process has ended; its background compile goes on alone,
        # holding its lock, and removes the lock file once the stamp is written.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not list(cache.glob("*.stamp")) or list(cache.glob("*.lock"))):
            time.sleep(0.1)
        assert len(list(cache.glob("dask_labelissues-numba-*.stamp"))) == 1, "the background compile wrote no stamp"
        assert not list(cache.glob("*.lock")), "the background compile left its lock file"
    finally:
        _kill_left_compile(cache)
    compiled_files = sorted(p.name for p in cache.rglob("*.nbc"))
    assert compiled_files

    again = _run_job(path, env)
    assert again == [digest, "numba", "True"]
    # The second job loaded every kernel it ran from the cache.
    assert sorted(p.name for p in cache.rglob("*.nbc")) == compiled_files

    # So do jobs of the fork engine, of a score that reads the rows twice,
    # of a filter, and of float32 rows with more classes than the exponent
    # sums take (whose kernels' arguments differ), from memory and from
    # read-only memory-mapped files.
    wide = make_dataset(2_000, fused.EXPONENT_SUMS_MAX_K + 44, seed=12, dtype=np.float32)
    np.savez(tmp_path / "wide.npz", labels=wide.labels, probs=wide.pred_probs)
    (tmp_path / "wide").mkdir()
    np.save(tmp_path / "wide" / "labels.npy", wide.labels)
    np.save(tmp_path / "wide" / "probs.npy", wide.pred_probs)
    for options in ({"backend": "fork"}, {"backend": "fork", "method": "confidence_weighted_entropy"},
                    {"backend": "fork", "filter_by": "prune_by_noise_rate"}, {"backend": "threads"},
                    {"backend": "threads", "method": "confidence_weighted_entropy"}):
        for data_path in (path, tmp_path / "wide.npz", tmp_path / "wide"):
            assert _run_job(data_path, env, **options)[1:] == ["numba", "True"]
    assert sorted(p.name for p in cache.rglob("*.nbc")) == compiled_files


def test_after_a_background_compile_that_did_not_finish_jobs_compile_the_kernels_themselves(tmp_path, monkeypatch):
    data = make_dataset(2_000, 5, seed=12, dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, labels=data.labels, probs=data.pred_probs)
    cache = tmp_path / "numba-cache"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
    lock = numba_cache.lock_path()
    lock.parent.mkdir(parents=True)
    lock.write_text("12345\n")  # nobody holds it: that compile was killed
    env = dict(os.environ)
    env.pop("DASK_LABELISSUES_KERNEL", None)
    ran, compiled = _run_job(path, env)[1:]
    assert (ran, compiled) == ("numba", "False")
    assert lock.read_text() == "12345\n" and not list(cache.glob("*.stamp"))
    # dask-labelissues compile fills the cache and clears the failure.
    subprocess.run([sys.executable, "-m", "dask_labelissues", "compile"], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    assert numba_cache.compiled() and not lock.exists()


def test_the_kernel_a_job_runs_while_the_cache_is_cold(monkeypatch):
    running = [True]
    asked = []
    monkeypatch.setattr(numba_cache, "compiled", lambda: False)
    monkeypatch.setattr(numba_cache, "compile_in_background", lambda: asked.append(1) or running[0])
    monkeypatch.setattr(fused, "numba_loaded", lambda: False)
    monkeypatch.setattr(fused, "numba_allowed", lambda: True)
    auto = ScoreSpec()
    large = NUMBA_MIN_CELLS
    assert choose_kernel(auto, large, in_process=True).kernel == "numpy"
    assert len(asked) == 1
    # A job large enough that numpy would cost more than the compile, one
    # whose numpy path costs far more, or one on a Dask cluster, keeps numba.
    assert choose_kernel(auto, COLD_NUMBA_MAX_CELLS, in_process=True).kernel == "auto"
    assert choose_kernel(auto, large, in_process=True, numpy_while_compiling=False).kernel == "auto"
    assert choose_kernel(auto, large, in_process=False).kernel == "auto"
    for kernel in ("numba", "numpy"):
        assert choose_kernel(replace(auto, kernel=kernel), large, in_process=True).kernel == kernel
    assert len(asked) == 1
    # Where no compile can run in the background, the job compiles.
    running[0] = False
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    monkeypatch.setattr(numba_cache, "compiled", lambda: True)
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    # Where numba may not run, "auto" is numpy already: nothing to compile.
    monkeypatch.setattr(numba_cache, "compiled", lambda: False)
    monkeypatch.setattr(fused, "numba_allowed", lambda: False)
    assert choose_kernel(auto, large, in_process=True).kernel == "auto"
    assert len(asked) == 2


def test_multilabel_jobs_compile_while_the_cache_is_cold(monkeypatch):
    from dask_labelissues.engines.blocks import BlockConfig, plan_blocks

    monkeypatch.setattr(numba_cache, "compiled", lambda: False)
    monkeypatch.setattr(numba_cache, "compile_in_background", lambda: True)
    monkeypatch.setattr(fused, "numba_loaded", lambda: False)
    monkeypatch.setattr(fused, "numba_allowed", lambda: True)
    job = dict(n_rows=1_000_000, row_bytes=400, record_bytes=32, spec=ScoreSpec(), cells=NUMBA_MIN_CELLS)
    assert plan_blocks(BlockConfig(**job)).spec.kernel == "numpy"
    assert plan_blocks(BlockConfig(**job, problems=2)).spec.kernel == "auto"
    assert plan_blocks(BlockConfig(**job, numpy_while_compiling=False)).spec.kernel == "auto"


def test_numba_is_not_allowed_where_the_environment_says_numpy(monkeypatch):
    monkeypatch.setattr(fused, "_NUMBA_TRIED", False)
    monkeypatch.setenv("DASK_LABELISSUES_KERNEL", "numpy")
    assert not fused.numba_allowed()
    monkeypatch.delenv("DASK_LABELISSUES_KERNEL")
    assert fused.numba_allowed()


class _Child:
    """A stand-in for the background process: it holds no lock."""

    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs, self.pid, self.code = argv, kwargs, os.getpid(), None

    def poll(self):
        return self.code


def test_one_background_compile_at_a_time_and_none_after_one_failed(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: started.append(_Child(argv, **kw)) or started[-1])
    monkeypatch.setattr(numba_cache, "_lowest_priority", lambda pid: None)
    monkeypatch.setattr(numba_cache, "_CHILD", None)
    assert not numba_cache.compiled()
    assert numba_cache.compile_in_background()
    argv, kwargs = started[0].argv, started[0].kwargs
    assert argv[0] == sys.executable and argv[-2:] == [str(numba_cache._SOURCE.parent.parent), str(numba_cache.stamp_path())]
    assert kwargs["start_new_session"] and len(kwargs["pass_fds"]) == 1
    lock = numba_cache.lock_path()
    assert lock.parent == tmp_path and lock.read_text() == f"{os.getpid()}\n"
    # While this process's compile runs, no other starts; once it failed,
    # none does, and jobs compile the kernels themselves.
    assert numba_cache.compile_in_background()
    started[0].code = 1
    assert not numba_cache.compile_in_background()
    assert len(started) == 1
    # In another process: the lock file is there and nobody holds it.
    monkeypatch.setattr(numba_cache, "_CHILD", None)
    assert not numba_cache.compile_in_background()
    # Held by another process's compile: that one runs.
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(numba_cache, "_CHILD", None)
        assert numba_cache.compile_in_background()
    assert len(started) == 1
    numba_cache.mark_compiled()
    assert numba_cache.compiled()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_a_compile_that_cannot_start_leaves_nothing_and_raises_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numba_cache, "_CHILD", None)

    def fail(argv, **kwargs):
        raise TypeError("expected str, bytes or os.PathLike object, not NoneType")

    monkeypatch.setattr(subprocess, "Popen", fail)
    assert not numba_cache.compile_in_background()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(numba_cache.sys, "frozen", True, raising=False)
    assert not numba_cache.compile_in_background()
    assert list(tmp_path.iterdir()) == []


def test_the_stamp_belongs_to_one_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "one"))
    numba_cache.mark_compiled()
    assert numba_cache.compiled()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "two"))
    assert not numba_cache.compiled()
