"""What the benchmark scripts share: timing a call, a fresh process's peak
memory (optionally under ``prlimit --data``), and a job on LocalClusters of
one and of two single-thread workers.

Imported by the scripts beside it (``python benchmarks/<script>.py`` puts
this directory first on ``sys.path``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def worker_cpu_s() -> float:
    """This process's CPU seconds (user and system): run on each worker."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak(code: str, arg: str, limit: int | None = None) -> dict[str, Any]:
    """``python -c code arg`` in a fresh process (from the repository's
    root, so that no script here shadows a module): its wall time, peak RSS
    (GNU time's maximum resident set, of the largest single process),
    output, or its failure; under ``prlimit --data=limit`` if given."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, arg]
    if limit is not None:
        cmd = ["prlimit", f"--data={limit}", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else None
    failure = None
    if proc.returncode != 0:
        status = [ln for ln in lines if ln.startswith(("Command exited with", "Command terminated by"))]
        body = [ln for ln in (lines[:-1] if peak_kib is not None else lines) if ln not in status]
        failure = (next((ln for ln in reversed(body) if "Error" in ln), None)
                   or next((ln for ln in reversed(body) if "error" in ln.lower()), None)
                   or (body[-1] if body else "no message"))
        if status:
            failure += f" [{status[-1]}]"
    return {"wall_s": wall, "peak_mb": None if peak_kib is None else peak_kib / 1024, "ok": proc.returncode == 0,
            "returncode": proc.returncode, "failure": failure, "output": proc.stdout.strip()}


def cluster_scaling(job: Callable[[Any], Any], warm: Callable[[Any], Any], rounds: int) -> dict[str, Any]:
    """``job(client)`` on LocalClusters of 1 and of 2 workers x 1 thread,
    a fresh cluster for every run, the order alternating round by round;
    ``warm(client)`` runs first in each, untimed (it should load numba's
    kernels in the workers on a small input).  Returns the times, the
    workers' busy cores (their CPU seconds over the wall time) and each
    run's result (``results[n]``)."""
    from distributed import Client

    from dask_labelissues.cluster import local_cluster

    times: dict[int, list[float]] = {1: [], 2: []}
    cores: dict[int, list[float]] = {1: [], 2: []}
    results: dict[int, list[Any]] = {1: [], 2: []}
    for r in range(rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            with local_cluster(n, threads_per_worker=1, dashboard_address=None) as cluster, \
                    Client(cluster, set_as_default=False) as client, client.as_current():
                warm(client)
                before = client.run(worker_cpu_s)
                seconds, result = timed(lambda: job(client))
                after = client.run(worker_cpu_s)
            times[n].append(seconds)
            cores[n].append(sum(after[w] - before[w] for w in before) / seconds)
            results[n].append(result)
            print(f"  [scaling {r + 1}/{rounds}] {n} worker(s) x 1 thread: {seconds:.2f} s, "
                  f"{cores[n][-1]:.2f} cores busy", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"times": times, "one_worker_s": one, "two_workers_s": two, "speedup": one / two,
            "worker_cores": {n: statistics.median(v) for n, v in cores.items()}, "results": results}
