"""The outcome of a job, :class:`LabelIssues`, and :func:`open_results`,
which makes one again from a results store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class LabelIssues:
    """The outcome of :func:`dask_labelissues.find_label_issues`.

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
        columns the class counted (with ``filter_by`` or ``health=True``;
        None otherwise).
    num_label_issues
        cleanlab's ``count.num_label_issues``: the rows the confident joint
        counts off its diagonal, near ties excluded (where the joint is
        known; None otherwise).
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
    num_label_issues: int | None = None

    N_LONG = ("label_quality_scores", "is_label_issue", "given_label", "predicted_label")

    def _compute(self, *values: Any) -> tuple:
        if not any(hasattr(v, "dask") for v in values):
            return values  # numpy already: no need to import dask
        import dask

        if self.client is not None:
            return dask.compute(*values, scheduler=self.client)
        return dask.compute(*values)

    def compute(self) -> "LabelIssues":
        """A copy whose N-long arrays are numpy arrays (computes lazy ones)."""
        values = self._compute(*(getattr(self, name) for name in self.N_LONG))
        return replace(self, **{name: np.asarray(v) for name, v in zip(self.N_LONG, values)})

    def array(self, name: str) -> np.ndarray:
        """One of the N-long arrays (:attr:`N_LONG`) as numpy, computed where
        it lives; the others are not computed."""
        if name not in self.N_LONG:
            raise ValueError(f"{name!r} is not one of {', '.join(self.N_LONG)}")
        return np.asarray(self._compute(getattr(self, name))[0])

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
        from . import store

        return store.write_results(
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

    # -- dataset health: the views of dask_labelissues.dataset ---------------
    def _estimate(self) -> Any:
        if self.confident_joint is None:
            raise ValueError(
                "this result holds no confident joint: run find_label_issues with health=True "
                "(one more read of pred_probs) or with filter_by"
            )
        from .dataset import from_calibrated

        return from_calibrated(self.confident_joint, self.n_rows, self.num_label_issues)

    def health_summary(self, *, asymmetric: bool = False, class_names: Any = None,
                       verbose: bool = True, stream: Any = None) -> dict[str, Any]:
        """As :func:`dask_labelissues.dataset.health_summary`, from the joint
        this result holds (nothing is read); printed to ``stream``
        (default stdout) with ``verbose``."""
        from .dataset import summary_of

        return summary_of(self._estimate(), asymmetric=asymmetric, class_names=class_names,
                          verbose=verbose, stream=stream)

    def rank_classes_by_label_quality(self, *, class_names: Any = None) -> Any:
        """As :func:`dask_labelissues.dataset.rank_classes_by_label_quality`."""
        from .dataset import rank_classes_by_label_quality

        est = self._estimate()
        return rank_classes_by_label_quality(joint=est.joint, num_examples=est.num_examples,
                                             class_names=class_names)

    def find_overlapping_classes(self, *, asymmetric: bool = False, class_names: Any = None) -> Any:
        """As :func:`dask_labelissues.dataset.find_overlapping_classes`."""
        from .dataset import find_overlapping_classes

        est = self._estimate()
        return find_overlapping_classes(joint=est.joint, num_examples=est.num_examples,
                                        asymmetric=asymmetric, class_names=class_names)

    def overall_label_health_score(self) -> float:
        """As :func:`dask_labelissues.dataset.overall_label_health_score`
        from labels and pred_probs (silent)."""
        from .health import health_score

        est = self._estimate()
        return health_score(est.num_examples, num_label_issues=est.num_label_issues, joint=est.joint)[0]

    def __repr__(self) -> str:
        return (
            f"LabelIssues(rows={self.n_rows}, classes={self.n_classes}, "
            f"num_issues={self.num_issues}, method={self.method!r}, "
            f"filter_by={self.filter_by!r}, backend={self.backend!r})"
        )


def open_results(path: str | os.PathLike) -> LabelIssues:
    """Open a results store as a :class:`LabelIssues`.

    The small arrays are loaded; the N-long ones are dask arrays over the
    store, read only when used.  The store's attributes are in ``metadata``.
    """
    from . import store

    return LabelIssues(**store.read_results(path))
