"""Token classification: dask_labelissues.token_classification beside
cleanlab's.

    python benchmarks/tokens.py [--tokens 20000000] [--classes 20] [--sentences 1000000]
        [--repeats 1] [--cleanlab-low-memory] [--scaling-rounds 1] [--memory]
        [--data-dir benchmarks/data] [--out benchmarks/results]

The size of record is the defaults with ``--cleanlab-low-memory
--scaling-rounds 1 --memory``.

The dataset (``--tokens`` T in ``--sentences`` N, ``--classes`` K) is made
once into <data-dir>/tok-<T>x<K>-<N>s-s7/: sentence lengths at least 1,
drawn unevenly (a multinomial over gamma weights) to sum to exactly T, as
offsets (N + 1,) int64 from 0 to T; true classes drawn with class c's
prior proportional to 1/(c + 1) (a common class, as "O" in NER, and rarer
ones); pred_probs a softmax of standard normal logits with the true class's
raised by about 4 (the model mostly right), float32; labels int64, the true
class but for about 5% of tokens, moved to another class at random.  Each
500,000-token block is drawn from its own seed, so the data do not depend
on how they are written; they are written a block at a time as ``.npy``
files (labels.npy, pred_probs.npy, offsets.npy) and as a Zarr v3 group
data.zarr (labels, pred_probs, offsets; 500,000-token chunks), with the
counts of flipped tokens and of the model's right answers in meta.json.

What is timed, in this one process, every case once untimed and then
``--repeats`` rounds with the cases interleaved, reported as medians
(compare the ratios, not the seconds: the machine's speed drifts):

* ours: ``token_classification.find_label_issues(labels, pred_probs,
  sentence_offsets=offsets)`` with its defaults (filter_by
  prune_by_noise_rate, ranked by self_confidence, the threads engine here)
  on the ``.npy`` files (memory-mapped) and on the Zarr arrays;
* cleanlab: ``cleanlab.token_classification.filter.find_label_issues`` on
  the same data in memory, given per-sentence views of the arrays (made
  untimed), with its defaults (n_jobs: its physical cores).

Both return (sentence, token) pairs, most likely mislabeled first; the
sets of issues and their orders are compared (ours ranks ties by token
order, cleanlab's sort takes any), and the orders also up to ties (the
same self_confidence score at every position).

With ``--cleanlab-low-memory``, cleanlab's ``low_memory=True`` (its batched
estimate) is timed once, and its issues compared.  With ``--scaling-rounds
R``: ours on a LocalCluster of 1 worker x 1 thread against 2 workers x 1
thread, reading the Zarr arrays, ``R`` timed runs each in fresh clusters
(numba's kernels are loaded in the workers by an untimed run on a 20,000
token store first), with the workers' CPU seconds.  With ``--memory``: the
peak RSS of a fresh process running ours (threads, Zarr) and cleanlab (the
``.npy`` files loaded in memory and split), at T and at a quarter of the
tokens and sentences, and both under ``prlimit --data`` at half of
pred_probs' size.  Then, from the shell: ``dask-labelissues find --task
token`` on the ``.npy`` files (the whole command: start-up, the issues,
the token and sentence scores, the results store), and a fresh process's
import, first call and second call.  Results go to
<out>/token-<UTC time>.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
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
BLOCK = 500_000  # tokens a generation block and a Zarr chunk
FLIP = 0.05
BOOST = (4.0, 1.5)  # mean and sd of the true class's raise of its logit
WARM = (20_000, 1_000)  # tokens and sentences of the store that warms the workers


def ensure_data(tokens: int, classes: int, sentences: int, data_dir: Path) -> Path:
    """The dataset's directory, written once, a block of tokens at a time."""
    import zarr

    if not 1 <= sentences <= tokens:
        raise ValueError(f"need 1 <= sentences <= tokens, got {sentences} and {tokens}")
    path = data_dir / f"tok-{tokens}x{classes}-{sentences}s-s7"
    if (path / "done").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([7, 0])
    weights = rng.gamma(2.0, size=sentences)
    lengths = 1 + rng.multinomial(tokens - sentences, weights / weights.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    assert offsets[-1] == tokens
    prior = 1.0 / np.arange(1, classes + 1)
    prior /= prior.sum()

    store = str(path / "data.zarr")
    labels = np.lib.format.open_memmap(path / "labels.npy", "w+", np.int64, (tokens,))
    probs = np.lib.format.open_memmap(path / "pred_probs.npy", "w+", np.float32, (tokens, classes))
    np.save(path / "offsets.npy", offsets)
    zl = zarr.create_array(store, name="labels", shape=(tokens,), chunks=(BLOCK,), dtype=np.int64)
    zp = zarr.create_array(store, name="pred_probs", shape=(tokens, classes), chunks=(BLOCK, classes),
                           dtype=np.float32)
    zo = zarr.create_array(store, name="offsets", shape=(sentences + 1,), chunks=(min(sentences + 1, 1 << 20),),
                           dtype=np.int64)
    zo[:] = offsets
    flipped = right = 0
    for a in range(0, tokens, BLOCK):
        b = min(a + BLOCK, tokens)
        n = b - a
        rng = np.random.default_rng([7, 1, a])
        truth = rng.choice(classes, n, p=prior)
        logits = rng.standard_normal((n, classes))
        logits[np.arange(n), truth] += rng.normal(*BOOST, n)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p = p.astype(np.float32)
        flip = rng.random(n) < FLIP
        given = truth.astype(np.int64)
        given[flip] = (truth[flip] + rng.integers(1, classes, int(flip.sum()))) % classes
        labels[a:b], probs[a:b] = given, p
        zl[a:b], zp[a:b] = given, p
        flipped += int(flip.sum())
        right += int((p.argmax(axis=1) == truth).sum())
    labels.flush()
    probs.flush()
    (path / "meta.json").write_text(json.dumps({
        "tokens": tokens, "classes": classes, "sentences": sentences, "flipped": flipped,
        "argmax_is_true_class": right, "sentence_length_min": int(lengths.min()),
        "sentence_length_median": float(np.median(lengths)), "sentence_length_max": int(lengths.max()),
    }, indent=1))
    (path / "done").write_text("")
    return path


def compare(issues: list[tuple[int, int]], reference: list[tuple[int, int]], score: Callable[[Any], np.ndarray]
            ) -> dict[str, Any]:
    """Issues against cleanlab's: the sets, the orders, and the orders up
    to ties (the same score at every position)."""
    ours = [(int(i), int(j)) for i, j in issues]
    ref = [(int(i), int(j)) for i, j in reference]
    same_set = set(ours) == set(ref)
    same_order = ours == ref
    up_to_ties = same_order or (same_set and len(ours) == len(ref)
                                and bool(np.array_equal(score(ours), score(ref))))
    return {"issues": len(ours), "cleanlab_issues": len(ref), "overlap": len(set(ours) & set(ref)),
            "set_equal": same_set, "order_equal": same_order, "order_equal_up_to_ties": up_to_ties,
            "positions_differing": sum(a != b for a, b in zip(ours, ref)) + abs(len(ours) - len(ref))}


def shell_runs(path: Path, repeats: int) -> dict[str, Any]:
    """The CLI's wall time, and a fresh process's first and second calls."""
    walls = []
    view = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            cmd = [CLI, "find", "--task", "token", "--labels", str(path / "labels.npy"),
                   "--pred-probs", str(path / "pred_probs.npy"), "--sentence-offsets", str(path / "offsets.npy"),
                   "--output", f"{tmp}/out{r}.zarr", "--no-progress", "--json"]
            start = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            walls.append(time.perf_counter() - start)
            view = json.loads(out.strip().splitlines()[-1])
    script = (
        "import time, numpy as np\n"
        "t0 = time.perf_counter()\n"
        "from dask_labelissues import token_classification as tc\n"
        "t1 = time.perf_counter()\n"
        f"L = np.load({str(path / 'labels.npy')!r}, mmap_mode='r'); P = np.load({str(path / 'pred_probs.npy')!r}, mmap_mode='r')\n"
        f"O = np.load({str(path / 'offsets.npy')!r}, mmap_mode='r')\n"
        "a = time.perf_counter(); tc.find_label_issues(L, P, sentence_offsets=O); b = time.perf_counter()\n"
        "tc.find_label_issues(L, P, sentence_offsets=O); c = time.perf_counter()\n"
        "print(t1 - t0, b - a, c - b)\n"
    )
    firsts = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                             cwd=HERE.parent).stdout
        firsts.append([float(x) for x in out.split()])
    med = [statistics.median(f[i] for f in firsts) for i in range(3)]
    return {"cli_wall": statistics.median(walls), "cli_walls": walls,
            "cli_num_issues": None if view is None else view.get("num_issues"),
            "import": med[0], "first_call": med[1], "second_call": med[2]}


def cluster_scaling(path: Path, warm_path: Path, rounds: int, reference: list[tuple[int, int]],
                    cleanlab_set: set[tuple[int, int]]) -> dict[str, Any]:
    """Ours on LocalClusters of 1 and 2 single-thread workers reading the
    Zarr arrays (:func:`harness.cluster_scaling`)."""
    import zarr

    from dask_labelissues import token_classification as tc

    group, warm = zarr.open_group(str(path / "data.zarr"), mode="r"), zarr.open_group(str(warm_path / "data.zarr"), mode="r")
    out = harness.cluster_scaling(
        lambda client: tc.find_label_issues(group["labels"], group["pred_probs"], sentence_offsets=group["offsets"],
                                            client=client),
        lambda client: tc.find_label_issues(warm["labels"], warm["pred_probs"], sentence_offsets=warm["offsets"],
                                            client=client),
        rounds,
    )
    runs = [issues for per_n in out.pop("results").values() for issues in per_n]
    out["issues_equal_ours_threads"] = all(issues == reference for issues in runs)
    out["set_equal_cleanlab"] = all(set(issues) == cleanlab_set for issues in runs)
    return out


PEAK_OURS = """
import sys, zarr
from dask_labelissues import token_classification as tc
g = zarr.open_group(sys.argv[1], mode="r")
print(len(tc.find_label_issues(g["labels"], g["pred_probs"], sentence_offsets=g["offsets"])))
"""

PEAK_CLEANLAB = """
import sys, warnings, numpy as np
from cleanlab.token_classification import filter as cl_filter
offsets = np.load(sys.argv[1] + "/offsets.npy")
labels = np.split(np.load(sys.argv[1] + "/labels.npy"), offsets[1:-1])
probs = np.split(np.load(sys.argv[1] + "/pred_probs.npy"), offsets[1:-1])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    print(len(cl_filter.find_label_issues(labels, probs)))
"""

IMPORTS = """
import zarr, cleanlab.token_classification.filter
from dask_labelissues import token_classification
"""


def memory_runs(tokens: int, classes: int, sentences: int, data_dir: Path) -> dict[str, Any]:
    """Peak RSS of ours and cleanlab's at ``tokens`` and a quarter of them
    (and of the sentences), and both under a ``prlimit --data`` cap of half
    of pred_probs."""
    small_tokens, small_sentences = tokens // 4, max(1, sentences // 4)
    big = ensure_data(tokens, classes, sentences, data_dir)
    small = ensure_data(small_tokens, classes, small_sentences, data_dir)
    cap = tokens * classes * 4 // 2
    out: dict[str, Any] = {"tokens": tokens, "sentences": sentences, "small_tokens": small_tokens,
                           "small_sentences": small_sentences, "cap_bytes": cap}
    for label, path in (("small", small), ("big", big)):
        out[f"ours_{label}"] = harness.peak(PEAK_OURS, str(path / "data.zarr"))
        out[f"cleanlab_{label}"] = harness.peak(PEAK_CLEANLAB, str(path))
        print(f"  [memory] {label}: ours {_mb(out[f'ours_{label}'])}, cleanlab {_mb(out[f'cleanlab_{label}'])}",
              flush=True)
    if shutil.which("prlimit"):
        # The imports alone under the cap: if they fail, the capped runs
        # below say nothing of the two methods.
        out["imports_capped"] = harness.peak(IMPORTS, "", limit=cap)
        out["ours_capped"] = harness.peak(PEAK_OURS, str(big / "data.zarr"), limit=cap)
        out["cleanlab_capped"] = harness.peak(PEAK_CLEANLAB, str(big), limit=cap)
    return out


def _mb(run: dict[str, Any]) -> str:
    if run["peak_mb"] is None:
        return "n/a"
    return f"{run['peak_mb']:.0f} MB" + ("" if run["ok"] else " (failed)")


def _commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "dask_labelissues"], cwd=HERE.parent).returncode
    return commit + (" with uncommitted changes to dask_labelissues/" if dirty == 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--sentences", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cleanlab-low-memory", action="store_true", help="time cleanlab's low_memory=True once")
    parser.add_argument("--scaling-rounds", type=int, default=0, help="LocalCluster 1 against 2 workers")
    parser.add_argument("--memory", action="store_true", help="peak RSS and prlimit --data runs")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import zarr
    from cleanlab.token_classification import filter as cl_filter

    from dask_labelissues import token_classification as tc

    path = ensure_data(args.tokens, args.classes, args.sentences, args.data_dir)
    meta = json.loads((path / "meta.json").read_text())
    npy_l = np.load(path / "labels.npy", mmap_mode="r")
    npy_p = np.load(path / "pred_probs.npy", mmap_mode="r")
    npy_o = np.load(path / "offsets.npy", mmap_mode="r")
    group = zarr.open_group(str(path / "data.zarr"), mode="r")
    zl, zp, zo = group["labels"], group["pred_probs"], group["offsets"]
    # cleanlab's input, in memory, made untimed: per-sentence views.
    offsets = np.load(path / "offsets.npy")
    labels_mem, probs_mem = np.load(path / "labels.npy"), np.load(path / "pred_probs.npy")
    labels_list, probs_list = np.split(labels_mem, offsets[1:-1]), np.split(probs_mem, offsets[1:-1])

    def self_confidence(pairs: list[tuple[int, int]]) -> np.ndarray:
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        flat = offsets[arr[:, 0]] + arr[:, 1]
        return probs_mem[flat, labels_mem[flat]]

    def cleanlab() -> list[tuple[int, int]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cl_filter.find_label_issues(labels_list, probs_list)

    cases: dict[str, Callable[[], Any]] = {
        "ours, .npy": lambda: tc.find_label_issues(npy_l, npy_p, sentence_offsets=npy_o),
        "ours, Zarr": lambda: tc.find_label_issues(zl, zp, sentence_offsets=zo),
        "cleanlab, in memory": cleanlab,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    found = {}
    for name, fn in cases.items():  # untimed first runs
        found[name] = harness.timed(fn)[1]
        print(f"  [untimed] {name}: {len(found[name]):,} issues", flush=True)
    for r in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(harness.timed(fn)[0])
            print(f"  [{r + 1}/{args.repeats}] {name}: {times[name][-1]:.2f} s", flush=True)
    reference = [(int(i), int(j)) for i, j in found["cleanlab, in memory"]]
    equal = {name: compare(found[name], reference, self_confidence) for name in cases}
    low_memory = None
    if args.cleanlab_low_memory:
        def cleanlab_low_memory() -> list[tuple[int, int]]:
            # Its progress bars and counts go to /dev/null.
            with warnings.catch_warnings(), open(os.devnull, "w") as null, \
                    contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                warnings.simplefilter("ignore")
                return cl_filter.find_label_issues(labels_list, probs_list, low_memory=True)

        seconds, issues = harness.timed(cleanlab_low_memory)
        low_memory = {"seconds": seconds, **compare(issues, reference, self_confidence)}
        print(f"  [low_memory] {seconds:.2f} s, {len(issues):,} issues", flush=True)
    ours_zarr = [(int(i), int(j)) for i, j in found["ours, Zarr"]]
    cleanlab_set = set(reference)
    # The in-memory copies go before the cluster and memory runs.
    labels_list = probs_list = labels_mem = probs_mem = found = None  # type: ignore[assignment]
    scaling = None
    if args.scaling_rounds:
        warm_path = ensure_data(WARM[0], args.classes, WARM[1], args.data_dir)
        scaling = cluster_scaling(path, warm_path, args.scaling_rounds, ours_zarr, cleanlab_set)
    memory = memory_runs(args.tokens, args.classes, args.sentences, args.data_dir) if args.memory else None

    shell = shell_runs(path, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit = _commit()
    report = {"tokens": args.tokens, "classes": args.classes, "sentences": args.sentences, "repeats": args.repeats,
              "commit": commit, "dataset": meta, "times": times, "medians": med, "issues_vs_cleanlab": equal,
              "shell": shell, "cleanlab_low_memory": low_memory, "scaling": scaling, "memory": memory,
              "cpus": os.cpu_count()}
    lines = [
        f"# Token classification, {stamp} (commit {commit})", "",
        f"{args.tokens:,} tokens in {args.sentences:,} sentences (lengths {meta['sentence_length_min']} to "
        f"{meta['sentence_length_max']}, median {meta['sentence_length_median']:g}), {args.classes} classes "
        f"(prior of class c proportional to 1/(c+1)), float32 pred_probs whose argmax is the true class for "
        f"{meta['argmax_is_true_class'] / args.tokens:.1%} of tokens, {meta['flipped'] / args.tokens:.2%} of labels "
        f"flipped to another class; {os.cpu_count()} CPUs.",
        "",
        f"`find_label_issues` with defaults (filter_by=prune_by_noise_rate, ranked by self_confidence; "
        f"ours: the threads engine; cleanlab: its default n_jobs); medians of {args.repeats}, interleaved, after "
        "one untimed run of each.", "",
        "| run | median | x ours (Zarr) | issues | same set as cleanlab's | same order | same order up to ties |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name in cases:
        e = equal[name]
        lines.append(f"| {name} | {med[name]:.2f} s | {med[name] / med['ours, Zarr']:.2f} | {e['issues']:,} | "
                     f"{e['set_equal']} | {e['order_equal']} | {e['order_equal_up_to_ties']} |")
    lines += ["", "Same order up to ties: the same issues, with the same self_confidence score at every "
              "position (ours ranks tied issues by token order; cleanlab's sort leaves them in any order). "
              + "; ".join(f"{name}: {equal[name]['positions_differing']:,} positions differ from cleanlab's"
                          for name in cases if name.startswith("ours")) + "."]
    if low_memory is not None:
        lines += [
            "", f"cleanlab with low_memory=True (its batched estimate; once): {low_memory['seconds']:.2f} s "
            f"({low_memory['seconds'] / med['ours, Zarr']:.2f}x ours on Zarr), {low_memory['issues']:,} issues "
            f"against the exact method's {low_memory['cleanlab_issues']:,}, {low_memory['overlap']:,} in both "
            f"(same set: {low_memory['set_equal']}).",
        ]
    if scaling is not None:
        lines += [
            "", f"LocalCluster, Zarr, medians of {args.scaling_rounds}: 1 worker x 1 thread "
            f"{scaling['one_worker_s']:.2f} s ({scaling['worker_cores'][1]:.2f} cores busy), 2 workers x 1 thread "
            f"{scaling['two_workers_s']:.2f} s ({scaling['worker_cores'][2]:.2f} cores busy): "
            f"**{scaling['speedup']:.2f}x**; issues equal ours with threads: {scaling['issues_equal_ours_threads']}, "
            f"same set as cleanlab's: {scaling['set_equal_cleanlab']}.",
        ]
    if memory is not None:
        mem = memory
        lines += ["", "Peak RSS of a fresh process (GNU time: the largest single process, so cleanlab's "
                  "multiprocessing workers are not added up), ours on the Zarr arrays with the threads engine, "
                  "cleanlab on the .npy files loaded in memory and split by sentence:", "",
                  "| tokens | sentences | ours | cleanlab |", "| ---: | ---: | ---: | ---: |"]
        for label, t, s in (("small", mem["small_tokens"], mem["small_sentences"]),
                            ("big", mem["tokens"], mem["sentences"])):
            lines.append(f"| {t:,} | {s:,} | {_mb(mem[f'ours_{label}'])} | {_mb(mem[f'cleanlab_{label}'])} |")
        if "ours_capped" in mem:
            def said(run: dict[str, Any]) -> str:
                if run["ok"]:
                    return f"completes in {run['wall_s']:.1f} s ({run['output']} issues)"
                return f"fails (exit status {run['returncode']}: {run['failure']})"

            lines += ["", f"Under `prlimit --data={mem['cap_bytes']:,}` (half of pred_probs) at {mem['tokens']:,} "
                      f"tokens: ours {said(mem['ours_capped'])}; cleanlab {said(mem['cleanlab_capped'])}."]
            if not mem["imports_capped"]["ok"]:
                lines[-1] += (f" The imports alone fail under this cap ({mem['imports_capped']['failure']}): "
                              "these two runs say nothing of the methods at this size.")
    lines += [
        "",
        f"From the shell (medians of {args.repeats}):", "",
        f"- `dask-labelissues find --task token` on the .npy files: {shell['cli_wall']:.2f} s wall, "
        f"{'?' if shell['cli_num_issues'] is None else format(shell['cli_num_issues'], ',')} issues (ours in-process on .npy: {med['ours, .npy']:.2f} s; the command also "
        "scores every token and sentence and writes the store).",
        f"- a fresh process: import {shell['import']:.2f} s, first call {shell['first_call']:.2f} s, "
        f"second {shell['second_call']:.2f} s (first over second: {shell['first_call'] / shell['second_call']:.2f}x).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"token-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
