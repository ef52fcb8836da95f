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
the embedded cluster turns the profiler off and wakes less often.

It also lets its workers' memory allocator keep freed memory for reuse.
distributed starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
makes glibc return every freed run of more than 64 KiB to the system and
also turns off glibc's adaptive mmap threshold: every array of 128 KiB or
more then comes from a fresh ``mmap``, and each of its pages is faulted in
and zeroed by the kernel, in every task, again.  A job's tasks allocate the
same few sizes block after block (the decoded chunk, the per-row records,
scores and keys).  On the benchmark machine, pass two's task took 12 ms
inside such a worker against 4 ms for the same call in a plain process,
and in an interleaved A/B (6 rounds, fresh clusters) the job on (a) with
one worker took 2.45 s against 1.97 s with the thresholds below (medians).

With both thresholds at :data:`MALLOC_THRESHOLD`, those arrays come from
the allocator's heaps and are reused, and a worker keeps at most about
that much freed memory per allocator arena.  Arrays too large for a heap
(a task thread's heaps are at most 64 MiB) are still mapped one by one.
glibc 2.36, on the benchmark machine, takes an mmap threshold this high;
glibc versions that cap it at 32 MiB ignore it, and their workers keep a
fixed 128 KiB threshold, as with distributed's own setting.

A cluster of one's own (``--scheduler``) keeps its own configuration; see
``deploy/README.md`` for the same setting on the recipes there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from typing import Any, Callable, Iterator, Mapping

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from .system import MALLOC_THRESHOLD

#: Variables that must be in a worker's environment before it starts: the
#: nanny sets these (``distributed.nanny.pre-spawn-environ``) when it
#: spawns its worker.
_ENV = "distributed.nanny.pre-spawn-environ"

#: Settings of the embedded LocalCluster (see the module docstring).  Idle,
#: the first three brought the background CPU of a 2-worker cluster from
#: 0.16 to 0.05 of a core.  As in distributed, a variable already in this
#: process's environment wins over the last two.
BATCH_SETTINGS: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    f"{_ENV}.MALLOC_TRIM_THRESHOLD_": MALLOC_THRESHOLD,
    f"{_ENV}.MALLOC_MMAP_THRESHOLD_": MALLOC_THRESHOLD,
}


@contextlib.contextmanager
def local_cluster(
    n_workers: int,
    *,
    processes: bool = True,
    threads_per_worker: int | None = 1,
    memory_limit: str | float | None = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    settings: Mapping[str, Any] = BATCH_SETTINGS,
    **kwargs: Any,
) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` with :data:`BATCH_SETTINGS`.

    Worker processes start with SIGINT ignored: Ctrl-C in a terminal goes
    to every process of the foreground group, and workers that took it
    printed their own tracebacks before the client's one-line error.  They
    stop when this process closes the cluster.

    Parameters
    ----------
    n_workers, threads_per_worker, memory_limit, dashboard_address
        As for ``LocalCluster`` (``threads_per_worker=None``: one per core).
        The dashboard listens on 127.0.0.1 only by default: an embedded
        cluster serves the user at this machine, not its network.
    processes
        Workers in processes of their own (default), or threads of this
        process (``False``: one worker holding the dashboard, and the job's
        tasks run beside the client).
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
        # A nanny writes its workers' pre-spawn variables (and a
        # PYTHONHASHSEED) into this process's environment when it spawns
        # one, where they would win over the settings of the next cluster
        # started here: they are put back after the start, and again after
        # the cluster closes, in case a worker was restarted meanwhile.
        names = [*(dask.config.get(_ENV, default=None) or {}), "PYTHONHASHSEED"]
        before = {name: os.environ.get(name) for name in names}
        try:
            cluster = _start_interruptibly(lambda: LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                memory_limit=memory_limit, dashboard_address=dashboard_address, **kwargs,
            ), processes)
        finally:
            _put_back(before)
    try:
        with contextlib.closing(cluster):
            yield cluster
    finally:
        _put_back(before)


def _start_interruptibly(start: Callable[[], Any], processes: bool) -> Any:
    """``start()`` (a cluster) in a thread of its own, while this one waits
    for it or for a Ctrl-C (:func:`_children_ignore_sigint`'s watcher, or
    SIGINT itself where nothing ignores it): a start that hangs (a worker's
    preload, a port) can be stopped.  An interrupt comes back as SIGINT
    raised in this thread, so the caller's handler decides; a cluster that
    starts after it is closed."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["cluster"] = start()
        except BaseException as exc:  # raised again in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="dask-labelissues-cluster-start", daemon=True)
    try:
        with _children_ignore_sigint(processes) as watch:
            thread.start()
            while thread.is_alive() and not watch.interrupted():
                thread.join(0.05)
        if thread.is_alive() or watch.interrupted():
            signal.raise_signal(signal.SIGINT)
        thread.join()  # a handler that did not raise: the start goes on
    except BaseException:
        threading.Thread(target=_close_when_started, args=(thread, box), daemon=True).start()
        raise
    if "error" in box:
        raise box["error"]
    return box["cluster"]


def _close_when_started(thread: threading.Thread, box: dict[str, Any]) -> None:
    thread.join()
    if "cluster" in box:
        with contextlib.suppress(Exception):
            box["cluster"].close()


class _Watch:
    """What :func:`_children_ignore_sigint` yields: whether its watcher saw
    a Ctrl-C, asked without waiting."""

    def __init__(self, watcher: subprocess.Popen | None) -> None:
        self.watcher = watcher
        self.seen = False

    def interrupted(self) -> bool:
        if not self.seen and self.watcher is not None and self.watcher.poll() == _WATCHER_SAW_SIGINT:
            self.seen = True
        return self.seen


@contextlib.contextmanager
def _children_ignore_sigint(yes: bool) -> Iterator[_Watch]:
    """Ignore SIGINT while worker processes are spawned, so that they start
    with it ignored (an ignored signal stays ignored across exec, and
    Python then installs no KeyboardInterrupt handler).  Only the main
    thread may change a handler; elsewhere nothing changes.

    This process ignores it meanwhile too, so a Ctrl-C then would be lost
    and the job run on to the end.  A small watcher process (a shell),
    started first with SIGINT as usual and in the same process group, is told of
    it as the terminal tells every process of the group: once the workers
    are up, or while they start (:meth:`_Watch.interrupted`), it says
    whether it saw a Ctrl-C.  (A
    blocked signal mask, which would keep the interrupt pending instead,
    does not reach the workers: Python unblocks every signal in a child
    before exec.)"""
    if not yes or threading.current_thread() is not threading.main_thread():
        yield _Watch(None)
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # this process ignores it already, and so will they
        yield _Watch(None)
        return
    if not os.path.exists(_SHELL):  # no POSIX shell: a Ctrl-C meanwhile is lost, as it was
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield _Watch(None)
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    watcher = subprocess.Popen(
        [_SHELL, "-c", _WATCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    watch = _Watch(watcher)
    try:
        watcher.stdout.readline()  # its handler is in place
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield watch
        finally:
            signal.signal(signal.SIGINT, previous)
        # One line ends it: workers forked meanwhile hold the pipe open too,
        # so it would never see the end of its input.
        with contextlib.suppress(OSError):
            watcher.stdin.write(b"\n")
            watcher.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # never seen; killed below
            watcher.wait(timeout=10)
        watch.interrupted()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        watcher.stdout.close()
        with contextlib.suppress(OSError):
            watcher.stdin.close()


#: Exit status of the watcher (:func:`_children_ignore_sigint`) that saw
#: SIGINT, and the watcher: a shell (ready in 1 ms, a Python in 27 ms)
#: that says it is ready, then waits for one line.
_WATCHER_SAW_SIGINT = 3
_SHELL = "/bin/sh"
_WATCHER = f"trap 'exit {_WATCHER_SAW_SIGINT}' INT; echo; read line"


class QuietWorkers(WorkerPlugin):
    """Keeps a worker from logging a failed task's traceback, and from
    warning about tasks cancelled when its cluster closes under them (see
    :func:`quiet_workers`)."""

    name = "dask-labelissues-quiet-workers"

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
        logging.getLogger("distributed.worker").addFilter(_no_failed_tasks)


def _no_failed_tasks(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Compute Failed")


def quiet_workers(client: Any) -> None:
    """For an embedded cluster: the command reports a failed task, or a
    Ctrl-C, in one line, so its workers should not print a traceback or a
    warning about the same event (see :class:`QuietWorkers`)."""
    client.register_plugin(QuietWorkers())


#: The bokeh distributed's dashboard needs (``distributed.versions.BOKEH_REQUIREMENT``);
#: without it a scheduler serves only a page asking for it.
BOKEH_REQUIREMENT = "bokeh>=3.1"

#: What ``describe_dashboard`` found at the scheduler's HTTP address.
DASHBOARD, MISSING_BOKEH, NO_DASHBOARD = "dashboard", "missing bokeh", "no dashboard"


def describe_dashboard(client: Any, *, remote: bool, timeout: float = 3.0) -> str:
    """``dashboard: LINK`` when the client's scheduler serves distributed's
    dashboard, else ``dashboard: none (why; how to get one)``.

    The scheduler is asked over HTTP, as a browser here would: the
    ``"dashboard"`` entry of ``scheduler_info()["services"]`` names its
    HTTP server, which runs without bokeh and with ``--no-dashboard`` too.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    remote
        The scheduler is one of the user's own (``--scheduler``), not a
        LocalCluster started here: the advice names its environment.
    timeout
        Seconds to wait for the scheduler's HTTP server.

    Returns
    -------
    str
        One line, without a newline.
    """
    where = "the scheduler's environment" if remote else "this environment"
    services = client.scheduler_info(n_workers=0).get("services", {})
    link = _dashboard_link(client) if "dashboard" in services else None
    found = _probe_dashboard(link, timeout) if link else NO_DASHBOARD
    if found == DASHBOARD:
        return f"dashboard: {link}"
    if found == MISSING_BOKEH:
        restart = " there and restart the scheduler" if remote else ""
        return (f"dashboard: none ({BOKEH_REQUIREMENT} is not installed in {where}: "
                f"pip install '{BOKEH_REQUIREMENT}'{restart})")
    if found == NO_DASHBOARD:
        if remote:
            return (f"dashboard: none (the scheduler serves none, as when started with --no-dashboard; "
                    f"restart it without that option, with {BOKEH_REQUIREMENT} in {where})")
        return "dashboard: none (the cluster was started without one)"
    return f"dashboard: {link} (not checked: {found})"


def _dashboard_link(client: Any) -> str:
    """The client's dashboard link, naming the interface the HTTP server
    listens on where the scheduler is in this process and listens on one
    interface only: distributed names the machine's address for an
    in-process (``inproc://``) scheduler, where a dashboard bound to
    127.0.0.1 is not to be found."""
    from distributed.utils import format_dashboard_link

    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    server = getattr(scheduler, "http_server", None)
    host = getattr(server, "address", None)
    if isinstance(host, str) and host not in ("", "0.0.0.0", "::") and ":" not in host:
        return format_dashboard_link(host, server.port)
    return str(client.dashboard_link)


def _probe_dashboard(link: str, timeout: float) -> str:
    """:data:`DASHBOARD`, :data:`MISSING_BOKEH`, :data:`NO_DASHBOARD`, or
    why the address could not be reached from here."""
    import urllib.error
    import urllib.parse
    import urllib.request

    # A proxy configured for the web would answer for this machine's own
    # addresses too (urllib bypasses none by default), and a browser here
    # would not ask it: loopback links are fetched directly.
    host = urllib.parse.urlsplit(link).hostname or ""
    direct = host == "localhost" or host.startswith("127.") or host == "::1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if direct else urllib.request.build_opener()
    # bokeh's own script is served only where the bokeh dashboard is, and
    # costs the scheduler nothing, where the status page builds a document.
    base = link.rsplit("/", 1)[0]
    try:
        request = urllib.request.Request(f"{base}/static/js/bokeh.min.js", method="HEAD")
        with opener.open(request, timeout=timeout):
            return DASHBOARD
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code != 404:
            return f"it answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"could not reach it from here ({_reason(exc)})"
    # No bokeh app: distributed's page asking for bokeh, or nothing at all.
    try:
        with opener.open(link, timeout=timeout) as response:
            page = response.read(4096)
    except urllib.error.HTTPError as exc:
        exc.close()
        return NO_DASHBOARD if exc.code == 404 else f"it answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"could not reach it from here ({_reason(exc)})"
    return MISSING_BOKEH if b"needs bokeh" in page else NO_DASHBOARD


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return " ".join(str(reason).split()) or type(exc).__name__


def _put_back(environment: Mapping[str, str | None]) -> None:
    """Set these variables of this process's environment (None: unset)."""
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
