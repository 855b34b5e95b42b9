#!/usr/bin/env bash
# Build the test cluster's metrics stack and link it at <repo>/.cache/metrics-bin.
#
# Builds prometheus and promtool (github.com/prometheus/prometheus, module ./prometheus) and
# KEDA's operator and metrics adapter (github.com/kedacore/keda/v2, module ./keda, as
# keda-operator and keda-adapter); versions are pinned in the go.mod files (two modules:
# their dependency graphs conflict). The binaries live outside the clone in
# $KUBEINFER_CACHE/metrics-bin-<hash>, keyed by the go.mod, go.sum and tools.go files and
# this script, so fresh clones (CI) reuse them; they are rebuilt only when one of
# those changes. Safe to run concurrently (flock). Prometheus is built without its
# embedded web UI (the HTTP API, which is all the tests use, is complete).
#
# Usage: tests/metrics-stack/build.sh      build if needed, print the bin dir
# Env:   KUBEINFER_CACHE (default ~/.cache/kubeinfer), GO_BUILD_JOBS (default 2),
#        BUILD_NICE (default 19: the build runs under `nice -n BUILD_NICE`)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
JOBS="${GO_BUILD_JOBS:-2}"
NICE="${BUILD_NICE:-19}"
KEY="$(cd "$HERE" && cat prometheus/go.mod prometheus/go.sum prometheus/tools.go keda/go.mod keda/go.sum keda/tools.go \
  build.sh | sha256sum | cut -c1-16)"
BIN_REAL="$CACHE_ROOT/metrics-bin-$KEY"
LINK="$REPO/.cache/metrics-bin"

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
exec 9>"$CACHE_ROOT/metrics-bin.lock"
flock 9
if [[ -f "$BIN_REAL/.complete" ]]; then  # another process finished the build while we waited
  link
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: the Go toolchain (go) is required" >&2; exit 1; }
version_of() { (cd "$HERE/$1" && go list -m -f '{{.Version}}' "$2"); }
PROM_MODULE_VERSION="$(version_of prometheus github.com/prometheus/prometheus)"   # v0.3XY.Z is Prometheus 3.XY.Z
PROM_VERSION="3.${PROM_MODULE_VERSION#v0.3}"; PROM_VERSION="${PROM_VERSION/#3.0/3.}"
KEDA_VERSION="$(version_of keda github.com/kedacore/keda/v2)"
STAGE="$BIN_REAL.partial"
rm -rf "$STAGE"
mkdir -p "$STAGE"
start=$(date +%s)

echo "build.sh: building Prometheus $PROM_VERSION, promtool and KEDA $KEDA_VERSION into $STAGE (go build -p $JOBS)" >&2
prom_ldflags="-s -w -X github.com/prometheus/common/version.Version=$PROM_VERSION"
prom_ldflags+=" -X github.com/prometheus/common/version.Branch=release -X github.com/prometheus/common/version.Revision=$PROM_MODULE_VERSION"
(cd "$HERE/prometheus" && nice -n "$NICE" go build -p "$JOBS" -ldflags "$prom_ldflags" -o "$STAGE/" \
  github.com/prometheus/prometheus/cmd/prometheus \
  github.com/prometheus/prometheus/cmd/promtool)
keda_ldflags="-s -w -X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v} -X github.com/kedacore/keda/v2/version.GitCommit=$KEDA_VERSION"
(cd "$HERE/keda" && nice -n "$NICE" go build -p "$JOBS" -ldflags "$keda_ldflags" -o "$STAGE/keda-operator" \
  github.com/kedacore/keda/v2/cmd/operator)
(cd "$HERE/keda" && nice -n "$NICE" go build -p "$JOBS" -ldflags "$keda_ldflags" -o "$STAGE/keda-adapter" \
  github.com/kedacore/keda/v2/cmd/adapter)
# KEDA's CRDs (ScaledObject, ScaledJob, TriggerAuthentication, ...) from the same module version.
keda_dir="$(cd "$HERE/keda" && go list -m -f '{{.Dir}}' github.com/kedacore/keda/v2)"
mkdir -p "$STAGE/keda-crds"
cp "$keda_dir"/config/crd/bases/*.yaml "$STAGE/keda-crds/"
chmod u+w "$STAGE/keda-crds/"*.yaml

for bin in prometheus promtool keda-operator keda-adapter; do
  [[ -x "$STAGE/$bin" ]] || { echo "build.sh: $bin missing after build" >&2; exit 1; }
done
echo "prometheus=$PROM_VERSION keda=$KEDA_VERSION built_in_s=$(( $(date +%s) - start ))" > "$STAGE/.complete"
rm -rf "$BIN_REAL"
mv "$STAGE" "$BIN_REAL"
# Drop binaries of older pins; they are hundreds of MiB.
find "$CACHE_ROOT" -maxdepth 1 -name 'metrics-bin-*' ! -name "metrics-bin-$KEY" ! -name '*.partial' -exec rm -rf {} +
link
