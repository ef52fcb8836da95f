"""A real Dask cluster for tests: ``dask scheduler`` and ``dask worker``
processes on 127.0.0.1, torn down however the test ends."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


def make_tls(directory: Path) -> dict[str, str]:
    """A CA and a node certificate for 127.0.0.1, made by the deploy recipe's script."""
    subprocess.run(
        ["bash", str(REPO / "deploy" / "tls" / "make-certs.sh"), str(directory)],
        check=True, capture_output=True,
    )
    return {"ca": str(directory / "ca.pem"), "cert": str(directory / "node.pem"),
            "key": str(directory / "node.key")}


class DaskCluster:
    """One scheduler and ``n_workers`` workers (one thread each)."""

    def __init__(
        self,
        workdir: Path,
        n_workers: int = 2,
        memory_limit: str = "1GB",
        tls: dict[str, str] | None = None,
        nanny: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.n_workers = n_workers
        self.memory_limit = memory_limit
        self.tls = tls
        self.nanny = nanny
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        protocol = "tls" if tls else "tcp"
        self.address = f"{protocol}://127.0.0.1:{free_port()}"

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls["ca"], "--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]]

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / log, "ab")
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.workdir,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def security(self) -> Any:
        if not self.tls:
            return None
        from distributed.security import Security

        return Security(
            tls_ca_file=self.tls["ca"], tls_client_cert=self.tls["cert"],
            tls_client_key=self.tls["key"], require_encryption=True,
        )

    def start(self, timeout: float = 60) -> "DaskCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        port = self.address.rsplit(":", 1)[1]
        self._spawn(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
             "--protocol", "tls" if self.tls else "tcp",
             "--dashboard-address", f"127.0.0.1:{free_port()}", *self._tls_args()],
            "scheduler.log",
        )
        for i in range(self.n_workers):
            self.add_worker(f"w{i}")
        self.wait_for_workers(self.n_workers, timeout)
        return self

    def add_worker(self, name: str) -> subprocess.Popen:
        proc = self._spawn(
            [DASK, "worker", self.address, "--nthreads", "1", "--memory-limit", self.memory_limit,
             "--host", "127.0.0.1", "--name", name, "--local-directory", str(self.workdir / "spill"),
             "--nanny" if self.nanny else "--no-nanny", *self._tls_args()],
            f"worker-{name}.log",
        )
        self.workers.append(proc)
        return proc

    def client(self, timeout: float = 30) -> Any:
        from distributed import Client

        return Client(self.address, security=self.security(), timeout=f"{timeout}s")

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self.client(timeout=5) as c:
                    c.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                    return
            except Exception as exc:  # scheduler still starting
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"{n} workers did not register at {self.address}: {last}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> "DaskCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
