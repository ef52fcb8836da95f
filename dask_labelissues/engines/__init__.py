"""Drivers that run the kernels of :mod:`dask_labelissues.states` on blocks.

``dask`` (default) runs on any Dask scheduler, ``fork`` on a pool of forked
processes on one machine, ``serial`` in this process: the reference.
"""

from .base import Driver, RawResult, run, run_filter

BACKENDS = ("dask", "fork", "serial")

__all__ = ["BACKENDS", "Driver", "RawResult", "run", "run_filter"]
