"""Mergeable states of the three reductions, and the block tasks that make them.

Each state has the same three verbs, as in flox's aggregations:

``chunk``
    build a state from one block (the ``*_block`` task functions below),
``combine``
    merge any number of states (associative and commutative, and exact, so
    that every tree of merges gives the same bits),
``finalize``
    turn the merged state into the answer.

The engines only decide where chunk runs and in which tree combine runs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import fused, kernels
from .kernels import InputProblem, ScoreSpec


class InputValueError(ValueError):
    """Bad values found in the data; the message names the first bad row,
    ``row`` (None where no one row is to blame)."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


def relocate(message: str, item: int, where: str) -> str:
    """An error about item ``item`` told by ``where`` it is (an image's
    pixel, a sentence's token) instead of by its flat index."""
    message = re.sub(rf"pred_probs\[{item}, (\d+)\]", rf"pred_probs at {where}, class \1", message)
    message = re.sub(rf"labels\[{item}\]", f"labels at {where}", message)
    return re.sub(rf"\brow {item}\b", f"at {where}", message)


@contextlib.contextmanager
def located(where: Callable[[int], str], amend: Callable[[str], str] | None = None) -> Iterator[None]:
    """Re-raise a bad value's :class:`InputValueError` with the place
    ``where(item)`` names (:func:`relocate`), and ``amend``'s hint."""
    try:
        yield
    except InputValueError as exc:
        if exc.row is None:
            raise
        message = relocate(str(exc), exc.row, where(exc.row))
        raise InputValueError(amend(message) if amend else message, exc.row) from None


# The states (and the package's other records of arrays) are dataclasses
# with eq=False: the __eq__ a dataclass generates compares the fields as
# tuples, which raises for arrays of more than one element, and every
# import of the package would pay to compile it.
@dataclass(eq=False)
class ThresholdState:
    """Pass one: rows per given label, exact sums of their own-class
    probability, and the first bad row seen."""

    counts: np.ndarray  # int64 (K,)
    sums: np.ndarray  # object (K,), exact Python ints (see kernels.fixed_point_class_sums)
    rows: int = 0
    problem: InputProblem | None = None

    @classmethod
    def empty(cls, k: int) -> "ThresholdState":
        sums = np.zeros(k, dtype=object)
        sums[:] = 0
        return cls(np.zeros(k, dtype=np.int64), sums)

    @classmethod
    def combine(cls, states: Sequence["ThresholdState"]) -> "ThresholdState":
        first = states[0]
        counts = first.counts.copy()
        sums = first.sums.copy()
        rows = first.rows
        problems = [first.problem] if first.problem else []
        for s in states[1:]:
            counts += s.counts
            sums += s.sums
            rows += s.rows
            if s.problem:
                problems.append(s.problem)
        problem = min(problems, key=lambda p: p.row) if problems else None
        return cls(counts, sums, rows, problem)

    def raise_problem(self) -> None:
        """Raise the first bad row's error, if there is one."""
        if self.problem is not None:
            raise InputValueError(self.problem.message, self.problem.row)

    def finalize(self) -> np.ndarray:
        """The confident thresholds (K,), float64.

        The full-data mean of ``pred_probs[labels == k, k]`` for each class k,
        correctly rounded from the exact sum (values below 2**-85 contribute
        all their bits down to 2**-137 only), 2.0 for a class no row is
        labelled with, then clipped below at 2e-6.
        """
        self.raise_problem()
        means = kernels.exact_means(self.sums, self.counts)
        return np.maximum(means, kernels.THRESHOLD_FLOOR)


def scan_block(
    labels: np.ndarray, probs: np.ndarray, start: int, spec: ScoreSpec, out: np.ndarray | None = None
) -> tuple[np.ndarray, ThresholdState]:
    """Pass one's task on rows ``start:start+len(labels)``: the only read of
    pred_probs for most settings (``probs`` items x classes, or
    :class:`~dask_labelissues.kernels.Planes`).  Returns the per-row records (written to
    ``out`` if given) and the block's threshold state (bad values are
    recorded in the state, not raised, so the job can report the globally
    first one)."""
    labels = np.asarray(labels)
    if not isinstance(probs, kernels.Planes):
        probs = np.asarray(probs)
    k = probs.shape[1]
    got = kernels.fused_records(labels, probs, start, spec, out)
    if got is not None:
        rec, counts, sums, problem = got
        return rec, ThresholdState(counts, sums, len(labels), problem)
    if isinstance(probs, kernels.Planes):
        probs = probs.items()
    rec, p_label, row_sums, row_mins = kernels.row_records(labels, probs, spec, out)
    row_maxs = rec["p_pred"]
    problem = kernels.find_problem(
        labels, probs, start, spec.row_sum_tolerance, row_sums, row_mins, row_maxs
    )
    y = rec["label"].astype(np.intp)
    if problem is not None:
        # Rows past a bad value are still summed, but the job stops at
        # finalize; only keep values the fixed-point sums can hold.
        p_label = np.where(np.isfinite(p_label) & (p_label >= 0), p_label, 0.0)
        p_label = np.where(p_label < kernels.MAX_VALUE, p_label, 0.0)
    counts = np.bincount(y, minlength=k).astype(np.int64)
    sums = kernels.fixed_point_class_sums(y, p_label, k, spec.kernel)
    return rec, ThresholdState(counts, sums, len(labels), problem)


@dataclass(eq=False)
class CountState:
    """Pass two: what the number of label issues is estimated from.

    ``off_diagonal`` needs one number; the calibrated estimate needs, per
    given label, the rows (``n``), the confident rows (``norm``) and the
    confident rows predicted as another class (``prune``).
    """

    prune: np.ndarray  # int64 (K,)
    norm: np.ndarray  # int64 (K,)
    n: np.ndarray  # int64 (K,)

    @classmethod
    def empty(cls, k: int) -> "CountState":
        return cls(*(np.zeros(k, dtype=np.int64) for _ in range(3)))

    @classmethod
    def chunk(cls, rec: np.ndarray, thresholds: np.ndarray) -> "CountState":
        k = thresholds.shape[0]
        confident, off = kernels.confident_off_diagonal(rec, thresholds)
        label = rec["label"].astype(np.intp)
        # Weighted counts avoid copying the selected labels; float64 counts
        # are exact far beyond any block's size.
        return cls(
            np.bincount(label, weights=off, minlength=k).astype(np.int64),
            np.bincount(label, weights=confident, minlength=k).astype(np.int64),
            np.bincount(label, minlength=k).astype(np.int64),
        )

    @classmethod
    def off_diagonal_total(cls, rec: np.ndarray, thresholds: np.ndarray) -> "CountState":
        """A block's count for the ``off_diagonal`` estimate alone, as the
        state of one pseudo-class: 3 numbers instead of 3 K to gather per
        block (only ``finalize("off_diagonal")`` is meaningful on it)."""
        _, off = kernels.confident_off_diagonal(rec, thresholds)
        one = np.zeros(1, dtype=np.int64)
        return cls(np.array([np.count_nonzero(off)], dtype=np.int64), one, one.copy())

    @classmethod
    def combine(cls, states: Sequence["CountState"]) -> "CountState":
        return cls(
            np.sum([s.prune for s in states], axis=0, dtype=np.int64),
            np.sum([s.norm for s in states], axis=0, dtype=np.int64),
            np.sum([s.n for s in states], axis=0, dtype=np.int64),
        )

    def finalize(self, estimation_method: str) -> int:
        """The estimated number of label issues, T."""
        if estimation_method == "off_diagonal":
            return int(self.prune.sum())
        # float64 before multiplying: int64 products overflow past ~3e9 rows.
        prune, n = self.prune.astype(np.float64), self.n.astype(np.float64)
        calibrated = prune * n / np.maximum(self.norm, kernels.CLIP_FLOOR)
        return int(np.rint(np.sum(calibrated)))


def block_scores(
    rec: np.ndarray,
    thresholds: np.ndarray,
    spec: ScoreSpec,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> np.ndarray:
    """Pass two's scores for one block.

    ``labels`` and ``probs`` (the raw block) are needed only when
    ``spec.rereads``; otherwise the records suffice.
    """
    if spec.rereads:
        if probs is None or labels is None:
            raise ValueError("this scoring method needs the pred_probs block again")
        return kernels.adjusted_margin_scores(np.asarray(labels), np.asarray(probs), thresholds)
    return kernels.scores_from_records(rec, thresholds, spec)


@dataclass(eq=False)
class ScoreState:
    """Pass two's merged state: the count state, and the first radix-select
    round's histogram of the new scores (so selection starts without another
    pass over them)."""

    counts: CountState
    first_digits: "HistogramState"

    @classmethod
    def empty(cls, k: int = 0) -> "ScoreState":
        """No rows: nothing counted, nothing to select."""
        none = np.zeros(0, dtype=np.int64)
        return cls(CountState.empty(k), HistogramState(none, none.copy()))

    @classmethod
    def combine(cls, states: Sequence["ScoreState"]) -> "ScoreState":
        return cls(
            CountState.combine([s.counts for s in states]),
            HistogramState.combine([s.first_digits for s in states]),
        )


def score_block(
    rec: np.ndarray,
    thresholds: np.ndarray,
    spec: ScoreSpec,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, ScoreState]:
    """Pass two's task on one block: its scores (written to ``out`` if
    given) and its :class:`ScoreState`."""
    # The off_diagonal estimate reads the count's total alone: every block's
    # state is then off_diagonal_total's, of one pseudo-class, on either path.
    total_only = spec.estimation_method == "off_diagonal"
    if not spec.rereads and not spec.adjust_pred_probs:
        scores = np.empty(len(rec), dtype=np.float64) if out is None else out
        cut = thresholds - kernels.FLOATING_POINT_COMPARISON
        fast = fused.score_records(rec, cut, scores, kernels.DIGIT_BITS, spec.kernel, total_only)
        if fast is not None:
            prune, norm, n, dense = fast
            digits = kernels.occupied_bins(dense)
            first = HistogramState(digits.astype(np.int64), dense[digits])
            return scores, ScoreState(CountState(prune, norm, n), first)
    scores = block_scores(rec, thresholds, spec, labels, probs)
    if out is not None:
        out[...] = scores
        scores = out
    counts = (CountState.off_diagonal_total if total_only else CountState.chunk)(rec, thresholds)
    return scores, ScoreState(counts, HistogramState.chunk(scores, 0, 0))


@dataclass(eq=False)
class HistogramState:
    """One radix-select round: counts of the next digit of the score keys.

    Kept sparse (the digits that occur and their counts), because a block
    of a few rows would otherwise ship a 65,536-bin array.
    """

    digits: np.ndarray  # int64, ascending, unique
    counts: np.ndarray  # int64, > 0

    @classmethod
    def chunk(cls, scores: np.ndarray, round_index: int, prefix: int) -> "HistogramState":
        keys = kernels.score_keys(scores)
        dense = kernels.digit_histogram(keys, round_index, prefix)
        digits = kernels.occupied_bins(dense)
        return cls(digits.astype(np.int64), dense[digits])

    @classmethod
    def combine(cls, states: Sequence["HistogramState"]) -> "HistogramState":
        dense = np.zeros(kernels.N_DIGIT_BINS, dtype=np.int64)
        for s in states:
            dense[s.digits] += s.counts
        digits = kernels.occupied_bins(dense)
        return cls(digits.astype(np.int64), dense[digits])

    def dense(self) -> np.ndarray:
        out = np.zeros(kernels.N_DIGIT_BINS, dtype=np.int64)
        out[self.digits] = self.counts
        return out


#: A bucket of at most this many rows is gathered and finished on the client.
CANDIDATE_CAP = 1 << 18


@dataclass
class Selection:
    """Finds the T rows with the smallest (score, index) by radix select.

    Each round, a tree reduction of :class:`HistogramState`, narrows the
    cutoff to one bucket of the next 16 bits of the score key.  As soon as
    the bucket holding the T-th smallest key has at most
    :data:`CANDIDATE_CAP` rows (usually after one or two rounds), the rows
    below it and the bucket's rows are gathered and the client finishes the
    selection exactly (:meth:`finish`).  Only if a single key value is
    shared by more rows than that do all four rounds run, and the tie is
    split by per-block counts (:meth:`quotas`).  No process ever holds more
    than one block of scores, a 65,536-bin histogram, or O(T + cap) rows.
    """

    target: int
    round_index: int = 0
    prefix: int = 0
    below: int = 0  # rows whose key prefix is smaller than ``prefix``
    bucket: int = 0  # rows whose key prefix equals ``prefix``

    @classmethod
    def after_pass_two(cls, state: ScoreState, estimation_method: str, n_rows: int) -> "Selection | None":
        """The selection of the estimated number of issues, its first round
        taken from pass two's histogram; None when there is nothing to select."""
        target = min(state.counts.finalize(estimation_method), n_rows)
        if target <= 0:
            return None
        selection = cls(target)
        selection.advance(state.first_digits)
        return selection

    @property
    def done(self) -> bool:
        return self.round_index >= kernels.N_ROUNDS

    @property
    def shift(self) -> int:
        """``key >> shift`` is the part of a key the rounds so far have fixed."""
        return 64 - kernels.DIGIT_BITS * self.round_index

    def wants_round(self) -> bool:
        return self.round_index == 0 or (not self.done and self.bucket > CANDIDATE_CAP)

    def gathers_bucket(self) -> bool:
        """True when the bucket is small enough to gather and finish on the client."""
        return self.bucket <= CANDIDATE_CAP

    def advance(self, hist: HistogramState) -> None:
        """Fold one round's merged histogram into the cutoff."""
        need = self.target - self.below  # rank of the target within this prefix, 1-based
        counts = hist.dense()
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, need, side="left"))
        self.below += int(cumulative[digit - 1]) if digit else 0
        self.prefix = (self.prefix << kernels.DIGIT_BITS) | digit
        self.bucket = int(counts[digit])
        self.round_index += 1

    def finish(self, gathered: "Winners", starts: Sequence[int]) -> tuple["Winners", int, list[int]]:
        """Choose the winners among the rows at or below the bucket.

        Returns ``(winners, cutoff_key, quotas)``: the winners ranked, and
        per block, how many rows with the cutoff key are in the top set.
        """
        # ``gathered`` holds every row whose key prefix is at most the
        # bucket's: the ``below`` rows under the bucket, whose keys are all
        # smaller than any in it, then the bucket's.  So the first ``target``
        # rows by (key, index) are the winners, already ranked.
        if gathered.index.size != self.below + self.bucket:
            raise RuntimeError(
                f"the selection gathered {gathered.index.size} rows, not the "
                f"{self.below} + {self.bucket} at or below its bucket"
            )
        order, ranked_keys = _ranked(kernels.score_keys(gathered.score), gathered.index)
        taken, ranked_keys = order[: self.target], ranked_keys[: self.target]
        cutoff, quotas = _cut_at(gathered.index, taken, ranked_keys, starts)
        # Freed before the take allocates the winners: held through it, the
        # ranked keys of every gathered row added to the process's peak (a
        # fork job's parent on 10,000,000 x 100: 4 MB).
        del ranked_keys
        return gathered.take(taken), cutoff, quotas

    def cut(self, bucket: "Winners", starts: Sequence[int]) -> tuple[int, list[int]]:
        """The cut-off key and per-block quotas from the bucket's rows alone
        (:func:`bucket_rows_block`): for a caller that needs the T rows'
        mask, not the rows, so no process holds O(T) of them."""
        if bucket.index.size != self.bucket:
            raise RuntimeError(f"the selection gathered {bucket.index.size} rows, not the {self.bucket} of its bucket")
        order, ranked_keys = _ranked(kernels.score_keys(bucket.score), bucket.index)
        taken = self.target - self.below
        return _cut_at(bucket.index, order[:taken], ranked_keys[:taken], starts)

    def quotas(self, equal_per_block: Sequence[int]) -> list[int]:
        """After all rounds: per block, how many rows with the cutoff key
        (now ``prefix``) to take, lowest index first."""
        left = self.target - self.below
        out = []
        for count in equal_per_block:
            q = min(int(count), left)
            out.append(q)
            left -= q
        return out


def _cut_at(index: np.ndarray, taken: np.ndarray, taken_keys: np.ndarray, starts: Sequence[int]) -> tuple[int, list[int]]:
    """The cut-off key, the last of the ranked rows ``taken`` (positions
    in ``index``, their keys ``taken_keys``), and per block, how many of
    them have it: the quotas :func:`selected_block` takes at the cut-off."""
    cutoff = int(taken_keys[-1])
    at_cutoff = index[taken[taken_keys == np.uint64(cutoff)]]
    block = np.searchsorted(np.asarray(starts), at_cutoff, side="right") - 1
    return cutoff, np.bincount(block, minlength=len(starts)).tolist()


@dataclass(eq=False)
class Winners:
    """The rows of the top set, gathered from every block: O(T) in size."""

    index: np.ndarray  # int64
    score: np.ndarray  # float64
    label: np.ndarray  # int64
    reduce: np.ndarray  # bool

    def __sizeof__(self) -> int:
        # What Dask and the local reductions count a state as: its rows.
        return object.__sizeof__(self) + sum(a.nbytes for a in (self.index, self.score, self.label, self.reduce))

    @classmethod
    def chunk(
        cls, rec: np.ndarray, scores: np.ndarray, selected: np.ndarray, start: int
    ) -> "Winners":
        rows = np.flatnonzero(selected)
        return cls(
            (rows + start).astype(np.int64),
            np.asarray(scores, dtype=np.float64)[rows],
            rec["label"][rows].astype(np.int64),
            rec["reduce"][rows].astype(bool),
        )

    @classmethod
    def combine(cls, parts: Sequence["Winners"]) -> "Winners":
        return cls(
            np.concatenate([p.index for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.label for p in parts]),
            np.concatenate([p.reduce for p in parts]),
        )

    def take(self, rows: np.ndarray) -> "Winners":
        """The rows a boolean mask or an array of positions picks, in its order."""
        return Winners(self.index[rows], self.score[rows], self.label[rows], self.reduce[rows])

    def ranked(self) -> "Winners":
        """Sorted by ascending score, ties by ascending row index."""
        order = rank_order(self.score, self.index)
        return Winners(
            self.index[order], self.score[order], self.label[order], self.reduce[order]
        )


#: The most rows :func:`rank_order` sorts by radix, so that the radix
#: sort's buffers (40 bytes a row against numpy's 16) stay small.
RADIX_MAX_ROWS = 1 << 20


def rank_order(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The order of ascending ``values`` (NaN last), ties by ascending ``index``.

    A stable sort keeps equal values in their given order, which is by
    index for rows gathered block after block, each block's rows in index
    order or already ranked (:func:`prefix_winners`, :func:`top_winners`).
    On such ranked runs the sort merges instead of sorting: on 130,000
    rows in 16 runs it took 4 ms, against 16 ms for ``np.lexsort``.  When the
    given order breaks a tie the other way, ``np.lexsort`` decides.
    Rows in no such order (a block's rows, in index order) are sorted by
    their keys' radix where numba is loaded, up to :data:`RADIX_MAX_ROWS`
    of them (:func:`dask_labelissues.kernels.stable_order`).  Both are
    stable sorts of the same keys, so they give the same order.
    """
    return _ranked(values, index)[0]


def _ranked(values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_order`'s order and ``values`` in it."""
    order = kernels.stable_order(values, RADIX_MAX_ROWS)
    v = values[order]
    tie = v[1:] == v[:-1]
    if v.dtype.kind == "f":
        tie |= np.isnan(v[1:]) & np.isnan(v[:-1])
    # Only the tied neighbours' indices are read: gathering every row's
    # index took a fifth of the client's ranking of 557,000 rows.
    at = np.flatnonzero(tie)
    if np.any(index[order[at + 1]] < index[order[at]]):
        order = np.lexsort((index, values))
        v = values[order]
    return order, v


def prefix_winners(rec: np.ndarray, scores: np.ndarray, shift: int, prefix: int, start: int) -> Winners:
    """A block's rows whose key prefix is at most ``prefix``, ranked (so the
    client's final ranking merges ranked runs, see :func:`rank_order`)."""
    return Winners.chunk(rec, scores, prefix_rows_block(scores, shift, prefix), start).ranked()


def top_winners(rec: np.ndarray, scores: np.ndarray, cutoff: int, quota: int, start: int) -> Winners:
    """A block's rows of the top-T set (:func:`selected_block`), ranked."""
    return Winners.chunk(rec, scores, selected_block(scores, cutoff, quota), start).ranked()


def selected_block(scores: np.ndarray, cutoff: int, quota: int) -> np.ndarray:
    """Mask of the block's rows in the top-T set."""
    return kernels.selected_rows(kernels.score_keys(scores), cutoff, quota)


def prefix_rows_block(scores: np.ndarray, shift: int, prefix: int) -> np.ndarray:
    """Mask of the block's rows whose key prefix is at most ``prefix``."""
    if shift >= 64:
        return np.ones(np.shape(scores), dtype=bool)
    fast = fused.prefix_mask(scores, shift, prefix)
    if fast is not None:
        return fast
    keys = kernels.score_keys(scores)
    return (keys >> np.uint64(shift)) <= np.uint64(prefix)


def bucket_rows_block(rec: np.ndarray, scores: np.ndarray, shift: int, prefix: int, start: int) -> Winners:
    """The block's rows whose key prefix (``key >> shift``) is ``prefix``."""
    keys = kernels.score_keys(scores)
    return Winners.chunk(rec, scores, (keys >> np.uint64(shift)) == np.uint64(prefix), start)


def first_bucket(state: ScoreState, estimation_method: str, n_rows: int) -> tuple[int, int] | None:
    """``(shift, prefix)`` of the rows the selection gathers right after pass
    two, or None when it needs another round first (or selects nothing).

    What the client will ask for next, known from pass two's merged state
    alone: an engine can gather those rows in the same job as the passes.
    """
    selection = Selection.after_pass_two(state, estimation_method, n_rows)
    if selection is None or selection.wants_round() or not selection.gathers_bucket():
        return None
    return selection.shift, selection.prefix


@dataclass(eq=False)
class OutlookState:
    """Pass one's outlook on pass two, for scores the records already hold
    (no ``adjust_pred_probs``): the first radix-select digits of the scores,
    and per predicted class, a histogram of ``p_pred`` over the rows
    predicted as another class than their label.

    Once the thresholds are known, the second bounds the ``off_diagonal``
    estimate of T from both sides (:meth:`count_bounds`), and the first then
    names the bucket whose rows, with those below it, include the T lowest
    scores (:meth:`bucket`).  An engine can gather those rows in the same
    per-block tasks that count T, rather than in a stage after them.
    """

    digits: "HistogramState"
    off_diagonal: np.ndarray  # int64 (K, bins)

    @staticmethod
    def n_bins(k: int) -> int:
        """Bins per class: fewer for more classes, so that a block's state
        is at most about 128 KB up to 1,024 classes (16 bins a class beyond)."""
        return int(np.clip((1 << 14) // max(k, 1), 16, 256))

    @classmethod
    def chunk(cls, rec: np.ndarray, k: int) -> "OutlookState":
        bins = cls.n_bins(k)
        off = rec["pred"] != rec["label"]
        flat = rec["pred"][off].astype(np.intp) * bins + cls._bin(rec["p_pred"][off], bins)
        counts = np.bincount(flat, minlength=k * bins).astype(np.int64)
        return cls(HistogramState.chunk(rec["score"], 0, 0), counts.reshape(k, bins))

    @staticmethod
    def _bin(p: np.ndarray, bins: int) -> np.ndarray:
        # Non-decreasing in p (NaN, which only bad input has, in the top
        # bin): a row clearing a threshold is never in a lower bin than it.
        p = np.nan_to_num(np.clip(p, 0.0, 1.0), nan=1.0)
        return np.minimum((p * bins).astype(np.intp), bins - 1)

    @classmethod
    def combine(cls, states: Sequence["OutlookState"]) -> "OutlookState":
        return cls(
            HistogramState.combine([s.digits for s in states]),
            np.sum([s.off_diagonal for s in states], axis=0, dtype=np.int64),
        )

    def count_bounds(self, thresholds: np.ndarray) -> tuple[int, int]:
        """``(lower, upper)`` around the ``off_diagonal`` estimate of T these
        thresholds give (:meth:`CountState.finalize`): they differ by the
        rows in each class's threshold bin."""
        k, bins = self.off_diagonal.shape
        edge = self._bin(thresholds - kernels.FLOATING_POINT_COMPARISON, bins)
        at_or_above = np.cumsum(self.off_diagonal[:, ::-1], axis=1)[:, ::-1]
        # Rows in a bin above the edge's clear the threshold; those in the
        # edge's bin may.
        above = np.concatenate([at_or_above[:, 1:], np.zeros((k, 1), dtype=np.int64)], axis=1)
        rows = np.arange(k)
        return int(above[rows, edge].sum()), int(at_or_above[rows, edge].sum())

    def bucket(self, thresholds: np.ndarray, n_rows: int) -> tuple[int, int] | None:
        """``(shift, prefix)`` of rows that include the lowest ``off_diagonal``
        T, or None when there is nothing to select, or the bucket or the
        bounds' spread is more than :data:`CANDIDATE_CAP` rows (so that the
        rows gathered stay within T + 2 caps)."""
        lower, upper = self.count_bounds(thresholds)
        bound = min(upper, n_rows)
        if bound <= 0 or upper - lower > CANDIDATE_CAP:
            return None
        selection = Selection(bound)
        selection.advance(self.digits)
        if not selection.gathers_bucket():
            return None
        return selection.shift, selection.prefix


def outlook_count_block(
    rec: np.ndarray, thresholds: np.ndarray, spec: ScoreSpec, bucket: tuple[int, int] | None, start: int
) -> tuple[CountState, "Winners | None"]:
    """Pass two's ``off_diagonal`` count for a block whose scores are in its
    records (:meth:`CountState.off_diagonal_total`), with the rows of
    :meth:`OutlookState.bucket` (ranked) when there is one."""
    counts = CountState.off_diagonal_total(rec, thresholds)
    if bucket is None:
        return counts, None
    return counts, prefix_winners(rec, block_scores(rec, thresholds, spec), *bucket, start)


def narrow_prefix(rows: "Winners", held: tuple[int, int], shift: int, prefix: int) -> "Winners | None":
    """The rows of ``rows`` (those with ``key >> held[0] <= held[1]``) whose
    ``key >> shift`` is at most ``prefix``, in their order; None when the
    rows asked for need not all be among them."""
    held_shift, held_prefix = held
    if shift > held_shift or (prefix >> (held_shift - shift)) > held_prefix:
        return None
    if (shift, prefix) == held:
        return rows
    keys = kernels.score_keys(rows.score)
    return rows.take((keys >> np.uint64(shift)) <= np.uint64(prefix))


def equal_count_block(scores: np.ndarray, cutoff: int) -> int:
    """How many rows of the block have exactly the cutoff key."""
    return int(np.count_nonzero(kernels.score_keys(scores) == np.uint64(cutoff)))


def issue_mask_block(
    scores: np.ndarray, cutoff: int, quota: int, dropped: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``is_label_issue`` for one block: in the top set, but the rows
    ``dropped`` (positions in the block: the near ties the given label
    wins, which the client knows from the top set's rows).  The near-tie
    flags are not read from the records: where the engine keeps the scores,
    the task reads 8 bytes a row instead of the records' 25 more."""
    if len(dropped) and (np.min(dropped) < 0 or np.max(dropped) >= len(scores)):
        raise IndexError(f"dropped rows outside the block's {len(scores)} rows")
    fast = fused.issue_mask(scores, cutoff, quota, dropped, out=out)
    if fast is not None:
        return fast
    mask = selected_block(scores, cutoff, quota)
    mask[dropped] = False
    if out is None:
        return mask
    out[...] = mask
    return out


def dropped_rows(winners: "Winners | None", starts: Sequence[int]) -> list[np.ndarray]:
    """Per block (first items ``starts``), the positions in it of the top
    set's rows that are no issue (near ties the given label wins), ascending."""
    if winners is None:
        return [np.zeros(0, dtype=np.int64)] * len(starts)
    rows = np.sort(winners.index[winners.reduce])
    cuts = np.searchsorted(rows, starts[1:])
    return [part - start for part, start in zip(np.split(rows, cuts), starts)]
