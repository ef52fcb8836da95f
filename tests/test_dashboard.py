"""The dashboard line the command prints is true: a link that serves the
bokeh dashboard, or ``dashboard: none`` with the reason, for clusters the
command starts and for real ``dask scheduler`` processes of one's own."""

from __future__ import annotations

import atexit
import io
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dask_labelissues import cli

from .daskcluster import DASK, DaskCluster, free_port

LINK = re.compile(r"dashboard: (https?://\S+)")


def fetch(link: str) -> tuple[int, str]:
    """Status and text of a page, as a browser on this machine gets it."""
    with urllib.request.urlopen(link, timeout=30) as response:
        return response.status, response.read().decode(errors="replace")


def assert_bokeh_dashboard(link: str) -> None:
    status, page = fetch(link)
    assert status == 200, link
    # distributed serves a page asking for bokeh at the same address when
    # bokeh is missing: that is not a dashboard.
    assert "needs bokeh" not in page, page[:300]
    assert "Dask Diagnostic UI" in page and "static/js/bokeh.min.js" in page, page[:300]


class Scheduler(DaskCluster):
    """A scheduler process alone (no workers): ``command`` is how it is
    started, e.g. ``[dask, "scheduler", "--no-dashboard"]``."""

    def __init__(self, workdir: Path, command: list[str]) -> None:
        super().__init__(workdir, n_workers=0)
        self.command = command

    def start(self, timeout: float = 60) -> "Scheduler":
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        port = self.address.rsplit(":", 1)[1]
        self._spawn([*self.command, "--host", "127.0.0.1", "--port", port,
                     "--dashboard-address", f"127.0.0.1:{free_port()}"], "scheduler.log")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client(timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    raise TimeoutError(f"no scheduler at {self.address}\n{self.logs()}") from None
                time.sleep(0.3)


def scheduler_line(address: str) -> str:
    """What ``find --scheduler ADDRESS`` prints about the cluster."""
    args = cli.build_parser().parse_args(
        ["find", "--labels", "l.npy", "--pred-probs", "p.npy", "--output", "o.zarr", "--scheduler", address]
    )
    log = io.StringIO()
    with cli.where_it_runs(args, log=log):
        pass
    (line,) = log.getvalue().splitlines()
    return line


#: A ``dask scheduler`` in an environment without bokeh.
NO_BOKEH = [sys.executable, "-c",
            "import sys; sys.modules['bokeh'] = None; "
            "from distributed.cli.dask_scheduler import main; sys.exit(main())"]


def test_a_scheduler_started_with_no_dashboard_is_said_to_have_none(tmp_path):
    with Scheduler(tmp_path, [DASK, "scheduler", "--no-dashboard"]) as scheduler:
        line = scheduler_line(scheduler.address)
    assert line == (
        f"scheduler: {scheduler.address}  dashboard: none (the scheduler serves none, as when started "
        "with --no-dashboard; restart it without that option, with bokeh>=3.1 in the scheduler's environment)"
    )


def test_a_scheduler_without_bokeh_is_said_to_have_none_and_what_to_install(tmp_path):
    with Scheduler(tmp_path, NO_BOKEH) as scheduler:
        line = scheduler_line(scheduler.address)
    assert line == (
        f"scheduler: {scheduler.address}  dashboard: none (bokeh>=3.1 is not installed in the scheduler's "
        "environment: pip install 'bokeh>=3.1' there and restart the scheduler)"
    )


def test_a_scheduler_with_a_dashboard_is_linked_and_the_link_serves_it(tmp_path):
    with Scheduler(tmp_path, [DASK, "scheduler"]) as scheduler:
        line = scheduler_line(scheduler.address)
        assert line.startswith(f"scheduler: {scheduler.address}  dashboard: http://127.0.0.1:"), line
        (link,) = LINK.findall(line)
        assert line.endswith(link)  # no "not checked" note
        assert_bokeh_dashboard(link)


def test_a_web_proxy_in_the_environment_does_not_hide_a_local_dashboard(tmp_path, monkeypatch):
    """A proxy for the web (here one that refuses every connection) is not
    asked for this machine's own addresses, as a browser here would not."""
    with Scheduler(tmp_path, [DASK, "scheduler"]) as scheduler:
        dead = f"http://127.0.0.1:{free_port()}"
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(name, dead)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        line = scheduler_line(scheduler.address)
    (link,) = LINK.findall(line)
    assert line.endswith(f"dashboard: {link}"), line


@pytest.mark.parametrize("option", [["--dashboard"], ["--workers", "1"]])
def test_find_on_a_cluster_it_starts_prints_a_link_that_serves_the_dashboard(tmp_path, monkeypatch, capsys, option):
    """The link is fetched while the job runs, from inside the job: the
    cluster exists only as long as the command."""
    from dask_labelissues import api

    rng = np.random.default_rng(0)
    np.save(tmp_path / "l.npy", rng.integers(0, 4, 3000))
    np.save(tmp_path / "p.npy", rng.dirichlet(np.ones(4), 3000))
    real = api.find_label_issues
    seen: dict[str, Any] = {}

    def fetching_the_dashboard(*args: Any, **kwargs: Any) -> Any:
        seen["err"] = capsys.readouterr().err
        (link,) = LINK.findall(seen["err"])
        seen["link"] = link
        assert_bokeh_dashboard(link)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "find_label_issues", fetching_the_dashboard)
    code = cli.main(["find", "--labels", str(tmp_path / "l.npy"), "--pred-probs", str(tmp_path / "p.npy"),
                     "--output", str(tmp_path / "o.zarr"), "--no-progress", "--debug", *option])
    assert code == 0
    assert seen["err"].rstrip().endswith(f"dashboard: {seen['link']}"), seen["err"]
