#!/usr/bin/env bash
# Stop a cluster started by deploy/local/start-cluster.sh.
#
#   deploy/local/stop-cluster.sh [-d STATE_DIR]
#
# Sends SIGTERM to every process group the start script recorded, waits up
# to 15 s, then SIGKILLs what is left. Logs are kept.
set -euo pipefail

state=./dask-local
while [[ $# -gt 0 ]]; do
    case "$1" in
        -d) state="$2"; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -e "$state/pids" ]] || { echo "no cluster recorded in $state"; exit 0; }

mapfile -t pids < "$state/pids"
for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
done
for _ in $(seq 1 150); do
    alive=0
    for pid in "${pids[@]}"; do
        kill -0 -- "-$pid" 2>/dev/null && alive=1
    done
    [[ $alive == 0 ]] && break
    sleep 0.1
done
for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
done
rm -f "$state/pids" "$state/scheduler-address" "$state/scheduler.json"
rm -rf "$state/spill"
echo "stopped ${#pids[@]} processes; logs kept in $state/logs"
