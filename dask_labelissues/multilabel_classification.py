"""Multi-label classification: cleanlab.multilabel_classification's functions, on any engine.

Every example may carry several of K labels.  As in cleanlab, each class
is a binary problem (the class against the rest: probabilities ``[1 - p,
p]``); here the K problems run side by side on this project's engines,
each step of the filter one read of pred_probs for all of them
(:mod:`dask_labelissues.lockstep`); an example has a label issue where
any of its classes has one.  Labels are cleanlab's list of label lists,
an ``(N, K)`` 0/1 matrix (numpy, Zarr, HDF5, dask: a store's form), or
:class:`LabelSets` (each example's classes, one after another); pred_probs is
``(N, K)`` independent per-class probabilities (rows need not sum to 1;
each value must lie in [0, 1]).

Differences from cleanlab:

- issues tied in score are ranked by row (cleanlab's sort takes any);
- ``low_memory=True`` changes nothing: the exact method runs in bounded
  memory already (cleanlab's falls back to a batched estimate);
- a bad value is refused naming its row and class;
- with ``filter_by="low_self_confidence"`` or ``"low_normalized_margin"``
  and ``return_indices_ranked_by``, the issues are ranked by that score
  (cleanlab sorts their scores in row order and applies that sort to its
  issues held in another order);
- for float32 pred_probs, the confidence-weighted entropy can differ from
  cleanlab's by about 1e-7 (its float32 logarithm is another's);
- for float32 pred_probs, scores of adjusted pred_probs are computed in
  float64 (cleanlab adjusts them in float32): the two differ by about 1e-7.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import inputs
from .filters import caller_stacklevel, checked_joint, counts_from_given, filter_spec, whole_count
from .engines import make_engine
from .kernels import METHODS, InputProblem, ScoreSpec
from .kinds import OneVsRest
from .lockstep import ProblemsResult, run_filters, run_problem_scores
from .pipelines import run_row_scores

__all__ = [
    "LabelSets",
    "MultilabelIssues",
    "example_issues",
    "find_issues",
    "find_label_issues",
    "find_multilabel_issues_per_class",
    "get_label_quality_scores",
    "get_label_quality_scores_per_class",
]

#: cleanlab's default aggregation of the per-class scores.
DEFAULT_AGGREGATOR = {"method": "exponential_moving_average", "alpha": 0.8}
#: cleanlab's floor for the confidence-weighted entropy's divisions.
CLIP = 1e-6
#: Rows read at a time where cleanlab's outputs are whole arrays in memory.
SCORE_ROWS = 1 << 16


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    return_indices_ranked_by: str | None = None,
    rank_by_kwargs: dict[str, Any] | None = None,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    num_to_remove_per_class: Sequence[int] | None = None,
    min_examples_per_class: int = 1,
    confident_joint: Any = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    low_memory: bool = False,
    *,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """The examples whose labels likely hold an error.

    Parameters
    ----------
    labels
        A list of each example's label lists (integers in ``0..K-1``), or an
        ``(N, K)`` 0/1 matrix (any array source or path).
    pred_probs
        ``(N, K)``: each class's predicted probability, independently.
    return_indices_ranked_by
        None: a boolean mask; else the issues' indices, ranked by that score
        (``"self_confidence"``, ``"normalized_margin"``,
        ``"confidence_weighted_entropy"``) aggregated over the classes as
        :func:`get_label_quality_scores` does, lowest first.
    rank_by_kwargs
        ``{"adjust_pred_probs": True}``: rank by the score of pred_probs
        adjusted by each class's thresholds (two more reads); no other
        options are supported yet.
    filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class
        As in ``cleanlab.filter.find_label_issues``, for each class's
        binary problem (``num_to_remove_per_class[k]`` for class k).
    confident_joint
        ``(K, 2, 2)``: each class's confident joint (as
        ``cleanlab.count.compute_confident_joint(..., multi_label=True)``
        makes them), which the prune filters count from instead of the
        data's; a ``(K, K)`` joint is ignored with a warning, as cleanlab
        ignores it, and ``confident_learning`` estimates its own.
    n_jobs, verbose, low_memory
        Threads or processes of the one-machine engines; progress bars;
        accepted for cleanlab's callers (the method is the same).
    backend, client, chunk_rows
        The engine, as in :func:`dask_labelissues.find_label_issues`.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool, or the ranked int64 indices.
    """
    del low_memory
    found = example_issues(
        labels, pred_probs, filter_by=filter_by, frac_noise=frac_noise,
        num_to_remove_per_class=num_to_remove_per_class, min_examples_per_class=min_examples_per_class,
        return_indices_ranked_by=return_indices_ranked_by, rank_by_kwargs=rank_by_kwargs,
        confident_joint=confident_joint,
        backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=verbose,
    )
    return found.flagged if return_indices_ranked_by is None else found.issues


def example_issues(
    labels: Any,
    pred_probs: Any,
    *,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    num_to_remove_per_class: Sequence[int] | int | None = None,
    min_examples_per_class: int = 1,
    return_indices_ranked_by: str | None = "self_confidence",
    rank_by_kwargs: dict[str, Any] | None = None,
    confident_joint: Any = None,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
) -> MultilabelIssues:
    """The examples :func:`find_label_issues` flags, ranked, with the
    counts and scores behind them (what ``dask_labelissues.find_label_issues(...,
    multi_label=True)`` returns).

    Parameters
    ----------
    labels, pred_probs, filter_by, frac_noise, min_examples_per_class, rank_by_kwargs, confident_joint
        As in :func:`find_label_issues`.
    num_to_remove_per_class
        As there; one number applies to every class.
    return_indices_ranked_by
        The score that orders ``issues`` (lowest first, ties by row); None:
        row order.
    backend, client, chunk_rows, n_jobs, progress
        Where the job runs, as in :func:`dask_labelissues.find_label_issues`.

    Returns
    -------
    MultilabelIssues
        Without ``per_class``.  With ``filter_by="low_self_confidence"`` or
        ``"low_normalized_margin"``, an example is flagged for its
        aggregated score, not in a class: ``given_flagged`` and
        ``left_out_flagged`` are then None.
    """
    options = dict(backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=progress)
    lab, probs, n, k = open_inputs(labels, pred_probs)
    method = None if return_indices_ranked_by is None else _method(return_indices_ranked_by, rank_by_kwargs)
    adjust = method is not None and _adjusts(rank_by_kwargs)
    if adjust and method == "confidence_weighted_entropy":
        # Refused before the filter's reads, not after them.
        raise ValueError("adjust_pred_probs=True is not supported with method='confidence_weighted_entropy'")
    by_score = filter_by in ("low_normalized_margin", "low_self_confidence")
    if by_score:
        # As cleanlab: as many issues as the confident-learning filter finds,
        # the lowest by the default score (made in that job's last read).
        found = find_issues(lab, probs, filter_by="confident_learning", score_method="self_confidence",
                            per_class=False, confident_joint=confident_joint, **options)
        flagged = np.zeros(n, dtype=bool)
        flagged[np.argsort(found.scores, kind="stable")[: found.num_issues]] = True
    else:
        found = find_issues(
            lab, probs, filter_by=filter_by, frac_noise=frac_noise, num_to_remove_per_class=num_to_remove_per_class,
            min_examples_per_class=min_examples_per_class, score_method=None if adjust else method,
            per_class=False, confident_joint=confident_joint, **options,
        )
        flagged = found.flagged
    scores, reads = found.scores, found.reads
    if adjust:
        # Adjusted scores need every class's thresholds first: a job of their own.
        scores = _scores(lab, probs, method, DEFAULT_AGGREGATOR, options, adjust=True)
        reads += 2
    elif by_score and method is not None and method != "self_confidence":
        scores = _scores(lab, probs, method, DEFAULT_AGGREGATOR, options)
        reads += 1
    issues = np.flatnonzero(flagged)
    if method is not None:
        issues = issues[np.argsort(scores[issues], kind="stable")]
    return MultilabelIssues(
        per_class=None,
        flagged=flagged,
        issues=issues.astype(np.int64),
        given_flagged=None if by_score else found.given_flagged,
        left_out_flagged=None if by_score else found.left_out_flagged,
        scores=scores,
        reads=reads,
    )


@dataclass
class MultilabelIssues:
    """What :func:`find_issues` and :func:`example_issues` find."""

    #: ``(N, K)`` bool: each class's label issues (None unless asked for).
    per_class: np.ndarray | None
    #: ``(N,)`` bool: the examples with a label issue in any class.
    flagged: np.ndarray
    #: int64 indices of the flagged examples, lowest score first (ties by
    #: row) where a ranking was asked for, else in row order.
    issues: np.ndarray
    #: ``(K,)`` int64 each: per class, the flagged examples where it is
    #: given (likely absent), and where it is left out (likely present).
    given_flagged: np.ndarray | None
    left_out_flagged: np.ndarray | None
    #: ``(N,)`` float64 aggregated scores (:func:`get_label_quality_scores`),
    #: where a score was asked for; else None.
    scores: np.ndarray | None
    #: Reads of pred_probs the job made.
    reads: int

    @property
    def num_issues(self) -> int:
        """How many examples are flagged."""
        return int(self.issues.shape[0])

    @property
    def is_label_issue(self) -> np.ndarray:
        """``flagged``, by the name :class:`dask_labelissues.LabelIssues` gives it."""
        return self.flagged

    @property
    def label_quality_scores(self) -> np.ndarray | None:
        """``scores``, by the name :class:`dask_labelissues.LabelIssues` gives them."""
        return self.scores


def find_issues(
    labels: Any,
    pred_probs: Any,
    *,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    num_to_remove_per_class: Sequence[int] | None = None,
    min_examples_per_class: int = 1,
    score_method: str | None = None,
    aggregator_kwargs: dict[str, Any] | None = None,
    per_class: bool = True,
    confident_joint: Any = None,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
) -> MultilabelIssues:
    """Each class's label issues and, in the same job, every example's score.

    Parameters
    ----------
    labels, pred_probs
        As in :func:`find_label_issues` (or opened by :func:`open_inputs`).
    filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class
        As in :func:`find_multilabel_issues_per_class`.
    score_method
        Also score every example as :func:`get_label_quality_scores` does
        with this method, in the job's last read of pred_probs (None: no
        scores).
    aggregator_kwargs
        As in :func:`get_label_quality_scores`.
    per_class
        Each class's issues, ``(N, K)``; False: only whether an example has
        one, ``(N,)`` (1 byte an example brought back, not K).
    confident_joint
        As in :func:`find_label_issues`.
    backend, client, chunk_rows, n_jobs, progress
        Where the job runs, as in :func:`find_label_issues`.

    Returns
    -------
    MultilabelIssues
        ``issues`` ranked by the scores where ``score_method`` is given,
        else in row order.  An example is flagged where any class flags it:
        with ``filter_by="low_self_confidence"`` or ``"low_normalized_margin"``
        that is each class's low-score filter, as in
        :func:`find_multilabel_issues_per_class`, not the example-level
        choice of :func:`find_label_issues` (:func:`example_issues`).
    """
    lab, probs, _, k = open_inputs(labels, pred_probs)
    options = dict(backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=progress)
    row_scores = None
    if score_method is not None:
        kwargs = dict(aggregator_kwargs or DEFAULT_AGGREGATOR)
        how = kwargs.pop("method", "exponential_moving_average")
        row_scores = functools.partial(aggregated_scores, _method(score_method, None), how, kwargs)
    found = _class_results(lab, probs, k, filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class,
                           options, row_scores=row_scores, per_problem=per_class, confident_joint=confident_joint)
    mask = inputs.to_numpy(found.mask).astype(bool, copy=False)
    flagged = mask.any(axis=1) if per_class else mask
    scores = None if row_scores is None else inputs.to_numpy(found.row_scores)
    issues = np.flatnonzero(flagged)
    if scores is not None:
        issues = issues[np.argsort(scores[issues], kind="stable")]
    return MultilabelIssues(
        per_class=mask if per_class else None,
        flagged=flagged,
        issues=issues.astype(np.int64),
        given_flagged=found.flagged_by_label[:, 1].copy(),
        left_out_flagged=found.flagged_by_label[:, 0].copy(),
        scores=scores,
        reads=found.reads,
    )


def find_multilabel_issues_per_class(
    labels: Any,
    pred_probs: Any,
    return_indices_ranked_by: str | None = None,
    rank_by_kwargs: dict[str, Any] | None = None,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    num_to_remove_per_class: Sequence[int] | None = None,
    min_examples_per_class: int = 1,
    confident_joint: Any = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    low_memory: bool = False,
    *,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
) -> Any:
    """Each class's label issues: whether an example's label of that class
    (present or absent) is likely wrong.

    Parameters are those of :func:`find_label_issues`.

    Returns
    -------
    numpy.ndarray or tuple
        ``(N, K)`` bool with ``return_indices_ranked_by=None``; else, as
        cleanlab, ``(issues, labels, pred_probs)``: per class, its issues'
        row indices ranked by that binary problem's score (lowest first,
        ties by row), its 0/1 labels and its ``(N, 2)`` probabilities.
    """
    del low_memory
    options = dict(backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=verbose)
    lab, probs, n, k = open_inputs(labels, pred_probs)
    if return_indices_ranked_by is None:
        return find_issues(
            lab, probs, filter_by=filter_by, frac_noise=frac_noise, num_to_remove_per_class=num_to_remove_per_class,
            min_examples_per_class=min_examples_per_class, confident_joint=confident_joint, **options,
        ).per_class
    method = _method(return_indices_ranked_by, rank_by_kwargs)
    found = _class_results(lab, probs, k, filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class,
                           options, ranked_by=method, adjust=_adjusts(rank_by_kwargs), confident_joint=confident_joint)
    issues = [np.asarray(rows, dtype=np.int64) for rows in found.issues]
    kinds = [OneVsRest(k=c) for c in range(k)]
    y = _read_all(lab)
    p = _read_all(probs)
    return issues, [kinds[c].labels(y) for c in range(k)], [kinds[c].probs(p) for c in range(k)]


def get_label_quality_scores(
    labels: Any,
    pred_probs: Any,
    *,
    method: str = "self_confidence",
    adjust_pred_probs: bool = False,
    aggregator_kwargs: dict[str, Any] | None = None,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
) -> np.ndarray:
    """A score per example: its classes' scores (:func:`get_label_quality_scores_per_class`)
    aggregated, lower is more likely mislabeled.

    Parameters
    ----------
    labels, pred_probs
        As in :func:`find_label_issues`.
    method
        Each class's score: ``"self_confidence"``, ``"normalized_margin"``
        or ``"confidence_weighted_entropy"``.
    adjust_pred_probs
        Score each class's ``[1 - p, p]`` less its binary problem's
        thresholds, renormalized, as cleanlab does (not with
        ``confidence_weighted_entropy``): one read for every class's
        thresholds, one for the scores.
    aggregator_kwargs
        ``{"method": "exponential_moving_average", "alpha": 0.8}`` (the
        default: the classes' scores sorted highest first, each step
        ``alpha * next + (1 - alpha) * average``), ``{"method": "softmin",
        "temperature": t}``, or ``{"method": callable}`` (scores ``(n, K)``
        to ``(n,)``), with that method's keywords.
    backend, client, chunk_rows, n_jobs
        Where the job runs, as in :func:`find_label_issues` (a callable
        aggregator must pickle for ``backend="fork"``).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64.
    """
    lab, probs, _, _ = open_inputs(labels, pred_probs)
    options = dict(backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=False)
    return _scores(lab, probs, _method(method, None), aggregator_kwargs or DEFAULT_AGGREGATOR, options,
                   adjust=adjust_pred_probs)


def get_label_quality_scores_per_class(
    labels: Any, pred_probs: Any, *, method: str = "self_confidence", adjust_pred_probs: bool = False,
    backend: str = "auto", client: Any = None, chunk_rows: int | None = None, n_jobs: int | None = None,
) -> np.ndarray:
    """Each example's score of each class's label (present or absent).

    Parameters
    ----------
    labels, pred_probs
        As in :func:`find_label_issues`.
    method
        As in :func:`get_label_quality_scores`.
    adjust_pred_probs
        Score each class's ``[1 - p, p]`` less its binary problem's
        thresholds, renormalized, as cleanlab does (not with
        ``confidence_weighted_entropy``): one read for every class's
        thresholds, one for the scores.
    backend, client, chunk_rows, n_jobs
        Where the job runs, as in :func:`find_label_issues`.

    Returns
    -------
    numpy.ndarray
        ``(N, K)`` float64: the binary problem's score of ``[1 - p, p]``.
    """
    lab, probs, _, k = open_inputs(labels, pred_probs)
    options = dict(backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs, progress=False)
    method = _method(method, None)
    if adjust_pred_probs:
        return _adjusted_scores(lab, probs, method, None, options, row_shape=(k,))
    return _run_scores(lab, probs, functools.partial(_checked_scores, method, None, {}), options, row_shape=(k,))


# -- scores ------------------------------------------------------------------------------
def class_scores(labels: np.ndarray, probs: np.ndarray, method: str) -> np.ndarray:
    """Each class's binary score of a block of rows.

    Parameters
    ----------
    labels
        ``(n, K)`` 0/1.
    probs
        ``(n, K)`` per-class probabilities; ``1 - p`` is made in their
        dtype, as cleanlab stacks ``[1 - p, p]``.
    method
        One of :data:`METHODS`.

    Returns
    -------
    numpy.ndarray
        ``(n, K)`` float64.
    """
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs)
    rest = 1 - probs
    own = np.where(labels, probs, rest)
    if method == "self_confidence":
        return own.astype(np.float64)
    if method == "normalized_margin":
        other = np.where(labels, rest, probs)
        return ((own - other + 1) / 2).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(_xlogx(rest) + _xlogx(probs)) / np.log(2)
        ratio = entropy / np.clip(own, CLIP, None)
        return (np.log(ratio + 1) / np.clip(ratio, CLIP, None)).astype(np.float64)


def aggregate(scores: np.ndarray, method: str | Callable = "exponential_moving_average", **kwargs: Any) -> np.ndarray:
    """Each row's class scores as one score.

    Parameters
    ----------
    scores
        ``(n, K)`` class scores.
    method
        ``"exponential_moving_average"`` (keyword ``alpha``; None: 2 / (K + 1)),
        ``"softmin"`` (keyword ``temperature``, default 0.1) or a callable,
        called as cleanlab calls it: ``method(scores, axis=1, **kwargs)``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64.
    """
    if callable(method):
        # As cleanlab calls it: across the classes of each row (np.min,
        # np.mean and the like would otherwise reduce the whole block).
        out = np.asarray(method(scores, **{**kwargs, "axis": 1}), dtype=np.float64)
        if out.shape != scores.shape[:1]:
            raise ValueError(
                f"the aggregator {getattr(method, '__name__', method)!r} gave shape {out.shape} for {scores.shape[0]} "
                "rows of class scores: it must reduce axis 1 to one score a row"
            )
        return out
    if method == "exponential_moving_average":
        k = scores.shape[1]
        alpha = kwargs.get("alpha")
        alpha = 2 / (k + 1) if alpha is None else float(alpha)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in the interval [0, 1], got {alpha}")
        ordered = -np.sort(-scores, axis=1)
        ema = ordered[:, 0]
        for column in ordered[:, 1:].T:
            ema = alpha * column + (1 - alpha) * ema
        return ema
    if method == "softmin":
        x = (1 - scores) / float(kwargs.get("temperature", 0.1))
        weights = np.exp(x - x.max(axis=1, keepdims=True))
        return np.einsum("ij,ij->i", scores, weights / weights.sum(axis=1, keepdims=True))
    raise ValueError(f"aggregator method {method!r} is not one of exponential_moving_average, softmin or a callable")


def _scores(
    lab: Any, probs: Any, method: str, aggregator_kwargs: dict[str, Any], options: dict[str, Any],
    adjust: bool = False,
) -> np.ndarray:
    kwargs = dict(aggregator_kwargs)
    how = kwargs.pop("method", "exponential_moving_average")
    if adjust:
        return _adjusted_scores(lab, probs, method, functools.partial(aggregate_scores, how, kwargs), options)
    return _run_scores(lab, probs, functools.partial(_checked_scores, method, how, kwargs), options)


def aggregate_scores(how: str | Callable, kwargs: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """:func:`aggregate` with its arguments first (a block task's ``combine``)."""
    return aggregate(scores, how, **kwargs)


def _adjusted_scores(lab: Any, probs: Any, method: str, combine: Callable | None, options: dict[str, Any],
                     row_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Class scores of pred_probs adjusted by each class's thresholds, as
    cleanlab adjusts each binary problem's ``[1 - p, p]``: the thresholds of
    every class on one read, the scores (aggregated by ``combine``) on the
    next."""
    if method == "confidence_weighted_entropy":
        raise ValueError("adjust_pred_probs=True is not supported with method='confidence_weighted_entropy'")
    engine, kinds = _classes_engine(lab, probs, ScoreSpec(method, True, "off_diagonal", None), options)
    try:
        scores = run_problem_scores(engine, engine.plan.spec, kinds, combine, row_shape)
    finally:
        engine.close()
    return inputs.to_numpy(scores)


def aggregated_scores(
    method: str, how: str | Callable | None, kwargs: dict[str, Any], labels: np.ndarray, probs: np.ndarray
) -> np.ndarray:
    """A block's class scores (:func:`class_scores`), aggregated by ``how``
    with ``kwargs`` (:func:`aggregate`; None: not aggregated)."""
    scores = class_scores(labels, probs, method)
    return scores if how is None else aggregate(scores, how, **kwargs)


def _checked_scores(
    method: str, how: str | Callable | None, kwargs: dict[str, Any], labels: np.ndarray, probs: np.ndarray, start: int
) -> tuple[np.ndarray | None, InputProblem | None]:
    """A block's class scores, aggregated by ``how`` (None: not), or its
    first bad value, named by row and class."""
    y, p = np.asarray(labels), np.asarray(probs)
    bad = ((y != 0) & (y != 1)) | ~((p >= 0) & (p <= 1))
    if bad.any():
        _, c = (int(v) for v in np.argwhere(bad)[0])
        return None, OneVsRest(k=c).stored_problem(y, p, start, None)
    return aggregated_scores(method, how, kwargs, y, p), None


def _run_scores(lab: Any, probs: Any, score: Callable, options: dict[str, Any],
                row_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Scores of every row on the engines: one read of pred_probs, a block
    at a time, wherever the job runs."""
    engine, _, _ = make_engine(
        options["backend"], lab, probs, ScoreSpec(), chunk_rows=options["chunk_rows"], n_jobs=options["n_jobs"],
        client=options["client"], progress=options["progress"], kind=OneVsRest(k=0),
    )
    try:
        scores = run_row_scores(engine, score, row_shape)
    finally:
        engine.close()
    return inputs.to_numpy(scores)


def _xlogx(x: np.ndarray) -> np.ndarray:
    """``x log x`` (0 at 0), in float64 rounded to ``x``'s dtype once (for
    float32, cleanlab's ``scipy.special.xlogy`` can differ by an ulp)."""
    wide = x.astype(np.float64)
    return np.where(wide > 0, wide * np.log(np.where(wide > 0, wide, 1)), 0).astype(x.dtype)


def _method(method: str, kwargs: dict[str, Any] | None) -> str:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    unknown = sorted(set(kwargs or {}) - {"adjust_pred_probs"})
    if unknown:
        raise NotImplementedError(f"rank_by_kwargs {unknown} are not supported yet (only adjust_pred_probs)")
    return method


def _adjusts(rank_by_kwargs: dict[str, Any] | None) -> bool:
    """Whether ``rank_by_kwargs`` asks for the ranking score of adjusted
    pred_probs (cleanlab takes a false value, None included, as no)."""
    return bool((rank_by_kwargs or {}).get("adjust_pred_probs"))


# -- the per-class jobs ------------------------------------------------------------------
def _class_results(
    lab: Any, probs: Any, k: int, filter_by: str, frac_noise: float, remove: Sequence[int] | None,
    minimum: int, options: dict[str, Any], ranked_by: str | None = None, row_scores: Callable | None = None,
    per_problem: bool = True, adjust: bool = False, confident_joint: Any = None,
) -> ProblemsResult:
    """Every class's binary job, side by side on one engine: each stage
    reads pred_probs once for all K classes (:func:`run_filters`)."""
    if remove is not None:
        if np.ndim(remove) == 0:  # one number: the same for every class
            remove = [remove] * k
        if len(remove) != k:
            raise ValueError(f"num_to_remove_per_class has {len(remove)} entries; pred_probs has {k} classes")
        remove = [whole_count(x, f"num_to_remove_per_class[{c}]") for c, x in enumerate(remove)]
    joints = _class_joints(confident_joint, k, filter_by)
    spec = ScoreSpec(ranked_by or "self_confidence", adjust, "off_diagonal", None)
    fspecs = [
        filter_spec(filter_by, frac_noise, None if remove is None else [int(remove[c]), 0], minimum)
        for c in range(k)
    ]
    engine, kinds = _classes_engine(lab, probs, spec, options)
    try:
        return run_filters(engine, engine.plan.spec, kinds, fspecs, ranked_by is not None, row_scores, per_problem,
                           confident_joints=joints, issues=ranked_by is not None)
    finally:
        engine.close()


def _classes_engine(lab: Any, probs: Any, spec: ScoreSpec, options: dict[str, Any]) -> tuple[Any, list[OneVsRest]]:
    """An engine for every class's binary problem side by side, and the
    problems.  Blocks are read whole (``single_read=False``): every class's
    view of a block shares the one read."""
    k = int(probs.shape[1])
    engine, _, _ = make_engine(
        options["backend"], lab, probs, spec, single_read=False, chunk_rows=options["chunk_rows"],
        n_jobs=options["n_jobs"], client=options["client"], progress=options["progress"], kind=OneVsRest(k=0),
        problems=k,
    )
    return engine, [OneVsRest(k=c) for c in range(k)]


# -- inputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSets:
    """Labels stored compressed, as a store holds them at scale: example
    ``i``'s classes are ``indices[offsets[i]:offsets[i + 1]]``.

    Parameters
    ----------
    indices
        ``(L,)`` class indices of every example, one example after another
        (any array source or path: ``.npy``, Zarr, HDF5, numpy).
    offsets
        ``(N + 1,)`` non-decreasing offsets into ``indices``, from 0 to L.

    Pass one as ``labels``: it is read a block of examples at a time, as an
    ``(N, K)`` 0/1 matrix would be, and never expanded whole.
    """

    indices: Any
    offsets: Any


def open_inputs(labels: Any, pred_probs: Any) -> tuple[Any, Any, int, int]:
    """``(labels, pred_probs, N, K)`` opened as row sources, checked: the
    labels a list of label lists (made an (N, K) uint8 matrix), an (N, K)
    matrix or :class:`LabelSets`."""
    probs = inputs.open_source(pred_probs, "pred_probs")
    if len(probs.shape) != 2:
        raise ValueError(f"pred_probs must be 2-D (N, K), got shape {tuple(probs.shape)}")
    n, k = (int(s) for s in probs.shape)
    if np.dtype(probs.dtype).kind != "f":
        raise TypeError(f"pred_probs must be floating point, got dtype {np.dtype(probs.dtype)}")
    if k < 2:
        raise ValueError(f"pred_probs must have at least 2 classes, got {k}")
    if n == 0:
        raise ValueError("pred_probs has no rows: there are no examples to check")
    if isinstance(labels, LabelSets):
        offsets = inputs.open_source(labels.offsets, "label offsets")
        lab = inputs.LabelSetRows(inputs.open_source(labels.indices, "label indices"), offsets, k)
        if lab.shape[0] != n:
            raise ValueError(f"label offsets give {lab.shape[0]} examples but pred_probs has {n}")
    elif isinstance(labels, (list, tuple)):
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} examples but pred_probs {n}")
        matrix = np.zeros((n, k), dtype=np.uint8)
        for i, present in enumerate(labels):
            present = np.asarray(present, dtype=np.int64).reshape(-1)
            if present.size and (present.min() < 0 or present.max() >= k):
                bad = int(present[(present < 0) | (present >= k)][0])
                raise ValueError(f"labels[{i}] holds {bad}, not a class in 0..{k - 1}")
            matrix[i, present] = 1
        lab = inputs.open_source(matrix, "labels")
    else:
        lab = inputs.open_source(labels, "labels")
        if tuple(int(s) for s in lab.shape) != (n, k):
            raise ValueError(
                f"labels must be a list of label lists or an (N, K) = {(n, k)} 0/1 matrix, got shape {tuple(lab.shape)}"
            )
    return lab, probs, n, k


def _read_all(source: Any) -> np.ndarray:
    return np.concatenate([inputs.to_numpy(source[a : a + SCORE_ROWS]) for a in range(0, int(source.shape[0]), SCORE_ROWS)])


def _class_joints(confident_joint: Any, k: int, filter_by: str) -> list[np.ndarray | None] | None:
    """Each class's 2 x 2 confident joint from a caller's ``(K, 2, 2)``, checked;
    None where the filter counts from none (as cleanlab: a ``(K, K)`` joint
    is ignored with a warning, and ``confident_learning`` warns that it
    estimates its own)."""
    if confident_joint is None:
        return None
    cj = np.asarray(confident_joint)
    if cj.shape == (k, k):
        warnings.warn(
            f"a ({k}, {k}) confident_joint is the single-label form and is ignored, as cleanlab ignores it: "
            f"multi-label data take ({k}, 2, 2), each class's joint "
            "(cleanlab.count.compute_confident_joint(..., multi_label=True))",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
        return None
    if cj.shape != (k, 2, 2):
        raise ValueError(f"confident_joint must have shape ({k}, 2, 2), each class's 2 x 2 joint; got {cj.shape}")
    if not counts_from_given(filter_by, estimated="each class's joint"):
        return None
    return [checked_joint(cj[c], 2, name=f"confident_joint[{c}]") for c in range(k)]
