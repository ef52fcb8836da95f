"""The serial engine: every block in this process, in order.

It is the reference the other engines are tested against.
"""

from __future__ import annotations

from typing import Any

from ..filters import FilterSpec
from ..kernels import ScoreSpec
from .local import LocalDriver, LocalJob, serial_mapper


def serial_driver(
    labels: Any,
    pred_probs: Any,
    spec: ScoreSpec,
    chunk_rows: int,
    *,
    progress: bool = False,
    spill_dir: str | None = None,
    fspec: FilterSpec | None = None,
) -> LocalDriver:
    """A driver over row-sliceable ``labels`` and ``pred_probs``."""
    job = LocalJob(labels, pred_probs, spec, chunk_rows, shared=False, spill_dir=spill_dir, fspec=fspec)
    return LocalDriver(job, serial_mapper(job), progress=progress)
