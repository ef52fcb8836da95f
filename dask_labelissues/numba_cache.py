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
what numba's cache is keyed by.  Where the stamp is wrong, a job that
trusts it and finds numba's cache empty after all compiles the kernels
itself, as it would without the stamp.

A compile in the background holds an advisory lock (``flock``) on a
file beside the stamp for as long as it runs, so that only one runs; a
lock file nobody holds is one that ended without its stamp (killed with
the job that started it, say), and jobs then compile the kernels
themselves, as without this module.  Not on Windows or in a frozen
application, where no background process is started.

Imports nothing of the package, and neither numba nor numpy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# hashlib and subprocess are imported where used: every import of the
# package loads this module; only a job that looks for the kernels in
# numba's cache needs the one, and one that compiles them the other.
if TYPE_CHECKING:
    import subprocess

_SOURCE = Path(__file__).with_name("fused.py")
_CHILD: subprocess.Popen | None = None

# The background process's first lines: not the working directory's
# modules (``-c`` puts it first on the path, as ``''``, unless ``-I`` or
# ``-P``), this copy of the package (its directory last, where the
# environment does not find one), and the stamp to write.
_BOOTSTRAP = (
    "import sys; root, stamp = sys.argv[1:]; sys.path[:1] = [p for p in sys.path[:1] if p]; "
    "sys.path.append(root) if root not in sys.path else None; "
    "from dask_labelissues import warmup; warmup.background(root, stamp)"
)


def _key() -> str | None:
    """What numba's cache of the kernels depends on, hashed; None without
    numba.  The CPU model is left out (numba keys its entries by it too, so a
    cache shared by different machines misses, and then compiles)."""
    import hashlib

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


def mark_compiled(path: Path | None = None) -> None:
    """Write the stamp of :func:`compiled` (or ``path``), whole or not at all."""
    path = stamp_path() if path is None else path
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(f"numba cache filled {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    os.replace(partial, path)


def lock_path(stamp: Path | None = None) -> Path | None:
    """The lock file of the background compile that writes ``stamp``
    (this install's by default)."""
    stamp = stamp_path() if stamp is None else stamp
    return None if stamp is None else stamp.with_suffix(".lock")


def _lowest_priority(pid: int) -> None:
    """Let process ``pid`` take CPU time only where nothing else wants it.

    Niceness alone does not do it on Linux: the process runs in a session
    of its own, and with autogroup scheduling each session gets an equal
    share of the cores whatever its processes' niceness (the job that
    started the compile took 1.3 s instead of 0.65 s on 2,000,000 x 100).
    So the session's niceness is raised as well, and the process is put in
    the idle class (Linux; elsewhere it is only niced).
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write("19")
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def compile_in_background() -> bool:
    """Whether numba's kernels are being compiled in the background now:
    by a process this call starts (``python -c`` running
    :func:`dask_labelissues.warmup.background`, at the lowest CPU priority,
    in its own session, without output), by one it started before, or by
    another process's.

    False where none can run: no numba, Windows, a frozen application, a
    cache directory that cannot be written, a compile of this process's
    that failed, or a lock file left by one that ended without its stamp.
    The caller then compiles the kernels itself.  Never raises.
    """
    if _CHILD is not None:
        # Reaps it if it has ended; a compile that succeeded wrote the stamp.
        return _CHILD.poll() is None
    try:
        return _start()
    except Exception:
        return False


def _start() -> bool:
    global _CHILD
    if os.name != "posix" or getattr(sys, "frozen", False) or not sys.executable:
        return False
    import fcntl

    stamp = stamp_path()
    if stamp is None:
        return False
    lock = lock_path(stamp)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, fresh = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), True
    except FileExistsError:
        fd, fresh = os.open(lock, os.O_WRONLY), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # another process's compile holds it
        if not fresh:
            return False
        import subprocess

        flags = getattr(subprocess, "_args_from_interpreter_flags", list)()
        root = str(_SOURCE.parent.parent)
        # The child inherits the locked descriptor: the lock is held for as
        # long as the child lives, and let go however it ends.
        _CHILD = subprocess.Popen(
            [sys.executable, *flags, "-c", _BOOTSTRAP, root, str(stamp)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, pass_fds=(fd,),
        )
        _lowest_priority(_CHILD.pid)
        os.write(fd, f"{_CHILD.pid}\n".encode())
        return True
    except BaseException:
        if fresh and _CHILD is None:
            lock.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
