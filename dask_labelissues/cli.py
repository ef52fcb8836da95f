"""The ``dask-labelissues`` command: ``demo``, ``find``, ``segment``,
``summary`` and ``compile``.

Every failure a user can cause (bad input, missing file, unreadable store,
unreachable scheduler, existing output) ends with one ``error:`` line on
stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np

from . import __version__
from .engines.plan import BACKEND_CHOICES
from .kernels import ESTIMATION_METHODS, FILTERS, METHODS

EXIT_ERROR = 2


class CommandError(Exception):
    """A failure to report as one ``error:`` line."""


# -- shared ----------------------------------------------------------------------

def _progress_default(args: argparse.Namespace) -> bool:
    return args.progress if args.progress is not None else sys.stderr.isatty()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show progress bars on stderr (default: on when stderr is a terminal)",
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "where it runs",
        "default: threads in this process; with one of the first three options, a Dask cluster",
    )
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on the Dask scheduler at ADDRESS (default: $DASK_SCHEDULER_ADDRESS if set)")
    _add_local_clusters(g)
    g.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="give up connecting to --scheduler after this long (default %(default)g)")
    g.add_argument("--no-workers-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="fail if the cluster has no workers for this long (default %(default)g)")
    g.add_argument("--threads-per-worker", type=_at_least(1), default=1, metavar="M",
                   help="threads of each --workers process (default %(default)s)")
    g.add_argument("--memory-limit", default="auto", metavar="X",
                   help="memory of each --workers process, e.g. 2GB (default %(default)s)")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="engine; auto: dask on a cluster above, else threads (default %(default)s)")
    g.add_argument("--n-jobs", type=_at_least(1), metavar="N",
                   help="threads (--backend threads) or processes (fork) to use (default: one per core)")
    g.add_argument("--tls-ca-file", metavar="PEM", help="CA certificate of a TLS scheduler (default: none)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for a TLS scheduler (default: none)")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for a TLS scheduler (default: none)")


def _add_inputs_and_output(p: argparse.ArgumentParser, labels: str, probs_shape: str) -> None:
    """``--labels``, ``--pred-probs``, ``--output`` and ``--overwrite``, for ``find`` and ``segment``."""
    p.add_argument("--labels", required=True, metavar="SRC",
                   help=f"{labels}: file.npy, store.zarr[:array], file.h5:/dataset, or a URL of one")
    p.add_argument("--pred-probs", required=True, metavar="SRC",
                   help=f"the predicted probabilities, {probs_shape}, in the same forms as --labels")
    p.add_argument("--output", required=True, metavar="OUT.zarr",
                   help="the results store to write (Zarr v3; it appears only when complete)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing results store at --output (never anything else)")


def _add_local_clusters(p: Any) -> None:
    """``--workers`` and ``--dashboard``, the same for ``demo`` and ``find``."""
    p.add_argument("--workers", type=_at_least(1), metavar="N",
                   help="run on a LocalCluster of N worker processes started here, and print its dashboard link")
    p.add_argument("--dashboard", action="store_true",
                   help="run on a LocalCluster in this process (threads), and print its dashboard link")


@contextlib.contextmanager
def where_it_runs(args: argparse.Namespace, log: Any = None) -> Iterator[tuple[str, Any]]:
    """``(backend, client)`` for the job: a Client of the named scheduler or
    of an embedded LocalCluster where one is asked for, else no Client and
    the engine ``--backend`` names (threads for ``auto``).

    A cluster's address and its dashboard's (or why it has none) are
    printed to ``log`` (default: ``sys.stderr`` at the time of the call).
    """
    log = sys.stderr if log is None else log
    address = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    wants_cluster = bool(args.scheduler or args.workers or args.dashboard)
    if args.backend not in ("auto", "dask"):
        if wants_cluster:
            given = "--scheduler" if args.scheduler else "--workers" if args.workers else "--dashboard"
            raise CommandError(f"{given} runs the job on Dask; it does not go with --backend {args.backend}")
        yield args.backend, None
        return
    if not address and not wants_cluster:
        # No cluster asked for: the job runs here, on threads (or on Dask's
        # local threaded scheduler with --backend dask).
        yield ("threads" if args.backend == "auto" else "dask"), None
        return
    import dask

    with dask.config.set({"labelissues.no-workers-timeout": args.no_workers_timeout}), \
            _cluster_client(args, address, log) as client:
        yield "dask", client


@contextlib.contextmanager
def _cluster_client(args: argparse.Namespace, address: str | None, log: Any) -> Iterator[Any]:
    """A Client of the scheduler at ``address``, or of the embedded
    LocalCluster ``--workers`` or ``--dashboard`` asks for."""
    from distributed import Client

    from .cluster import describe_dashboard, local_cluster, quiet_workers

    if address:
        security = _security(args)
        try:
            client = Client(address, timeout=f"{args.connect_timeout}s", security=security)
        except (OSError, TimeoutError) as exc:
            raise CommandError(
                f"could not connect to the Dask scheduler at {address} within "
                f"{args.connect_timeout:g} s ({type(exc).__name__})"
            ) from None
        try:
            print(f"scheduler: {address}  {describe_dashboard(client, remote=True)}", file=log, flush=True)
            yield client
        finally:
            client.close()
        return
    if args.workers:
        cluster_cm = local_cluster(
            args.workers, threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit,
        )
        what = f"LocalCluster: {args.workers} worker process{'es' if args.workers != 1 else ''}"
    else:
        cluster_cm = local_cluster(
            1, processes=False, threads_per_worker=args.n_jobs,
        )
        what = "LocalCluster in this process"
    with cluster_cm as cluster, Client(cluster) as client:
        if not args.debug:
            quiet_workers(client)
        print(f"{what}  {describe_dashboard(client, remote=False)}", file=log, flush=True)
        yield client


def _security(args: argparse.Namespace) -> Any:
    given = [args.tls_ca_file, args.tls_cert, args.tls_key]
    if not any(given):
        return None  # distributed's own configuration applies
    if not all(given):
        raise CommandError("TLS needs all three of --tls-ca-file, --tls-cert and --tls-key")
    for path in given:
        if not os.path.exists(path):
            raise CommandError(f"no such file: {path}")
    from distributed.security import Security

    return Security(
        tls_ca_file=args.tls_ca_file, tls_client_cert=args.tls_cert,
        tls_client_key=args.tls_key, require_encryption=True,
    )


def summary_dict(result: Any, top: int) -> dict[str, Any]:
    from .demo import worst_rows

    out = result.summary()
    out["worst"] = worst_rows(result, top)
    health = health_view(result, HEALTH_TOP)
    if health is not None:
        out["health"] = health
    return out


#: Classes and pairs the dataset-health part of a summary shows.
HEALTH_TOP = 5


def health_view(result: Any, top: int) -> dict[str, Any] | None:
    """The overall label health score, the ``top`` classes of lowest label
    quality and the ``top`` most confused (given, true) pairs, where the
    result holds a confident joint; else None."""
    if result.confident_joint is None:
        return None
    from . import health

    joint = health.estimate_joint(result.confident_joint)
    score, issues = health.health_score(result.n_rows, num_label_issues=result.num_label_issues, joint=joint)
    classes = health.class_quality(joint, result.n_rows)
    pairs = health.overlapping_classes(joint, result.n_rows, asymmetric=True)
    return {
        "overall_label_health_score": score,
        "estimated_label_issues": issues,
        "worst_classes": [
            {"class": int(c), "label_quality": float(q), "label_issues": int(n)}
            for c, q, n in zip(classes["Class Index"][:top], classes["Label Quality Score"][:top],
                               classes["Label Issues"][:top])
        ],
        "confused_pairs": [
            {"given": int(a), "true": int(b), "rows": int(n), "joint_probability": float(p)}
            for a, b, n, p in zip(pairs["Class Index A"][:top], pairs["Class Index B"][:top],
                                  pairs["Num Overlapping Examples"][:top], pairs["Joint Probability"][:top])
            if n > 0
        ],
    }


def format_summary(result: Any, top: int, *, worst: list[dict] | None = None) -> str:
    from .demo import worst_rows

    lines = [
        f"rows            {result.n_rows:,}",
        f"classes         {result.n_classes:,}",
        f"label issues    {result.num_issues:,} ({100 * result.num_issues / result.n_rows:.3f}%)",
        f"method          {result.method}{' (adjusted)' if result.adjust_pred_probs else ''}, "
        + (f"filter_by={result.filter_by}" if result.filter_by else result.estimation_method),
        f"pred_probs read {result.reads} time{'s' if result.reads != 1 else ''}",
    ]
    counts, issues = result.per_class_count, result.per_class_issues
    order = np.argsort(-issues, kind="stable")[: min(10, result.n_classes)]
    lines.append("issues per given label (most first):")
    for k in order:
        if issues[k] == 0:
            break
        lines.append(f"  class {k:>6}: {issues[k]:>10,} of {counts[k]:>12,} ({100 * issues[k] / max(counts[k], 1):.2f}%)")
    health = health_view(result, HEALTH_TOP)
    if health is not None:
        lines.append(f"label health    {health['overall_label_health_score']:.4f} (1 is clean; "
                     f"{health['estimated_label_issues']:,} labels estimated wrong)")
        lines.append("lowest label quality (p(true = given)):")
        for c in health["worst_classes"]:
            lines.append(f"  class {c['class']:>6}: {c['label_quality']:.4f}  ({c['label_issues']:,} labelled wrongly)")
        if health["confused_pairs"]:
            lines.append("most confused (given -> true class):")
            for p in health["confused_pairs"]:
                lines.append(f"  {p['given']:>6} -> {p['true']:<6} {p['rows']:>10,} rows")
    worst = worst if worst is not None else worst_rows(result, top)
    if worst:
        lines.append(f"worst {len(worst)} rows:")
        lines.append(f"  {'index':>12}  {'given':>7}  {'predicted':>9}  {'score':>10}")
        for w in worst:
            lines.append(
                f"  {w['index']:>12}  {w['given_label']:>7}  {w['predicted_label']:>9}  {w['score']:>10.4g}"
            )
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with where_it_runs(args) as (backend, client):
        report = run_demo(
            rows=args.rows, classes=args.classes, noise=args.noise, seed=args.seed,
            backend=backend, client=client, keep=args.keep, progress=_progress_default(args),
        )
    if args.json:
        payload = dict(report.__dict__, rows_per_second=report.rows_per_second)
        print(json.dumps(payload, indent=2))
        return 0
    print(f"rows            {report.rows:,}")
    print(f"classes         {report.classes}")
    print(f"wall time       {report.seconds:.2f} s (data written in {report.write_seconds:.2f} s beforehand)")
    print(f"rows per second {report.rows_per_second:,.0f}")
    print(f"issues found    {report.num_issues:,}  (labels flipped on purpose: {report.flipped:,})")
    print(f"precision       {report.precision:.3f}")
    print(f"recall          {report.recall:.3f}")
    print("worst 10 issues:")
    print(f"  {'index':>12}  {'given':>7}  {'predicted':>9}  {'score':>10}")
    for w in report.worst:
        print(f"  {w['index']:>12}  {w['given_label']:>7}  {w['predicted_label']:>9}  {w['score']:>10.4g}")
    if report.results_path:
        print(f"data in {report.data_path}, results in {report.results_path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from . import numba_cache
    from .warmup import compile_kernels

    seconds = compile_kernels()
    print(f"numba's kernels are in its cache ({seconds:.1f} s); stamp: {numba_cache.stamp_path()}")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    _import_beside_the_job("zarr")
    from .api import find_label_issues
    from .inputs import open_path

    misplaced = [flag for flag, given, tasks in (
        ("--sentence-offsets", args.sentence_offsets is not None, ("token",)),
        ("--sentence-score-method", args.sentence_score_method != "min", ("token",)),
        ("--label-offsets", args.label_offsets is not None, ("multilabel",)),
        ("--class-names", args.class_names is not None, ("multilabel",)),
    ) if given and args.task not in tasks]
    if misplaced:
        raise CommandError(f"{', '.join(misplaced)} does not go with --task {args.task}")
    pruning = [flag for flag, given in (
        ("--frac-noise", args.frac_noise != 1.0), ("--num-to-remove-per-class", args.num_to_remove_per_class is not None),
        ("--min-examples-per-class", args.min_examples_per_class != 1),
    ) if given]
    if args.task == "classification" and args.filter_by is None and pruning:
        verb = "needs" if len(pruning) == 1 else "need"
        raise CommandError(f"{', '.join(pruning)} {verb} --filter-by (one of cleanlab.filter's methods)")
    output = _checked_output(args)
    if args.task != "classification":
        return _find_task(args, output)
    labels = open_path(args.labels, "labels")
    probs = open_path(args.pred_probs, "pred_probs")
    started = time.perf_counter()
    with where_it_runs(args) as (backend, client):
        result = find_label_issues(
            labels, probs,
            method=args.method, adjust_pred_probs=args.adjust_pred_probs,
            estimation_method=args.estimation_method, backend=backend,
            chunk_rows=args.chunk_rows, n_jobs=args.n_jobs, client=client,
            progress=_progress_default(args),
            filter_by=args.filter_by, frac_noise=args.frac_noise,
            num_to_remove_per_class=_int_list(args.num_to_remove_per_class),
            min_examples_per_class=args.min_examples_per_class,
            return_indices_ranked_by=None if args.row_order else "method",
            health=args.health,
            row_sum_tolerance=args.row_sum_tolerance,
        )
        found = time.perf_counter() - started
        attrs = {
            "inputs": {
                "labels": {"source": args.labels, "shape": list(labels.shape), "dtype": str(labels.dtype)},
                "pred_probs": {"source": args.pred_probs, "shape": list(probs.shape), "dtype": str(probs.dtype)},
            },
            "seconds": round(found, 3),
        }
        _Interrupts.check()
        try:
            result.to_zarr(output, overwrite=args.overwrite, attrs=attrs, client=client)
        except Exception as exc:
            if args.debug:
                raise
            raise CommandError(f"could not write {output}: {_one_line(exc)}; {_left_as_it_was(args)}") from None
        seconds = time.perf_counter() - started
        worst = None
        if args.json:
            payload = summary_dict(result, args.top)
        else:
            from .demo import worst_rows

            worst = worst_rows(result, args.top)
    if args.json:
        payload.update(output=output, seconds=round(seconds, 3))
        print(json.dumps(payload))
    else:
        print(format_summary(result, args.top, worst=worst))
        print(f"written to      {output} in {seconds:.2f} s")
    return 0


def _find_task(args: argparse.Namespace, output: str) -> int:
    """``find --task multilabel`` or ``--task token``."""
    from . import cli_tasks
    from .store import write_arrays

    unsupported = [flag for flag, given in (
        ("--method", args.method != "self_confidence"), ("--adjust-pred-probs", args.adjust_pred_probs),
        ("--estimation-method", args.estimation_method != "off_diagonal"), ("--health", args.health),
        ("--row-order", args.row_order), ("--num-to-remove-per-class", args.num_to_remove_per_class is not None),
        ("--row-sum-tolerance", args.task == "multilabel" and args.row_sum_tolerance != 1e-3),
    ) if given]
    if unsupported:
        raise CommandError(f"{', '.join(unsupported)} does not go with --task {args.task}")
    started = time.perf_counter()
    with where_it_runs(args) as (backend, client):
        def write(arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
            _Interrupts.check()
            try:
                write_arrays(output, arrays, attrs, overwrite=args.overwrite, client=client)
            except Exception as exc:
                if args.debug:
                    raise
                raise CommandError(f"could not write {output}: {_one_line(exc)}; {_left_as_it_was(args)}") from None

        view = cli_tasks.run_task(args, output, backend, client, write)
    seconds = time.perf_counter() - started
    cli_tasks.print_view(view, args.json, {"output": output, "seconds": round(seconds, 3)})
    if not args.json:
        print(f"written to      {output} in {seconds:.2f} s")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    _import_beside_the_job("zarr")
    import numpy as np

    from . import segmentation
    from .inputs import open_path
    from .store import write_arrays

    output = _checked_output(args)
    labels = open_path(args.labels, "labels")
    probs = open_path(args.pred_probs, "pred_probs")
    names = args.class_names.split(",") if args.class_names else None
    if names is not None and len(probs.shape) == 4 and len(names) != int(probs.shape[1]):
        raise CommandError(f"--class-names has {len(names)} names; pred_probs has {int(probs.shape[1])} classes")
    started = time.perf_counter()
    with where_it_runs(args) as (backend, client):
        options = dict(
            backend=backend, client=client, n_jobs=args.n_jobs, images_per_block=args.images_per_block,
            verbose=_progress_default(args), row_sum_tolerance=args.row_sum_tolerance,
            ignore_index=args.ignore_index,
        )
        found = segmentation.find_issues(
            labels, probs, downsample=args.downsample, temperature=args.temperature, **options
        )
        image_scores, pixel_scores = found.image_scores, found.pixel_scores
        if image_scores is None:
            # Downsampled, the mask's job scored tiles; the scores are per
            # pixel, so they take a read of pred_probs of their own.
            image_scores, pixel_scores = segmentation.get_label_quality_scores(
                labels, probs, temperature=args.temperature, **options
            )
        flagged = np.asarray(found.mask.sum(axis=(1, 2)), dtype=np.int64)
        ranked = np.lexsort((np.arange(image_scores.size), image_scores))  # worst first, ties by index
        pairs = np.asarray(found.pair_counts, dtype=np.int64)
        seconds = time.perf_counter() - started
        score_dtype = np.float64 if np.dtype(probs.dtype) == np.float64 else np.float32
        attrs = {
            "format": "dask_labelissues segmentation results 1",
            "images": int(probs.shape[0]), "classes": int(probs.shape[1]),
            "height": int(probs.shape[2]), "width": int(probs.shape[3]),
            "num_pixel_issues": int(flagged.sum()), "estimated_num_issues": int(found.estimated_num_issues),
            "downsample": args.downsample, "temperature": args.temperature, "backend": backend,
            "ignore_index": args.ignore_index,
            "class_names": names,
            # Absolute, so that summary --plot finds them from anywhere.
            "inputs": {"labels": _absolute(args.labels), "pred_probs": _absolute(args.pred_probs)},
            "seconds": round(seconds, 3),
        }
        _Interrupts.check()
        try:
            write_arrays(output, {
                "is_label_issue": (found.mask, np.bool_),
                "pixel_scores": (pixel_scores, score_dtype),
                "image_scores": (image_scores, np.float64),
                "pixel_issues_per_image": (flagged, np.int64),
                "ranked_images": (ranked, np.int64),
                "pair_counts": (pairs, np.int64),
            }, attrs, overwrite=args.overwrite, client=client)
        except Exception as exc:
            if args.debug:
                raise
            raise CommandError(f"could not write {output}: {_one_line(exc)}; {_left_as_it_was(args)}") from None
    seconds = time.perf_counter() - started
    view = segmentation_view(attrs, image_scores, flagged, ranked, pairs, args.top)
    if args.json:
        print(json.dumps({**view, "output": output, "seconds": round(seconds, 3)}))
    else:
        print(format_segmentation(view))
        print(f"written to      {output} in {seconds:.2f} s")
    return 0


def segmentation_view(
    attrs: dict[str, Any], image_scores: Any, flagged: Any, ranked: Any, pairs: Any, top: int
) -> dict[str, Any]:
    """What ``segment`` and ``summary`` print of a segmentation results store."""
    from .segmentation import pair_table

    worst = [
        {"image": int(i), "score": float(image_scores[i]), "flagged_pixels": int(flagged[i])}
        for i in ranked[:top]
    ]
    table = pair_table(pairs, attrs.get("class_names"), top=top)
    return {
        "images": attrs["images"], "classes": attrs["classes"], "height": attrs["height"], "width": attrs["width"],
        "num_pixel_issues": attrs["num_pixel_issues"], "estimated_num_issues": attrs["estimated_num_issues"],
        "images_with_issues": int((flagged > 0).sum()),
        "worst_images": worst,
        "common_issues": table.to_dict(orient="records"),
    }


def format_segmentation(view: dict[str, Any]) -> str:
    pixels = view["images"] * view["height"] * view["width"]
    lines = [
        f"images          {view['images']:,} of {view['height']} x {view['width']} pixels, {view['classes']} classes",
        f"pixel issues    {view['num_pixel_issues']:,} of {pixels:,} pixels "
        f"({view['num_pixel_issues'] / pixels:.2%}), in {view['images_with_issues']:,} images",
        "",
        "worst images (softmin image score, lower is worse):",
        f"{'image':>10} {'score':>10} {'flagged pixels':>15}",
    ]
    lines += [f"{w['image']:>10} {w['score']:>10.4g} {w['flagged_pixels']:>15,}" for w in view["worst_images"]]
    lines += ["", "most common label issues (given -> predicted):"]
    lines += [
        f"{row['given_label']:>10} -> {row['predicted_label']:<10} {row['num_pixel_issues']:>12,} pixels"
        for row in view["common_issues"]
    ] or ["      none"]
    return "\n".join(lines)


def _checked_output(args: argparse.Namespace) -> str:
    """The output path, checked before any work: the store is written at the end."""
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite:
        raise CommandError(f"{output} already exists (use --overwrite to replace it)")
    from .store import is_results_store

    if os.path.exists(output) and not is_results_store(output):
        raise CommandError(
            f"{output} is not a results store of dask-labelissues: --overwrite replaces only those "
            "(remove it yourself if it should go)"
        )
    args.output_was = _stamp(output)
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise CommandError(f"directory {parent} does not exist (create it first, or choose another --output)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"directory {parent} is not writable")
    return output


def _absolute(source: str) -> str:
    """A local input's path made absolute (an inner path after it kept);
    a URL as given."""
    return source if "://" in source else os.path.abspath(source)


def _stamp(path: str) -> tuple[int, int] | None:
    """What tells a store at ``path`` from one written after it: its inode
    and change time (None where there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def _left_as_it_was(args: argparse.Namespace) -> str:
    """What a failed or interrupted ``find`` left at its output path: an
    interrupt can come after the store was renamed into place, complete."""
    output = os.path.abspath(args.output)
    now = _stamp(output)
    if now is None:
        return f"nothing was left at {output}"
    # No stamp: stopped before the output was checked, so before any write.
    if now == getattr(args, "output_was", now):
        return f"the store at {output} is as it was"
    return f"the results were written to {output}, complete, before it stopped"


def _import_beside_the_job(name: str) -> None:
    """Import ``name`` in a thread of its own: zarr is needed only for the
    results store at the end, and imported beside the job its 0.1 to 0.3 s
    overlap the job's first reads (whose kernels release the GIL) instead
    of following them."""
    # Not a daemon: Python waits for the import before it shuts down.  A
    # command that failed at once (bad input) otherwise exited with the
    # import still running, and the interpreter's teardown under it
    # crashed the process (SIGSEGV) in 1 to 5 runs in 100 here.
    threading.Thread(target=_import_quietly, args=(name,), name=f"import {name}").start()


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # the import is retried, and reported, where it is needed
        pass


def _at_least(low: int) -> Any:
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _tolerance(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number or 'none', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _int_list(text: str | None) -> list[int] | int | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise CommandError(
            f"--num-to-remove-per-class wants one integer (for every class) or comma-separated "
            f"integers, one per class, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def cmd_summary(args: argparse.Namespace) -> int:
    from .results import open_results

    task_view = _task_store(args.store, args.top)
    if task_view is not None:
        from .cli_tasks import print_view

        print_view(task_view, args.json)
        if args.plot:
            raise CommandError(f"--plot draws classification and segmentation stores; there is no plot of "
                               f"{task_view['task']} results yet (the summary above is all)")
        return 0
    segmentation = _segmentation_store(args.store)
    if segmentation is not None:
        try:
            view = segmentation(args.top)
        except KeyError as exc:
            raise CommandError(f"{args.store} is missing {exc}: not a complete segmentation results store") from None
        print(json.dumps(view) if args.json else format_segmentation(view))
        if args.plot:
            from .plot import SEGMENTATION_PLOT_TOP, plot_segmentation

            # --top defaults to 20 rows of text; a figure of 20 rows of images is unreadable.
            shown = max(1, min(args.top, SEGMENTATION_PLOT_TOP))
            plot_segmentation(args.store, args.plot, top=shown)
            shown = min(shown, int(view["images"]))
            print(f"plot of the {shown} worst images written to {os.path.abspath(args.plot)}", file=sys.stderr)
        return 0
    result = open_results(args.store)
    if args.json:
        print(json.dumps(summary_dict(result, args.top)))
    else:
        print(format_summary(result, args.top))
    if args.plot:
        from .plot import plot_summary

        plot_summary(result, args.plot)
        print(f"plot written to {os.path.abspath(args.plot)}", file=sys.stderr)
    return 0


def _task_store(path: str, top: int) -> Any:
    """A multi-label or token store's view; else None."""
    import zarr

    from .cli_tasks import store_view

    try:
        group = zarr.open_group(os.path.abspath(path), mode="r")
    except Exception:
        return None
    return store_view(group, top)


def _segmentation_store(path: str) -> Any:
    """For a store ``segment`` wrote, a function of ``top`` giving its view; else None."""
    import zarr

    try:
        group = zarr.open_group(os.path.abspath(path), mode="r")
    except Exception:
        return None  # open_results says what is wrong with it
    attrs = dict(group.attrs)
    if not str(attrs.get("format", "")).startswith("dask_labelissues segmentation results"):
        return None
    arrays = {name: group[name][:] for name in ("image_scores", "pixel_issues_per_image", "ranked_images", "pair_counts")}
    return lambda top: segmentation_view(
        attrs, arrays["image_scores"], arrays["pixel_issues_per_image"], arrays["ranked_images"],
        arrays["pair_counts"], top,
    )


# -- entry point -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dask-labelissues",
        description="Find mislabeled rows (classification) or pixels (segmentation) in data of any size: batched confident learning on Dask.",
        epilog="Run 'dask-labelissues COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, sentence: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=sentence, description=sentence)

    p = command("demo", "Find the label issues of a synthetic noisy dataset and score them; nothing to prepare.")
    p.add_argument("--rows", type=int, default=2_000_000, metavar="N",
                   help="rows of the synthetic dataset (default 2,000,000)")
    p.add_argument("--classes", type=int, default=100, metavar="K", help="classes (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.1, metavar="F",
                   help="fraction of the labels flipped (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default %(default)s)")
    _add_local_clusters(p)
    p.add_argument("--keep", metavar="DIR",
                   help="keep the data and the results store in DIR (default: a temporary directory, removed)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_progress(p)
    _add_common(p)
    p.set_defaults(scheduler=None, backend="auto", threads_per_worker=1, memory_limit="auto", n_jobs=None,
                   no_workers_timeout=60.0)
    p.set_defaults(func=cmd_demo)

    p = command("find", "Find the mislabeled rows of a dataset (labels and pred_probs) and write them to a results store.")
    _add_inputs_and_output(p, "the given labels (N; N x K 0/1 with --task multilabel; T tokens with --task token)",
                           "N x K (T x K tokens with --task token)")
    p.add_argument("--task", choices=("classification", "multilabel", "token"), default="classification",
                   help="classification (one label a row, the default), multilabel (an N x K 0/1 label matrix, "
                        "per-class probabilities) or token (flat tokens and --sentence-offsets)")
    p.add_argument("--sentence-offsets", metavar="SRC",
                   help="--task token: sentence i is tokens OFFSETS[i]:OFFSETS[i+1] (N + 1 integers from 0 to T)")
    p.add_argument("--label-offsets", metavar="SRC",
                   help="--task multilabel: --labels holds every example's classes one after another, example i's "
                        "at LABELS[OFFSETS[i]:OFFSETS[i+1]] (N + 1 integers), instead of an N x K matrix")
    p.add_argument("--class-names", metavar="A,B,...", help="--task multilabel: names of the K classes")
    p.add_argument("--sentence-score-method", choices=("min", "softmin"), default="min",
                   help="--task token: a sentence's score from its tokens' (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default="self_confidence",
                   help="label quality score, lower is worse (default %(default)s)")
    p.add_argument("--adjust-pred-probs", action="store_true",
                   help="subtract the class thresholds from pred_probs before scoring, as cleanlab does")
    p.add_argument("--estimation-method", choices=ESTIMATION_METHODS, default="off_diagonal",
                   help="how the number of issues is estimated (default %(default)s)")
    p.add_argument("--chunk-rows", type=_at_least(1), metavar="N", help="rows per block (default: about 64 MB of pred_probs)")
    p.add_argument("--row-sum-tolerance", type=_tolerance, default=1e-3, metavar="T",
                   help="largest accepted |row sum - 1| of pred_probs, or 'none' (default %(default)s)")
    g = p.add_argument_group(
        "cleanlab.filter's methods",
        "default: the batched method (cleanlab's find_label_issues_batched); "
        "with --filter-by, cleanlab.filter.find_label_issues(filter_by=NAME), ranked by --method",
    )
    g.add_argument("--filter-by", choices=FILTERS, metavar="NAME",
                   help=f"{', '.join(FILTERS)} (default: none, the batched method; for --task multilabel "
                        "and token, prune_by_noise_rate, as cleanlab's)")
    g.add_argument("--frac-noise", type=float, default=1.0, metavar="F",
                   help="prune filters: keep this fraction of the estimated noise (default %(default)g)")
    g.add_argument("--num-to-remove-per-class", metavar="N[,N,...]",
                   help="prune filters: issues to remove, for every class or one per class (default: estimated)")
    g.add_argument("--min-examples-per-class", type=int, default=1, metavar="N",
                   help="prune filters: leave at least N rows in every class (default %(default)s)")
    g.add_argument("--row-order", action="store_true",
                   help="store the issues in row order instead of worst first")
    p.add_argument("--health", action="store_true",
                   help="also store the confident joint for dataset health (one more read of pred_probs)")
    p.add_argument("--top", type=_at_least(0), default=10, metavar="N", help="worst rows to print (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_cluster(p)
    _add_progress(p)
    _add_common(p)
    p.set_defaults(func=cmd_find)

    p = command("segment", "Find the mislabeled pixels of a segmentation dataset and write them to a results store.")
    _add_inputs_and_output(p, "the given label maps, N x H x W", "N x K x H x W")
    p.add_argument("--downsample", type=_at_least(1), default=1, metavar="F",
                   help="find issues on F x F tiles first, then check their pixels (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.1, metavar="T",
                   help="softmin temperature of the image scores (default %(default)s)")
    p.add_argument("--images-per-block", type=_at_least(1), metavar="N",
                   help="images per block (default: about 64 MB of pred_probs)")
    p.add_argument("--class-names", metavar="A,B,...", help="names of the K classes, for the printed tables")
    p.add_argument("--ignore-index", type=int, metavar="L",
                   help="a label marking pixels to leave out, often 255 (default: none; every label must be a class)")
    p.add_argument("--row-sum-tolerance", type=_tolerance, default=1e-3, metavar="T",
                   help="largest accepted |sum over classes - 1| of a pixel, or 'none' (default %(default)s)")
    p.add_argument("--top", type=_at_least(0), default=10, metavar="N",
                   help="worst images and common issues to print (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_cluster(p)
    _add_progress(p)
    _add_common(p)
    p.set_defaults(func=cmd_segment)

    p = command("summary", "Print a results store's counts, worst rows and dataset health, and plot them if asked.")
    p.add_argument("store", metavar="OUT.zarr", help="a results store written by find or segment")
    p.add_argument("--top", type=_at_least(0), default=20, metavar="N", help="worst rows to print (default %(default)s)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also write the summary plot to FILE.png (needs matplotlib): classification and "
                        "segmentation stores (the worst images, at most 6)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_common(p)
    p.set_defaults(func=cmd_summary)

    p = command("compile", "Compile numba's kernels into its cache now, so that no job waits for them.")
    p.epilog = (
        "The first job after installing the package (or numba) would otherwise run the slower numpy kernels "
        "while they compile in the background, or compile them itself (a few seconds) if it is large. "
        "Run it as the user that runs the jobs (numba uses only a cache directory it can write to): in a "
        "container image's build after switching to that user, or before timing a job."
    )
    _add_common(p)
    p.set_defaults(func=cmd_compile)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return " ".join(text.split())


class _Interrupts:
    """SIGINT as KeyboardInterrupt, remembered: Python raises it wherever
    the main thread is, and where that is a garbage-collector callback
    (distributed installs one) the exception is printed and dropped, and
    the job would go on to write its results.  The command checks
    :meth:`check` before it writes anything."""

    seen = False
    previous_hook: Any = sys.__unraisablehook__

    #: Without --debug: the embedded cluster's shutdown after an interrupt
    #: (workers removed, tasks lost, streams closed) is not reported.
    quiet = True

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        if cls.quiet:
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
        raise KeyboardInterrupt

    @classmethod
    def unraisable(cls, info: Any) -> None:
        # Where the interrupt was dropped: remembered, and not printed.
        if isinstance(info.exc_value, KeyboardInterrupt):
            cls.seen = True
            return
        _Interrupts.previous_hook(info)

    @classmethod
    def check(cls) -> None:
        if cls.seen:
            raise KeyboardInterrupt


def _not_all_exit(record: Any) -> bool:
    return not (record.exc_info and getattr(record.exc_info[0], "__name__", "") == "AllExit")


def _terminate(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so half-written stores are removed.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        # distributed logs shutdown chatter at INFO; users want the result.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # A client closed by Ctrl-C leaves a waiting task failed with
        # AllExit, which asyncio reports at exit with its traceback.
        logging.getLogger("asyncio").addFilter(_not_all_exit)
    distributed_level = logging.getLogger("distributed").level
    previous = signal.signal(signal.SIGTERM, _terminate)
    previous_int = previous_hook = None
    _Interrupts.seen = False
    _Interrupts.quiet = not args.debug
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous_int = signal.signal(signal.SIGINT, _Interrupts.handler)
        previous_hook = _Interrupts.previous_hook = sys.unraisablehook
        sys.unraisablehook = _Interrupts.unraisable
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        where = f"; {_left_as_it_was(args)}" if getattr(args, "output", None) else ""
        print(f"error: interrupted{where}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        logging.getLogger("asyncio").removeFilter(_not_all_exit)
        if not _Interrupts.seen:  # after one, a cluster may still be closing in the background
            logging.getLogger("distributed").setLevel(distributed_level)
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
            sys.unraisablehook = previous_hook


def run() -> NoReturn:
    """The ``dask-labelissues`` command (and ``python -m dask_labelissues``):
    :func:`main` on the shell's arguments, then exit with its code.

    Python's shutdown collects what the job left in reference cycles, in
    full passes over every object the collector tracks (about 124,000
    after ``find`` on 2,000,000 rows: numba's, zarr's, the package's):
    0.27 to 0.53 s of a 2 s command.  Frozen out of the collector first,
    they are left to the operating system, and the exit takes 0.05 s.
    atexit handlers (which stop the fork engine's kept workers) and
    weakref finalizers still run.  :func:`main` leaves the collector
    alone, for callers whose process goes on.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
