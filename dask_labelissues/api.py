"""The Python API: :func:`find_label_issues`, returning a :class:`LabelIssues`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import inputs
from .engines import BACKEND_CHOICES, make_engine
from .kernels import METHODS, ScoreSpec, filter_requested
from .pipelines import run, run_filter, warm_up
from .results import LabelIssues

if TYPE_CHECKING:
    from .multilabel_classification import MultilabelIssues

__all__ = ["LabelIssues", "find_label_issues"]

#: ``return_indices_ranked_by``'s default: rank by ``method``.
SAME_AS_METHOD = "method"


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    multi_label: bool = False,
    method: str = "self_confidence",
    adjust_pred_probs: bool = False,
    estimation_method: str = "off_diagonal",
    backend: str = "auto",
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
    confident_joint: Any = None,
    health: bool = False,
) -> LabelIssues | MultilabelIssues:
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
    multi_label
        Each example may carry several of the K classes, as in
        ``cleanlab.filter.find_label_issues(..., multi_label=True)``: labels
        are a list of label lists, an (N, K) 0/1 matrix or
        :class:`~dask_labelissues.multilabel_classification.LabelSets`;
        pred_probs are independent per-class probabilities (rows need not
        sum to 1).  Returns a
        :class:`~dask_labelissues.multilabel_classification.MultilabelIssues`
        from :func:`dask_labelissues.multilabel_classification.example_issues`:
        ``filter_by`` defaults to ``"prune_by_noise_rate"`` there (the
        batched method is single-label), the score of ``method`` (or
        ``return_indices_ranked_by``) ranks the issues, aggregated over the
        classes as cleanlab does, and ``adjust_pred_probs=True`` ranks by the
        score of adjusted pred_probs (cleanlab's ``rank_by_kwargs``).
        ``estimation_method`` and ``health`` do not apply (the multi-label
        dataset views are in :mod:`dask_labelissues.dataset`), and
        ``row_sum_tolerance`` and ``spill_dir`` are not used.
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
        ``"auto"`` (default): the Dask engine when ``client`` is given, a
        distributed Client is current or an input is a dask array (its
        N-long outputs are then lazy dask arrays), else ``"threads"``.
        ``"dask"`` (any Dask scheduler), ``"threads"`` (a pool of threads in
        this process: the fastest on one machine), ``"fork"`` (processes
        forked from this one; on files and stores, where the system has
        memfd, they are kept for the process's later jobs, and exit after
        a minute without one; until then they hold the files this process
        had open when they were forked, so an HDF5 file closed since stays
        locked) or ``"serial"``.
    chunk_rows
        Rows per block. Default: about 64 MB of pred_probs per block, in
        whole storage chunks; a dask array keeps its own row chunks.  The
        dask backend reads files and stores in such pieces, and when
        pass one is its only read of pred_probs, its default blocks hold up
        to 4 of them (leaving two blocks per worker thread at least), read
        one at a time (:func:`dask_labelissues.engines.blocks.dask_block_rows`).
    n_jobs
        Threads for ``backend="threads"``, processes for ``"fork"``
        (default: the cores this process may use).
    client
        A ``distributed.Client`` for ``backend="dask"``; default: Dask's
        current scheduler (the default Client if there is one).
    progress
        Progress bars on stderr.
    row_sum_tolerance
        Largest accepted ``|sum(row) - 1|``; None accepts unnormalized rows.
    spill_dir
        Where the one-machine engines (threads, fork, serial) put large
        per-row buffers
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
        As in ``cleanlab.filter.find_label_issues`` (one number as
        ``num_to_remove_per_class`` applies to every class); only with the prune
        filters (``prune_by_noise_rate``, ``prune_by_class``, ``both``), except
        ``frac_noise=1``, ``min_examples_per_class=1`` which are defaults.
    confident_joint
        With the prune filters, a (K, K) confident joint (rows the given
        label, columns the class counted) to count the issues from instead
        of the data's, as ``cleanlab.filter.find_label_issues`` takes one
        (cleanlab's ``compute_confident_joint`` makes it); the result's
        ``confident_joint`` is then this one calibrated to the labels'
        counts, as cleanlab's ``estimate_joint`` calibrates a joint given.
        ``confident_learning`` estimates its own (with a warning, as
        cleanlab); the other filters read none.  With ``multi_label``,
        ``(K, 2, 2)``: each class's joint.
    health
        Also compute the confident joint, where ``filter_by`` does not (one
        more read of pred_probs), so that the result's dataset-health views
        (:meth:`LabelIssues.health_summary` and the others) work.

    Returns
    -------
    LabelIssues
        Or, with ``multi_label=True``, ``MultilabelIssues``.

    Raises
    ------
    TypeError
        Non-integer labels, non-float or object pred_probs.
    ValueError
        Wrong shapes, N = 0, K < 2, length mismatch, or a bad value (NaN,
        inf, negative probability, row sum off 1, label outside 0..K-1); the
        message names the first offending row and its value.
    """
    if multi_label:
        return _multilabel(
            labels, pred_probs, method=method, adjust_pred_probs=adjust_pred_probs,
            estimation_method=estimation_method, health=health, filter_by=filter_by,
            return_indices_ranked_by=return_indices_ranked_by, frac_noise=frac_noise,
            num_to_remove_per_class=num_to_remove_per_class, min_examples_per_class=min_examples_per_class,
            confident_joint=confident_joint, backend=backend, client=client, chunk_rows=chunk_rows, n_jobs=n_jobs,
            progress=progress,
        )
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
    fspec = None
    if filter_requested(filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class):
        # cleanlab.filter's methods load for the jobs that run one (or are
        # given their options, which filter_spec refuses without filter_by).
        from . import filters

        fspec = filters.filter_spec(filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class)
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    lab, probs, n, k = inputs.open_pair(labels, pred_probs)
    if fspec is not None and fspec.num_to_remove_per_class is not None:
        if np.ndim(num_to_remove_per_class) == 0:  # one number: the same for every class
            fspec = replace(fspec, num_to_remove_per_class=fspec.num_to_remove_per_class * k)
        if len(fspec.num_to_remove_per_class) != k:
            raise ValueError(
                f"num_to_remove_per_class has {len(fspec.num_to_remove_per_class)} entries; "
                f"pred_probs has {k} classes, one entry per class is needed"
            )
    if confident_joint is not None and fspec is None:
        raise ValueError(
            "confident_joint is used by cleanlab.filter's prune filters: pass filter_by (the batched "
            "method estimates its thresholds from the data)"
        )
    given_joint = None if fspec is None else filters.given_joint(confident_joint, k, fspec.filter_by)
    single_read = not spec.rereads and not health and (fspec is None or not fspec.needs_joint)
    engine, backend, client = make_engine(
        backend, lab, probs, spec, single_read=single_read, chunk_rows=chunk_rows, n_jobs=n_jobs,
        client=client, progress=progress, spill_dir=spill_dir,
        warm_up=lambda s: warm_up(s, fspec, k, probs.dtype),
    )
    try:
        spec = engine.plan.spec  # with the kernel the engine chose
        if fspec is None:
            raw = run(engine, spec, health=health)
        else:
            raw = run_filter(engine, spec, fspec, probs.dtype, ranked, health=health, confident_joint=given_joint)
    finally:
        engine.close()
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
        num_label_issues=raw.num_label_issues,
    )._in_row_order(not ranked)


def _multilabel(
    labels: Any, pred_probs: Any, *, method: str, adjust_pred_probs: bool, estimation_method: str, health: bool,
    filter_by: str | None, return_indices_ranked_by: str | None, backend: str, **options: Any,
) -> MultilabelIssues:
    """``find_label_issues(..., multi_label=True)``: its arguments checked
    and handed to the multi-label job."""
    from .multilabel_classification import example_issues

    if estimation_method != "off_diagonal":
        raise ValueError(
            f"estimation_method={estimation_method!r} is the batched single-label method's; "
            "multi_label=True runs cleanlab.filter's per-class filters"
        )
    if health:
        raise ValueError(
            "health=True is for single-label data; for multi-label data, see "
            "dask_labelissues.dataset.multilabel_health_summary and the other multi-label views"
        )
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    ranked_by = method if return_indices_ranked_by == SAME_AS_METHOD else return_indices_ranked_by
    if ranked_by is not None and ranked_by != method and method != "self_confidence":
        raise ValueError(
            f"return_indices_ranked_by={return_indices_ranked_by!r} and method={method!r} disagree; "
            "with multi_label=True both name the ranking score: give one of them"
        )
    if adjust_pred_probs and ranked_by is None:
        raise ValueError(
            "adjust_pred_probs=True changes only the ranking with multi_label=True, "
            "and return_indices_ranked_by=None asks for none"
        )
    return example_issues(
        labels, pred_probs, filter_by=filter_by or "prune_by_noise_rate", return_indices_ranked_by=ranked_by,
        rank_by_kwargs={"adjust_pred_probs": True} if adjust_pred_probs else None, backend=backend, **options,
    )
