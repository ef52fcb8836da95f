"""Semantic segmentation: dask_labelissues.segmentation beside cleanlab.segmentation,
the one-read floor and a two-worker cluster.

    python benchmarks/segmentation.py [--repeats 3] [--quick]

The dataset (2,000 images x 20 classes x 128 x 128, from
``dask_labelissues.synthetic.segmentation_images``) is generated once into
benchmarks/data/seg-.../data.zarr, a Zarr v3 group written chunk by chunk
(8 whole images a chunk, zarr's default compressor), never whole in memory:
labels as uint8 (both libraries take any integer labels; uint8 is how masks
are stored), pred_probs as float32 and as float16.  Both pred_probs arrays
are rounded once from the same float64 probabilities, so they differ only
by their precision.  A third array holds the float32 values uncompressed
(zstd makes these probabilities only 1.09 times smaller, and its decoding
is most of a read: a store of model outputs is often written without it);
it is copied from the float32 array once, chunk by chunk.  ``--quick`` uses 240 images, for a check of the harness.

What is timed, in this one process, every case once untimed and then
``--repeats`` rounds with the cases interleaved, reported as medians (the
machine's speed drifts between runs, so compare the ratios, not the
seconds):

* ours: ``segmentation.find_label_issues`` on the Zarr arrays with its
  defaults (the threads engine here), float32, float16 and float32
  uncompressed;
* the floor: one read of the same store, block by block on 2 threads,
  doing the least per-pixel work (the max over the class axis, which
  numpy takes a class plane at a time, at about the speed of memory),
  through zarr-python and through the direct chunk reads the job itself
  makes; the faster one is the floor.  Ours can hardly beat one read of
  its input, so its time over the floor's is the price of everything else.
  (Runs before this one took argmax and max as the floor; numpy's argmax
  over the class axis is slower than the job's own pass one now is, so
  that was no floor.);
* cleanlab: ``cleanlab.segmentation.filter.find_label_issues`` (n_jobs=1)
  on numpy arrays of the first 500 images (cleanlab takes numpy, in
  memory, and adds a numpy scalar and its list slot per pixel: 655 MB of
  input and about 0.4 GB more here), and ours on the same arrays; speeds
  are compared in pixels per second, and the two masks pixel by pixel;
* the first call: a fresh Python process that imports the package and
  calls it twice on the Zarr store (its wall time from start to exit, the
  first call and the second).

Then, apart (each run in a fresh cluster, after one untimed run, so no idle
second cluster shares the 2 cores): the same job on a LocalCluster of
1 worker x 1 thread and of 2 workers x 1 thread, as the CLI starts it
(``dask_labelissues.cluster.local_cluster``), at least 5 rounds.

Peak memory is this process's (or the fresh process's) kernel high-water
mark, reset before each run.  The CPU time the rest of the machine takes
during each run is measured (/proc/stat less this process tree's own): a
run in which it took over a tenth of the cores is redone once the machine
is quiet (at most twice), and the table shows what it took in the runs
kept.  The report also says whether the package's sources changed during
the run (the workers of a cluster import them anew).  Results go to
benchmarks/results/segmentation-<UTC time>.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import platform
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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from dask_labelissues import segmentation  # noqa: E402
from dask_labelissues.cluster import local_cluster  # noqa: E402
from dask_labelissues.inputs import open_path  # noqa: E402
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images  # noqa: E402

THREADS = 2
FRESH = "ours, fresh process: import and two calls (Zarr float32), wall"
#: float64, so that each stored precision is one rounding of the same
#: probabilities (the float32 array is what ``dtype="float32"`` would give).
SPEC = SegmentationSpec(images=2000, classes=20, height=128, width=128, seed=2029, dtype="float64")
QUICK_IMAGES = 240
CHUNK_IMAGES = 8
#: Images cleanlab is given.  It takes numpy in memory (655 MB of float32
#: here) and adds a numpy float object and its list slot per pixel, about
#: 50 bytes a pixel at its peak (0.4 GB more); the whole dataset would take
#: about 4.3 GB and 12 s a run, and give no other ratio.
SUBSET_IMAGES = 500
QUICK_SUBSET_IMAGES = 48
PROB_DTYPES = ("float32", "float16")
#: The stores ours is timed on: an array of the group each, by its name in
#: the tables; "raw" is the float32 values without compression.
STORES = {"float32": "pred_probs_float32", "float16": "pred_probs_float16", "raw float32": "pred_probs_raw_float32"}
LABEL_DTYPE = np.uint8
#: A timed run during which the rest of the machine took more than this
#: share of its cores (tests, builds of other work on this shared machine)
#: is discarded and run again once the machine is quiet, at most
#: BUSY_RETRIES times; the last run is kept, and the table shows what the
#: others took in it.
BUSY_SHARE = 0.1
BUSY_RETRIES = 2
#: Fewest rounds of the cluster scaling: a ratio of two medians of
#: fresh-cluster runs needs more rounds than the in-process cases to settle.
SCALING_ROUNDS = 5

TARGETS = {
    "speedup_vs_cleanlab": (">=", 10.0),
    "x_floor": ("<=", 2.0),
    "cluster_scaling": (">=", 1.7),
}

FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
from dask_labelissues import segmentation
t1 = time.perf_counter()
mask = segmentation.find_label_issues(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
mask = segmentation.find_label_issues(sys.argv[1], sys.argv[2])
t3 = time.perf_counter()
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
print(json.dumps({"import_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2,
                  "flagged": int(mask.sum()), "peak_rss": peak}))
"""


# -- data ------------------------------------------------------------------------

def ensure_data(spec: SegmentationSpec, data_dir: Path) -> Path:
    """The dataset's Zarr group, written once; a write cut short is redone
    (the group is marked complete only at the end)."""
    import zarr

    n, k, h, w = spec.images, spec.classes, spec.height, spec.width
    path = data_dir / f"seg-{n}x{k}x{h}x{w}-s{spec.seed}" / "data.zarr"
    if (path / "zarr.json").exists() and zarr.open_group(str(path), mode="r").attrs.get("complete"):
        return path
    print(f"[data] writing {n:,} images x {k} classes x {h} x {w} to {path}", flush=True)
    t = time.perf_counter()
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    labels = group.create_array("labels", shape=(n, h, w), chunks=(CHUNK_IMAGES, h, w), dtype=LABEL_DTYPE)
    relabelled = group.create_array("relabelled", shape=(n, h, w), chunks=(CHUNK_IMAGES, h, w), dtype=bool)
    probs = {
        dt: group.create_array(f"pred_probs_{dt}", shape=(n, k, h, w), chunks=(CHUNK_IMAGES, k, h, w), dtype=dt)
        for dt in PROB_DTYPES
    }

    def write(a: int) -> None:
        b = min(a + CHUNK_IMAGES, n)
        lab, pp, rel = segmentation_images(spec, a, b)
        labels[a:b] = lab.astype(LABEL_DTYPE)
        relabelled[a:b] = rel
        for dt, arr in probs.items():
            arr[a:b] = pp.astype(dt)

    # The generator's numpy calls and zarr's codec release the GIL for part
    # of the time: on the 2-core benchmark machine, two threads wrote all
    # 2,000 images in 18 s, where generating them on one took 26 s.
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(write, range(0, n, CHUNK_IMAGES)))
    seconds = time.perf_counter() - t
    group.attrs.update({**dataclasses.asdict(spec), "write_seconds": seconds, "complete": True})
    print(f"[data] written in {seconds:.1f} s", flush=True)
    return path


def ensure_raw(path: Path) -> None:
    """The float32 values again, uncompressed, copied chunk by chunk (once:
    marked complete at the end)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    name = STORES["raw float32"]
    if group.attrs.get(f"{name}_complete"):
        return
    src = group[STORES["float32"]]
    print(f"[data] copying {src.shape} float32 to an uncompressed array", flush=True)
    dst = group.create_array(name, shape=src.shape, chunks=src.chunks, dtype=src.dtype, compressors=None,
                             overwrite=True)

    def copy(a: int) -> None:
        dst[a : a + CHUNK_IMAGES] = src[a : a + CHUNK_IMAGES]

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(copy, range(0, src.shape[0], CHUNK_IMAGES)))
    group.attrs[f"{name}_complete"] = True


def warm_page_cache(path: Path) -> None:
    """Read every file of the store once, untimed, so that the first timed
    round finds it in the page cache as the later ones do."""
    t, size = time.perf_counter(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as handle:
            while chunk := handle.read(64 << 20):
                size += len(chunk)
    print(f"  (page cache warmed: {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s)", flush=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- memory ------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> None:
    """Set the kernel's high-water mark of this process to its current RSS."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker_peak_rss() -> int:
    return _status("VmHWM")


def worker_cpu_s() -> float:
    """This process's CPU time (user and system), for a worker's cores in use."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- other load ----------------------------------------------------------------------

def _machine_cpu_s() -> tuple[float, float]:
    """CPU seconds since boot of all cores: busy (steal aside) and stolen by the host."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu_s() -> float:
    """This process's CPU seconds and its reaped children's (the fresh
    processes; a cluster's workers once it has closed)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(most: float = 120.0) -> None:
    """Wait (at most ``most`` seconds) for a second in which the rest of the
    machine used under a tenth of a core."""
    end = time.monotonic() + most
    while time.monotonic() < end:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.others_s + load.steal_s < 0.1:
            return


class OtherLoad:
    """CPU seconds the rest of the machine used during a block, and the
    host's steal: on a shared 2-core machine, anything else running takes
    its time from the runs measured, so it is reported beside them."""

    def __enter__(self) -> "OtherLoad":
        (self._busy, self._steal), self._own = _machine_cpu_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: Any) -> None:
        busy, steal = _machine_cpu_s()
        self.others_s = max(0.0, busy - self._busy - (_own_cpu_s() - self._own))
        self.steal_s = steal - self._steal


# -- cases -------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    fn: Callable[[], Any]
    pixels: int
    times: list[float] = dataclasses.field(default_factory=list)
    peak_rss: list[int] = dataclasses.field(default_factory=list)
    rss_growth: list[int] = dataclasses.field(default_factory=list)
    outputs: list[Any] = dataclasses.field(default_factory=list)
    others_cpu: list[float] = dataclasses.field(default_factory=list)
    discarded: int = 0
    error: str | None = None

    def run(self) -> float:
        gc.collect()  # an earlier case's garbage is not collected inside this one's time
        before = _status("VmRSS")
        _reset_peak()
        with OtherLoad() as load:
            t = time.perf_counter()
            out = self.fn()
            elapsed = time.perf_counter() - t
        peak = _status("VmHWM")
        self.others_cpu.append(load.others_s + load.steal_s)
        self.times.append(elapsed)
        self.peak_rss.append(peak)
        self.rss_growth.append(peak - before)
        # Arrays are kept once, to be compared; small reports every time.
        if isinstance(out, dict) or not self.outputs:
            self.outputs.append(out)
        return elapsed

    def discard_last(self) -> None:
        for measured in (self.times, self.peak_rss, self.rss_growth, self.others_cpu):
            measured.pop()
        self.discarded += 1

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def floor(probs: Any, step: int) -> Callable[[], None]:
    """One read of pred_probs, block by block on THREADS threads: the max
    over the class axis of every pixel (one pass over each value)."""
    n = int(probs.shape[0])

    def block(a: int) -> None:
        np.asarray(probs[a : a + step]).max(axis=1)

    def run() -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(block, range(0, n, step)))

    return run


def first_call(labels: str, probs: str) -> dict[str, Any]:
    """A fresh process: import, first call, second call; its wall time too."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL, labels, probs], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def build_cases(path: Path, spec: SegmentationSpec, subset: int) -> dict[str, Any]:
    import zarr
    from cleanlab.segmentation.filter import find_label_issues as cleanlab_find

    group = zarr.open_group(str(path), mode="r")
    labels = group["labels"]
    probs = {name: group[array] for name, array in STORES.items()}
    pixels = spec.images * spec.height * spec.width
    sub_pixels = subset * spec.height * spec.width
    labels_np = np.asarray(labels[:subset])
    probs_np = np.asarray(probs["float32"][:subset])
    cases = []
    for name, array in STORES.items():
        direct = open_path(f"{path}:{array}", "pred_probs")
        cases += [
            Case(f"floor {name}, zarr-python", floor(probs[name], CHUNK_IMAGES), pixels),
            Case(f"floor {name}, direct chunk reads", floor(direct, direct.storage_rows), pixels),
            Case(f"ours, Zarr {name}", lambda p=probs[name]: segmentation.find_label_issues(labels, p), pixels),
        ]
    cases += [
        Case(f"ours, numpy float32, first {subset} images",
             lambda: segmentation.find_label_issues(labels_np, probs_np), sub_pixels),
        Case(f"cleanlab n_jobs=1, numpy float32, first {subset} images",
             lambda: cleanlab_find(labels_np, probs_np, n_jobs=1, verbose=False), sub_pixels),
        Case(FRESH, lambda: first_call(f"{path}:labels", f"{path}:pred_probs_float32"), 0),
    ]
    return {"cases": cases, "group": group, "labels": labels, "probs": probs, "labels_np": labels_np,
            "probs_np": probs_np}


def time_cases(cases: list[Case], repeats: int) -> None:
    print("[warm-up] every case once, untimed (numba's kernels, imports, first reads)", flush=True)
    for case in cases:
        try:
            case.fn()
        except Exception as exc:  # reported, not hidden
            case.error = f"{type(exc).__name__}: {exc}"
            print(f"  {case.name}: FAILED {case.error}", flush=True)
    cores = len(os.sched_getaffinity(0))
    for rep in range(repeats):
        for case in cases:
            if case.error:
                continue
            for attempt in range(1 + BUSY_RETRIES):
                elapsed = case.run()
                others = case.others_cpu[-1]
                busy = others > BUSY_SHARE * elapsed * cores
                note = f"  (others' CPU {others:.1f} s{', run again' if busy and attempt < BUSY_RETRIES else ''})"
                print(f"  [{rep + 1}/{repeats}] {case.name:<58} {elapsed:8.3f} s{note if busy else ''}", flush=True)
                if not busy or attempt == BUSY_RETRIES:
                    break
                case.discard_last()
                wait_quiet()


def bench_scaling(labels: Any, probs: Any, pixels: int, rounds: int, reference: np.ndarray) -> dict[str, Any]:
    """1 against 2 single-thread workers, a fresh cluster per timed run (after
    one untimed run in it), the order alternating round by round."""
    print(f"[scaling] LocalCluster 1x1 against 2x1 on Zarr float32, {rounds} rounds", flush=True)
    times: dict[int, list[float]] = {1: [], 2: []}
    peaks: dict[int, list[int]] = {1: [], 2: []}
    used_cores: dict[int, list[float]] = {1: [], 2: []}
    others: dict[int, list[float]] = {1: [], 2: []}
    same, bare_call, discarded = True, None, 0
    cores = len(os.sched_getaffinity(0))
    for rep in range(rounds):
        for n in ((1, 2) if rep % 2 == 0 else (2, 1)):
            for attempt in range(1 + BUSY_RETRIES):
                t = time.perf_counter()
                with OtherLoad() as load:
                    seconds, peak, mask, bare, used = _cluster_run(labels, probs, n, probe=bare_call is None)
                busy = load.others_s + load.steal_s > BUSY_SHARE * (time.perf_counter() - t) * cores
                print(f"  [{rep + 1}/{rounds}] LocalCluster {n}x1 {seconds:8.3f} s"
                      + (f"  (others' CPU {load.others_s + load.steal_s:.1f} s)" if busy else ""), flush=True)
                bare_call = bare_call or bare
                if not busy or attempt == BUSY_RETRIES:
                    break
                discarded += 1
                wait_quiet()
            times[n].append(seconds)
            peaks[n].append(peak)
            used_cores[n].append(used / seconds)
            others[n].append(load.others_s + load.steal_s)
            same = same and mask.shape == reference.shape and bool((mask == reference).all())
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"rounds": rounds, "times_s": times, "one_worker_s": one, "two_workers_s": two,
            "one_worker_pixels_per_s": pixels / one, "two_workers_pixels_per_s": pixels / two,
            "speedup": one / two, "worker_peak_rss": {n: max(v) for n, v in peaks.items()},
            "worker_cores": {n: statistics.median(v) for n, v in used_cores.items()},
            "same_mask_as_threads": same, "bare_client_call": bare_call,
            "others_cpu_s_per_cluster": others, "runs_discarded_as_busy": discarded}


def _cluster_run(labels: Any, probs: Any, n: int, probe: bool) -> tuple[float, int, np.ndarray, str | None, float]:
    """One fresh cluster of ``n`` single-thread workers: an untimed run, then
    the timed one; ``(seconds, largest worker peak RSS, mask, probe's
    outcome, the workers' CPU seconds in the timed run)``.  A worker of one
    thread can use more than one core: zarr decodes chunks on threads of
    its own."""
    from distributed import Client

    with local_cluster(n, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        bare = _bare_client_call(labels, probs, client) if probe else None
        # The mask of a numpy or Zarr input is made numpy on the current
        # scheduler: with the client passed but not current, that local
        # compute lacks the blocks held on the cluster, so the calls are
        # made with it current (see _bare_client_call).
        with client.as_current():
            segmentation.find_label_issues(labels, probs, client=client)
            before = client.run(worker_cpu_s)
            t = time.perf_counter()
            mask = segmentation.find_label_issues(labels, probs, client=client)
            seconds = time.perf_counter() - t
            after = client.run(worker_cpu_s)
        peak = max(client.run(worker_peak_rss).values())
    return seconds, peak, np.asarray(mask), bare, sum(after[w] - before[w] for w in before)


def _bare_client_call(labels: Any, probs: Any, client: Any) -> str:
    """``find_label_issues(..., client=client)`` with a client that is not
    the current one, as a script that keeps its Client to itself makes it:
    "ok" or its error."""
    try:
        segmentation.find_label_issues(labels, probs, client=client)
    except Exception as exc:  # reported, not hidden
        return f"{type(exc).__name__}: {exc}"
    return "ok"


# -- checks ------------------------------------------------------------------------

def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(a, dtype=bool)).tobytes()).hexdigest()[:12]


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return {"identical": a.shape == b.shape and bool((a == b).all()), "differing_pixels": int(np.count_nonzero(a != b)),
            "flagged": [int(a.sum()), int(b.sum())]}


def run_checks(built: dict[str, Any], cases: dict[str, Case], subset: int) -> dict[str, Any]:
    ours32 = np.asarray(cases["ours, Zarr float32"].outputs[0])
    ours16 = np.asarray(cases["ours, Zarr float16"].outputs[0])
    ours_sub = cases[f"ours, numpy float32, first {subset} images"].outputs[0]
    cleanlab_sub = cases[f"cleanlab n_jobs=1, numpy float32, first {subset} images"].outputs[0]
    int64 = segmentation.find_label_issues(built["labels_np"].astype(np.int64), built["probs_np"], backend="threads")
    truth = np.asarray(built["group"]["relabelled"][:])
    hits = int(np.count_nonzero(ours32 & truth))
    fresh = [o["flagged"] for o in cases[FRESH].outputs]
    return {
        "ours_vs_cleanlab_subset": compare(ours_sub, cleanlab_sub),
        "ours_float32_vs_float16": compare(ours32, ours16),
        "uint8_vs_int64_labels_subset": compare(ours_sub, int64),
        "fresh_process_flags_as_many": all(f == int(ours32.sum()) for f in fresh),
        "against_relabelled_truth": {
            "flagged": int(ours32.sum()), "relabelled": int(truth.sum()), "flagged_and_relabelled": hits,
            "precision": hits / max(1, int(ours32.sum())), "recall": hits / max(1, int(truth.sum())),
        },
        "digest_ours_float32": digest(ours32),
    }


# -- report ------------------------------------------------------------------------

def verdict(ratio: float, target: tuple[str, float]) -> str:
    op, goal = target
    if op == ">=":
        if ratio >= goal:
            return f"met ({ratio / goal:.2f}x the target)"
        return f"not met ({1 - ratio / goal:.0%} short)"
    if ratio <= goal:
        return f"met ({goal / ratio:.2f}x under the target)"
    return f"not met ({ratio / goal - 1:.0%} over)"


def machine() -> dict[str, Any]:
    import cleanlab
    import dask
    import distributed
    import numba
    import zarr

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (np, zarr, dask, distributed, numba, cleanlab)},
    }


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+uncommitted" if git("status", "--porcelain", "dask_labelissues") else "")


def package_digest() -> str:
    """The package's sources as they are on disk: the workers of a cluster
    import them anew, so an edit during the run would mix two versions."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "dask_labelissues").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def redone(n: int) -> str:
    return f" ({n} run{'s' * (n > 1)} redone)" if n else ""


def mb(x: float | None) -> str:
    return f"{x / 2**20:,.0f}" if x else "-"


def summarize(cases: list[Case], scaling: dict[str, Any] | None, subset: int) -> dict[str, Any]:
    med = {c.name: c.median for c in cases if c.times}
    by = {c.name: c for c in cases}
    pps = {c.name: c.pixels / c.median for c in cases if c.times and c.pixels}
    ratios: dict[str, Any] = {}

    def ratio(key: str, value: float, what: str) -> None:
        row = {"value": value, "what": what}
        if key in TARGETS:
            op, goal = TARGETS[key]
            row.update(target=f"{op} {goal:g}", verdict=verdict(value, TARGETS[key]))
        ratios[key] = row

    ours32, ours16 = "ours, Zarr float32", "ours, Zarr float16"
    ours_sub = f"ours, numpy float32, first {subset} images"
    cleanlab = f"cleanlab n_jobs=1, numpy float32, first {subset} images"
    floors = {dt: min(med[n] for n in med if n.startswith(f"floor {dt},")) for dt in STORES
              if any(n.startswith(f"floor {dt},") for n in med)}
    ours_raw = "ours, Zarr raw float32"
    if ours32 in pps and cleanlab in pps:
        ratio("speedup_vs_cleanlab", pps[ours32] / pps[cleanlab],
              f"pixels/s of ours on the whole Zarr float32 store over cleanlab's on {subset} images in memory")
    if ours_raw in pps and cleanlab in pps:
        ratio("speedup_vs_cleanlab_raw", pps[ours_raw] / pps[cleanlab],
              f"the same, ours on the uncompressed float32 store")
    floor32 = [n for n in pps if n.startswith("floor float32,")]
    if floor32 and cleanlab in pps:
        ratio("floor_vs_cleanlab", max(pps[n] for n in floor32) / pps[cleanlab],
              "pixels/s of the float32 floor over cleanlab's: the most ours can reach from this store")
    if ours_sub in pps and cleanlab in pps:
        ratio("speedup_vs_cleanlab_same_input", pps[ours_sub] / pps[cleanlab],
              f"ours over cleanlab, both on the same {subset} images in memory")
    if ours32 in med and "float32" in floors:
        ratio("x_floor", med[ours32] / floors["float32"], "ours' time over the one-read floor's, Zarr float32")
    if ours16 in med and "float16" in floors:
        ratio("x_floor_float16", med[ours16] / floors["float16"], "the same on float16")
    if ours_raw in med and "raw float32" in floors:
        ratio("x_floor_raw", med[ours_raw] / floors["raw float32"], "the same on uncompressed float32")
    if ours32 in med and ours16 in med:
        ratio("float16_speedup", med[ours32] / med[ours16], "ours on float32 over ours on float16 (time)")
    if scaling and "speedup" in scaling:
        ratio("cluster_scaling", scaling["speedup"], "LocalCluster 1 worker x 1 thread over 2 workers x 1 thread (time)")
    fresh = by.get(FRESH)
    user = None
    if fresh and fresh.times:
        user = {k: statistics.median(o[k] for o in fresh.outputs) for k in ("wall_s", "import_s", "first_s", "second_s")}
        user["peak_rss"] = max(o["peak_rss"] for o in fresh.outputs)
        user["warm_in_process_s"] = med.get(ours32)
        ratio("first_over_warm", user["first_s"] / med[ours32], "first call in a fresh process over the warm call")
    rows = []
    for c in cases:
        if not c.times:
            rows.append({"case": c.name, "error": c.error})
            continue
        row = {"case": c.name, "median_s": c.median, "times_s": c.times, "pixels": c.pixels,
               "pixels_per_s": c.pixels / c.median if c.pixels else None,
               "peak_rss": max(c.peak_rss), "rss_growth": max(c.rss_growth), "others_cpu_s": c.others_cpu,
               "runs_discarded_as_busy": c.discarded}
        if c.name == FRESH:  # its own process's peak; this one only waited
            row.update(peak_rss=max(o["peak_rss"] for o in c.outputs), rss_growth=None)
        rows.append(row)
    if cleanlab in by and by[cleanlab].times:
        ratios["cleanlab_bytes_per_pixel"] = {
            "value": max(by[cleanlab].rss_growth) / by[cleanlab].pixels,
            "what": "cleanlab's peak memory growth over its input already in memory, per pixel"}
    return {"rows": rows, "ratios": ratios, "first_call": user, "floors_s": floors}


def markdown(report: dict[str, Any]) -> str:
    s, m = report["spec"], report["machine"]
    lines = [
        f"# Segmentation benchmark, {report['started_utc']} UTC (commit {report['commit']})", "",
        f"{s['images']:,} images x {s['classes']} classes x {s['height']} x {s['width']} "
        f"({report['pixels']:,} pixels; pred_probs {report['store_mb']['float32']:,.0f} MB float32, "
        f"{report['store_mb']['float16']:,.0f} MB float16 on disk, Zarr v3, {CHUNK_IMAGES} images a chunk, "
        f"zstd; and {report['store_mb'].get('raw float32', 0):,.0f} MB float32 uncompressed), labels uint8. Medians of {report['repeats']} interleaved rounds after one untimed; "
        f"machine: {m['usable_cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB; "
        f"{', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Run time {report['run_seconds'] / 60:.1f} min, "
        f"in which other processes (and the host's steal) took {report['others_cpu_s']:.0f} CPU s, "
        f"{report['others_cpu_s'] / (report['run_seconds'] * m['usable_cpus']):.0%} of the machine."
        + (" **The package's sources changed during the run.**" if report["package_changed_during_run"] else ""), "",
        "| case | median s | pixels/s | peak RSS MB (growth) | others' CPU s (most in a kept run) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["summary"]["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:100]} | | | |")
            continue
        speed = f"{r['pixels_per_s'] / 1e6:,.1f} M" if r["pixels_per_s"] else ""
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {speed} | "
                     f"{mb(r['peak_rss'])} ({mb(r['rss_growth'])}) | {max(r['others_cpu_s']):.1f}"
                     f"{redone(r['runs_discarded_as_busy'])} |")
    sc = report.get("scaling")
    if sc and "error" in sc:
        lines.append(f"| LocalCluster | failed: {sc['error'][:100]} | | | |")
    elif sc:
        for n, key in ((1, "one_worker"), (2, "two_workers")):
            lines.append(f"| ours, LocalCluster {n} worker{'s' * (n > 1)} x 1 thread, Zarr float32 "
                         f"({sc['rounds']} rounds, fresh clusters) | {sc[f'{key}_s']:.3f} | "
                         f"{sc[f'{key}_pixels_per_s'] / 1e6:,.1f} M | workers {mb(sc['worker_peak_rss'][n])} | "
                         f"{max(sc['others_cpu_s_per_cluster'][n]):.1f} (whole cluster) |")
        lines.append(f"| (cores the workers used, CPU time over wall: 1 worker {sc['worker_cores'][1]:.2f}, "
                     f"2 workers {sc['worker_cores'][2]:.2f}) | | | | |")
        if sc["runs_discarded_as_busy"]:
            lines.append(f"| (cluster runs redone, the machine busy) | {sc['runs_discarded_as_busy']} | | | |")
    lines += ["", "| ratio | value | target | verdict |", "|---|---:|---:|---|"]
    for key, r in report["summary"]["ratios"].items():
        value = f"{r['value']:,.0f} B" if key.endswith("per_pixel") else f"{r['value']:.2f}x"
        lines.append(f"| {r['what']} | {value} | {r.get('target', '')} | {r.get('verdict', '')} |")
    u = report["summary"]["first_call"]
    if u:
        lines += ["", f"What a user waits for (Zarr float32): a fresh `python -c` process that imports the "
                  f"package and calls it twice takes {u['wall_s']:.2f} s wall (import {u['import_s']:.2f} s, "
                  f"first call {u['first_s']:.2f} s, second call {u['second_s']:.2f} s, peak RSS "
                  f"{mb(u['peak_rss'])} MB); the warm call in this process {u['warm_in_process_s']:.2f} s."]
    c = report.get("checks", {})
    if c:
        sub, half = c["ours_vs_cleanlab_subset"], c["ours_float32_vs_float16"]
        t, ints = c["against_relabelled_truth"], c["uint8_vs_int64_labels_subset"]
        lines += [
            "", "Checks:", "",
            f"- ours against cleanlab on the same {report['subset_images']} images: "
            + ("identical masks" if sub["identical"] else f"{sub['differing_pixels']:,} pixels differ")
            + f" ({sub['flagged'][0]:,} flagged by ours, {sub['flagged'][1]:,} by cleanlab);",
            "- ours on float32 against float16: " + ("identical" if half["identical"] else
                                                      f"{half['differing_pixels']:,} pixels differ")
            + f" ({half['flagged'][0]:,} and {half['flagged'][1]:,} flagged);",
            f"- uint8 against int64 labels: {'identical' if ints['identical'] else 'DIFFERENT'};",
            f"- the cluster's mask is the threads engine's: "
            f"{'yes' if sc and sc.get('same_mask_as_threads') else 'NO' if sc and 'error' not in sc else 'n/a'}; "
            f"the fresh process flags as many pixels: {'yes' if c['fresh_process_flags_as_many'] else 'NO'};",
            f"- `find_label_issues(..., client=client)` with a client that is not the current one: "
            f"{(sc or {}).get('bare_client_call', 'not run')[:200]}"
            + ("" if (sc or {}).get("bare_client_call") == "ok" else " (the cluster rows were run with the client "
               "current: `with client.as_current():`)") + ";",
            f"- against the generator's relabelled pixels ({t['relabelled']:,}): ours flags {t['flagged']:,}, "
            f"precision {t['precision']:.3f}, recall {t['recall']:.3f}.",
        ]
    lines += ["", "The floor is the faster of two one-read passes over the same store on "
              f"{THREADS} threads taking the max over the class axis: zarr-python's reads, and the direct "
              "chunk reads (dask_labelissues.zarr_chunks) the job makes. cleanlab is given the first "
              f"{report['subset_images']} images as numpy (it takes only numpy, in memory, and keeps a numpy scalar "
              "per pixel); its pixels/s is compared with ours on the whole store and on the same arrays. "
              "Peak RSS is this process's high-water mark during the case (the subset arrays and the "
              "store's page cache mappings included); growth is over its RSS before the case.", ""]
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    spec = dataclasses.replace(SPEC, images=QUICK_IMAGES) if args.quick else SPEC
    subset = QUICK_SUBSET_IMAGES if args.quick else SUBSET_IMAGES
    path = ensure_data(spec, args.data_dir)
    ensure_raw(path)
    warm_page_cache(path)
    built = build_cases(path, spec, subset)
    cases: list[Case] = built["cases"]
    time_cases(cases, args.repeats)
    by = {c.name: c for c in cases}
    reference = by["ours, Zarr float32"].outputs[0] if by["ours, Zarr float32"].outputs else None
    try:
        checked = run_checks(built, by, subset)
    except Exception as exc:  # reported, not hidden
        checked = {}
        print(f"  checks FAILED: {type(exc).__name__}: {exc}", flush=True)
    scaling: dict[str, Any] | None = None
    if reference is not None:
        try:
            scaling = bench_scaling(built["labels"], built["probs"]["float32"], by["ours, Zarr float32"].pixels,
                                    args.repeats if args.quick else max(args.repeats, SCALING_ROUNDS),
                                    np.asarray(reference))
        except Exception as exc:  # reported, not hidden
            scaling = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  scaling FAILED: {scaling['error']}", flush=True)
    return {
        "machine": machine(), "repeats": args.repeats, "quick": args.quick, "spec": dataclasses.asdict(spec),
        "subset_images": subset, "pixels": spec.images * spec.height * spec.width,
        "store_mb": {name: dir_bytes(path / array) / 2**20 for name, array in STORES.items()},
        "summary": summarize(cases, scaling, subset), "scaling": scaling, "checks": checked,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, a check of the harness")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    started = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit, sources = git_commit(), package_digest()
    with OtherLoad() as whole:
        report = measure(args)
    report.update(started_utc=started, commit=commit, run_seconds=time.perf_counter() - t0,
                  others_cpu_s=whole.others_s + whole.steal_s,
                  package_changed_during_run=package_digest() != sources)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"segmentation-{started}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"[written] {out}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
