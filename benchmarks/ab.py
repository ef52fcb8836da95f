"""Before/after benchmark of two source trees of dask_labelissues, in one run.

    python benchmarks/ab.py --old /tmp/base --new /work/main [--repeats 5] [--quick]

Timings of one tree against another taken in separate runs differ by the
machine's drift between the runs as much as by the code.  This script
measures both trees in the same run, interleaving their samples repeat by
repeat (old, new, then new, old, ...), and reports each figure as the
median of each tree and the ratio new/old of the medians: below 1.0 the new
tree is faster (or smaller).  Beside it, a paired ratio: over each two
consecutive repeats, in which each tree ran once first and once second,
the new tree's total over the old's, and the median of those.  Its samples
were taken close together, so load from other work that comes and goes
moves it less; and the turns cancel the advantage of running first or
second (which can be a tenth of a warm call).

How many samples: the memory runs, jobs on (c) in fresh processes, and
the scaling rounds, fresh clusters, take ``--repeats`` per tree (default
5); every other measurement is short (0.2 to 4 s a sample) and noisier,
so it takes three times as many, rounded up to an even number so that each
tree runs first as often as second (``--short-repeats``).

Every measurement runs in a subprocess whose ``PYTHONPATH`` is exactly the
tree being measured (it comes before the editable install in ``sys.path``);
each subprocess checks that ``dask_labelissues.__file__`` lies inside that
tree and fails otherwise.  This process never imports the package.

Measurements
------------
warm
    The job in a process that has already run it once: one long-lived
    subprocess per tree calls ``find_label_issues(labels.npy, pred_probs.npy,
    **config)`` once untimed (numba kernels loaded, modules imported), then
    the two subprocesses take turns, one timed call each per repeat, one
    configuration after another, so that every timed call follows a call of
    the same configuration (interleaved with the other (a) configurations,
    (a) serial took half again as long here, in either tree).  Only
    the call is timed, as a user's ``find_label_issues(...).issues`` is; N-long
    results that stay lazy (the dask backend) are not computed in the timing,
    and the report says if the two trees differ in what they leave lazy.
    Configurations: on (a) the default backend, ``fork``, ``serial``,
    ``dask`` (the local threaded scheduler) and ``filter_by=
    "prune_by_noise_rate"``; on (b), K = 1,000, the default and
    ``filter_by="both"``; on (c) the default and ``serial``.
cluster
    The same on a real cluster: each subprocess starts a LocalCluster of 2
    worker processes of 1 thread (``dask_labelissues.cluster.local_cluster``,
    as ``benchmarks/run.py`` does; a plain ``distributed.LocalCluster`` in a
    tree without it) once, then ``find_label_issues(..., client=client)`` on
    (a) as Zarr, two untimed calls, then timed calls taking turns.  The
    two subprocesses and their clusters are started in one order for half
    the samples and in the other for the rest: with the same tree on both
    sides, the one started second ran its jobs 3% and 9% faster (20
    rounds each, ``benchmarks/cluster_pair.py``).
first
    What a new process waits for: the wall time of ``python -c`` importing
    the package and making one ``find_label_issues`` call on (a) .npy with
    the default backend, from the parent's fork to the child's exit.  The
    child also reports its import and call times.  One untimed run per tree
    comes first, so that both find their numba caches compiled.
cli
    ``python -m dask_labelissues find --labels ... --pred-probs ...
    --output OUT.zarr`` on (a) .npy, the whole command's wall time; the
    store is removed between runs (untimed).  The last stores of the two
    trees are compared through ``open_results``.
scaling
    How the job scales from one worker to two: ``find_label_issues(...,
    client=client)`` on (a) and (c) as Zarr (on (a) only with ``--quick``),
    on a fresh LocalCluster of 1 and of 2 single-thread workers for every
    sample (a new subprocess of the tree each time, so no idle cluster
    shares the cores), one untimed call then one timed; trees and cluster
    sizes take turns round by round.  Rows: each size's time, and the
    speedup (1 worker's time over 2 workers', per round), where above 1 in
    new/old the new tree scales better.  ``--repeats`` rounds.
memory
    Peak resident set of a fresh process running one job on (c) .npy (on (a)
    with ``--quick``), with the default backend and with ``backend="fork"``:
    ``ru_maxrss`` of the process itself and of its largest reaped child
    (``RUSAGE_CHILDREN``; a fork engine's kept workers are stopped first),
    read before the result is digested.  RSS counts
    the pages of the memory-mapped .npy file the process touched.

Results must be the same bits in both trees: every configuration's result is
digested (sha256 of ``issues``, ``label_quality_scores``, ``is_label_issue``
and ``confident_thresholds`` as numpy arrays, dtype and shape included), and
the two trees' digests are compared; every timed call's ``issues`` are also
checked against its own tree's first call.  The first-call rows are not
digested: they make the call of the warm (a) default row, which is.  Any
difference is reported and makes the script exit with status 1, after the
report is written.

The long-lived children run a full garbage collection, untimed, before
every call (warm, cluster and scaling).  A full collection of such a
process (dask, distributed and zarr loaded; with a LocalCluster, the
scheduler runs in it) visits some 90,000 objects and took 40 to 110 ms
here.  Without it, the objects the untimed call and this script's digests
allocated made one due, and it fell inside the timed call at a point fixed
by the allocation counts rather than by the job.  Traced in the scaling
procedure on (a) (6 fresh clusters per tree and size, 9e09962 against
b894215), it fell at the start of the timed call in one tree, on the
critical path, and with 2 workers during the scan in the other, where the
idle scheduler hid it.
The fresh processes (first call, CLI, memory) are left as a user's are.

Each tree's package is compiled to bytecode once before the run (its
``__pycache__`` directories) and every subprocess loads it, as an installed
package's processes do (``pip install`` compiles); otherwise,
with ``PYTHONDONTWRITEBYTECODE=1`` a source tree is compiled again in every
process, and the tree with more code pays for it in each import.
``--no-bytecode`` measures that instead.

The package source of each tree (its ``*.py`` files under
``dask_labelissues/``) is fingerprinted before and after the run; a tree
edited during the run is reported, since its figures then mix versions.
The CPU time other processes used during each measurement is reported too
(the machine's busy time from ``/proc/stat`` less this process's and its
reaped children's): other work widens the spread of both trees' samples
alike, which interleaving does not remove.

Datasets are those of ``benchmarks/run.py`` (``ensure_data``), which must
have been generated in ``--data-dir``: (a) 2,000,000 x 100, (b) 200,000 x
1,000, (c) 10,000,000 x 100, float32.  Before each dataset's measurements
its files are read once so that both trees find them in the page cache.

``--quick`` takes 3 repeats (10 short ones) and leaves out (c) (memory is then measured on
(a)).  The report goes to ``benchmarks/results/ab-<UTC time>.md``, the raw
samples to the ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
SCRIPT = str(Path(__file__).resolve())
SIDES = ("old", "new")

#: Rows, classes and seed of each dataset, as in benchmarks/run.py.
DATASETS = {
    "a": (2_000_000, 100, 101),
    "b": (200_000, 1000, 102),
    "c": (10_000_000, 100, 103),
}

#: (dataset, configuration name, keyword arguments) of the warm measurements.
WARM_CONFIGS = [
    ("a", "default", {}),
    ("a", "backend=fork", {"backend": "fork"}),
    ("a", "backend=serial", {"backend": "serial"}),
    ("a", "backend=dask", {"backend": "dask"}),
    ("a", "filter_by=prune_by_noise_rate", {"filter_by": "prune_by_noise_rate"}),
    ("b", "default", {}),
    ("b", "filter_by=both", {"filter_by": "both"}),
    ("c", "default", {}),
    ("c", "backend=serial", {"backend": "serial"}),
]
MEMORY_CONFIGS = [("default", {}), ("backend=fork", {"backend": "fork"})]
CLUSTER_WORKERS = 2
DIGESTED = ("issues", "label_quality_scores", "is_label_issue", "confident_thresholds")
N_LONG = ("label_quality_scores", "is_label_issue", "given_label", "predicted_label")
REPLY_TIMEOUT_S = 1800

FIRST_CALL = """
import json, sys, time
t0 = time.perf_counter()
import dask_labelissues
from dask_labelissues import find_label_issues
t1 = time.perf_counter()
find_label_issues(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"file": dask_labelissues.__file__, "import_s": t1 - t0, "call_s": t2 - t1}))
"""


# -- in the measured subprocesses ---------------------------------------------------

def import_package(tree: str) -> Any:
    """dask_labelissues, imported from ``tree`` or not at all."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import dask_labelissues

    where = Path(dask_labelissues.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"dask_labelissues was imported from {where}, not from the tree {tree} "
                         f"(PYTHONPATH={os.environ.get('PYTHONPATH')!r})")
    return dask_labelissues


def materialize(value: Any, client: Any = None) -> Any:
    import numpy as np

    if hasattr(value, "dask"):
        value = value.compute(scheduler=client) if client is not None else value.compute()
    return np.ascontiguousarray(np.asarray(value))


def array_digest(a: Any) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def result_digest(result: Any, client: Any = None) -> dict[str, str]:
    return {name: array_digest(materialize(getattr(result, name), client)) for name in DIGESTED}


def lazy_fields(result: Any) -> list[str]:
    return [name for name in N_LONG if hasattr(getattr(result, name, None), "dask")]


def serve(tree: str) -> None:
    """Answer one JSON request per line of stdin with one JSON line.

    The replies go to the process's original stdout; anything else written
    to stdout (by the package, dask or numba) goes to stderr instead.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    dli = import_package(tree)
    state: dict[str, Any] = {"client": None, "stack": contextlib.ExitStack()}
    with state["stack"]:
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                reply = handle(dli, state, request)
            except BaseException:
                reply = {"error": traceback.format_exc()}
            replies.write(json.dumps(reply) + "\n")


def handle(dli: Any, state: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "hello":
        return {"file": dli.__file__, "python": sys.version.split()[0]}
    if op == "cluster":
        from distributed import Client

        try:
            from dask_labelissues.cluster import local_cluster

            made = local_cluster(request["workers"], threads_per_worker=1, dashboard_address=None,
                                 memory_limit="4GB")
            how = "dask_labelissues.cluster.local_cluster"
        except ImportError:
            from distributed import LocalCluster

            made = LocalCluster(n_workers=request["workers"], threads_per_worker=1, processes=True,
                                dashboard_address=None, memory_limit="4GB")
            how = "distributed.LocalCluster"
        cluster = state["stack"].enter_context(made)
        client = state["client"] = state["stack"].enter_context(Client(cluster, set_as_default=False))
        return {"cluster": how, "workers": len(client.scheduler_info()["workers"])}
    if op == "run":
        kwargs = dict(request["kwargs"])
        client = state["client"] if request.get("client") else None
        if client is not None:
            kwargs["client"] = client
        # A full collection made due by the calls before and this script's
        # digests runs here, untimed, rather than inside the timed call
        # wherever the allocation counts put it (see the module's docstring).
        gc.collect()
        t = time.perf_counter()
        result = dli.find_label_issues(request["labels"], request["probs"], **kwargs)
        seconds = time.perf_counter() - t
        reply: dict[str, Any] = {"seconds": seconds, "lazy": lazy_fields(result)}
        if request.get("full_digest"):
            reply["digest"] = result_digest(result, client)
        else:
            reply["digest"] = {"issues": array_digest(materialize(result.issues))}
        return reply
    raise ValueError(f"unknown request {op!r}")


def measure_memory(tree: str, spec: str) -> None:
    """One job in this fresh process; its peak RSS and that of its largest child."""
    dli = import_package(tree)
    request = json.loads(spec)
    t = time.perf_counter()
    result = dli.find_label_issues(request["labels"], request["probs"], **request["kwargs"])
    seconds = time.perf_counter() - t
    # A tree whose fork engine keeps its workers after the job: stopped
    # (and reaped) here, so that RUSAGE_CHILDREN counts them.
    fork = sys.modules.get(f"{dli.__name__}.engines.fork")
    if fork is not None and hasattr(fork, "_stop_pool"):
        fork._stop_pool()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "self_peak_rss": own, "children_peak_rss": children,
                      "digest": result_digest(result)}))


def digest_store(tree: str, path: str) -> None:
    dli = import_package(tree)
    print(json.dumps({"digest": result_digest(dli.open_results(path))}))


CHILD_MODES = {"--serve": serve, "--measure-memory": measure_memory, "--digest-store": digest_store}


# -- in this process ---------------------------------------------------------------

class Failure(RuntimeError):
    pass


def tree_env(tree: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree
    return env


def compile_tree(tree: str) -> None:
    """Compile the tree's package to bytecode beside its source, as ``pip install`` does."""
    # Not under a PYTHONPYCACHEPREFIX: that moves every module's bytecode,
    # numpy's and dask's too, which then compile in every process.
    proc = subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(tree) / "dask_labelissues")],
                          env=tree_env(tree), capture_output=True, text=True)
    if proc.returncode:
        raise Failure(f"compileall of {tree} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def order(rep: int) -> tuple[str, str]:
    """old, new; then new, old; and so on."""
    return SIDES if rep % 2 == 0 else SIDES[::-1]


def run_child(argv: list[str], tree: str, cwd: str, timeout: float = REPLY_TIMEOUT_S) -> tuple[float, str]:
    """Wall time and stdout of one command run with ``tree`` on PYTHONPATH; fails loudly."""
    t = time.perf_counter()
    proc = subprocess.run(argv, env=tree_env(tree), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    elapsed = time.perf_counter() - t
    if proc.returncode:
        raise Failure(f"{' '.join(argv[:4])} ... with PYTHONPATH={tree} exited with {proc.returncode}:\n"
                      f"{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


class Child:
    """A long-lived measuring subprocess of one tree, asked over a pipe."""

    def __init__(self, side: str, tree: str, work: Path) -> None:
        self.side, self.tree = side, tree
        self.log_path = work / f"{side}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--serve", tree], env=tree_env(tree), cwd=work,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            hello = self.ask(op="hello")
            if not Path(hello["file"]).resolve().is_relative_to(Path(tree).resolve()):
                raise Failure(f"{side}: dask_labelissues from {hello['file']}, not from {tree}")
        except BaseException:
            self.close()
            raise

    def ask(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise Failure(f"{self.side} ({self.tree}) gave no reply to {request['op']}:\n{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise Failure(f"{self.side} ({self.tree}) failed on {request}:\n{reply['error']}")
        return reply

    def log_tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Pair:
    """One Child per tree, started in the order of ``sides``, closed together."""

    def __init__(self, trees: dict[str, str], work: Path, sides: Sequence[str] = SIDES) -> None:
        self.children: dict[str, Child] = {}
        try:
            for side in sides:
                self.children[side] = Child(side, trees[side], work)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> dict[str, Child]:
        return self.children

    def __exit__(self, *exc: Any) -> None:
        for child in self.children.values():
            child.close()


def dataset_paths(name: str, data_dir: Path) -> dict[str, str]:
    rows, classes, seed = DATASETS[name]
    d = data_dir / f"{name}-{rows}x{classes}-s{seed}"
    npy, store = d / "npy", d / "data.zarr"
    missing = [p for p in (npy / "labels.npy", npy / "pred_probs.npy", store / "zarr.json") if not p.exists()]
    if missing:
        raise Failure(f"dataset ({name}) is missing {missing[0]}: generate it with "
                      f"`python benchmarks/run.py --datasets {name}` (benchmarks/run.py ensure_data)")
    return {"labels_npy": str(npy / "labels.npy"), "probs_npy": str(npy / "pred_probs.npy"),
            "labels_zarr": f"{store}:labels", "probs_zarr": f"{store}:pred_probs",
            "dir": str(d)}


def warm_page_cache(paths: dict[str, str], kind: str) -> None:
    files: list[Path] = []
    for key in (f"labels_{kind}", f"probs_{kind}"):
        path = Path(paths[key].split(":")[0])
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in dict.fromkeys(files):
        with open(f, "rb", buffering=0) as handle:
            while handle.read(64 << 20):
                pass


def source_fingerprint(tree: str) -> str:
    h = hashlib.sha256()
    package = Path(tree) / "dask_labelissues"
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_info(tree: str) -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    status = git("status", "--porcelain", "--", "dask_labelissues/").splitlines()
    modified = [line[3:] for line in status if not line.startswith("??")]
    untracked = [line[3:] for line in status if line.startswith("??")]
    commit = git("rev-parse", "--short", "HEAD") or "?"
    label = commit + (" +uncommitted changes" if modified else "")
    if untracked:
        label += f" +{len(untracked)} untracked path{'s' * (len(untracked) > 1)}"
    return {"path": str(Path(tree).resolve()), "commit": commit, "label": label, "modified": modified,
            "untracked": untracked}


def summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": samples}
    for side in SIDES:
        xs = samples[side]
        out[side] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
    out["ratio"] = out["new"]["median"] / out["old"]["median"] if out["old"]["median"] else float("nan")
    old, new = samples["old"], samples["new"]
    blocks = [(new[i] + new[i + 1]) / (old[i] + old[i + 1]) for i in range(0, len(old) - 1, 2) if old[i] + old[i + 1]]
    out["paired_ratio"] = statistics.median(blocks) if blocks else None
    out["ratio_interval"] = ratio_interval(old, new)
    return out


def ratio_interval(old: Sequence[float], new: Sequence[float], resamples: int = 4000,
                   level: float = 0.95) -> tuple[float, float] | None:
    """A percentile bootstrap interval of new/old, the ratio of the medians:
    each tree's samples drawn again with replacement, ``resamples`` times
    (seeded, so a stored run renders the same interval again).  Where it
    holds 1, the run cannot tell the trees apart on that figure; an A/A run
    (one tree on both sides) shows how far identical code strays."""
    if len(old) < 2 or len(new) < 2:
        return None
    draw = random.Random(0)
    ratios = []
    for _ in range(resamples):
        o = statistics.median(draw.choices(old, k=len(old)))
        if o:
            ratios.append(statistics.median(draw.choices(new, k=len(new))) / o)
    if not ratios:
        return None
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (len(ratios) - 1))], ratios[int(round((1 - tail) * (len(ratios) - 1)))]


def compare(digests: dict[str, dict[str, str]]) -> dict[str, Any]:
    old, new = digests["old"], digests["new"]
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return {"digests": digests, "match": not differ, "differ": differ}


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_warm(names: list[str], trees: dict[str, str], samples: int, data_dir: Path, work: Path) -> list[dict]:
    rows = []
    for name in names:
        paths = dataset_paths(name, data_dir)
        configs = [(label, kwargs) for ds, label, kwargs in WARM_CONFIGS if ds == name]
        log(f"[warm] ({name}) .npy: {', '.join(label for label, _ in configs)}; {samples} samples each")
        warm_page_cache(paths, "npy")
        with Pair(trees, work) as children:
            request = {"op": "run", "labels": paths["labels_npy"], "probs": paths["probs_npy"]}
            first = {}
            times = {label: {side: [] for side in SIDES} for label, _ in configs}
            unstable = {label: set() for label, _ in configs}
            for label, kwargs in configs:
                for side in SIDES:
                    first[label, side] = children[side].ask(**request, kwargs=kwargs, full_digest=True)
                for rep in range(samples):
                    for side in order(rep):
                        reply = children[side].ask(**request, kwargs=kwargs)
                        times[label][side].append(reply["seconds"])
                        if reply["digest"]["issues"] != first[label, side]["digest"]["issues"]:
                            unstable[label].add(side)
                    log(f"  [{rep + 1}/{samples}] ({name}) {label:<32} old {times[label]['old'][-1]:7.3f} s   "
                        f"new {times[label]['new'][-1]:7.3f} s")
        for label, kwargs in configs:
            row = {"dataset": name, "config": label, "kwargs": kwargs, **summary(times[label]),
                   **compare({side: first[label, side]["digest"] for side in SIDES}),
                   "first_call_s": {side: first[label, side]["seconds"] for side in SIDES},
                   "lazy": {side: first[label, side]["lazy"] for side in SIDES},
                   "unstable": sorted(unstable[label])}
            rows.append(row)
    return rows


def bench_cluster(trees: dict[str, str], samples: int, data_dir: Path, work: Path) -> list[dict]:
    paths = dataset_paths("a", data_dir)
    log(f"[cluster] (a) Zarr on a LocalCluster of {CLUSTER_WORKERS} x 1 thread per tree; {samples} samples, "
        "half with each tree's cluster started first")
    warm_page_cache(paths, "zarr")
    request = {"op": "run", "labels": paths["labels_zarr"], "probs": paths["probs_zarr"], "kwargs": {},
               "client": True}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    first: dict[str, dict[str, Any]] = {}
    unstable = set()
    rep = 0
    for half, starts in enumerate((SIDES, SIDES[::-1])):
        with Pair(trees, work, starts) as children:
            how = {side: children[side].ask(op="cluster", workers=CLUSTER_WORKERS) for side in starts}
            for side in starts:
                reply = children[side].ask(**request, full_digest=True)
                first.setdefault(side, reply)
                if reply["digest"] != first[side]["digest"]:
                    unstable.add(side)
                children[side].ask(**request)
            for _ in range(samples // 2 if half == 0 else samples - samples // 2):
                for side in order(rep):
                    reply = children[side].ask(**request)
                    times[side].append(reply["seconds"])
                    if reply["digest"]["issues"] != first[side]["digest"]["issues"]:
                        unstable.add(side)
                rep += 1
                log(f"  [{rep}/{samples}] (a) zarr, client, {starts[0]} started first   "
                    f"old {times['old'][-1]:7.3f} s   new {times['new'][-1]:7.3f} s")
    return [{"dataset": "a", "config": f"LocalCluster {CLUSTER_WORKERS}x1, zarr", "cluster": how, **summary(times),
             **compare({side: first[side]["digest"] for side in SIDES}),
             "lazy": {side: first[side]["lazy"] for side in SIDES}, "unstable": sorted(unstable)}]


def bench_first(trees: dict[str, str], repeats: int, data_dir: Path, work: Path) -> list[dict]:
    paths = dataset_paths("a", data_dir)
    log(f"[first] python -c 'find_label_issues(...)' on (a) .npy in a fresh process; {repeats} runs")
    warm_page_cache(paths, "npy")
    argv = [sys.executable, "-c", FIRST_CALL, paths["labels_npy"], paths["probs_npy"]]

    def once(side: str) -> tuple[float, dict[str, Any]]:
        wall, out = run_child(argv, trees[side], str(work))
        reply = last_json(out)
        if not Path(reply["file"]).resolve().is_relative_to(Path(trees[side]).resolve()):
            raise Failure(f"{side}: dask_labelissues from {reply['file']}, not from {trees[side]}")
        return wall, reply

    for side in SIDES:
        once(side)
    wall: dict[str, list[float]] = {side: [] for side in SIDES}
    inner: dict[str, dict[str, list[float]]] = {k: {side: [] for side in SIDES} for k in ("import_s", "call_s")}
    for rep in range(repeats):
        for side in order(rep):
            seconds, reply = once(side)
            wall[side].append(seconds)
            for k in inner:
                inner[k][side].append(reply[k])
        log(f"  [{rep + 1}/{repeats}] old {wall['old'][-1]:7.3f} s   new {wall['new'][-1]:7.3f} s")
    return [{"dataset": "a", "config": "process wall time (start to exit)", **summary(wall)},
            {"dataset": "a", "config": "of which: import dask_labelissues", **summary(inner["import_s"])},
            {"dataset": "a", "config": "of which: first find_label_issues call", **summary(inner["call_s"])}]


def bench_cli(trees: dict[str, str], repeats: int, data_dir: Path, work: Path) -> list[dict]:
    paths = dataset_paths("a", data_dir)
    log(f"[cli] python -m dask_labelissues find on (a) .npy; {repeats} runs")
    warm_page_cache(paths, "npy")
    out = {side: work / f"cli-{side}" / "r.zarr" for side in SIDES}

    def once(side: str) -> float:
        shutil.rmtree(out[side].parent, ignore_errors=True)
        out[side].parent.mkdir()
        argv = [sys.executable, "-m", "dask_labelissues", "find", "--labels", paths["labels_npy"],
                "--pred-probs", paths["probs_npy"], "--output", str(out[side])]
        return run_child(argv, trees[side], str(work))[0]

    for side in SIDES:
        once(side)
    wall: dict[str, list[float]] = {side: [] for side in SIDES}
    for rep in range(repeats):
        for side in order(rep):
            wall[side].append(once(side))
        log(f"  [{rep + 1}/{repeats}] old {wall['old'][-1]:7.3f} s   new {wall['new'][-1]:7.3f} s")
    digests = {side: last_json(run_child([sys.executable, SCRIPT, "--digest-store", trees[side], str(out[side])],
                                         trees[side], str(work))[1])["digest"] for side in SIDES}
    for side in SIDES:
        shutil.rmtree(out[side].parent, ignore_errors=True)
    return [{"dataset": "a", "config": "find --labels --pred-probs --output (defaults)", **summary(wall),
             **compare(digests)}]


def bench_scaling(names: list[str], trees: dict[str, str], rounds: int, data_dir: Path, work: Path) -> list[dict]:
    rows = []
    for name in names:
        paths = dataset_paths(name, data_dir)
        log(f"[scaling] ({name}) Zarr on fresh LocalClusters of 1 and 2 x 1 thread; {rounds} rounds")
        warm_page_cache(paths, "zarr")
        request = {"op": "run", "labels": paths["labels_zarr"], "probs": paths["probs_zarr"], "kwargs": {},
                   "client": True}
        times = {n: {side: [] for side in SIDES} for n in (1, 2)}
        digests: dict[str, dict[str, str]] = {}
        unstable = set()
        for rep in range(rounds):
            for side in order(rep):
                for n in ((1, 2) if rep % 2 == 0 else (2, 1)):
                    child = Child(side, trees[side], work)
                    try:
                        child.ask(op="cluster", workers=n)
                        first = child.ask(**request, full_digest=True)
                        reply = child.ask(**request)
                    finally:
                        child.close()
                    times[n][side].append(reply["seconds"])
                    digests.setdefault(side, first["digest"])
                    if first["digest"] != digests[side] or reply["digest"]["issues"] != digests[side]["issues"]:
                        unstable.add(side)
            log(f"  [{rep + 1}/{rounds}] ({name}) 1 worker: old {times[1]['old'][-1]:7.3f} s new "
                f"{times[1]['new'][-1]:7.3f} s; 2 workers: old {times[2]['old'][-1]:7.3f} s new {times[2]['new'][-1]:7.3f} s")
        common = {"dataset": name, **compare(digests), "unstable": sorted(unstable)}
        for n in (1, 2):
            rows.append({**common, "config": f"LocalCluster {n}x1, zarr", "what": "seconds", **summary(times[n])})
        speedup = {side: [a / b for a, b in zip(times[1][side], times[2][side])] for side in SIDES}
        rows.append({**common, "config": "LocalCluster 1x1 over 2x1", "what": "speedup (higher is better)",
                     **summary(speedup)})
    return rows


def bench_memory(name: str, trees: dict[str, str], repeats: int, data_dir: Path, work: Path) -> list[dict]:
    paths = dataset_paths(name, data_dir)
    log(f"[memory] one job on ({name}) .npy per fresh process; {repeats} runs")
    warm_page_cache(paths, "npy")
    rows = []
    for label, kwargs in MEMORY_CONFIGS:
        spec = json.dumps({"labels": paths["labels_npy"], "probs": paths["probs_npy"], "kwargs": kwargs})
        argv = [sys.executable, SCRIPT, "--measure-memory", None, spec]
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for rep in range(repeats):
            for side in order(rep):
                argv[3] = trees[side]
                runs[side].append(last_json(run_child(argv, trees[side], str(work))[1]))
            log(f"  [{rep + 1}/{repeats}] {label:<14} peak RSS MB: old {mb(runs['old'][-1]['self_peak_rss'])} "
                f"(child {mb(runs['old'][-1]['children_peak_rss'])})   new {mb(runs['new'][-1]['self_peak_rss'])} "
                f"(child {mb(runs['new'][-1]['children_peak_rss'])})")
        digests = {side: runs[side][0]["digest"] for side in SIDES}
        unstable = sorted(side for side in SIDES if any(r["digest"] != digests[side] for r in runs[side]))
        seconds = {side: [r["seconds"] for r in runs[side]] for side in SIDES}
        for key, what in (("self_peak_rss", "peak RSS of the process, MB"),
                          ("children_peak_rss", "peak RSS of its largest child, MB")):
            if key == "children_peak_rss" and not any(r[key] for side in SIDES for r in runs[side]):
                continue
            samples = {side: [r[key] / 2**20 for r in runs[side]] for side in SIDES}
            rows.append({"dataset": name, "config": label, "what": what, **summary(samples), **compare(digests),
                         "unstable": unstable, "job_seconds": seconds})
    return rows


def cpu_clock() -> dict[str, float]:
    """The machine's busy CPU seconds, this process's and its reaped children's, and the time."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"machine": busy / os.sysconf("SC_CLK_TCK"), "wall": time.perf_counter(),
            "ours": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime}


def other_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    wall = after["wall"] - before["wall"]
    seconds = max(0.0, (after["machine"] - before["machine"]) - (after["ours"] - before["ours"]))
    return {"seconds": seconds, "wall_s": wall, "cores": seconds / wall if wall else 0.0}


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("NUMBA_", "OMP_", "OPENBLAS_", "MKL_", "DASK_", "MALLOC_")) or k == "PYTHONDONTWRITEBYTECODE"}
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "memory_gib": round(memory, 1), "executable": sys.executable, "environment": env}


# -- report ------------------------------------------------------------------------

SECTIONS = {
    "warm": ("Warm job in one process (.npy)", "s"),
    "cluster": ("Warm job on a LocalCluster", "s"),
    "first": ("First call in a fresh process", "s"),
    "cli": ("The CLI from the shell", "s"),
    "memory": ("Peak memory of a fresh process running one job", ""),
    "scaling": ("One worker against two on a LocalCluster", "x"),
}


def table(rows: list[dict[str, Any]], unit: str) -> list[str]:
    has_what = any("what" in r for r in rows)
    head = "| dataset | config |" + (" measure |" if has_what else "")
    lines = [head + " old median | new median | new/old | 95% interval | paired new/old | old min–max | new min–max | n | digests match |",
             "|---|---|" + ("---|" if has_what else "") + "---:|---:|---:|:---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        # A section in "x" may hold rows of seconds too (its "what" says so).
        u = "s" if r.get("what") == "seconds" else unit
        fmt = "{:.3f}" if u in ("s", "x") else "{:,.0f}"
        o, n = r["old"], r["new"]
        # Runs stored before the interval was reported have their samples.
        interval = r.get("ratio_interval") or ratio_interval(r["samples"]["old"], r["samples"]["new"])
        match = "" if "match" not in r else "yes" if r["match"] else f"**NO** ({', '.join(r['differ'])})"
        if r.get("unstable"):
            match += f"; varies between calls in: {', '.join(r['unstable'])}"
        cells = [f"({r['dataset']})", r["config"], *([r.get("what", "")] if has_what else []),
                 fmt.format(o["median"]) + (f" {u}" if u else ""), fmt.format(n["median"]) + (f" {u}" if u else ""),
                 f"{r['ratio']:.3f}", "–" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}",
                 "–" if r["paired_ratio"] is None else f"{r['paired_ratio']:.3f}",
                 f"{fmt.format(o['min'])}–{fmt.format(o['max'])}",
                 f"{fmt.format(n['min'])}–{fmt.format(n['max'])}", str(o["n"]), match]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# A/B benchmark, {report['started_utc']} UTC", "",
             f"Machine: {m['nproc']} cores ({m['cpu'] or 'cpu unknown'}), {m['memory_gib']} GiB, "
             f"Python {m['python']} ({m['executable']}), {m['platform']}"
             + (f"; environment: {', '.join(f'{k}={v}' for k, v in m['environment'].items())}" if m["environment"] else "")
             + ".", "",
             "| side | tree | commit | package source fingerprint (start → end) |", "|---|---|---|---|"]
    for side in SIDES:
        t = report["trees"][side]
        fp = t["fingerprint_start"] + ("" if t["fingerprint_end"] == t["fingerprint_start"]
                                       else f" → {t['fingerprint_end']} (**changed during the run**)")
        lines.append(f"| {side} | `{t['path']}` | {t['label']} | {fp} |")
    lines += ["", f"Samples per tree: {report['short_repeats']} (memory and scaling: {report['repeats']}), "
              f"interleaved old/new; new/old is the ratio of the medians, below 1 when the new tree is faster or "
              f"smaller, with a 95% bootstrap interval (each tree's samples drawn again); paired new/old is "
              f"the median over pairs of consecutive repeats (each tree first in one of them) of the new "
              f"tree's sum over the old's, less moved by other work on the machine; "
              f"{'quick run, without (c)' if report['quick'] else 'all datasets'}; took {report['elapsed_s'] / 60:.1f} min. "
              + ("Each tree's package was compiled to bytecode once before the run (as an install does) and "
                 "every process loaded it." if report.get("bytecode") else
                 "Every process compiled the package from source (--no-bytecode)."), ""]
    for key, (title, unit) in SECTIONS.items():
        rows = report["results"].get(key)
        if not rows:
            continue
        lines += [f"## {title}", "", *table(rows, unit), ""]
        other = report["other_cpu"].get(key)
        if other:
            lines += [f"Other processes on the machine used {other['seconds']:.1f} s of CPU during these "
                      f"{other['wall_s']:.0f} s ({other['cores']:.2f} cores on average).", ""]
        if key == "warm":
            lazy = [f"({r['dataset']}) {r['config']}: old {r['lazy']['old'] or 'none'}, new {r['lazy']['new'] or 'none'}"
                    for r in rows if r["lazy"]["old"] != r["lazy"]["new"]]
            if lazy:
                lines += ["The trees differ in which N-long results stay lazy (not computed in the timing): "
                          + "; ".join(lazy) + ".", ""]
        if key == "cluster":
            how = rows[0]["cluster"]
            lines += [f"Cluster: old {how['old']['cluster']}, new {how['new']['cluster']}.", ""]
        if key == "memory":
            lines += ["RSS includes the pages of the memory-mapped .npy files the process touched.", ""]
    for key, error in report["errors"].items():
        lines += [f"## {SECTIONS[key][0]}: failed", "", "```", error.strip()[-2000:], "```", ""]
    if report["mismatches"]:
        lines += ["## Results differ", "", *[f"* {x}" for x in report["mismatches"]], ""]
    else:
        lines += ["Results: bit-identical between the trees in every configuration measured.", ""]
    return "\n".join(lines)


def mismatches(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = []
    for key, rows in results.items():
        for r in rows:
            if "match" in r and not r["match"]:
                out.append(f"{key} ({r['dataset']}) {r['config']}: old and new differ in {', '.join(r['differ'])}")
            if r.get("unstable"):
                out.append(f"{key} ({r['dataset']}) {r['config']}: results vary between calls in {', '.join(r['unstable'])}")
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILD_MODES:
        CHILD_MODES[argv[0]](*argv[1:])
        return 0
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", help="the tree before (a directory holding dask_labelissues/)")
    p.add_argument("--new", help="the tree after")
    p.add_argument("--render", type=Path, metavar="RUN.json",
                   help="print the report of a stored run again, as this script now writes it, and measure nothing")
    p.add_argument("--repeats", type=int, help="samples per tree of the memory runs (default 5; 3 with --quick)")
    p.add_argument("--short-repeats", type=int, help="samples per tree of the other measurements "
                                                    "(default 3 x repeats, rounded up to an even number)")
    p.add_argument("--quick", action="store_true", help="3 repeats, no dataset (c); memory on (a)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--no-bytecode", action="store_true",
                   help="compile each tree's source in every process instead of loading bytecode compiled "
                        "once (an installed package has its bytecode; with PYTHONDONTWRITEBYTECODE=1 a source "
                        "tree otherwise recompiles in every process, which counts more code as slower)")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if not (args.old and args.new):
        p.error("--old and --new are required")
    repeats = args.repeats or (3 if args.quick else 5)
    short = args.short_repeats or 3 * repeats + (3 * repeats) % 2
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    trees = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    for side, tree in trees.items():
        if not (Path(tree) / "dask_labelissues" / "__init__.py").exists():
            p.error(f"--{side} {tree} holds no dask_labelissues package")

    started = time.gmtime()
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", started), "machine": machine(),
        "trees": {side: {**git_info(tree), "fingerprint_start": source_fingerprint(tree)} for side, tree in trees.items()},
        "repeats": repeats, "short_repeats": short, "quick": args.quick, "sections": sections, "results": {},
    }
    for side in SIDES:
        log(f"{side}: {trees[side]} at {report['trees'][side]['label']}")
    warm_sets = ["a", "b"] if args.quick else ["a", "b", "c"]
    work = Path(tempfile.mkdtemp(prefix="dli-ab-"))
    report["bytecode"] = not args.no_bytecode
    runs = {
        "warm": lambda: bench_warm(warm_sets, trees, short, args.data_dir, work),
        "cluster": lambda: bench_cluster(trees, short, args.data_dir, work),
        "first": lambda: bench_first(trees, short, args.data_dir, work),
        "cli": lambda: bench_cli(trees, short, args.data_dir, work),
        "memory": lambda: bench_memory("a" if args.quick else "c", trees, repeats, args.data_dir, work),
        "scaling": lambda: bench_scaling(["a"] if args.quick else ["a", "c"], trees, repeats, args.data_dir, work),
    }
    report["errors"] = {}
    report["other_cpu"] = {}
    try:
        if not args.no_bytecode:
            for side, tree in trees.items():
                compile_tree(tree)
        for key in sections:
            before = cpu_clock()
            try:
                report["results"][key] = runs[key]()
            except (Failure, subprocess.TimeoutExpired) as exc:
                report["errors"][key] = str(exc)
                print(f"\nFAILED ({key}): {exc}", file=sys.stderr, flush=True)
            report["other_cpu"][key] = other_cpu(before, cpu_clock())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for side, tree in trees.items():
        report["trees"][side]["fingerprint_end"] = source_fingerprint(tree)
    report["elapsed_s"] = time.perf_counter() - t0
    report["mismatches"] = mismatches(report["results"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ab-{time.strftime('%Y%m%d-%H%M%S', started)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print("\n" + text)
    print(f"written: {stem}.md and .json")
    for side in SIDES:
        t = report["trees"][side]
        if t["fingerprint_end"] != t["fingerprint_start"]:
            print(f"WARNING: the {side} tree's package source changed during the run", file=sys.stderr)
    if report["errors"]:
        print(f"\nFAILED: {', '.join(report['errors'])} (see the report)", file=sys.stderr)
        return 2
    if report["mismatches"]:
        print("\nRESULTS DIFFER:\n" + "\n".join(f"  {x}" for x in report["mismatches"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
