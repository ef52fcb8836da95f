"""Choosing a job's engine: the API asks :func:`make_engine` for one.

Which engine runs is decided here; its blocks and kernel by
:func:`~.blocks.plan_blocks`, called with what each engine knows (the
inputs, the cluster's workers, the job's size).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .. import inputs
from ..kernels import ScoreSpec
from ..kinds import ROWS, Kind
from ..system import usable_memory
from .base import Engine, distributed_client
from .blocks import BlockConfig, plan_blocks

#: What ``backend=`` accepts: an engine, or ``"auto"`` to let the job choose.
BACKEND_CHOICES = ("auto", "dask", "threads", "fork", "serial")


def choose_backend(backend: str, labels: Any, pred_probs: Any, client: Any = None) -> str:
    """The engine ``backend`` names; for ``"auto"``, the Dask engine when a
    distributed Client is given or current or an input is a dask array
    (lazy in, lazy out), else the threads engine (the fastest on one
    machine in the benchmarks)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    if distributed_client(client) is not None or inputs.is_dask_array(labels) or inputs.is_dask_array(pred_probs):
        return "dask"
    return "threads"


def make_engine(
    backend: str, labels: Any, pred_probs: Any, spec: ScoreSpec, *, single_read: bool = True,
    chunk_rows: int | None = None, n_jobs: int | None = None, client: Any = None, progress: bool = False,
    spill_dir: str | None = None, warm_up: Callable[[ScoreSpec], None] | None = None, kind: Kind = ROWS,
    cuts: np.ndarray | None = None, problems: int = 1, numpy_while_compiling: bool = True,
) -> tuple[Engine, str, Any]:
    """The engine for a job on opened, shape-checked inputs.

    Returns ``(engine, backend, client)``: the engine chosen (see
    :func:`choose_backend`) and, for the Dask engine on a distributed
    cluster, the Client that holds the job's lazy outputs.  The kernel the
    job's tasks run is ``engine.plan.spec``.  ``warm_up(spec)`` runs before
    the fork engine forks; ``single_read``, ``cuts``, ``problems`` and
    ``numpy_while_compiling`` are :class:`~.blocks.BlockConfig`'s.
    """
    name = choose_backend(backend, labels, pred_probs, client)
    settings = dict(single_read=single_read, chunk_rows=chunk_rows, cuts=cuts, problems=problems,
                    numpy_while_compiling=numpy_while_compiling)
    if name == "dask":
        from .dask import dask_engine

        engine = dask_engine(labels, pred_probs, spec, settings, client=client, progress=progress, kind=kind)
        return engine, name, engine.client
    lab, probs = inputs.as_row_source(labels), inputs.as_row_source(pred_probs)
    # The local engines' module is imported for the jobs that run them only.
    from .local import pool_size

    threads = 1 if name == "serial" else pool_size(n_jobs)
    config = BlockConfig.of_job(probs, spec, kind, threads=threads, process_memory=usable_memory(), **settings)
    plan = plan_blocks(config)
    common = dict(kind=kind, progress=progress, spill_dir=spill_dir)
    if name == "threads":
        from .threads import ThreadEngine

        return ThreadEngine(lab, probs, plan, n_jobs=n_jobs, **common), name, None
    if name == "fork":
        from .fork import fork_engine

        ready = None if warm_up is None else (lambda: warm_up(plan.spec))
        return fork_engine(lab, probs, plan, n_jobs=n_jobs, warm_up=ready, **common), name, None
    from .serial import SerialEngine

    return SerialEngine(lab, probs, plan, **common), name, None
