"""Multi-label: dask_labelissues.multilabel_classification beside cleanlab's,
and beside this package's former plan of one job a class.

    python benchmarks/multilabel.py [--rows 400000] [--classes 50] [--repeats 3]
        [--skip-per-class] [--cleanlab-low-memory] [--scaling-rounds 2] [--memory]

The size of record is ``--rows 2000000 --classes 100 --repeats 1
--skip-per-class --cleanlab-low-memory --scaling-rounds 1 --memory``.

The dataset (``--rows`` x ``--classes``, about 30% of the labels present a
row, a model surer where it is right, 3% of the labels toggled) is made
once into benchmarks/data/ml-<rows>x<classes>-s7/: labels as an (N, K)
uint8 matrix and pred_probs as float32, each as ``.npy`` and as a Zarr v3
array of 20,000-row chunks.

What is timed, in this one process, every case once untimed and then
``--repeats`` rounds with the cases interleaved, reported as medians
(compare the ratios, not the seconds: the machine's speed drifts):

* ours: ``find_label_issues`` (filter_by prune_by_noise_rate, the default)
  with its defaults (the threads engine here) on the ``.npy`` files and on
  the Zarr arrays: every stage reads pred_probs once for all K classes
  (``dask_labelissues.lockstep``);
* one job a class: the same filter run class by class, each class's job
  reading pred_probs itself (``pipelines.run_filter`` on a
  ``OneVsRest`` engine, as this package ran it before), on the Zarr arrays;
* cleanlab: ``cleanlab.multilabel_classification.filter.find_label_issues``
  on the same data in memory (label lists, n_jobs=1).

With ``--cleanlab-low-memory``, cleanlab's ``low_memory=True`` (its
batched estimate, class by class) is timed once too, and its mask compared.
With ``--scaling-rounds R``: ours on a LocalCluster of 1 worker x 1 thread
against 2 workers x 1 thread, reading the Zarr arrays, ``R`` timed runs
each in fresh clusters (numba's kernels are loaded in the workers by a run
on a small store first), with the workers' CPU seconds.  With
``--memory``: the peak RSS of a fresh process running ours (threads, Zarr)
and cleanlab (in memory) at ``--rows`` and at a quarter of them, and ours
under ``prlimit --data`` at half of pred_probs' size.

Bytes of pred_probs served are counted for ours and the one-job-a-class
plan, and the masks compared.  Then, from the shell: ``dask-labelissues
find --task multilabel`` on the ``.npy`` files (the whole command: start-up,
the job, the scores, the results store), and a fresh process's first call
against its second.  Results go to benchmarks/results/multilabel-<UTC
time>.md and .json.
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
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

import harness

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).with_name("dask-labelissues"))
CHUNK_ROWS = 20_000


def ensure_data(rows: int, classes: int, data_dir: Path) -> Path:
    """The dataset's directory, written once, a chunk of rows at a time."""
    import zarr

    path = data_dir / f"ml-{rows}x{classes}-s7"
    if (path / "done").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    labels = np.lib.format.open_memmap(path / "labels.npy", "w+", np.uint8, (rows, classes))
    probs = np.lib.format.open_memmap(path / "pred_probs.npy", "w+", np.float32, (rows, classes))
    zl = zarr.create_array(str(path / "data.zarr"), name="labels", shape=(rows, classes),
                           chunks=(CHUNK_ROWS, classes), dtype=np.uint8)
    zp = zarr.create_array(str(path / "data.zarr"), name="pred_probs", shape=(rows, classes),
                           chunks=(CHUNK_ROWS, classes), dtype=np.float32)
    for a in range(0, rows, CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, rows)
        rng = np.random.default_rng([7, a])
        truth = rng.random((b - a, classes)) < 0.3
        p = np.where(truth, rng.beta(5, 2, truth.shape), rng.beta(2, 5, truth.shape)).astype(np.float32)
        given = truth ^ (rng.random(truth.shape) < 0.03)
        labels[a:b], probs[a:b] = given, p
        zl[a:b], zp[a:b] = given.astype(np.uint8), p
    labels.flush()
    probs.flush()
    (path / "done").write_text("")
    return path


class Counting:
    """A row source that counts the bytes of pred_probs it serves."""

    def __init__(self, source: Any) -> None:
        self.source, self.shape, self.dtype, self.ndim = source, source.shape, source.dtype, 2
        self.served = 0

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.asarray(self.source[key])
        self.served += out.nbytes
        return out


def per_class_jobs(labels: Any, probs: Any) -> np.ndarray:
    """The filter class by class, each class's job reading pred_probs itself."""
    from dask_labelissues.filters import filter_spec
    from dask_labelissues.engines import make_engine
    from dask_labelissues.kernels import ScoreSpec
    from dask_labelissues.kinds import OneVsRest
    from dask_labelissues.pipelines import run_filter

    k = int(probs.shape[1])
    fspec = filter_spec("prune_by_noise_rate", 1.0, None, 1)
    masks = []
    for c in range(k):
        engine, _, _ = make_engine("auto", labels, probs, ScoreSpec(), single_read=False, kind=OneVsRest(k=c))
        try:
            result = run_filter(engine, engine.plan.spec, fspec, probs.dtype, False)
            masks.append(np.asarray(result.arrays["is_label_issue"]))
        finally:
            engine.close()
    return np.stack(masks, axis=1).any(axis=1)


def shell_runs(path: Path, repeats: int) -> dict[str, Any]:
    """The CLI's wall time, and a fresh process's first and second calls."""
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            cmd = [CLI, "find", "--task", "multilabel", "--labels", str(path / "labels.npy"),
                   "--pred-probs", str(path / "pred_probs.npy"), "--output", f"{tmp}/out{r}.zarr",
                   "--no-progress", "--json"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - start)
    script = (
        "import time, numpy as np\n"
        "t0 = time.perf_counter()\n"
        "from dask_labelissues import multilabel_classification as ml\n"
        "t1 = time.perf_counter()\n"
        f"L = np.load({str(path / 'labels.npy')!r}, mmap_mode='r'); P = np.load({str(path / 'pred_probs.npy')!r}, mmap_mode='r')\n"
        "a = time.perf_counter(); ml.find_label_issues(L, P); b = time.perf_counter(); ml.find_label_issues(L, P); c = time.perf_counter()\n"
        "print(t1 - t0, b - a, c - b)\n"
    )
    firsts = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
        firsts.append([float(x) for x in out.split()])
    med = [statistics.median(f[i] for f in firsts) for i in range(3)]
    return {"cli_wall": statistics.median(walls), "cli_walls": walls,
            "import": med[0], "first_call": med[1], "second_call": med[2]}


def cluster_scaling(path: Path, warm_path: Path, rounds: int, reference: np.ndarray) -> dict[str, Any]:
    """Ours on LocalClusters of 1 and 2 single-thread workers reading the
    Zarr arrays (:func:`harness.cluster_scaling`)."""
    import zarr

    from dask_labelissues import multilabel_classification as ml

    group, warm = zarr.open_group(str(path / "data.zarr"), mode="r"), zarr.open_group(str(warm_path / "data.zarr"), mode="r")
    out = harness.cluster_scaling(
        lambda client: np.asarray(ml.find_label_issues(group["labels"], group["pred_probs"], client=client)),
        lambda client: ml.find_label_issues(warm["labels"], warm["pred_probs"], client=client),
        rounds,
    )
    results = out.pop("results")
    out["masks_equal_cleanlab"] = all(np.array_equal(m, reference) for ms in results.values() for m in ms)
    return out


PEAK_OURS = """
import sys, zarr
from dask_labelissues import multilabel_classification as ml
g = zarr.open_group(sys.argv[1], mode="r")
print(int(ml.find_label_issues(g["labels"], g["pred_probs"]).sum()))
"""

PEAK_CLEANLAB = """
import sys, warnings, numpy as np
from cleanlab.multilabel_classification import filter as cl_filter
lists = [np.flatnonzero(row).tolist() for row in np.load(sys.argv[1] + "/labels.npy")]
probs = np.load(sys.argv[1] + "/pred_probs.npy")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    print(int(cl_filter.find_label_issues(lists, probs, n_jobs=1).sum()))
"""


def memory_runs(rows: int, classes: int) -> dict[str, Any]:
    """Peak RSS of ours and cleanlab's at ``rows`` and a quarter of them,
    and ours (at both sizes) and cleanlab's under a ``prlimit --data`` cap
    of half of pred_probs at ``rows``."""
    small_rows = rows // 4
    big, small = ensure_data(rows, classes, HERE / "data"), ensure_data(small_rows, classes, HERE / "data")
    cap = rows * classes * 4 // 2
    out: dict[str, Any] = {"rows": rows, "small_rows": small_rows, "cap_bytes": cap}
    for label, path in (("small", small), ("big", big)):
        out[f"ours_{label}"] = harness.peak(PEAK_OURS, str(path / "data.zarr"))
        out[f"cleanlab_{label}"] = harness.peak(PEAK_CLEANLAB, str(path))
        print(f"  [memory] {label}: ours {out[f'ours_{label}']['peak_mb']:.0f} MB, "
              f"cleanlab {out[f'cleanlab_{label}']['peak_mb']:.0f} MB", flush=True)
    if shutil.which("prlimit"):
        # The same cap at both sizes: memory that does not grow with N fits both.
        out["ours_capped_small"] = harness.peak(PEAK_OURS, str(small / "data.zarr"), limit=cap)
        out["ours_capped"] = harness.peak(PEAK_OURS, str(big / "data.zarr"), limit=cap)
        out["cleanlab_capped"] = harness.peak(PEAK_CLEANLAB, str(big), limit=cap)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-per-class", action="store_true", help="leave out the one-job-a-class plan")
    parser.add_argument("--cleanlab-low-memory", action="store_true", help="time cleanlab's low_memory=True once")
    parser.add_argument("--scaling-rounds", type=int, default=0, help="LocalCluster 1 against 2 workers")
    parser.add_argument("--memory", action="store_true", help="peak RSS and a prlimit --data run")
    args = parser.parse_args()

    import zarr
    from cleanlab.multilabel_classification import filter as cl_filter

    from dask_labelissues import multilabel_classification as ml

    path = ensure_data(args.rows, args.classes, HERE / "data")
    npy_l = np.load(path / "labels.npy", mmap_mode="r")
    npy_p = np.load(path / "pred_probs.npy", mmap_mode="r")
    group = zarr.open_group(str(path / "data.zarr"), mode="r")
    zl, zp = group["labels"], group["pred_probs"]
    matrix = np.asarray(npy_l)
    lists = [np.flatnonzero(row).tolist() for row in matrix]
    in_memory = np.asarray(npy_p)

    def cleanlab() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cl_filter.find_label_issues(lists, in_memory, n_jobs=1)

    cases: dict[str, Callable[[], Any]] = {
        "ours, .npy": lambda: ml.find_label_issues(npy_l, npy_p),
        "ours, Zarr": lambda: ml.find_label_issues(zl, zp),
        "one job a class, Zarr": lambda: per_class_jobs(zl, zp),
        "cleanlab, in memory": cleanlab,
    }
    if args.skip_per_class:
        del cases["one job a class, Zarr"]
    times: dict[str, list[float]] = {name: [] for name in cases}
    masks = {name: harness.timed(fn)[1] for name, fn in cases.items()}  # untimed first runs
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(harness.timed(fn)[0])
    reference = masks["cleanlab, in memory"]
    equal = {name: bool(np.array_equal(np.asarray(m), reference)) for name, m in masks.items()}
    low_memory = None
    if args.cleanlab_low_memory:
        def cleanlab_low_memory() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cl_filter.find_label_issues(lists, in_memory, low_memory=True)

        seconds, mask = harness.timed(cleanlab_low_memory)
        low_memory = {"seconds": seconds, "issues": int(mask.sum()), "cleanlab_issues": int(reference.sum()),
                      "overlap": int((mask & reference).sum())}

    counted_lock, counted_each = Counting(zp), Counting(zp)
    ml.find_label_issues(zl, counted_lock)
    nbytes = in_memory.nbytes
    reads = {"ours": counted_lock.served / nbytes}
    if not args.skip_per_class:
        per_class_jobs(zl, counted_each)
        reads["one job a class"] = counted_each.served / nbytes
    # The in-memory copies go before the cluster and memory runs.
    in_memory = matrix = lists = None  # type: ignore[assignment]
    scaling = None
    if args.scaling_rounds:
        warm_path = ensure_data(40_000, 8, HERE / "data")
        scaling = cluster_scaling(path, warm_path, args.scaling_rounds, reference)
    memory = memory_runs(args.rows, args.classes) if args.memory else None

    shell = shell_runs(path, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    report = {"rows": args.rows, "classes": args.classes, "repeats": args.repeats, "commit": commit,
              "times": times, "medians": med, "masks_equal_cleanlab": equal, "reads": reads, "shell": shell,
              "cleanlab_low_memory": low_memory, "scaling": scaling, "memory": memory, "cpus": os.cpu_count()}
    lines = [
        f"# Multi-label, {stamp} (commit {commit})", "",
        f"{args.rows:,} examples x {args.classes} classes, float32; filter_by=prune_by_noise_rate; "
        f"medians of {args.repeats}, interleaved.", "",
        "| run | median | x ours (Zarr) | mask equals cleanlab's |", "| --- | ---: | ---: | --- |",
    ]
    for name in cases:
        lines.append(f"| {name} | {med[name]:.2f} s | {med[name] / med['ours, Zarr']:.2f} | {equal[name]} |")
    if low_memory is not None:
        lines.append(
            f"| cleanlab, in memory, low_memory=True (once) | {low_memory['seconds']:.2f} s | "
            f"{low_memory['seconds'] / med['ours, Zarr']:.2f} | {low_memory['issues']:,} issues against "
            f"{low_memory['cleanlab_issues']:,}, {low_memory['overlap']:,} in both |"
        )
    lines += ["", "Reads of pred_probs (bytes served over its size): "
              + ", ".join(f"{name} {r:.0f}" for name, r in reads.items()) + "."]
    if scaling is not None:
        lines += [
            "", f"LocalCluster, Zarr, medians of {args.scaling_rounds}: 1 worker x 1 thread "
            f"{scaling['one_worker_s']:.2f} s ({scaling['worker_cores'][1]:.2f} cores busy), 2 workers x 1 thread "
            f"{scaling['two_workers_s']:.2f} s ({scaling['worker_cores'][2]:.2f} cores busy): "
            f"**{scaling['speedup']:.2f}x**; masks equal cleanlab's: {scaling['masks_equal_cleanlab']}.",
        ]
    if memory is not None:
        mem = memory
        lines += ["", "Peak RSS of a fresh process (GNU time), ours on the Zarr arrays with the threads engine, "
                  "cleanlab on the same data loaded in memory:", "",
                  "| rows | ours | cleanlab |", "| ---: | ---: | ---: |"]
        for label, n in (("small", mem["small_rows"]), ("big", mem["rows"])):
            lines.append(f"| {n:,} | {mem[f'ours_{label}']['peak_mb']:.0f} MB | {mem[f'cleanlab_{label}']['peak_mb']:.0f} MB |")
        if "ours_capped" in mem:
            def said(run: dict[str, Any]) -> str:
                return f"completes in {run['wall_s']:.1f} s" if run["ok"] else f"fails ({run['failure']})"

            def peak(run: dict[str, Any]) -> str:
                return "" if run["peak_mb"] is None else f", peak RSS {run['peak_mb']:.0f} MB"

            lines += ["", f"Under `prlimit --data={mem['cap_bytes']:,}` (half of pred_probs) at {mem['rows']:,} rows: "
                      f"ours {said(mem['ours_capped'])}{peak(mem['ours_capped'])}; cleanlab {said(mem['cleanlab_capped'])}."]
            if "ours_capped_small" in mem:
                lines.append(f"Under the same cap at {mem['small_rows']:,} rows: ours "
                             f"{said(mem['ours_capped_small'])}{peak(mem['ours_capped_small'])}.")
    lines += [
        "",
        "From the shell (medians):", "",
        f"- `dask-labelissues find --task multilabel` on the .npy files: {shell['cli_wall']:.2f} s wall "
        f"(ours in-process on .npy: {med['ours, .npy']:.2f} s; the command also scores every example, "
        "counts the issues per class and writes the store).",
        f"- a fresh process: import {shell['import']:.2f} s, first call {shell['first_call']:.2f} s, "
        f"second {shell['second_call']:.2f} s (first over second: {shell['first_call'] / shell['second_call']:.2f}x).",
    ]
    out = HERE / "results" / f"multilabel-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
