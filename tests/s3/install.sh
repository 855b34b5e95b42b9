#!/usr/bin/env bash
# Installs S3Proxy (org.gaul:s3proxy from Maven Central: a real S3-compatible server that keeps
# objects on the filesystem and checks AWS signatures) for the tests, once per machine:
# ~/.cache/kubeinfer/s3proxy-$VERSION/lib/*.jar, marked complete by .complete. Prints that directory.
# Needs java (17+) and mvn. Usage: tests/s3/install.sh
set -euo pipefail
VERSION=2.6.0
here="$(cd "$(dirname "$0")" && pwd)"
cache="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
dest="$cache/s3proxy-$VERSION"
if [[ -f "$dest/.complete" ]]; then echo "$dest"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/s3proxy.lock"
flock 9
if [[ ! -f "$dest/.complete" ]]; then
  tmp="$(mktemp -d "$cache/s3proxy-$VERSION.partial.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  mvn -B -q -f "$here/pom.xml" -Ds3proxy.version="$VERSION" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp/lib" >&2
  touch "$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
fi
echo "$dest"
