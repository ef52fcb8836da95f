"""deploy/local: the start and stop scripts, run as the walkthrough runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from dask_labelissues import find_label_issues, open_results
from dask_labelissues.synthetic import SyntheticSpec, write_zarr

from .conftest import assert_identical

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHON=sys.executable)
    # As from a fresh shell: a LocalCluster started earlier in this process
    # leaves distributed's allocator setting in its environment.
    for name in MALLOC_VARIABLES:
        env.pop(name, None)
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=180, **kw)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_walkthrough_with_tls(tmp_path):
    certs, state = tmp_path / "certs", tmp_path / "state"
    made = sh(str(REPO / "deploy/tls/make-certs.sh"), str(certs))
    assert made.returncode == 0, made.stderr
    assert sh(str(REPO / "deploy/tls/make-certs.sh"), str(certs)).returncode == 2  # never overwrites

    spec = SyntheticSpec(50000, 10, seed=31)
    write_zarr(spec, tmp_path / "data.zarr", chunk_rows=8192)
    started = sh(str(REPO / "deploy/local/start-cluster.sh"), "-n", "2", "-m", "1GB",
                 "-d", str(state), "--tls", str(certs))
    pids = [int(p) for p in (state / "pids").read_text().split()] if (state / "pids").exists() else []
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert "2 workers up" in started.stdout
        address = (state / "scheduler-address").read_text().strip()
        assert address.startswith("tls://127.0.0.1:")
        assert len(pids) == 3 and all(_group_alive(p) for p in pids)
        # A second start on the same state is refused rather than doubling up.
        assert sh(str(REPO / "deploy/local/start-cluster.sh"), "-d", str(state)).returncode == 2

        out = tmp_path / "results.zarr"
        job = subprocess.run(
            [sys.executable, "-m", "dask_labelissues", "find",
             "--labels", f"{tmp_path}/data.zarr:labels", "--pred-probs", f"{tmp_path}/data.zarr:pred_probs",
             "--output", str(out), "--scheduler", address,
             "--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "node.pem"),
             "--tls-key", str(certs / "node.key"), "--no-progress"],
            capture_output=True, text=True, timeout=300,
        )
        assert job.returncode == 0, job.stderr
        reference = find_label_issues(f"{tmp_path}/data.zarr:labels", f"{tmp_path}/data.zarr:pred_probs",
                                      backend="serial")
        assert_identical(reference, open_results(out))

        from distributed import Client
        from distributed.security import Security

        security = Security(tls_ca_file=str(certs / "ca.pem"), tls_client_cert=str(certs / "node.pem"),
                            tls_client_key=str(certs / "node.key"), require_encryption=True)
        names = MALLOC_VARIABLES

        def allocator_environment() -> dict:  # nested: the workers cannot import this module
            return {name: os.environ.get(name) for name in names}

        with Client(address, security=security, timeout="30s") as client:
            environments = client.run(allocator_environment)
        assert list(environments.values()) == [dict.fromkeys(MALLOC_VARIABLES, "134217728")] * 2
    finally:
        stopped = sh(str(REPO / "deploy/local/stop-cluster.sh"), "-d", str(state))
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_group_alive(p) for p in pids)
    assert (state / "logs" / "scheduler.log").exists()
    assert not (state / "pids").exists()
