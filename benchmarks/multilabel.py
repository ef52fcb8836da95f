"""Multi-label: dask_labelissues.multilabel_classification beside cleanlab's,
and beside this package's former plan of one job a class.

    python benchmarks/multilabel.py [--rows 400000] [--classes 50] [--repeats 3]

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
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    from dask_labelissues.api import _filter_spec
    from dask_labelissues.engines import make_engine
    from dask_labelissues.kernels import ScoreSpec
    from dask_labelissues.kinds import OneVsRest
    from dask_labelissues.pipelines import run_filter

    k = int(probs.shape[1])
    fspec = _filter_spec("prune_by_noise_rate", 1.0, None, 1)
    masks = []
    for c in range(k):
        engine, _, _ = make_engine("auto", labels, probs, ScoreSpec(), single_read=False, kind=OneVsRest(k=c))
        try:
            result = run_filter(engine, engine.plan.spec, fspec, probs.dtype, False)
            masks.append(np.asarray(result.arrays["is_label_issue"]))
        finally:
            engine.close()
    return np.stack(masks, axis=1).any(axis=1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
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
    times: dict[str, list[float]] = {name: [] for name in cases}
    masks = {name: timed(fn)[1] for name, fn in cases.items()}  # untimed first runs
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn)[0])
    reference = masks["cleanlab, in memory"]
    equal = {name: bool(np.array_equal(np.asarray(m), reference)) for name, m in masks.items()}

    counted_lock, counted_each = Counting(zp), Counting(zp)
    ml.find_label_issues(zl, counted_lock)
    per_class_jobs(zl, counted_each)
    nbytes = in_memory.nbytes
    reads = {"ours": counted_lock.served / nbytes, "one job a class": counted_each.served / nbytes}

    shell = shell_runs(path, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    report = {"rows": args.rows, "classes": args.classes, "repeats": args.repeats, "commit": commit,
              "times": times, "medians": med, "masks_equal_cleanlab": equal, "reads": reads, "shell": shell,
              "cpus": os.cpu_count()}
    lines = [
        f"# Multi-label, {stamp} (commit {commit})", "",
        f"{args.rows:,} examples x {args.classes} classes, float32; filter_by=prune_by_noise_rate; "
        f"medians of {args.repeats}, interleaved.", "",
        "| run | median | x ours (Zarr) | mask equals cleanlab's |", "| --- | ---: | ---: | --- |",
    ]
    for name in cases:
        lines.append(f"| {name} | {med[name]:.2f} s | {med[name] / med['ours, Zarr']:.2f} | {equal[name]} |")
    lines += [
        "", "Reads of pred_probs (bytes served over its size): "
        f"ours {reads['ours']:.0f}, one job a class {reads['one job a class']:.0f}.", "",
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
