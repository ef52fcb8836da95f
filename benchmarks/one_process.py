"""The one-process reference of benchmarks/user.py: what a hand-written
script doing the least of pass one costs from the shell.

    python benchmarks/one_process.py LABELS.npy PRED_PROBS.npy OUT.zarr

It imports numpy, zarr and numba, makes one fused numba pass over every
row on 2 threads (argmax, max, the label's probability, the row sum) and
writes the four N-long arrays to a Zarr store.  No validation, thresholds,
scores or selection: a floor for the whole command, not a rival to it.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import zarr

THREADS = 2
BLOCK_BYTES = 64 << 20


@numba.njit(nogil=True, cache=True)
def fused(probs, labels, pred, p_max, p_label, row_sum):
    n, k = probs.shape
    for i in range(n):
        best = probs[i, 0]
        arg = 0
        total = np.float64(best)
        for j in range(1, k):
            v = probs[i, j]
            if v > best:
                best = v
                arg = j
            total += v
        pred[i] = arg
        p_max[i] = best
        p_label[i] = probs[i, labels[i]]
        row_sum[i] = total


def main(labels_path: str, probs_path: str, out: str) -> None:
    labels = np.load(labels_path, mmap_mode="r")
    probs = np.load(probs_path, mmap_mode="r")
    n, k = probs.shape
    pred = np.empty(n, np.int32)
    p_max = np.empty(n, probs.dtype)
    p_label = np.empty(n, probs.dtype)
    row_sum = np.empty(n, np.float64)
    step = max(1, BLOCK_BYTES // (k * probs.itemsize))

    def block(a: int) -> None:
        b = min(a + step, n)
        fused(np.asarray(probs[a:b]), np.asarray(labels[a:b]), pred[a:b], p_max[a:b], p_label[a:b], row_sum[a:b])

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(block, range(0, n, step)))
    shutil.rmtree(out, ignore_errors=True)
    group = zarr.open_group(out, mode="w")
    for name, values in (("pred", pred), ("p_max", p_max), ("p_label", p_label), ("row_sum", row_sum)):
        group.create_array(name, data=values, chunks=(1 << 20,))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # As the package's command does before it exits (cli.run): Python's
    # last collections over numba's and zarr's objects are no work the job
    # needs, and the floor is the least a process does.
    import gc

    gc.freeze()
