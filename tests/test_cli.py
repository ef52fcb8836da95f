"""The command line, driven as a user would: subprocesses."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zarr

from dask_labelissues import find_label_issues, open_results
from dask_labelissues.synthetic import SyntheticSpec, write_npy, write_zarr

from .conftest import CLI, assert_identical
from .conftest import run_cli as run

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    spec = SyntheticSpec(40000, 8, seed=3)
    paths = write_npy(spec, d / "npy")
    write_zarr(spec, d / "data.zarr", chunk_rows=8192)
    labels = np.load(paths["labels"])
    probs = np.load(paths["pred_probs"])
    with h5py.File(d / "data.h5", "w") as f:
        f.create_dataset("labels", data=labels, chunks=(5000,))
        f.create_dataset("probs/all", data=probs, chunks=(5000, 8))
    expected = find_label_issues(labels, probs, backend="serial").compute()
    return d, paths, expected


def check_store(path, expected) -> None:
    assert_identical(expected, open_results(path))
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 3
    attrs = dict(group.attrs)
    assert attrs["num_issues"] == expected.num_issues
    assert attrs["method"] == "self_confidence"
    assert set(attrs["versions"]) >= {"dask_labelissues", "dask", "zarr", "numpy"}
    assert attrs["seconds"] > 0
    assert attrs["inputs"]["pred_probs"]["shape"] == list(expected.label_quality_scores.shape) + [8]


FORMATS = {
    "npy": ("npy/labels.npy", "npy/pred_probs.npy"),
    "zarr": ("data.zarr:labels", "data.zarr:pred_probs"),
    "hdf5": ("data.h5:/labels", "data.h5:/probs/all"),
    "file-url": ("file://{d}/data.zarr:labels", "file://{d}/npy/pred_probs.npy"),
}


def _sources(d, fmt):
    out = []
    for s in FORMATS[fmt]:
        s = s.format(d=d)
        out.append(s if "://" in s else str(d / s))
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("backend", ["fork", "serial"])
def test_find_every_format_local_engines(data, fmt, backend, tmp_path):
    d, _, expected = data
    labels, probs = _sources(d, fmt)
    out = tmp_path / "out.zarr"
    proc = run("find", "--labels", labels, "--pred-probs", probs, "--output", str(out),
               "--backend", backend, "--n-jobs", "2", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["num_issues"] == expected.num_issues
    assert summary["output"] == str(out)
    check_store(out, expected)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_find_on_embedded_local_cluster(data, fmt, tmp_path):
    d, _, expected = data
    labels, probs = _sources(d, fmt)
    out = tmp_path / "out.zarr"
    proc = run("find", "--labels", labels, "--pred-probs", probs, "--output", str(out),
               "--workers", "2", "--memory-limit", "1GB", "--chunk-rows", "7000", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "dashboard: http" in proc.stderr
    assert f"label issues    {expected.num_issues:,}" in proc.stdout
    check_store(out, expected)


def test_progress_bars_on_request(data, tmp_path):
    d, paths, _ = data
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(tmp_path / "o.zarr"), "--backend", "serial", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "pass 1: reading pred_probs" in proc.stderr and "100%" in proc.stderr


def test_overwrite_and_existing_output(data, tmp_path):
    d, paths, expected = data
    out = tmp_path / "out.zarr"
    args = ["find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
            "--output", str(out), "--backend", "serial"]
    assert run(*args).returncode == 0
    before = os.stat(out / "zarr.json").st_mtime_ns
    proc = run(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {out} already exists (use --overwrite to replace it)"
    assert os.stat(out / "zarr.json").st_mtime_ns == before
    proc = run(*args, "--overwrite", "--method", "normalized_margin")
    assert proc.returncode == 0, proc.stderr
    assert dict(zarr.open_group(str(out), mode="r").attrs)["method"] == "normalized_margin"
    assert [p for p in os.listdir(tmp_path)] == ["out.zarr"]


def test_overwrite_replaces_only_a_results_store(data, tmp_path):
    labels, probs = np.load(data[1]["labels"]), np.load(data[1]["pred_probs"])
    inputs = tmp_path / "in.zarr"
    group = zarr.open_group(str(inputs), mode="w", zarr_format=3)
    group.create_array("labels", data=labels, chunks=(10000,))
    group.create_array("pred_probs", data=probs, chunks=(10000, 8))
    plain = tmp_path / "folder"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "keep.txt").write_text("mine")
    a_file = tmp_path / "labels.npy"
    np.save(a_file, np.zeros(3, np.int64))
    for out in (inputs, plain, a_file):
        proc = run("find", "--labels", f"{inputs}:labels", "--pred-probs", f"{inputs}:pred_probs",
                   "--output", str(out), "--overwrite", "--backend", "serial")
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"error: {out} is not a results store of dask-labelissues: --overwrite replaces only those "
            "(remove it yourself if it should go)"
        )
    assert (plain / "sub" / "keep.txt").read_text() == "mine" and np.load(a_file).shape == (3,)
    np.testing.assert_array_equal(zarr.open_group(str(inputs), mode="r")["labels"][:], labels)
    with pytest.raises(FileExistsError, match="not a results store"):
        find_label_issues(labels[:100], probs[:100]).to_zarr(str(plain), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["folder", "in.zarr", "labels.npy"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--workers", "-1", "must be >= 1, got '-1'"), ("--workers", "0", "must be >= 1, got '0'"),
    ("--threads-per-worker", "0", "must be >= 1, got '0'"), ("--top", "-3", "must be >= 0, got '-3'"),
    ("--connect-timeout", "-1", "must be > 0, got '-1'"), ("--chunk-rows", "x", "wants an integer, got 'x'"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(data, tmp_path, option, value, message):
    _, paths, _ = data
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(tmp_path / "o.zarr"), option, value)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"error: argument {option}: {message}")
    assert os.listdir(tmp_path) == []


def test_an_interrupt_after_the_store_is_in_place_says_so(tmp_path):
    from types import SimpleNamespace

    from dask_labelissues import cli

    out = tmp_path / "o.zarr"
    args = SimpleNamespace(output=str(out), overwrite=True)
    assert cli._left_as_it_was(args) == f"nothing was left at {out}"
    find_label_issues(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])).to_zarr(str(out))
    args.output_was = cli._stamp(str(out))
    assert cli._left_as_it_was(args) == f"the store at {out} is as it was"
    find_label_issues(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])).to_zarr(str(out), overwrite=True)
    assert cli._left_as_it_was(args) == f"the results were written to {out}, complete, before it stopped"


def test_output_directory_is_checked_before_any_work(data, tmp_path):
    labels, probs = _sources(data[0], "npy")
    out = tmp_path / "missing" / "out.zarr"
    proc = run("find", "--labels", labels, "--pred-probs", probs, "--output", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: directory {out.parent} does not exist (create it first, or choose another --output)"
    )
    assert "LocalCluster" not in proc.stdout + proc.stderr  # failed before starting one
    assert not out.parent.exists()


@pytest.fixture
def bad_inputs(tmp_path):
    spec = SyntheticSpec(5000, 4, seed=9)
    paths = write_npy(spec, tmp_path / "in")
    probs = np.load(paths["pred_probs"])
    probs[4321, 2] = np.nan
    np.save(tmp_path / "nan.npy", probs)
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
    (tmp_path / "empty.zarr").mkdir()
    return tmp_path, paths


@pytest.mark.parametrize(
    "labels,probs,extra,message",
    [
        ("{in}/labels.npy", "{t}/nan.npy", [], "error: pred_probs[4321, 2] = nan is not finite"),
        ("{in}/labels.npy", "{t}/missing.npy", [], "error: no such file: {t}/missing.npy"),
        ("{in}/labels.npy", "{t}/garbage.npy", [], "error: {t}/garbage.npy is not a numpy .npy array"),
        ("{in}/labels.npy", "{t}/empty.zarr", [], "error: pred_probs: cannot open {t}/empty.zarr as a Zarr array"),
        ("{in}/labels.npy", "{t}/in/pred_probs.npy",
         ["--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "1"],
         "error: could not connect to the Dask scheduler at tcp://127.0.0.1:9 within 1 s"),
        ("{in}/pred_probs.npy", "{in}/pred_probs.npy", [], "error: labels must be 1-D"),
    ],
    ids=["nan", "missing", "garbage", "not-zarr", "no-scheduler", "2d-labels"],
)
def test_errors_are_one_line_exit_2_and_leave_nothing(bad_inputs, labels, probs, extra, message):
    t, paths = bad_inputs
    fill = dict(t=t, **{"in": t / "in"})
    out = t / "out.zarr"
    proc = run("find", "--labels", labels.format(**fill), "--pred-probs", probs.format(**fill),
               "--output", str(out), "--backend", "serial" if not extra else "dask", *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(message.format(**fill)), lines[-1]
    assert not out.exists()
    assert not [p for p in os.listdir(t) if p.startswith(".out.zarr")]


def test_debug_shows_traceback(bad_inputs):
    t, paths = bad_inputs
    proc = run("find", "--labels", paths["labels"], "--pred-probs", str(t / "nan.npy"),
               "--output", str(t / "o.zarr"), "--backend", "serial", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "is not finite" in proc.stderr


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    d = tmp_path_factory.mktemp("large")
    return write_npy(SyntheticSpec(3_000_000, 16, seed=4), d)


def _start(large, out):
    return subprocess.Popen(
        [*CLI, "find", "--labels", large["labels"], "--pred-probs", large["pred_probs"],
         "--output", str(out), "--backend", "serial", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_killed_while_writing_leaves_nothing_at_out(large, tmp_path):
    out = tmp_path / "out.zarr"
    proc = _start(large, out)
    deadline = time.time() + 120
    seen = False
    while time.time() < deadline and proc.poll() is None:
        if any(p.startswith(".out.zarr.partial") for p in os.listdir(tmp_path)):
            proc.send_signal(signal.SIGKILL)
            seen = True
            break
        time.sleep(0.002)
    proc.wait(30)
    assert seen, "the job finished before its partial store was seen"
    assert not out.exists()


def _read_stderr_until(proc: subprocess.Popen, marker: bytes, event: str, timeout: float = 120) -> bytes:
    """What ``proc`` wrote to stderr up to ``marker`` (read unbuffered, so
    the process can be signalled at that point)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"never saw that {event}: {seen!r}"
        if select.select([proc.stderr], [], [], 1.0)[0]:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"the command ended before {event}: {seen!r}"
            seen += chunk
    return seen


def test_terminated_while_computing_cleans_up(large, tmp_path):
    # Stop the job once pass one has begun, and only then send SIGTERM: a
    # fixed sleep raced the job itself on a fast machine (it finished first).
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen(
        [*CLI, "find", "--labels", large["labels"], "--pred-probs", large["pred_probs"],
         "--output", str(out), "--backend", "serial", "--progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _read_stderr_until(proc, b"pass 1", "pass one began")
        proc.send_signal(signal.SIGSTOP)
        try:
            assert proc.poll() is None
            assert not out.exists(), "the job finished before it could be stopped"
            proc.send_signal(signal.SIGTERM)
        finally:
            proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check above: do not leave the job running
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_summary_and_plot(data, tmp_path):
    d, paths, expected = data
    out = tmp_path / "out.zarr"
    assert run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(out), "--backend", "serial").returncode == 0
    png = tmp_path / "summary.png"
    proc = run("summary", str(out), "--top", "5", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert f"label issues    {expected.num_issues:,}" in proc.stdout
    assert "worst 5 rows:" in proc.stdout
    first = proc.stdout.split("worst 5 rows:")[1].splitlines()[2].split()
    assert int(first[0]) == expected.issues[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20000
    summary = json.loads(run("summary", str(out), "--json", "--top", "3").stdout)
    assert summary["num_issues"] == expected.num_issues
    assert [w["index"] for w in summary["worst"]] == expected.issues[:3].tolist()

    proc = run("summary", str(tmp_path / "nope.zarr"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no results store at")


def test_demo_small(tmp_path):
    proc = run("demo", "--rows", "60000", "--classes", "10", "--workers", "1", "--json",
               "--keep", str(tmp_path / "kept"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == 60000
    assert 0.9 < report["precision"] <= 1.0
    assert 0.3 < report["recall"] <= 1.0
    assert len(report["worst"]) == 10
    assert "dashboard: http" in proc.stderr
    assert (tmp_path / "kept" / "results.zarr" / "zarr.json").exists()
    flipped = zarr.open_group(str(tmp_path / "kept" / "data.zarr"), mode="r")["flipped"][:]
    assert report["flipped"] == flipped.size


def test_demo_text_output():
    proc = run("demo", "--rows", "30000", "--classes", "5", "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for field in ["rows ", "classes ", "wall time", "rows per second", "issues found", "precision", "recall", "worst 10 issues"]:
        assert field in proc.stdout


def test_dashboard_line_says_when_bokeh_is_missing_here(monkeypatch):
    """Without bokeh in this process (which holds an embedded cluster's
    scheduler) the dashboard address serves only a page asking for it; the
    line says there is no dashboard and what to install.  Real schedulers
    are in tests/test_dashboard.py."""
    from types import SimpleNamespace

    from dask_labelissues import cluster

    client = SimpleNamespace(dashboard_link="http://127.0.0.1:8787/status",
                             scheduler_info=lambda n_workers: {"services": {"dashboard": 8787}})
    monkeypatch.setattr(cluster, "_probe_dashboard", lambda link, timeout: cluster.MISSING_BOKEH)
    assert cluster.describe_dashboard(client, remote=False) == (
        "dashboard: none (bokeh>=3.1 is not installed in this environment: pip install 'bokeh>=3.1')"
    )
    monkeypatch.setattr(cluster, "_probe_dashboard", lambda link, timeout: cluster.DASHBOARD)
    assert cluster.describe_dashboard(client, remote=False) == "dashboard: http://127.0.0.1:8787/status"


def test_find_runs_on_threads_in_this_process_by_default(data, tmp_path):
    d, paths, expected = data
    out = tmp_path / "o.zarr"
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(out), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "threads"
    assert "LocalCluster" not in proc.stderr and "dashboard" not in proc.stderr
    check_store(out, expected)


def test_find_with_dashboard_runs_on_an_in_process_cluster(data, tmp_path):
    d, paths, expected = data
    out = tmp_path / "o.zarr"
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(out), "--dashboard", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "dask"
    assert "LocalCluster in this process  dashboard: http" in proc.stderr
    check_store(out, expected)


@pytest.mark.parametrize("option", [["--workers", "2"], ["--dashboard"], ["--scheduler", "tcp://127.0.0.1:1"]])
def test_cluster_options_do_not_go_with_a_local_backend(data, tmp_path, option):
    d, paths, _ = data
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(tmp_path / "o.zarr"), "--backend", "serial", *option)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {option[0]} runs the job on Dask; it does not go with --backend serial")


def test_ctrl_c_on_the_embedded_cluster_prints_one_line_and_leaves_nothing(large, tmp_path):
    """Ctrl-C reaches every process of the terminal's foreground group: the
    command, and the worker processes it started.  The command is stopped
    while the job runs, the group is sent SIGINT, and the command resumed."""
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen(
        [*CLI, "find", "--labels", large["labels"], "--pred-probs", large["pred_probs"],
         "--output", str(out), "--workers", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        seen = _read_stderr_until(proc, b"dashboard:", "its cluster started")
        proc.send_signal(signal.SIGSTOP)
        try:
            assert proc.poll() is None and not out.exists(), "the job finished before it could be stopped"
            os.killpg(proc.pid, signal.SIGINT)
        finally:
            proc.send_signal(signal.SIGCONT)
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    assert err.startswith("LocalCluster: 2 worker processes  dashboard:"), err
    # Nothing from the workers or the scheduler: no traceback, no warning.
    assert err.rstrip().endswith(f"error: interrupted; nothing was left at {out}"), err
    assert err.count("error:") == 1 and "Traceback" not in err and " - WARNING - " not in err, err
    assert len(err.strip().splitlines()) <= 2, err
    assert os.listdir(tmp_path) == []


def test_an_interrupt_python_had_to_drop_still_stops_find_before_it_writes(data, tmp_path, monkeypatch, capsys):
    """Raised inside a garbage-collector callback, KeyboardInterrupt is
    handed to sys.unraisablehook instead: find must still end as
    interrupted, with nothing written."""
    from types import SimpleNamespace

    from dask_labelissues import api, cli

    d, paths, _ = data
    real = api.find_label_issues

    def interrupted_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(),
                                           exc_traceback=None, err_msg=None, object=None))
        return result

    monkeypatch.setattr(api, "find_label_issues", interrupted_meanwhile)
    out = tmp_path / "o.zarr"
    code = cli.main(["find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
                     "--output", str(out), "--no-progress"])
    assert code == 130
    assert capsys.readouterr().err == f"error: interrupted; nothing was left at {out}\n"
    assert os.listdir(tmp_path) == []
    # The next command in the same process starts afresh.
    monkeypatch.setattr(api, "find_label_issues", real)
    assert cli.main(["find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
                     "--output", str(out), "--no-progress"]) == 0
    assert sys.unraisablehook is not cli._Interrupts.unraisable  # put back


def test_health_in_the_store_and_the_summary(data, tmp_path):
    """``find --health`` keeps the confident joint; ``summary`` shows the
    dataset's health from it, with cleanlab.dataset's numbers."""
    import cleanlab.dataset as cl_dataset

    d, paths, expected = data
    out = tmp_path / "health.zarr"
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(out), "--health", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "label health" in proc.stdout and "most confused (given -> true class):" in proc.stdout
    labels, probs = np.load(paths["labels"]), np.load(paths["pred_probs"])
    health = json.loads(run("summary", str(out), "--json").stdout)["health"]
    theirs = cl_dataset.overall_label_health_score(labels, probs, verbose=False)
    assert health["overall_label_health_score"] == theirs
    worst = cl_dataset.rank_classes_by_label_quality(labels, probs)
    assert health["worst_classes"][0]["label_quality"] == pytest.approx(worst["Label Quality Score"][0], abs=1e-12)
    # Without --health (and without --filter-by), the store has no joint.
    plain = tmp_path / "plain.zarr"
    assert run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(plain), "--no-progress").returncode == 0
    assert "health" not in json.loads(run("summary", str(plain), "--json").stdout)


def test_every_option_of_every_subcommand_has_help_stating_its_default():
    import argparse

    from dask_labelissues.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing, no_default = [], []
    for name, p in sub.choices.items():
        for a in p._actions:
            what = f"{name} {' '.join(a.option_strings) or a.dest}"
            if not a.help or a.help == argparse.SUPPRESS:
                missing.append(what)
                continue
            text = p._get_formatter()._expand_help(a)
            assert "\n" not in text, what
            default = a.default
            if default in (None, False, argparse.SUPPRESS):
                continue
            forms = {str(default)}
            if isinstance(default, (int, float)):
                forms |= {f"{default:g}", f"{default:,}"}
            if "default" not in text or not any(f in text for f in forms):
                no_default.append(f"{what}: {text!r} (default {default!r})")
    assert missing == []
    assert no_default == []


def test_top_level_help_lists_every_command_with_a_sentence():
    import argparse

    from dask_labelissues.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices) == {"demo", "find", "segment", "summary", "compile"}
    proc = run("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name, sentence in helps.items():
        assert sentence[0].isupper() and sentence.endswith(".") and sentence.count(". ") == 0, sentence
        assert f" {name} {sentence}" in text, (name, proc.stdout)
        # The command's own --help opens with the same sentence.
        assert sentence in " ".join(run(name, "--help").stdout.split())


def test_percentages_are_named_and_row_sum_tolerance_none_accepts_them(tmp_path):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), 2000) * 100
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "l.npy", rng.integers(0, 5, 2000))
    args = ["find", "--labels", str(tmp_path / "l.npy"), "--pred-probs", str(tmp_path / "p.npy"), "--no-progress"]
    proc = run(*args, "--output", str(tmp_path / "a.zarr"))
    assert proc.returncode == 2
    assert "percentages? divide by 100" in proc.stderr and not (tmp_path / "a.zarr").exists()
    proc = run(*args, "--output", str(tmp_path / "b.zarr"), "--row-sum-tolerance", "none")
    assert proc.returncode == 0, proc.stderr
    proc = run(*args, "--output", str(tmp_path / "c.zarr"), "--row-sum-tolerance", "often")
    assert proc.returncode == 2 and "wants a number or 'none'" in proc.stderr


def test_an_unwritable_output_place_is_named_without_the_temporary_store(data, tmp_path):
    d, paths, expected = data
    out = "/proc/dask-labelissues-out.zarr"  # no one may create files in /proc
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", out, "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: could not write {out}: ") and "cannot write a store in /proc" in proc.stderr
    assert ".partial-" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize("interrupt", [True, False])
def test_a_ctrl_c_while_workers_are_spawned_is_kept_for_after(interrupt):
    """While the embedded cluster spawns its workers, SIGINT is ignored (so
    they start ignoring it); a Ctrl-C to the process group meanwhile is
    seen by the watcher and reported once the start is over."""
    code = (
        "import os, signal, time\n"
        "from dask_labelissues.cluster import _children_ignore_sigint\n"
        "with _children_ignore_sigint(True) as watch:\n"
        f"    if {interrupt}: os.killpg(0, signal.SIGINT)\n"
        "    time.sleep(0.3)\n"
        "    print(watch.interrupted(), end=' ')\n"
        "print(watch.interrupted())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{interrupt} {interrupt}"


def test_an_interrupted_store_waits_for_zarrs_own_writes_before_it_is_removed(tmp_path):
    """An interrupt stops the thread writing the store, not zarr's event
    loop: a write still pending there must land before the temporary store
    is removed, or it would leave a hidden partial store behind."""
    import asyncio

    from zarr.core import sync as zarr_sync

    from dask_labelissues import store

    zarr.open_group(str(tmp_path / "start.zarr"), mode="w")  # zarr's loop runs
    late = tmp_path / "late"

    async def write_late() -> None:
        await asyncio.sleep(0.3)
        late.write_text("x")

    asyncio.run_coroutine_threadsafe(write_late(), zarr_sync.loop[0])
    store._wait_for_zarr()
    assert late.exists()


@pytest.mark.parametrize(("options", "named"), [
    (["--class-names", "a,b,c,d,e,f,g,h"], "--class-names does not go with --task classification"),
    (["--sentence-offsets", "o.npy", "--sentence-score-method", "softmin"],
     "--sentence-offsets, --sentence-score-method does not go with --task classification"),
    (["--task", "multilabel", "--sentence-offsets", "o.npy"], "--sentence-offsets does not go with --task multilabel"),
    (["--task", "token", "--label-offsets", "o.npy"], "--label-offsets does not go with --task token"),
    (["--frac-noise", "0.5"], "--frac-noise needs --filter-by (one of cleanlab.filter's methods)"),
    (["--frac-noise", "0.5", "--min-examples-per-class", "3"],
     "--frac-noise, --min-examples-per-class need --filter-by (one of cleanlab.filter's methods)"),
])
def test_options_of_another_task_are_refused(data, tmp_path, options, named):
    _, paths, _ = data
    proc = run("find", "--labels", paths["labels"], "--pred-probs", paths["pred_probs"],
               "--output", str(tmp_path / "o.zarr"), *options)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {named}"
    assert os.listdir(tmp_path) == []


def test_a_missing_zarr_array_is_named_with_what_the_store_holds(data, tmp_path):
    d, paths, _ = data
    labels, probs = _sources(d, "zarr")
    base = labels.rsplit(":", 1)[0]
    proc = run("find", "--labels", f"{base}:nolabels", "--pred-probs", probs, "--output", str(tmp_path / "o.zarr"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: labels: cannot open {base}:nolabels as a Zarr array ({base} has no member 'nolabels'; "
        f"it holds {', '.join(sorted(zarr.open_group(base, mode='r').keys()))})"
    )


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize("start_seconds", [0.3, 60])
def test_a_cluster_interrupted_while_it_starts_is_closed_and_the_interrupt_raised(start_seconds):
    """local_cluster with a LocalCluster that takes a Ctrl-C (to the whole
    process group) while it starts: KeyboardInterrupt comes at once, even
    from a start that would hang, and a cluster that does start is closed;
    a process already ignoring SIGINT keeps ignoring it."""
    code = (
        "import os, signal, time, distributed\n"
        "from dask_labelissues import cluster\n"
        "closed = []\n"
        "class Started:\n"
        "    def __init__(self, **kwargs):\n"
        "        os.killpg(0, signal.SIGINT)\n"
        f"        time.sleep({start_seconds})\n"
        "    def close(self): closed.append(True)\n"
        "distributed.LocalCluster = Started\n"
        "if {ignore}: signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    with cluster.local_cluster(1):\n"
        "        print('held', end=' ')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', end=' ')\n"
        "print(time.perf_counter() - t < 10, end=' ')\n"
        "time.sleep(1)\n"
        "print(closed)\n"
    )
    cases = [(False, "interrupted True [True]" if start_seconds < 1 else "interrupted True []")]
    if start_seconds < 1:
        cases.append((True, "held True [True]"))
    for ignore, expected in cases:
        proc = subprocess.run([sys.executable, "-c", code.format(ignore=ignore)], capture_output=True, text=True,
                              timeout=120, start_new_session=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected


def test_a_store_that_fails_waits_for_zarr_before_it_is_removed(tmp_path, monkeypatch):
    from dask_labelissues import store

    calls = []
    monkeypatch.setattr(store, "_wait_for_zarr", lambda: calls.append(sorted(os.listdir(tmp_path))))
    with pytest.raises(KeyboardInterrupt):
        with store._atomic_group(tmp_path / "o.zarr", overwrite=False):
            raise KeyboardInterrupt
    assert len(calls) == 1 and len(calls[0]) == 1 and calls[0][0].startswith(".o.zarr.partial-")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("meta", ['[]', '{"node_type": "group", "attributes": []}', '{"node_type": "array"}', 'x'])
def test_a_zarr_json_of_another_shape_is_no_results_store(tmp_path, meta):
    from dask_labelissues.store import is_results_store

    (tmp_path / "zarr.json").write_text(meta)
    assert is_results_store(tmp_path) is False


@pytest.mark.parametrize("bad", [False, True], ids=["ok", "bad input"])
def test_the_command_leaves_its_objects_to_the_os_at_exit(data, tmp_path, bad):
    """The shell command exits with main's code, its objects frozen out of
    the collector (Python's last collections over them took up to a
    quarter of a 2 s command); atexit handlers still run after it."""
    d, paths, _ = data
    script = ("import atexit, gc, runpy, sys\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
              "sys.argv = ['dask-labelissues', *sys.argv[1:]]\n"
              "runpy.run_module('dask_labelissues', run_name='__main__')\n")
    probs = paths["pred_probs"]
    if bad:
        probs = str(tmp_path / "short.npy")
        np.save(probs, np.load(paths["pred_probs"])[:-1])
    out = tmp_path / "o.zarr"
    done = subprocess.run([sys.executable, "-c", script, "find", "--labels", paths["labels"], "--pred-probs", probs,
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == (2 if bad else 0), done.stderr
    assert done.stderr.startswith("error: ") if bad else out.exists()
    assert done.stdout.splitlines()[-1] == "frozen at exit: True"


LOADED_FILTERS = (
    "import atexit, sys; from dask_labelissues.cli import run; "
    "atexit.register(lambda: print('filters loaded:', 'dask_labelissues.filters' in sys.modules, file=sys.stderr)); "
    "sys.argv[0] = 'dask-labelissues'; run()"
)


@pytest.mark.parametrize("extra, loaded", [([], False), (["--filter-by", "both"], True)])
def test_the_cli_loads_cleanlab_filters_only_for_a_filter_job(data, tmp_path, extra, loaded):
    """A command without ``--filter-by`` does not pay for loading the filters."""
    d, paths, expected = data
    proc = subprocess.run(
        [sys.executable, "-c", LOADED_FILTERS, "find", "--labels", paths["labels"], "--pred-probs",
         paths["pred_probs"], "--output", str(tmp_path / "o.zarr"), "--json", "--no-progress", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"filters loaded: {loaded}" in proc.stderr
    if not extra:
        assert json.loads(proc.stdout)["num_issues"] == expected.num_issues
