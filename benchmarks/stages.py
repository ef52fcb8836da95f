"""Where a warm one-machine job spends its time, stage by stage.

    python benchmarks/stages.py [--dataset c] [--backend threads] [--runs 5]

Runs ``find_label_issues`` on a benchmark dataset's ``.npy`` files
``--runs`` times in this process and prints, for the last run, each
stage's block tasks: how many, when the first started and the last ended
(seconds from the start of the job) and their summed run time.  The gaps
between stages are the client's own work (merging states, the selection's
finish).  The threads and serial engines run their tasks in this process,
so only they are timed here; a stage's span on 2 threads is about half its
summed time when both are busy.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import ensure_data  # noqa: E402

from dask_labelissues import find_label_issues  # noqa: E402
from dask_labelissues.engines import local  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="c", help="a, b or c")
    parser.add_argument("--backend", default="threads", choices=["threads", "serial"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-dir", default=str(HERE / "data"))
    args = parser.parse_args(argv)
    paths = ensure_data(args.dataset, Path(args.data_dir))
    events: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    call = local.LocalEngine.call

    def timed_call(self: Any, i: int, task: Any, task_args: tuple, out: int | None) -> Any:
        t0 = time.perf_counter()
        try:
            return call(self, i, task, task_args, out)
        finally:
            with lock:
                events.append((task.__name__, t0, time.perf_counter()))

    local.LocalEngine.call = timed_call
    try:
        for _ in range(args.runs):
            events.clear()
            start = time.perf_counter()
            find_label_issues(paths["labels_npy"], paths["probs_npy"], backend=args.backend)
            total = time.perf_counter() - start
    finally:
        local.LocalEngine.call = call
    print(f"({args.dataset}) {args.backend}: job {total:.4f} s (the last of {args.runs} runs)")
    stages: dict[str, list[float]] = {}
    for name, a, b in events:
        span = stages.setdefault(name, [a, b, 0.0, 0])
        span[0], span[1] = min(span[0], a), max(span[1], b)
        span[2] += b - a
        span[3] += 1
    for name, (a, b, busy, n) in stages.items():
        print(f"  {name:<24} {n:4d} tasks  {a - start:7.4f} -> {b - start:7.4f} s  summed {busy:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
