#!/usr/bin/env bash
# Make the local base image: Debian bookworm (minbase) + Python 3.11 with venv, built with
# debootstrap from Debian's mirror and loaded with `docker import`. It stands in for
# python:3.11-slim where Docker Hub cannot be reached; both give `python3` with `venv`.
#
# Usage: images/base-image.sh            prints the image reference on stdout
# Env:   BASE_TAG (default kubeinfer.local/base:bookworm-py311), DEBIAN_MIRROR (default: the
#        machine's own Debian mirror from apt's sources, else http://deb.debian.org/debian),
#        DOCKER (see ensure-docker.sh), KUBEINFER_CACHE.
# Cached: the image carries label io.kubeinfer.base-key = hash of this script; when an image
# with that tag and key exists nothing is built. Safe to run concurrently (flock).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
BASE_TAG="${BASE_TAG:-kubeinfer.local/base:bookworm-py311}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
KEY="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
DOCKER="$("$HERE/ensure-docker.sh" | tail -n 1)"

have() { [[ "$("$DOCKER" image inspect -f '{{ index .Config.Labels "io.kubeinfer.base-key" }}' "$BASE_TAG" 2>/dev/null)" == "$KEY" ]]; }
if have; then echo "$BASE_TAG"; exit 0; fi
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/base-image.lock"
flock 9
if have; then echo "$BASE_TAG"; exit 0; fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "base-image: installing Debian's debootstrap (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
fi
if [[ -z "${DEBIAN_MIRROR:-}" ]]; then
  DEBIAN_MIRROR="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | grep -oE 'https?://[^ ]+' | head -n 1 || true)"
  DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi
ROOTFS="$(mktemp -d "$CACHE_ROOT/base-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
start=$(date +%s)
echo "base-image: debootstrap $SUITE ($PACKAGES) from $DEBIAN_MIRROR" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"
# What a slim image leaves out: package lists, docs, man pages, locales but C.UTF-8.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
  -c "LABEL io.kubeinfer.base-key=$KEY" \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
echo "base-image: $BASE_TAG built in $(( $(date +%s) - start ))s" >&2
echo "$BASE_TAG"
