#!/usr/bin/env python
"""Find label issues on a SLURM or PBS cluster, with Dask workers started as
batch jobs by dask-jobqueue and every Dask connection over TLS.

Run it where you can submit jobs (a login node, or inside a small batch job),
with the Python environment that has dask-labelissues and dask-jobqueue
installed on a filesystem the compute nodes also see::

    python deploy/hpc/run_jobqueue.py --system slurm \\
        --labels /shared/data/labels.npy --pred-probs /shared/data/pred_probs.npy \\
        --output /shared/results.zarr \\
        --jobs 4 --cores 8 --memory 32GB --walltime 01:00:00 --queue normal \\
        --certs /shared/certs

The scheduler runs in this process; each batch job runs one Dask worker
(``--processes`` splits it into several). The inputs, the output and the
certificates must be at the same paths on this host and on the compute nodes:
the workers read the input blocks and write the result chunks themselves, and
the job script passes them the certificate paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SYSTEMS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_jobqueue.py",
        description="Run dask_labelissues.find_label_issues on Dask workers started as "
                    "SLURM or PBS jobs by dask-jobqueue, over TLS.",
    )
    p.add_argument("--system", choices=sorted(SYSTEMS), required=True, help="batch system")

    data = p.add_argument_group("data (paths every compute node sees)")
    data.add_argument("--labels", required=True, metavar="SRC",
                      help="file.npy, store.zarr[:path/in/group], file.h5:/dataset, or a URL of one")
    data.add_argument("--pred-probs", required=True, metavar="SRC", help="same forms as --labels")
    data.add_argument("--output", required=True, metavar="OUT.zarr",
                      help="results store, on the shared filesystem")
    data.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    data.add_argument("--method", default="self_confidence",
                      choices=["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
    data.add_argument("--adjust-pred-probs", action="store_true")
    data.add_argument("--estimation-method", default="off_diagonal",
                      choices=["off_diagonal", "off_diagonal_calibrated"])
    data.add_argument("--chunk-rows", type=int, metavar="N", help="rows per block (default: about 64 MB)")

    jobs = p.add_argument_group("batch jobs")
    jobs.add_argument("--jobs", type=int, default=4, help="batch jobs to run (default 4)")
    jobs.add_argument("--cores", type=int, default=8, help="cores per job (default 8)")
    jobs.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    jobs.add_argument("--processes", type=int,
                      help="Dask worker processes per job (default: dask-jobqueue's, about sqrt(cores))")
    jobs.add_argument("--walltime", default="01:00:00", help="per job, HH:MM:SS (default 01:00:00)")
    jobs.add_argument("--queue", help="partition (SLURM -p) or queue (PBS -q)")
    jobs.add_argument("--account", help="account to charge (-A)")
    jobs.add_argument("--interface", metavar="IFACE",
                      help="network interface for Dask traffic, e.g. ib0 (default: the hostname's address)")
    jobs.add_argument("--local-directory", metavar="DIR",
                      help="node-local scratch for worker spill files, e.g. '$TMPDIR' (expanded on the node)")
    jobs.add_argument("--log-directory", metavar="DIR", help="where the batch system writes job logs")
    jobs.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                      help="extra #SBATCH / #PBS directive, e.g. '--constraint=skylake' (repeatable)")
    jobs.add_argument("--prologue", action="append", default=[], metavar="LINE",
                      help="shell line run in each job before the worker starts, e.g. "
                           "'source /shared/venv/bin/activate' (repeatable)")

    run = p.add_argument_group("cluster")
    run.add_argument("--certs", required=True, metavar="DIR",
                     help="directory with ca.pem, node.pem and node.key from deploy/tls/make-certs.sh, "
                          "on the shared filesystem")
    run.add_argument("--wait-for-workers", type=float, default=3600.0, metavar="SECONDS",
                     help="how long to wait in the queue for the first worker (default 3600)")
    run.add_argument("--no-workers-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="fail if every worker is gone this long mid-run, e.g. jobs hit their "
                          "walltime (default 300)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the batch script a worker job would run, and submit nothing")
    return p.parse_args(argv)


def tls_security(certs: str):
    """One certificate for every role: Dask authenticates peers by the CA and
    does not check host names, so the same node certificate serves the
    scheduler (this process), the workers and the client."""
    from distributed.security import Security

    paths = {name: os.path.abspath(os.path.join(certs, name)) for name in ("ca.pem", "node.pem", "node.key")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)} (create them with deploy/tls/make-certs.sh {certs})")
    ca, cert, key = paths["ca.pem"], paths["node.pem"], paths["node.key"]
    return Security(
        tls_ca_file=ca,
        tls_scheduler_cert=cert, tls_scheduler_key=key,
        tls_worker_cert=cert, tls_worker_key=key,
        tls_client_cert=cert, tls_client_key=key,
        require_encryption=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported only now, so that --help works without dask-jobqueue installed.
    try:
        import dask_jobqueue
    except ImportError:
        print("error: dask-jobqueue is not installed; run `pip install dask-jobqueue` in the "
              "environment the compute nodes use", file=sys.stderr)
        return 2

    import dask
    from distributed import Client

    from dask_labelissues import find_label_issues
    from dask_labelissues.inputs import open_path

    # Fail here, before any job waits in the queue, on what can be checked
    # from this host: certificates, an existing output, a missing directory,
    # unreadable inputs.
    output = os.path.abspath(args.output)
    try:
        security = tls_security(args.certs)
        if os.path.exists(output) and not args.overwrite:
            raise FileExistsError(f"{output} already exists (use --overwrite to replace it)")
        if not os.path.isdir(os.path.dirname(output)):
            raise FileNotFoundError(f"directory {os.path.dirname(output)} does not exist")
        labels = open_path(args.labels, "labels")
        pred_probs = open_path(args.pred_probs, "pred_probs")
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cluster_cls = getattr(dask_jobqueue, SYSTEMS[args.system])
    options = dict(
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        interface=args.interface,
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        # None, not [], where nothing was given: dask-jobqueue then falls back
        # to the site's jobqueue.yaml, as it does for the other options.
        job_extra_directives=args.job_extra or None,
        job_script_prologue=args.prologue or None,
        protocol="tls://",
        security=security,
    )
    if args.processes is not None:
        options["processes"] = args.processes

    with cluster_cls(**options) as cluster:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}  dashboard {cluster.dashboard_link}  "
              f"({args.jobs} {args.system} jobs submitted)", file=sys.stderr, flush=True)
        with Client(cluster, security=security) as client:
            # Jobs can wait in the queue far longer than Dask's connect timeouts.
            try:
                client.wait_for_workers(1, timeout=args.wait_for_workers)
            except TimeoutError:
                print(f"error: no worker started within {args.wait_for_workers:g} s; check the "
                      f"queue and the job logs", file=sys.stderr)
                return 2
            with dask.config.set({"labelissues.no-workers-timeout": args.no_workers_timeout}):
                result = find_label_issues(
                    labels, pred_probs,
                    method=args.method,
                    adjust_pred_probs=args.adjust_pred_probs,
                    estimation_method=args.estimation_method,
                    chunk_rows=args.chunk_rows,
                    client=client,
                )
                attrs = {"inputs": {"labels": {"source": args.labels}, "pred_probs": {"source": args.pred_probs}}}
                path = result.to_zarr(output, overwrite=args.overwrite, attrs=attrs, client=client)
    print(json.dumps({**result.summary(), "output": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
