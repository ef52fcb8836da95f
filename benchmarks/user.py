"""What a user waits for: whole commands, first calls, warm jobs, side by side.

    python benchmarks/user.py [--rounds 5] [--datasets a,b]

Every timing here is of one run, interleaved round by round with the
others it is compared to, and reported as a median; compare the ratios,
not the seconds (this machine's speed drifts between runs).  Rows:

* the CLI, ``dask-labelissues find`` from the shell on (a) and (b) as
  ``.npy``, with its defaults and with each other executor, beside
  ``benchmarks/one_process.py`` (one Python process that imports numpy,
  zarr and numba, makes one fused numba pass and writes four N-long arrays
  to a Zarr store);
* the first call in a fresh process against the next call in it, on
  10,000 x 10 in memory and on (a), and on (a) in a copy of the package
  without numba's cache (the first run after installing it, which runs the
  numpy kernels and compiles numba's in the background), with when that
  compile ended and the first call of a process started after it;
* the warm job in this process on (a) and (c) with each engine, against the fused
  one-pass floor (the same numba pass as the script, on the same 2
  threads, mapping the file in each run as a job given its path does;
  also with the mapping kept between runs, where no page faults are left)
  and the numpy floor (argmax and max of each row);
* the results store write, apart from the job;
* a dask array of 1,000,000 x 100 in 2,000-row chunks against the same in
  160,000-row chunks;
* the demo command, with the times it reports for writing and for the job.

Results go to benchmarks/results/user-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import one_process  # noqa: E402
from run import ensure_data  # noqa: E402

from dask_labelissues import find_label_issues  # noqa: E402

THREADS = 2
BIN = Path(sys.executable).parent
CLI = str(BIN / "dask-labelissues")

FIRST_CALL = r"""
import json, sys, time
import numpy as np
backend, source = sys.argv[1], sys.argv[2]
if source == "small":
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 10_000).astype(np.float32)
    labels = rng.integers(0, 10, 10_000)
else:
    labels, probs = source.split(",")
t0 = time.perf_counter()
from dask_labelissues import find_label_issues
t1 = time.perf_counter()
find_label_issues(labels, probs, backend=backend)
t2 = time.perf_counter()
find_label_issues(labels, probs, backend=backend)
t3 = time.perf_counter()
import dask_labelissues
print(json.dumps({"import_s": t1 - t0, "first_s": t2 - t1, "warm_s": t3 - t2,
                  "package": dask_labelissues.__file__}))
"""


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def shell(argv: list[str]) -> float:
    """Wall time of one command, from fork to exit; fails loudly."""
    t = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    return elapsed


def interleave(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, run in cases.items():
            # Each run starts with no earlier run's writes (result stores,
            # spill files) still on their way to disk, so that no run pays
            # for another's.  (Without it, in one run, the warm (c) job went
            # from 0.70 s to 0.97 s over five rounds while the floors held.)
            os.sync()
            times[name].append(run())
            print(f"  [{r + 1}/{rounds}] {name:<44} {times[name][-1]:7.3f} s", flush=True)
    return times


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def bench_cli(name: str, paths: dict[str, str], rounds: int, work: Path) -> dict[str, Any]:
    out = str(work / f"{name}-out.zarr")
    find = [CLI, "find", "--labels", paths["labels_npy"], "--pred-probs", paths["probs_npy"],
            "--output", out, "--overwrite", "--no-progress"]
    script = [sys.executable, str(HERE / "one_process.py"), paths["labels_npy"], paths["probs_npy"],
              str(work / "script-out.zarr")]
    cases = {
        "dask-labelissues find (defaults)": lambda: shell(find),
        "find --backend serial": lambda: shell([*find, "--backend", "serial"]),
        "find --backend fork --n-jobs 2": lambda: shell([*find, "--backend", "fork", "--n-jobs", "2"]),
        "find --workers 2 (LocalCluster)": lambda: shell([*find, "--workers", "2"]),
        "one-process script": lambda: shell(script),
    }
    print(f"[cli {name}]", flush=True)
    # Once, untimed: the script's numba cache is then compiled, as ours is.
    shell(script)
    times = interleave(cases, rounds)
    med = {k: median(v) for k, v in times.items()}
    return {"dataset": name, "times": times, "median": med,
            "default_over_script": med["dask-labelissues find (defaults)"] / med["one-process script"],
            "default_over_serial": med["dask-labelissues find (defaults)"] / med["find --backend serial"]}


def _first_call_process(backend: str, source: str, env: dict[str, str], copy: Path | None) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL, backend, source], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    package = out.pop("package")
    if copy is not None and not package.startswith(str(copy)):
        raise RuntimeError("the fresh copy of the package was not the one imported")
    return out


def first_call(backend: str, source: str, fresh: bool = False) -> dict[str, float]:
    """One fresh process's first and next call.

    ``fresh``: on a copy of the package without numba's cache, as the first
    run after installing it.  That process runs the numpy kernels and
    leaves numba's compile running in the background; the row also has how
    long after the process ended the compile finished (``compile_after_s``)
    and the first and next call of a process started then
    (``then_first_s``, ``then_warm_s``).  Nothing else runs meanwhile.
    """
    env, copy = dict(os.environ), None
    if fresh:
        copy = Path(tempfile.mkdtemp(prefix="dli-fresh-install-"))
        shutil.copytree(HERE.parent / "dask_labelissues", copy / "dask_labelissues",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("NUMBA_CACHE_DIR", None)
    try:
        out = _first_call_process(backend, source, env, copy)
        if copy is not None:
            cache = copy / "dask_labelissues" / "__pycache__"
            t, deadline = time.perf_counter(), time.monotonic() + 600
            while time.monotonic() < deadline and (not list(cache.glob("*.stamp")) or list(cache.glob("*.lock"))):
                time.sleep(0.05)
            if not list(cache.glob("*.stamp")):
                raise RuntimeError("the background compile wrote no stamp in 600 s")
            out["compile_after_s"] = time.perf_counter() - t
            then = _first_call_process(backend, source, env, copy)
            out["then_first_s"], out["then_warm_s"] = then["first_s"], then["warm_s"]
    finally:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
    return out


def bench_first_calls(paths: dict[str, str], rounds: int) -> dict[str, Any]:
    print("[first call in a fresh process]", flush=True)
    out: dict[str, Any] = {}
    a = f"{paths['labels_npy']},{paths['probs_npy']}"
    cases = [(name, source, backend, False) for name, source in (("10,000 x 10 in memory", "small"), ("(a) .npy", a))
             for backend in ("auto", "serial", "threads", "fork", "dask")]
    # The first run after installing the package finds numba's cache
    # empty (a few rounds: each waits seconds for the background compile).
    cases.append(("(a) .npy, first run after install (no numba cache)", a, "auto", True))
    for source_name, source, backend, fresh in cases:
        runs = [first_call(backend, source, fresh) for _ in range(max(2, rounds // 2) if fresh else rounds)]
        row = {k: median([r[k] for r in runs]) for k in runs[0]}
        row["extra_s"] = median([r["first_s"] - r["warm_s"] for r in runs])
        out[f"{source_name}, backend={backend}"] = row
        print(f"  {source_name:<22} {backend:<8} first {row['first_s']:.3f} s, warm {row['warm_s']:.4f} s, "
              f"extra {row['extra_s']:.3f} s (import {row['import_s']:.3f} s)", flush=True)
        if fresh:
            print(f"    compile done {row['compile_after_s']:.1f} s after; then first {row['then_first_s']:.3f} s, "
                  f"warm {row['then_warm_s']:.4f} s", flush=True)
    return out


def bench_warm(name: str, paths: dict[str, str], rounds: int, work: Path) -> dict[str, Any]:
    kept = (np.load(paths["labels_npy"], mmap_mode="r"), np.load(paths["probs_npy"], mmap_mode="r"))
    labels, probs = kept
    n, k = probs.shape
    step = max(1, one_process.BLOCK_BYTES // (k * probs.itemsize))
    bufs = (np.empty(n, np.int32), np.empty(n, probs.dtype), np.empty(n, probs.dtype), np.empty(n, np.float64))

    def fused_pass(mapped: tuple[np.ndarray, np.ndarray] | None) -> None:
        # mapped=None maps the files anew, as a job given their paths does:
        # its first touch of every page is then a page fault.
        lab, pp = mapped or (np.load(paths["labels_npy"], mmap_mode="r"), np.load(paths["probs_npy"], mmap_mode="r"))

        def block(a: int) -> None:
            b = min(a + step, n)
            one_process.fused(np.asarray(pp[a:b]), np.asarray(lab[a:b]), *(x[a:b] for x in bufs))

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(block, range(0, n, step)))

    def fused_floor() -> None:
        fused_pass(None)

    def fused_floor_kept() -> None:
        fused_pass(kept)

    def numpy_floor() -> None:
        def block(a: int) -> float:
            b = np.asarray(probs[a : a + step])
            return float(b.argmax(axis=1).sum()) + float(b.max(axis=1).sum())

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(block, range(0, n, step)))

    L, P = paths["labels_npy"], paths["probs_npy"]
    result = find_label_issues(L, P, backend="threads")
    store = str(work / "warm-out.zarr")
    cases = {
        "fused floor (numba, 2 threads)": timed(fused_floor),
        "fused floor, file mapping kept between runs": timed(fused_floor_kept),
        "numpy floor (argmax, max; 2 threads)": timed(numpy_floor),
        "job: default (threads)": timed(lambda: find_label_issues(L, P)),
        "job: serial": timed(lambda: find_label_issues(L, P, backend="serial")),
        "job: fork n_jobs=2": timed(lambda: find_label_issues(L, P, backend="fork", n_jobs=2)),
        "job: dask (threaded scheduler)": timed(lambda: find_label_issues(L, P, backend="dask")),
        "results store write": timed(lambda: result.to_zarr(store, overwrite=True)),
    }
    for case in cases.values():  # compile, load, fault in, once
        case()
    print(f"[warm, in this process, ({name}) .npy]", flush=True)
    times = interleave(cases, rounds)
    med = {k: median(v) for k, v in times.items()}
    floor = med["fused floor (numba, 2 threads)"]
    return {"dataset": name, "times": times, "median": med, "x_fused_floor": {k: v / floor for k, v in med.items()},
            "fork_speedup_over_serial": med["job: serial"] / med["job: fork n_jobs=2"],
            "threads_speedup_over_serial": med["job: serial"] / med["job: default (threads)"]}


def bench_small_chunks(paths: dict[str, str], rounds: int) -> dict[str, Any]:
    import dask.array as da

    rows = 1_000_000
    probs = np.ascontiguousarray(np.load(paths["probs_npy"], mmap_mode="r")[:rows])
    labels = np.asarray(np.load(paths["labels_npy"], mmap_mode="r")[:rows])
    cases = {}
    for chunk in (160_000, 2_000):
        lab = da.from_array(labels, chunks=chunk)
        pp = da.from_array(probs, chunks=(chunk, probs.shape[1]))
        cases[f"dask array, {chunk:,}-row chunks"] = timed(lambda lab=lab, pp=pp: find_label_issues(lab, pp).compute())
    for case in cases.values():
        case()
    print("[dask array input, small chunks]", flush=True)
    times = interleave(cases, rounds)
    med = {k: median(v) for k, v in times.items()}
    return {"times": times, "median": med,
            "small_over_large": med["dask array, 2,000-row chunks"] / med["dask array, 160,000-row chunks"]}


def bench_demo(rounds: int) -> dict[str, Any]:
    print("[demo]", flush=True)
    runs = []
    for r in range(rounds):
        os.sync()  # as before every run of interleave()
        t = time.perf_counter()
        proc = subprocess.run([CLI, "demo", "--json", "--no-progress"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        report = json.loads(proc.stdout)
        runs.append({"wall_s": wall, "write_s": report["write_seconds"], "job_s": report["seconds"]})
        print(f"  [{r + 1}/{rounds}] wall {wall:.2f} s, writing {report['write_seconds']:.2f} s, "
              f"job {report['seconds']:.2f} s", flush=True)
    med = {k: median([x[k] for x in runs]) for k in runs[0]}
    # "Start-up" is all the wall time that is neither writing nor the job.
    med["wall_over_job_and_startup"] = med["wall_s"] / (med["wall_s"] - med["write_s"])
    return {"runs": runs, "median": med}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# User-facing timings, {report['started']} (commit {report['commit']})", ""]
    for cli in report["cli"]:
        lines += [f"## `dask-labelissues find` from the shell, ({cli['dataset']}) .npy, medians of "
                  f"{len(next(iter(cli['times'].values())))}", "", "| command | wall | x one-process script |",
                  "| --- | ---: | ---: |"]
        script = cli["median"]["one-process script"]
        lines += [f"| {k} | {v:.2f} s | {v / script:.2f} |" for k, v in cli["median"].items()]
        lines += ["", f"Defaults over `--backend serial`: {cli['default_over_serial']:.2f}x.", ""]
    lines += ["## First call in a fresh process", "", "| input, backend | import | first call | next call | extra |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for k, v in report["first_calls"].items():
        lines.append(f"| {k} | {v['import_s']:.3f} s | {v['first_s']:.3f} s | {v['warm_s']:.4f} s | {v['extra_s']:.3f} s |")
    for k, v in report["first_calls"].items():
        if "then_first_s" in v:
            lines += ["", f"{k}: numba's compile in the background finished {v['compile_after_s']:.1f} s after "
                      f"that process ended; a process started then took {v['then_first_s']:.3f} s for its first "
                      f"call and {v['then_warm_s']:.4f} s for the next."]
    for warm in report["warm"]:
        lines += ["", f"## Warm, in one process, ({warm['dataset']}) .npy", "", "| run | median | x fused floor |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v:.3f} s | {warm['x_fused_floor'][k]:.2f} |" for k, v in warm["median"].items()]
        lines += ["", f"threads over serial: {warm['threads_speedup_over_serial']:.2f}x; "
                  f"fork over serial: {warm['fork_speedup_over_serial']:.2f}x.", ""]
    sc = report["small_chunks"]
    lines += ["## Dask array input in small chunks", "", "| input | median |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} s |" for k, v in sc["median"].items()]
    lines += ["", f"2,000-row chunks over 160,000-row chunks: {sc['small_over_large']:.2f}x.", ""]
    d = report["demo"]["median"]
    lines += ["## `dask-labelissues demo`", "",
              f"wall {d['wall_s']:.2f} s, of which writing the store {d['write_s']:.2f} s and the job {d['job_s']:.2f} s; "
              f"wall over (wall - writing): {d['wall_over_job_and_startup']:.2f}x.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--datasets", default="a,b", help="CLI datasets (a, b)")
    parser.add_argument("--warm-datasets", default="a,c", help="datasets of the warm rows (a, b, c)")
    parser.add_argument("--data-dir", default=str(HERE / "data"))
    args = parser.parse_args(argv)
    started = time.strftime("%Y%m%d-%H%M%S")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    data = Path(args.data_dir)
    paths = {name: ensure_data(name, data) for name in args.datasets.split(",")}
    a = paths.get("a") or ensure_data("a", data)
    # Every row but the first run after installing finds numba's cache full.
    subprocess.run([CLI, "compile"], check=True, stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="dli-user-bench-"))
    try:
        report = {"started": started, "commit": commit, "rounds": args.rounds,
                  "cli": [bench_cli(n, p, args.rounds, work) for n, p in paths.items()],
                  "first_calls": bench_first_calls(a, args.rounds),
                  "warm": [bench_warm(n, ensure_data(n, data), args.rounds, work)
                           for n in args.warm_datasets.split(",")],
                  "small_chunks": bench_small_chunks(a, args.rounds),
                  "demo": bench_demo(max(3, args.rounds // 2))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = HERE / "results" / f"user-{started}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
