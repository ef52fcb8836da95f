"""What this process may use of the machine: its cores, its memory, how
its allocator keeps freed arrays, and whether a kept buffer is in use.

The engines size their pools and buffers from these; the demo, the
synthetic data writers and the results store size their thread pools;
the embedded cluster gives its workers the same allocator setting.
"""

from __future__ import annotations

import math
import os
import sys
import types
from typing import Any, Callable

#: glibc's mmap and trim thresholds, in bytes, for jobs in this process
#: and the embedded cluster's workers (128 MiB: twice the 64 MiB blocks the
#: automatic chunking aims at).
MALLOC_THRESHOLD = 128 << 20

_MALLOC_SET = False
#: :func:`give_back_freed_memory` leaves the allocator's arenas alone while
#: they hold less freed memory than this.  Giving memory back costs the
#: next stage's threads the page faults of taking it again: between the
#: stages of a job on 2,000,000 x 100 the arenas held 4 to 9 MB, and giving
#: that back made the warm job 4% slower; on 10,000,000 x 100 they held 15
#: to 42 MB, and giving back only the 37 to 42 MB kept the job's peak RSS at
#: 579 to 580 MB, as giving back everything did (588 to 589 MB keeping it).
GIVE_BACK_MIN_BYTES = 32 << 20

#: glibc's ``malloc_trim`` once :func:`keep_freed_memory` has changed the
#: thresholds, else None.
_malloc_trim: Any = None
#: The freed bytes glibc's arenas hold (``mallinfo2``, glibc 2.33 and
#: later), where :func:`keep_freed_memory` found it.
_freed_bytes: Callable[[], int] | None = None


def keep_freed_memory() -> None:
    """Let this process's allocator keep freed arrays of up to
    :data:`MALLOC_THRESHOLD` for reuse, once per process (glibc only), or
    of up to a 32nd of :func:`usable_memory` where that is less.

    glibc serves every array of 128 KiB or more from a fresh ``mmap`` until
    one is freed, and then raises that threshold only up to 32 MiB: the
    first job in a new process (every CLI command) has each block's arrays
    (a decoded chunk, its records and scores) mapped anew and each of
    their pages faulted in and zeroed by the kernel, block after block.  A
    segmentation job on 2,000 images of Zarr took 3.5 to 5.1 s in a fresh
    process against 2.6 to 3.0 s in the next call; with this setting, 2.9 to
    3.4 s.  The setting is the whole process's, and stays: up to that much
    freed memory per allocator arena is kept rather than given back.  A
    variable the user set (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``) wins.  The embedded cluster gives its
    workers the same setting through their environment.  The one-machine
    engines give the kept memory back before each stage
    (:func:`give_back_freed_memory`).

    Each allocator arena (one a thread that allocates, up to eight a core)
    keeps that much, which no other arena can take: under a 400 MB
    ``prlimit --data``, a multi-label job on 2,000,000 x 100 ended holding
    387 MB of address space with 128 MiB kept, 255 MB with 12 MiB.
    """
    global _MALLOC_SET, _malloc_trim, _freed_bytes
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    wanted = min(MALLOC_THRESHOLD, max(usable_memory() // 32, 1 << 20))
    # glibc before 2.35 refuses an mmap threshold above 32 MiB (it returns 0).
    threshold = wanted if mallopt(m_mmap_threshold, wanted) else min(wanted, 32 << 20)
    if threshold != wanted:
        mallopt(m_mmap_threshold, threshold)
    mallopt(m_trim_threshold, threshold)
    _malloc_trim, _freed_bytes = malloc_trim, _arena_freed_bytes(libc)


def _arena_freed_bytes(libc: Any) -> Callable[[], int] | None:
    """A function giving the freed bytes held in all of glibc's arenas, or
    None before glibc 2.33 (no ``mallinfo2``)."""
    import ctypes

    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        return None

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2.restype = Info
    return lambda: int(mallinfo2().fordblks)


def give_back_freed_memory() -> None:
    """Return to the system the freed memory :func:`keep_freed_memory` has
    this process keep, in every allocator arena, once there is at least
    :data:`GIVE_BACK_MIN_BYTES` of it; nothing where it did not change the
    allocator.

    For the one-machine engines before each stage's blocks: what the
    stages before left freed in their threads' arenas, and the O(T) arrays
    of the selection between stages in the calling thread's arena, which
    the stage's threads cannot take.  Kept, they added to the job's peak
    (the figures are :data:`GIVE_BACK_MIN_BYTES`'s).  A stage's threads
    then fault their first block's arrays in again, not every block's.
    """
    if _malloc_trim is None or (_freed_bytes is not None and _freed_bytes() < GIVE_BACK_MIN_BYTES):
        return
    _malloc_trim(0)


def usable_memory() -> int:
    """The machine's memory, or less where a cgroup or a resource limit
    bounds this process's.

    The soft ``RLIMIT_DATA`` and ``RLIMIT_AS`` limits count address space
    (``ulimit -d``, ``prlimit --data``: private writable mappings, touched or
    not), so a job under one must keep its allocations, not only its
    resident pages, below it.
    """
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) > 0:
            memory = min(memory, int(limit))
        break
    try:
        import resource
    except ImportError:  # not on a Unix
        return memory
    for which in (resource.RLIMIT_DATA, getattr(resource, "RLIMIT_AS", resource.RLIMIT_DATA)):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY and soft > 0:
            memory = min(memory, int(soft))
    return memory


def usable_cores() -> int:
    """The cores this process may use,
    within its CPU affinity and any cgroup CPU quota (what
    ``dask.system.CPU_COUNT`` counts, without importing dask for it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpus() -> int | None:
    """Whole CPUs a cgroup quota allows (v2 ``cpu.max``, v1 ``cfs_quota``), if any."""
    for path, pair in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(path) as f:
                fields = f.read().split()
            if pair is not None:
                with open(pair) as f:
                    fields += f.read().split()
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            quota, period = int(fields[0]), int(fields[1])
            if quota > 0 and period > 0:
                return max(1, math.ceil(quota / period))
        return None
    return None


def _references(holder: Any, name: str) -> int:
    return sys.getrefcount(getattr(holder, name))


#: The count of an attribute only its holder refers to, measured as
#: :func:`held_elsewhere` measures: how getrefcount counts its own argument
#: differs between Python versions.
_ALONE = _references(types.SimpleNamespace(value=object()), "value")


def held_elsewhere(holder: Any, name: str) -> bool:
    """Whether anything but ``holder`` refers to its attribute ``name``.

    A kept buffer is in use while an array refers to it: numpy arrays over
    a buffer, and their views (whose base numpy collapses to the buffer),
    each hold a reference.
    """
    return _references(holder, name) > _ALONE
