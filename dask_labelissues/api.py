"""The Python API: :func:`find_label_issues` and its result, :class:`LabelIssues`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import inputs
from .engines import BACKENDS, run
from .kernels import ScoreSpec


@dataclass
class LabelIssues:
    """The outcome of :func:`find_label_issues`.

    Attributes
    ----------
    issues
        Row indices of the label issues, most likely mislabeled first
        (ascending score, ties by ascending index). int64.
    is_label_issue
        Boolean mask over all N rows; a dask array with the dask backend
        (call :meth:`compute` for numpy).
    label_quality_scores
        Score of every row in [0, 1]-ish, lower is worse; float64, N long,
        lazy with the dask backend.
    confident_thresholds
        Per-class thresholds (K,), float64.
    num_issues
        ``len(issues)``.
    estimated_num_issues
        The estimate T of the number of issues before rows whose given label
        wins a near tie are dropped (cleanlab's ``num_label_issues``).
    per_class_count
        Rows per given label (K,).
    per_class_issues
        Issues per given label (K,).
    issue_scores
        Scores of ``issues``, in the same order.
    given_label, predicted_label
        The label and the model's argmax class of every row (N, int32),
        lazy with the dask backend.
    metadata
        Attributes of the results store it was opened from, if any.
    """

    issues: np.ndarray
    is_label_issue: Any
    label_quality_scores: Any
    confident_thresholds: np.ndarray
    num_issues: int
    estimated_num_issues: int
    per_class_count: np.ndarray
    per_class_issues: np.ndarray
    issue_scores: np.ndarray
    given_label: Any
    predicted_label: Any
    n_rows: int
    n_classes: int
    method: str
    adjust_pred_probs: bool
    estimation_method: str
    backend: str
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The distributed Client holding the lazy arrays, if any.
    client: Any = field(default=None, repr=False, compare=False)

    N_LONG = ("label_quality_scores", "is_label_issue", "given_label", "predicted_label")

    def _compute(self, *values: Any) -> tuple:
        import dask

        if self.client is not None:
            return dask.compute(*values, scheduler=self.client)
        return dask.compute(*values)

    def compute(self) -> "LabelIssues":
        """A copy whose N-long arrays are numpy arrays (computes lazy ones)."""
        values = self._compute(*(getattr(self, name) for name in self.N_LONG))
        return replace(self, **{name: np.asarray(v) for name, v in zip(self.N_LONG, values)})

    def rows(self, indices: Any) -> dict[str, np.ndarray]:
        """Given label, predicted label, score and issue flag of some rows.

        Only those rows are computed or read, wherever the arrays live.
        """
        idx = np.asarray(indices, dtype=np.int64)
        names = ("given_label", "predicted_label", "label_quality_scores", "is_label_issue")
        lazy = [getattr(self, n)[idx] if idx.size else np.zeros(0) for n in names]
        values = self._compute(*lazy)
        return {"index": idx, **{n: np.asarray(v) for n, v in zip(names, values)}}

    def to_zarr(
        self,
        path: str,
        *,
        overwrite: bool = False,
        attrs: dict[str, Any] | None = None,
        client: Any = None,
    ) -> str:
        """Write the results to a Zarr v3 store, atomically; see
        :func:`dask_labelissues.store.write_results`."""
        from .store import write_results

        return write_results(
            self, path, overwrite=overwrite, attrs=attrs, client=client or self.client
        )

    def summary(self) -> dict[str, Any]:
        """Counts and settings as plain Python values (no N-long arrays)."""
        return {
            "rows": self.n_rows,
            "classes": self.n_classes,
            "num_issues": self.num_issues,
            "estimated_num_issues": self.estimated_num_issues,
            "issue_rate": self.num_issues / self.n_rows,
            "method": self.method,
            "adjust_pred_probs": self.adjust_pred_probs,
            "estimation_method": self.estimation_method,
            "backend": self.backend,
            "per_class_count": self.per_class_count.tolist(),
            "per_class_issues": self.per_class_issues.tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"LabelIssues(rows={self.n_rows}, classes={self.n_classes}, "
            f"num_issues={self.num_issues}, method={self.method!r}, backend={self.backend!r})"
        )


#: Workers with less memory than this run the pure-numpy kernel: importing
#: numba and loading its compiled code costs a process about 150 MB.
SMALL_WORKER_BYTES = 1 << 30


def _smallest_worker_memory(client: Any) -> int | None:
    if client is None:
        return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    limits = [m for m in limits if m > 0]
    return min(limits) if limits else None


def _block_bytes_for(smallest: int | None) -> int:
    """Automatic block size: about 64 MB, less on workers with little memory.

    A block and its temporaries must fit a worker several times over, or a
    small memory limit would pause the worker instead of streaming.
    """
    target = inputs.TARGET_BLOCK_BYTES
    if smallest:
        target = min(target, max(smallest // 16, 1 << 20))
    return target


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    method: str = "self_confidence",
    adjust_pred_probs: bool = False,
    estimation_method: str = "off_diagonal",
    backend: str = "dask",
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    client: Any = None,
    progress: bool = False,
    row_sum_tolerance: float | None = 1e-3,
    spill_dir: str | None = None,
) -> LabelIssues:
    """Find the rows whose given label is most likely wrong.

    Batched confident learning: pass one computes each class's confident
    threshold (the mean predicted probability of class k over the rows
    labelled k) exactly, whatever the chunking; pass two scores every row and
    estimates the number of issues T; the issues are the T lowest-scoring
    rows (ties by row index), minus rows whose given label would win the
    argmax after adding 1e-6 to its probability.  pred_probs is read once,
    except for ``method="normalized_margin"`` with ``adjust_pred_probs=True``,
    which reads it twice.

    Parameters
    ----------
    labels
        Given labels (N,), integers in 0..K-1: numpy array, list, np.memmap,
        ``.npy`` path, Zarr array, h5py dataset or dask array.
    pred_probs
        Predicted class probabilities (N, K), floating point, rows summing to
        1 (out-of-sample predictions work best); same kinds as ``labels``.
    method
        Label quality score: ``"self_confidence"``, ``"normalized_margin"`` or
        ``"confidence_weighted_entropy"`` (as ``cleanlab.rank``).
    adjust_pred_probs
        Subtract the thresholds from pred_probs before scoring (not with
        ``confidence_weighted_entropy``).
    estimation_method
        ``"off_diagonal"``: T counts rows whose argmax class c differs from
        the label with ``pred_probs[i, c] >= t_c - 1e-6``.
        ``"off_diagonal_calibrated"``: that count per given label, calibrated
        by the rows of that label.
    backend
        ``"dask"`` (any Dask scheduler), ``"fork"`` (a pool of forked
        processes on this machine) or ``"serial"``.
    chunk_rows
        Rows per block. Default: about 64 MB of pred_probs per block, in
        whole storage chunks; a dask array keeps its own row chunks.
    n_jobs
        Processes for ``backend="fork"`` (default: all cores).
    client
        A ``distributed.Client`` for ``backend="dask"``; default: Dask's
        current scheduler (the default Client if there is one).
    progress
        Progress bars on stderr.
    row_sum_tolerance
        Largest accepted ``|sum(row) - 1|``; None accepts unnormalized rows.
    spill_dir
        Where the fork and serial engines put large per-row buffers
        (default: the system's temporary directory).

    Returns
    -------
    LabelIssues

    Raises
    ------
    TypeError
        Non-integer labels, non-float or object pred_probs.
    ValueError
        Wrong shapes, N = 0, K < 2, length mismatch, or a bad value (NaN,
        inf, negative probability, row sum off 1, label outside 0..K-1); the
        message names the first offending row and its value.
    """
    spec = ScoreSpec(method, bool(adjust_pred_probs), estimation_method, row_sum_tolerance)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    lab = inputs.open_source(labels, "labels")
    probs = inputs.open_source(pred_probs, "pred_probs")
    n, k = inputs.check_shapes(lab, probs)

    if backend == "dask":
        from .engines.dask import DaskDriver, active_client

        client = active_client(client)
        smallest = _smallest_worker_memory(client)
        if smallest is not None and smallest < SMALL_WORKER_BYTES:
            spec = replace(spec, kernel="numpy")
        lab_d, probs_d = inputs.as_dask_arrays(
            lab, probs, chunk_rows, target_bytes=_block_bytes_for(smallest)
        )
        driver = DaskDriver(lab_d, probs_d, spec, client=client, progress=progress)
    else:
        client = None
        rows = inputs.local_chunk_rows(probs, chunk_rows)
        lab_s, probs_s = inputs.as_row_source(lab), inputs.as_row_source(probs)
        if backend == "fork":
            from .engines.fork import fork_driver

            driver = fork_driver(
                lab_s, probs_s, spec, rows, n_jobs=n_jobs, progress=progress, spill_dir=spill_dir
            )
        else:
            from .engines.serial import serial_driver

            driver = serial_driver(lab_s, probs_s, spec, rows, progress=progress, spill_dir=spill_dir)
    try:
        raw = run(driver, spec)
    finally:
        driver.close()
    return LabelIssues(
        issues=raw.issues,
        is_label_issue=raw.arrays["is_label_issue"],
        label_quality_scores=raw.arrays["label_quality_scores"],
        given_label=raw.arrays["given_label"],
        predicted_label=raw.arrays["predicted_label"],
        confident_thresholds=raw.thresholds,
        num_issues=int(raw.issues.shape[0]),
        estimated_num_issues=raw.estimated_num_issues,
        per_class_count=raw.per_class_count,
        per_class_issues=raw.per_class_issues,
        issue_scores=raw.issue_scores,
        n_rows=n,
        n_classes=k,
        method=method,
        adjust_pred_probs=bool(adjust_pred_probs),
        estimation_method=estimation_method,
        backend=backend,
        client=client,
    )
