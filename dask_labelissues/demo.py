"""The built-in demo: a synthetic noisy dataset, the job, its score.

The data are written to a Zarr store chunk by chunk on every core (never
whole in memory), the job runs where the command says (threads in this
process by default, or a Dask cluster), and the result is scored against
the labels that were flipped on purpose.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .synthetic import SyntheticSpec, write_zarr


@dataclass
class DemoReport:
    rows: int
    classes: int
    seconds: float
    write_seconds: float
    num_issues: int
    flipped: int
    precision: float
    recall: float
    worst: list[dict[str, Any]]
    data_path: str | None
    results_path: str | None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def run_demo(
    *,
    rows: int = 2_000_000,
    classes: int = 100,
    noise: float = 0.1,
    seed: int = 0,
    backend: str = "auto",
    client: Any = None,
    keep: str | None = None,
    progress: bool = False,
    log: Any = sys.stderr,
) -> DemoReport:
    """Write a synthetic dataset, find its label issues, score them.

    Parameters
    ----------
    rows, classes, noise, seed
        The synthetic dataset (float32 pred_probs; ``noise`` of the labels flipped).
    backend, client
        Where the job runs, as for :func:`dask_labelissues.find_label_issues`
        (default: threads in this process, or the Dask cluster ``client``
        belongs to).
    keep
        Directory to keep the data (``data.zarr``) and results
        (``results.zarr``) in; default: a temporary directory, removed after.
    progress
        Progress bars on stderr.
    log
        Where to print what is happening.
    """
    from .api import find_label_issues

    spec = SyntheticSpec(rows=rows, classes=classes, noise=noise, seed=seed)
    workdir = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="dask-labelissues-demo-")
    os.makedirs(workdir, exist_ok=True)
    data_path = os.path.join(workdir, "data.zarr")
    try:
        print(f"writing {rows:,} x {classes} synthetic rows to {data_path} ...", file=log, flush=True)
        t0 = time.perf_counter()
        chunk_rows = _storage_chunk_rows(classes)
        # The probabilities are random noise that zstd would shrink by 8%
        # at a quarter of the writing time: stored uncompressed.
        write_zarr(spec, data_path, chunk_rows=chunk_rows, compress=False)
        write_seconds = time.perf_counter() - t0

        import zarr

        group = zarr.open_group(data_path, mode="r")
        t0 = time.perf_counter()
        result = find_label_issues(
            group["labels"], group["pred_probs"], backend=backend, client=client, progress=progress
        )
        seconds = time.perf_counter() - t0
        results_path = None
        if keep:
            results_path = result.to_zarr(
                os.path.join(workdir, "results.zarr"), overwrite=True, client=client,
                attrs={"labels": f"{data_path}:labels", "pred_probs": f"{data_path}:pred_probs"},
            )
        worst = worst_rows(result, 10)
        flipped = group["flipped"][:]
        hits = np.intersect1d(result.issues, flipped).size
        return DemoReport(
            rows=rows,
            classes=classes,
            seconds=seconds,
            write_seconds=write_seconds,
            num_issues=result.num_issues,
            flipped=int(flipped.size),
            precision=hits / result.num_issues if result.num_issues else float("nan"),
            recall=hits / flipped.size if flipped.size else float("nan"),
            worst=worst,
            data_path=data_path if keep else None,
            results_path=results_path,
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _storage_chunk_rows(classes: int) -> int:
    """About 32 MB of float32 per chunk, in whole generation blocks."""
    from .synthetic import GENERATION_ROWS

    blocks = max(1, (32 * 2**20) // (classes * 4 * GENERATION_ROWS))
    return blocks * GENERATION_ROWS


def worst_rows(result: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` most likely mislabeled rows with their labels and scores."""
    # Issues may be stored in row order (--row-order): pick by score.
    pick = np.lexsort((result.issues, result.issue_scores))[:top]
    rows = result.rows(result.issues[pick])
    return [
        {"index": int(i), "given_label": int(g), "predicted_label": int(p), "score": float(s)}
        for i, g, p, s in zip(rows["index"], rows["given_label"], rows["predicted_label"],
                              result.issue_scores[pick])
    ]
