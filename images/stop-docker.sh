#!/usr/bin/env bash
# Stop the dockerd that images/ensure-docker.sh started (and only that one: a Docker engine that
# was running before is left alone). Images and the build cache stay on disk for the next start.
# Usage: images/stop-docker.sh     Env: KUBEINFER_CACHE (default ~/.cache/kubeinfer)
set -uo pipefail
CACHE_ROOT="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
[[ -f "$CACHE_ROOT/dockerd.started-here" ]] || exit 0
pid="$(cat "$CACHE_ROOT/dockerd.pid" 2>/dev/null || true)"
if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  echo "stop-docker: stopped the dockerd that make started (pid $pid)" >&2
fi
rm -f "$CACHE_ROOT/dockerd.started-here"
