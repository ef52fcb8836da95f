"""Whether numba's on-disk cache holds this install's kernels, and filling
it in the background when it does not.

Numba compiles the kernels of :mod:`dask_labelissues.fused` on their first
call and keeps them in its cache (``cache=True``), keyed by the source
file's path, time and size.  A job that finds the cache empty (the first
run after installing or upgrading the package, or numba) waits 3 to 8 s
for the compile on the development machine; a job that finds it full loads
the kernels in about 0.3 s.  Knowing which case it is from numba itself
would mean importing numba (0.2 s) and reading its index, so
:func:`compiled` answers from a stamp that ``dask-labelissues compile``
writes once it has run the kernels, next to numba's cache and keyed by
what numba's cache is keyed by.  The stamp can be wrong only towards
today's cost: a job that trusts it and finds numba's cache empty after all
compiles the kernels, as it would without the stamp.

Imports nothing of the package, and neither numba nor numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

#: A background compile whose lock is older than this is taken to have
#: died (it takes seconds), and another may start.
STALE_LOCK_SECONDS = 600

_SOURCE = Path(__file__).with_name("fused.py")
_STARTED = False
_CHILD: subprocess.Popen | None = None


def _key() -> str | None:
    """What numba's cache of the kernels depends on, hashed; None without
    numba.  The CPU model is left out (numba keys its entries by it too, so a
    cache shared by different machines misses, and then compiles)."""
    spec = importlib.util.find_spec("numba")
    if spec is None or spec.origin is None:
        return None
    parts: list[object] = []
    for path in (_SOURCE, Path(spec.origin)):
        st = path.stat()
        parts.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
    parts += [sys.version_info[:2], platform.machine(), os.environ.get("NUMBA_CACHE_DIR", "")]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def _directory() -> Path:
    """Where numba keeps the kernels, or a user cache directory where it
    cannot (a read-only install)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured)
    in_tree = _SOURCE.parent / "__pycache__"
    if os.access(in_tree if in_tree.is_dir() else in_tree.parent, os.W_OK):
        return in_tree
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "dask_labelissues"


def stamp_path() -> Path | None:
    """The stamp :func:`mark_compiled` writes for this install; None
    without numba."""
    key = _key()
    return None if key is None else _directory() / f"dask_labelissues-numba-{key}.stamp"


def compiled() -> bool:
    """Whether ``dask-labelissues compile`` has filled numba's cache for
    this install, this numba and this Python."""
    try:
        path = stamp_path()
    except OSError:
        return False
    return path is not None and path.is_file()


def mark_compiled() -> None:
    """Write the stamp of :func:`compiled`, whole or not at all."""
    path = stamp_path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(f"numba cache filled {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    os.replace(partial, path)


def lock_path() -> Path | None:
    """The lock held by the one background compile of this install."""
    path = stamp_path()
    return None if path is None else path.with_suffix(".lock")


def _lowest_priority(pid: int) -> None:
    """Let process ``pid`` take CPU time only where nothing else wants it.

    Niceness alone does not do it on Linux: the process runs in a session
    of its own, and with autogroup scheduling each session gets an equal
    share of the cores whatever its processes' niceness (the job that
    started the compile took 1.3 s instead of 0.65 s on 2,000,000 x 100).
    So the session's niceness is raised as well, and the process is put in
    the idle class.  Set from here, right after the start, so that the
    child's imports do not run at full priority either.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write("19")
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def compile_in_background() -> bool:
    """Start ``python -m dask_labelissues.warmup`` (the compile of
    ``dask-labelissues compile``) in a process of its own (lowest CPU
    priority, its own session, no output), unless this process started one
    already or another compile holds the lock.  True if started.

    The process outlives a command that ends before it; the job that starts
    it runs the numpy kernels meanwhile, and later jobs find the kernels in
    numba's cache.
    """
    global _STARTED, _CHILD
    if _STARTED:
        return False
    _STARTED = True
    try:
        lock = lock_path()
        if lock is None:
            return False
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            if time.time() - lock.stat().st_mtime < STALE_LOCK_SECONDS:
                return False
            lock.unlink()
        except FileNotFoundError:
            pass
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:  # a read-only cache, or another process took the lock first
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    env = dict(os.environ)
    # The child imports this same copy of the package, wherever it came from.
    root = str(_SOURCE.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        _CHILD = subprocess.Popen(
            [sys.executable, "-m", "dask_labelissues.warmup"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError:
        lock.unlink(missing_ok=True)
        return False
    _lowest_priority(_CHILD.pid)
    # Reaped when it ends, so that a long-lived process (a notebook) keeps
    # no zombie.
    threading.Thread(target=_CHILD.wait, name="dask_labelissues-compile-reaper", daemon=True).start()
    return True
