#!/usr/bin/env bash
# Start a Dask scheduler and N workers on 127.0.0.1 with the `dask scheduler`
# and `dask worker` commands, in the background.
#
#   deploy/local/start-cluster.sh [-n WORKERS] [-t THREADS] [-m MEMORY]
#                                 [-d STATE_DIR] [--tls CERT_DIR] [--timeout S]
#
# STATE_DIR (default ./dask-local) receives scheduler-address (the address
# to pass to --scheduler), scheduler.json, pids and logs/. Stop the cluster
# with deploy/local/stop-cluster.sh -d STATE_DIR. With --tls, CERT_DIR must
# hold ca.pem, node.pem and node.key (deploy/tls/make-certs.sh makes them).
set -euo pipefail

workers=2 threads=1 memory=auto state=./dask-local certs="" timeout=60
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) workers="$2"; shift 2 ;;
        -t) threads="$2"; shift 2 ;;
        -m) memory="$2"; shift 2 ;;
        -d) state="$2"; shift 2 ;;
        --tls) certs="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done

DASK="${DASK:-dask}"
PYTHON="${PYTHON:-python3}"
command -v "$DASK" >/dev/null || { echo "error: '$DASK' not found; activate the environment with dask_labelissues installed" >&2; exit 2; }
if [[ -e "$state/pids" ]]; then
    echo "error: $state/pids exists: a cluster may be running (stop it with stop-cluster.sh -d $state)" >&2
    exit 2
fi
mkdir -p "$state/logs"
state="$(cd "$state" && pwd)"

tls_args=() protocol=tcp
if [[ -n "$certs" ]]; then
    certs="$(cd "$certs" && pwd)"
    for f in ca.pem node.pem node.key; do
        [[ -r "$certs/$f" ]] || { echo "error: $certs/$f is missing" >&2; exit 2; }
    done
    tls_args=(--tls-ca-file "$certs/ca.pem" --tls-cert "$certs/node.pem" --tls-key "$certs/node.key")
    protocol=tls
fi

rm -f "$state/scheduler.json"
# Each process gets its own session (setsid) so stop-cluster.sh can end it,
# and its children (the nanny's worker), with one signal to the group.
setsid "$DASK" scheduler --host 127.0.0.1 --port 0 --protocol "$protocol" \
    --dashboard-address 127.0.0.1:0 --scheduler-file "$state/scheduler.json" \
    "${tls_args[@]}" >"$state/logs/scheduler.log" 2>&1 < /dev/null &
echo $! > "$state/pids"

for _ in $(seq 1 $((timeout * 10))); do
    [[ -s "$state/scheduler.json" ]] && break
    sleep 0.1
done
[[ -s "$state/scheduler.json" ]] || { echo "error: scheduler did not start; see $state/logs/scheduler.log" >&2; exit 1; }

# glibc keeps up to 128 MiB of freed memory per arena for reuse, as in the
# LocalCluster `dask-labelissues find` starts (dask_labelissues/cluster.py):
# with distributed's MALLOC_TRIM_THRESHOLD_=65536 every block-sized array is
# a fresh mmap whose pages the kernel faults in and zeroes. Values already
# in the environment win.
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-134217728}"
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-134217728}"
for i in $(seq 1 "$workers"); do
    setsid "$DASK" worker --scheduler-file "$state/scheduler.json" --host 127.0.0.1 \
        --nthreads "$threads" --memory-limit "$memory" --name "local-$i" \
        --local-directory "$state/spill" "${tls_args[@]}" \
        >"$state/logs/worker-$i.log" 2>&1 < /dev/null &
    echo $! >> "$state/pids"
done

CERTS="$certs" WORKERS="$workers" TIMEOUT="$timeout" STATE="$state" "$PYTHON" - <<'PY'
import json, os
from distributed import Client
from distributed.security import Security

state, certs = os.environ["STATE"], os.environ["CERTS"]
info = json.load(open(os.path.join(state, "scheduler.json")))
security = None
if certs:
    security = Security(tls_ca_file=f"{certs}/ca.pem", tls_client_cert=f"{certs}/node.pem",
                        tls_client_key=f"{certs}/node.key", require_encryption=True)
with Client(info["address"], security=security, timeout="30s") as client:
    client.wait_for_workers(int(os.environ["WORKERS"]), timeout=float(os.environ["TIMEOUT"]))
    dashboard = client.dashboard_link
with open(os.path.join(state, "scheduler-address"), "w") as f:
    f.write(info["address"] + "\n")
print(f"scheduler {info['address']}  dashboard {dashboard}")
PY
echo "$workers workers up; address in $state/scheduler-address, logs in $state/logs"
