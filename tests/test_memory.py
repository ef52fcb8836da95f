"""A matrix larger than the process may allocate still goes through.

``prlimit --data`` caps the anonymous memory of the child process; file
mappings do not count, so a job that maps pred_probs and only holds blocks
and per-row records completes, while loading the matrix fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from dask_labelissues.synthetic import SyntheticSpec, write_npy

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")

ROWS, CLASSES = 3_000_000, 100  # 1.2 GB of float32
LIMIT = 700_000_000  # bytes of anonymous memory allowed to the child

RUN = """
import hashlib, sys
from dask_labelissues import find_label_issues
r = find_label_issues(sys.argv[1], sys.argv[2], backend=sys.argv[3], n_jobs=2)
print(r.num_issues, hashlib.sha256(r.issues.tobytes()).hexdigest())
"""

LOAD = """
import sys, numpy as np
x = np.load(sys.argv[1])
print("loaded", x.nbytes)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    paths = write_npy(SyntheticSpec(ROWS, CLASSES, seed=7), d)
    probs = np.load(paths["pred_probs"], mmap_mode="r")
    assert probs.nbytes > LIMIT * 1.5
    return paths


def _limited(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["prlimit", f"--data={LIMIT}", sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=600,
    )


def test_loading_the_matrix_fails_under_the_cap(big):
    proc = _limited(LOAD, big["pred_probs"])
    assert proc.returncode != 0
    assert "MemoryError" in proc.stderr or "Unable to allocate" in proc.stderr


def test_every_engine_completes_under_the_cap(big):
    outputs = {}
    for backend in ["serial", "threads", "fork", "dask"]:
        proc = _limited(RUN, big["labels"], big["pred_probs"], backend)
        assert proc.returncode == 0, f"{backend} failed:\n{proc.stderr[-2000:]}"
        outputs[backend] = proc.stdout.split()
    assert outputs["serial"] == outputs["threads"] == outputs["fork"] == outputs["dask"]
    num_issues = int(outputs["serial"][0])
    assert 0.02 * ROWS < num_issues < 0.2 * ROWS


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_npy_blocks_are_unmapped_after_use(big):
    """Dask workers count mapped file pages as their memory: a source that kept
    one long-lived mapping would grow to the whole file and get paused."""
    from dask_labelissues.inputs import RawFile

    src = RawFile.from_npy(big["pred_probs"])
    step = 100_000
    before = _rss()
    peak = before
    for a in range(0, src.shape[0], step):
        block = src[a : a + step]
        float(block.sum())  # touch every page
        peak = max(peak, _rss())
        del block
    assert peak - before < 300 * 2**20, f"RSS grew by {(peak - before) / 2**20:.0f} MB"


PEAK = """
import sys, numpy as np
from dask_labelissues import find_label_issues, fused
fused.scan_rows(np.full((2, 3), 1 / 3), np.zeros(2, dtype=np.int64), kernel="numba")  # as a large job loads it
def status(name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name))
base = status("VmRSS")
find_label_issues(sys.argv[1], sys.argv[2], backend=sys.argv[3])
# Forked workers read the file: the largest one's peak, as the kernel kept it for the waited-for children.
import resource
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(base, children if sys.argv[3] == "fork" else status("VmHWM"))
"""


@pytest.mark.parametrize("backend", ["threads", "serial", "fork"])
def test_a_local_job_lets_go_of_the_rows_it_has_read(big, backend):
    """One-machine jobs slice a file from one mapping (forked workers
    inherit it): each block's pages must leave the resident set of the
    process that read them, or it would grow to the file's size (1.2 GB
    here, half of it in each of two workers) though only a block is in use."""
    proc = subprocess.run([sys.executable, "-c", PEAK, big["labels"], big["pred_probs"], backend],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak = (int(v) for v in proc.stdout.split())
    file_bytes = ROWS * CLASSES * 4
    # Records (32 bytes a row), scores and mask, and a block per thread: about 0.2 of the file.
    assert peak - base < 0.4 * file_bytes, f"resident set grew by {(peak - base) / 2**20:.0f} MB"
