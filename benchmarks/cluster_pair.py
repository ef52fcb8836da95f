"""Two trees' warm job on (a) Zarr, each on its own LocalCluster of 2 x 1
thread kept alive in its own process, run in turns as ``ab.py``'s cluster
section runs them, with each job's task stream: the job's wall time, the
span from its first task's start to its last task's end, the workers'
summed compute time ("busy"), and the CPU the process and its cluster
take in the half second after the job ("tail").

    python benchmarks/cluster_pair.py ROUNDS [OLD_TREE [NEW_TREE]]

Given the same tree twice it measures the setup itself: which child was
started first is the only difference between the two.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "a-2000000x100-s101" / "data.zarr"

def cpu() -> float:
    """CPU seconds of this process and all its descendants."""
    stats = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(p)] = (int(f[1]), int(f[11]) + int(f[12]))
    mine, grew = {os.getpid()}, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in mine and pid not in mine:
                mine.add(pid); grew = True
    return sum(stats[p][1] for p in mine if p in stats) / os.sysconf("SC_CLK_TCK")

def child(tree):
    sys.path.insert(0, tree)
    import dask_labelissues as dli
    from dask_labelissues.cluster import local_cluster
    from distributed import Client, get_task_stream
    lab, probs = str(DATA / "labels"), str(DATA / "pred_probs")
    with local_cluster(2, threads_per_worker=1, dashboard_address=None, memory_limit="4GB") as cluster, Client(cluster, set_as_default=False) as client:
        for _ in range(2): dli.find_label_issues(lab, probs, client=client)
        print("ready", flush=True)
        for line in sys.stdin:
            with get_task_stream(client=client) as ts:
                t = time.perf_counter(); dli.find_label_issues(lab, probs, client=client); wall = time.perf_counter() - t
            ss = [s for r in ts.data for s in r["startstops"]]
            span = max(s["stop"] for s in ss) - min(s["start"] for s in ss)
            busy = sum(s["stop"] - s["start"] for s in ss if s["action"] == "compute")
            c0 = cpu(); time.sleep(0.5); tail = cpu() - c0
            print(json.dumps({"wall": wall, "span": span, "busy": busy, "tail": tail}), flush=True)

def main():
    if sys.argv[1] == "child":
        return child(sys.argv[2])
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"old": sys.argv[2] if len(sys.argv) > 2 else here, "new": sys.argv[3] if len(sys.argv) > 3 else here}
    procs = {k: subprocess.Popen([sys.executable, sys.argv[0], "child", v], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for k, v in trees.items()}
    for p in procs.values():
        while p.stdout.readline().strip() != "ready": pass
    res = {k: [] for k in trees}
    for rep in range(int(sys.argv[1])):
        for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            procs[k].stdin.write("run\n"); procs[k].stdin.flush()
            res[k].append(json.loads(procs[k].stdout.readline()))
    for p in procs.values(): p.stdin.close(); p.wait()
    for m in ("wall", "span", "busy", "tail"):
        o = statistics.median(r[m] for r in res["old"]); n = statistics.median(r[m] for r in res["new"])
        print(f"{m:5s} old {o:.3f} new {n:.3f} ratio {n/o:.3f}")

if __name__ == '__main__':
    main()
