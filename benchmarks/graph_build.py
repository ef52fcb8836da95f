"""How the Dask engine's graphs are built: its hand-built layers against
Dask's public ways to build the same graph.

    python benchmarks/graph_build.py [--blocks 16,256,4096] [--repeats 7]

The Dask engine builds a stage as one graph layer of plain tasks
(``dask_labelissues.engines.dask.layer``) and a reduction as a
``split_every``-way tree of such layers (``tree_reduce``).  The same graph
can be built with Dask's public APIs.  This script builds one map of a
block task over ``n`` blocks followed by a 16-way tree reduction of their
states, three ways:

* ``layer``: the engine's own functions;
* ``delayed``: ``dask.delayed(fn)(...)`` per task (pure=False, as the
  engine's tasks read files), the tree of ``delayed(combine)(parts)``;
* ``dask.array``: ``da.map_blocks`` over a dask array of ``n`` chunks,
  then ``da.reduction(..., split_every=16, concatenate=False)``, the
  dask.array reduction the engine's tree mirrors.

and reports, as medians over ``--repeats`` rounds (the three interleaved),
the time to build the graph, and to build and compute it on Dask's
synchronous scheduler and on an in-process distributed Client (so the
scheduler's intake of the graph is counted, not a worker's run), the block
task and the merges being trivial: what is measured is the graph, not the
work.  Results go to benchmarks/results/graph-build-<UTC time>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from dask_labelissues.aggregations import Aggregation
from dask_labelissues.engines.dask import layer, tree_reduce

SPLIT_EVERY = 16
STATE = 8  # values in a block's state


def block_task(i: int) -> np.ndarray:
    return np.full(STATE, i, dtype=np.int64)


def combine(parts: list) -> np.ndarray:
    return np.sum(parts, axis=0)


SUM = Aggregation("sum", combine=combine, finalize=lambda state: state)


def build_layer(n: int) -> dask.delayed:
    blocks = layer(block_task, [(i,) for i in range(n)])
    return tree_reduce(blocks, SUM)


def build_delayed(n: int) -> dask.delayed:
    task = dask.delayed(block_task, pure=False)
    level = [task(i) for i in range(n)]
    merge = dask.delayed(combine, pure=True)
    while len(level) > 1:
        level = [merge(level[i : i + SPLIT_EVERY]) for i in range(0, len(level), SPLIT_EVERY)]
    return level[0]


def build_array(n: int) -> da.Array:
    index = da.arange(n, chunks=1)
    states = index.map_blocks(lambda x: block_task(int(x[0]))[None, :], chunks=(1, STATE), new_axis=1, dtype=np.int64)
    return da.reduction(
        states, chunk=lambda x, axis, keepdims: x, combine=lambda x, axis, keepdims: np.sum(x, axis=0, keepdims=True),
        aggregate=lambda x, axis, keepdims: np.sum(x, axis=0, keepdims=True), axis=0, split_every=SPLIT_EVERY,
        dtype=np.int64, concatenate=True, keepdims=True,
    )


WAYS = {"layer": build_layer, "delayed": build_delayed, "dask.array": build_array}


def expected(n: int) -> np.ndarray:
    return np.full(STATE, n * (n - 1) // 2, dtype=np.int64)


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="16,256,4096")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sizes = [int(x) for x in args.blocks.split(",")]

    from distributed import Client

    client = Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None)
    rows = []
    try:
        for n in sizes:
            samples: dict[str, dict[str, list[float]]] = {w: {"build": [], "sync": [], "client": []} for w in WAYS}
            for rep in range(args.repeats + 1):  # the first round is untimed
                for way, build in WAYS.items():
                    t_build, graph = timed(lambda: build(n))
                    t_sync, value = timed(lambda: dask.compute(build(n), scheduler="sync")[0])
                    t_client, value2 = timed(lambda: client.compute(build(n), optimize_graph=False).result())
                    for v in (value, value2):
                        np.testing.assert_array_equal(np.asarray(v).reshape(-1), expected(n))
                    if rep:
                        samples[way]["build"].append(t_build)
                        samples[way]["sync"].append(t_sync)
                        samples[way]["client"].append(t_client)
            base = {k: statistics.median(v) for k, v in samples["layer"].items()}
            for way in WAYS:
                med = {k: statistics.median(v) for k, v in samples[way].items()}
                rows.append((n, way, med, {k: med[k] / base[k] for k in med}))
                print(n, way, {k: f"{v * 1e3:.1f} ms" for k, v in med.items()}, flush=True)
    finally:
        client.close()

    lines = [
        "# Graph building: the engine's layers against Dask's public APIs",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, dask {dask.__version__}, "
        f"{args.repeats} rounds (medians), a map over n blocks and a {SPLIT_EVERY}-way tree reduction.",
        "Ratios are each way's time over the engine's (`layer`) in the same run.",
        "",
        "| blocks | way | build ms | ratio | build + compute, sync ms | ratio | build + compute, Client ms | ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, way, med, ratio in rows:
        lines.append(
            f"| {n:,} | {way} | {med['build'] * 1e3:.2f} | {ratio['build']:.2f}x | {med['sync'] * 1e3:.1f} | "
            f"{ratio['sync']:.2f}x | {med['client'] * 1e3:.1f} | {ratio['client']:.2f}x |"
        )
    out = Path(__file__).parent / "results" / f"graph-build-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
