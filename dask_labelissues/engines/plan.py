"""Choosing a job's engine, its blocks and its kernel.

The API asks :func:`make_driver` for a driver and runs the pipeline on it;
which engine runs, how large its blocks are and which implementation of
the row kernels they call are decided here and in the engines' own
factories, from the inputs, the scheduler in use and the job's size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .. import fused, inputs
from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .base import Driver, distributed_client

#: The engines, by the name ``backend=`` takes.
BACKENDS = ("dask", "threads", "fork", "serial")
#: What ``backend=`` accepts: an engine, or ``"auto"`` to let the job choose.
BACKEND_CHOICES = ("auto", *BACKENDS)

#: Jobs with fewer cells (N x K) than this run the numpy kernel unless numba
#: is loaded in this process already.  Importing numba and loading its
#: cached kernels cost a fresh process 0.5 to 0.75 s on the development
#: machine, while the numpy kernel costs about 5 ns a cell more than numba's
#: (on one thread): it pays off from about 120 million cells, and a job of
#: 50 million cells loses at most about 0.25 s to numpy the first time.
NUMBA_MIN_CELLS = 50_000_000


def choose_backend(backend: str, labels: Any, pred_probs: Any, client: Any = None) -> str:
    """The engine ``backend`` names; for ``"auto"``, the Dask engine when a
    distributed Client is given or current or an input is a dask array
    (lazy in, lazy out), else the threads engine (the fastest on one
    machine in the benchmarks)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    if distributed_client(client) is not None:
        return "dask"
    if inputs.is_dask_array(labels) or inputs.is_dask_array(pred_probs):
        return "dask"
    return "threads"


def choose_kernel(spec: ScoreSpec, cells: int, *, in_process: bool) -> ScoreSpec:
    """``spec`` with the kernel a job of ``cells`` (N x K) values should run.

    An explicit ``"numba"`` or ``"numpy"`` is kept.  ``"auto"`` becomes
    ``"numpy"`` for a job below :data:`NUMBA_MIN_CELLS`, unless the job runs
    in this process (``in_process``) and numba's kernels are loaded here
    already; otherwise it stays ``"auto"`` (numba where it imports).  Both
    kernels give the same bits, so the choice changes only the time.
    """
    if spec.kernel != "auto" or cells >= NUMBA_MIN_CELLS:
        return spec
    if in_process and fused.numba_loaded():
        return spec
    return replace(spec, kernel="numpy")


def make_driver(
    backend: str,
    labels: Any,
    pred_probs: Any,
    spec: ScoreSpec,
    fspec: FilterSpec | None,
    *,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    client: Any = None,
    progress: bool = False,
    spill_dir: str | None = None,
) -> tuple[Driver, str, Any]:
    """The driver for a job on opened, shape-checked inputs.

    Returns ``(driver, backend, client)``: the engine chosen (see
    :func:`choose_backend`) and, for the Dask engine on a distributed
    cluster, the Client that holds the job's lazy outputs.
    """
    name = choose_backend(backend, labels, pred_probs, client)
    n, k = (int(s) for s in pred_probs.shape)
    if name == "dask":
        from .dask import dask_driver

        client = distributed_client(client)
        spec = choose_kernel(spec, n * k, in_process=client is None)
        driver = dask_driver(
            labels, pred_probs, spec, fspec, chunk_rows=chunk_rows, client=client, progress=progress
        )
        return driver, name, client
    spec = choose_kernel(spec, n * k, in_process=True)
    rows = inputs.local_chunk_rows(pred_probs, chunk_rows)
    lab, probs = inputs.as_row_source(labels), inputs.as_row_source(pred_probs)
    common = dict(progress=progress, spill_dir=spill_dir, fspec=fspec)
    if name == "threads":
        from .threads import threads_driver

        return threads_driver(lab, probs, spec, rows, n_jobs=n_jobs, **common), name, None
    if name == "fork":
        from .fork import fork_driver

        return fork_driver(lab, probs, spec, rows, n_jobs=n_jobs, **common), name, None
    from .serial import serial_driver

    return serial_driver(lab, probs, spec, rows, **common), name, None
