"""cleanlab's streaming ``LabelInspector`` as its users run it, in fresh
processes, in two source trees, interleaved in one run.

    python benchmarks/inspector.py --old /tmp/base --new /work/main [--repeats 5]

Each sample is a new Python process (its ``PYTHONPATH`` is the tree) that
imports the package and feeds the first N rows of dataset (a)'s .npy files
to a ``LabelInspector`` in batches of 10,000 rows (cleanlab's default
``batch_size``): every batch to ``update_confident_thresholds``, then every
batch to ``score_label_quality``, then ``get_label_issues()``.  Reported:
the process's wall time from fork to exit and, counted from the end of the
package's import, the time to the end of the first batch (what a user
waits for before anything moves) and to the end of the stream.

Configurations:

* 15,000 rows (1.5 million values), 200,000 (20 million) and all 2,000,000
  (200 million), with
  numba's cache holding the kernels (each tree's ``dask-labelissues
  compile`` is run first);
* all rows with numba's cache empty (a new ``NUMBA_CACHE_DIR`` for each
  sample), as on the first run after installing.  A background compile a
  sample leaves is stopped before the next sample starts.

Writes ``benchmarks/results/inspector-<time>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "a-2000000x100-s101" / "npy"
BATCH = 10_000

CHILD = r"""
import hashlib, json, sys, time
t0 = time.perf_counter()
import numpy as np
import dask_labelissues
from dask_labelissues import LabelInspector, fused
root = sys.argv[4]
assert dask_labelissues.__file__.startswith(root), (dask_labelissues.__file__, root)
t_import = time.perf_counter()
labels = np.load(sys.argv[1], mmap_mode="r")
probs = np.load(sys.argv[2], mmap_mode="r")
n, batch = int(sys.argv[3]), int(sys.argv[5])
labels, probs = labels[:n], probs[:n]
insp = LabelInspector(num_class=probs.shape[1], verbose=False)
first = None
for a in range(0, n, batch):
    insp.update_confident_thresholds(labels[a : a + batch], probs[a : a + batch])
    first = first or time.perf_counter()
for a in range(0, n, batch):
    insp.score_label_quality(labels[a : a + batch], probs[a : a + batch])
issues = insp.get_label_issues()
t_end = time.perf_counter()
h = hashlib.sha256()
for x in (insp.get_confident_thresholds(), insp.get_quality_scores(), issues):
    h.update(np.ascontiguousarray(x).tobytes())
print(json.dumps({"import": t_import - t0, "first_batch": first - t_import, "stream": t_end - t_import,
                  "numba_loaded": fused.numba_loaded(), "digest": h.hexdigest()}))
"""


def _stop_compiles(cache: Path) -> None:
    """Stop a background compile still running in ``cache``: one that holds
    its lock file (which names its PID; a lock nobody holds names a process
    that is gone)."""
    for lock in cache.glob("*.lock"):
        with contextlib.suppress(ValueError, OSError), open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.kill(int(f.read().split()[0]), signal.SIGKILL)
    time.sleep(0.2)


def sample(tree: Path, rows: int, cold: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("DASK_LABELISSUES_KERNEL", None)
    with tempfile.TemporaryDirectory(prefix="inspector-cache-") as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        argv = [sys.executable, "-c", CHILD, str(DATA / "labels.npy"), str(DATA / "pred_probs.npy"), str(rows),
                str(tree), str(BATCH)]
        start = time.perf_counter()
        # cwd: not a tree, whose package ``-c`` would import first.
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=cache)
        wall = time.perf_counter() - start
        if cold:
            _stop_compiles(Path(cache))
    if out.returncode != 0:
        raise SystemExit(f"{tree}: the sample failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["wall"] = wall
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    for tree in trees.values():
        subprocess.run([sys.executable, "-m", "dask_labelissues", "compile"], check=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(tree)), stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    configs = [("15,000 rows, cache full", 15_000, False), ("200,000 rows, cache full", 200_000, False),
               ("2,000,000 rows, cache full", 2_000_000, False),
               ("2,000,000 rows, cache empty", 2_000_000, True)]
    results: dict = {}
    began = time.perf_counter()
    for name, rows, cold in configs:
        samples: dict[str, list[dict]] = {"old": [], "new": []}
        for r in range(args.repeats):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                got = sample(trees[side], rows, cold)
                samples[side].append(got)
                print(f"  [{r + 1}/{args.repeats}] {name:30s} {side}  wall {got['wall']:.3f} s  first batch "
                      f"{got['first_batch']:.3f} s  stream {got['stream']:.3f} s  numba {got['numba_loaded']}",
                      flush=True)
        results[name] = samples
    took = time.perf_counter() - began

    def commit(tree: Path) -> str:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "dask_labelissues"],
                               capture_output=True, text=True).stdout.strip()
        return f"{head} with uncommitted changes to the package" if dirty else head

    stamp = datetime.now(timezone.utc)
    lines = [
        f"# LabelInspector in fresh processes, {stamp:%Y-%m-%d %H:%M:%S} UTC", "",
        f"old: `{trees['old']}` ({commit(trees['old'])}); new: `{trees['new']}` ({commit(trees['new'])}); "
        f"{args.repeats} samples a tree, interleaved; medians; took {took / 60:.1f} min. Dataset (a), 100 "
        f"classes, float32 .npy, batches of {BATCH:,} rows (cleanlab's default).", "",
        "| configuration | measure | old | new | new/old | numba loaded (old, new) | digests match |",
        "|---|---|---:|---:|---:|:---:|:---:|",
    ]
    for name, samples in results.items():
        match = len({s["digest"] for side in samples.values() for s in side}) == 1
        loaded = tuple(sorted({s["numba_loaded"] for s in samples[side]}) for side in ("old", "new"))
        for key, label in (("wall", "process, start to exit"), ("first_batch", "first batch"),
                           ("stream", "whole stream")):
            old = statistics.median(s[key] for s in samples["old"])
            new = statistics.median(s[key] for s in samples["new"])
            lines.append(f"| {name} | {label} | {old:.3f} s | {new:.3f} s | {new / old:.3f} | {loaded} | "
                         f"{'yes' if match else 'NO'} |")
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / f"inspector-{stamp:%Y%m%d-%H%M%S}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()},
                                                    "results": results}, indent=1))
    print(text)
    print(f"written: {out}.md and .json")


if __name__ == "__main__":
    main()
