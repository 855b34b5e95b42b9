#!/usr/bin/env bash
# Stop a control plane started by up.sh and remove its state directory.
#
# Usage: tests/cluster/down.sh [--dir DIR] [--keep]
#   --dir   state directory given to up.sh (default <repo>/.cluster)
#   --keep  stop the processes but keep DIR (logs, kubeconfig) for inspection
# Components stop in reverse start order; each process group gets SIGTERM, then
# SIGKILL after 10 s. Idempotent: a missing DIR or dead process is not an error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="$REPO/.cluster"
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "down.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -d "$DIR" ]] || exit 0

stop() {  # name: TERM the process group, wait up to 10 s, then KILL it
  local f="$DIR/pids/$1.pid" pid i
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
# A real node (up.sh --real-node) goes first: its pods, network and mounts need the processes below
# only to have been stopped in order.
if [[ -d "$DIR/node" ]]; then
  keep=(); [[ "$KEEP" == 1 ]] && keep=(--keep)
  "$HERE/node-down.sh" --dir "$DIR" "${keep[@]}" || true
fi
# Clients of the API server first (in parallel), then the API server, then etcd.
stop kwok & stop kube-scheduler & stop kube-controller-manager & wait
stop kube-apiserver
stop etcd
if [[ "$KEEP" == 0 ]]; then
  rm -rf "$DIR"
fi
