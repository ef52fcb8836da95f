"""The jobs, written once against the engines' primitives.

:func:`run` is batched confident learning with its selection,
:func:`run_filter` one of cleanlab.filter's methods, :func:`run_joint`
dataset health's confident joint.  Each is a sequence of maps of the block
tasks below over an engine's blocks, reductions of their states by the
blueprints of :mod:`dask_labelissues.aggregations` (the filters' in
:mod:`dask_labelissues.filters`), and computes
(:class:`dask_labelissues.engines.base.Engine`); the engine decides where
and when each runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import fused, kernels, states
from .aggregations import (
    FIRST_BUCKET, HISTOGRAM, PAIR_COUNTS, SCORES, THRESHOLDS, THRESHOLDS_OUTLOOK, WINNERS, Pair,
)
from .engines.base import INPUTS, START, Blocks, Engine, PerBlock
from .engines.blocks import BlockReader
from .kernels import ScoreSpec
from .sentences import block_offsets, sentence_block
from .states import CountState, InputValueError, OutlookState, ScoreState, Selection, ThresholdState, Winners

# cleanlab.filter's methods and their blueprints are imported by the
# functions that use them (``from . import filters``): the package's import
# and a job that needs no confident joint do not load them.
if TYPE_CHECKING:
    from .filters import Cells, FilterSpec, GroupTop, JointState, MaskRule

#: Most classes for which pass one also keeps each block's
#: :class:`~dask_labelissues.states.OutlookState` (see :func:`_outlook`).
#: A block's state is K x 16 or more counts: at most 128 KB up to here,
#: where a block's records (25 bytes a row, about 64 MB of pred_probs a
#: block) are about 400 KB; with more classes the state would outgrow the
#: records it sits beside.
OUTLOOK_MAX_CLASSES = 1024


# -- block tasks ------------------------------------------------------------------
def _into(out: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``rows`` written into the block's share of a column, where the engine
    keeps one (``out``), and the rows as the task returns them."""
    if out is None:
        return rows
    out[...] = rows
    return out


def scan_block(block: BlockReader, spec: ScoreSpec, outlook: bool, out: np.ndarray | None = None) -> Pair:
    """Pass one on a block: its records and threshold state
    (:func:`dask_labelissues.states.scan_block`), read in the block's
    pieces, so the task holds one piece of pred_probs at a time however
    large its block; the labels (a few bytes an item) are read once.  With
    ``outlook``, the state is ``(threshold state, OutlookState)``."""
    labels = block.labels()
    rec = np.empty(len(labels), dtype=spec.record_dtype()) if out is None else out
    parts = []
    for a, probs in block.pieces():
        b = a + len(probs)
        parts.append(states.scan_block(labels[a:b], probs, block.item_start + a, spec, out=rec[a:b])[1])
        # Freed before the next piece is read (BlockReader.pieces): with two
        # alive, a cluster's workers took a third more page faults a job.
        del probs
    state = parts[0] if len(parts) == 1 else ThresholdState.combine(parts)
    kind = block.kind
    if kind.checks_stored and (kind.pools or state.problem is not None or kind.label_problem(block.stored_labels())):
        # Bad values are named by the stored values they are in, not the
        # items pooled (or set aside) from them.
        state.problem = kind.stored_problem(
            block.stored_labels(), block.stored_probs(), block.start, spec.row_sum_tolerance
        )
    if outlook:
        state = (state, OutlookState.chunk(rec, len(state.counts)))
    return Pair(rec, state)


def score_block(
    rec: np.ndarray, thresholds: np.ndarray | None, spec: ScoreSpec, block: BlockReader | None,
    out: np.ndarray | None = None,
) -> Pair:
    """Pass two on a block (:func:`dask_labelissues.states.score_block`);
    ``block`` is read again where the score needs pred_probs cell by cell.
    No thresholds (pass one found bad input): no scores, and a state that
    selects nothing."""
    if thresholds is None:
        return Pair(None, ScoreState.empty())
    labels = probs = None
    if block is not None:
        labels, probs = block.labels(), block.probs()
    return Pair(*states.score_block(rec, thresholds, spec, labels, probs, out=out))


def count_block(
    rec: np.ndarray, root: tuple[np.ndarray | None, tuple[int, int] | None], spec: ScoreSpec, start: int
) -> tuple[CountState | None, Winners | None]:
    """Pass two's count, and the outlook's bucket rows
    (:func:`dask_labelissues.states.outlook_count_block`); nothing where
    pass one found bad input."""
    thresholds, bucket = root
    if thresholds is None:
        return None, None
    return states.outlook_count_block(rec, thresholds, spec, bucket, start)


def bucket_rows(rec: np.ndarray, scores: np.ndarray, bucket: tuple[int, int] | None, start: int) -> Winners | None:
    """:func:`dask_labelissues.states.prefix_winners` for the selection's
    first bucket, if pass two's state named one."""
    return None if bucket is None or scores is None else states.prefix_winners(rec, scores, *bucket, start)


def joint_block(
    rec: np.ndarray, block: BlockReader, thresholds: np.ndarray, fspec: FilterSpec, kernel: str,
    out: np.ndarray | None = None, with_joint: bool = True,
) -> Pair:
    """A filter's second read of a block (:func:`dask_labelissues.filters.joint_block`)."""
    from . import filters

    rows, state = filters.joint_block(rec, block.probs(), thresholds, fspec, kernel, with_joint)
    rows = _into(out, rows)
    return Pair(rows, state)


def joint_counts_block(rec: np.ndarray, block: BlockReader, thresholds: np.ndarray, kernel: str) -> JointState:
    """A block's part of the confident joint alone (dataset health)."""
    from . import filters

    return filters.joint_counts_block(rec, block.probs(), thresholds, kernel)


def exact_cells_block(block: BlockReader, cells: Cells) -> GroupTop:
    """A block's candidates for undecided cells, from pred_probs itself."""
    from . import filters

    return filters.exact_cells_block(block.labels(), block.probs(), block.item_start, cells)


def flag_block(
    rule: MaskRule, rec: np.ndarray, joint: np.ndarray | None, scores: np.ndarray, start: int,
    ranked: bool = False, out: np.ndarray | None = None,
) -> Pair:
    """A filter's ``is_label_issue`` for a block, and its flagged rows, in
    item order or (``ranked``) by score, ties by item: ranked in the
    blocks, where the kernels are loaded, the caller's ranking of all of
    them merges runs."""
    from . import filters

    mask = filters.mask_block(rule, rec, joint, start)
    mask = _into(out, mask)
    flagged = Winners.chunk(rec, scores, mask, start)
    return Pair(mask, flagged.ranked() if ranked else flagged)


def issue_mask_block(
    scores: np.ndarray, cutoff: int, quota: int, dropped: np.ndarray, out: np.ndarray | None = None
) -> Pair:
    """``is_label_issue`` for a block (:func:`dask_labelissues.states.issue_mask_block`)."""
    return Pair(states.issue_mask_block(scores, cutoff, quota, dropped, out=out), None)


# -- the jobs ---------------------------------------------------------------------
@dataclass(eq=False)
class RawResult:
    """What :func:`run` or :func:`run_filter` computes, before the API wraps it."""

    thresholds: np.ndarray
    estimated_num_issues: int
    issues: np.ndarray
    issue_scores: np.ndarray
    per_class_count: np.ndarray
    per_class_issues: np.ndarray
    arrays: dict[str, Any]
    reads: int = 1
    confident_joint: np.ndarray | None = None
    #: cleanlab's ``count.num_label_issues``, where the joint was computed.
    num_label_issues: int | None = None


@dataclass(eq=False)
class Passes:
    """What the first two passes leave: states, kept blocks, and rows
    gathered ahead for the selection."""

    scan: ThresholdState
    score: ScoreState
    thresholds: np.ndarray
    records: Blocks
    scores: Blocks
    prefetched: tuple[tuple[int, int], Winners] | None = None


def first_passes(engine: Engine, spec: ScoreSpec, columns: dict[str, Any], select: bool) -> Passes:
    """Pass one, then pass two with pass one's thresholds.

    Both go to the engine before anything is computed, with the
    thresholds made by the last merge of pass one's tree, so an engine
    that fuses stages runs them as one job with no stop at the client.
    With ``select``, the rows the selection will ask for first are
    gathered in the same job (:func:`dask_labelissues.states.first_bucket`,
    or :func:`_outlook`).  A score that reads pred_probs again computes
    pass one first: in one job, each block's second read could run early
    and be held until pass two, every block of pred_probs in memory.
    Bad input found in pass one is raised here.
    """
    outlook_ok = not spec.adjust_pred_probs and spec.estimation_method == "off_diagonal"
    if select and engine.fuses_stages and outlook_ok and engine.n_classes <= OUTLOOK_MAX_CLASSES:
        return _outlook(engine, spec, columns)
    records = engine.map(scan_block, INPUTS, spec, False, out=columns["records"], label="pass 1: reading pred_probs")
    root = engine.reduce(records, THRESHOLDS)
    if spec.rereads:
        (done,) = engine.compute(root, keep=[records])
        done.state.raise_problem()
    reread = INPUTS if spec.rereads else None
    scores = engine.map(score_block, records, root, spec, reread, out=columns["scores"], label="pass 2: scoring")
    if select:
        score_root = engine.reduce(scores, FIRST_BUCKET, spec.estimation_method, engine.n_items)
        rows = engine.map(bucket_rows, records, scores, score_root, START)
        scan, score, gathered = engine.compute(root, score_root, rows, keep=[records, scores])
        scan.state.raise_problem()
        prefetched = None
        if score.data is not None:
            prefetched = (score.data, Winners.combine([r for r in gathered if r is not None]))
        return Passes(scan.state, score.state, scan.data, records, scores, prefetched)
    score_root = engine.reduce(scores, SCORES)
    scan, score = engine.compute(root, score_root, keep=[records, scores])
    scan.state.raise_problem()
    return Passes(scan.state, score, scan.data, records, scores)


def _outlook(engine: Engine, spec: ScoreSpec, columns: dict[str, Any]) -> Passes:
    """Both passes and the first bucket's rows as one stage after pass one,
    for scores that pass one's records already hold.

    Pass one's tasks also make each block's
    :class:`~dask_labelissues.states.OutlookState`; the root of its tree
    makes the thresholds and, from the merged outlook, a bucket whose rows
    include the T lowest scores whatever T turns out to be.  Then one task
    per block counts T and takes that bucket's rows.  Against the other
    plan this has no pass-two tree and no stage after pass two: from the
    end of pass one to the end of the last task, 2 workers on (a) took
    0.24 s there, for 0.08 s of work each, and 0.12 s this way, for 0.06 s
    each (task-stream traces, medians of 4 jobs).  The scores are then the
    records' own, made again by each later stage that reads them, so none
    are kept.
    """
    records = engine.map(scan_block, INPUTS, spec, True, out=columns["records"], label="pass 1: reading pred_probs")
    root = engine.reduce(records, THRESHOLDS_OUTLOOK, engine.n_items)
    counts = engine.map(count_block, records, root, spec, START)
    (done, parts) = engine.compute(root, counts, keep=[records])
    scan, outlook = done.state
    scan.raise_problem()
    thresholds, bucket = done.data
    scores = engine.map(states.block_scores, records, thresholds, spec)
    prefetched = None
    if bucket is not None:
        prefetched = (bucket, Winners.combine([rows for _, rows in parts]))
    score = ScoreState(CountState.combine([c for c, _ in parts]), outlook.digits)
    return Passes(scan, score, thresholds, records, scores, prefetched)


def _columns(engine: Engine, spec: ScoreSpec, fspec: FilterSpec | None = None, dtype: Any = None) -> dict[str, Any]:
    """The item-long outputs a job writes, declared before its first map."""
    columns = {
        "records": engine.column(spec.record_dtype()),
        "scores": engine.column(np.float64),
        "mask": engine.column(np.bool_),
    }
    if fspec is not None and fspec.needs_joint:
        columns["joint"] = engine.column(fspec.joint_dtype(engine.n_classes, np.dtype(dtype)))
    return columns


def _outputs(engine: Engine, spec: ScoreSpec, passes: Passes, mask: Blocks) -> dict[str, Any]:
    records = engine.to_array(passes.records, spec.record_dtype())
    return {
        "label_quality_scores": engine.to_array(passes.scores, np.float64),
        "is_label_issue": engine.to_array(mask, np.bool_),
        "given_label": records["label"],
        "predicted_label": records["pred"],
    }


def _gather(engine: Engine, task: Any, *args: Any) -> Winners:
    return Winners.combine(engine.compute(engine.map(task, *args))[0])


def run(engine: Engine, spec: ScoreSpec, health: bool = False) -> RawResult:
    """Batched confident learning.

    1. pass one -> exact thresholds;
    2. pass two -> the estimated number of issues T;
    3. radix select of the T lowest scores, ties by item index, finished
       on the client from the rows of the last bucket;
    4. gather the O(T) winners and drop the near ties the given label wins.

    With ``health``, also the calibrated confident joint (one more read).
    """
    columns = _columns(engine, spec)
    passes = first_passes(engine, spec, columns, select=True)
    estimated = passes.score.counts.finalize(spec.estimation_method)
    records, scores = passes.records, passes.scores
    cutoff, quotas, winners = lowest_scores(engine, spec, passes)
    dropped = PerBlock(states.dropped_rows(winners, engine.starts))
    mask = engine.map(issue_mask_block, scores, cutoff, PerBlock(quotas), dropped, out=columns["mask"])

    k = engine.n_classes
    if winners is None:
        issues = np.zeros(0, dtype=np.int64)
        issue_scores = np.zeros(0, dtype=np.float64)
        per_class_issues = np.zeros(k, dtype=np.int64)
    else:
        keep = ~winners.reduce
        issues = winners.index[keep]
        issue_scores = winners.score[keep]
        per_class_issues = np.bincount(winners.label[keep], minlength=k).astype(np.int64)
        del winners, keep  # O(T) rows, not needed by the stages below
    result = RawResult(
        thresholds=passes.thresholds,
        estimated_num_issues=estimated,
        issues=issues,
        issue_scores=issue_scores,
        per_class_count=passes.scan.counts.copy(),
        per_class_issues=per_class_issues,
        arrays=_outputs(engine, spec, passes, mask),
        reads=2 if spec.rereads else 1,
    )
    if health:
        result.confident_joint, result.num_label_issues = joint_of(
            engine, records, passes.thresholds, result.per_class_count, spec
        )
        result.reads += 1
    return result


def _narrow(engine: Engine, selection: Selection, scores: Blocks) -> None:
    """The selection's radix rounds, each a tree reduction of the kept
    scores' digit histograms, until its bucket is small enough to gather."""
    while selection.wants_round():
        digits = engine.map(states.HistogramState.chunk, scores, selection.round_index, selection.prefix)
        selection.advance(engine.compute(engine.reduce(digits, HISTOGRAM))[0])


def lowest_scores(engine: Engine, spec: ScoreSpec, passes: Passes) -> tuple[int, list[int], Winners | None]:
    """The T lowest scores after both passes: the cut-off score key and each
    block's quota of rows at that key (ties by item index), and their rows,
    ranked (None where T is 0).

    A radix select, its rounds tree reductions over the kept scores,
    finished on the client from the rows of the last bucket (gathered with
    the passes where they could be).
    """
    selection = Selection.after_pass_two(passes.score, spec.estimation_method, engine.n_items)
    records, scores = passes.records, passes.scores
    cutoff, quotas, winners = 0, [], None
    if selection is not None:
        _narrow(engine, selection, scores)
        if selection.gathers_bucket():
            gathered = None
            if passes.prefetched is not None:
                # Used once: held on, these O(T) rows would stay alive
                # through the stages after the selection.
                (held, rows), passes.prefetched = passes.prefetched, None
                gathered = states.narrow_prefix(rows, held, selection.shift, selection.prefix)
                del rows
            if gathered is None:
                gathered = _gather(engine, states.prefix_winners, records, scores, selection.shift, selection.prefix, START)
            winners, cutoff, quotas = selection.finish(gathered, engine.starts)  # ranked
        else:  # one key value shared by very many rows: split the tie per block
            cutoff = selection.prefix
            equal = engine.compute(engine.map(states.equal_count_block, scores, cutoff))[0]
            quotas = selection.quotas([int(c) for c in equal])
            winners = _gather(engine, states.top_winners, records, scores, cutoff, PerBlock(quotas), START).ranked()
    return cutoff, quotas or [0] * len(engine.starts), winners


def _select(engine: Engine, task: Any, *args: Any) -> GroupTop:
    from . import filters

    return engine.compute(engine.reduce(engine.map(task, *args), filters.GROUP_TOP))[0]


def run_filter(
    engine: Engine, spec: ScoreSpec, fspec: FilterSpec, dtype: Any, ranked: bool = True, health: bool = False,
    confident_joint: np.ndarray | None = None,
) -> RawResult:
    """One of cleanlab.filter's methods.

    1. pass one -> exact thresholds, per-item records;
    2. scores of ``spec`` for every item (from the records: the ranking);
    3. the second read -> the confident joint and per-item joint records
       (not needed by ``predicted_neq_given``);
    4. the client turns the joint into per-group counts
       (:func:`dask_labelissues.filters.plan`), and tree reductions select
       the items of each group; a noise-rate cell the kept candidates
       cannot decide is recomputed from pred_probs (a third read, of those
       cells);
    5. every block's mask follows from its records and the selected items;
       the flagged items are gathered, ranked by score (ties by index) or,
       with ``ranked=False``, in item order.

    ``dtype``: pred_probs' dtype, which the joint records keep.  With
    ``health``, the calibrated confident joint even where the filter needs
    none (one more read).  ``confident_joint``: the caller's, checked by
    :func:`~dask_labelissues.filters.given_joint`, which the prune filters
    count from instead of the data's (the second read still makes each
    item's joint record, which the selections need).
    """
    from . import filters

    k = engine.n_classes
    columns = _columns(engine, spec, fspec, dtype)
    passes = first_passes(engine, spec, columns, select=False)
    records = passes.records
    reads = 2 if spec.rereads else 1
    counts = passes.scan.counts.copy()
    selected: tuple[np.ndarray, ...] = ()
    calibrated = estimated = joint = None
    if fspec.needs_joint:
        joint = engine.map(
            joint_block, records, INPUTS, passes.thresholds, fspec, spec.kernel,
            out=columns["joint"], label="second read: confident joint",
        )
        (state,) = engine.compute(engine.reduce(joint, filters.JOINT), keep=[joint])
        reads += 1
        estimated = state.off_diagonal
        plan, calibrated = filters.plan(fspec, state, counts, confident_joint)
        if fspec.selects:
            tops = engine.map(filters.selection_candidates, plan, fspec, joint, records, START)
            (merged,) = engine.compute(engine.reduce(tops, filters.SELECTIONS))
            cells_top = merged[0]
            if cells_top is not None:
                unsure = cells_top.uncertain(plan.cells.given)
                if unsure.size:
                    exact = _select(engine, exact_cells_block, INPUTS, plan.cells.subset(unsure))
                    reads += 1
                    merged[0] = filters.decided(cells_top, unsure, exact)
            selected = tuple(top.rows() for top in merged if top is not None)
    rule = filters.MaskRule(fspec.filter_by, selected)
    # Each task gets only its own block's share of the selected rows.
    rules = PerBlock([rule.restrict(a, b) for a, b in engine.item_bounds])
    flags = engine.map(flag_block, rules, records, joint, passes.scores, START, ranked, out=columns["mask"])
    (winners,) = engine.compute(engine.reduce(flags, WINNERS), keep=[flags])
    if ranked:
        winners = winners.ranked()
    if health and calibrated is None:
        calibrated, joint_issues = joint_of(engine, records, passes.thresholds, counts, spec)
        reads += 1
    if estimated is None:
        estimated = int(winners.index.size)
    return RawResult(
        thresholds=passes.thresholds,
        estimated_num_issues=int(estimated),
        issues=winners.index,
        issue_scores=winners.score,
        per_class_count=counts,
        per_class_issues=np.bincount(winners.label, minlength=k).astype(np.int64),
        arrays=_outputs(engine, spec, passes, flags),
        reads=reads,
        confident_joint=calibrated,
        num_label_issues=None if calibrated is None else int(estimated if joint is not None else joint_issues),
    )


@dataclass(eq=False)
class JointResult:
    """What :func:`run_joint` computes: dataset health's inputs."""

    thresholds: np.ndarray
    per_class_count: np.ndarray
    confident_joint: np.ndarray  # calibrated, (K, K) int64
    num_label_issues: int
    reads: int


def joint_of(engine: Engine, records: Blocks, thresholds: np.ndarray, counts: np.ndarray, spec: ScoreSpec) -> tuple[np.ndarray, int]:
    """The calibrated confident joint and cleanlab's ``num_label_issues``
    from one more read of pred_probs, after pass one (no per-item joint
    records are kept)."""
    from . import filters

    parts = engine.map(joint_counts_block, records, INPUTS, thresholds, spec.kernel, label="second read: confident joint")
    (state,) = engine.compute(engine.reduce(parts, filters.JOINT))
    return filters.calibrate(state.matrix(engine.n_classes), counts), int(state.off_diagonal)


def run_joint(engine: Engine, spec: ScoreSpec) -> JointResult:
    """Pass one (the exact thresholds), then the confident joint: two reads."""
    records_column = engine.column(spec.record_dtype())
    records = engine.map(scan_block, INPUTS, spec, False, out=records_column, label="pass 1: reading pred_probs")
    (root,) = engine.compute(engine.reduce(records, THRESHOLDS), keep=[records])
    root.state.raise_problem()
    counts = root.state.counts.copy()
    calibrated, off_diagonal = joint_of(engine, records, root.data, counts, spec)
    return JointResult(root.data, counts, calibrated, off_diagonal, reads=2)


# -- semantic segmentation ----------------------------------------------------------
@dataclass(eq=False)
class PixelResult:
    """What :func:`run_segmentation` computes."""

    #: ``(N, H, W)`` bool, lazy where the engine is.
    mask: Any
    #: T, on the grid the issues were found on (pixels, or tiles).
    estimated_num_issues: int
    thresholds: np.ndarray
    per_class_count: np.ndarray
    #: K x K counts of (given, predicted) over the flagged pixels.
    pair_counts: np.ndarray
    #: Reads of pred_probs the job made.
    reads: int = 1
    #: ``(N,)`` float64 softmin scores of the images, where the job made
    #: them (a ``temperature``, and no tiles); else None.
    image_scores: np.ndarray | None = None
    #: ``(N, H, W)`` float64 self-confidence of each pixel, lazy where the
    #: engine is; where ``image_scores`` is made, else None.
    pixel_scores: Any = None


def pixel_mask_block(
    rec: np.ndarray, scores: np.ndarray, cutoff: int, quota: int, block: BlockReader | None, factor: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """A block's issue mask, pixel by pixel: among the T lowest scores and
    not predicted as its given label; and the K x K counts of (given,
    predicted) over its flagged pixels.

    With ``factor`` > 1 the items are ``factor`` x ``factor`` tiles: a
    selected tile marks each of its pixels whose own argmax (``block``,
    read again) is not its own label.
    """
    selected = states.selected_block(scores, cutoff, quota)
    if factor == 1:
        mask = selected & (rec["pred"] != rec["label"])
        given, predicted = rec["label"][mask], rec["pred"][mask]
    else:
        labels, probs = block.stored_labels(), block.stored_probs()
        n, h, w = labels.shape
        tiles = selected.reshape(n, h // factor, w // factor)
        argmax = probs.argmax(axis=1)
        mask = np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2) & (argmax != labels)
        ignored = block.kind.ignored(labels)
        if ignored is not None:
            mask &= ~ignored
        given, predicted = labels[mask], argmax[mask]
        mask = mask.reshape(-1)
    pairs = np.bincount(given.astype(np.int64) * k + predicted, minlength=k * k).reshape(k, k)
    return mask, pairs


def mask_of(marked: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return marked[0]


def pairs_of(marked: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return marked[1]


def pixel_scores_of(engine: Engine, spec: ScoreSpec, records: Blocks, image_shape: tuple[int, int]) -> Any:
    """Pass one's scores (each pixel's self-confidence) as ``(N, H, W)``,
    lazy where the engine is."""
    scores = engine.to_array(records, spec.record_dtype(), row_shape=image_shape)["score"]
    if isinstance(scores, np.ndarray):
        # A copy of the field, 8 bytes a pixel: a view would keep the whole
        # records column (25 bytes a pixel, or its spill file) alive.
        scores = np.ascontiguousarray(scores)
    return scores


def run_segmentation(
    engine: Engine, spec: ScoreSpec, image_shape: tuple[int, int], factor: int = 1, temperature: float | None = None
) -> PixelResult:
    """cleanlab.segmentation's label issues: every pixel (or tile, with
    ``factor`` > 1, the engine's kind pooling them) is an item of batched
    confident learning; the T lowest self-confidences, minus pixels whose
    argmax is their label, make the ``(N, H, W)`` mask, written block by
    block from the selection's cut-off (a second read of pred_probs where
    tiles are checked pixel by pixel), with the (given, predicted) counts
    of the flagged pixels.  A class of ignored pixels (the kind's
    ``ignored_class``) is left out of the results.

    With ``temperature`` and no tiles, also the image and pixel scores of
    :func:`run_pixel_scores`, from the same read: pass one's records hold
    each pixel's self-confidence.  Tiles' records hold tiles' scores, not
    pixels', so with ``factor`` > 1 the scores are left to that job."""
    k = engine.n_classes
    real = k if engine.kind.ignored_class is None else engine.kind.ignored_class
    columns = {"records": engine.column(spec.record_dtype()), "scores": engine.column(np.float64)}
    passes = first_passes(engine, spec, columns, select=False)
    cutoff, quotas = lowest_cutoff(engine, spec, passes)
    reread = INPUTS if factor > 1 else None
    marked = engine.map(pixel_mask_block, passes.records, passes.scores, cutoff, PerBlock(quotas), reread, factor, k)
    pair_root = engine.reduce(engine.map(pairs_of, marked), PAIR_COUNTS)
    scored = temperature is not None and factor == 1
    if scored:
        pixels = int(np.prod(image_shape))
        images = engine.map(image_softmin_block, passes.records, pixels, temperature, engine.kind.ignored_class)
        # The records were kept by pass one, for the mask as for these.
        pairs, parts = engine.compute(pair_root, images, keep=[marked])
    else:
        (pairs,) = engine.compute(pair_root, keep=[marked])
    return PixelResult(
        mask=engine.to_array(engine.map(mask_of, marked), np.bool_, row_shape=image_shape),
        estimated_num_issues=passes.score.counts.finalize(spec.estimation_method),
        thresholds=passes.thresholds[:real],
        per_class_count=passes.scan.counts[:real].copy(),
        pair_counts=pairs[:real, :real],
        reads=2 if factor > 1 else 1,
        image_scores=np.concatenate(parts) if scored else None,
        pixel_scores=pixel_scores_of(engine, spec, passes.records, image_shape) if scored else None,
    )


def lowest_cutoff(engine: Engine, spec: ScoreSpec, passes: Passes) -> tuple[int, list[int]]:
    """The T lowest scores' cut-off key and per-block quotas, as
    :func:`lowest_scores` finds them, gathering only the rows of the last
    bucket (at most :data:`~dask_labelissues.states.CANDIDATE_CAP`), not
    the T rows: T may be billions of pixels."""
    n = len(engine.starts)
    selection = Selection.after_pass_two(passes.score, spec.estimation_method, engine.n_items)
    if selection is None:
        return 0, [0] * n
    _narrow(engine, selection, passes.scores)
    if selection.gathers_bucket():
        bucket = _gather(
            engine, states.bucket_rows_block, passes.records, passes.scores, selection.shift, selection.prefix, START
        )
        return selection.cut(bucket, engine.starts)
    equal = engine.compute(engine.map(states.equal_count_block, passes.scores, selection.prefix))[0]
    return selection.prefix, selection.quotas([int(c) for c in equal])


def image_softmin_block(rec: np.ndarray, pixels: int, temperature: float, ignored: int | None = None) -> np.ndarray:
    """Each image's softmin of its pixels' self-confidence: the scores
    weighted by a softmax of ``(1 - score) / temperature``, shifted by each
    image's largest exponent so that no weight overflows.  Pixels of label
    ``ignored`` weigh nothing; an image of nothing else scores 1."""
    s = rec["score"].reshape(-1, pixels)
    x = (1.0 - s) / temperature
    if ignored is None:
        weights = np.exp(x - x.max(axis=1, keepdims=True))
        return np.einsum("ij,ij->i", s, weights) / weights.sum(axis=1)
    kept = rec["label"].reshape(-1, pixels) != ignored
    x = np.where(kept, x, -np.inf)
    top = x.max(axis=1, keepdims=True)
    weights = np.exp(x - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=1)
    out = np.ones(len(s))
    some = total > 0
    out[some] = np.einsum("ij,ij->i", s[some], weights[some]) / total[some]
    return out


def run_pixel_scores(
    engine: Engine, spec: ScoreSpec, image_shape: tuple[int, int], temperature: float
) -> tuple[np.ndarray, Any]:
    """Image scores (softmin, ``(N,)``) and pixel scores (self-confidence,
    ``(N, H, W)``, lazy where the engine is), from one read of pred_probs,
    which pass one's checks of the input come with."""
    records = engine.map(
        scan_block, INPUTS, spec, False, out=engine.column(spec.record_dtype()), label="reading pred_probs"
    )
    root = engine.reduce(records, THRESHOLDS)
    pixels = int(np.prod(image_shape))
    images = engine.map(image_softmin_block, records, pixels, temperature, engine.kind.ignored_class)
    done, parts = engine.compute(root, images, keep=[records])
    done.state.raise_problem()
    return np.concatenate(parts), pixel_scores_of(engine, spec, records, image_shape)


def run_sentence_scores(
    engine: Engine, spec: ScoreSpec, offsets: np.ndarray, method: str, temperature: float
) -> tuple[np.ndarray, Any]:
    """Sentence scores and token scores, from one read of pred_probs, which
    pass one's checks of the input come with.

    The engine's blocks end at sentence offsets (its plan's ``cuts``), so
    each block's task scores its own whole sentences from its tokens'
    records (:func:`sentence_scan_block`): only the ``(N,)`` sentence
    scores come back here, the token scores stay a column of the engine,
    and no records are kept.

    Parameters
    ----------
    engine
        The job's engine, its blocks cut at ``offsets``.
    spec
        The token score (records with a ``score`` field: no adjusted
        pred_probs).
    offsets
        ``(N + 1,)`` sentence offsets, from 0 to T.
    method, temperature
        The sentence score (:func:`dask_labelissues.sentences.sentence_scores`).

    Returns
    -------
    sentence_scores : numpy.ndarray
        ``(N,)`` float64.
    token_scores : numpy.ndarray or dask.array.Array
        ``(T,)`` float64, lazy where the engine is.

    Raises
    ------
    ValueError
        A block that cuts a sentence, or bad input (pass one's).
    """
    if spec.adjust_pred_probs:
        raise ValueError("token scores of adjusted pred_probs need the thresholds: not a score of pass one")
    per_block = PerBlock(block_offsets(offsets, engine.item_bounds))
    tokens = engine.map(
        sentence_scan_block, INPUTS, spec, per_block, method, temperature, out=engine.column(np.float64),
        label="reading pred_probs",
    )
    (parts,) = engine.compute(tokens, keep=[tokens])
    problems = [problem for problem, _ in parts if problem is not None]
    if problems:
        first = min(problems, key=lambda problem: problem.row)
        raise InputValueError(first.message, first.row)
    return np.concatenate([scores for _, scores in parts]), engine.to_array(tokens, np.float64)


def sentence_scan_block(
    block: BlockReader, spec: ScoreSpec, offsets: np.ndarray, method: str, temperature: float,
    out: np.ndarray | None = None,
) -> Pair:
    """Pass one on a block of whole sentences and its sentences' scores, in
    one task: the records (25 bytes a token) live only in the task, and the
    block's token scores (8 bytes a token) go to ``out``.

    Returns
    -------
    Pair
        The token scores, and as the state ``(first bad value or None,
        (n_block,) sentence scores)``.
    """
    scanned = scan_block(block, spec, False)
    scored = sentence_block(scanned.data, offsets, method, temperature, out=out)
    return Pair(scored.data, (scanned.state.problem, scored.state))


def scored_block(
    block: BlockReader, score: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray | None, Any]]
) -> tuple[np.ndarray | None, Any]:
    """``score(stored labels, stored pred_probs, first row)`` of a block:
    its rows' scores and its first bad value (an
    :class:`~dask_labelissues.kernels.InputProblem`, or None)."""
    return score(block.stored_labels(), block.stored_probs(), block.start)


def _rows_of(scored: tuple[np.ndarray | None, Any]) -> np.ndarray | None:
    return scored[0]


def _problem_of(scored: tuple[np.ndarray | None, Any]) -> Any:
    return scored[1]


def run_row_scores(
    engine: Engine, score: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray | None, Any]],
    row_shape: tuple[int, ...] | None = None,
) -> Any:
    """A float64 score of every stored row, from a function of each block's
    stored values (one read of pred_probs), for data kinds whose scores
    need no thresholds (multi-label's aggregated class scores).

    Parameters
    ----------
    engine
        The job's engine.
    score
        ``score(stored labels, stored pred_probs, first row)`` ->
        ``(scores, None)``, or ``(None, first bad value)`` (an
        :class:`~dask_labelissues.kernels.InputProblem`).
    row_shape
        The shape of a row's scores (None: one score a row).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(N,)`` or ``(N, *row_shape)`` float64, lazy where the engine is.

    Raises
    ------
    InputValueError
        The first bad value of all, by row, as pass one raises it.
    """
    parts = engine.map(scored_block, INPUTS, score, label="scoring")
    (problems,) = engine.compute(engine.map(_problem_of, parts), keep=[parts])
    problems = [p for p in problems if p is not None]
    if problems:
        first = min(problems, key=lambda p: p.row)
        raise InputValueError(first.message, first.row)
    return engine.to_array(engine.map(_rows_of, parts), np.float64, row_shape=row_shape)


def warm_up(spec: ScoreSpec, fspec: FilterSpec | None, k: int, dtype: Any, planes: bool = False) -> None:
    """Run every stage's kernels on one made-up row, in this process.

    The fork engine calls it before it forks and before a job goes to its
    kept workers: workers then inherit numba's compiled kernels (kept
    ones load those of later jobs from the cache once); otherwise every
    worker of every job imports numba and loads them from its cache again
    (0.73 s per job on the development machine, whatever its size; 0.07 s
    with this).  The
    scan runs on a read-only row too: blocks of a memory-mapped file are
    read-only, and numba keeps a kernel per writeability of its arguments.
    """
    probs = np.full((1, k), 1.0 / k, dtype=dtype)
    label = np.zeros(1, dtype=np.int64)
    rec, _ = states.scan_block(label, probs, 0, spec)
    probs.setflags(write=False)
    label.setflags(write=False)
    states.scan_block(label, probs, 0, spec)
    if planes:  # images' pred_probs, read as class planes
        for writeable in (True, False):
            view = probs.reshape(1, k, 1).copy()
            view.setflags(write=writeable)
            states.scan_block(label, kernels.Planes(view), 0, spec)
    if not spec.rereads:
        scores, _ = states.score_block(rec, np.full(k, 2.0), spec)
        states.prefix_rows_block(scores, 0, 0)
        states.issue_mask_block(scores, 0, 0, np.zeros(0, dtype=np.int64))
    # The selection ranks a block's rows by radix where numba is loaded.
    fused.key_order(np.zeros(2, dtype=np.uint64))
    if fspec is not None and fspec.needs_joint:
        fused.joint_rows(probs, label, label, np.full(k, 2.0), min(1, k - 1), spec.kernel)
