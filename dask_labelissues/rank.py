"""cleanlab.rank's label quality scores, on any engine.

:func:`get_label_quality_scores` takes ``cleanlab.rank.get_label_quality_scores``'s
arguments and gives its scores for inputs of any size (numpy, ``.npy``,
Zarr, HDF5, dask): the rows are scored a block at a time where the engine
runs, and the ``(N,)`` scores come back as numpy where the job ran in this
process, as a dask array (held on the cluster) where it ran on Dask (dask
inputs, a ``client``, a current distributed Client, ``backend="dask"``).  With
``adjust_pred_probs`` the confident thresholds come first, exact, from one
read of pred_probs.  :func:`order_label_issues` ranks a mask's rows by
those scores, and :func:`find_top_issues` ranks scores, as cleanlab's do.

Differences from cleanlab:

- scores are float64 whatever the input's precision (cleanlab keeps
  float32 inputs' precision: the two then differ by up to about 1e-7);
- bad values (NaN, inf, negative, rows not summing to 1, labels outside
  ``0..K-1``) are refused naming the row, and so are fewer than 2 classes,
  integer pred_probs and labels that are not integers;
- :func:`find_top_issues` and :func:`order_label_issues` rank tied scores
  by index (cleanlab's sort takes any of them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import inputs
from .engines import BACKEND_CHOICES, make_engine
from .filter import adjusts
from .kernels import ScoreSpec
from .pipelines import first_passes, warm_up

__all__ = [
    "find_top_issues", "get_confidence_weighted_entropy_for_each_label", "get_label_quality_scores",
    "get_normalized_margin_for_each_label", "get_self_confidence_for_each_label", "order_label_issues",
]


def get_label_quality_scores(
    labels: Any,
    pred_probs: Any,
    *,
    method: str = "self_confidence",
    adjust_pred_probs: bool = False,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
    row_sum_tolerance: float | None = 1e-3,
    spill_dir: str | None = None,
) -> Any:
    """Each row's label quality score, lower for likelier label issues.

    Parameters
    ----------
    labels
        ``(N,)`` integer class indices in ``0..K-1``: numpy, ``.npy`` path,
        Zarr or HDF5 array, or dask array.
    pred_probs
        ``(N, K)`` predicted probabilities, rows summing to 1, in the same forms.
    method
        ``"self_confidence"`` (default), ``"normalized_margin"`` or
        ``"confidence_weighted_entropy"``, as in cleanlab.
    adjust_pred_probs
        Subtract each class's confident threshold and renormalize before
        scoring, as cleanlab does (one more read of pred_probs for the
        thresholds, and for methods other than self-confidence a second
        read for the scores).
    backend, client, chunk_rows, n_jobs, progress, row_sum_tolerance, spill_dir
        As for :func:`dask_labelissues.find_label_issues`.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(N,)`` float64 scores, in [0, 1] for rows summing to 1; a dask
        array where the job ran on Dask.

    Raises
    ------
    TypeError, ValueError
        As :func:`dask_labelissues.find_label_issues`: wrong types or
        shapes, or a bad value, named by its row.
    """
    if adjust_pred_probs and method == "confidence_weighted_entropy":
        raise ValueError("adjust_pred_probs does not go with method='confidence_weighted_entropy' (nor in cleanlab)")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    spec = ScoreSpec(method, bool(adjust_pred_probs), "off_diagonal", row_sum_tolerance)
    lab, probs, _, k = inputs.open_pair(labels, pred_probs)
    engine, _, _ = make_engine(
        backend, lab, probs, spec, single_read=not spec.rereads, chunk_rows=chunk_rows, n_jobs=n_jobs,
        client=client, progress=progress, spill_dir=spill_dir, warm_up=lambda s: warm_up(s, None, k, probs.dtype),
    )
    try:
        spec = engine.plan.spec  # with the kernel the engine chose
        columns = {"records": engine.column(spec.record_dtype()), "scores": engine.column(np.float64)}
        passes = first_passes(engine, spec, columns, select=False)
        return engine.to_array(passes.scores, np.float64)
    finally:
        engine.close()


def get_self_confidence_for_each_label(labels: Any, pred_probs: Any, **engine: Any) -> Any:
    """:func:`get_label_quality_scores` with ``method="self_confidence"``
    (each row's probability of its given label), as cleanlab's function
    of that name; ``**engine`` as there."""
    return get_label_quality_scores(labels, pred_probs, method="self_confidence", **engine)


def get_normalized_margin_for_each_label(labels: Any, pred_probs: Any, **engine: Any) -> Any:
    """:func:`get_label_quality_scores` with ``method="normalized_margin"``,
    as cleanlab's function of that name; ``**engine`` as there."""
    return get_label_quality_scores(labels, pred_probs, method="normalized_margin", **engine)


def get_confidence_weighted_entropy_for_each_label(labels: Any, pred_probs: Any, **engine: Any) -> Any:
    """:func:`get_label_quality_scores` with
    ``method="confidence_weighted_entropy"``, as cleanlab's function of that
    name; ``**engine`` as there."""
    return get_label_quality_scores(labels, pred_probs, method="confidence_weighted_entropy", **engine)


def order_label_issues(
    label_issues_mask: Any,
    labels: Any,
    pred_probs: Any,
    *,
    rank_by: str = "self_confidence",
    rank_by_kwargs: dict[str, Any] | None = None,
    **engine: Any,
) -> np.ndarray:
    """The rows ``label_issues_mask`` flags, lowest label quality score
    first, ties by index, as ``cleanlab.rank.order_label_issues``.

    Parameters
    ----------
    label_issues_mask
        ``(N,)`` bool (a list, numpy or dask), e.g. ``cleanlab.filter``'s
        mask; integers are row indices, as numpy (and cleanlab) index by them.
    labels, pred_probs
        As in :func:`get_label_quality_scores`, which scores every row.
    rank_by
        The score's ``method``.
    rank_by_kwargs
        ``{"adjust_pred_probs": True}`` to adjust, as in cleanlab.
    **engine
        ``backend``, ``client``, ``chunk_rows``, ``n_jobs``, ``progress``,
        ``row_sum_tolerance``, ``spill_dir``.

    Returns
    -------
    numpy.ndarray
        int64 row indices.
    """
    scores = get_label_quality_scores(
        labels, pred_probs, method=rank_by, adjust_pred_probs=adjusts(rank_by_kwargs), **engine
    )
    mask = label_issues_mask if inputs.is_dask_array(label_issues_mask) else np.asarray(label_issues_mask)
    inputs.known_shape(mask, "label_issues_mask")
    if mask.dtype.kind in "iu":  # row indices
        index = inputs.to_numpy(mask).astype(np.int64)
        flagged = inputs.to_numpy(scores)[index]
    elif mask.dtype.kind != "b":
        raise TypeError(f"label_issues_mask must be a boolean mask or row indices, got dtype {mask.dtype}")
    elif int(mask.shape[0]) != int(scores.shape[0]):
        raise ValueError(f"label_issues_mask has {mask.shape[0]} rows; labels {scores.shape[0]}")
    elif inputs.is_dask_array(mask) or inputs.is_dask_array(scores):
        import dask.array as da

        index, flagged = inputs.compute_all(da.flatnonzero(da.asarray(mask)), da.asarray(scores)[da.asarray(mask)])
    else:
        index, flagged = np.flatnonzero(mask), scores[mask]
    return _lowest(flagged, np.asarray(index, dtype=np.int64), len(index))[1]


def find_top_issues(quality_scores: Any, *, top: int | None = 10) -> np.ndarray:
    """Indices of the ``top`` lowest scores, lowest first, ties by index,
    as ``cleanlab.rank.find_top_issues``.

    Parameters
    ----------
    quality_scores
        ``(N,)`` scores (numpy or dask; a dask array is reduced where it
        lives, each chunk sending its ``top`` lowest).
    top
        How many (None or more than N: all).

    Returns
    -------
    numpy.ndarray
        int64 indices.
    """
    inputs.known_shape(quality_scores, "quality_scores")
    n = int(quality_scores.shape[0])
    top = n if top is None or top > n else int(top)
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if inputs.is_dask_array(quality_scores):
        import dask
        import dask.array as da

        # Each chunk sends only its own lowest to the client.
        index = da.arange(n, chunks=quality_scores.chunks[0], dtype=np.int64)
        lowest = dask.delayed(_lowest, pure=True)
        pieces = inputs.compute_all(*[
            lowest(s, i, top) for s, i in zip(quality_scores.to_delayed(optimize_graph=False).ravel(),
                                               index.to_delayed().ravel())
        ], like=quality_scores)
        scores = np.concatenate([s for s, _ in pieces])
        index = np.concatenate([i for _, i in pieces])
    else:
        scores = np.asarray(quality_scores, dtype=np.float64)
        index = np.arange(n, dtype=np.int64)
    return _lowest(scores, index, top)[1]


def _lowest(scores: Any, index: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` lowest ``scores`` (NaN last) and their ``index``, ties by index."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.lexsort((index, scores))[:top]
    return scores[keep], np.asarray(index[keep], dtype=np.int64)
