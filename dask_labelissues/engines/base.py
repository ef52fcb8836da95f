"""The interface every engine provides: a few generic block primitives.

The pipelines (:mod:`dask_labelissues.pipelines`) are written once against
these primitives; an engine holds no algorithm.  A primitive may run at once or
when a later one needs it (the Dask engine sends everything between two
computes as one graph, so stages follow each other with no stop at the client):
the results are the same bits.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np

from ..aggregations import Aggregation, Pair
from ..kinds import ROWS, Kind
from .blocks import BlockPlan

#: Fan-in of every engine's reductions.
SPLIT_EVERY = 16


class Blocks:
    """Opaque handle: one result per block of a :meth:`Engine.map`."""


class Value:
    """Opaque handle: the result of an :meth:`Engine.reduce` (a later map
    gets its ``data`` where it is a :class:`~dask_labelissues.aggregations.Pair`)."""


@dataclass(frozen=True)
class Column:
    """An item-long output (:meth:`Engine.column`): tasks write their block's
    rows in place, in a buffer the one-machine engines share with workers."""

    index: int
    dtype: np.dtype


@dataclass(frozen=True)
class PerBlock:
    """A task argument with a value of its own for each block."""

    values: Sequence[Any]


def data_of(result: Any) -> Any:
    """A task's rows where its result is a :class:`~dask_labelissues.aggregations.Pair`, else the result."""
    return result.data if isinstance(result, Pair) else result


class _Marker(Enum):
    # A member unpickles as itself: a task sent to a worker process still holds the marker.
    INPUTS = "INPUTS"
    START = "START"


#: Task argument: the block's inputs, a :class:`~.blocks.BlockReader`.
INPUTS = _Marker.INPUTS
#: Task argument: the job's index of the block's first item.
START = _Marker.START


class Engine(ABC):
    """Runs block tasks over a job's blocks (:func:`~.blocks.plan_blocks`).

    Attributes
    ----------
    labels, pred_probs
        The job's inputs, as the engine reads them.
    kind
        How a block of stored rows becomes items (:mod:`dask_labelissues.kinds`).
    plan
        The job's blocks (:class:`~.blocks.BlockPlan`), in stored rows.
    n_items, n_classes
        Items (rows, pixels) and classes of the job.
    starts, item_bounds
        Each block's first item, and its items' ``(start, stop)``.
    fuses_stages
        True where maps and reductions between two computes run as one
        job, so a pipeline gains by chaining stages before it computes.
    """

    fuses_stages: bool = False

    def __init__(self, labels: Any, pred_probs: Any, plan: BlockPlan, kind: Kind = ROWS) -> None:
        self.labels, self.pred_probs = labels, pred_probs
        self.plan = plan
        self.kind = kind
        self.items_per_row = kind.items_per_row(pred_probs.shape)
        self.n_items = int(pred_probs.shape[0]) * self.items_per_row
        self.n_classes = kind.n_classes(pred_probs.shape)
        # Made once: every block task of a one-machine engine looks them up.
        self.item_bounds = [(a * self.items_per_row, b * self.items_per_row) for a, b in plan.bounds]
        self.starts = [a for a, _ in self.item_bounds]

    @abstractmethod
    def column(self, dtype: Any) -> Column:
        """Declare an item-long output of ``dtype``, before any map has run
        (the fork engine's workers share the columns that exist as they start)."""

    @abstractmethod
    def map(self, task: Callable[..., Any], *args: Any, out: Column | None = None, label: str | None = None) -> Blocks:
        """``task(*args)`` on every block.  An argument is a handle of
        earlier results (:class:`Blocks`: the block's own; a
        :class:`Value`: the same for all), :data:`INPUTS` (the block's
        :class:`~.blocks.BlockReader`), :data:`START` (the block's first
        item), :class:`PerBlock` values, or a plain value.

        With ``out``, the task also gets ``out=`` the block's rows of that
        column (None where the engine keeps no such buffer) and returns a
        :class:`~dask_labelissues.aggregations.Pair` of those rows and a
        state: later maps get the rows, reductions and computes the state.
        Without ``out``, what the task returns is the block's result, whole.
        ``label`` names the stage in progress bars."""

    @abstractmethod
    def reduce(self, blocks: Blocks, aggregation: Aggregation, *args: Any) -> Value:
        """The states of ``blocks`` merged by ``aggregation``, whose root
        also finalizes with ``args``."""

    @abstractmethod
    def compute(self, *handles: Blocks | Value, keep: Sequence[Blocks] = ()) -> list[Any]:
        """Each handle's content (a :class:`Value`'s value; a list of a
        :class:`Blocks`' results, their states for a map with ``out``),
        computed together; the blocks of ``keep`` are kept for later stages
        rather than computed again.  A map with ``out`` whose states a
        reduction took has only its rows kept: the one-machine engines
        refuse to compute its states with or after that reduction (list
        the blocks before it, in one compute, to have both)."""

    @abstractmethod
    def to_array(self, blocks: Blocks, dtype: Any, row_shape: tuple[int, ...] | None = None) -> Any:
        """The blocks' rows as one array (lazy where the engine is):
        item-long, or with ``row_shape``, of shape ``(stored rows,
        *row_shape)`` (the pixels of each image as ``(H, W)``)."""

    def close(self) -> None:
        """Release processes or pools the engine started."""


def distributed_client(client: Any = None) -> Any:
    """The distributed Client a job would run on: ``client``, or the
    scheduler Dask would use now if that is a Client; else None.

    Asks nothing of Dask where distributed (which imports dask) is not
    imported yet: no Client can exist then.
    """
    if client is not None or "distributed" not in sys.modules:
        return client
    import dask.base
    from distributed import Client

    owner = getattr(dask.base.get_scheduler(), "__self__", None)
    return owner if isinstance(owner, Client) else None
