"""Dataset health from the confident joint: K x K math, no N-long data.

Everything here starts from the calibrated confident joint (counts of rows
by given label and class counted, scaled to the label counts) or from its
normalized form, the estimated joint distribution of given and true
labels.  The tables are plain column dictionaries; the surface
(:mod:`dask_labelissues.dataset`) turns them into DataFrames.

Rows of every table are sorted by their score; equal scores keep class
order (a stable sort), where cleanlab's quicksort leaves ties in an order
that depends on K.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The smallest row or column total divided by (cleanlab's ``EPSILON``).
EPSILON = 1e-6
#: The smallest total a confident joint is normalized by.
_TINY = 1e-100


def estimate_joint(calibrated: np.ndarray) -> np.ndarray:
    """The estimated joint distribution p(given, true): the calibrated
    confident joint over its total."""
    calibrated = np.asarray(calibrated)
    return calibrated / np.clip(float(np.sum(calibrated)), _TINY, None)


def class_quality(joint: np.ndarray, num_examples: int) -> dict[str, np.ndarray]:
    """Per class, sorted by label quality (worst first): the estimated
    issues labelled k (``Label Issues``) and truly k (``Inverse Label
    Issues``), their shares of the class (``Label Noise``, ``Inverse Label
    Noise``), and ``Label Quality Score``, p(true = k | given = k)."""
    joint = np.asarray(joint, dtype=np.float64)
    given = joint.sum(axis=1)
    true = joint.sum(axis=0)
    diag = joint.diagonal()
    given_noise = given - diag
    true_noise = true - diag
    noise = given_noise / np.clip(given, EPSILON, None)
    inverse = true_noise / np.clip(true, EPSILON, None)
    quality = 1 - noise
    order = np.argsort(quality, kind="stable")
    table = {
        "Class Index": np.arange(len(joint)),
        "Label Issues": np.round(given_noise * num_examples).astype(np.int64),
        "Inverse Label Issues": np.round(true_noise * num_examples).astype(np.int64),
        "Label Noise": noise,
        "Inverse Label Noise": inverse,
        "Label Quality Score": quality,
    }
    return {name: col[order] for name, col in table.items()}


def overlapping_classes(joint: np.ndarray, num_examples: int, asymmetric: bool = False) -> dict[str, np.ndarray]:
    """Pairs of classes by how often one is labelled as the other, most
    first.  ``asymmetric=False``: each unordered pair once (A < B), with
    p(A, B) + p(B, A); otherwise every ordered pair (given A, true B)."""
    joint = np.asarray(joint, dtype=np.float64)
    k = len(joint)
    a, b = np.nonzero(~np.eye(k, dtype=bool)) if asymmetric else np.triu_indices(k, 1)
    values = joint[a, b] if asymmetric else joint[a, b] + joint[b, a]
    order = np.argsort(-values, kind="stable")
    return {
        "Class Index A": a[order].astype(np.int64),
        "Class Index B": b[order].astype(np.int64),
        "Num Overlapping Examples": np.round(values[order] * num_examples).astype(np.int64),
        "Joint Probability": values[order],
    }


def health_score(num_examples: int, *, num_label_issues: int | None = None,
                 joint: np.ndarray | None = None) -> tuple[float, int]:
    """The share of labels estimated correct, and the estimated issues.

    From ``num_label_issues`` (the rows counted off the diagonal of the
    confident joint that are no near ties) when known: ``1 - issues / N``;
    else from the joint: its trace, with ``round(N * (1 - trace))`` issues.
    """
    if num_label_issues is not None:
        return 1.0 - num_label_issues / num_examples, int(num_label_issues)
    trace = float(np.trace(np.asarray(joint, dtype=np.float64)))
    return trace, int(np.round(num_examples * (1 - trace)))


def with_names(table: dict[str, np.ndarray], class_names: Sequence[Any] | None,
               index_columns: Sequence[str]) -> dict[str, Any]:
    """``table`` with a name column before the index columns, if named."""
    if class_names is None:
        return table
    names = list(class_names)
    out: dict[str, Any] = {}
    for column in index_columns:
        label = column.replace("Index", "Name")
        out[label] = np.array([names[i] for i in table[column]], dtype=object)
    out.update(table)
    return out
