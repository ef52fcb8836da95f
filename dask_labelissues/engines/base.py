"""The job every engine runs, written once against a small driver interface.

A driver (dask, fork, serial) knows how to run a block task on every block
and merge the resulting states; this module knows the order of the passes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..kernels import ScoreSpec
from ..states import HistogramState, ScoreState, Selection, ThresholdState, Winners


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


def run(driver: Driver, spec: ScoreSpec) -> RawResult:
    """Run batched confident learning on a driver.

    1. pass one (scan) -> exact thresholds;
    2. pass two (score) -> the estimated number of issues T;
    3. radix select of the T lowest scores, ties by row index, finished on
       the client from the rows of the last bucket;
    4. gather the O(T) winners and drop the near ties the given label wins.
    """
    scan = driver.scan()
    thresholds = scan.finalize()
    pass_two = driver.score(thresholds)
    estimated = pass_two.counts.finalize(spec.estimation_method)
    target = min(estimated, driver.n_rows)

    cutoff, quotas, winners = 0, [], None
    if target > 0:
        selection = Selection(target)
        selection.advance(pass_two.first_digits)
        while selection.wants_round():
            selection.advance(driver.histogram(selection.round_index, selection.prefix))
        if selection.gathers_bucket():
            gathered = driver.gather_prefix(selection.shift, selection.prefix)
            winners, cutoff, quotas = selection.finish(gathered, driver.block_starts)
        else:  # one key value shared by very many rows: split the tie per block
            cutoff = selection.prefix
            quotas = selection.quotas(driver.equal_counts(cutoff))
            winners = driver.gather(cutoff, quotas)
        winners = winners.ranked()
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
    )
