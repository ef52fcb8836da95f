"""Engines that run block tasks over a job's blocks (:mod:`.base`).

``dask`` runs on any Dask scheduler, ``threads`` on a pool of threads, ``fork``
on forked processes, ``serial`` in this process, one block after another: the
reference.  :func:`make_engine` chooses among them (``backend="auto"``).
"""

from .base import INPUTS, START, Blocks, Column, Engine, PerBlock, Value
from .blocks import BlockConfig, BlockPlan, BlockReader, plan_blocks
from .plan import BACKEND_CHOICES, choose_backend, make_engine

__all__ = [
    "BACKEND_CHOICES", "INPUTS", "START", "BlockConfig", "BlockPlan", "BlockReader", "Blocks",
    "Column", "Engine", "PerBlock", "Value", "choose_backend", "make_engine", "plan_blocks",
]
