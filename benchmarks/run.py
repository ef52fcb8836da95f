"""Benchmarks: dask_labelissues beside cleanlab and the one-read floor.

    python benchmarks/run.py [--datasets a,b,c,scaling,memory,memcap,filters] [--repeats 3]

Datasets are generated once into benchmarks/data/ (seeded, block by block)
as both .npy and Zarr. For each dataset every runner is timed in this one
process, repeats interleaved, and the median is reported, with its ratio to
cleanlab's batched function (n_jobs=1) and to the floor: one read of
pred_probs from the same storage doing the least per-row work (argmax and
max of each row) on the same 2 threads. Peak memory of the driver and of
every worker process is sampled from /proc; bytes read are the read()
syscall bytes of the driver and its reaped fork workers (memory-mapped .npy
reads and cluster workers are not counted). Results go to benchmarks/results/<time>.json and .md, and
benchmarks/results/latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from dask_labelissues import find_label_issues  # noqa: E402
from dask_labelissues.cluster import BATCH_SETTINGS, local_cluster  # noqa: E402
from dask_labelissues.inputs import open_path  # noqa: E402
from dask_labelissues.synthetic import SyntheticSpec, write_npy, write_zarr  # noqa: E402

THREADS = 2
DATASETS = {
    "a": SyntheticSpec(2_000_000, 100, seed=101),
    "b": SyntheticSpec(200_000, 1000, seed=102),
    "c": SyntheticSpec(10_000_000, 100, seed=103),
}
ZARR_CHUNK_ROWS = {"a": 131072, "b": 65536, "c": 131072}


# -- data ------------------------------------------------------------------------

def ensure_data(name: str, data_dir: Path) -> dict[str, str]:
    spec = DATASETS[name]
    d = data_dir / f"{name}-{spec.rows}x{spec.classes}-s{spec.seed}"
    npy, zarr_path = d / "npy", d / "data.zarr"
    if not (npy / "pred_probs.npy").exists():
        print(f"[data] writing {name} as .npy ({spec.rows:,} x {spec.classes})", flush=True)
        write_npy(spec, npy)
    if not (zarr_path / "zarr.json").exists():
        print(f"[data] writing {name} as Zarr", flush=True)
        write_zarr(spec, zarr_path, chunk_rows=ZARR_CHUNK_ROWS[name])
    return {
        "labels_npy": str(npy / "labels.npy"),
        "probs_npy": str(npy / "pred_probs.npy"),
        "labels_zarr": f"{zarr_path}:labels",
        "probs_zarr": f"{zarr_path}:pred_probs",
        "zarr_dir": str(zarr_path),
    }


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -- process-tree measurements -------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "RssAnon", "VmRSS")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Monitor:
    """Samples the process tree every 100 ms: peak RSS and anonymous memory per
    process, and read() bytes of the whole tree.  (Peak RSS is the kernel's
    high-water mark, so it needs no fast sampling; sampling more often cost
    this process a fifth of a core, taken from the workers being measured.)"""

    def __init__(self) -> None:
        self.root = os.getpid()

    def __enter__(self) -> "Monitor":
        self.peak_rss: dict[int, int] = {}
        self.peak_anon: dict[int, int] = {}
        self.start_rchar = {p: _rchar(p) for p in tree(self.root)}
        self.last_rchar = dict(self.start_rchar)
        for p in self.start_rchar:
            _reset_hwm(p)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for p in tree(self.root):
            st = _status(p)
            if st:
                self.peak_rss[p] = max(self.peak_rss.get(p, 0), st.get("VmHWM", 0), st.get("VmRSS", 0))
                self.peak_anon[p] = max(self.peak_anon.get(p, 0), st.get("RssAnon", 0))
            r = _rchar(p)
            if r:
                self.last_rchar[p] = r
                self.start_rchar.setdefault(p, 0)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __exit__(self, *exc: Any) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        driver = self.root
        workers = [p for p in self.peak_rss if p != driver]
        # The driver's read() bytes; the kernel folds those of reaped children
        # (the fork pool) into it. Cluster workers also read sockets, so
        # their counters are not storage reads and are left out.
        read = _rchar(driver) - self.start_rchar.get(driver, 0)
        return {
            "driver_peak_rss": self.peak_rss.get(driver, 0),
            "driver_peak_anon": self.peak_anon.get(driver, 0),
            "worker_peak_rss": max((self.peak_rss[p] for p in workers), default=0),
            "worker_peak_anon": max((self.peak_anon[p] for p in workers), default=0),
            "bytes_read": read,
        }


# -- runners -----------------------------------------------------------------------

@dataclass
class Runner:
    name: str
    fn: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    issues: Any = None
    error: str | None = None


def floor_runner(kind: str, paths: dict[str, str]) -> Callable[[], Any]:
    """One read of pred_probs, argmax and max of each row, on THREADS threads."""
    import zarr

    if kind == "npy":
        probs = np.load(paths["probs_npy"], mmap_mode="r")
        step = max(1, (64 << 20) // (probs.shape[1] * probs.itemsize))
    elif kind == "zarr":
        probs = zarr.open_array(paths["zarr_dir"], path="pred_probs", mode="r")
        step = probs.chunks[0]
    else:  # "zarr direct": the chunk reads the job itself makes (dask_labelissues.zarr_chunks)
        probs = open_path(paths["probs_zarr"], "pred_probs")
        step = probs.storage_rows

    def block(a: int) -> float:
        b = np.asarray(probs[a : a + step])
        return float(b.argmax(axis=1).sum()) + float(b.max(axis=1).sum())

    def run() -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(block, range(0, probs.shape[0], step)))

    return run


def fused_floor_runner(kind: str, paths: dict[str, str]) -> Callable[[], Any]:
    """One read of pred_probs with one fused numba pass per row (argmax,
    max, the label's probability, the row sum: benchmarks/one_process.py's
    kernel), on THREADS threads; Zarr through the job's direct chunk reads.
    The tighter floor: numpy's argmax and max take about twice as long."""
    import one_process

    key = "npy" if kind == "npy" else "zarr"
    labels = open_path(paths[f"labels_{key}"], "labels")
    probs = open_path(paths[f"probs_{key}"], "pred_probs")
    n, k = probs.shape
    step = probs.storage_rows or max(1, (64 << 20) // (k * probs.dtype.itemsize))
    bufs = (np.empty(n, np.int32), np.empty(n, probs.dtype), np.empty(n, probs.dtype), np.empty(n, np.float64))

    def block(a: int) -> None:
        b = min(a + step, n)
        one_process.fused(probs[a:b], np.asarray(labels[a:b]), *(x[a:b] for x in bufs))

    def run() -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(block, range(0, n, step)))

    return run


def ours(kind: str, paths: dict[str, str], **kwargs: Any) -> Callable[[], Any]:
    labels, probs = paths[f"labels_{kind}"], paths[f"probs_{kind}"]

    def run() -> np.ndarray:
        return find_label_issues(labels, probs, **kwargs).issues

    return run


def cleanlab_batched(paths: dict[str, str], n_jobs: int) -> Callable[[], Any]:
    def run() -> np.ndarray:
        from cleanlab.experimental.label_issues_batched import find_label_issues_batched

        return find_label_issues_batched(
            labels_file=paths["labels_npy"], pred_probs_file=paths["probs_npy"],
            batch_size=100_000, n_jobs=n_jobs, verbose=False,
        )

    return run


def cleanlab_filter(paths: dict[str, str]) -> Callable[[], Any]:
    def run() -> np.ndarray:
        from cleanlab.filter import find_label_issues as filter_issues

        labels = np.load(paths["labels_npy"])
        probs = np.load(paths["probs_npy"])
        return filter_issues(labels, probs, filter_by="low_self_confidence",
                             return_indices_ranked_by="self_confidence")

    return run


def ours_filter(kind: str, paths: dict[str, str], filter_by: str, stats: dict, **kwargs: Any) -> Callable[[], Any]:
    """Our filter_by run; records pred_probs reads and the time of the K x K step."""
    from dask_labelissues import filters

    labels, probs = paths[f"labels_{kind}"], paths[f"probs_{kind}"]

    def run() -> np.ndarray:
        original = filters.plan
        spent = []

        def timed(*args: Any) -> Any:
            t = time.perf_counter()
            out = original(*args)
            spent.append(time.perf_counter() - t)
            cells = out[0].cells
            stats["cells"] = 0 if cells is None else int(cells.limits.size)
            return out

        filters.plan = timed
        try:
            result = find_label_issues(labels, probs, filter_by=filter_by, **kwargs)
        finally:
            filters.plan = original
        stats.setdefault("reads", []).append(result.reads)
        stats.setdefault("kxk_s", []).append(sum(spent))
        return np.sort(result.issues)

    return run


def cleanlab_filter_by(paths: dict[str, str], filter_by: str, n_jobs: int) -> Callable[[], Any]:
    def run() -> np.ndarray:
        import warnings

        from cleanlab.filter import find_label_issues as filter_issues

        labels = np.load(paths["labels_npy"])
        probs = np.load(paths["probs_npy"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.flatnonzero(filter_issues(labels, probs, filter_by=filter_by, n_jobs=n_jobs))

    return run


def bench_filters(data_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """prune_by_noise_rate (cleanlab.filter's default) on (a) and on (b), K = 1,000."""
    out = []
    for name in ("a", "b"):
        paths = ensure_data(name, data_dir)
        spec = DATASETS[name]
        stats: dict[str, dict] = {"dask": {}, "fork": {}}
        runners = [
            Runner(f"floor (npy, {THREADS} threads)", floor_runner("npy", paths)),
            Runner("dask_labelissues dask threads", ours_filter("npy", paths, "prune_by_noise_rate", stats["dask"])),
            Runner(f"dask_labelissues fork n_jobs={THREADS}",
                   ours_filter("npy", paths, "prune_by_noise_rate", stats["fork"], backend="fork", n_jobs=THREADS)),
            Runner("cleanlab filter in memory n_jobs=1", cleanlab_filter_by(paths, "prune_by_noise_rate", 1)),
            Runner(f"cleanlab filter in memory n_jobs={THREADS}", cleanlab_filter_by(paths, "prune_by_noise_rate", THREADS)),
        ]
        print(f"[filters {name}] prune_by_noise_rate, {spec.rows:,} x {spec.classes}", flush=True)
        warm_page_cache(paths, "npy")
        time_runners(runners, repeats)
        med = {r.name: statistics.median(r.times) for r in runners if r.times}
        floor = med[runners[0].name]
        baseline = med.get("cleanlab filter in memory n_jobs=1")
        reference = next((r.issues for r in runners if r.name.startswith("cleanlab") and r.issues is not None), None)
        for r in runners:
            row = timing_row(r, med, floor, {"dataset": name, "runner": r.name, "filter_by": "prune_by_noise_rate"})
            out.append(row)
            if "error" in row:
                continue
            m = row["median_s"]
            if baseline:
                row["speedup_vs_cleanlab_filter_1"] = baseline / m
            if r.issues is not None and not r.name.startswith("floor"):
                row["num_issues"] = int(len(r.issues))
                if reference is not None:
                    row["same_as_cleanlab"] = digest(np.sort(r.issues)) == digest(np.sort(reference))
            for key, st in (("dask", stats["dask"]), ("fork", stats["fork"])):
                if r.name.startswith("dask_labelissues") and key in r.name:
                    row.update(reads=max(st.get("reads", [0])), kxk_s=statistics.median(st.get("kxk_s", [0])),
                               cells=st.get("cells"))
    return out


def time_runners(runners: list[Runner], repeats: int) -> None:
    for rep in range(repeats):
        for r in runners:
            if r.error:
                continue
            try:
                with Monitor() as mon:
                    t = time.perf_counter()
                    out = r.fn()
                    elapsed = time.perf_counter() - t
            except Exception as exc:  # reported, not hidden
                r.error = f"{type(exc).__name__}: {exc}"
                print(f"  {r.name}: FAILED {r.error}", flush=True)
                continue
            r.times.append(elapsed)
            r.memory.append(mon.summary())
            if out is not None and r.issues is None:
                r.issues = np.asarray(out)
            print(f"  [{rep + 1}/{repeats}] {r.name:<40} {elapsed:8.3f} s", flush=True)


def warm_page_cache(paths: dict[str, str], kind: str) -> None:
    """Read every file of one storage of a dataset once, untimed, so that the
    first timed repeat finds it in the page cache as the others do: a
    previous dataset (or anything else) may have pushed it out."""
    files: list[Path] = []
    for key in (f"labels_{kind}", f"probs_{kind}"):
        path = Path(paths[key].split(":")[0])
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    t = time.perf_counter()
    size = 0
    for f in dict.fromkeys(files):
        with open(f, "rb", buffering=0) as handle:
            while chunk := handle.read(64 << 20):
                size += len(chunk)
    print(f"  (page cache warmed: {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s)", flush=True)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:12]


def bench_dataset(name: str, paths: dict[str, str], repeats: int) -> dict[str, Any]:
    from distributed import Client

    spec = DATASETS[name]
    rows: list[dict[str, Any]] = []
    with local_cluster(THREADS, dashboard_address=None, memory_limit="4GB") as cluster, \
            Client(cluster, set_as_default=False) as client:
        for kind in ("npy", "zarr"):
            runners = [
                Runner(f"floor fused ({kind}, {THREADS} threads)", fused_floor_runner(kind, paths)),
                Runner(f"floor ({kind}, {THREADS} threads)", floor_runner(kind, paths)),
                *([Runner(f"floor (zarr direct, {THREADS} threads)", floor_runner("zarr direct", paths))]
                  if kind == "zarr" else []),
                Runner(f"dask_labelissues threads n_jobs={THREADS}", ours(kind, paths, backend="threads", n_jobs=THREADS)),
                Runner("dask_labelissues dask threads", ours(kind, paths, backend="dask")),
                Runner(f"dask_labelissues LocalCluster {THREADS}x1", ours(kind, paths, client=client)),
                Runner(f"dask_labelissues fork n_jobs={THREADS}", ours(kind, paths, backend="fork", n_jobs=THREADS)),
                Runner("dask_labelissues serial", ours(kind, paths, backend="serial")),
            ]
            if kind == "npy":
                runners += [
                    Runner("cleanlab batched n_jobs=1", cleanlab_batched(paths, 1)),
                    Runner("cleanlab batched n_jobs=2", cleanlab_batched(paths, 2)),
                ]
                if name != "c":
                    runners.append(Runner("cleanlab filter (in memory)", cleanlab_filter(paths)))
            print(f"[{name} {kind}] {spec.rows:,} x {spec.classes}", flush=True)
            warm_page_cache(paths, kind)
            time_runners(runners, repeats)
            rows += summarize(name, kind, runners, paths)
    return {"dataset": name, "rows": spec.rows, "classes": spec.classes, "runs": rows}


def timing_row(r: Runner, med: dict[str, float], floor: float, row: dict[str, Any]) -> dict[str, Any]:
    """A runner's median, its ratio to the floor and its peak memory (or its error)."""
    if r.error:
        return dict(row, error=r.error)
    mem = {k: max(x[k] for x in r.memory) for k in r.memory[0]}
    return dict(row, median_s=med[r.name], times_s=r.times, x_floor=med[r.name] / floor, **mem)


def summarize(name: str, kind: str, runners: list[Runner], paths: dict[str, str]) -> list[dict[str, Any]]:
    med = {r.name: statistics.median(r.times) for r in runners if r.times}
    # With two floors (zarr-python's read and the job's own direct chunk
    # reads), ratios are to the faster one.
    floor = min(v for k, v in med.items() if k.startswith("floor"))
    baseline = med.get("cleanlab batched n_jobs=1")
    reference = next((r.issues for r in runners if r.name == "dask_labelissues serial" and r.issues is not None), None)
    store = dir_bytes(paths["zarr_dir"] + "/pred_probs") if kind == "zarr" else None
    out = []
    for r in runners:
        row = timing_row(r, med, floor, {"dataset": name, "storage": kind, "runner": r.name, "repeats": len(r.times)})
        if "error" in row:
            out.append(row)
            continue
        m = row["median_s"]
        if baseline:
            row["speedup_vs_cleanlab_batched_1"] = baseline / m
        if store and r.name == f"floor (zarr, {THREADS} threads)":
            # zarr-python read()s its chunk files; everything else here maps them.
            row["reads_of_store"] = row["bytes_read"] / store
        if r.issues is not None and reference is not None:
            if r.name.startswith("dask_labelissues"):
                row["same_issues_as_serial"] = digest(r.issues) == digest(reference)
            else:
                a, b = set(r.issues.tolist()), set(reference.tolist())
                row["issue_set_jaccard_vs_ours"] = len(a & b) / max(1, len(a | b))
            row["num_issues"] = int(len(r.issues))
        out.append(row)
    return out


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_BIG: np.ndarray | None = None
_START: Any = None


def _probe_init(start: Any) -> None:
    global _BIG, _START
    _BIG = np.ones(64 << 20, dtype=np.float64)  # 512 MB, made before any timing
    _START = start


def _probe_unit(kind: str, together: bool) -> int:
    """One unit of work: a Python loop (CPU-bound, in cache) or 4 numpy sums
    of 512 MB (memory-bound).  With ``together``, wait until the other
    process is ready too, so the two units surely run at once."""
    if together:
        _START.wait(60)
    if kind == "cpu":
        total = 0
        for i in range(4_000_000):
            total += i * i
    else:
        for _ in range(4):
            _BIG.sum()
    return os.getpid()


_SOURCES: tuple[Any, Any] | None = None


def _scan_init(labels: str, probs: str) -> None:
    global _SOURCES
    _SOURCES = (open_path(labels, "labels"), open_path(probs, "pred_probs"))


def _scan_unit(start: int, stop: int) -> None:
    """Pass one's work on rows ``start:stop``: read and decode them, then
    the scan kernel, as a Dask scan task does, without Dask."""
    from dask_labelissues import states
    from dask_labelissues.kernels import ScoreSpec

    labels, probs = _SOURCES
    states.scan_block(labels[start:stop], probs[start:stop], start, ScoreSpec())


def bench_plain_scan(name: str, paths: dict[str, str], rounds: int) -> dict[str, float]:
    """Pass one's work on the dataset's Zarr store, piece by piece, in plain
    processes, one piece at a time against 2 at once (wall time, medians):
    how far the work itself scales on this machine, with no scheduler,
    workers or task overhead.  The processes get the environment the CLI's
    LocalCluster gives its workers (:data:`BATCH_SETTINGS`: glibc's
    allocator thresholds)."""
    import multiprocessing

    from dask_labelissues.cluster import _ENV, _put_back
    from dask_labelissues.engines.blocks import auto_chunk_rows, block_bounds, even_chunks

    probs = open_path(paths["probs_zarr"], "pred_probs")
    n, k = (int(x) for x in probs.shape)
    # The pieces the job's scan tasks read and scan one at a time.
    bounds = block_bounds(even_chunks(n, auto_chunk_rows(k * probs.dtype.itemsize, probs.storage_rows)))
    environ = {key.rsplit(".", 1)[1]: str(v) for key, v in BATCH_SETTINGS.items() if key.startswith(f"{_ENV}.")}
    before = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    try:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(2, initializer=_scan_init, initargs=(paths["labels_zarr"], paths["probs_zarr"]))
    finally:
        _put_back(before)
    one, two = [], []
    with pool:
        pool.starmap(_scan_unit, bounds[:2], chunksize=1)  # imports, kernels, first reads
        for _ in range(rounds):
            t = time.perf_counter()
            for a, b in bounds:
                pool.apply(_scan_unit, (a, b))
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            pool.starmap(_scan_unit, bounds, chunksize=1)
            two.append(time.perf_counter() - t)
    out = {"one_process_s": statistics.median(one), "two_processes_s": statistics.median(two)}
    out["speedup"] = out["one_process_s"] / out["two_processes_s"]
    print(f"[scaling] pass one's work on ({name}) Zarr in plain processes: 1 piece at a time "
          f"{out['one_process_s']:.3f} s, 2 at once {out['two_processes_s']:.3f} s, {out['speedup']:.2f}x", flush=True)
    return out


def bench_machine(repeats: int) -> dict[str, float]:
    """How far this machine lets 2 processes scale, for context beside the
    scaling rows: the same unit of work in 1 process, then in 2 at once;
    speed-up = 2 x (seconds for 1 unit) / (seconds for 2 units at once), wall
    time as the pool sees it.  CPU-bound work shows the cores; memory-bound
    work shows their shared memory bandwidth."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out: dict[str, float] = {}
    with ctx.Pool(2, initializer=_probe_init, initargs=(ctx.Barrier(2),)) as pool:
        for label, kind in (("cpu_bound", "cpu"), ("memory_bound", "memory")):
            one, two = [], []
            for _ in range(max(repeats, 5)):
                t = time.perf_counter()
                pool.apply(_probe_unit, (kind, False))
                one.append(time.perf_counter() - t)
                t = time.perf_counter()
                pids = pool.starmap(_probe_unit, [(kind, True)] * 2, chunksize=1)
                two.append(time.perf_counter() - t)
                assert len(set(pids)) == 2, "the two units ran in one process"
            out[label] = 2 * statistics.median(one) / statistics.median(two)
    print(f"[machine] 2 processes against 1: CPU-bound {out['cpu_bound']:.2f}x, "
          f"memory-bound {out['memory_bound']:.2f}x", flush=True)
    return out


#: Fewest rounds of the scaling rows: their ratio of two medians moved from
#: 1.62x to 1.75x over six A/B runs of one commit (a8dbcae) with 3 or 4
#: fresh clusters a side.
SCALING_ROUNDS = 5


def bench_scaling(name: str, paths: dict[str, str], repeats: int) -> list[dict[str, Any]]:
    """1 vs 2 single-thread workers on a dataset's Zarr store, interleaved,
    with the CPU time each process spends per run; on the LocalCluster the
    CLI starts (:func:`dask_labelissues.cluster.local_cluster`) and on one
    with distributed's default settings, then pass one's work in
    plain processes (:func:`bench_plain_scan`).  Each timed run gets a fresh
    cluster (after one untimed run to warm it), so no idle second cluster
    shares the machine's 2 cores with the one being measured.  At least
    :data:`SCALING_ROUNDS` rounds."""
    from distributed import Client

    repeats = max(repeats, SCALING_ROUNDS)
    print(f"[scaling] 1 vs 2 single-thread workers on ({name}) Zarr, {repeats} rounds", flush=True)
    variants = {"package": BATCH_SETTINGS, "defaults": {k: _distributed_default(k) for k in BATCH_SETTINGS}}
    times = {(v, n): [] for v in variants for n in (1, 2)}
    cpu = {(v, n): {"driver": [], "workers": []} for v in variants for n in (1, 2)}
    try:
        for rep in range(repeats):
            for variant, settings in variants.items():
                for n in (1, 2):
                    with local_cluster(n, memory_limit="4GB", dashboard_address=None, settings=settings) as cluster, \
                            Client(cluster, set_as_default=False) as client:
                        job = ours("zarr", paths, client=client)
                        job()
                        workers = list(client.run(os.getpid).values())
                        before = {p: _cpu_seconds(p) for p in [os.getpid(), *workers]}
                        t = time.perf_counter()
                        job()
                        times[variant, n].append(time.perf_counter() - t)
                        after = {p: _cpu_seconds(p) for p in before}
                    cpu[variant, n]["driver"].append(after[os.getpid()] - before[os.getpid()])
                    cpu[variant, n]["workers"].append(sum(after[p] - before[p] for p in workers))
                    print(f"  [{rep + 1}/{repeats}] LocalCluster {n}x1 ({variant} settings) "
                          f"{times[variant, n][-1]:8.3f} s", flush=True)
    except Exception as exc:  # reported, not hidden
        return [{"dataset": name, "storage": "zarr", "error": f"{type(exc).__name__}: {exc}"}]
    row: dict[str, Any] = {"dataset": name, "storage": "zarr", "settings": BATCH_SETTINGS, "rounds": repeats}
    try:
        row["plain_processes"] = bench_plain_scan(name, paths, repeats)
    except Exception as exc:  # reported, not hidden
        row["plain_processes"] = {"error": f"{type(exc).__name__}: {exc}"}
    for variant in variants:
        one, two = (statistics.median(times[variant, n]) for n in (1, 2))
        suffix = "" if variant == "package" else "_defaults"
        row.update({f"one_worker_s{suffix}": one, f"two_workers_s{suffix}": two, f"speedup{suffix}": one / two,
                    f"times_s{suffix}": {n: times[variant, n] for n in (1, 2)}})
        for n in (1, 2):
            row[f"cpu_{n}{suffix}"] = {k: statistics.median(v) for k, v in cpu[variant, n].items()}
    return [row]


def _distributed_default(key: str) -> Any:
    """A setting's value in the defaults distributed ships, not a config
    file's: the comparison is with distributed as installed.  None for a
    variable those defaults do not set (None leaves it out of the workers'
    pre-spawn environment)."""
    import dask

    for defaults in reversed(dask.config.defaults):
        try:
            return dask.config.get(key, config=defaults)
        except KeyError:
            continue
    if key.startswith("distributed.nanny.pre-spawn-environ."):
        return None
    raise KeyError(key)


def measure_one(engine: str, storage: str, data_dir: Path) -> dict[str, Any]:
    """Run one job on (c) in this (fresh) process and report its peak memory."""
    from distributed import Client

    paths = ensure_data("c", data_dir)
    kwargs: dict[str, Any] = {"backend": engine} if engine != "localcluster" else {}
    if engine == "fork":
        kwargs["n_jobs"] = THREADS
    with contextlib.ExitStack() as stack:
        if engine == "localcluster":
            cluster = stack.enter_context(local_cluster(THREADS, dashboard_address=None, memory_limit="2GB"))
            kwargs["client"] = stack.enter_context(Client(cluster, set_as_default=False))
        with Monitor() as mon:
            t = time.perf_counter()
            ours(storage, paths, **kwargs)()
            seconds = time.perf_counter() - t
    return {"engine": engine, "storage": storage, "seconds": seconds, **mon.summary()}


def bench_memory(data_dir: Path) -> list[dict[str, Any]]:
    """Peak memory on (c), each engine in a fresh process, so nothing that
    earlier runs left in the benchmark process is counted."""
    print("[memory] (c) in fresh processes", flush=True)
    out = []
    for storage in ("zarr", "npy"):
        for engine in ("dask", "localcluster", "fork", "serial"):
            proc = subprocess.run(
                [sys.executable, __file__, "--measure-one", engine, storage, "--data-dir", str(data_dir)],
                capture_output=True, text=True, timeout=3600,
            )
            if proc.returncode != 0:
                out.append({"engine": engine, "storage": storage, "error": proc.stderr.strip()[-300:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(row)
            print(f"  {engine:<13} {storage}: {row['seconds']:.1f} s, driver {mb(row['driver_peak_rss'])} MB "
                  f"(anon {mb(row['driver_peak_anon'])}), workers {mb(row['worker_peak_rss'])} MB "
                  f"(anon {mb(row['worker_peak_anon'])})", flush=True)
    return out


MEMCAP_OURS = """
import sys, time
from dask_labelissues import find_label_issues
t = time.perf_counter()
r = find_label_issues(sys.argv[1], sys.argv[2])
print(f"ok {r.num_issues} issues in {time.perf_counter() - t:.1f} s")
"""
MEMCAP_CLEANLAB = """
import sys, time
from cleanlab.experimental.label_issues_batched import find_label_issues_batched
t = time.perf_counter()
r = find_label_issues_batched(labels_file=sys.argv[1], pred_probs_file=sys.argv[2], batch_size=100000, verbose=False)
print(f"ok {len(r)} issues in {time.perf_counter() - t:.1f} s")
"""


def bench_memcap(paths: dict[str, str], limit: int = 1_500_000_000) -> list[dict[str, Any]]:
    print(f"[memcap] (c) .npy with prlimit --data={limit}", flush=True)
    out = []
    for who, code in (("dask_labelissues (dask threads)", MEMCAP_OURS), ("cleanlab batched n_jobs=1", MEMCAP_CLEANLAB)):
        t = time.perf_counter()
        proc = subprocess.run(["prlimit", f"--data={limit}", sys.executable, "-c", code,
                               paths["labels_npy"], paths["probs_npy"]],
                              capture_output=True, text=True, timeout=3600)
        tail = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
        out.append({"runner": who, "limit_bytes": limit, "completed": proc.returncode == 0,
                    "seconds": time.perf_counter() - t, "message": tail[-300:]})
        print(f"  {who}: {'completed' if proc.returncode == 0 else 'FAILED'} ({tail[-120:]})", flush=True)
    return out


# -- report ------------------------------------------------------------------------

def mb(x: int | None) -> str:
    return f"{x / 2**20:,.0f}" if x else "-"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Benchmarks ({report['when']}, {report['machine']})", ""]
    lines.append("| dataset | storage | runner | median s | x floor | speed-up vs cleanlab batched n_jobs=1 | "
                 "driver peak RSS MB (anon) | worker peak RSS MB (anon) | read (x store) | issues | same as serial |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for ds in report["datasets"]:
        for r in ds["runs"]:
            if "error" in r:
                lines.append(f"| {r['dataset']} | {r['storage']} | {r['runner']} | failed: {r['error'][:80]} ||||||||")
                continue
            same = r.get("same_issues_as_serial")
            same = "yes" if same else ("no" if same is False else f"J={r['issue_set_jaccard_vs_ours']:.4f}" if "issue_set_jaccard_vs_ours" in r else "")
            reads = (f"{r['reads_of_store']:.2f}" if "reads_of_store" in r
                     else "n/a" if "LocalCluster" in r["runner"] else "mmap")
            speed = f"{r['speedup_vs_cleanlab_batched_1']:.2f}" if "speedup_vs_cleanlab_batched_1" in r else ""
            lines.append(
                f"| {r['dataset']} | {r['storage']} | {r['runner']} | {r['median_s']:.3f} | {r['x_floor']:.2f} | {speed} | "
                f"{mb(r['driver_peak_rss'])} ({mb(r['driver_peak_anon'])}) | {mb(r['worker_peak_rss'])} ({mb(r['worker_peak_anon'])}) | "
                f"{reads} | {r.get('num_issues', '')} | {same} |"
            )
    if report.get("two_processes"):
        m = report["two_processes"]
        lines += ["", f"This machine, 2 processes against 1 on the same work (wall time, medians): "
                  f"CPU-bound (a Python loop) {m['cpu_bound']:.2f}x, memory-bound (numpy sums of 512 MB) "
                  f"{m['memory_bound']:.2f}x; context for the scaling rows, measured just before them."]
    for s in report.get("scaling", []):
        if "error" in s:
            lines += ["", f"Scaling on ({s['dataset']}) Zarr failed: {s['error']}"]
            continue
        for suffix, what in (("", "the CLI's LocalCluster (dask_labelissues.cluster.BATCH_SETTINGS)"),
                             ("_defaults", "a LocalCluster with distributed's default settings")):
            if f"speedup{suffix}" not in s:
                continue
            cpu = "".join(
                f"; with {n} worker{'s' * (n > 1)}, CPU per run: workers {s[f'cpu_{n}{suffix}']['workers']:.2f} s, "
                f"client and scheduler process {s[f'cpu_{n}{suffix}']['driver']:.2f} s"
                for n in (1, 2) if f"cpu_{n}{suffix}" in s
            )
            lines += ["", f"Scaling on ({s['dataset']}) Zarr, {what}: 1 worker {s[f'one_worker_s{suffix}']:.3f} s, "
                      f"2 workers {s[f'two_workers_s{suffix}']:.3f} s, speed-up {s[f'speedup{suffix}']:.2f}x "
                      f"(medians of {s.get('rounds', '?')} rounds){cpu}."]
        plain = s.get("plain_processes")
        if plain and "error" in plain:
            lines += ["", f"Pass one's work on ({s['dataset']}) Zarr in plain processes failed: {plain['error']}"]
        elif plain:
            lines += ["", f"Pass one's work on ({s['dataset']}) Zarr (read, decode, scan kernel) in plain "
                      f"processes, without Dask, piece by piece: one piece at a time {plain['one_process_s']:.3f} s, 2 at once "
                      f"{plain['two_processes_s']:.3f} s, {plain['speedup']:.2f}x: how far the work itself scales here."]
    if report.get("memory"):
        lines += ["", "Peak memory on (c) (10,000,000 x 100, 4 GB of float32), each engine in a fresh process:", "",
                  "| engine | storage | seconds | driver peak RSS MB (anon) | largest worker peak RSS MB (anon) |",
                  "|---|---|---:|---:|---:|"]
        for m in report["memory"]:
            if "error" in m:
                lines.append(f"| {m['engine']} | {m['storage']} | failed: {m['error'][:80]} | | |")
                continue
            lines.append(f"| {m['engine']} | {m['storage']} | {m['seconds']:.1f} | {mb(m['driver_peak_rss'])} "
                         f"({mb(m['driver_peak_anon'])}) | {mb(m['worker_peak_rss'])} ({mb(m['worker_peak_anon'])}) |")
        lines += ["", "RSS counts the pages of memory-mapped .npy files a process has touched (they are "
                  "page cache, reclaimable); anon is the memory the process itself allocated."]
    if report.get("filters"):
        lines += ["", "cleanlab.filter's default method, `filter_by=\"prune_by_noise_rate\"`, from .npy "
                  "(cleanlab loads the arrays into memory first; its load is in its time):", "",
                  "| dataset | runner | median s | x floor | speed-up vs cleanlab n_jobs=1 "
                  "| pred_probs reads | K x K step s | cells | issues | same as cleanlab |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in report["filters"]:
            if "error" in r:
                lines.append(f"| {r['dataset']} | {r['runner']} | failed: {r['error'][:80]} |||||||||")
                continue
            same = r.get("same_as_cleanlab")
            speed = f"{r['speedup_vs_cleanlab_filter_1']:.2f}" if "speedup_vs_cleanlab_filter_1" in r else ""
            ours = (f"{r['reads']} | {r['kxk_s']:.3f} | {r['cells']}" if "kxk_s" in r else " | | ")
            lines.append(
                f"| {r['dataset']} | {r['runner']} | {r['median_s']:.3f} | {r['x_floor']:.2f} | {speed} | "
                f"{ours} | {r.get('num_issues', '')} | {'' if same is None else 'yes' if same else 'no'} |"
            )
    for m in report.get("memcap", []):
        lines += ["", f"Memory cap (prlimit --data={m['limit_bytes']:,}) on (c) .npy, {m['runner']}: "
                  f"{'completed' if m['completed'] else 'failed'} in {m['seconds']:.1f} s ({m['message']})"]
    lines += ["", "x floor: median time over the median time of one read of pred_probs (argmax and max per row) "
              f"from the same storage on {THREADS} threads, measured in the same process; for Zarr, "
              "the faster of two floors: zarr-python's own read, and the direct chunk reads "
              "(dask_labelissues.zarr_chunks) the job makes. "
              "RSS includes memory-mapped file pages; anon is anonymous memory only. "
              "'read (x store)': read() bytes of the driver over the Zarr array's size on disk, for "
              "zarr-python's read; .npy files, and the Zarr chunk files the job and the direct floor "
              "read, are memory-mapped and read by page faults, which read() counters miss (mmap): "
              "that the job reads each block of pred_probs once is checked by the test suite "
              "(tests/test_single_read.py); n/a for cluster workers.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="a,b,c,scaling,memory,memcap,filters")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--measure-one", nargs=2, metavar=("ENGINE", "STORAGE"), help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every dataset's rows (e.g. 0.02 for a quick check of the harness)")
    args = p.parse_args(argv)
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if args.measure_one:
        print(json.dumps(measure_one(*args.measure_one, args.data_dir)))
        return 0
    if args.scale != 1.0:
        from dataclasses import replace

        for key, spec in DATASETS.items():
            DATASETS[key] = replace(spec, rows=max(1000, int(spec.rows * args.scale)))
    wanted = args.datasets.split(",")
    import platform

    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.machine()}",
        "datasets": [], "scaling": [], "memory": [], "memcap": [], "filters": [],
    }
    for name in ("a", "b", "c"):
        if name in wanted:
            report["datasets"].append(bench_dataset(name, ensure_data(name, args.data_dir), args.repeats))
    if "scaling" in wanted:
        report["two_processes"] = bench_machine(args.repeats)
        for name in ("a", "c"):
            report["scaling"] += bench_scaling(name, ensure_data(name, args.data_dir), args.repeats)
    if "memory" in wanted:
        report["memory"] = bench_memory(args.data_dir)
    if "memcap" in wanted:
        report["memcap"] = bench_memcap(ensure_data("c", args.data_dir))
    if "filters" in wanted:
        report["filters"] = bench_filters(args.data_dir, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / f"{stamp}.md").write_text(text)
    (args.out / "latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
