"""The job every engine runs, written once against a small driver interface.

A driver (dask, fork, serial) knows how to run a block task on every block
and merge the resulting states; this module knows the order of the passes.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .. import filters
from ..filters import FilterSpec, GroupTop, JointState, MaskRule
from ..kernels import ScoreSpec
from ..states import HistogramState, ScoreState, Selection, ThresholdState, Winners

#: What a block task can ask for in :meth:`Driver.reduce_blocks`: the block's
#: pass-one records, its joint records, its scores, its first row, and the
#: raw inputs (asking for ``probs`` reads pred_probs again).
SOURCES = ("rec", "joint", "scores", "start", "labels", "probs")


def distributed_client(client: Any = None) -> Any:
    """The distributed Client a job would run on: ``client``, or the
    scheduler Dask would use now if that is a Client; else None.

    Asks nothing of Dask where neither dask nor distributed is imported:
    no Client can exist then.
    """
    if client is not None:
        return client
    if "distributed" not in sys.modules or "dask" not in sys.modules:
        return None
    import dask.base
    from distributed import Client

    owner = getattr(dask.base.get_scheduler(), "__self__", None)
    return owner if isinstance(owner, Client) else None


def block_bounds(chunks: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive blocks with the given sizes."""
    stops = np.cumsum(chunks).tolist()
    starts = [0] + stops[:-1]
    return list(zip(starts, stops))


def even_chunks(n_rows: int, chunk_rows: int) -> tuple[int, ...]:
    """Row chunk sizes of ``chunk_rows`` each, the last one shorter."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    full, rest = divmod(n_rows, chunk_rows)
    return (chunk_rows,) * full + ((rest,) if rest else ())


def piece_bounds(start: int, stop: int, piece_rows: int | None) -> list[tuple[int, int]]:
    """Rows ``start:stop`` cut where a row index is a multiple of
    ``piece_rows`` (None: one piece), the pieces a block is read in.

    Cuts on that grid, not from ``start``: ``piece_rows`` is a whole number
    of storage chunks, so no piece decodes a chunk another piece of the
    block decodes too.
    """
    if piece_rows is None or stop <= start:
        return [(start, stop)]
    if piece_rows < 1:
        raise ValueError(f"piece_rows must be >= 1, got {piece_rows}")
    first = (start // piece_rows + 1) * piece_rows
    edges = [start, *range(first, stop, piece_rows), stop]
    return list(zip(edges[:-1], edges[1:]))


def group_chunks(chunks: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """Consecutive chunks grouped into blocks of about ``rows`` rows:
    ``[(first chunk, end chunk), ...]``.

    A group closes once it holds ``rows`` rows or more, so every group
    but the last holds at least ``rows`` and at most ``rows`` plus one
    chunk.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    groups, first, held = [], 0, 0
    for i, size in enumerate(chunks):
        held += size
        if held >= rows:
            groups.append((first, i + 1))
            first, held = i + 1, 0
    if first < len(chunks):
        groups.append((first, len(chunks)))
    return groups


def join_adjacent(parts: Sequence[np.ndarray]) -> np.ndarray | None:
    """Consecutive row pieces as one array, without a copy, where they lie
    end to end in one C-contiguous buffer (the chunks of a dask array made
    from one numpy array or memory map do); None where they do not.

    A block of many small chunks is then scanned in one kernel call, not
    one call (and one exact-sum conversion) per chunk.
    """
    first = parts[0]
    if len(parts) == 1:
        return first
    if not all(isinstance(part, np.ndarray) for part in parts) or first.dtype.hasobject:
        return None
    root = first
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags.c_contiguous:
        return None
    start = end = first.ctypes.data
    for part in parts:
        if (
            part.dtype != first.dtype or part.shape[1:] != first.shape[1:]
            or not part.flags.c_contiguous or part.ctypes.data != end
        ):
            return None
        end += part.nbytes
    offset = start - root.ctypes.data
    if offset < 0 or end - root.ctypes.data > root.nbytes:
        return None
    rows = sum(part.shape[0] for part in parts)
    return np.ndarray((rows, *first.shape[1:]), dtype=first.dtype, buffer=root, offset=offset)


class Driver(ABC):
    """What an engine must provide: one method per stage, each running a block
    task (from :mod:`dask_labelissues.states`) on every block and returning
    the merged state."""

    n_rows: int
    n_classes: int

    @abstractmethod
    def scan(self) -> ThresholdState:
        """Pass one: read every block once, keep its records, merge its state."""

    @abstractmethod
    def score(self, thresholds: np.ndarray) -> ScoreState:
        """Pass two: score every row (kept) and merge the score states."""

    def first_passes(self, select: bool) -> tuple[ThresholdState, ScoreState]:
        """Pass one, then pass two with pass one's thresholds.

        An engine may run the two as one job, with the thresholds made where
        the merged state is; with ``select`` it may also gather, in that job,
        the rows the selection will ask :meth:`gather_prefix` for next
        (:func:`dask_labelissues.states.first_bucket`), or rows sure to
        include them (:class:`dask_labelissues.states.OutlookState`).
        Either way the states returned are those of :meth:`scan` and
        :meth:`score`.
        """
        scan = self.scan()
        return scan, self.score(scan.finalize())

    @abstractmethod
    def histogram(self, round_index: int, prefix: int) -> HistogramState:
        """One radix-select round over the kept scores."""

    @abstractmethod
    def equal_counts(self, cutoff: int) -> list[int]:
        """Per block, the number of rows whose score key equals ``cutoff``."""

    @abstractmethod
    def gather(self, cutoff: int, quotas: list[int]) -> Winners:
        """The rows of the top set, from every block."""

    @abstractmethod
    def gather_prefix(self, shift: int, prefix: int) -> Winners:
        """The rows whose key prefix (``key >> shift``) is at most ``prefix``."""

    block_starts: list[int]

    @abstractmethod
    def outputs(self, cutoff: int, quotas: list[int]) -> dict[str, Any]:
        """The N-long outputs, possibly lazy: ``label_quality_scores``,
        ``is_label_issue``, ``given_label`` and ``predicted_label``."""

    # -- the filters of issue 6: a second read and generic block reductions --
    @abstractmethod
    def joint(self, thresholds: np.ndarray, fspec: FilterSpec) -> JointState:
        """Read pred_probs again: keep every block's joint records, merge the
        confident joint (:func:`dask_labelissues.filters.joint_block`)."""

    @abstractmethod
    def reduce_blocks(
        self, fn: Callable[..., Any], combine: Callable[[list], Any], needs: Sequence[str], args: tuple
    ) -> Any:
        """``fn(*sources, *args)`` on every block, merged with ``combine``;
        ``needs`` names the sources (see :data:`SOURCES`), in order."""

    @abstractmethod
    def gather_mask(self, rule: MaskRule) -> Winners:
        """The rows a filter flags, from every block, in row order."""

    @abstractmethod
    def filter_outputs(self, rule: MaskRule) -> dict[str, Any]:
        """As :meth:`outputs`, with ``is_label_issue`` from a filter's rule."""

    def close(self) -> None:
        """Release processes or pools the driver started."""


@dataclass
class RawResult:
    """What :func:`run` computes, before the API wraps it."""

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


def run(driver: Driver, spec: ScoreSpec) -> RawResult:
    """Run batched confident learning on a driver.

    1. pass one (scan) -> exact thresholds;
    2. pass two (score) -> the estimated number of issues T;
    3. radix select of the T lowest scores, ties by row index, finished on
       the client from the rows of the last bucket;
    4. gather the O(T) winners and drop the near ties the given label wins.
    """
    scan, pass_two = driver.first_passes(select=True)
    thresholds = scan.finalize()
    estimated = pass_two.counts.finalize(spec.estimation_method)
    selection = Selection.after_pass_two(pass_two, spec.estimation_method, driver.n_rows)

    cutoff, quotas, winners = 0, [], None
    if selection is not None:
        while selection.wants_round():
            selection.advance(driver.histogram(selection.round_index, selection.prefix))
        if selection.gathers_bucket():
            gathered = driver.gather_prefix(selection.shift, selection.prefix)
            winners, cutoff, quotas = selection.finish(gathered, driver.block_starts)  # ranked
        else:  # one key value shared by very many rows: split the tie per block
            cutoff = selection.prefix
            quotas = selection.quotas(driver.equal_counts(cutoff))
            winners = driver.gather(cutoff, quotas).ranked()
    arrays = driver.outputs(cutoff, quotas)

    k = driver.n_classes
    if winners is None:
        issues = np.zeros(0, dtype=np.int64)
        issue_scores = np.zeros(0, dtype=np.float64)
        per_class_issues = np.zeros(k, dtype=np.int64)
    else:
        keep = ~winners.reduce
        issues = winners.index[keep]
        issue_scores = winners.score[keep]
        per_class_issues = np.bincount(winners.label[keep], minlength=k).astype(np.int64)
    return RawResult(
        thresholds=thresholds,
        estimated_num_issues=estimated,
        issues=issues,
        issue_scores=issue_scores,
        per_class_count=scan.counts.copy(),
        per_class_issues=per_class_issues,
        arrays=arrays,
        reads=2 if spec.rereads else 1,
    )


def run_filter(driver: Driver, spec: ScoreSpec, fspec: FilterSpec, ranked: bool = True) -> RawResult:
    """Run one of cleanlab.filter's methods on a driver.

    1. pass one (scan) -> exact thresholds, per-row records;
    2. scores of ``spec`` for every row (from the records: the ranking);
    3. the second read -> the confident joint and per-row joint records
       (not needed by ``predicted_neq_given``);
    4. the client turns the joint into per-group counts
       (:func:`dask_labelissues.filters.plan`), and tree reductions select
       the rows of each group; a noise-rate cell the kept candidates cannot
       decide is recomputed from pred_probs (a third read, of those cells);
    5. every block's mask follows from its records and the selected rows;
       the flagged rows are gathered, ranked by score (ties by index) or,
       with ``ranked=False``, in row order.
    """
    k = driver.n_classes
    scan, _ = driver.first_passes(select=False)
    thresholds = scan.finalize()
    reads = 2 if spec.rereads else 1
    counts = scan.counts.copy()
    selected: tuple[np.ndarray, ...] = ()
    calibrated = None
    estimated = None
    if fspec.needs_joint:
        joint = driver.joint(thresholds, fspec)
        reads += 1
        estimated = joint.off_diagonal
        plan, calibrated = filters.plan(fspec, joint, counts)
        if plan.cells is not None:
            cells = plan.cells
            top = driver.reduce_blocks(
                filters.noise_rate_block, GroupTop.combine, ("joint", "rec", "start"), (cells,)
            )
            unsure = top.uncertain(cells.given)
            if unsure.size:
                exact = driver.reduce_blocks(
                    filters.exact_cells_block,
                    GroupTop.combine,
                    ("labels", "probs", "start"),
                    (cells.subset(unsure),),
                )
                reads += 1
                exact.group = unsure[exact.group]
                top = top.replace_groups(unsure, exact)
            selected += (top.rows(),)
        if plan.class_limits is not None:
            top = driver.reduce_blocks(
                filters.class_block, GroupTop.combine, ("joint", "rec", "start"),
                (plan.class_limits, plan.class_enough),
            )
            selected += (top.rows(),)
        if fspec.filter_by.startswith("low_"):
            field = "p_label" if fspec.filter_by == "low_self_confidence" else "margin_score"
            top = driver.reduce_blocks(
                filters.lowest_block, GroupTop.combine, ("joint", "start"),
                (field, plan.lowest, plan.lowest_enough),
            )
            selected += (top.rows(),)
    rule = MaskRule(fspec.filter_by, selected)
    winners = driver.gather_mask(rule)
    if ranked:
        winners = winners.ranked()
    arrays = driver.filter_outputs(rule)
    if estimated is None:
        estimated = int(winners.index.size)
    return RawResult(
        thresholds=thresholds,
        estimated_num_issues=int(estimated),
        issues=winners.index,
        issue_scores=winners.score,
        per_class_count=counts,
        per_class_issues=np.bincount(winners.label, minlength=k).astype(np.int64),
        arrays=arrays,
        reads=reads,
        confident_joint=calibrated,
        num_label_issues=None if calibrated is None else int(estimated),
    )


@dataclass
class JointResult:
    """What :func:`run_joint` computes: dataset health's inputs."""

    thresholds: np.ndarray
    per_class_count: np.ndarray
    confident_joint: np.ndarray  # calibrated, (K, K) int64
    num_label_issues: int
    reads: int


def joint_of(driver: Driver, thresholds: np.ndarray, counts: np.ndarray, spec: ScoreSpec) -> tuple[np.ndarray, int]:
    """The calibrated confident joint and cleanlab's ``num_label_issues``
    from one more read of pred_probs, after pass one (no per-row records
    are kept)."""
    state = driver.reduce_blocks(
        filters.joint_counts_block, JointState.combine, ("rec", "probs"), (thresholds, spec.kernel)
    )
    return filters.calibrate(state.matrix(driver.n_classes), counts), int(state.off_diagonal)


def run_joint(driver: Driver, spec: ScoreSpec) -> JointResult:
    """Pass one (the exact thresholds), then the confident joint: two reads."""
    scan = driver.scan()
    thresholds = scan.finalize()
    counts = scan.counts.copy()
    calibrated, off_diagonal = joint_of(driver, thresholds, counts, spec)
    return JointResult(thresholds, counts, calibrated, off_diagonal, reads=2)
