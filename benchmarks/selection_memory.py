"""Memory and time of a multi-label job in two source trees, in one run.

    python benchmarks/selection_memory.py --old /tmp/old --new /work/main \
        [--rows 500000 2000000] [--classes 100] [--repeats 3]

The multi-label data of ``benchmarks/multilabel.py`` (written there by its
``ensure_data``, found or written here) flags almost every row in some
class, so its noise-rate selections hold millions of candidates: the part
of the job whose memory grows with N.  For each size, fresh processes of
the two trees take turns (old, new, then new, old, ...); each runs
``multilabel_classification.find_label_issues`` on the Zarr arrays twice
with the default engine and reports:

- the peak anonymous resident memory (``RssAnon``, sampled every 5 ms:
  the heap, numba's and numpy's buffers; not the page cache of the store);
- the first call's and the second (warm) call's wall time;
- a sha256 of the mask, which must be the same in both trees.

Each subprocess's ``PYTHONPATH`` is exactly its tree, and it checks that it
imported the package from there.  Medians per tree and the ratios new/old
go to ``benchmarks/results/selection-memory-<UTC time>.md`` (samples in the
``.json`` beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import hashlib, json, sys, threading, time
import dask_labelissues
assert dask_labelissues.__file__.startswith(sys.argv[2]), dask_labelissues.__file__
import zarr
from dask_labelissues import multilabel_classification as ml

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
g = zarr.open_group(sys.argv[1], mode="r")
t0 = time.perf_counter(); ml.find_label_issues(g["labels"], g["pred_probs"]); t1 = time.perf_counter()
mask = ml.find_label_issues(g["labels"], g["pred_probs"]); t2 = time.perf_counter()
done.append(True)
print(json.dumps({"peak_anon": peak[0], "first": t1 - t0, "warm": t2 - t1, "flagged": int(mask.sum()),
                  "sha256": hashlib.sha256(mask.tobytes()).hexdigest()}))
"""


def run(tree: Path, store: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    # -P: the working directory (this repository, maybe) does not come first in sys.path.
    done = subprocess.run([sys.executable, "-P", "-c", CHILD, str(store), str(tree)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[500_000, 2_000_000])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    import multilabel

    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    samples: dict[int, dict[str, list[dict]]] = {}
    for rows in args.rows:
        store = multilabel.ensure_data(rows, args.classes, args.data_dir) / "data.zarr"
        samples[rows] = {"old": [], "new": []}
        for r in range(args.repeats):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                got = run(trees[name], store)
                samples[rows][name].append(got)
                print(f"{rows:,} x {args.classes} {name}: peak {got['peak_anon'] / 2**20:.0f} MB, "
                      f"first {got['first']:.2f} s, warm {got['warm']:.2f} s", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    lines = [f"# Multi-label job: {args.old} (old) against {args.new} (new)", "",
             f"{args.repeats} fresh processes a tree and size, taking turns; medians; ratio new/old "
             f"(below 1: the new tree is smaller or faster). `{os.cpu_count()}` CPUs.", "",
             "| rows x classes | flagged | same mask | peak RssAnon old | new | ratio | warm old | new | ratio "
             "| first call old | new | ratio |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    differ = False
    for rows, by_tree in samples.items():
        med = {name: {f: statistics.median(s[f] for s in runs) for f in ("peak_anon", "first", "warm")}
               for name, runs in by_tree.items()}
        same = len({s["sha256"] for runs in by_tree.values() for s in runs}) == 1
        differ |= not same
        o, n = med["old"], med["new"]
        lines.append(
            f"| {rows:,} x {args.classes} | {by_tree['new'][0]['flagged']:,} | {'yes' if same else '**no**'} "
            f"| {o['peak_anon'] / 2**20:.0f} MB | {n['peak_anon'] / 2**20:.0f} MB | {n['peak_anon'] / o['peak_anon']:.3f} "
            f"| {o['warm']:.2f} s | {n['warm']:.2f} s | {n['warm'] / o['warm']:.3f} "
            f"| {o['first']:.2f} s | {n['first']:.2f} s | {n['first'] / o['first']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"selection-memory-{stamp}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"selection-memory-{stamp}.json").write_text(json.dumps(
        {"old": str(args.old), "new": str(args.new), "classes": args.classes,
         "samples": {str(k): v for k, v in samples.items()}}, indent=1))
    print("\n".join(lines))
    if differ:
        sys.exit("the two trees' masks differ")


if __name__ == "__main__":
    main()
