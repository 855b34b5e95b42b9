#!/usr/bin/env bash
# Build the test control plane's binaries and link them at <repo>/.cache/cluster-bin.
#
# Builds etcd (embedded, ./cmd/etcd), kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, and the real node's kubelet and kube-proxy from this module (k8s.io/kubernetes pinned in go.mod),
# and helm and kwok with `go install pkg@version` (pinned below). The binaries live
# outside the clone in $KUBEINFER_CACHE/cluster-bin-<hash>, keyed by go.mod, go.sum,
# cmd/ and this script, so fresh clones (CI) reuse them; they are rebuilt only when
# one of those changes. Safe to run concurrently (flock).
#
# Usage: tests/cluster/build.sh            build if needed, print the bin dir
# Env:   KUBEINFER_CACHE (default ~/.cache/kubeinfer), GO_BUILD_JOBS (default 2)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

# Pinned versions. The Kubernetes version is also in go.mod (k8s.io/kubernetes and the
# v0.<minor>.<patch> replace lines); keep them in step.
KUBE_VERSION=v1.34.4
HELM_VERSION=v3.19.0
KWOK_VERSION=v0.7.0

CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
JOBS="${GO_BUILD_JOBS:-2}"
KEY="$(cd "$HERE" && cat go.mod go.sum build.sh $(find cmd -type f -name '*.go' | sort) | sha256sum | cut -c1-16)"
BIN_REAL="$CACHE_ROOT/cluster-bin-$KEY"
LINK="$REPO/.cache/cluster-bin"

link() {
  mkdir -p "$REPO/.cache"
  ln -sfn "$BIN_REAL" "$LINK"
  echo "$LINK"
}

if [[ -f "$BIN_REAL/.complete" ]]; then
  link
  exit 0
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/cluster-bin.lock"
flock 9
if [[ -f "$BIN_REAL/.complete" ]]; then  # another process finished the build while we waited
  link
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: the Go toolchain (go) is required" >&2; exit 1; }
STAGE="$BIN_REAL.partial"
rm -rf "$STAGE"
mkdir -p "$STAGE"
start=$(date +%s)

# Version strings the binaries report (kubectl version, /version), as the Kubernetes
# release build sets them.
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

echo "build.sh: building Kubernetes $KUBE_VERSION components and etcd into $STAGE (go build -p $JOBS)" >&2
(cd "$HERE" && go build -p "$JOBS" -ldflags "$ldflags" -o "$STAGE/" \
  ./cmd/etcd \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy)

echo "build.sh: building helm $HELM_VERSION and kwok $KWOK_VERSION" >&2
# Outside any module, so their own go.mod files decide their dependencies.
(cd "$STAGE" && GOBIN="$STAGE" GOFLAGS=-mod=mod go install -p "$JOBS" \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
(cd "$STAGE" && GOBIN="$STAGE" GOFLAGS=-mod=mod go install -p "$JOBS" \
  -ldflags "-s -w" \
  "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")

for bin in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy helm kwok; do
  [[ -x "$STAGE/$bin" ]] || { echo "build.sh: $bin missing after build" >&2; exit 1; }
done
echo "kube=$KUBE_VERSION helm=$HELM_VERSION kwok=$KWOK_VERSION built_in_s=$(( $(date +%s) - start ))" > "$STAGE/.complete"
rm -rf "$BIN_REAL"
mv "$STAGE" "$BIN_REAL"
# Drop binaries of older pins; they are hundreds of MiB each.
find "$CACHE_ROOT" -maxdepth 1 -name 'cluster-bin-*' ! -name "cluster-bin-$KEY" -exec rm -rf {} +
link
