#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io when dockerd is missing, start
# dockerd in the background when it is not running, and say what was done.
#
# Usage: images/ensure-docker.sh        (prints the docker client to use on stdout's last line)
# Env:   DOCKER (default: /usr/bin/docker when Debian's package is installed, else `docker`)
#        KUBEINFER_CACHE (default ~/.cache/kubeinfer): dockerd's log and pid file live there.
# dockerd is started without systemd (none runs here) and stays up after this script exits;
# `images/stop-docker.sh` stops it again (only a dockerd this script started: it leaves a marker).
set -euo pipefail
CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
mkdir -p "$CACHE_ROOT"
say() { echo "ensure-docker: $*" >&2; }

if ! command -v dockerd >/dev/null 2>&1; then
  [[ $(id -u) == 0 ]] || { say "dockerd is missing and installing it needs root"; exit 1; }
  say "dockerd is missing: installing Debian's docker.io (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends docker.io >&2
fi
# The client that matches Debian's daemon (a newer client elsewhere on PATH also works, but
# this one is known to speak BuildKit's secret mounts to this daemon).
if [[ -z "${DOCKER:-}" ]]; then
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  say "no Docker engine answers: starting dockerd (log: $CACHE_ROOT/dockerd.log)"
  setsid dockerd --pidfile "$CACHE_ROOT/dockerd.pid" >>"$CACHE_ROOT/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" info >/dev/null 2>&1 || { say "dockerd did not come up; last log lines:"; tail -n 20 "$CACHE_ROOT/dockerd.log" >&2; exit 1; }
  say "dockerd is up"
  touch "$CACHE_ROOT/dockerd.started-here"
fi
echo "$DOCKER"
