#!/usr/bin/env bash
# Start the test control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok with fake GPU nodes, all on loopback with free ports.
#
# Usage: tests/cluster/up.sh [--dir DIR] [--bin BIN_DIR] [--nodes N] [--gpus-per-node G] [--timeout S]
#                            [--real-node [--image REF ...]]
#   --dir    state directory (default <repo>/.cluster); holds kubeconfig, pki/, etcd/, logs/, pids/
#   --bin    binaries from build.sh (default <repo>/.cache/cluster-bin)
#   --nodes  number of fake nodes kwok-node-0..N-1 (default 2)
#   --gpus-per-node  nvidia.com/gpu capacity of each fake node (default 8)
#   --timeout  seconds to wait for each readiness step (default 60)
#   --real-node  also run a real node, real-node-0 (tests/cluster/node-up.sh: containerd + kubelet +
#            kube-proxy, pods on bridge kubeinfer0), loading each --image REF into it. Then the API
#            server also listens on the bridge's gateway address (advertised, so pods reach it
#            through the kubernetes Service), kubelets authenticate as system:node:* (Node
#            authorizer, NodeRestriction), and the fake GPU nodes carry the taint
#            nvidia.com/gpu=present:NoSchedule that ExtendedResourceToleration lets only pods
#            requesting nvidia.com/gpu tolerate: CPU pods run on the real node, GPU pods on kwok's.
# On success DIR/kubeconfig reaches the cluster as a system:masters user, the default
# ServiceAccount exists and every fake node is Ready. On failure the started
# processes are stopped, the log tails are printed and the exit status is 1; the
# logs stay in DIR/logs. Stop with tests/cluster/down.sh --dir DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="$REPO/.cluster"
BIN="$REPO/.cache/cluster-bin"
NODES=2
GPUS=8
TIMEOUT=60
REAL_NODE=0
NODE_IMAGES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --real-node) REAL_NODE=1; shift ;;
    --image) NODE_IMAGES+=(--image "$2"); shift 2 ;;
    *) echo "up.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
BIN="$(cd "$BIN" && pwd -P)"
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
  [[ -x "$BIN/$b" ]] || { echo "up.sh: $BIN/$b missing; run tests/cluster/build.sh" >&2; exit 1; }
done
if compgen -G "$DIR/pids/*.pid" >/dev/null; then
  for f in "$DIR"/pids/*.pid; do
    if kill -0 "$(cat "$f")" 2>/dev/null; then
      echo "up.sh: a cluster is already running in $DIR (stop it with tests/cluster/down.sh --dir $DIR)" >&2
      exit 1
    fi
  done
fi
rm -rf "$DIR/pki" "$DIR/etcd" "$DIR/logs" "$DIR/pids" "$DIR/kubeconfig" "$DIR"/*.kubeconfig "$DIR/node.env"
mkdir -p "$DIR/pki" "$DIR/etcd" "$DIR/logs" "$DIR/pids"
chmod 700 "$DIR/pki" "$DIR/etcd"
PKI="$DIR/pki"
START=$(date +%s)

# The real node's network (fixed: one real node per machine at a time). Pods get addresses of
# POD_SUBNET on bridge BRIDGE, whose address GATEWAY is also where the API server is advertised.
NODE_NAME=real-node-0
BRIDGE=kubeinfer0
POD_CIDR=10.244.0.0/16
POD_SUBNET=10.244.0.0/24
GATEWAY=10.244.0.1
SERVICE_CIDR=10.0.0.0/24
if [[ "$REAL_NODE" == 1 ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
  echo "up.sh: bridge $BRIDGE exists: another real node runs on this machine (stop it with down.sh)" >&2
  exit 1
fi

# Free loopback ports (the kernel picks them; a tiny race with other programs is accepted).
read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KWOK_PORT KUBELET_PORT KUBELET_HEALTHZ_PORT \
  PROXY_METRICS_PORT PROXY_HEALTHZ_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(10):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# --- PKI: CA, API server serving cert, service-account signing key, bearer tokens ---
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubeinfer-test-ca" \
  -keyout "$PKI/ca.key" -out "$PKI/ca.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr"
cat > "$PKI/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:$GATEWAY,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
openssl_quiet x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
  -days 3650 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt"
openssl_quiet genrsa -out "$PKI/sa.key" 2048
openssl_quiet rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"

token() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
ADMIN_TOKEN=$(token); KCM_TOKEN=$(token); SCHED_TOKEN=$(token); KWOK_TOKEN=$(token)
KUBELET_TOKEN=$(token); PROXY_TOKEN=$(token)
# Static tokens (--token-auth-file): token,user,uid,"groups". The controller manager and
# scheduler get the identities the bootstrap RBAC policy binds; admin and kwok are system:masters.
cat > "$PKI/tokens.csv" <<EOF
$ADMIN_TOKEN,kubeinfer-admin,uid-admin,"system:masters"
$KCM_TOKEN,system:kube-controller-manager,uid-kcm
$SCHED_TOKEN,system:kube-scheduler,uid-scheduler
$KWOK_TOKEN,kwok,uid-kwok,"system:masters"
EOF
if [[ "$REAL_NODE" == 1 ]]; then
  # The node's own identities, as kubeadm gives them: the kubelet in group system:nodes (Node
  # authorizer + NodeRestriction), kube-proxy as system:kube-proxy (bootstrap role system:node-proxier).
  cat >> "$PKI/tokens.csv" <<EOF
$KUBELET_TOKEN,system:node:$NODE_NAME,uid-kubelet,"system:nodes"
$PROXY_TOKEN,system:kube-proxy,uid-kube-proxy
EOF
fi
chmod 600 "$PKI"/*.key "$PKI/tokens.csv"

API_URL="https://127.0.0.1:$API_PORT"
write_kubeconfig() {  # file user token
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubeinfer-test
  cluster:
    server: $API_URL
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: kubeinfer-test
  context:
    cluster: kubeinfer-test
    user: $2
    namespace: default
current-context: kubeinfer-test
EOF
  chmod 600 "$1"
}
write_kubeconfig "$DIR/kubeconfig" kubeinfer-admin "$ADMIN_TOKEN"
write_kubeconfig "$DIR/controller-manager.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"
write_kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler "$SCHED_TOKEN"
write_kubeconfig "$DIR/kwok.kubeconfig" kwok "$KWOK_TOKEN"
if [[ "$REAL_NODE" == 1 ]]; then
  write_kubeconfig "$DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" "$KUBELET_TOKEN"
  write_kubeconfig "$DIR/kube-proxy.kubeconfig" system:kube-proxy "$PROXY_TOKEN"
  API_BIND=(--bind-address 0.0.0.0 --advertise-address "$GATEWAY" --endpoint-reconciler-type lease
            --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction,ExtendedResourceToleration)
  NODE_TAINTS="taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]"
else
  API_BIND=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --endpoint-reconciler-type none
            --authorization-mode RBAC)
  NODE_TAINTS="taints: []"
fi
KUBECTL=("$BIN/kubectl" --kubeconfig "$DIR/kubeconfig")

# --- process helpers ---
start() {  # name binary args...: own session (process group), log to logs/name.log
  local name="$1"; shift
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}
fail() {
  echo "up.sh: $*" >&2
  for log in "$DIR"/logs/*.log; do
    echo "----- last lines of $log -----" >&2
    tail -n 25 "$log" >&2
  done
  "$HERE/down.sh" --dir "$DIR" --keep >&2 || true
  exit 1
}
check_alive() {
  local f
  for f in "$DIR"/pids/*.pid; do
    kill -0 "$(cat "$f")" 2>/dev/null || fail "$(basename "$f" .pid) exited during start-up"
  done
}
wait_for() {  # description command...: poll every 0.25 s until the command succeeds
  local what="$1"; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    check_alive
    (( $(date +%s) < deadline )) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.25
  done
}

# --- etcd ---
start etcd "$BIN/etcd" --data-dir "$DIR/etcd/data" \
  --listen-client-url "http://127.0.0.1:$ETCD_PORT" --listen-peer-url "http://127.0.0.1:$ETCD_PEER_PORT"
wait_for "etcd health" python3 - "$ETCD_PORT" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
    sys.exit(0 if json.load(r).get("health") == "true" else 1)
EOF

# --- kube-apiserver ---
start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  "${API_BIND[@]}" --secure-port "$API_PORT" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --token-auth-file "$PKI/tokens.csv" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --allow-privileged \
  --profiling=false \
  --cert-dir "$PKI"
wait_for "kube-apiserver /readyz" "${KUBECTL[@]}" get --raw /readyz

# --- kube-controller-manager and kube-scheduler ---
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$DIR/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --use-service-account-credentials \
  --controllers '*' \
  --leader-elect=false \
  --horizontal-pod-autoscaler-sync-period 5s \
  --concurrent-deployment-syncs 5 --concurrent-replicaset-syncs 5 --concurrent-gc-syncs 10 \
  --profiling=false
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$DIR/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" \
  --leader-elect=false \
  --profiling=false

# --- kwok: fakes the kubelet of every node annotated kwok.x-k8s.io/node=fake ---
start kwok "$BIN/kwok" \
  --kubeconfig "$DIR/kwok.kubeconfig" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --manage-nodes-with-label-selector= \
  --disregard-status-with-annotation-selector kwok.x-k8s.io/status=custom \
  --disregard-status-with-label-selector= \
  --node-ip 10.0.1.1 \
  --cidr 10.0.2.0/24 \
  --node-lease-duration-seconds 40 \
  --server-address "127.0.0.1:$KWOK_PORT"

# --- fake GPU nodes ---
nodes_yaml() {
  local i
  for (( i = 0; i < NODES; i++ )); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: kwok-node-$i
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.count: "$GPUS"
spec:
  $NODE_TAINTS
status:
  capacity: {cpu: "64", memory: 512Gi, pods: "110", ephemeral-storage: 1Ti, nvidia.com/gpu: "$GPUS"}
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", ephemeral-storage: 1Ti, nvidia.com/gpu: "$GPUS"}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: fake
    kubeProxyVersion: fake
EOF
  done
}
nodes_yaml > "$DIR/nodes.yaml"
ready_nodes() {  # succeeds when all NODES fake nodes report Ready=True
  local statuses
  statuses="$("${KUBECTL[@]}" get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')"
  [[ "$(grep -c '^True$' <<<"$statuses")" -eq "$NODES" ]]
}
wait_for "fake node creation" "${KUBECTL[@]}" apply -f "$DIR/nodes.yaml"
wait_for "default ServiceAccount" "${KUBECTL[@]}" -n default get serviceaccount default
wait_for "$NODES Ready fake nodes" ready_nodes
check_alive

cat > "$DIR/env" <<EOF
KUBECONFIG=$DIR/kubeconfig
API_URL=$API_URL
ETCD_URL=http://127.0.0.1:$ETCD_PORT
BIN_DIR=$BIN
EOF
if [[ "$REAL_NODE" == 1 ]]; then
  cat > "$DIR/node.env" <<EOF
NODE_NAME=$NODE_NAME
NODE_LABELS=kubeinfer.io/real-node=true
BRIDGE=$BRIDGE
POD_CIDR=$POD_CIDR
POD_SUBNET=$POD_SUBNET
GATEWAY=$GATEWAY
SERVICE_CIDR=$SERVICE_CIDR
SANDBOX_IMAGE=kubeinfer.local/pause:3.10
KUBELET_PORT=$KUBELET_PORT
KUBELET_HEALTHZ_PORT=$KUBELET_HEALTHZ_PORT
PROXY_METRICS_PORT=$PROXY_METRICS_PORT
PROXY_HEALTHZ_PORT=$PROXY_HEALTHZ_PORT
EOF
  "$HERE/node-up.sh" --dir "$DIR" --timeout "$(( TIMEOUT * 2 ))" "${NODE_IMAGES[@]}" \
    || fail "the real node did not come up (logs in $DIR/node/logs)"
fi
echo "up.sh: cluster healthy in $(( $(date +%s) - START ))s: KUBECONFIG=$DIR/kubeconfig ($API_URL)"
