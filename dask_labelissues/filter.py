"""``cleanlab.filter.find_label_issues`` as a drop-in, on this package's engines.

The same arguments and the same return values (a boolean mask, or the
issues' indices ranked by a score), so that ``from cleanlab.filter import
find_label_issues`` can become ``from dask_labelissues.filter import
find_label_issues``; inputs may also be ``.npy`` paths, Zarr, HDF5 or dask
arrays, and ``backend``, ``client`` and ``chunk_rows`` choose where the job
runs.  For the job's other results (scores, thresholds, the confident
joint, a results store) call :func:`dask_labelissues.find_label_issues`
with ``filter_by``, which this wraps.

The filters' math is in :mod:`dask_labelissues.filters`; this module is
only the cleanlab-shaped surface.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from .api import find_label_issues as _find

__all__ = ["find_label_issues"]

#: What ``rank_by_kwargs`` may hold (cleanlab's other scoring keywords are
#: not supported yet).
RANK_BY_KWARGS = ("adjust_pred_probs",)


def adjusts(rank_by_kwargs: dict[str, Any] | None) -> bool:
    """Whether cleanlab's ``rank_by_kwargs`` ask for ``adjust_pred_probs``;
    NotImplementedError for keywords not supported here."""
    unknown = sorted(set(rank_by_kwargs or {}) - set(RANK_BY_KWARGS))
    if unknown:
        raise NotImplementedError(f"rank_by_kwargs {unknown} are not supported (only {', '.join(RANK_BY_KWARGS)})")
    return bool((rank_by_kwargs or {}).get("adjust_pred_probs", False))


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    return_indices_ranked_by: str | None = None,
    rank_by_kwargs: dict[str, Any] | None = None,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    num_to_remove_per_class: Sequence[int] | None = None,
    min_examples_per_class: int = 1,
    confident_joint: Any = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    multi_label: bool = False,
    low_memory: bool = False,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """The examples whose given label is likely wrong, as cleanlab's
    ``filter.find_label_issues`` finds them.

    Parameters
    ----------
    labels, pred_probs
        Single-label: labels ``(N,)`` in ``0..K-1`` and pred_probs ``(N, K)``
        rows summing to 1 (numpy, lists, ``.npy`` paths, Zarr, HDF5, dask).
        With ``multi_label``: as
        :func:`dask_labelissues.multilabel_classification.find_label_issues`.
    return_indices_ranked_by
        None: a boolean mask; else the issues' indices ranked by that score
        (``"self_confidence"``, ``"normalized_margin"``,
        ``"confidence_weighted_entropy"``), lowest first, ties by index.
    rank_by_kwargs
        ``{"adjust_pred_probs": bool}`` for that score.
    filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class
        As in cleanlab.
    confident_joint
        A (K, K) confident joint for the prune filters to count from, as in
        cleanlab (for multi-label data, ``(K, 2, 2)``).
    n_jobs, verbose
        Threads or processes of the one-machine engines; progress bars.
    multi_label
        Multi-label data: the job of
        :func:`dask_labelissues.multilabel_classification.find_label_issues`
        (cleanlab deprecates this flag for its multilabel module; so does
        this one).
    low_memory
        Accepted and not needed: the exact method runs in bounded memory.
    backend, client, chunk_rows
        Where the job runs, as in :func:`dask_labelissues.find_label_issues`.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool, or the ranked int64 indices.

    Raises
    ------
    ValueError
        Bad input, named by its row (and class, for multi-label data).
    NotImplementedError
        ``rank_by_kwargs`` other than ``adjust_pred_probs``.
    """
    if multi_label:
        warnings.warn(
            "multi_label=True is deprecated, as in cleanlab: call "
            "dask_labelissues.multilabel_classification.find_label_issues",
            DeprecationWarning,
            stacklevel=2,
        )
        from .multilabel_classification import find_label_issues as find_multilabel

        return find_multilabel(
            labels, pred_probs, return_indices_ranked_by=return_indices_ranked_by, rank_by_kwargs=rank_by_kwargs,
            filter_by=filter_by, frac_noise=frac_noise, num_to_remove_per_class=num_to_remove_per_class,
            min_examples_per_class=min_examples_per_class, confident_joint=confident_joint, n_jobs=n_jobs,
            verbose=verbose, low_memory=low_memory, backend=backend, client=client, chunk_rows=chunk_rows,
        )
    adjust = adjusts(rank_by_kwargs)
    result = _find(
        labels, pred_probs, filter_by=filter_by, return_indices_ranked_by=return_indices_ranked_by,
        adjust_pred_probs=adjust and return_indices_ranked_by is not None,
        frac_noise=frac_noise, num_to_remove_per_class=num_to_remove_per_class,
        min_examples_per_class=min_examples_per_class, confident_joint=confident_joint, n_jobs=n_jobs,
        progress=verbose, backend=backend, client=client, chunk_rows=chunk_rows,
    )
    if return_indices_ranked_by is None:
        return result.array("is_label_issue").astype(bool, copy=False)
    return np.asarray(result.issues, dtype=np.int64)
