#!/usr/bin/env bash
# Stop the real node started by node-up.sh and remove everything it made, leaving the machine
# as it was: kube-proxy's iptables rules, the kubelet, every container and sandbox (their shims
# included), containerd, mounts under the state directory, the pods' network namespaces, the
# bridge and the Service CIDR route, the host-local IPAM state and the node's cgroups.
#
# Usage: tests/cluster/node-down.sh --dir DIR [--keep]   (the directory given to up.sh --real-node)
#   --keep  keep DIR/node/logs and DIR/node/pod-logs (container logs) for inspection
# Idempotent; every step is attempted even when an earlier one fails.
set -uo pipefail

DIR=""
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "node-down.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
STATE="$DIR/node"
[[ -d "$STATE" ]] || exit 0
BIN_DIR=""
# shellcheck disable=SC1091
[[ -f "$DIR/env" ]] && source "$DIR/env"

# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop() { stop_pidfile "$STATE/pids/$1.pid"; }  # name: see lib.sh

stop kube-proxy
if [[ -n "$BIN_DIR" && -x "$BIN_DIR/kube-proxy" ]]; then
  "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
fi
stop kubelet
# The kubelet's own chains (KUBE-KUBELET-CANARY, KUBE-FIREWALL, KUBE-IPTABLES-HINT) and anything
# kube-proxy --cleanup missed: every KUBE-* chain and every rule that jumps to one, unless some
# other Kubernetes node on this machine had KUBE-* chains before node-up.sh ran.
if [[ "$(cat "$STATE/kube-chains-before" 2>/dev/null || echo 0)" == 0 ]]; then
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$ipt" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -vE '^-A KUBE-' | while read -r rule; do
        eval "\"$ipt\" -t $table -D ${rule#-A }" 2>/dev/null || true
      done
      chains="$("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}')"
      for chain in $chains; do "$ipt" -t "$table" -F "$chain" 2>/dev/null || true; done
      for chain in $chains; do "$ipt" -t "$table" -X "$chain" 2>/dev/null || true; done
    done
  done
fi

# Containers and sandboxes: kill their tasks through containerd while it still runs, then the
# shims that outlive it (they carry our socket path on their command line).
SOCK="$STATE/containerd/containerd.sock"
if [[ -S "$SOCK" ]]; then
  CTR=(ctr --address "$SOCK" -n k8s.io)
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks delete -f "$task" >/dev/null 2>&1 || true
  done
  # Containers and sandboxes (with their snapshots) leave the persistent root; images stay.
  for container in $("${CTR[@]}" containers ls -q 2>/dev/null); do
    "${CTR[@]}" containers delete "$container" >/dev/null 2>&1 || true
  done
fi
stop containerd
for pid in $(pgrep -f "containerd-shim.*-address $SOCK" 2>/dev/null); do
  kill -KILL "$pid" 2>/dev/null || true
done
# Processes still inside the node's cgroups (a container whose shim died first).
for procs in /sys/fs/cgroup/*/kubeinfer-node; do
  [[ -d "$procs" ]] || continue
  find "$procs" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | xargs -r kill -KILL 2>/dev/null || true
done
sleep 0.2

# Mounts under the state directory and the containerd root (overlay rootfs, shm, emptyDir and
# projected tmpfs), deepest first; then the CRI plugin's per-sandbox files in the root.
ROOT="$(cat "$STATE/containerd-root" 2>/dev/null || true)"
findmnt -rn -o TARGET 2>/dev/null | grep -F -e "$STATE/" ${ROOT:+-e "$ROOT/"} | sort -r | while read -r target; do
  umount -l "$target" 2>/dev/null || true
done
if [[ -n "$ROOT" ]]; then
  rm -rf "$ROOT/io.containerd.grpc.v1.cri/sandboxes" "$ROOT/io.containerd.grpc.v1.cri/containers"
fi
# Network namespaces the node's sandboxes made (the ones that were there before stay).
if [[ -d /var/run/netns && -f "$STATE/netns-before" ]]; then
  comm -13 "$STATE/netns-before" <(ls /var/run/netns 2>/dev/null | sort) | while read -r ns; do
    [[ "$ns" == cni-* ]] || continue
    umount -l "/var/run/netns/$ns" 2>/dev/null || true
    rm -f "/var/run/netns/$ns"
  done
fi
# Bridge and route.
if [[ -f "$STATE/network" ]]; then
  read -r BRIDGE SERVICE_CIDR < "$STATE/network"
  while iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment kubeinfer-node -j ACCEPT 2>/dev/null; do :; done
  ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
fi
rm -rf /var/lib/cni/results/kubeinfer-* 2>/dev/null || true
# Kernel settings as they were before node-up.sh.
if [[ -f "$STATE/sysctl-before" ]]; then
  while IFS= read -r kv; do
    sysctl -q -w "$kv" >/dev/null 2>&1 || true
  done < "$STATE/sysctl-before"
fi
# cgroups, leaves first.
for root in /sys/fs/cgroup/*/kubeinfer-node; do
  [[ -d "$root" ]] || continue
  find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true
done
if [[ "$KEEP" == 1 ]]; then
  find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs ! -name pod-logs -exec rm -rf {} + 2>/dev/null || true
else
  rm -rf "$STATE"
fi
