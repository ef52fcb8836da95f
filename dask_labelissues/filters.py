"""The confident-learning filters of ``cleanlab.filter.find_label_issues``, as
block math and small-matrix math.

Nothing here knows about Dask or processes.  The filters need a second read
of pred_probs, once the thresholds are known, which builds two things per
block (:func:`joint_block`):

* the block's part of the confident joint (K x K counts, kept sparse), and
* a per-row *joint record*: the class each row is confidently counted in,
  its own-class probability and, for ``prune_by_noise_rate``, the ``M``
  classes with the largest probabilities besides the given label with
  their margins, plus an upper bound on the margin of every class not kept.

Everything after that works on those records: the K x K calibration on the
client (:func:`prune_counts`), then per-group selections of the n best rows
(:class:`GroupTop`: a (given, predicted) cell, a class, or the whole data)
as tree reductions of per-block candidates, so no process gathers N rows.
The noise-rate selection of a cell is exact when its n-th margin is above
every bound of the rows that do not keep the cell's class.  Cells where
that fails (flat predictions, or a cell asking for more rows than have a
positive margin, as with many small classes: see :meth:`GroupTop.uncertain`)
are recomputed exactly from pred_probs by :func:`exact_cells_block`, a
third read.  With at most ``CANDIDATES + 1`` classes every row keeps every
class and two reads always suffice.

Ties are broken by row index everywhere, where cleanlab's unstable sorts
break them arbitrarily.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import fused, kernels
from .aggregations import Aggregation, each, register
from .kernels import FILTERS, FLOATING_POINT_COMPARISON, PRUNE_FILTERS, filter_requested


#: Candidate classes kept per row for the noise-rate selection.
CANDIDATES = 8
#: cleanlab's divisor floor when calibrating rows of the confident joint.
_TINY = 1e-100


@dataclass(frozen=True)
class FilterSpec:
    """Which cleanlab filter to run, with its options.

    Parameters
    ----------
    filter_by
        One of :data:`FILTERS`, with the meaning it has in
        ``cleanlab.filter.find_label_issues``.
    frac_noise
        Keep only this fraction of the estimated noise (prune filters).
    num_to_remove_per_class
        Issues to remove per class (prune filters), or None.
    min_examples_per_class
        Leave at least this many rows in every class (prune filters).
    candidates
        Candidate classes kept per row for the noise-rate selection; a cell
        the kept candidates cannot decide is recomputed from pred_probs.
    """

    filter_by: str
    frac_noise: float = 1.0
    num_to_remove_per_class: tuple[int, ...] | None = None
    min_examples_per_class: int = 1
    candidates: int = CANDIDATES

    def __post_init__(self) -> None:
        if self.filter_by not in FILTERS:
            raise ValueError(f"filter_by={self.filter_by!r} is not one of {', '.join(FILTERS)}")
        if not 0.0 <= self.frac_noise <= 1.0:
            raise ValueError(f"frac_noise must be in [0, 1], got {self.frac_noise!r}")
        if self.min_examples_per_class < 0:
            raise ValueError(
                f"min_examples_per_class must be >= 0, got {self.min_examples_per_class!r}"
            )
        if self.num_to_remove_per_class is not None and self.filter_by not in PRUNE_FILTERS:
            raise ValueError(
                f"num_to_remove_per_class is not supported with filter_by={self.filter_by!r}: it works only "
                f"with filter_by in {', '.join(PRUNE_FILTERS)}"
            )
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    @property
    def by_noise_rate(self) -> bool:
        return self.filter_by in ("prune_by_noise_rate", "both")

    @property
    def by_class(self) -> bool:
        return self.filter_by in ("prune_by_class", "both")

    @property
    def needs_joint(self) -> bool:
        """False only for predicted_neq_given, which pass one's records decide."""
        return self.filter_by != "predicted_neq_given"

    @property
    def mask_reads_joint(self) -> bool:
        """:func:`mask_block` reads each row's joint record (only
        confident_learning's mask is the joint's off-diagonal rows)."""
        return self.filter_by == "confident_learning"

    @property
    def selects(self) -> bool:
        """Rows are selected by counts the whole confident joint decides;
        else each row's own joint record decides its flag
        (confident_learning) or its pass-one record does
        (predicted_neq_given)."""
        return self.by_noise_rate or self.by_class or self.lowest_field is not None

    @property
    def lowest_field(self) -> str | None:
        """The joint record field the low_* filters take their lowest rows
        by; None for the others."""
        return {"low_self_confidence": "p_label", "low_normalized_margin": "margin_score"}.get(self.filter_by)

    def kept_candidates(self, k: int) -> int:
        return min(self.candidates, k - 1) if self.by_noise_rate else 0

    def joint_dtype(self, k: int, native: np.dtype) -> np.dtype:
        """The per-row record of the second read."""
        m = self.kept_candidates(k)
        fields: list[tuple] = [("guess", "i4"), ("p_label", native)]
        if self.filter_by == "low_normalized_margin":
            fields.append(("margin_score", "f8"))
        if m:
            fields += [("cand", "i4", (m,)), ("margin", native, (m,)), ("bound", native)]
        return np.dtype(fields, align=True)


# -- the second read ---------------------------------------------------------
#: Selections first look below this key (a positive margin, a score under
#: one half) and skip everything above it when enough rows lie below.
SPLIT = {"margin": 0.0, "p_label": 0.5, "margin_score": 0.5}


@dataclass(eq=False)
class JointState:
    """The confident joint, sparse: counts of (given label, counted class)
    codes ``given * K + counted``; the rows counted off the diagonal that
    are no near ties (cleanlab's ``num_label_issues``); and how many rows
    lie below each selection's split (see :data:`SPLIT`): kept candidates
    with a positive margin per cell (sparse codes, as the joint), rows with
    ``p_label`` under 1/2 per class, rows with ``margin_score`` under 1/2."""

    codes: np.ndarray  # int64, ascending, unique
    counts: np.ndarray  # int64
    off_diagonal: int = 0
    positive_codes: np.ndarray | None = None
    positive_counts: np.ndarray | None = None
    low_label: np.ndarray | None = None  # int64 (K,)
    low_margin_score: int = 0
    #: Where asked for (:func:`key_counts`): (K x (K - 1), KEY_BUCKETS + 1),
    #: each off-diagonal cell's candidates counted by their key's bucket.
    key_counts: np.ndarray | None = None

    @classmethod
    def combine(cls, states: Sequence["JointState"]) -> "JointState":
        codes, counts = _sparse_sum([s.codes for s in states], [s.counts for s in states])
        pos_codes, pos_counts = _sparse_sum(
            [s.positive_codes for s in states], [s.positive_counts for s in states]
        )
        keyed = [s.key_counts for s in states if s.key_counts is not None]
        return cls(
            codes,
            counts,
            sum(s.off_diagonal for s in states),
            pos_codes,
            pos_counts,
            np.sum([s.low_label for s in states], axis=0, dtype=np.int64),
            sum(s.low_margin_score for s in states),
            np.sum(keyed, axis=0, dtype=np.int64) if keyed else None,
        )

    def matrix(self, k: int) -> np.ndarray:
        """The (K, K) confident joint, diagonal at least 1 as in cleanlab.

        Laid out column-major, as cleanlab's (a transposed confusion
        matrix): the calibration's float sums run in memory order, and a
        different order can move a total by an ulp and a rounding by one.
        """
        counted_by_given = np.zeros((k, k), dtype=np.int64)
        given, counted = np.divmod(self.codes, k)
        counted_by_given[counted, given] = self.counts
        cj = counted_by_given.T
        np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
        return cj

    def positives(self, codes: np.ndarray) -> np.ndarray:
        """Kept candidates with a positive margin in each cell of ``codes``."""
        if self.positive_codes.size == 0:
            return np.zeros(codes.size, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.positive_codes, codes), self.positive_codes.size - 1)
        return np.where(self.positive_codes[pos] == codes, self.positive_counts[pos], 0)


def filter_spec(
    filter_by: str | None,
    frac_noise: float,
    num_to_remove_per_class: Any,
    min_examples_per_class: int,
) -> FilterSpec | None:
    """A :class:`FilterSpec` from ``cleanlab.filter.find_label_issues``'s
    arguments, checked; None for no filter (``filter_by=None``), which
    takes none of the prune options.  One number as
    ``num_to_remove_per_class`` stays one entry: the caller, which knows K,
    repeats it."""
    if filter_by is None:
        if filter_requested(filter_by, frac_noise, num_to_remove_per_class, min_examples_per_class):
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
                    stacklevel=caller_stacklevel(),
                )
    remove = None
    if num_to_remove_per_class is not None:
        remove = tuple(whole_count(x, f"num_to_remove_per_class[{i}]") for i, x in
                       enumerate(np.asarray(num_to_remove_per_class).ravel().tolist()))
    minimum = whole_count(min_examples_per_class, "min_examples_per_class")
    return FilterSpec(filter_by, float(frac_noise), remove, minimum)


def whole_count(value: Any, name: str) -> int:
    """A count given as a number: a whole one, not below zero."""
    if isinstance(value, bool) or not float(value).is_integer() or value < 0:
        raise ValueError(f"{name} = {value!r} is not a whole number >= 0")
    return int(value)


def _sparse_sum(codes: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    codes_all = np.concatenate(codes)
    unique, where = np.unique(codes_all, return_inverse=True)
    summed = np.bincount(where, weights=np.concatenate(counts), minlength=unique.size)
    return unique.astype(np.int64), summed.astype(np.int64)


#: Most (given, other) cells counted densely, with a bincount, rather than
#: by sorting a block's codes (a K x K table would be larger than a block).
DENSE_CELLS = 1 << 16


def _sparse_counts(codes: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct codes in ``0..cells-1`` and how often each occurs."""
    if cells <= DENSE_CELLS:
        dense = np.bincount(codes, minlength=cells)
        unique = kernels.occupied_bins(dense)
        return unique.astype(np.int64), dense[unique].astype(np.int64)
    unique, counts = np.unique(codes, return_counts=True)
    return unique.astype(np.int64), counts.astype(np.int64)


def joint_block(
    rec: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    fspec: FilterSpec,
    kernel: str = "auto",
    with_joint: bool = True,
) -> tuple[np.ndarray, JointState | None]:
    """The second read of a block: joint records and the block's confident joint.

    A row is counted in the class whose probability clears its threshold
    (``p >= t - 1e-6``); when several do, in the row's argmax class (even if
    that one does not clear its own); when none does, nowhere.  With
    ``with_joint=False``, the records alone (the joint is None): what the
    stages after the joint's own read make them again for.
    """
    probs = np.asarray(probs)
    n, k = probs.shape
    m = fspec.kept_candidates(k)
    out = np.empty(n, dtype=fspec.joint_dtype(k, probs.dtype))
    y = rec["label"].astype(np.intp)
    cut = thresholds - FLOATING_POINT_COMPARISON
    cells = np.zeros((2, k * k), dtype=np.int64) if with_joint and k * k <= DENSE_CELLS else None
    guess, max_other, cand, margin, bound = fused.joint_rows(probs, y, rec["pred"], cut, m, kernel, cells)
    out["guess"] = guess
    own = probs[np.arange(n), y]
    out["p_label"] = own
    if fspec.filter_by == "low_normalized_margin":
        # cleanlab's arithmetic, in the input's dtype.
        out["margin_score"] = (own - max_other + 1) / 2
    if m:
        out["cand"] = cand
        out["margin"] = margin
        out["bound"] = bound
    if not with_joint:
        return out, None
    off = (out["guess"] >= 0) & (out["guess"] != y)
    if cells is not None:
        codes, pos_codes = np.flatnonzero(cells[0]), np.flatnonzero(cells[1])
        counts, pos_counts = cells[0, codes], cells[1, pos_codes]
    else:
        counted = out["guess"] >= 0
        codes, counts = _sparse_counts(y[counted] * k + out["guess"][counted], k * k)
        if m:
            positive = out["margin"] > 0
            rows, slots = np.nonzero(positive)
            pos_codes, pos_counts = _sparse_counts(y[rows] * k + out["cand"][rows, slots], k * k)
        else:
            pos_codes = pos_counts = np.zeros(0, dtype=np.int64)
    low_label = np.bincount(
        y, weights=out["p_label"] < SPLIT["p_label"], minlength=k
    ).astype(np.int64)
    low_margin = 0
    if fspec.filter_by == "low_normalized_margin":
        low_margin = int(np.count_nonzero(out["margin_score"] < SPLIT["margin_score"]))
    state = JointState(
        codes,
        counts,
        int(np.count_nonzero(off & ~rec["reduce"])),
        pos_codes,
        pos_counts,
        low_label,
        low_margin,
    )
    return out, state


def joint_counts_block(
    rec: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, kernel: str = "auto"
) -> JointState:
    """A block's part of the confident joint alone, for dataset health:
    :func:`joint_block` with the smallest record, which is dropped."""
    return joint_block(rec, probs, thresholds, COUNTS_ONLY, kernel)[1]


#: The filter whose joint record is smallest (no candidates, no margins).
COUNTS_ONLY = FilterSpec("confident_learning")


# -- selections: the n best rows of each group -------------------------------
#: The most candidates of a block whose keys are sorted by radix
#: (:func:`dask_labelissues.kernels.stable_order`; its buffers take 40
#: bytes a row): 700,000 random keys took 34 ms against 84 ms for numpy's
#: stable sort.
RADIX_MAX_ROWS = 1 << 22


def group_dtype(n_groups: int) -> np.dtype:
    """The dtype of a selection's group numbers: 4 bytes a candidate where
    they fit (K x K cells up to K = 46,340), not 8."""
    return np.dtype(np.int32 if n_groups <= np.iinfo(np.int32).max else np.int64)


def rows_dtype(rows: np.ndarray) -> np.dtype:
    """The dtype a selection holds ``rows`` (row numbers) in: 4 bytes a
    candidate where every one is below 2**31, else 8."""
    return np.dtype(np.int32 if rows.size == 0 or int(rows.max()) <= np.iinfo(np.int32).max else np.int64)


def key_dtype(native: np.dtype) -> np.dtype:
    """The dtype of keys made from values of ``native`` dtype: float32
    values stay float32 (exact: a key is such a value negated), any other
    float64.  A multi-label job of 2,000,000 x 100 keeps about 18,000,000
    candidates, held about three times over at a merge's peak."""
    native = np.dtype(native)
    # Any byte order: a negated value is made in the machine's own.
    return np.dtype(np.float32 if native.kind == "f" and native.itemsize == 4 else np.float64)


@dataclass(eq=False)
class GroupTop:
    """The ``limits[g]`` rows with the smallest (key, index) in each group g.

    ``bound`` is, per class, the largest margin any row of that class may
    have in a cell whose class it did not keep (noise-rate selection only;
    -inf means every row kept every class).
    """

    group: np.ndarray  # group_dtype(limits.size)
    key: np.ndarray  # float64, or float32 (key_dtype)
    index: np.ndarray  # rows_dtype: int32 where the rows allow, else int64
    limits: np.ndarray  # int64, per group
    bound: np.ndarray | None = None  # float64 (K,)

    def __sizeof__(self) -> int:
        # What Dask and the local reductions count a state as: its arrays
        # (the limits and bounds are shared in one process, not once moved).
        arrays = (self.group, self.key, self.index, self.limits, self.bound)
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def chunk(
        cls,
        group: np.ndarray,
        key: np.ndarray,
        index: np.ndarray,
        limits: np.ndarray,
        bound: np.ndarray | None = None,
    ) -> "GroupTop":
        in_row_order = index.size < 2 or bool((index[1:] >= index[:-1]).all())
        return cls._top(group, key, index, limits, bound, in_row_order)

    @classmethod
    def _top(
        cls, group: np.ndarray, key: np.ndarray, index: np.ndarray, limits: np.ndarray,
        bound: np.ndarray | None, in_row_order: bool,
    ) -> "GroupTop":
        if in_row_order:
            # Equal (group, key) pairs are then in index order already: two
            # stable sorts (the group's is a radix sort on small ints)
            # instead of lexsort's three, which took most of a multi-label
            # selection's merge.
            order = kernels.stable_order(key.astype(np.float64, copy=False), RADIX_MAX_ROWS)
            small = group.dtype if limits.size > np.iinfo(np.uint16).max else np.uint16
            order = order[np.argsort(group[order].astype(small, copy=False), kind="stable")]
        else:
            order = np.lexsort((index, key, group))
        group, key, index = group[order], key[order], index[order]
        # Each row's place in its group, from the groups' sizes: a
        # searchsorted of every row took 7 times as long.
        sizes = np.bincount(group, minlength=limits.size)
        keep = np.arange(group.size) - (np.cumsum(sizes) - sizes)[group] < limits[group]
        index = index[keep]
        return cls(
            group[keep].astype(group_dtype(limits.size), copy=False), key[keep],
            index.astype(rows_dtype(index), copy=False), limits, bound,
        )

    @classmethod
    def combine(cls, states: Sequence["GroupTop"]) -> "GroupTop":
        bounds = [s.bound for s in states if s.bound is not None]
        limits = states[0].limits
        bound = np.maximum.reduce(bounds) if bounds else None
        # Empty states (a block with no candidates) are left out: their
        # float64 keys would make every key float64.
        states = [s for s in states if s.index.size] or list(states[:1])
        # States of consecutive row ranges, in order (as every engine merges
        # blocks' states), hold equal (group, key) pairs in index order once
        # concatenated.
        spans = [(s.index.min(), s.index.max()) for s in states if s.index.size]
        in_row_order = all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
        group = np.concatenate([s.group for s in states]).astype(group_dtype(limits.size), copy=False)
        key = np.concatenate([s.key for s in states])
        index = np.concatenate([s.index for s in states])
        if in_row_order:
            # Each state is sorted by (group, key) already: a merge that
            # reads only the rows it keeps.
            edges = np.cumsum([0] + [s.index.size for s in states])
            kept = fused.merge_top(group, key, index, edges, limits)
            if kept is not None:
                return cls(*kept, limits, bound)
        return cls._top(group, key, index, limits, bound, in_row_order)

    def found(self) -> np.ndarray:
        """Rows kept per group."""
        return np.bincount(self.group, minlength=self.limits.size)

    def uncertain(self, group_class: np.ndarray) -> np.ndarray:
        """Groups (cells) whose selection the kept candidates do not decide.

        A cell of given class k is decided when it has its n rows and the
        n-th margin is above the bound of class k (no row that did not keep
        the cell's class can reach it), or when no such row exists.
        """
        found = self.found()
        last = np.full(self.limits.size, np.inf)
        has = found > 0
        ends = np.cumsum(found)[has] - 1
        last[has] = self.key[ends]  # key = -margin; the n-th best is the last kept
        bound = self.bound[group_class]
        decided = (bound == -np.inf) | ((found == self.limits) & (-last > bound))
        return np.flatnonzero(~decided)

    def replace_groups(self, groups: np.ndarray, other: "GroupTop") -> "GroupTop":
        """These selections, with ``groups`` taken from ``other`` instead."""
        drop = np.isin(self.group, groups)
        take = np.isin(other.group, groups)
        return GroupTop(
            np.concatenate([self.group[~drop], other.group[take]]).astype(self.group.dtype, copy=False),
            np.concatenate([self.key[~drop], other.key[take]]),
            np.concatenate([self.index[~drop], other.index[take]]),
            self.limits,
            self.bound,
        )

    def rows(self) -> np.ndarray:
        """The selected rows of every group, ascending, without repeats."""
        # A sort and a comparison of neighbours, not np.unique: numpy 2.4
        # hashes integers first, which took 10 to 18 times as long on 60,000
        # to 3,000,000 rows (1.2 s of a 2,000,000 x 100 multi-label job).
        rows = np.sort(self.index)
        if rows.size > 1:
            rows = rows[np.concatenate(([True], rows[1:] != rows[:-1]))]
        return rows


#: The confident joint's reduction.
JOINT = register(Aggregation("joint", JointState.combine))
#: The kept rows of each group of a filter.
GROUP_TOP = register(Aggregation("group_top", GroupTop.combine))
#: The kept rows of each selection a filter makes
#: (:func:`selection_candidates`), side by side.
SELECTIONS = each(GROUP_TOP, optional=True)


@dataclass(frozen=True, eq=False)
class Cells:
    """The (given, other) cells a noise-rate selection prunes from, and how many."""

    given: np.ndarray  # int64
    other: np.ndarray  # int64
    limits: np.ndarray  # int64
    k: int
    #: The cell has at least ``limits`` kept candidates with a positive
    #: margin, so its choice has a positive margin too.
    enough: np.ndarray | None = None

    @property
    def codes(self) -> np.ndarray:
        return self.given * self.k + self.other

    def subset(self, groups: np.ndarray) -> "Cells":
        enough = None if self.enough is None else self.enough[groups]
        return Cells(self.given[groups], self.other[groups], self.limits[groups], self.k, enough)


def _empty_top(limits: np.ndarray, bound: np.ndarray | None = None) -> GroupTop:
    return GroupTop(
        np.zeros(0, dtype=group_dtype(limits.size)), np.zeros(0), np.zeros(0, dtype=np.int64), limits, bound
    )


def noise_rate_block(joint: np.ndarray, rec: np.ndarray, start: int, cells: Cells) -> GroupTop:
    """A block's candidates for each cell, from the kept classes and margins."""
    k = cells.k
    y = rec["label"].astype(np.int64)
    bound = np.full(k, -np.inf)
    if joint.size:
        np.maximum.at(bound, y, joint["bound"].astype(np.float64))
    if joint.size == 0 or cells.limits.size == 0:
        return _empty_top(cells.limits, bound)
    rows = np.flatnonzero(joint["cand"][:, 0] >= 0)  # rows that kept candidates
    codes = y[rows, None] * k + joint["cand"][rows]  # (rows, m)
    sorted_codes = cells.codes
    if k * k <= DENSE_CELLS:
        # Each (given, other) pair's cell by table: a search of every pair
        # among the cells took most of this function's time.
        lookup = np.full(k * k, -1, dtype=np.int64)
        lookup[sorted_codes] = np.arange(sorted_codes.size)
        group = lookup[codes]
    else:
        group = np.minimum(np.searchsorted(sorted_codes, codes), sorted_codes.size - 1)
        group[sorted_codes[group] != codes] = -1
    margin = joint["margin"][rows]
    # Where enough positive margins exist, nothing else can be chosen.
    hit = group >= 0
    keep = hit & ((margin > SPLIT["margin"]) | ~cells.enough[np.where(hit, group, 0)])
    at, slot = np.nonzero(keep)  # pairs in row order, then slot order
    key = -margin[at, slot].astype(key_dtype(margin.dtype), copy=False)
    return GroupTop.chunk(group[at, slot], key, rows[at] + start, cells.limits, bound)


# -- noise-rate selections by buckets of the keys ----------------------------
#: Equal buckets of the keys over [-1, 1] (a key is minus a margin of
#: probabilities), and one more for NaN and keys above 1.
KEY_BUCKETS = 512


def key_bucket(key: np.ndarray) -> np.ndarray:
    """Each key's bucket: never lower for a larger key (NaN last, -0.0 with
    0.0), so a bucket's keys are all below the next bucket's."""
    b = np.floor((np.asarray(key, dtype=np.float64) + 1.0) * (KEY_BUCKETS / 2))
    return np.clip(np.nan_to_num(b, nan=KEY_BUCKETS, posinf=KEY_BUCKETS, neginf=0), 0, KEY_BUCKETS).astype(np.intp)


def key_counts(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A block's (row, other class) pairs counted by (given, other) cell and
    key bucket: ``(K x (K - 1), KEY_BUCKETS + 1)`` int32, the off-diagonal
    cells (:func:`off_diagonal_cells`).  A pair's key is minus its margin
    ``p[other] - p[given]`` in the input's dtype, as the joint's records
    hold it for problems whose rows keep every other class.  A block's
    counts travel to the merges (410 kB a block for 100 binary problems at
    int32), so they take 4 bytes; merged ones are int64."""
    probs = np.asarray(probs)
    if probs.dtype in (np.float32, np.float64):
        counts = fused.pair_buckets(probs, labels, KEY_BUCKETS)
        if counts is not None:
            return counts
    n, k = probs.shape
    codes, key = _pairs(probs, labels)
    cells = off_diagonal_cells(*np.divmod(codes, k), k)
    slots = cells * (KEY_BUCKETS + 1) + key_bucket(key)
    counts = np.bincount(slots.ravel(), minlength=k * (k - 1) * (KEY_BUCKETS + 1))
    return counts.reshape(k * (k - 1), -1).astype(np.int32)


def off_diagonal_cells(given: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """The index of each (given, other != given) cell among the K x (K - 1)
    off-diagonal ones, row by row."""
    return given * (k - 1) + np.where(other < given, other, other - 1)


def _pairs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cell codes, keys)`` of every (row, other class) pair, rows x (K - 1)."""
    n, k = probs.shape
    y = np.asarray(labels).astype(np.int64)
    own = probs[np.arange(n), y]
    other = np.arange(k)[None, :] != y[:, None]
    key = -(probs - own[:, None])[other].reshape(n, k - 1)
    codes = (y[:, None] * k + np.arange(k)[None, :])[other].reshape(n, k - 1)
    return codes, key


@dataclass(frozen=True, eq=False)
class BucketCut:
    """Noise-rate selections decided by the buckets of their keys.

    Of each cell g, every candidate in a bucket below ``low[g]`` is chosen,
    and of bucket ``low[g]`` the ``need[g]`` smallest (key, row); once
    those are known (:meth:`with_last`), the last of them is ``(key[g],
    row[g])``.  Only the boundary buckets' candidates are ever gathered, so
    the selection's memory does not grow with the rows it chooses.  Exact
    where every row keeps every other class as a candidate (the joint's
    bound is then -inf: no cell is undecided).
    """

    cells: Cells
    low: np.ndarray  # int64 (G,); KEY_BUCKETS + 1: the whole cell is chosen
    need: np.ndarray  # int64 (G,)
    key: np.ndarray | None = None  # (G,) the last chosen key of bucket low[g]
    row: np.ndarray | None = None  # int64 (G,); -1 where need[g] is 0

    @classmethod
    def plan(cls, cells: Cells, counts: np.ndarray) -> "BucketCut":
        """The cut of every cell from the merged :func:`key_counts`."""
        per_cell = counts[off_diagonal_cells(cells.given, cells.other, cells.k)].astype(np.int64)
        below = np.cumsum(per_cell, axis=1)
        limits = cells.limits
        whole = below[:, -1] <= limits
        low = np.where(whole, KEY_BUCKETS + 1, (below < limits[:, None]).sum(axis=1))
        before = np.where(low > 0, below[np.arange(limits.size), np.maximum(low - 1, 0)], 0)
        need = np.where(whole, 0, limits - before).astype(np.int64)
        return cls(cells, low.astype(np.int64), need)

    def with_last(self, top: GroupTop) -> "BucketCut":
        """The cut once the boundary buckets' chosen rows are known."""
        found = top.found()
        if not np.array_equal(found, self.need):
            raise RuntimeError("a boundary bucket held fewer candidates than its counts")
        key = np.full(self.need.size, -np.inf, dtype=top.key.dtype)
        row = np.full(self.need.size, -1, dtype=np.int64)
        has = found > 0
        ends = np.cumsum(found)[has] - 1
        key[has], row[has] = top.key[ends], top.index[ends]
        return replace(self, key=key, row=row)

    def boundary(self, probs: np.ndarray, labels: np.ndarray, start: int) -> GroupTop:
        """A block's candidates in each cell's boundary bucket, the rows it
        still needs of them kept, in place of :func:`noise_rate_block`'s
        candidates, from the block's pred_probs and labels alone (no joint
        records: every row keeps every other class).  Every pair is a
        candidate here, as the buckets counted them: a cell whose limit its
        positive margins meet takes its rows among those anyway."""
        probs = np.asarray(probs)
        n, k = probs.shape
        bound = np.full(k, -np.inf)
        if n == 0 or self.low.size == 0:
            return _empty_top(self.need, bound)
        groups = self._groups(k)
        found = None
        if probs.dtype in (np.float32, np.float64):
            found = fused.boundary_pairs(probs, labels, KEY_BUCKETS, groups, self.low)
        if found is None:
            codes, key = _pairs(probs, labels)
            g = groups[codes]
            at, slot = np.nonzero((g >= 0) & (key_bucket(key) == self.low[np.maximum(g, 0)]))
            found = (at, g[at, slot], key[at, slot])
        rows, group, key = found
        key = key.astype(key_dtype(probs.dtype), copy=False)
        return GroupTop.chunk(group, key, rows + start, self.need, bound)

    def _groups(self, k: int) -> np.ndarray:
        groups = np.full(k * k, -1, dtype=np.int64)
        groups[self.cells.codes] = np.arange(self.cells.codes.size)
        return groups

    def chosen(self, probs: np.ndarray, labels: np.ndarray, start: int) -> np.ndarray:
        """The items of a block (its pred_probs, its labels, its first item)
        that this selection chooses, as a mask."""
        probs = np.asarray(probs)
        n, k = probs.shape
        if n == 0 or self.low.size == 0:
            return np.zeros(n, dtype=bool)
        groups = self._groups(k)
        if probs.dtype in (np.float32, np.float64):
            chosen = fused.pair_buckets(probs, labels, KEY_BUCKETS, (groups, self.low, self.key, self.row), start)
            if chosen is not None:
                return chosen
        codes, key = _pairs(probs, labels)
        g = groups[codes]
        hit = g >= 0
        g = np.where(hit, g, 0)
        key = key.astype(self.key.dtype, copy=False)
        bucket, last = key_bucket(key), self.key[g]
        same = (key == last) | (np.isnan(key) & np.isnan(last))
        row = start + np.arange(n)[:, None]
        take = hit & ((bucket < self.low[g]) | ((bucket == self.low[g]) & ((key < last) | (same & (row <= self.row[g])))))
        return take.any(axis=1)

    def __sizeof__(self) -> int:
        arrays = (self.low, self.need, self.key, self.row, self.cells.codes)
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays if a is not None)


#: A class whose rows meet at least this many (row, cell) pairs in a block
#: is selected from with a partition per cell; smaller ones together by one
#: sort of their pairs, which costs less than a partition's fixed cost.
PARTITION_PAIRS = 4096


def exact_cells_block(
    labels: np.ndarray, probs: np.ndarray, start: int, cells: Cells
) -> GroupTop:
    """A block's candidates for each cell, from pred_probs itself.

    Each row meets every cell of its given class once.  For a class with
    many such pairs, its rows' margins in its cells form a matrix (in slices
    of about :data:`~dask_labelissues.fused.SUB_BLOCK_BYTES`), and a
    partition of each column finds the largest limit-th smallest key there:
    only rows at or under it can be among a cell's selected rows, so only
    those go into the exact selection (smallest key, then row index).
    Sorting every pair instead took seconds once most cells of 100 classes
    were undecided.  The pairs of the other classes are sorted together.
    """
    y = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs)
    k = cells.k
    # cells are ordered by given class (plan builds them row-major)
    first = np.searchsorted(cells.given, np.arange(k), side="left")
    per_class = np.searchsorted(cells.given, np.arange(k), side="right") - first
    by_class = np.argsort(y, kind="stable")  # each class's rows, ascending
    class_bounds = np.searchsorted(y[by_class], np.arange(k + 1))
    big = (np.diff(class_bounds) * per_class >= PARTITION_PAIRS) & (per_class > 0)
    parts = []
    for c in np.flatnonzero(big):
        groups = np.arange(first[c], first[c] + per_class[c])
        deepest = int(cells.limits[groups].max())
        if deepest == 0:
            continue
        members = by_class[class_bounds[c] : class_bounds[c + 1]]
        others = cells.other[groups]
        step = max(1, fused.SUB_BLOCK_BYTES // (8 * groups.size))
        for a in range(0, members.size, step):
            rows = members[a : a + step]
            margin = probs[rows[:, None], others] - probs[rows, c][:, None]  # input dtype, as cleanlab
            key = -margin.astype(key_dtype(margin.dtype), copy=False)
            if rows.size > deepest:
                cut = np.partition(key, deepest - 1, axis=0)[deepest - 1]
                r, g = np.nonzero(key <= cut)
            else:
                r, g = np.divmod(np.arange(key.size), groups.size)
            parts.append(GroupTop.chunk(groups[g], key[r, g], rows[r] + start, cells.limits))
    small = np.flatnonzero(~big[y] & (per_class[y] > 0))
    step = max(1, fused.SUB_BLOCK_BYTES // (8 * max(1, int(per_class.max(initial=1)))))
    for a in range(0, small.size, step):
        rows = small[a : a + step]
        yy = y[rows]
        counts = per_class[yy]
        pair_row = np.repeat(np.arange(rows.size), counts)
        offset = np.arange(pair_row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        group = first[yy][pair_row] + offset
        at = rows[pair_row]
        margin = probs[at, cells.other[group]] - probs[at, yy[pair_row]]  # input dtype, as cleanlab
        parts.append(GroupTop.chunk(group, -margin.astype(key_dtype(margin.dtype), copy=False), at + start, cells.limits))
    if not parts:
        return _empty_top(cells.limits)
    return GroupTop.combine(parts)


def class_block(
    joint: np.ndarray, rec: np.ndarray, start: int, limits: np.ndarray, enough: np.ndarray
) -> GroupTop:
    """A block's candidates for prune_by_class: lowest own-class probability
    per class (only those under 1/2 where the class has enough of them)."""
    y = rec["label"].astype(np.int64)
    low = joint["p_label"] < SPLIT["p_label"]
    rows = np.flatnonzero((limits[y] > 0) & (low | ~enough[y]))
    key = joint["p_label"][rows].astype(np.float64)
    return GroupTop.chunk(y[rows], key, rows + start, limits)


def lowest_block(joint: np.ndarray, start: int, field: str, limit: int, enough: bool) -> GroupTop:
    """A block's candidates for the low_* filters: its ``limit`` lowest scores
    (only those under 1/2 when the data has enough of them)."""
    key = joint[field].astype(np.float64)
    rows = np.flatnonzero(key < SPLIT[field]) if enough else np.arange(key.size)
    return GroupTop.chunk(
        np.zeros(rows.size, dtype=np.int64),
        key[rows],
        rows.astype(np.int64) + start,
        np.array([limit], dtype=np.int64),
    )


def selection_candidates(
    plan: "Plan", fspec: FilterSpec, joint: np.ndarray, rec: np.ndarray, start: int
) -> tuple[GroupTop | None, GroupTop | None, GroupTop | None]:
    """A block's candidates for every selection ``plan`` makes.

    Parameters
    ----------
    plan
        The selections, planned from the whole confident joint.
    fspec
        The filter.
    joint, rec
        The block's joint records and pass-one records.
    start
        The block's first item.

    Returns
    -------
    tuple
        ``(noise-rate cells, classes, lowest scores)`` candidates, in the
        order the mask takes them (:class:`MaskRule`); None for a selection
        the filter does not make, and for noise-rate cells a
        :class:`BucketCut` gathers (:meth:`BucketCut.boundary`).
    """
    by_rows = plan.cells is not None and plan.bucket_cut is None
    return (
        noise_rate_block(joint, rec, start, plan.cells) if by_rows else None,
        None if plan.class_limits is None else class_block(joint, rec, start, plan.class_limits, plan.class_enough),
        None if fspec.lowest_field is None else lowest_block(
            joint, start, fspec.lowest_field, plan.lowest, plan.lowest_enough
        ),
    )


def decided(top: GroupTop, unsure: np.ndarray, exact: GroupTop) -> GroupTop:
    """``top`` with its undecided noise-rate cells ``unsure`` replaced by
    ``exact``, their candidates recomputed from pred_probs (its groups
    numbered in ``unsure``'s order, as ``cells.subset(unsure)`` numbers
    them)."""
    exact.group = unsure[exact.group]
    return top.replace_groups(unsure, exact)


# -- the mask ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MaskRule:
    """How a block's ``is_label_issue`` follows from its records.

    ``selected`` are the rows chosen by the selections (ascending), or a
    :class:`BucketCut` that chooses them from each block's pred_probs and
    labels; both prune filters keep the rows in both.
    """

    filter_by: str
    selected: tuple[np.ndarray | BucketCut, ...] = ()

    def __sizeof__(self) -> int:
        # What Dask counts a rule as (it asks ``sys.getsizeof``): its rows.
        return object.__sizeof__(self) + sum(
            sys.getsizeof(rows) if isinstance(rows, BucketCut) else int(rows.nbytes) for rows in self.selected
        )

    @property
    def bucketed(self) -> bool:
        """A selection is a :class:`BucketCut`, which :meth:`resolved` turns
        into a block's rows before :func:`mask_block` takes the rule."""
        return any(isinstance(rows, BucketCut) for rows in self.selected)

    def resolved(self, probs: np.ndarray, labels: np.ndarray, start: int) -> "MaskRule":
        """The rule for one block, its bucket cuts made its chosen rows."""
        return MaskRule(self.filter_by, tuple(
            np.flatnonzero(rows.chosen(probs, labels, start)) + start if isinstance(rows, BucketCut) else rows
            for rows in self.selected
        ))

    def restrict(self, start: int, stop: int) -> "MaskRule":
        """The rule for rows ``start:stop`` only (what one block task needs)."""
        parts: list[np.ndarray | BucketCut] = []
        for rows in self.selected:
            if isinstance(rows, BucketCut):
                parts.append(rows)
                continue
            lo, hi = np.searchsorted(rows, [start, stop])
            parts.append(rows[lo:hi])
        return MaskRule(self.filter_by, tuple(parts))


def mask_block(rule: MaskRule, rec: np.ndarray, joint: np.ndarray | None, start: int) -> np.ndarray:
    """``is_label_issue`` of one block."""
    n = rec.shape[0]
    f = rule.filter_by
    if f == "predicted_neq_given":
        mask = rec["pred"] != rec["label"]
    elif f == "confident_learning":
        mask = (joint["guess"] >= 0) & (joint["guess"] != rec["label"])
    else:
        mask = np.ones(n, dtype=bool)
        for rows in rule.selected:
            lo, hi = np.searchsorted(rows, [start, start + n])
            chosen = np.zeros(n, dtype=bool)
            # int64: rows held as int32 (all below 2**31) less a later block's start.
            chosen[rows[lo:hi].astype(np.int64) - start] = True
            mask &= chosen
    if f not in ("low_normalized_margin", "low_self_confidence"):
        # Rows whose given label wins once it gets 1e-6 more are no issues.
        mask &= ~rec["reduce"]
    return mask


# -- K x K math on the client ------------------------------------------------
def calibrate(cj: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Scale the confident joint so row i sums to the rows labelled i and the
    whole to N, then round to integers keeping the row totals (as
    ``cleanlab.count.calibrate_confident_joint``)."""
    per_row = np.clip(cj.sum(axis=1), _TINY, None)
    scaled = (cj.T / per_row * label_counts).T
    scaled = scaled / np.clip(np.sum(scaled), _TINY, None) * np.sum(label_counts)
    return round_rows(scaled)


def round_rows(matrix: np.ndarray) -> np.ndarray:
    """Round every row to integers without changing its rounded total."""
    return np.array([_round_keeping_total(row) for row in np.asarray(matrix, dtype=float)]).astype(
        np.int64
    ).reshape(np.shape(matrix))


def _round_keeping_total(values: np.ndarray) -> np.ndarray:
    # Round each value, then move the rounding error onto the entries whose
    # remainders point most that way: largest remainders when the total is
    # short, smallest when it is over.  numpy's default argsort is used for
    # the order so that equal remainders resolve as in cleanlab.
    ints = values.round()
    target = values.sum().round()
    total = ints.sum().round()
    while abs(total - target) > FLOATING_POINT_COMPARISON:
        diff = np.round(target - total)
        step = -1 if diff < 0 else 1
        changes = min(int(abs(diff)), values.size)
        order = np.argsort(values - ints)
        picks = order[::-1][:changes] if step > 0 else order[:changes]
        ints[picks] += step
        total = ints.sum().round()
    return ints


def prune_counts(
    calibrated: np.ndarray, label_counts: np.ndarray, fspec: FilterSpec
) -> np.ndarray:
    """The prune count matrix: entry ``[j, k]`` is how many rows labelled k
    to flag as really class j (the diagonal: rows of class k to keep)."""
    pcm = _keep_at_least(calibrated.T, fspec.min_examples_per_class, fspec.frac_noise)
    if fspec.num_to_remove_per_class is not None:
        remove = np.asarray(fspec.num_to_remove_per_class)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Divides column j by row total j, as cleanlab does.
            share = pcm / np.sum(pcm, axis=1)
            noise = share.sum(axis=1) - share.diagonal()
            target = (share.T * remove / noise).T
        np.fill_diagonal(target, label_counts - remove)
        pcm = round_rows(target)
    return pcm


def _keep_at_least(pcm: np.ndarray, n: int, frac_noise: float) -> np.ndarray:
    diag = np.diagonal(pcm)
    new_diag = np.maximum(diag, n)
    raised = new_diag - diag
    # Spread each column's raise over its other non-zero entries.
    spread = np.maximum(np.count_nonzero(pcm, axis=0) - 1.0, 1.0)
    out = pcm - raised / spread
    out[out < 0] = 0
    np.fill_diagonal(out, new_diag)
    # Keep frac_noise of the noise; the rest goes back to the diagonal so
    # column totals stay.  Truncation to int is cleanlab's.
    reduced = out * frac_noise
    np.fill_diagonal(reduced, out.diagonal())
    np.fill_diagonal(reduced, out.diagonal() + np.sum(out - reduced, axis=0))
    return round_rows(reduced.astype(np.int64))


@dataclass(frozen=True, eq=False)
class Plan:
    """What to select once the confident joint is known."""

    cells: Cells | None  # noise-rate cells
    class_limits: np.ndarray | None  # prune_by_class: rows to take per class
    lowest: int  # low_* filters: rows to take
    class_enough: np.ndarray | None = None  # per class: enough rows under the split
    lowest_enough: bool = False
    #: The noise-rate cells chosen by the buckets of their keys, where the
    #: joint's read counted them (:class:`BucketCut`); None: by candidates.
    bucket_cut: BucketCut | None = None


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the function
    calling this one name the first frame outside this package: the
    user's line, however deep in the package the warning is made."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def given_joint(confident_joint: Any, k: int, filter_by: str, name: str = "confident_joint") -> np.ndarray | None:
    """A caller's ``(K, K)`` confident joint, checked, for :func:`plan`; None
    where ``filter_by`` does not count from one (:func:`counts_from_given`)."""
    if confident_joint is None:
        return None
    cj = checked_joint(confident_joint, k, name)
    return cj if counts_from_given(filter_by, name) else None


def checked_joint(confident_joint: Any, k: int, name: str = "confident_joint") -> np.ndarray:
    """``confident_joint`` as a ``(K, K)`` array of finite counts >= 0, or an
    error naming ``name``."""
    cj = np.asarray(confident_joint)
    if cj.shape != (k, k):
        raise ValueError(f"{name} must have shape ({k}, {k}), one row and column per class; got {cj.shape}")
    if cj.dtype.kind not in "iuf" or not np.isfinite(cj).all() or (cj < 0).any():
        raise ValueError(f"{name} must hold finite counts >= 0")
    return cj


def counts_from_given(filter_by: str, name: str = "confident_joint", estimated: str = "the joint") -> bool:
    """Whether ``filter_by`` counts from a confident joint the caller gives.

    As in cleanlab: only the prune filters do; ``confident_learning`` warns
    that it estimates ``estimated`` from the data; the others read none.
    """
    if filter_by == "confident_learning":
        warnings.warn(
            f"the {name} given is not used with filter_by='confident_learning', which estimates "
            f"{estimated} from the data (as cleanlab does)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return filter_by in PRUNE_FILTERS


def plan(
    fspec: FilterSpec, joint: JointState, label_counts: np.ndarray, given: np.ndarray | None = None
) -> tuple[Plan, np.ndarray]:
    """From the confident joint to the selections; also returns the
    calibrated confident joint.

    ``given``: a confident joint the caller supplies (:func:`given_joint`),
    which the prune filters count from as it is instead of the data's, as
    cleanlab does with its ``confident_joint`` argument; what is returned
    is it calibrated to these labels' counts, as cleanlab's
    ``estimate_joint`` calibrates one given, for the health views.  The
    data's joint still decides whether the kept candidates suffice.
    """
    k = label_counts.shape[0]
    off_diagonal = joint.off_diagonal
    counted = None
    if given is not None and fspec.filter_by in PRUNE_FILTERS:
        counted = np.asarray(given, dtype=np.float64)
        calibrated = calibrate(counted, label_counts)
    else:
        calibrated = calibrate(joint.matrix(k), label_counts)
    if fspec.num_to_remove_per_class is not None and len(fspec.num_to_remove_per_class) != k:
        raise ValueError(
            f"num_to_remove_per_class has {len(fspec.num_to_remove_per_class)} entries, "
            f"one per class ({k}) is needed"
        )
    if fspec.filter_by not in PRUNE_FILTERS:
        lowest = off_diagonal if fspec.filter_by.startswith("low_") else 0
        below = (
            int(joint.low_label.sum())
            if fspec.filter_by == "low_self_confidence"
            else joint.low_margin_score
        )
        return Plan(None, None, lowest, lowest_enough=below >= lowest), calibrated
    pcm = prune_counts(calibrated if counted is None else counted, label_counts, fspec)
    # A class is pruned only with more rows than min_examples_per_class, and
    # (cleanlab drops the mask of a one-row class) at least two.
    prunable = (label_counts > fspec.min_examples_per_class) & (label_counts > 1)
    too_small = tuple(
        int(c) for c in np.flatnonzero(label_counts <= fspec.min_examples_per_class)
    )
    if too_small:
        warnings.warn(
            f"classes {list(too_small)} have min_examples_per_class="
            f"{fspec.min_examples_per_class} rows or fewer; none of their rows is flagged",
            stacklevel=4,
        )
    cells = class_limits = None
    if fspec.by_noise_rate:
        counts = pcm.T.copy()  # [given, other]
        np.fill_diagonal(counts, 0)
        counts[~prunable] = 0
        given, other = np.nonzero(counts > 0)
        limits = counts[given, other].astype(np.int64)
        codes = given.astype(np.int64) * k + other
        enough = joint.positives(codes) >= limits
        cells = Cells(given.astype(np.int64), other.astype(np.int64), limits, k, enough)
    if fspec.by_class:
        class_limits = np.where(prunable, np.maximum(label_counts - pcm.diagonal(), 0), 0).astype(np.int64)
    class_enough = joint.low_label >= (class_limits if class_limits is not None else 0)
    return Plan(cells, class_limits, 0, class_enough), calibrated
