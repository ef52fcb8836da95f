"""Per-block numpy math of batched confident learning.

Every function here takes numpy blocks of rows and returns numpy arrays or
plain numbers.  Nothing here knows about Dask, processes or files: the
engines move blocks to these functions and their outputs back.

A block is a contiguous run of rows ``start:stop``.  Every per-row result
depends only on that row (and on the thresholds), never on how the rows were
split into blocks; that is what makes the output identical for any chunking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import fused
from .fused import SUB_BLOCK_BYTES

#: Margin used by confident learning for "greater or equal" comparisons.
FLOATING_POINT_COMPARISON = 1e-6
#: Lower bound applied to every confident threshold.
THRESHOLD_FLOOR = 2 * FLOATING_POINT_COMPARISON
#: Threshold of a class that never occurs as a label: no probability reaches it.
ABSENT_CLASS_THRESHOLD = 2.0
#: Lower clip used by the confidence-weighted-entropy score.
CLIP_FLOOR = 1e-6

METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
ESTIMATION_METHODS = ("off_diagonal", "off_diagonal_calibrated")
#: cleanlab.filter's ``filter_by`` methods (:mod:`dask_labelissues.filters`),
#: named here so that the API and the CLI need not load that module for a
#: job that runs none of them.
FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
PRUNE_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both")


def filter_requested(
    filter_by: str | None, frac_noise: float, num_to_remove_per_class: Any, min_examples_per_class: int
) -> bool:
    """Whether cleanlab.filter's arguments ask for one of its methods:
    ``filter_by``, or a prune option away from its default (which
    :func:`dask_labelissues.filters.filter_spec` refuses without
    ``filter_by``)."""
    return (
        filter_by is not None
        or frac_noise != 1.0
        or num_to_remove_per_class is not None
        or min_examples_per_class != 1
    )


#: Bits of a radix-select digit; 4 rounds cover a 64-bit key.
DIGIT_BITS = 16
N_DIGIT_BINS = 1 << DIGIT_BITS
N_ROUNDS = 64 // DIGIT_BITS

# Probabilities are summed per class as exact integers (fixed point, unit
# 2**-137): integer addition is associative, so the thresholds do not depend
# on how rows are grouped into blocks.
_LIMB_BITS = 24
_N_LIMBS = 7
_UNIT_BITS = _LIMB_BITS * _N_LIMBS - 31  # 137: the top limb starts at 2**30
_LIMB_SCALE = 2.0 ** (_LIMB_BITS - 31)  # top limb = floor(value / 2**7)
#: Largest probability value accepted when row sums are not checked.
MAX_VALUE = 2.0**31


@dataclass(frozen=True)
class ScoreSpec:
    """What to compute: the scoring method and how to estimate the count.

    Parameters
    ----------
    method
        ``self_confidence``, ``normalized_margin`` or
        ``confidence_weighted_entropy``, as in
        ``cleanlab.rank.get_label_quality_scores``.
    adjust_pred_probs
        Subtract the confident thresholds before scoring.
    estimation_method
        ``off_diagonal`` or ``off_diagonal_calibrated``.
    row_sum_tolerance
        Largest accepted ``|sum(row) - 1|``; ``None`` accepts unnormalized
        rows on purpose.
    kernel
        ``"auto"``, ``"numba"`` or ``"numpy"``: which implementation of the
        row reductions runs (the results are the same bits).
    """

    method: str = "self_confidence"
    adjust_pred_probs: bool = False
    estimation_method: str = "off_diagonal"
    row_sum_tolerance: float | None = 1e-3
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in ("auto", "numba", "numpy"):
            raise ValueError(f"kernel={self.kernel!r} is not one of auto, numba, numpy")
        if self.method not in METHODS:
            raise ValueError(
                f"method={self.method!r} is not one of {', '.join(METHODS)}"
            )
        if self.estimation_method not in ESTIMATION_METHODS:
            raise ValueError(
                f"estimation_method={self.estimation_method!r} is not one of "
                f"{', '.join(ESTIMATION_METHODS)}"
            )
        if self.adjust_pred_probs and self.method == "confidence_weighted_entropy":
            raise ValueError(
                "adjust_pred_probs=True is not supported for "
                "method='confidence_weighted_entropy'"
            )
        if self.row_sum_tolerance is not None and not self.row_sum_tolerance >= 0:
            raise ValueError(
                f"row_sum_tolerance must be >= 0 or None, got {self.row_sum_tolerance!r}"
            )

    @property
    def rereads(self) -> bool:
        """True when scoring needs pred_probs again once the thresholds are known.

        The adjusted normalized margin takes a maximum over threshold-shifted
        cells, which no threshold-free per-row summary can give.
        """
        return self.adjust_pred_probs and self.method == "normalized_margin"

    def record_dtype(self) -> np.dtype:
        """The per-row record kept between pass one and pass two."""
        fields: list[tuple[str, str]] = [("p_pred", "f8")]
        if not self.adjust_pred_probs:
            fields.append(("score", "f8"))
        elif self.method == "self_confidence":
            fields += [("p_label", "f8"), ("row_sum", "f8")]
        fields += [("label", "i4"), ("pred", "i4"), ("reduce", "?")]
        # Packed, not aligned: 25 bytes a row, not 32.  The records are
        # what a job keeps of every row between its passes, so their size
        # is most of its memory beyond one block: a job on 10,000,000 x 100
        # peaked 11% lower in one process and in each fork worker, and took
        # the same time to 2% more on one thread.
        return np.dtype(fields)


@dataclass(frozen=True)
class InputProblem:
    """The first bad value found in a block; ``row`` is the global row index."""

    row: int
    message: str
    kind: str = "value"  # "value" -> ValueError


@dataclass(frozen=True, eq=False)
class Planes:
    """Items stored class by class, as images' pred_probs are: ``data`` is
    ``(n, K, P)``, and item ``i * P + p`` (pixel ``p`` of image ``i``) has
    its K probabilities at ``data[i, :, p]``.  Pass one scans them in place
    (:func:`fused_records`); everything else takes :meth:`items`."""

    data: np.ndarray

    def __len__(self) -> int:
        return self.data.shape[0] * self.data.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.data.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def items(self) -> np.ndarray:
        """Items x classes: one C-ordered copy, so that each item's K values
        lie together.  float16 becomes float32 in the same copy (exactly:
        every float16 is a float32), which the compiled kernels take."""
        n, k, m = self.data.shape
        dtype = np.float32 if self.data.dtype == np.float16 else self.data.dtype
        out = np.empty((n, m, k), dtype=dtype)
        out[...] = np.moveaxis(self.data, 1, -1)
        return out.reshape(-1, k)

    def row(self, item: int) -> np.ndarray:
        """Item ``item``'s probabilities, as a 1 x K block."""
        image, p = divmod(int(item), self.data.shape[2])
        return np.asarray(self.data[image, :, p])[None, :]


#: What a negative value or a value above 1 in a row of pred_probs most
#: likely means.
LOGITS_HINT = ": this looks like logits or scores, not probabilities (apply a softmax)"


def find_problem(
    labels: np.ndarray,
    probs: np.ndarray,
    start: int,
    row_sum_tolerance: float | None,
    row_sums: np.ndarray,
    row_mins: np.ndarray,
    row_maxs: np.ndarray,
    block_labels: np.ndarray | None = None,
) -> InputProblem | None:
    """Return the first bad row of a block, or None.

    Uses per-row reductions the scan already computed, so checking costs no
    extra pass over the matrix; only the first offending row is looked at
    cell by cell, to name the bad value.  ``block_labels`` (default:
    ``labels``) are the labels whose range a bad label's hint reports,
    when ``labels`` holds only the bad row.
    """
    k = probs.shape[1]
    bad_label = (labels < 0) | (labels >= k)
    bad = bad_label | ~np.isfinite(row_sums) | ~(row_mins >= 0)
    # A row of zeros is no distribution, and values of 2**31 or more are no
    # probabilities (and would overflow the exact sums), whatever the tolerance.
    bad |= ~(row_sums > 0) | ~(row_maxs < MAX_VALUE)
    if row_sum_tolerance is not None:
        bad |= ~(np.abs(row_sums - 1.0) <= row_sum_tolerance)
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    row = start + i
    if bad_label[i]:
        hint = ""
        seen = labels if block_labels is None else block_labels
        if labels[i] == k and seen.min() >= 1:
            hint = f" (the labels here run from {seen.min()} to {seen.max()}: 1-based labels? subtract 1)"
        return InputProblem(
            row, f"labels[{row}] = {labels[i]} is not a class index in 0..{k - 1}{hint}"
        )
    values = np.asarray(probs[i])
    nonfinite = ~np.isfinite(values)
    if nonfinite.any():
        j = int(np.argmax(nonfinite))
        return InputProblem(row, f"pred_probs[{row}, {j}] = {values[j]} is not finite")
    negative = values < 0
    if negative.any():
        j = int(np.argmax(negative))
        return InputProblem(
            row, f"pred_probs[{row}, {j}] = {values[j]} is negative{LOGITS_HINT}"
        )
    if not float(values.max()) < MAX_VALUE:
        j = int(np.argmax(values))
        return InputProblem(
            row,
            f"pred_probs[{row}, {j}] = {values[j]} is too large for a probability "
            f"(limit {MAX_VALUE:g})",
        )
    if not row_sums[i] > 0:
        return InputProblem(row, f"pred_probs row {row} is all zeros")
    total = float(row_sums[i])
    if abs(total - 100.0) <= 100.0 * row_sum_tolerance:
        hint = ": percentages? divide by 100"
    elif values.max() > 1.0:
        hint = LOGITS_HINT
    else:
        hint = (" (find_label_issues(..., row_sum_tolerance=None) and find --row-sum-tolerance none "
                "accept unnormalized rows)")
    return InputProblem(
        row, f"pred_probs row {row} sums to {total!r}, off 1 by more than {row_sum_tolerance:g}{hint}"
    )


def row_records(
    labels: np.ndarray, probs: np.ndarray, spec: ScoreSpec, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass one's per-row work on a block.

    Returns ``(records, p_label, row_sums, row_mins)``.  The records hold what
    pass two needs, free of the thresholds; ``p_label`` feeds the threshold
    sums; row sums and minimums feed validation.  Rows with an out-of-range
    label get a clipped label here; the scan reports them as errors.  With
    ``out`` (``len(labels)`` records of ``spec.record_dtype()``), the
    records are written there and ``out`` is returned.
    """
    n, k = probs.shape
    y = np.clip(labels, 0, k - 1).astype(np.int64, copy=False)
    margin = spec.method == "normalized_margin" and not spec.adjust_pred_probs
    pred, p_pred, p_label_native, row_mins, row_sums, others = fused.scan_rows(
        probs, y, margin, spec.kernel
    )
    entropy = None
    if spec.method == "confidence_weighted_entropy":
        entropy = np.empty(n, dtype=np.float64)
        step = max(1, SUB_BLOCK_BYTES // (k * 8))
        for a in range(0, n, step):
            entropy[a : a + step] = _normalized_entropy(probs[a : a + step].astype(np.float64))
    # cleanlab adds the margin in the input's own dtype before taking argmax;
    # doing the same keeps the near-tie rule identical for float32 input.
    plus = p_label_native + probs.dtype.type(FLOATING_POINT_COMPARISON)
    reduce = (pred == y) | ((pred < y) & (p_pred < plus)) | ((pred > y) & (p_pred <= plus))

    rec = _records_out(n, spec, out)
    rec["p_pred"] = p_pred
    rec["label"] = y
    rec["pred"] = pred
    rec["reduce"] = reduce
    p_label = p_label_native.astype(np.float64)
    if not spec.adjust_pred_probs:
        if spec.method == "self_confidence":
            rec["score"] = p_label
        elif spec.method == "normalized_margin":
            rec["score"] = (p_label - others + 1.0) / 2.0
        else:
            rec["score"] = _cwe_score(p_label, entropy)
    elif spec.method == "self_confidence":
        rec["p_label"] = p_label
        rec["row_sum"] = row_sums
    return rec, p_label, row_sums, row_mins


def _normalized_entropy(wide: np.ndarray) -> np.ndarray:
    logs = np.zeros_like(wide)
    np.log(wide, out=logs, where=wide > 0)
    return -(wide * logs).sum(axis=1) / np.log(wide.shape[1])


def _cwe_score(p_label: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    ratio = entropy / np.maximum(p_label, CLIP_FLOOR)
    return np.log(ratio + 1.0) / np.maximum(ratio, CLIP_FLOOR)


def scores_from_records(rec: np.ndarray, thresholds: np.ndarray, spec: ScoreSpec) -> np.ndarray:
    """Pass two's score for every row of a block of records."""
    if not spec.adjust_pred_probs:
        return np.array(rec["score"], dtype=np.float64)
    if spec.method != "self_confidence":
        raise ValueError(f"scores for method={spec.method!r} with adjustment need pred_probs")
    k = thresholds.shape[0]
    t_max = thresholds.max()
    label = rec["label"]
    numerator = (rec["p_label"] - thresholds[label]) + t_max
    denominator = (rec["row_sum"] - thresholds.sum()) + k * t_max
    return numerator / denominator


def adjusted_margin_scores(
    labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Normalized margin of threshold-adjusted probabilities, from the raw block."""
    n, k = probs.shape
    y = labels.astype(np.int64, copy=False)
    out = np.empty(n, dtype=np.float64)
    t_max = thresholds.max()
    step = max(1, SUB_BLOCK_BYTES // (k * 8))
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = np.arange(b - a)
        adj = probs[a:b] - thresholds
        adj += t_max
        adj /= adj.sum(axis=1, keepdims=True)
        own = adj[rows, y[a:b]].copy()
        adj[rows, y[a:b]] = -np.inf
        out[a:b] = (own - adj.max(axis=1) + 1.0) / 2.0
    return out


def confident_off_diagonal(
    rec: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose predicted class clears its threshold, and which of them disagree.

    Returns ``(confident, off_diagonal)`` boolean arrays.
    """
    pred = rec["pred"]
    confident = rec["p_pred"] >= (thresholds - FLOATING_POINT_COMPARISON)[pred]
    return confident, confident & (pred != rec["label"])


def fixed_point_class_sums(
    labels: np.ndarray, values: np.ndarray, k: int, kernel: str = "auto"
) -> np.ndarray:
    """Per-class sums of ``values`` as exact integers, in units of 2**-137.

    ``values`` are finite, non-negative and below :data:`MAX_VALUE` (2**31).
    Each value is cut into seven 24-bit limbs, from 2**30 down to 2**-137;
    every float64 at or above 2**-85 is represented exactly (smaller ones lose
    bits below 2**-137, far below any threshold's rounding).  A limb is below
    2**24, so ``np.bincount``'s float64 sums of up to 2**29 of them are exact;
    the limb sums are then combined as Python ints.
    """
    if values.shape[0] == 0:
        return limb_totals(np.zeros((k, _N_LIMBS), dtype=np.int64))
    return limb_totals(fused.limb_sums(labels, values, k, _N_LIMBS, _LIMB_BITS, _LIMB_SCALE, kernel))


def limb_totals(sums: np.ndarray) -> np.ndarray:
    """Per-class limb sums (K, 7) combined into exact Python ints (units of 2**-137)."""
    totals = np.zeros(sums.shape[0], dtype=object)
    totals[:] = 0
    for j in range(_N_LIMBS):
        totals += sums[:, j].astype(object) << (_LIMB_BITS * (_N_LIMBS - 1 - j))
    return totals


def fused_records(
    labels: np.ndarray, probs: np.ndarray, start: int, spec: ScoreSpec, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, InputProblem | None] | None:
    """Pass one's per-row work on a block in one numba loop
    (:func:`dask_labelissues.fused.scan_records`): ``(records, class counts,
    exact class sums, first bad row)``, the same values as
    :func:`row_records`, :func:`find_problem` (the :class:`InputProblem`
    of the first bad row, or None), ``np.bincount`` and
    :func:`fixed_point_class_sums` give.  None where that loop does not
    apply (scores needing the thresholds or the whole row, or no numba).
    """
    if spec.adjust_pred_probs or spec.method == "confidence_weighted_entropy" or spec.kernel == "numpy":
        return None
    limbs = (_N_LIMBS, _LIMB_BITS, _LIMB_SCALE)
    if isinstance(probs, Planes):
        if spec.method != "self_confidence":
            return None
        rec = _records_out(labels.shape[0], spec, out)
        data = probs.data
        if data.dtype == np.float16:
            # Every float16 is a float32: one conversion, and the planes are
            # scanned in place as float32 ones are, where the items' copy
            # led to the unfused path (2,000 images of 20 x 128 x 128 took
            # 1.4 times the CPU time of float32, from half the bytes).
            data = data.astype(np.float32)
        got = fused.scan_planes(
            data, labels, rec, spec.row_sum_tolerance, MAX_VALUE, FLOATING_POINT_COMPARISON, limbs, spec.kernel,
        )
    else:
        rec = _records_out(labels.shape[0], spec, out)
        got = fused.scan_records(
            probs, labels, rec, spec.method == "normalized_margin", spec.row_sum_tolerance, MAX_VALUE,
            FLOATING_POINT_COMPARISON, limbs, spec.kernel,
        )
    if got is None:
        return None
    counts, sums, bad = got
    problem = None
    if bad >= 0:
        # The loop found the row; the message is made from it alone.
        row = probs.row(bad) if isinstance(probs, Planes) else np.asarray(probs[bad : bad + 1])
        problem = find_problem(
            labels[bad : bad + 1], row, start + bad, spec.row_sum_tolerance,
            fused.row_sums(row), row.min(axis=1), rec["p_pred"][bad : bad + 1],
            block_labels=labels,
        )
        assert problem is not None, "the fused loop and find_problem disagree on a row"
    return rec, counts, limb_totals(sums), problem


def _records_out(n: int, spec: ScoreSpec, out: np.ndarray | None) -> np.ndarray:
    """``out`` checked to hold ``n`` records of ``spec``, or a new buffer."""
    if out is None:
        return np.empty(n, dtype=spec.record_dtype())
    if out.shape != (n,) or out.dtype != spec.record_dtype():
        raise ValueError(f"out must hold {n} records of {spec.record_dtype()}, not {out.shape} of {out.dtype}")
    return out


def exact_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Correctly rounded ``sums / counts`` (sums in units of 2**-137); absent
    classes get 2.0."""
    scale = 1 << _UNIT_BITS
    out = np.empty(counts.shape[0], dtype=np.float64)
    for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist())):
        # int / int in Python is correctly rounded, so the mean is the same
        # float whatever order the exact sum was assembled in.
        out[i] = s / (c * scale) if c else ABSENT_CLASS_THRESHOLD
    return out


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Map float64 scores to uint64 keys with the same order.

    -0.0 is folded onto 0.0 first so that keys compare like the floats do,
    and every NaN onto the positive quiet NaN, which sorts after +inf as
    ``np.sort`` puts NaN last.
    """
    values = np.asarray(scores, dtype=np.float64)
    top = np.uint64(1 << 63)
    if values.size and values.min() >= 0:
        # The common case (every method's scores lie in [0, 1]): the same
        # keys as below, in one pass. -0.0 passes the test and maps to 0.0's key.
        return values.view(np.uint64) | top
    values = values + 0.0
    nan = np.isnan(values)
    if nan.any():
        values = np.where(nan, np.nan, values)
    bits = values.view(np.uint64)
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | top)


#: Keys are sorted by radix (:func:`stable_order`) from this many, where
#: numpy's stable sort starts to take longer (random scores: 6,000 rows
#: 79 us against the radix sort's 83 us, 7,000 rows 162 us against 94 us).
RADIX_MIN_ROWS = 6500


def stable_order(values: np.ndarray, max_rows: int) -> np.ndarray:
    """The stable ascending order of ``values`` (NaN last), what
    ``np.argsort(values, kind="stable")`` gives.

    Float64 or uint64 values from :data:`RADIX_MIN_ROWS` to ``max_rows``
    of them (the caller's bound on the radix sort's buffers, 40 bytes a
    row against numpy's 16) are sorted by their keys' radix
    (:func:`dask_labelissues.fused.key_order`) where numba is loaded,
    unless they are mostly in runs already (descending less than once in
    64 rows), which numpy's sort merges: on 9,000 random scores, 0.14 ms
    against numpy's 0.36 ms.
    """
    if values.dtype in (np.float64, np.uint64) and RADIX_MIN_ROWS <= values.size <= max_rows and fused.numba_loaded():
        keys = values if values.dtype == np.uint64 else score_keys(values)
        if np.count_nonzero(keys[1:] < keys[:-1]) > keys.size // 64:
            order = fused.key_order(keys)
            if order is not None:
                return order
    return np.argsort(values, kind="stable")


def digit_histogram(keys: np.ndarray, round_index: int, prefix: int) -> np.ndarray:
    """Counts of the next 16-bit digit among keys whose leading digits equal ``prefix``."""
    done_bits = DIGIT_BITS * round_index
    shift = np.uint64(64 - done_bits - DIGIT_BITS)
    if round_index:
        keys = keys[(keys >> np.uint64(64 - done_bits)) == np.uint64(prefix)]
    digits = ((keys >> shift) & np.uint64(N_DIGIT_BINS - 1)).astype(np.intp)
    return np.bincount(digits, minlength=N_DIGIT_BINS).astype(np.int64)


def occupied_bins(dense: np.ndarray) -> np.ndarray:
    """The indices of a histogram's non-zero bins, ascending (``np.flatnonzero``).

    Through a boolean mask: numpy finds the non-zero entries of a boolean
    array with vector instructions and those of an int64 one a value at a
    time, which on the 65,536 bins of a block's radix histogram took 119
    microseconds against 19 (the same indices).
    """
    return np.flatnonzero(dense != 0)


def selected_rows(keys: np.ndarray, cutoff: int, quota: int) -> np.ndarray:
    """Mask of the rows in the top set: keys below the cutoff, plus the first
    ``quota`` rows (by index) whose key equals it."""
    cut = np.uint64(cutoff)
    mask = keys < cut
    if quota > 0:
        mask[np.flatnonzero(keys == cut)[:quota]] = True
    return mask
