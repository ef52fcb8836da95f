"""The LocalCluster the CLI and the demo start when no scheduler is given.

A LocalCluster with distributed's defaults keeps every process busy in the
background: each worker samples the stacks of its running tasks every
10 ms for the dashboard's profile, and the scheduler, each nanny and each
worker wake every 20 ms to time their event loop and every 500 ms to read
their CPU and memory.  On a 2-core machine that idle work came to about
0.16 of a core (0.06 in the process holding the scheduler and the nannies,
0.05 in each worker), CPU the workers of a job on every core no longer
have.  A batch job run from the command line has no use for the profile
(the dashboard's Profile page stays empty), and a 1 s tick still warns of
a blocked event loop, for stalls of about 2 s or more rather than 3 s; so
the embedded cluster turns the profiler off and wakes less often.  A
cluster of one's own (``--scheduler``) keeps its own configuration.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import dask

#: Settings of the embedded LocalCluster (see the module docstring).  Idle,
#: they brought the background CPU of a 2-worker cluster from 0.16 to 0.05
#: of a core.
BATCH_SETTINGS: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


@contextlib.contextmanager
def local_cluster(
    n_workers: int,
    *,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    dashboard_address: str | None = ":0",
    settings: Mapping[str, Any] = BATCH_SETTINGS,
    **kwargs: Any,
) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` of worker processes, with :data:`BATCH_SETTINGS`.

    Parameters
    ----------
    n_workers, threads_per_worker, memory_limit, dashboard_address
        As for ``LocalCluster``; workers are always processes.
    settings
        The Dask configuration the cluster's processes are made with
        (the benchmark passes distributed's defaults to compare).
    **kwargs
        Passed on to ``LocalCluster``.

    Yields
    ------
    distributed.LocalCluster
        Closed when the block ends, however it ends.
    """
    from distributed import LocalCluster

    # The scheduler and nannies read these when they are made, and each
    # nanny hands its worker the configuration it was made with: the
    # settings need only hold while the cluster starts.
    with dask.config.set(dict(settings)):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
            memory_limit=memory_limit, dashboard_address=dashboard_address, **kwargs,
        )
    with cluster:
        yield cluster
