#!/usr/bin/env bash
# Build the kubeinfer images: kubeinfer-serving (serving/Dockerfile) and kubeinfer-operator
# (operator/Dockerfile), tagged REGISTRY/NAME:VERSION with the package version of pyproject.toml.
#
# Usage: images/build.sh [--push] [serving] [operator]     (default: both)
# Env:   REGISTRY    image name prefix (default kubeinfer.local: a name no registry answers, for
#                    images loaded straight into a node); set it to your registry to push.
#        BASE_IMAGE  base of both images; "local" (default) builds Debian bookworm + Python 3.11
#                    with images/base-image.sh (no Docker Hub needed); e.g. python:3.11-slim.
#        CA_BUNDLE   PEM bundle pip trusts inside the build, passed as a BuildKit secret and never
#                    stored in a layer (default: /etc/ssl/certs/ca-certificates.crt when present).
#        DOCKER      docker client (see ensure-docker.sh).
# Prints one line per image: REF IMAGE_ID SIZE_BYTES. Docker's layer cache keeps rebuilds cheap:
# the dependency layer is rebuilt only when requirements*.lock or pyproject.toml change, pip's
# download cache lives in a BuildKit cache mount.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PUSH=0
WHICH=()
for arg in "$@"; do
  case "$arg" in
    --push) PUSH=1 ;;
    serving|operator) WHICH+=("$arg") ;;
    *) echo "images/build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[[ ${#WHICH[@]} -gt 0 ]] || WHICH=(serving operator)
REGISTRY="${REGISTRY:-kubeinfer.local}"
VERSION="$(python3 -c "import tomllib; print(tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']['version'])")"
DOCKER="$("$HERE/ensure-docker.sh" | tail -n 1)"
BASE_IMAGE="${BASE_IMAGE:-local}"
if [[ "$BASE_IMAGE" == local ]]; then
  BASE_IMAGE="$("$HERE/base-image.sh" | tail -n 1)"
fi
CA_BUNDLE="${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
secret=()
[[ -n "$CA_BUNDLE" && -s "$CA_BUNDLE" ]] && secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")

for name in "${WHICH[@]}"; do
  ref="$REGISTRY/kubeinfer-$name:$VERSION"
  start=$(date +%s)
  echo "images/build.sh: building $ref (base $BASE_IMAGE)" >&2
  log="$(mktemp)"
  if ! DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain \
      --build-arg "BASE_IMAGE=$BASE_IMAGE" "${secret[@]}" \
      --label "org.opencontainers.image.version=$VERSION" --label "io.kubeinfer.image=$name" \
      -f "$REPO/$name/Dockerfile" -t "$ref" "$REPO" >"$log" 2>&1; then
    tail -n 40 "$log" >&2; rm -f "$log"
    echo "images/build.sh: building $ref failed" >&2
    exit 1
  fi
  rm -f "$log"
  # The previous build of this image, now untagged, is only disk: drop it (layers still used stay).
  "$DOCKER" image prune -f --filter "label=io.kubeinfer.image=$name" >/dev/null
  echo "images/build.sh: $ref built in $(( $(date +%s) - start ))s" >&2
  if [[ "$PUSH" == 1 ]]; then
    "$DOCKER" push "$ref" >&2
  fi
  "$DOCKER" image inspect -f "$ref {{.Id}} {{.Size}}" "$ref"
done
