"""The Python API: :func:`find_label_issues` and its result, :class:`LabelIssues`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import inputs
from .engines import BACKENDS, run, run_filter
from .filters import PRUNE_FILTERS, FilterSpec
from .kernels import METHODS, ScoreSpec

#: ``return_indices_ranked_by``'s default: rank by ``method``.
SAME_AS_METHOD = "method"


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
        wins a near tie are dropped (what the batched method ranks).  With
        ``filter_by``: cleanlab's ``count.num_label_issues``, the rows off the
        diagonal of the confident joint that are no near ties (for
        ``predicted_neq_given``, which has no joint, ``num_issues``).
    per_class_count
        Rows per given label (K,).
    per_class_issues
        Issues per given label (K,).
    issue_scores
        Scores of ``issues``, in the same order.
    given_label, predicted_label
        The label and the model's argmax class of every row (N, int32),
        lazy with the dask backend.
    filter_by
        The cleanlab filter that chose the issues, or None for the batched
        method.
    confident_joint
        The calibrated confident joint (K, K), rows the given label and
        columns the class counted (filters only; None otherwise).
    reads
        How many times pred_probs was read from storage.
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
    filter_by: str | None = None
    confident_joint: np.ndarray | None = None
    reads: int = 1

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

    def _in_row_order(self, yes: bool) -> "LabelIssues":
        if not yes:
            return self
        order = np.argsort(self.issues, kind="stable")
        return replace(self, issues=self.issues[order], issue_scores=self.issue_scores[order])

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
            "filter_by": self.filter_by,
            "reads": self.reads,
            "per_class_count": self.per_class_count.tolist(),
            "per_class_issues": self.per_class_issues.tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"LabelIssues(rows={self.n_rows}, classes={self.n_classes}, "
            f"num_issues={self.num_issues}, method={self.method!r}, "
            f"filter_by={self.filter_by!r}, backend={self.backend!r})"
        )


#: Workers with less memory than this run the pure-numpy kernel: importing
#: numba and loading its compiled code costs a process about 150 MB.
SMALL_WORKER_BYTES = 1 << 30


def _workers(client: Any) -> tuple[int | None, int]:
    """The smallest worker memory limit (None if none is set) and the total
    worker threads of a distributed ``client``; without one, Dask's local
    scheduler's threads."""
    if client is None:
        import dask.system

        return None, int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    limits = [m for m in limits if m > 0]
    threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
    return (min(limits) if limits else None), threads


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
    filter_by: str | None = None,
    return_indices_ranked_by: str | None = SAME_AS_METHOD,
    frac_noise: float = 1.0,
    num_to_remove_per_class: Any = None,
    min_examples_per_class: int = 1,
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

    With ``filter_by``, the issues are instead those of that method of
    ``cleanlab.filter.find_label_issues`` on single-label data, run
    distributed: the confident joint is a second read of pred_probs and a
    tree reduction; the rows to prune in each (given, counted) cell or class
    are selected by tree reductions of per-block candidates.  pred_probs is
    read twice (once for ``predicted_neq_given``), plus once more for the
    noise-rate cells the per-row candidates cannot decide exactly (flat
    predictions, or many small classes; ``reads`` says when) and once more
    for the adjusted normalized margin.

    ``filter_by="low_self_confidence"`` is cleanlab.filter's method, not
    the default batched one: it counts the issues from the confident joint
    (a row counts where its class clears the threshold, the argmax only when
    several do) and keeps near ties, where the default counts rows whose
    argmax clears its threshold and drops rows whose given label would win
    with 1e-6 more.  On imbalanced data the two can differ by several percent.

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
        whole storage chunks; a dask array keeps its own row chunks.  The
        dask backend reads files and stores in such pieces, and when
        pass one is its only read of pred_probs, its default blocks hold up
        to 4 of them (leaving two blocks per worker thread at least), read
        one at a time (:func:`dask_labelissues.inputs.dask_block_rows`).
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
    filter_by
        None (default): batched confident learning as above, what cleanlab's
        ``find_label_issues_batched`` runs.  Otherwise one of
        ``prune_by_noise_rate``, ``prune_by_class``, ``both``,
        ``confident_learning``, ``predicted_neq_given``,
        ``low_normalized_margin``, ``low_self_confidence``, with the meaning
        it has in ``cleanlab.filter.find_label_issues``.
    return_indices_ranked_by
        The score that orders ``issues`` (and fills ``label_quality_scores``):
        one of ``self_confidence``, ``normalized_margin``,
        ``confidence_weighted_entropy``; by default ``method``.  None lists
        the issues in row order.  A score other than ``method`` is taken only
        with ``filter_by`` and ``method`` left at its default (without
        ``filter_by`` the score also chooses the issues).
    frac_noise, num_to_remove_per_class, min_examples_per_class
        As in ``cleanlab.filter.find_label_issues``; only with the prune
        filters (``prune_by_noise_rate``, ``prune_by_class``, ``both``), except
        ``frac_noise=1``, ``min_examples_per_class=1`` which are defaults.

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
    ranked = return_indices_ranked_by is not None
    if return_indices_ranked_by not in (None, SAME_AS_METHOD):
        if return_indices_ranked_by not in METHODS:
            raise ValueError(
                f"return_indices_ranked_by={return_indices_ranked_by!r} is not one of "
                f"{', '.join(METHODS)} or None"
            )
        if return_indices_ranked_by != method:
            if filter_by is None:
                raise ValueError(
                    f"return_indices_ranked_by={return_indices_ranked_by!r} differs from "
                    f"method={method!r}: without filter_by the score chooses the issues as well "
                    "as ranking them, so pass method= alone"
                )
            if method != "self_confidence":
                raise ValueError(
                    f"return_indices_ranked_by={return_indices_ranked_by!r} and "
                    f"method={method!r} disagree; give one of them"
                )
        method = return_indices_ranked_by
    spec = ScoreSpec(method, bool(adjust_pred_probs), estimation_method, row_sum_tolerance)
    fspec = _filter_spec(filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    lab = inputs.open_source(labels, "labels")
    probs = inputs.open_source(pred_probs, "pred_probs")
    n, k = inputs.check_shapes(lab, probs)
    if fspec is not None and fspec.num_to_remove_per_class is not None:
        if len(fspec.num_to_remove_per_class) != k:
            raise ValueError(
                f"num_to_remove_per_class has {len(fspec.num_to_remove_per_class)} entries; "
                f"pred_probs has {k} classes, one entry per class is needed"
            )

    if backend == "dask":
        from .engines.dask import DaskDriver, active_client

        client = active_client(client)
        smallest, threads = _workers(client)
        if smallest is not None and smallest < SMALL_WORKER_BYTES:
            spec = replace(spec, kernel="numpy")
        target = _block_bytes_for(smallest)
        # File-backed inputs are read inside the scan tasks, in pieces of
        # the size a block would otherwise have.
        direct = inputs.reads_in_tasks(lab, probs)
        read_rows = None
        if direct:
            itemsize = np.dtype(probs.dtype).itemsize
            read_rows = inputs.auto_chunk_rows(k, itemsize, probs.storage_rows, target)
            # Other reads of pred_probs (the adjusted margin's second pass,
            # a filter's) take a whole block at once: only a job the scan
            # reads for alone gets blocks of several pieces.
            single_read = not spec.rereads and (fspec is None or not fspec.needs_joint)
            if chunk_rows is None:
                chunk_rows = read_rows
                if single_read:
                    chunk_rows = inputs.dask_block_rows(
                        n, read_rows, k * itemsize, spec.record_dtype().itemsize, threads
                    )
        lab_d, probs_d = inputs.as_dask_arrays(lab, probs, chunk_rows, target_bytes=target)
        driver = DaskDriver(
            lab_d, probs_d, spec, client=client, progress=progress,
            sources=(lab, probs) if direct else None, read_rows=read_rows,
        )
    else:
        client = None
        rows = inputs.local_chunk_rows(probs, chunk_rows)
        lab_s, probs_s = inputs.as_row_source(lab), inputs.as_row_source(probs)
        if backend == "fork":
            from .engines.fork import fork_driver

            driver = fork_driver(
                lab_s, probs_s, spec, rows, n_jobs=n_jobs, progress=progress,
                spill_dir=spill_dir, fspec=fspec,
            )
        else:
            from .engines.serial import serial_driver

            driver = serial_driver(
                lab_s, probs_s, spec, rows, progress=progress, spill_dir=spill_dir, fspec=fspec
            )
    try:
        raw = run(driver, spec) if fspec is None else run_filter(driver, spec, fspec, ranked)
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
        filter_by=filter_by,
        confident_joint=raw.confident_joint,
        reads=raw.reads,
    )._in_row_order(not ranked)


def _filter_spec(
    filter_by: str | None,
    frac_noise: float,
    num_to_remove_per_class: Any,
    min_examples_per_class: int,
) -> FilterSpec | None:
    if filter_by is None:
        if frac_noise != 1.0 or num_to_remove_per_class is not None or min_examples_per_class != 1:
            raise ValueError(
                "frac_noise, num_to_remove_per_class and min_examples_per_class need filter_by "
                "(one of cleanlab.filter's methods)"
            )
        return None
    if filter_by not in PRUNE_FILTERS:
        for name, value, default in (
            ("frac_noise", frac_noise, 1.0),
            ("min_examples_per_class", min_examples_per_class, 1),
        ):
            if value != default:
                warnings.warn(
                    f"{name} applies to the prune filters only; filter_by={filter_by!r} ignores it",
                    UserWarning,
                    stacklevel=3,
                )
    remove = None
    if num_to_remove_per_class is not None:
        remove = tuple(_whole(x, f"num_to_remove_per_class[{i}]") for i, x in
                       enumerate(np.asarray(num_to_remove_per_class).ravel().tolist()))
    minimum = _whole(min_examples_per_class, "min_examples_per_class")
    return FilterSpec(filter_by, float(frac_noise), remove, minimum)


def _whole(value: Any, name: str) -> int:
    """A count given as a number: a whole one, not below zero."""
    if isinstance(value, bool) or not float(value).is_integer() or value < 0:
        raise ValueError(f"{name} = {value!r} is not a whole number >= 0")
    return int(value)
