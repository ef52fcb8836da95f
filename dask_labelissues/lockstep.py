"""Several filter jobs over the same blocks, each stage one read for all.

Multi-label data is K binary problems over the same stored rows (class
``k`` against the rest: :class:`~dask_labelissues.kinds.OneVsRest`).  Run
one after another, as :func:`dask_labelissues.pipelines.run_filter` runs
one, they would read pred_probs two to four times a class.  Here every
stage of the filter runs for all the problems in one map over the blocks:
a task reads its block once and runs each problem's kernels on that
problem's view of it (:meth:`~dask_labelissues.engines.blocks.BlockReader.views`),
and each reduction merges every problem's states side by side
(:func:`dask_labelissues.aggregations.each`).  The reads do not grow
with the number of problems: 2 to 5 in all, one a stage.

No item-long columns are kept between stages: a problem's records (32
bytes an item) and joint records are made again from the block by each
stage that needs them, because they are larger than the stored values
they come from (4 bytes a class of a row, for float32 multi-label data).
The block tasks are :mod:`dask_labelissues.pipelines`' own, so every
problem's mask, issues, scores and thresholds are those of its own
:func:`~dask_labelissues.pipelines.run_filter`, bit for bit; its
calibrated confident joint is computed only where its filter selects by
counts (not for confident_learning, whose mask needs no whole joint).
Blocks are read whole, so the engine is built with
``single_read=False`` (one piece a block).

A problem whose noise-rate selection reads no kept candidate
(prune_by_noise_rate, or rows that keep every other class, as each binary
problem of multi-label data does; see :func:`by_buckets`) is not
selected from gathered candidates, whose number grows with the rows
flagged: the joint's read also counts each cell's pairs by the bucket of
their key (:class:`~dask_labelissues.filters.BucketCut`), the
selections' read gathers only each cell's boundary bucket, and the last
read chooses a block's rows from its own pred_probs.  Same reads, same
rows chosen.  Token classification runs its default filter here, as one
problem.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from . import filters
from .aggregations import PAIR_COUNTS, THRESHOLDS, WINNERS, Pair, each
from .engines.base import INPUTS, START, Engine, PerBlock
from .engines.blocks import BlockReader
from .filters import GROUP_TOP, JOINT, SELECTIONS, FilterSpec, MaskRule, Plan
from .kernels import ScoreSpec
from .kinds import Kind
from .pipelines import exact_cells_block, flag_block, joint_block, scan_block, score_block
from .states import Winners

@dataclass
class ProblemsResult:
    """What :func:`run_filters` computes: the problems side by side.

    ``mask`` is ``(items, P)`` bool (lazy where the engine is), column
    ``p`` the ``is_label_issue`` of problem ``p``, or ``(items,)``, an
    item's issue in any problem (``per_problem=False``), or None where it
    was not asked for (``mask=False``); the lists hold
    one entry a problem.  ``issues`` and ``issue_scores`` are None where
    they were not asked for (``issues=False``).
    """

    mask: Any
    issues: list[np.ndarray] | None
    issue_scores: list[np.ndarray] | None
    thresholds: list[np.ndarray]
    per_class_count: list[np.ndarray]
    #: The calibrated confident joints (None where the filter selects nothing).
    confident_joints: list[np.ndarray | None]
    #: Reads of pred_probs, for all the problems together.
    reads: int
    #: ``row_scores``' scores of every stored row (lazy where the engine
    #: is), made by the last read; None without ``row_scores``.
    row_scores: Any = None
    #: ``(P, classes)`` int64: each problem's flagged items per given label
    #: (for one-vs-rest problems, column 1 counts a class given and likely
    #: absent, column 0 a class left out and likely present).
    flagged_by_label: np.ndarray | None = None


#: Rows a slab of :func:`column_major_copy` moves at a time.
TRANSPOSE_ROWS = 4096


def column_major_copy(a: np.ndarray) -> np.ndarray:
    """``a`` with its columns contiguous (Fortran order).

    A 2-D array is moved a slab of :data:`TRANSPOSE_ROWS` rows at a time: a
    slab's columns stay in cache while they are written out, where numpy's
    whole-array copy went through memory once a value (200,000 x 50
    float32: 20 ms against 70 ms on the development machine).

    Parameters
    ----------
    a
        An array of any dimension (only 2-D arrays are moved in slabs).

    Returns
    -------
    numpy.ndarray
        The same values, Fortran-contiguous.
    """
    a = np.asarray(a)
    if a.ndim != 2 or a.flags.f_contiguous:
        return np.asfortranarray(a)
    n = a.shape[0]
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    for start in range(0, n, TRANSPOSE_ROWS):
        out[:, start : start + TRANSPOSE_ROWS] = a[start : start + TRANSPOSE_ROWS].T
    return out.T


def _views(block: BlockReader, kinds: Sequence[Kind]) -> list[BlockReader]:
    """The block read once, as each problem's items; stored column by
    column where every problem takes one column
    (:class:`~dask_labelissues.kinds.OneVsRest`), which each then reads at
    memory speed, not one strided value a row."""
    one_column = all(kind.one_column for kind in kinds)
    return block.views(kinds, layout=column_major_copy if one_column else None)


class _Views:
    """A task's block, read once, as each problem sees it, with each
    problem's records made once in the task however many steps of the task
    use them."""

    def __init__(self, block: BlockReader, kinds: Sequence[Kind], spec: ScoreSpec) -> None:
        self.spec = spec
        self.views = _views(block, kinds)
        self._records: dict[int, Pair] = {}

    def view(self, p: int) -> BlockReader:
        return self.views[p]

    def scan(self, p: int) -> Pair:
        """Problem ``p``'s pass one on the block: ``Pair(records, ThresholdState)``."""
        if p not in self._records:
            self._records[p] = scan_block(self.views[p], self.spec, False)
        return self._records[p]

    def joint(self, p: int, thresholds: np.ndarray, fspec: FilterSpec, with_joint: bool = True) -> Pair:
        """Problem ``p``'s joint records and, ``with_joint``, its part of the confident joint."""
        return joint_block(
            self.scan(p).data, self.views[p], thresholds, fspec, self.spec.kernel, with_joint=with_joint
        )

    def drop(self, p: int) -> None:
        """Let go of problem ``p``'s records: a task holds one problem's at a time."""
        self._records.pop(p, None)


# -- block tasks ------------------------------------------------------------------
def thresholds_block(block: BlockReader, kinds: Sequence[Kind], spec: ScoreSpec) -> list[Any]:
    """Pass one of every problem on one read of the block.

    Parameters
    ----------
    block
        The block's reader (the engine's :data:`~dask_labelissues.engines.base.INPUTS`).
    kinds
        The problems, as views of the block's stored rows.
    spec
        The score and kernel.

    Returns
    -------
    list of ThresholdState
        One a problem.
    """
    views = _Views(block, kinds, spec)
    states = []
    for p in range(len(kinds)):
        states.append(views.scan(p).state)
        views.drop(p)
    return states


def joints_block(
    block: BlockReader, kinds: Sequence[Kind], spec: ScoreSpec, fspecs: Sequence[FilterSpec],
    thresholds: Sequence[np.ndarray], bucketed: Sequence[bool] | None = None,
) -> list[Any]:
    """Every problem's part of its confident joint, on one read of the block.

    Parameters
    ----------
    block, kinds, spec
        As :func:`thresholds_block`.
    fspecs, thresholds
        Each problem's filter and exact thresholds.
    bucketed
        Per problem, also count its noise-rate candidates by key bucket
        (:func:`~dask_labelissues.filters.key_counts`); None: none.

    Returns
    -------
    list of JointState
        One a problem.
    """
    views = _Views(block, kinds, spec)
    states = []
    for p in range(len(kinds)):
        if bucketed is not None and bucketed[p] and fspecs[p].filter_by == "prune_by_noise_rate":
            # No later stage reads its joint records: the counts alone,
            # without the candidates, which cost 4 times as much (20 classes).
            state = filters.joint_counts_block(views.scan(p).data, views.view(p).probs(), thresholds[p], spec.kernel)
        else:
            state = views.joint(p, thresholds[p], fspecs[p]).state
        if bucketed is not None and bucketed[p]:
            counts = filters.key_counts(views.view(p).probs(), views.scan(p).data["label"])
            state = replace(state, key_counts=counts)
        states.append(state)
        views.drop(p)
    return states


def selections_block(
    block: BlockReader, start: int, kinds: Sequence[Kind], spec: ScoreSpec, fspecs: Sequence[FilterSpec],
    thresholds: Sequence[np.ndarray], plans: Sequence[Plan | None],
) -> list[tuple[Any, ...] | None]:
    """Every problem's candidates for each selection its plan makes, on one
    read of the block.

    Parameters
    ----------
    block, start, kinds, spec, fspecs, thresholds
        As :func:`joints_block`; ``start``, the block's first item.
    plans
        Each problem's selections (None: it selects nothing).

    Returns
    -------
    list
        Per problem, None, or ``(noise-rate, class, lowest)``
        :class:`~dask_labelissues.filters.GroupTop` candidates (None for a
        selection its filter does not make).
    """
    views = _Views(block, kinds, spec)
    out: list[tuple[Any, ...] | None] = []
    for p, plan in enumerate(plans):
        if plan is None:
            out.append(None)
            continue
        boundary = None
        if plan.bucket_cut is not None:
            view = views.view(p)
            boundary = plan.bucket_cut.boundary(view.probs(), view.labels(), start)
            if fspecs[p].filter_by == "prune_by_noise_rate":
                # Its boundary buckets alone: no records needed.
                out.append((boundary, None, None))
                continue
        joint = views.joint(p, thresholds[p], fspecs[p], with_joint=False).data
        found = filters.selection_candidates(plan, fspecs[p], joint, views.scan(p).data, start)
        out.append(found if boundary is None else (boundary, *found[1:]))
        views.drop(p)
    return out


def exact_block(block: BlockReader, kinds: Sequence[Kind], cells: Sequence[filters.Cells | None]) -> list[Any]:
    """Candidates from pred_probs itself for the noise-rate cells the kept
    candidates could not decide.

    Parameters
    ----------
    block, kinds
        As :func:`thresholds_block`.
    cells
        Each problem's undecided cells (None: it has none).

    Returns
    -------
    list
        Per problem, a :class:`~dask_labelissues.filters.GroupTop` or None.
    """
    return [None if c is None else exact_cells_block(view, c) for view, c in zip(_views(block, kinds), cells)]


def flags_block(
    block: BlockReader, start: int, kinds: Sequence[Kind], spec: ScoreSpec, fspecs: Sequence[FilterSpec],
    thresholds: Sequence[np.ndarray], rules: Sequence[MaskRule],
    row_scores: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, per_problem: bool = True,
    issues: bool = True,
) -> tuple[np.ndarray, list[Winners] | np.ndarray, np.ndarray | None]:
    """Every problem's flags for the block, on one read of it.

    Parameters
    ----------
    block, start, kinds, spec, fspecs, thresholds
        As :func:`selections_block`.
    rules
        Each problem's mask rule, restricted to the block.
    row_scores
        ``row_scores(stored labels, stored pred_probs)``: a score of each
        stored row, made in the same read (None: none).
    per_problem
        The mask as ``(items, P)`` columns, one a problem; False: one
        column, whether any problem flags the item.
    issues
        Each problem's flagged rows with their scores; False: only how
        many it flags of each given label.

    Returns
    -------
    tuple
        The mask; each problem's flagged rows with their scores
        (:class:`~dask_labelissues.states.Winners`), or ``(P, classes)``
        int64 counts of them by given label; and the row scores or None.
    """
    views = _Views(block, kinds, spec)
    scored = None if row_scores is None else row_scores(block.stored_labels(), block.stored_probs())
    masks, found = [], []
    for p in range(len(kinds)):
        rec = views.scan(p).data
        joint = views.joint(p, thresholds[p], fspecs[p], with_joint=False).data if fspecs[p].mask_reads_joint else None
        rule = rules[p].resolved(views.view(p).probs(), rec["label"], start) if rules[p].bucketed else rules[p]
        if issues:
            scores = score_block(rec, thresholds[p], spec, views.view(p) if spec.rereads else None).data
            flagged = flag_block(rule, rec, joint, scores, start)
            masks.append(flagged.data)
            found.append(flagged.state)
        else:
            masks.append(filters.mask_block(rule, rec, joint, start))
            found.append(np.bincount(rec["label"][masks[-1]], minlength=thresholds[p].shape[0]))
        views.drop(p)
    mask = np.stack(masks, axis=1)
    states = found if issues else np.stack(found).astype(np.int64)
    return (mask if per_problem else mask.any(axis=1)), states, scored


def _mask(flags: tuple[np.ndarray, list[Winners], Any]) -> np.ndarray:
    return flags[0]


def _found(flags: tuple[np.ndarray, Any, Any]) -> Any:
    return flags[1]


def _row_scores(flags: tuple[np.ndarray, list[Winners], Any]) -> np.ndarray:
    return flags[2]


# -- the job ----------------------------------------------------------------------
def run_filters(
    engine: Engine, spec: ScoreSpec, kinds: Sequence[Kind], fspecs: Sequence[FilterSpec], ranked: bool = True,
    row_scores: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, per_problem: bool = True,
    confident_joints: Sequence[np.ndarray | None] | None = None, issues: bool = True, mask: bool = True,
) -> ProblemsResult:
    """cleanlab.filter's method of each ``fspecs[p]`` on problem ``kinds[p]``,
    each stage for all problems on one read of pred_probs.

    1. pass one -> every problem's exact thresholds (bad input raised
       here: the first bad value by row, then by problem);
    2. where a filter selects rows by counts (not confident_learning or
       predicted_neq_given, which flag each row by its own records), the
       second read -> every confident joint; the client plans each
       problem's selections from its joint;
    3. where a plan selects, a read for every problem's candidates (of a
       bucketed problem, its boundary buckets' only), and one more for the
       noise-rate cells their kept candidates cannot decide;
    4. the last read -> the masks, each problem's flagged rows and, with
       ``row_scores``, a score of every stored row.

    Parameters
    ----------
    engine
        The job's engine, built with ``single_read=False`` and items one a
        stored row, as every problem's kind has them.
    spec
        The score that ranks each problem's issues, and the kernel.
    kinds
        The problems: views of the engine's stored rows
        (:class:`~dask_labelissues.kinds.OneVsRest` for multi-label data).
    fspecs
        Each problem's filter.
    ranked
        Each problem's issues ranked by ``spec``'s score (ties by item);
        False: in item order.
    row_scores
        ``row_scores(stored labels, stored pred_probs)`` -> a float64
        score a stored row (multi-label's aggregated scores), made in the
        last read; None: none.
    per_problem
        The mask as one column a problem; False: one column, an item's
        issue in any problem (1 byte an item back, not P).
    confident_joints
        A confident joint per problem (or None) for its prune filter to
        count from instead of the data's, as
        :func:`~dask_labelissues.pipelines.run_filter` takes one.
    issues
        Gather each problem's flagged items; False: only their counts by
        given label (the lists grow with the issues, and a caller that
        wants the mask needs none of them).
    mask
        Make the mask; False: None, and the last read's blocks are not
        kept for it (an item-long byte a problem, held to the end).

    Returns
    -------
    ProblemsResult
        Each problem's mask, issues, scores and thresholds are those
        :func:`~dask_labelissues.pipelines.run_filter` gives it alone.
    """
    n = len(kinds)
    if len(fspecs) != n:
        raise ValueError(f"{n} problems but {len(fspecs)} filters")
    kinds, fspecs = tuple(kinds), tuple(fspecs)
    done = _pass_one(engine, kinds, spec)
    thresholds = [d.data for d in done]
    counts = [d.state.counts.copy() for d in done]
    reads = 1

    plans: list[Plan | None] = [None] * n
    calibrated: list[np.ndarray | None] = [None] * n
    # A filter that selects nothing flags a row from its own joint record,
    # which the last read makes: its whole joint is not needed then.
    if any(f.selects for f in fspecs):
        bucketed = [by_buckets(f, t.shape[0]) for f, t in zip(fspecs, thresholds)]
        joints = engine.map(
            joints_block, INPUTS, kinds, spec, fspecs, thresholds, bucketed if any(bucketed) else None,
            label="second read: confident joints",
        )
        (states,) = engine.compute(engine.reduce(joints, each(JOINT)))
        reads += 1
        for p in range(n):
            if fspecs[p].selects:
                given = None if confident_joints is None else confident_joints[p]
                plans[p], calibrated[p] = filters.plan(fspecs[p], states[p], counts[p], given)
                if bucketed[p] and plans[p].cells is not None:
                    cut = filters.BucketCut.plan(plans[p].cells, states[p].key_counts)
                    plans[p] = replace(plans[p], bucket_cut=cut)
        del states

    selected: list[tuple[np.ndarray, ...]] = [() for _ in range(n)]
    merged: list[Any] = []
    if any(plan is not None for plan in plans):
        tops = engine.map(selections_block, INPUTS, START, kinds, spec, fspecs, thresholds, plans,
                          label="reading for the selections")
        (merged,) = engine.compute(engine.reduce(tops, each(SELECTIONS, optional=True)))
        reads += 1
        reads += _decide_cells(engine, kinds, plans, merged)
        for p, m in enumerate(merged):
            if m is not None:
                cut = plans[p].bucket_cut
                selected[p] = tuple(
                    cut.with_last(top) if i == 0 and cut is not None else top.rows()
                    for i, top in enumerate(m) if top is not None
                )

    rules = [MaskRule(f.filter_by, s) for f, s in zip(fspecs, selected)]
    per_block = PerBlock([[rule.restrict(a, b) for rule in rules] for a, b in engine.item_bounds])
    # Each block's share is all the flags stage needs of the selections.
    del merged, selected, rules
    flags = engine.map(flags_block, INPUTS, START, kinds, spec, fspecs, thresholds, per_block, row_scores,
                       per_problem, issues, label="flagging the issues")
    found = engine.reduce(engine.map(_found, flags), each(WINNERS) if issues else PAIR_COUNTS)
    (found,) = engine.compute(found, keep=[flags] if mask or row_scores is not None else [])
    reads += 1
    winners = None
    if issues:
        winners = [w.ranked() for w in found] if ranked else found
        by_label = np.stack([np.bincount(w.label, minlength=engine.n_classes) for w in winners]).astype(np.int64)
    else:
        by_label = found
    return ProblemsResult(
        mask=engine.to_array(engine.map(_mask, flags), np.bool_, row_shape=(n,) if per_problem else None)
        if mask else None,
        issues=None if winners is None else [w.index for w in winners],
        issue_scores=None if winners is None else [w.score for w in winners],
        thresholds=thresholds,
        per_class_count=counts,
        confident_joints=calibrated,
        reads=reads,
        row_scores=None if row_scores is None else engine.to_array(engine.map(_row_scores, flags), np.float64),
        flagged_by_label=by_label,
    )


#: Noise-rate selections by buckets of the keys (:class:`~dask_labelissues.filters.BucketCut`)
#: where a problem allows them; False: by candidates, as every problem once was.
BUCKETED_SELECTIONS = True

#: Most bytes of one problem's bucket counts in a block's joint state.
BUCKET_COUNTS_BYTES = 1 << 20


def by_buckets(fspec: FilterSpec, k: int) -> bool:
    """Whether a problem of ``k`` classes selects its noise-rate cells by
    buckets: where its counts stay small and no kept candidate is read
    (prune_by_noise_rate, whose selection and mask the buckets decide
    alone, unless its candidates were set) or every row keeps every other
    class as one (two classes: each one-vs-rest problem of multi-label
    data), so no cell is left undecided.  Its candidates, which grow with
    the rows flagged (2,000,000 x 100 multi-label: about 18 million, 213 MB
    merged), are then never gathered."""
    unread = fspec.filter_by == "prune_by_noise_rate" and fspec.candidates == filters.CANDIDATES
    return (
        BUCKETED_SELECTIONS and fspec.by_noise_rate and (unread or fspec.kept_candidates(k) == k - 1)
        and k * (k - 1) * (filters.KEY_BUCKETS + 1) * 4 <= BUCKET_COUNTS_BYTES
    )


def _pass_one(engine: Engine, kinds: Sequence[Kind], spec: ScoreSpec) -> list[Pair]:
    """Every problem's pass one on one read: ``Pair(thresholds, state)`` a
    problem; bad input raised, the first bad row and of that row the first
    problem (class) (min keeps the first of equal rows)."""
    scans = engine.map(thresholds_block, INPUTS, kinds, spec, label="pass 1: reading pred_probs")
    (done,) = engine.compute(engine.reduce(scans, each(THRESHOLDS)))
    bad = [d.state for d in done if d.state.problem is not None]
    if bad:
        min(bad, key=lambda state: state.problem.row).raise_problem()
    return done


def _decide_cells(engine: Engine, kinds: Sequence[Kind], plans: Sequence[Plan | None], merged: list[Any]) -> int:
    """Each problem's noise-rate cells its kept candidates cannot decide,
    recomputed from pred_probs for all problems in one read; the merged
    selections are updated in place.  Returns the reads made (0 or 1)."""
    unsure: list[np.ndarray | None] = [None] * len(kinds)
    for p, m in enumerate(merged):
        if m is None or m[0] is None or plans[p].bucket_cut is not None:
            # A bucket cut's problems keep every other class: all decided.
            continue
        found = m[0].uncertain(plans[p].cells.given)
        if found.size:
            unsure[p] = found
    if all(u is None for u in unsure):
        return 0
    cells = [None if u is None else plans[p].cells.subset(u) for p, u in enumerate(unsure)]
    exact = engine.map(exact_block, INPUTS, kinds, cells, label="reading undecided cells")
    (tops,) = engine.compute(engine.reduce(exact, each(GROUP_TOP, optional=True)))
    for p, u in enumerate(unsure):
        if u is not None:
            merged[p][0] = filters.decided(merged[p][0], u, tops[p])
    return 1


def scores_block(
    block: BlockReader, kinds: Sequence[Kind], spec: ScoreSpec, thresholds: Sequence[np.ndarray],
    combine: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Every problem's item scores on one read of the block.

    Parameters
    ----------
    block, kinds, spec
        As :func:`thresholds_block`; ``spec`` may adjust pred_probs by the
        thresholds.
    thresholds
        Each problem's exact thresholds.
    combine
        ``(items, P)`` scores to what the task returns (None: the scores).

    Returns
    -------
    numpy.ndarray
        ``(items, P)`` float64 scores, or what ``combine`` makes of them.
    """
    views = _Views(block, kinds, spec)
    columns = []
    for p in range(len(kinds)):
        rec = views.scan(p).data
        columns.append(score_block(rec, thresholds[p], spec, views.view(p) if spec.rereads else None).data)
        views.drop(p)
    scores = np.stack(columns, axis=1)
    return scores if combine is None else combine(scores)


def run_problem_scores(
    engine: Engine, spec: ScoreSpec, kinds: Sequence[Kind],
    combine: Callable[[np.ndarray], np.ndarray] | None = None, row_shape: tuple[int, ...] | None = None,
) -> Any:
    """Every problem's scores of ``spec``, which may need the thresholds
    (adjusted pred_probs): pass one for all problems on one read, then the
    scores for all on another.

    Parameters
    ----------
    engine
        As :func:`run_filters`.
    spec
        The score.
    kinds
        The problems.
    combine
        A block's ``(items, P)`` scores to its rows' scores (multi-label's
        aggregation over the classes); None keeps them.
    row_shape
        The shape of an item's result: ``(P,)`` without ``combine``, None
        for one score an item.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Lazy where the engine is.
    """
    kinds = tuple(kinds)
    done = _pass_one(engine, kinds, spec)
    scores = engine.map(scores_block, INPUTS, kinds, spec, [d.data for d in done], combine, label="scoring")
    return engine.to_array(scores, np.float64, row_shape=row_shape)
