#!/usr/bin/env bash
# Add a real node to a control plane started by `up.sh --real-node`: containerd (CRI) + kubelet +
# kube-proxy on this machine as node "real-node-0", pods on a bridge of our own, and the given
# images loaded into its containerd. Recipe and traps: shared notes "kubernetes-testing.md",
# section "A real node".
#
# Usage: tests/cluster/node-up.sh --dir DIR [--image REF ...] [--timeout S]
#   --dir    the state directory given to up.sh --real-node (reads DIR/env and DIR/node.env)
#   --image  a Docker image to load into the node's containerd (docker save | ctr import); repeatable
# Network: the pod subnet and the gateway address live on bridge kubeinfer0, which this script
# creates; the Service CIDR is routed to that bridge, so a ClusterIP packet that kube-proxy did
# not rewrite never leaves the machine. Nothing else is sent anywhere but loopback and pod IPs.
# Stop with tests/cluster/down.sh --dir DIR (it calls node-down.sh), which removes everything
# this script made: processes, containers, mounts, network namespaces, bridge, route, iptables
# rules, cgroups.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR=""
IMAGES=()
TIMEOUT=120
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --image) IMAGES+=("$2"); shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    *) echo "node-up.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n "$DIR" && -f "$DIR/node.env" ]] || { echo "node-up.sh: $DIR/node.env missing: start the control plane with up.sh --real-node" >&2; exit 1; }
DIR="$(cd "$DIR" && pwd)"
# shellcheck disable=SC1091
source "$DIR/env"
# shellcheck disable=SC1091
source "$DIR/node.env"
[[ $(id -u) == 0 ]] || { echo "node-up.sh: a real node needs root (containerd, bridge, iptables)" >&2; exit 1; }
STATE="$DIR/node"
mkdir -p "$STATE"/{pids,logs,cni/net.d,cni/ipam,containerd,kubelet,pod-logs}
START=$(date +%s)
say() { echo "node-up: $*" >&2; }

# --- packages: containerd + runc (Debian's docker.io brings both), CNI plugins, iptables ---
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
if [[ ${#need[@]} -gt 0 ]]; then
  say "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
fi
CNI_BIN=/usr/lib/cni
# containerd's root (images) persists in the cache, keyed by containerd's version.
CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
CONTAINERD_ROOT="$CACHE_ROOT/node-containerd-$(containerd --version | awk '{print $3}')"
mkdir -p "$CONTAINERD_ROOT/.kubeinfer-images"
echo "$CONTAINERD_ROOT" > "$STATE/containerd-root"

fill() {  # template out: replace @KEY@ with the values below
  sed -e "s#@STATE@#$STATE#g" -e "s#@CLUSTER_DIR@#$DIR#g" -e "s#@ROOT@#$CONTAINERD_ROOT#g" -e "s#@SANDBOX_IMAGE@#$SANDBOX_IMAGE#g" -e "s#@CNI_BIN@#$CNI_BIN#g" \
      -e "s#@BRIDGE@#$BRIDGE#g" -e "s#@POD_SUBNET@#$POD_SUBNET#g" -e "s#@GATEWAY@#$GATEWAY#g" \
      -e "s#@POD_CIDR@#$POD_CIDR#g" -e "s#@NODE@#$NODE_NAME#g" -e "s#@CA@#$DIR/pki/ca.crt#g" \
      -e "s#@KUBELET_PORT@#$KUBELET_PORT#g" -e "s#@HEALTHZ_PORT@#$KUBELET_HEALTHZ_PORT#g" \
      -e "s#@METRICS_PORT@#$PROXY_METRICS_PORT#g" -e "s#@PROXY_HEALTHZ_PORT@#$PROXY_HEALTHZ_PORT#g" \
      "$1" > "$2"
}
start() {  # name binary args...: own process group, log to node/logs/name.log
  local name="$1"; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}
fail() {
  say "$*"
  for log in "$STATE"/logs/*.log; do
    echo "----- last lines of $log -----" >&2
    tail -n 25 "$log" >&2
  done
  say "$* (the reason again, after the logs)"
  exit 1
}
wait_for() {  # description command...
  local what="$1"; shift
  local deadline=$(( $(date +%s) + TIMEOUT )) f
  until "$@" >/dev/null 2>&1; do
    for f in "$STATE"/pids/*.pid; do
      kill -0 "$(cat "$f")" 2>/dev/null || fail "$(basename "$f" .pid) exited during start-up"
    done
    (( $(date +%s) < deadline )) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.25
  done
}

# --- what node-down.sh must leave as it was: network namespaces that exist before us, and the
# kernel settings the kubelet (protectKernelDefaults false), the bridge plugin and kube-proxy set ---
ls /var/run/netns 2>/dev/null | sort > "$STATE/netns-before" || true
{ iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | grep -c '^:KUBE-' > "$STATE/kube-chains-before" || true
: > "$STATE/sysctl-before"
for key in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys \
           kernel.keys.root_maxbytes net.ipv4.ip_forward net.ipv4.conf.all.route_localnet; do
  value="$(sysctl -n "$key" 2>/dev/null)" && echo "$key=$value" >> "$STATE/sysctl-before"
done

# --- pod network: our bridge with the gateway address, Service CIDR routed to it ---
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
fi
ip addr replace "$GATEWAY/${POD_SUBNET#*/}" dev "$BRIDGE"
ip link set "$BRIDGE" up
ip route replace "$SERVICE_CIDR" dev "$BRIDGE"
echo "$BRIDGE $SERVICE_CIDR" > "$STATE/network"
# dockerd sets the FORWARD policy to DROP, which drops pod-to-pod traffic on the bridge (the
# operator polling a serving pod, a pod calling a Service): accept forwarding within our bridge
# only (pods still cannot leave it), as a CNI firewall/portmap setup would. node-down.sh removes it.
FORWARD_RULE=(FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment kubeinfer-node -j ACCEPT)
iptables -C "${FORWARD_RULE[@]}" 2>/dev/null || iptables -I "${FORWARD_RULE[@]}"
fill "$HERE/node/10-bridge.conflist" "$STATE/cni/net.d/10-kubeinfer.conflist"

# --- cgroups: everything the kubelet creates lives under /kubeinfer-node (cgroupRoot) ---
for hier in /sys/fs/cgroup/*/; do
  [[ -d "$hier" && ! -L "${hier%/}" ]] && mkdir -p "${hier}kubeinfer-node" 2>/dev/null || true
done

# --- containerd with CRI ---
fill "$HERE/node/containerd-config.toml" "$STATE/containerd/config.toml"
start containerd containerd --config "$STATE/containerd/config.toml"
CTR=(ctr --address "$STATE/containerd/containerd.sock" -n k8s.io)
wait_for "containerd" "${CTR[@]}" version

# --- images: the sandbox (pause) image, then the requested ones ---
DOCKER="$("$REPO/images/ensure-docker.sh" | tail -n 1)"
pause_key="$(sha256sum "$HERE/node/pause.c" | cut -c1-16)"
if [[ "$("$DOCKER" image inspect -f '{{ index .Config.Labels "io.kubeinfer.pause-key" }}' "$SANDBOX_IMAGE" 2>/dev/null)" != "$pause_key" ]]; then
  build="$(mktemp -d)"
  gcc -static -O2 -o "$build/pause" "$HERE/node/pause.c"
  tar -C "$build" -c pause | "$DOCKER" import -c 'ENTRYPOINT ["/pause"]' \
    -c "LABEL io.kubeinfer.pause-key=$pause_key" - "$SANDBOX_IMAGE" >/dev/null
  rm -rf "$build"
fi
for ref in "$SANDBOX_IMAGE" "${IMAGES[@]}"; do
  t=$(date +%s)
  id="$("$DOCKER" image inspect -f '{{.Id}}' "$ref")" || fail "image $ref is not in Docker (make images)"
  stamp="$CONTAINERD_ROOT/.kubeinfer-images/$(echo "$ref" | tr '/:' '__')"
  if [[ "$(cat "$stamp" 2>/dev/null)" == "$id" ]] && "${CTR[@]}" images ls -q "name==$ref" | grep -qx "$ref"; then
    say "$ref ($id) is already in the node's containerd"
    continue
  fi
  # The previous version goes first (with its content and snapshots, --sync), so the persistent
  # root holds one version of each image and does not grow with every rebuild.
  if "${CTR[@]}" images ls -q "name==$ref" | grep -qx "$ref"; then
    "${CTR[@]}" images rm --sync "$ref" >/dev/null || fail "removing the previous $ref from the node failed"
  fi
  "$DOCKER" save "$ref" | "${CTR[@]}" images import --snapshotter overlayfs - >/dev/null \
    || fail "loading $ref into the node's containerd failed (free disk: $(df -h --output=avail "$CONTAINERD_ROOT" | tail -n 1))"
  echo "$id" > "$stamp"
  say "loaded $ref in $(( $(date +%s) - t ))s"
done

# --- kubelet ---
NODE_IP="$(ip -4 -o addr show scope global | awk -v br="$BRIDGE" '$2 != br && $2 !~ /^(docker|veth|cni)/ {print $4; exit}' | cut -d/ -f1)"
[[ -n "$NODE_IP" ]] || fail "no non-loopback IPv4 address for --node-ip"
fill "$HERE/node/kubelet-config.yaml" "$STATE/kubelet-config.yaml"
start kubelet "$BIN_DIR/kubelet" \
  --config "$STATE/kubelet-config.yaml" \
  --kubeconfig "$DIR/kubelet.kubeconfig" \
  --hostname-override "$NODE_NAME" \
  --node-ip "$NODE_IP" \
  --node-labels "$NODE_LABELS" \
  --root-dir "$STATE/kubelet" \
  --cert-dir "$STATE/kubelet/pki" \
  --v 1
KUBECTL=("$BIN_DIR/kubectl" --kubeconfig "$DIR/kubeconfig")
node_ready() {
  [[ "$("${KUBECTL[@]}" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
wait_for "node $NODE_NAME Ready" node_ready

# --- kube-proxy (iptables mode) ---
fill "$HERE/node/kube-proxy.yaml" "$STATE/kube-proxy.yaml"
start kube-proxy "$BIN_DIR/kube-proxy" --config "$STATE/kube-proxy.yaml" --v 1
proxy_synced() {  # the kubernetes Service's rule is in place
  iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep -q "default/kubernetes"
}
wait_for "kube-proxy rules" proxy_synced
echo "NODE_IP=$NODE_IP" >> "$DIR/node.env"
say "node $NODE_NAME Ready with kube-proxy in $(( $(date +%s) - START ))s (node IP $NODE_IP, pods on $BRIDGE $POD_SUBNET)"
