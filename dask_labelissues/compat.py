"""Drop-in replacements for cleanlab's batched API.

``find_label_issues_batched`` and ``LabelInspector`` take the arguments of
their namesakes in ``cleanlab.experimental.label_issues_batched`` and give
the same issues, with these deliberate differences:

* a class that never occurs as a label gets threshold 2.0, as cleanlab's
  full-data ``get_confident_thresholds`` gives it (cleanlab's batched code
  gives 2e-6 and then reports many false issues);
* ``find_label_issues_batched`` returns indices ranked by score (ties by
  index), as cleanlab documents, instead of cleanlab's index order;
* bad input (NaN, inf, negative probabilities, rows not summing to 1,
  labels outside 0..K-1) raises an error naming the row;
* zarr 3 arrays, h5py datasets and dask arrays are accepted;
* thresholds are exact means and scores are float64 also for float32 input
  (cleanlab averages and scores float32 input in float32), and the adjusted
  self-confidence is computed from each row's sum kept in pass one: equal
  to cleanlab's to about 1e-16 relative, so rows whose scores differ by less
  can rank in another order.

``verbose=True`` prints cleanlab's informational lines on stdout, with our
counts, at the moments cleanlab prints them; the progress bars (stderr) are
this package's own.  cleanlab's notes about its multiprocessing pool (n_jobs
overridden on non-Linux systems, defaulting to logical cores) are not
printed: there is no such pool here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .api import find_label_issues
from .inputs import RawFile, check_shapes, open_source
from .kernels import ScoreSpec
from .states import CountState, ThresholdState, block_scores, scan_block

_SCORE_KEYS = {"method", "adjust_pred_probs"}
_ISSUE_KEYS = {"estimation_method"}

# cleanlab's wording, kept so that logs and scripts matching on it still work.
_THRESHOLD_ROWS = "Total number of examples used to estimate confident thresholds: {}"
_SCORED_ROWS = "Total number of examples whose labels have been evaluated: {}"


def _say(message: str) -> None:
    """Print an informational line where cleanlab prints it: stdout."""
    # Flushed so that it lands in order with the progress bars on stderr.
    print(message, file=sys.stdout, flush=True)


def _say_opened(pred_probs: Any) -> None:
    """Report the size of a pred_probs file, as cleanlab does when it maps one."""
    shape = tuple(pred_probs.shape)
    if len(shape) != 2:
        return  # the shape check that follows raises the real error
    if isinstance(pred_probs, RawFile):
        _say(f"mmap-loaded numpy arrays have: {shape[0]} examples, {shape[1]} classes")
    else:
        # Zarr, HDF5 and remote files are read, not memory-mapped: say only what is true.
        _say(f"pred_probs_file has: {shape[0]} examples, {shape[1]} classes")


def _spec(quality_score_kwargs: dict | None, num_issue_kwargs: dict | None) -> ScoreSpec:
    q = dict(quality_score_kwargs or {})
    c = dict(num_issue_kwargs or {})
    unknown = (set(q) - _SCORE_KEYS) | (set(c) - _ISSUE_KEYS)
    if unknown:
        raise TypeError(
            f"unsupported keyword(s) {sorted(unknown)}; quality_score_kwargs takes "
            f"{sorted(_SCORE_KEYS)}, num_issue_kwargs takes {sorted(_ISSUE_KEYS)}"
        )
    return ScoreSpec(
        method=q.get("method", "self_confidence"),
        adjust_pred_probs=bool(q.get("adjust_pred_probs", False)),
        estimation_method=c.get("estimation_method", "off_diagonal"),
    )


def find_label_issues_batched(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    labels_file: str | None = None,
    pred_probs_file: str | None = None,
    batch_size: int = 10000,
    n_jobs: int | None = 1,
    verbose: bool = True,
    quality_score_kwargs: dict | None = None,
    num_issue_kwargs: dict | None = None,
    return_mask: bool = False,
) -> np.ndarray:
    """cleanlab's ``find_label_issues_batched``, on this package's engines.

    Parameters
    ----------
    labels, pred_probs
        Given labels (N,) and predicted probabilities (N, K): numpy arrays,
        memmaps, Zarr arrays, h5py datasets or dask arrays.
    labels_file, pred_probs_file
        Paths of ``.npy`` files to memory-map instead (one of each pair).
    batch_size
        Rows per block.
    n_jobs
        1 runs serially; more runs that many threads of this process; None
        one per core.
    verbose
        Progress bars on stderr and, as cleanlab prints them on stdout, the
        size of ``pred_probs_file`` once opened and the number of rows whose
        labels were evaluated once done.
    quality_score_kwargs
        ``method`` and ``adjust_pred_probs``, as in cleanlab.
    num_issue_kwargs
        ``estimation_method``: ``"off_diagonal"`` or ``"off_diagonal_calibrated"``.
    return_mask
        Return a boolean mask over the rows instead of indices.

    Returns
    -------
    np.ndarray
        Indices of the label issues ranked by ascending score (ties by
        index), or the boolean mask.
    """
    if labels_file is not None:
        if labels is not None:
            raise ValueError("give labels or labels_file, not both")
        labels = labels_file
    if pred_probs_file is not None:
        if pred_probs is not None:
            raise ValueError("give pred_probs or pred_probs_file, not both")
        # Opened here (find_label_issues takes the opened source as it is) so
        # the size can be reported before the passes, as cleanlab does.
        pred_probs = open_source(pred_probs_file, "pred_probs")
        if verbose:
            _say_opened(pred_probs)
    if labels is None:
        raise ValueError("labels (or labels_file) is required")
    if pred_probs is None:
        raise ValueError("pred_probs (or pred_probs_file) is required")
    spec = _spec(quality_score_kwargs, num_issue_kwargs)
    backend = "serial" if n_jobs == 1 else "threads"
    result = find_label_issues(
        labels,
        pred_probs,
        method=spec.method,
        adjust_pred_probs=spec.adjust_pred_probs,
        estimation_method=spec.estimation_method,
        backend=backend,
        chunk_rows=batch_size,
        n_jobs=n_jobs,
        progress=verbose,
    )
    if verbose:
        # Every row is evaluated here (no separate scoring calls), so the count is N.
        _say(_SCORED_ROWS.format(result.n_rows))
    if return_mask:
        return np.array(result.is_label_issue, dtype=bool)
    return result.issues


class LabelInspector:
    """cleanlab's streaming ``LabelInspector``, with mergeable state.

    Feed batches to :meth:`update_confident_thresholds` (all the data), then
    to :meth:`score_label_quality` (the data to check).  Instances built on
    different machines over different rows combine with :meth:`merge`.

    Parameters
    ----------
    num_class
        K, the number of classes.
    store_results
        Keep every score (needed for :meth:`get_quality_scores` and
        :meth:`get_label_issues`).
    verbose
        Print on stdout, as cleanlab does, how many rows the thresholds
        (:meth:`get_confident_thresholds`) and the issues
        (:meth:`get_num_issues`, :meth:`get_label_issues`) are based on.
    quality_score_kwargs
        ``method`` and ``adjust_pred_probs``.
    num_issue_kwargs
        ``estimation_method``.
    n_jobs
        Accepted for compatibility; each batch is scored in this process
        (by numba's kernels where numba is installed, which compiles them
        on the first batch if its cache lacks them), so it changes nothing.
    """

    def __init__(
        self,
        *,
        num_class: int,
        store_results: bool = True,
        verbose: bool = True,
        quality_score_kwargs: dict | None = None,
        num_issue_kwargs: dict | None = None,
        n_jobs: int | None = 1,
    ) -> None:
        if int(num_class) < 2:
            raise ValueError(f"num_class must be >= 2, got {num_class}")
        self.num_class = int(num_class)
        self.store_results = store_results
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.spec = _spec(quality_score_kwargs, num_issue_kwargs)
        self._threshold_state = ThresholdState.empty(self.num_class)
        self._count_state = CountState.empty(self.num_class)
        self._scores = np.empty(1024, dtype=np.float64)
        self._n_scores = 0
        self.examples_processed_thresh = 0
        self.examples_processed_quality = 0

    # -- input ---------------------------------------------------------------
    def _batch(self, labels: Any, pred_probs: Any) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(labels[:] if not isinstance(labels, (list, tuple)) else labels)
        probs = np.asarray(pred_probs[:])
        check_shapes(lab, probs)
        if probs.shape[1] != self.num_class:
            raise ValueError(
                f"pred_probs has {probs.shape[1]} columns but num_class={self.num_class}"
            )
        return lab, probs

    def update_confident_thresholds(self, labels: Any, pred_probs: Any) -> None:
        """Add a batch to the threshold estimate."""
        lab, probs = self._batch(labels, pred_probs)
        _, state = scan_block(lab, probs, self.examples_processed_thresh, self.spec)
        state.raise_problem()
        self._threshold_state = ThresholdState.combine([self._threshold_state, state])
        self.examples_processed_thresh += len(lab)

    def score_label_quality(
        self, labels: Any, pred_probs: Any, *, update_num_issues: bool = True
    ) -> np.ndarray:
        """Score a batch with the current thresholds; returns its scores."""
        thresholds = self.get_confident_thresholds(silent=True)
        lab, probs = self._batch(labels, pred_probs)
        rec, state = scan_block(lab, probs, self.examples_processed_quality, self.spec)
        state.raise_problem()
        scores = block_scores(rec, thresholds, self.spec, lab, probs)
        if update_num_issues:
            self._count_state = CountState.combine(
                [self._count_state, CountState.chunk(rec, thresholds)]
            )
        if self.store_results:
            self._append(scores)
        self.examples_processed_quality += len(lab)
        return scores

    def _append(self, scores: np.ndarray) -> None:
        need = self._n_scores + len(scores)
        if need > len(self._scores):
            grown = np.empty(max(need, 2 * len(self._scores)), dtype=np.float64)
            grown[: self._n_scores] = self._scores[: self._n_scores]
            self._scores = grown
        self._scores[self._n_scores : need] = scores
        self._n_scores = need

    # -- results -------------------------------------------------------------
    def _say(self, message: str, silent: bool = False) -> None:
        if self.verbose and not silent:
            _say(message)

    def get_confident_thresholds(self, silent: bool = False) -> np.ndarray:
        """The thresholds from all batches seen so far (K,)."""
        if self.examples_processed_thresh < 1:
            raise ValueError("no thresholds yet: call update_confident_thresholds() first")
        self._say(_THRESHOLD_ROWS.format(self.examples_processed_thresh), silent)
        return self._threshold_state.finalize()

    def get_num_issues(self, silent: bool = False) -> int:
        """The estimated number of label issues among the scored rows."""
        if self.examples_processed_quality < 1:
            raise ValueError("no rows scored yet: call score_label_quality() first")
        self._say(_SCORED_ROWS.format(self.examples_processed_quality), silent)
        return self._count_state.finalize(self.spec.estimation_method)

    def get_quality_scores(self) -> np.ndarray:
        """Scores of every row scored so far, in the order they came."""
        if not self.store_results:
            raise ValueError("scores are kept only with store_results=True")
        return self._scores[: self._n_scores].copy()

    def get_label_issues(self) -> np.ndarray:
        """Indices of the ``get_num_issues()`` lowest scores, ranked, ties by index.

        As in cleanlab, this is the top of the ranking only; the near-tie
        rule of :func:`find_label_issues_batched` needs pred_probs again and
        is not applied here.
        """
        if not self.store_results:
            raise ValueError("label issues need store_results=True")
        top = self.get_num_issues(silent=True)
        self._say(_SCORED_ROWS.format(self.examples_processed_quality))
        scores = self._scores[: self._n_scores]
        return np.argsort(scores, kind="stable")[:top].astype(np.int64)

    def scoring_copy(self) -> "LabelInspector":
        """A new inspector with these thresholds and settings and no scored rows.

        The multi-machine recipe: each machine runs
        :meth:`update_confident_thresholds` on its rows; the inspectors are
        merged; each machine scores its rows with a ``scoring_copy()`` of the
        merged one; the scoring copies are merged.
        """
        copy = LabelInspector(
            num_class=self.num_class,
            store_results=self.store_results,
            verbose=self.verbose,
            quality_score_kwargs={"method": self.spec.method, "adjust_pred_probs": self.spec.adjust_pred_probs},
            num_issue_kwargs={"estimation_method": self.spec.estimation_method},
            n_jobs=self.n_jobs,
        )
        copy._threshold_state = ThresholdState.combine([self._threshold_state])
        copy.examples_processed_thresh = self.examples_processed_thresh
        return copy

    def merge(self, other: "LabelInspector") -> "LabelInspector":
        """Fold ``other`` into this inspector and return it.

        Before any row is scored, merging adds the threshold statistics
        (inspectors that saw different rows).  Once rows are scored, both
        inspectors must share the same thresholds (see :meth:`scoring_copy`);
        their counts and scores are then combined, ``other``'s scored rows
        after ours.
        """
        if other.num_class != self.num_class or other.spec != self.spec:
            raise ValueError("can only merge inspectors with the same num_class and settings")
        if other.store_results != self.store_results:
            raise ValueError("can only merge inspectors that both store results, or both not")
        if self.examples_processed_quality == 0 and other.examples_processed_quality == 0:
            self._threshold_state = ThresholdState.combine(
                [self._threshold_state, other._threshold_state]
            )
            self.examples_processed_thresh += other.examples_processed_thresh
            return self
        mine, theirs = self._threshold_state, other._threshold_state
        same = (
            np.array_equal(mine.counts, theirs.counts)
            and mine.sums.tolist() == theirs.sums.tolist()
        )
        if not same:
            raise ValueError(
                "these inspectors scored rows with different thresholds; merge the "
                "threshold-only inspectors first and score with scoring_copy() of the result"
            )
        self._count_state = CountState.combine([self._count_state, other._count_state])
        if self.store_results:
            self._append(other._scores[: other._n_scores])
        self.examples_processed_quality += other.examples_processed_quality
        return self
