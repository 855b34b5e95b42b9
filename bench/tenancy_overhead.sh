#!/usr/bin/env bash
# CPU throughput with API keys + tenants + fair admission off vs on, side by side (issue 12).
# Each round starts `kubeinfer-serve` (default catalogue) without keys, benches it, stops it, then
# the same with a keys file of two tenants (fair admission on), alternating ROUNDS times.
# Usage: bench/tenancy_overhead.sh [ROUNDS] [NUM_PROMPTS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
N=${2:-64}
PY=.venv/bin/python
OUT=${OUT:-bench/results/tenancy}
mkdir -p "$OUT"
KEYS="$OUT/keys.yaml"
cat > "$KEYS" <<YAML
tenants:
  - {name: team-a, weight: 1}
  - {name: team-b, weight: 1}
keys:
  - {key: sk-bench-team-a-0001, tenant: team-a}
  - {key: sk-bench-team-b-0001, tenant: team-b}
YAML
PORT=${PORT:-19123}
serve() {  # $1 = off|on
  local extra=()
  [[ $1 == on ]] && extra=(--api-keys-file "$KEYS")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m kubeinfer_serving --host 127.0.0.1 --port "$PORT" --log-level warning \
    "${extra[@]}" & SERVER=$!
  for _ in $(seq 600); do curl -sf "localhost:$PORT/ready" >/dev/null && return; sleep 0.5; done
  echo "server did not start" >&2; exit 1
}
for r in $(seq "$ROUNDS"); do
  for mode in off on; do
    serve "$mode"
    keys=()
    [[ $mode == on ]] && keys=(--api-key sk-bench-team-a-0001 --api-key sk-bench-team-b-0001)
    $PY -m bench.serve_bench --base-url "http://127.0.0.1:$PORT" --num-prompts "$N" "${keys[@]}" \
      --out-dir "$OUT/$mode-$r" | grep -E "output_token_throughput|request_throughput|completed|failed"
    kill -TERM "$SERVER"; wait "$SERVER" || true
  done
done
$PY - "$OUT" "$ROUNDS" <<'PYEOF'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
tp = {m: [json.load(open(f"{out}/{m}-{r}/serve_bench.json"))["output_token_throughput"] for r in range(1, rounds + 1)]
      for m in ("off", "on")}
for m, v in tp.items():
    print(f"{m:>3}: output tok/s per round {[round(x, 1) for x in v]}  median {statistics.median(v):.1f}")
print(f"on/off = {statistics.median(tp['on']) / statistics.median(tp['off']):.3f}")
PYEOF
