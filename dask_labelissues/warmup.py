"""``dask-labelissues compile``: numba's kernels compiled into its cache
before a job needs them.

Numba compiles a kernel for each set of argument types it is called with,
so the kernels are compiled by running the usual jobs on small data:
pred_probs of either float width, in memory and memory-mapped from
``.npy`` files (read-only arrays are a type of their own), the batched
method (float32 rows of many classes have a pass-one loop of their
own), a score that reads the rows twice and a ``cleanlab.filter``
method, and what the fork engine runs before it forks its workers.  A
job of another kind (a segmentation or token job, say) still compiles
its own kernels the first time it runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from . import fused, numba_cache
from .synthetic import SyntheticSpec, generate_block


def compile_kernels(stamp: Path | None = None) -> float:
    """Compile the kernels of the usual classification jobs into numba's
    cache (or load them from it) and mark the cache filled
    (:func:`dask_labelissues.numba_cache.compiled`).

    Parameters
    ----------
    stamp
        The stamp to write; by default this install's
        (:func:`dask_labelissues.numba_cache.stamp_path`, taken before the
        compile).

    Returns
    -------
    float
        The seconds it took.

    Raises
    ------
    ImportError
        Without numba.
    """
    from .api import find_label_issues
    from .filters import filter_spec
    from .kernels import ScoreSpec
    from .pipelines import warm_up

    started = time.perf_counter()
    stamp = numba_cache.stamp_path() if stamp is None else stamp
    # numba's kernels are what is asked for here, whatever the environment
    # says jobs should run.
    saved = os.environ.pop("DASK_LABELISSUES_KERNEL", None)
    try:
        # Loaded here, numba's kernels are what the jobs below run (a job
        # in a process that has them loaded uses them whatever its size).
        fused.kernel_name("numba")
        if not fused.numba_loaded():
            raise ImportError("numba's kernels did not load: is numba installed?")
        with tempfile.TemporaryDirectory(prefix="dask-labelissues-compile-") as tmp:
            for i, dtype in enumerate(("float32", "float64")):
                # Enough rows for the selection's radix sort to run.
                labels, probs, _ = generate_block(SyntheticSpec(20_000, 10, seed=i, dtype=dtype), 0)
                paths = [os.path.join(tmp, f"{name}-{i}.npy") for name in ("labels", "pred_probs")]
                np.save(paths[0], labels)
                np.save(paths[1], probs)
                for source in ((labels, probs), paths):
                    find_label_issues(*source, backend="serial")
                    find_label_issues(*source, filter_by="prune_by_noise_rate", backend="serial")
                if dtype == "float32":
                    # float32 rows of many classes have a pass-one loop of their own.
                    k = fused.RECORDS_WIDE_K
                    wide = generate_block(SyntheticSpec(2_000, k, seed=i, dtype=dtype), 0)[:2]
                    wide_paths = [os.path.join(tmp, f"{name}-wide.npy") for name in ("labels", "pred_probs")]
                    for path, array in zip(wide_paths, wide):
                        np.save(path, array)
                    for source in (wide, wide_paths):
                        find_label_issues(*source, backend="serial")
                    warm_up(ScoreSpec(kernel="numba"), None, k, probs.dtype)
                # The fork engine's parent runs the kernels on fresh
                # columns before it forks, of a layout the jobs above never
                # pass them: without this its first job compiles them.  A
                # score that reads the rows twice has kernels of its own,
                # which take no columns: its warm-up serves every engine.
                for spec, fspec in (
                    (ScoreSpec(kernel="numba"), None),
                    (ScoreSpec(kernel="numba"), filter_spec("prune_by_noise_rate", 1.0, None, 1)),
                    (ScoreSpec("confidence_weighted_entropy", kernel="numba"), None),
                ):
                    warm_up(spec, fspec, probs.shape[1], probs.dtype)
    finally:
        if saved is not None:
            os.environ["DASK_LABELISSUES_KERNEL"] = saved
    numba_cache.mark_compiled(stamp)
    lock = numba_cache.lock_path(stamp)
    if lock is not None:
        # A lock file nobody holds says a background compile failed; this
        # one did not.
        lock.unlink(missing_ok=True)
    return time.perf_counter() - started


def background(root: str, stamp: str) -> None:
    """The background compile :func:`dask_labelissues.numba_cache.compile_in_background`
    starts: :func:`compile_kernels`, writing ``stamp``, if this is the copy
    of the package in ``root`` that started it.  The lock it inherited is
    let go when it exits; its file is removed only after the stamp is
    written, so that a compile that fails leaves it for later jobs to see.
    """
    import dask_labelissues

    if Path(dask_labelissues.__file__).resolve().parent.parent != Path(root).resolve():
        raise SystemExit(f"imported {dask_labelissues.__file__}, not the package in {root}")
    compile_kernels(Path(stamp))
