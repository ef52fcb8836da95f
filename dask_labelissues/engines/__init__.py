"""Drivers that run the kernels of :mod:`dask_labelissues.states` on blocks.

``dask`` runs on any Dask scheduler, ``threads`` on a pool of threads in
this process, ``fork`` on a pool of forked processes on one machine,
``serial`` in this process, one block after another: the reference.
:func:`make_driver` chooses among them (``backend="auto"``).
"""

from .base import Driver, JointResult, RawResult, joint_of, run, run_filter, run_joint
from .plan import BACKEND_CHOICES, BACKENDS, choose_backend, choose_kernel, make_driver

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "Driver",
    "JointResult",
    "RawResult",
    "choose_backend",
    "choose_kernel",
    "joint_of",
    "make_driver",
    "run",
    "run_filter",
    "run_joint",
]
