"""Dataset health at any size: cleanlab.dataset's functions, distributed.

``health_summary``, ``rank_classes_by_label_quality``,
``find_overlapping_classes`` and ``overall_label_health_score`` take the
arguments of their namesakes in ``cleanlab.dataset`` and give the same
values.  From ``labels`` and ``pred_probs`` (any input
:func:`dask_labelissues.find_label_issues` takes), the confident joint is
computed where the job runs: pass one for the exact thresholds, one more
read of pred_probs for the joint, both tree reductions of per-block
states; only K x K counts reach this process.  From ``joint`` (with
``num_examples``) or ``confident_joint``, nothing is read (as in
cleanlab, ``joint`` is used first, then ``confident_joint``, then
``labels`` and ``pred_probs``).  A
:class:`~dask_labelissues.LabelIssues` that holds a joint has the same
views as methods.

Tables are pandas DataFrames.  Rows with equal scores are in class order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import health, inputs
from .engines import make_engine
from .pipelines import run_joint, warm_up
from .filters import calibrate
from .kernels import ScoreSpec

__all__ = [
    "common_multilabel_issues",
    "confident_joint_of",
    "find_overlapping_classes",
    "health_summary",
    "multilabel_health_summary",
    "overall_label_health_score",
    "overall_multilabel_health_score",
    "rank_classes_by_label_quality",
    "rank_classes_by_multilabel_quality",
]

#: Rows of the labels read at a time to count them.
_COUNT_ROWS = 1 << 22


def rank_classes_by_label_quality(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    class_names: Sequence[Any] | None = None,
    num_examples: int | None = None,
    joint: np.ndarray | None = None,
    confident_joint: np.ndarray | None = None,
    multi_label: bool = False,
    **engine: Any,
) -> Any:
    """Every class with its estimated label issues and label quality, the
    worst class first.

    Give one of: ``labels`` and ``pred_probs``; ``joint`` and
    ``num_examples`` (or ``labels``, whose length it is); ``confident_joint``
    (with ``labels`` it is calibrated to their class counts first).  As
    in cleanlab, the first given of ``joint``, ``confident_joint`` and
    ``pred_probs`` is used.

    Parameters
    ----------
    labels, pred_probs
        As for :func:`dask_labelissues.find_label_issues`.
    class_names
        Names of the classes in index order; adds a ``Class Name`` column.
    num_examples
        N, needed with ``joint`` only (default: the length of ``labels``).
    joint
        The estimated joint distribution p(given, true), (K, K), summing to 1.
    confident_joint
        The (K, K) confident joint, rows the given label.
    multi_label
        Not supported here yet (multi-label data has its own functions).
    **engine
        Where a job from ``labels`` and ``pred_probs`` runs: ``backend``,
        ``client``, ``chunk_rows``, ``n_jobs``, ``progress``,
        ``row_sum_tolerance``, as for ``find_label_issues``.

    Returns
    -------
    DataFrame or list of dict
        Columns ``Class Index``, ``Label Issues`` (rows labelled k that
        belong to another class), ``Inverse Label Issues`` (rows of class k
        labelled otherwise), ``Label Noise``, ``Inverse Label Noise`` (those
        as shares of the class) and ``Label Quality Score``
        (p(true = k | given = k)), ascending.
    """
    est = _estimate(labels, pred_probs, joint, confident_joint, num_examples, multi_label, engine)
    return _table(health.with_names(health.class_quality(est.joint, est.num_examples), class_names,
                                    ["Class Index"]))


def find_overlapping_classes(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    asymmetric: bool = False,
    class_names: Sequence[Any] | None = None,
    num_examples: int | None = None,
    joint: np.ndarray | None = None,
    confident_joint: np.ndarray | None = None,
    multi_label: bool = False,
    **engine: Any,
) -> Any:
    """Pairs of classes that are often labelled as one another, the most
    confused first (candidates to merge, or to define more clearly).

    Inputs as for :func:`rank_classes_by_label_quality`.  With
    ``asymmetric=False`` each pair appears once (A < B) with
    p(given A, true B) + p(given B, true A); with ``asymmetric=True``
    every ordered pair, with p(given A, true B).

    Returns
    -------
    DataFrame or list of dict
        Columns ``Class Index A``, ``Class Index B``, ``Num Overlapping
        Examples`` and ``Joint Probability`` (that count over N), descending.
    """
    est = _estimate(labels, pred_probs, joint, confident_joint, num_examples, multi_label, engine)
    table = health.overlapping_classes(est.joint, est.num_examples, asymmetric)
    return _table(health.with_names(table, class_names, ["Class Index A", "Class Index B"]))


def overall_label_health_score(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    num_examples: int | None = None,
    confident_joint: np.ndarray | None = None,
    joint: np.ndarray | None = None,
    multi_label: bool = False,
    verbose: bool = True,
    **engine: Any,
) -> float:
    """The share of labels estimated correct, between 0 and 1.

    From ``labels`` and ``pred_probs``: one minus the rows the confident
    joint counts off its diagonal (near ties the given label wins
    excluded: ``cleanlab.count.num_label_issues``) over N; as in
    cleanlab, a ``joint`` or ``confident_joint`` given with them is not
    used.  From a joint or confident joint alone: the joint's trace.  ``verbose`` prints the
    estimate on stdout.
    """
    est = _estimate(labels, pred_probs, joint, confident_joint, num_examples, multi_label, engine, data_first=True)
    score, issues = health.health_score(est.num_examples, num_label_issues=est.num_label_issues,
                                        joint=est.joint)
    if verbose:
        _say_score(score, issues, est.num_examples)
    return score


def health_summary(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    asymmetric: bool = False,
    class_names: Sequence[Any] | None = None,
    num_examples: int | None = None,
    joint: np.ndarray | None = None,
    confident_joint: np.ndarray | None = None,
    multi_label: bool = False,
    verbose: bool = True,
    **engine: Any,
) -> dict[str, Any]:
    """The three views at once, from one computation of the joint.

    Returns
    -------
    dict
        ``overall_label_health_score``, ``joint`` (K, K),
        ``classes_by_label_quality`` and ``overlapping_classes`` (as the
        functions of those names return them).  ``verbose`` prints them.
    """
    est = _estimate(labels, pred_probs, joint, confident_joint, num_examples, multi_label, engine)
    if est.num_label_issues is None and labels is not None and pred_probs is not None:
        # The tables come from the joint given, the score from the data.
        scored = _estimate(labels, pred_probs, None, None, num_examples, multi_label, engine)
        est = Estimate(est.joint, est.num_examples, scored.num_label_issues)
    return summary_of(est, asymmetric=asymmetric, class_names=class_names, verbose=verbose)


def confident_joint_of(
    labels: Any,
    pred_probs: Any,
    *,
    backend: str = "auto",
    client: Any = None,
    chunk_rows: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
    row_sum_tolerance: float | None = 1e-3,
) -> Any:
    """The calibrated confident joint of ``labels`` and ``pred_probs`` and
    cleanlab's ``count.num_label_issues``, as dataset health needs them.

    Two reads of pred_probs (the exact thresholds, then the joint), both
    tree reductions where the job runs; the arguments are those of
    :func:`dask_labelissues.find_label_issues`, and so are the input checks.
    Returns a :class:`dask_labelissues.pipelines.JointResult`.
    """
    spec = ScoreSpec("self_confidence", False, "off_diagonal", row_sum_tolerance)
    lab, probs, _, k = inputs.open_pair(labels, pred_probs)
    # make_engine refuses an unknown backend.
    engine, _, _ = make_engine(
        backend, lab, probs, spec, single_read=False, chunk_rows=chunk_rows, n_jobs=n_jobs,
        client=client, progress=progress, warm_up=lambda s: warm_up(s, None, k, probs.dtype),
    )
    try:
        return run_joint(engine, engine.plan.spec)
    finally:
        engine.close()


# -- shared by these functions and LabelIssues ---------------------------------
@dataclass(frozen=True)
class Estimate:
    """The joint, N and (where the rows were seen) num_label_issues."""

    joint: np.ndarray
    num_examples: int
    num_label_issues: int | None


def from_calibrated(calibrated: np.ndarray, num_examples: int, num_label_issues: int | None) -> Estimate:
    """An :class:`Estimate` from a job's calibrated confident joint."""
    return Estimate(health.estimate_joint(calibrated), num_examples, num_label_issues)


def summary_of(est: Estimate, *, asymmetric: bool = False, class_names: Sequence[Any] | None = None,
               verbose: bool = True, stream: Any = None) -> dict[str, Any]:
    """:func:`health_summary`'s result from an :class:`Estimate`."""
    stream = stream or sys.stdout
    classes = health.with_names(health.class_quality(est.joint, est.num_examples), class_names, ["Class Index"])
    pairs = health.with_names(health.overlapping_classes(est.joint, est.num_examples, asymmetric),
                              class_names, ["Class Index A", "Class Index B"])
    score, issues = health.health_score(est.num_examples, num_label_issues=est.num_label_issues, joint=est.joint)
    if verbose:
        print(f"Dataset health: {est.num_examples:,} examples, {len(est.joint):,} classes", file=stream)
        print("\nClasses by label quality, worst first:", file=stream)
        print(format_table(classes, 10), file=stream)
        print("\nClasses most often labelled as one another (candidates to merge):", file=stream)
        print(format_table(pairs, 10), file=stream)
        print(file=stream)
        _say_score(score, issues, est.num_examples, stream)
    return {
        "overall_label_health_score": score,
        "joint": est.joint,
        "classes_by_label_quality": _table(classes),
        "overlapping_classes": _table(pairs),
    }


def format_table(table: dict[str, np.ndarray], top: int | None = None) -> str:
    """A table's first ``top`` rows as aligned text."""
    names = list(table)
    n = len(next(iter(table.values()))) if names else 0
    rows = range(n if top is None else min(n, top))

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    cols = [[name] + [cell(table[name][i]) for i in rows] for name in names]
    widths = [max(len(c) for c in col) for col in cols]
    lines = ["  ".join(col[r].rjust(w) for col, w in zip(cols, widths)) for r in range(len(rows) + 1)]
    if top is not None and n > top:
        lines.append(f"... {n - top:,} more rows")
    return "\n".join(lines)


def _say_score(score: float, issues: int, n: int, stream: Any = None) -> None:
    print(f"About {1 - score:.0%} of the labels ({issues:,} of {n:,}) look wrong; "
          f"overall label health score {score:.2f} (1 is clean).", file=stream or sys.stdout)


def _table(table: dict[str, np.ndarray]) -> Any:
    import pandas as pd

    return pd.DataFrame(table)


def _estimate(
    labels: Any,
    pred_probs: Any,
    joint: np.ndarray | None,
    confident_joint: np.ndarray | None,
    num_examples: int | None,
    multi_label: bool,
    engine: dict[str, Any],
    data_first: bool = False,
) -> Estimate:
    """The joint to report on.  As in cleanlab, ``joint`` is used first,
    then ``confident_joint``, then ``labels`` and ``pred_probs``; with
    ``data_first`` (the overall score, which cleanlab counts from the
    data whenever it has them), ``labels`` and ``pred_probs`` first."""
    if data_first and labels is not None and pred_probs is not None:
        joint = confident_joint = None
    if multi_label:
        raise ValueError("multi_label=True is not supported by dask_labelissues.dataset yet")
    unknown = set(engine) - {"backend", "client", "chunk_rows", "n_jobs", "progress", "row_sum_tolerance"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    # cleanlab's order, so that code written for it, which may pass
    # several of these, gets the same tables.
    if joint is None and confident_joint is None and (pred_probs is None or labels is None):
        raise ValueError(
            "give one of: labels and pred_probs; joint (with num_examples or labels); confident_joint "
            "(optionally with labels, to calibrate it)"
            + ("; got pred_probs without labels" if pred_probs is not None else "")
        )
    if joint is not None:
        joint = _square(joint, "joint")
        if num_examples is None:
            if labels is None and confident_joint is None:
                raise ValueError("num_examples is needed with joint (the joint does not say how many rows it covers)")
            num_examples = (
                inputs.open_source(labels, "labels").shape[0] if labels is not None else np.sum(confident_joint)
            )
        return Estimate(joint.astype(np.float64), int(num_examples), None)
    if confident_joint is None:
        job = confident_joint_of(labels, pred_probs, **engine)
        n = int(job.per_class_count.sum())
        return from_calibrated(job.confident_joint, int(num_examples or n), job.num_label_issues)
    cj = _square(confident_joint, "confident_joint")
    if labels is not None:
        counts = label_counts(labels, len(cj))
        cj = calibrate(cj, counts)
        n = int(counts.sum())
    else:
        n = int(np.sum(cj))
    return Estimate(health.estimate_joint(cj), int(num_examples or n), None)


def _square(matrix: Any, name: str) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"{name} must be a (K, K) matrix with K >= 2, got shape {matrix.shape}")
    return matrix


def label_counts(labels: Any, k: int) -> np.ndarray:
    """Rows per class, reading ``labels`` in slices; a label outside
    0..K-1 is an error naming its row."""
    source = inputs.open_source(labels, "labels")
    n = source.shape[0]
    counts = np.zeros(k, dtype=np.int64)
    for a in range(0, n, _COUNT_ROWS):
        block = source[a : a + _COUNT_ROWS]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        if not np.issubdtype(block.dtype, np.integer):
            raise TypeError(f"labels must be integers, got {block.dtype}")
        bad = np.flatnonzero((block < 0) | (block >= k))
        if bad.size:
            raise ValueError(f"labels[{a + bad[0]}] = {block[bad[0]]} is outside 0..{k - 1}")
        counts += np.bincount(block, minlength=k)
    return counts


# -- multi-label -------------------------------------------------------------------------
def common_multilabel_issues(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    class_names: Sequence[Any] | None = None,
    confident_joint: Any = None,
    **engine: Any,
) -> Any:
    """Per class, how many examples likely have it wrongly given ("In
    Given Label") and wrongly left out ("In Suggested Label"), as
    ``cleanlab.multilabel_classification.dataset.common_multilabel_issues``.

    Parameters
    ----------
    labels, pred_probs
        As in :func:`dask_labelissues.multilabel_classification.find_label_issues`.
    class_names
        Names of the K classes, for a ``Class Name`` column.
    confident_joint
        Optional ``(K, 2, 2)`` per-class confident joints, used instead of
        those the data give, as cleanlab's multi-label filter uses them.
        (cleanlab's ``rank_classes_by_multilabel_quality`` passes the one
        it is given on as ``joint``, where it is not used, so there its
        table is the data's whatever is given.)
    **engine
        ``backend``, ``client``, ``chunk_rows``, ``n_jobs``.

    Returns
    -------
    pandas.DataFrame
        ``Class Index``, ``In Given Label``, ``In Suggested Label``, ``Num
        Examples``, ``Issue Probability`` (of N), two rows a class, most
        likely first (ties in class order, given first).
    """
    return _multilabel_views(labels, pred_probs, class_names, confident_joint, engine)["common_multilabel_issues"]


def rank_classes_by_multilabel_quality(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    class_names: Sequence[Any] | None = None,
    joint: Any = None,
    confident_joint: Any = None,
    **engine: Any,
) -> Any:
    """The classes, worst label quality first: per class its ``Label
    Issues`` (given, likely wrong), ``Inverse Label Issues`` (left out,
    likely present), both as shares of N (``Label Noise``, ``Inverse Label
    Noise``) and ``Label Quality Score`` = 1 - Label Noise, as
    cleanlab's function of that name (counts exact; cleanlab's go through
    the share and may lose one).  Arguments as
    :func:`common_multilabel_issues`."""
    if joint is not None:
        raise NotImplementedError("joint is not supported: each class's joint is computed")
    return _multilabel_views(labels, pred_probs, class_names, confident_joint, engine)["classes_by_multilabel_quality"]


def overall_multilabel_health_score(
    labels: Any = None, pred_probs: Any = None, *, confident_joint: Any = None, **engine: Any,
) -> float:
    """1 minus the share of examples with a label issue in any class.

    Parameters
    ----------
    labels, pred_probs, confident_joint, **engine
        As in :func:`common_multilabel_issues`.

    Returns
    -------
    float
    """
    return _multilabel_views(labels, pred_probs, None, confident_joint, engine)["overall_multilabel_health_score"]


def multilabel_health_summary(
    labels: Any = None,
    pred_probs: Any = None,
    *,
    class_names: Sequence[Any] | None = None,
    num_examples: int | None = None,
    confident_joint: Any = None,
    verbose: bool = True,
    **engine: Any,
) -> dict[str, Any]:
    """The three multi-label views at once, from one run of every class
    (cleanlab runs them three times).

    Returns
    -------
    dict
        ``overall_multilabel_health_score``, ``classes_by_multilabel_quality``
        and ``common_multilabel_issues``; ``verbose`` prints them.
    """
    views = _multilabel_views(labels, pred_probs, class_names, confident_joint, engine)
    if num_examples is not None and num_examples != views["num_examples"]:
        raise ValueError(f"num_examples={num_examples} but the data have {views['num_examples']} examples")
    if verbose:
        n = views.pop("num_examples")
        print(f"Multi-label dataset health: {n:,} examples, {views['num_classes']:,} classes")
        print("\nClasses by label quality, worst first:")
        print(views["classes_by_multilabel_quality"].head(10).to_string(index=False))
        print("\nMost common issues (a class wrongly given, or wrongly left out):")
        print(views["common_multilabel_issues"].head(10).to_string(index=False))
        score = views["overall_multilabel_health_score"]
        print(f"\nAbout {1 - score:.0%} of the examples have a label that looks wrong; "
              f"overall multi-label health score {score:.2f} (1 is clean).")
    return {key: views[key] for key in
            ("overall_multilabel_health_score", "classes_by_multilabel_quality", "common_multilabel_issues")}


def _multilabel_views(labels: Any, pred_probs: Any, class_names: Sequence[Any] | None, confident_joint: Any,
                      engine: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from . import multilabel_classification as ml

    unknown = set(engine) - {"backend", "client", "chunk_rows", "n_jobs"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    # Opened once: label lists become a matrix, which both steps then read.
    labels, pred_probs, n, k = ml.open_inputs(labels, pred_probs)
    issues = ml.find_multilabel_issues_per_class(labels, pred_probs, confident_joint=confident_joint, **engine)
    given, left_out = flagged_by_class(issues, labels, pred_probs)
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} names for {k} classes")
    rows: dict[str, list[Any]] = {"Class Index": [], "In Given Label": [], "In Suggested Label": [],
                                  "Num Examples": [], "Issue Probability": []}
    if class_names is not None:
        rows = {"Class Name": [], **rows}
    for c in range(k):
        for in_given, count in ((True, given[c]), (False, left_out[c])):
            if class_names is not None:
                rows["Class Name"].append(class_names[c])
            rows["Class Index"].append(c)
            rows["In Given Label"].append(in_given)
            rows["In Suggested Label"].append(not in_given)
            rows["Num Examples"].append(int(count))
            rows["Issue Probability"].append(int(count) / n)
    common = pd.DataFrame(rows).sort_values(by="Issue Probability", ascending=False, kind="stable")
    classes = {"Class Index": np.arange(k), "Label Issues": given, "Inverse Label Issues": left_out,
               "Label Noise": given / n, "Inverse Label Noise": left_out / n, "Label Quality Score": 1 - given / n}
    if class_names is not None:
        classes = {"Class Name": list(class_names), **classes}
    ranked = pd.DataFrame(classes).sort_values(by="Label Quality Score", kind="stable")
    return {
        "common_multilabel_issues": common.reset_index(drop=True),
        "classes_by_multilabel_quality": ranked.reset_index(drop=True),
        "overall_multilabel_health_score": float(1 - issues.any(axis=1).sum() / n),
        "num_examples": n,
        "num_classes": k,
    }


def flagged_by_class(issues: np.ndarray, labels: Any, pred_probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the flagged examples where the class is given, and
    where it is left out.

    Parameters
    ----------
    issues
        ``(N, K)`` bool, as
        :func:`dask_labelissues.multilabel_classification.find_multilabel_issues_per_class`
        returns it.
    labels, pred_probs
        The data it was found in.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(K,)`` int64 each.
    """
    from . import multilabel_classification as ml

    lab, _, n, k = ml.open_inputs(labels, pred_probs)
    given = np.zeros(k, dtype=np.int64)
    for a in range(0, n, _COUNT_ROWS):
        present = inputs.to_numpy(lab[a : a + _COUNT_ROWS]).astype(bool)
        given += (present & issues[a : a + _COUNT_ROWS]).sum(axis=0)
    return given, issues.sum(axis=0) - given
