"""Aggregations as blueprints: how the states of a reduction merge and end.

A block task makes a state from its block (the ``chunk`` of flox's
aggregations); an :class:`Aggregation` says how any number of such states
merge (``combine``: associative, commutative and exact, so every tree of
merges gives the same bits) and what the merged state becomes
(``finalize``).  The engines run a blueprint as a tree of merges whose
last merge also finalizes, so what the next stage needs is made where the
merged state already is.

A block task whose rows are kept for later stages returns a :class:`Pair`:
the rows stay where the task ran, and only the state goes up the tree.

The blueprints of cleanlab.filter's methods (the confident joint, the
selections) are registered by :mod:`dask_labelissues.filters`, which the
package's import and a job that needs no confident joint do not load.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import states
from .states import CountState, HistogramState, OutlookState, ScoreState, ThresholdState, Winners


@dataclass(frozen=True, eq=False)
class Pair:
    """A block task's two results: per-row ``data`` kept where the task ran,
    and the small ``state`` that goes up a reduction's tree."""

    data: Any
    state: Any

    def __sizeof__(self) -> int:
        # What Dask counts a kept block as: else a few dozen bytes, and it
        # would neither spill the block when memory runs short nor weigh
        # moving it.
        return object.__sizeof__(self) + held_bytes(self.data) + held_bytes(self.state)


def held_bytes(x: Any) -> int:
    """Bytes ``x`` holds: an array's rows (of which ``sys.getsizeof`` counts
    none for a view), a state's as it says them (``__sizeof__``), summed
    over tuples and lists.  What Dask and the local reductions weigh."""
    if isinstance(x, (tuple, list)):
        return sum(held_bytes(v) for v in x)
    return int(getattr(x, "nbytes", None) or sys.getsizeof(x))


@dataclass(frozen=True)
class Aggregation:
    """A reduction's blueprint.

    Parameters
    ----------
    name
        What the engines call its merge tasks (the name a dashboard shows).
    combine
        Merges a list of states into one.
    finalize
        ``finalize(merged, *args)``, what the reduction returns; None
        returns the merged state itself.
    """

    name: str
    combine: Callable[[Sequence[Any]], Any]
    finalize: Callable[..., Any] | None = None

    def root(self, parts: Sequence[Any], *args: Any) -> Any:
        """The last merge of a tree: combine ``parts``, then finalize."""
        merged = self.combine(list(parts))
        return merged if self.finalize is None else self.finalize(merged, *args)


#: The blueprints by name; :func:`register` adds one.
AGGREGATIONS: dict[str, Aggregation] = {}


def register(aggregation: Aggregation) -> Aggregation:
    """Make ``aggregation`` known by its name; a name is registered once."""
    if aggregation.name in AGGREGATIONS:
        raise ValueError(f"an aggregation named {aggregation.name!r} is registered already")
    AGGREGATIONS[aggregation.name] = aggregation
    return aggregation


def _thresholds(state: ThresholdState) -> Pair:
    # None, not an exception, where pass one found bad input: the client
    # raises it from the state, as one line, while a task that raised would
    # also be logged with its traceback by a cluster worker.
    return Pair(None if state.problem is not None else state.finalize(), state)


def _first_bucket(state: ScoreState, estimation_method: str, n_rows: int) -> Pair:
    return Pair(states.first_bucket(state, estimation_method, n_rows), state)


def _combine_outlook(parts: Sequence[tuple[ThresholdState, OutlookState]]) -> tuple[ThresholdState, OutlookState]:
    return ThresholdState.combine([p[0] for p in parts]), OutlookState.combine([p[1] for p in parts])


def _outlook_bucket(merged: tuple[ThresholdState, OutlookState], n_rows: int) -> Pair:
    scan, outlook = merged
    thresholds = _thresholds(scan).data
    bucket = None if thresholds is None else outlook.bucket(thresholds, n_rows)
    return Pair((thresholds, bucket), merged)


#: Pass one: ``Pair(thresholds or None, merged ThresholdState)``.
THRESHOLDS = register(Aggregation("thresholds", ThresholdState.combine, _thresholds))
#: Pass one with each block's :class:`~dask_labelissues.states.OutlookState`:
#: ``Pair((thresholds, bucket), (ThresholdState, OutlookState))``.
THRESHOLDS_OUTLOOK = register(Aggregation("thresholds_outlook", _combine_outlook, _outlook_bucket))
#: Pass two: the merged :class:`~dask_labelissues.states.ScoreState`.
SCORES = register(Aggregation("scores", ScoreState.combine))
#: Pass two with the selection's first bucket:
#: ``Pair(first bucket or None, merged ScoreState)``.
FIRST_BUCKET = register(Aggregation("first_bucket", ScoreState.combine, _first_bucket))
#: A radix-select round's digit histogram.
HISTOGRAM = register(Aggregation("histogram", HistogramState.combine))
#: ``off_diagonal`` counts.
COUNTS = register(Aggregation("counts", CountState.combine))
#: Rows gathered from every block, in block order.
WINNERS = register(Aggregation("winners", Winners.combine))


def _sum_counts(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.sum(parts, axis=0, dtype=np.int64)


#: K x K counts, summed.
PAIR_COUNTS = register(Aggregation("pair_counts", _sum_counts))


def each(aggregation: Aggregation, optional: bool = False) -> Aggregation:
    """``aggregation`` for several problems side by side.

    Parameters
    ----------
    aggregation
        The blueprint of one problem's states.
    optional
        An entry may be None in every block (a problem with nothing to
        merge there); it stays None.

    Returns
    -------
    Aggregation
        A blueprint whose states are sequences of states, one a problem:
        entry ``p`` of every block's sequence merges with the others' entry
        ``p``, and the root finalizes each entry as ``aggregation`` would.
        Not registered: its name is ``aggregation``'s with ``-each``.
    """
    finalize = None
    if aggregation.finalize is not None:
        finalize = functools.partial(_finalize_each, aggregation.finalize, optional)
    return Aggregation(
        f"{aggregation.name}-each", functools.partial(_combine_each, aggregation.combine, optional), finalize
    )


def _combine_each(combine: Callable[[Sequence[Any]], Any], optional: bool, parts: Sequence[Sequence[Any]]) -> list[Any]:
    merged = []
    for p in range(len(parts[0])):
        entries = [part[p] for part in parts]
        merged.append(None if optional and entries[0] is None else combine(entries))
    return merged


def _finalize_each(finalize: Callable[..., Any], optional: bool, merged: Sequence[Any], *args: Any) -> list[Any]:
    return [None if optional and m is None else finalize(m, *args) for m in merged]
