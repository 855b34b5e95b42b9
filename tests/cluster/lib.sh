# Shell helpers shared by the cluster scripts (sourced, not run).

# stop_pidfile FILE: TERM the process group whose leader's pid FILE holds, wait up to 10 s, then
# KILL it; remove FILE. A missing file or a dead process is not an error.
stop_pidfile() {
  local f="$1" pid i
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
