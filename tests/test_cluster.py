"""Against real ``dask scheduler`` / ``dask worker`` processes on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from dask_labelissues import find_label_issues, open_results
from dask_labelissues.synthetic import SyntheticSpec, write_npy, write_zarr

from .daskcluster import DaskCluster, make_tls
from .conftest import assert_identical

CLI = [sys.executable, "-m", "dask_labelissues"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DaskCluster(tmp_path_factory.mktemp("cluster"), n_workers=2, memory_limit="1GB") as c:
        yield c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("clusterdata")
    spec = SyntheticSpec(60000, 12, seed=21)
    write_zarr(spec, d / "data.zarr", chunk_rows=8192)
    paths = write_npy(spec, d / "npy")
    return d, paths


def test_cluster_has_two_registered_workers(cluster):
    from dask_labelissues.engines.dask import cluster_workers

    with cluster.client() as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers.values())
        # What the automatic block size is made for: 1 GB workers, 2 threads.
        assert cluster_workers(client) == (10**9, 2)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(method="normalized_margin", adjust_pred_probs=True, estimation_method="off_diagonal_calibrated"),
])
def test_api_on_cluster_identical_to_serial(cluster, dataset, settings):
    d, paths = dataset
    group = zarr.open_group(str(d / "data.zarr"), mode="r")
    reference = find_label_issues(paths["labels"], paths["pred_probs"], backend="serial", **settings)
    with cluster.client() as client:
        on_zarr = find_label_issues(group["labels"], group["pred_probs"], client=client, **settings)
        assert_identical(reference, on_zarr)
        # .npy paths: each worker maps the file itself.
        on_npy = find_label_issues(paths["labels"], paths["pred_probs"], client=client,
                                   chunk_rows=5000, **settings)
        assert_identical(reference, on_npy)


def test_bad_input_found_on_the_cluster_is_reported_as_such(cluster):
    """Pass one's input errors reach the client as themselves, with the row
    and the value, when both passes run as one graph on the cluster."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(5), size=6000)
    labels = probs.argmax(axis=1)
    probs[4321, 2] = -0.5

    def failures(client) -> int:
        logs = client.get_worker_logs()
        return sum("Compute Failed" in message for lines in logs.values() for _, message in lines)

    with cluster.client() as client:
        before = failures(client)
        with pytest.raises(ValueError, match=r"pred_probs\[4321, 2\] = -0.5 is negative"):
            find_label_issues(labels, probs, client=client, chunk_rows=1000)
        # Raised by the client from the merged state, not by a failing task,
        # which the worker would log with a traceback beside the error.
        assert failures(client) == before


def test_a_task_failing_with_a_timeout_fails_the_job(cluster):
    """A task's own TimeoutError (a store that did not answer) reaches the
    caller, and is not taken for the end of the client's one-second waits
    for the job, which then waited forever."""
    import dask.array as da

    def unanswered(block):
        raise TimeoutError("the store did not answer")

    probs = np.random.default_rng(5).dirichlet(np.ones(4), size=4000)
    lazy = da.from_array(probs, chunks=1000).map_blocks(unanswered, dtype=probs.dtype)
    raised = []

    def job(client):
        try:
            find_label_issues(probs.argmax(axis=1), lazy, client=client)
        except BaseException as exc:
            raised.append(exc)

    with cluster.client() as client:
        # A thread of its own, so that a job that waits forever fails the test.
        thread = threading.Thread(target=job, args=(client,), daemon=True)
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), "the job still waits after its task failed"
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError), raised
    assert "the store did not answer" in str(raised[0])


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "low_self_confidence"])
def test_filters_on_cluster_match_cleanlab(cluster, dataset, tmp_path, filter_by):
    """cleanlab.filter's methods on real workers, from Zarr: the same as the
    serial engine and as cleanlab in memory, and the store written from the
    workers holds the same mask."""
    from cleanlab.filter import find_label_issues as cleanlab_filter

    d, paths = dataset
    labels, probs = np.load(paths["labels"]), np.load(paths["pred_probs"])
    expected = cleanlab_filter(labels, probs, filter_by=filter_by, n_jobs=1)
    reference = find_label_issues(paths["labels"], paths["pred_probs"], backend="serial", filter_by=filter_by)
    group = zarr.open_group(str(d / "data.zarr"), mode="r")
    with cluster.client() as client:
        result = find_label_issues(group["labels"], group["pred_probs"], client=client, filter_by=filter_by)
        assert_identical(reference, result)
        assert result.reads == 2
        result.to_zarr(tmp_path / "out.zarr", client=client)
    np.testing.assert_array_equal(np.asarray(open_results(tmp_path / "out.zarr").is_label_issue), expected)


def test_client_that_is_not_the_default(cluster, dataset, tmp_path):
    """A Client made with set_as_default=False must be the one used throughout."""
    from distributed import Client

    d, paths = dataset
    reference = find_label_issues(paths["labels"], paths["pred_probs"], backend="serial").compute()
    with Client(cluster.address, set_as_default=False) as client:
        result = find_label_issues(paths["labels"], paths["pred_probs"], client=client)
        assert result.backend == "dask" and result.client is client
        assert_identical(reference, result)
        rows = result.rows(result.issues[:5])
        np.testing.assert_array_equal(rows["given_label"], reference.given_label[reference.issues[:5]])
        assert rows["is_label_issue"].all()
        result.to_zarr(tmp_path / "out.zarr")
    assert_identical(reference, open_results(tmp_path / "out.zarr"))


def test_cli_on_cluster_identical_to_serial(cluster, dataset, tmp_path):
    d, paths = dataset
    reference = find_label_issues(paths["labels"], paths["pred_probs"], backend="serial").compute()
    out = tmp_path / "out.zarr"
    proc = subprocess.run(
        [*CLI, "find", "--labels", f"{d}/data.zarr:labels", "--pred-probs", f"{d}/data.zarr:pred_probs",
         "--output", str(out), "--scheduler", cluster.address, "--json", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_issues"] == reference.num_issues
    assert_identical(reference, open_results(out))

    env = dict(os.environ, DASK_SCHEDULER_ADDRESS=cluster.address)
    out2 = tmp_path / "out2.zarr"
    proc = subprocess.run(
        [*CLI, "find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
         "--output", str(out2), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"scheduler: {cluster.address}" in proc.stderr
    assert_identical(reference, open_results(out2))


def test_tls_end_to_end(tmp_path, dataset):
    d, paths = dataset
    tls = make_tls(tmp_path / "certs")
    reference = find_label_issues(paths["labels"], paths["pred_probs"], backend="serial").compute()
    with DaskCluster(tmp_path / "tls-cluster", n_workers=2, tls=tls) as cluster:
        assert cluster.address.startswith("tls://")
        with cluster.client() as client:
            assert_identical(reference, find_label_issues(paths["labels"], paths["pred_probs"], client=client))

        base = [*CLI, "find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
                "--scheduler", cluster.address, "--no-progress", "--connect-timeout", "5"]
        out = tmp_path / "out.zarr"
        proc = subprocess.run(
            [*base, "--output", str(out), "--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"],
             "--tls-key", tls["key"]],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert_identical(reference, open_results(out))

        # Without certificates the scheduler cannot be reached.
        proc = subprocess.run([*base, "--output", str(tmp_path / "no.zarr")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("error:")
        assert not (tmp_path / "no.zarr").exists()


# -- faults ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_zarr(tmp_path_factory):
    d = tmp_path_factory.mktemp("faultdata")
    spec = SyntheticSpec(1_200_000, 50, seed=22)
    write_zarr(spec, d / "data.zarr", chunk_rows=65536)
    return d / "data.zarr"


def _keys_processing(client, prefix: str) -> dict[str, list[str]]:
    return {
        w: [str(k) for k in keys if prefix in str(k)]
        for w, keys in client.processing().items()
    }


def _kill_worker_running(client, prefix: str, timeout: float = 120) -> str:
    """SIGKILL the worker process running a task whose key contains ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker, keys in _keys_processing(client, prefix).items():
            if keys:
                pid = client.run(os.getpid, workers=[worker])[worker]
                os.kill(pid, signal.SIGKILL)
                return worker
        time.sleep(0.01)
    raise AssertionError(f"no task {prefix!r} was seen running")


def test_killed_workers_change_nothing(tmp_path, big_zarr):
    settings = dict(method="normalized_margin", adjust_pred_probs=True)  # both passes read pred_probs
    group = zarr.open_group(str(big_zarr), mode="r")
    with DaskCluster(tmp_path / "c", n_workers=2, memory_limit="2GB") as cluster, cluster.client() as client:
        undisturbed = find_label_issues(group["labels"], group["pred_probs"], client=client, **settings).compute()

        box: dict = {}

        def job():
            try:
                box["result"] = find_label_issues(
                    group["labels"], group["pred_probs"], client=client, **settings
                ).compute()
            except BaseException as exc:  # reported below
                box["error"] = exc

        thread = threading.Thread(target=job)
        thread.start()
        first = _kill_worker_running(client, "scan_block")
        second = _kill_worker_running(client, "score_block")
        thread.join(300)
        assert not thread.is_alive()
        assert "error" not in box, box.get("error")
        assert first and second
        assert_identical(undisturbed, box["result"])
        # The nannies restarted the killed worker processes.
        cluster.wait_for_workers(2, timeout=60)


def test_all_workers_gone_fails_cleanly(tmp_path, big_zarr):
    with DaskCluster(tmp_path / "c", n_workers=2) as cluster:
        out = tmp_path / "out.zarr"
        proc = subprocess.Popen(
            [*CLI, "find", "--labels", f"{big_zarr}:labels", "--pred-probs", f"{big_zarr}:pred_probs",
             "--output", str(out), "--scheduler", cluster.address, "--no-workers-timeout", "3",
             "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        with cluster.client() as client:
            deadline = time.monotonic() + 120
            while not any(_keys_processing(client, "scan_block").values()):
                assert time.monotonic() < deadline and proc.poll() is None, "job never started"
                time.sleep(0.01)
            for worker in cluster.workers:  # nannies and their workers
                os.killpg(worker.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: the Dask cluster at") and "has had no workers for 3 s" in last, last
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.zarr")]


def test_small_worker_memory_streams_a_larger_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowmem")
    spec = SyntheticSpec(2_000_000, 100, seed=23)  # 800 MB of float32
    write_zarr(spec, d / "data.zarr", chunk_rows=65536)
    group = zarr.open_group(str(d / "data.zarr"), mode="r")
    # More than the two workers' memory limits together.
    assert group["pred_probs"].nbytes > 2 * 300e6
    with DaskCluster(d / "c", n_workers=2, memory_limit="300MB") as cluster, cluster.client() as client:
        result = find_label_issues(group["labels"], group["pred_probs"], client=client)
        issues = result.issues
        mask_count = int(result.is_label_issue.sum().compute())
    reference = find_label_issues(group["labels"], group["pred_probs"], backend="fork", n_jobs=2)
    assert hashlib.sha256(issues.tobytes()).digest() == hashlib.sha256(reference.issues.tobytes()).digest()
    assert mask_count == reference.num_issues


def test_a_failed_store_write_waits_for_running_writes_and_leaves_nothing(cluster, dataset, tmp_path):
    """One block's write fails while the other worker is still writing its
    own: the temporary store is removed only after that write has ended,
    so it is not recreated behind the error."""
    from dataclasses import replace

    d, paths = dataset
    out = tmp_path / "out"
    out.mkdir()
    with cluster.client() as client:
        result = find_label_issues(paths["labels"], paths["pred_probs"], client=client, chunk_rows=6000)

        def fail_first(block, block_info=None):
            if block_info[0]["chunk-location"][0] == 0:
                time.sleep(0.05)
                raise OSError(28, "No space left on device")
            time.sleep(0.5)
            return block

        scores = result.label_quality_scores.map_blocks(fail_first, dtype=np.float64)
        with pytest.raises(OSError, match="No space left on device"):
            replace(result, label_quality_scores=scores).to_zarr(out / "results.zarr")
        time.sleep(1.0)  # a write still running after the error would have landed by now
        assert os.listdir(out) == []
