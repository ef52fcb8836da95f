"""Shared test data: noisy classification datasets with known flipped labels."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# A suite started in the background by a non-interactive shell (``cmd &``)
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
# handler, here or in the commands the tests start: the interrupt tests
# need Python's usual handler.  The tests of an ignored SIGINT ignore it
# themselves.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fill numba's cache first, as ``dask-labelissues compile`` does.

    A job that finds the cache without the kernels runs the numpy kernels
    and compiles numba's in the background; the tests pin which kernel
    runs where, so they start from a filled cache, whatever ran before.
    The cold case has tests of its own, in a cache directory of their own.
    """
    subprocess.run([sys.executable, "-m", "dask_labelissues", "compile"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)


@dataclass
class Dataset:
    labels: np.ndarray
    pred_probs: np.ndarray
    flipped: np.ndarray

    @property
    def n(self) -> int:
        return self.labels.shape[0]

    @property
    def k(self) -> int:
        return self.pred_probs.shape[1]


def make_dataset(
    n: int,
    k: int,
    *,
    seed: int = 0,
    dtype: type = np.float64,
    noise: float = 0.1,
    imbalance: float = 0.0,
    absent: tuple[int, ...] = (),
    signal: float = 2.5,
) -> Dataset:
    """Softmax predictions of a model that mostly knows the true class.

    ``imbalance`` > 0 skews the class prior geometrically; ``absent`` classes
    are relabelled away (they still get probability mass, as in cleanlab's
    absent-class defect report).
    """
    rng = np.random.default_rng(seed)
    prior = np.exp(-imbalance * np.arange(k))
    prior /= prior.sum()
    true = rng.choice(k, size=n, p=prior)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), true] += signal
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = true.copy()
    flipped = rng.random(n) < noise
    labels[flipped] = (true[flipped] + rng.integers(1, k, flipped.sum())) % k
    for a in absent:
        moved = labels == a
        labels[moved] = (a + 1 + rng.integers(0, k - 1, moved.sum())) % k
        labels[labels == a] = (a + 1) % k
    probs = probs.astype(dtype)
    if dtype != np.float64:
        # Renormalize in the target dtype, as a model exporting float32 would.
        probs /= probs.sum(axis=1, keepdims=True)
    return Dataset(labels.astype(np.int64), probs, np.flatnonzero(labels != true))


def assert_identical(a, b) -> None:
    """Two results are the same to the bit (lazy arrays computed first)."""
    a, b = a.compute(), b.compute()
    np.testing.assert_array_equal(a.issues, b.issues)
    np.testing.assert_array_equal(a.confident_thresholds, b.confident_thresholds)
    np.testing.assert_array_equal(a.label_quality_scores, b.label_quality_scores)
    np.testing.assert_array_equal(a.is_label_issue, b.is_label_issue)
    np.testing.assert_array_equal(a.given_label, b.given_label)
    np.testing.assert_array_equal(a.predicted_label, b.predicted_label)
    np.testing.assert_array_equal(a.per_class_issues, b.per_class_issues)
    np.testing.assert_array_equal(a.per_class_count, b.per_class_count)
    assert a.estimated_num_issues == b.estimated_num_issues
    assert a.num_issues == b.num_issues


MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@contextlib.contextmanager
def environment(**values):
    """This process's environment with ``values`` (None: unset), restored after."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        yield


#: What a distributed nanny sets for its workers (its default
#: ``distributed.nanny.pre-spawn-environ``, and a hash seed).
NANNY_VARIABLES = (*MALLOC_VARIABLES, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED")


@pytest.fixture(autouse=True)
def _nanny_variables_kept():
    """Each test leaves this process's :data:`NANNY_VARIABLES` as it found them.

    A distributed nanny writes its workers' settings into the environment
    of the process that starts it (any plain LocalCluster), and every later
    subprocess would inherit them: a multi-label job run after one took
    twice as long under ``MALLOC_TRIM_THRESHOLD_=65536``."""
    saved = {name: os.environ.get(name) for name in NANNY_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def local_cluster():
    """The LocalCluster the CLI and the demo start, as in a fresh process:
    a LocalCluster started earlier in this one (test_filters has one) leaves
    distributed's allocator setting in the environment, where it would win."""
    from distributed import Client

    from dask_labelissues.cluster import local_cluster as start

    with environment(**dict.fromkeys((*MALLOC_VARIABLES, "PYTHONHASHSEED"))):
        with start(2, memory_limit="1GiB", dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client


@contextlib.contextmanager
def runs_on(client):
    """The block's work must run on ``client``'s cluster, not on whatever
    scheduler is current: that is the synchronous one here, and the
    cluster's task stream must see tasks (a fixture's cluster is often the
    default client's too, where results alone cannot tell)."""
    import dask
    from distributed import get_task_stream

    with dask.config.set(scheduler="sync"), get_task_stream(client=client) as stream:
        yield
    assert stream.data, "no task ran on the cluster given"


#: The command line, as a user runs it, with this interpreter.
CLI = [sys.executable, "-m", "dask_labelissues"]


def run_cli(*args: str, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """``dask-labelissues *args`` in a subprocess, its output captured."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)
