#!/usr/bin/env bash
# End-to-end throughput: pgbench straight at the primary vs. through pgpilot, alternating
# A B A B, on the demo cluster (loopback only). Prints a table and writes benches/pgbench.json.
#   benches/pgbench.sh [seconds-per-run] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
port=${PGPILOT_BENCH_PORT:-16432}
cargo build --release --quiet
log=$(mktemp)
./target/release/pgpilot demo --port "$port" >"$log" 2>&1 &
demo=$!
trap 'kill -INT $demo 2>/dev/null; wait $demo 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do grep -q "Press Ctrl-C" "$log" && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$log" || { cat "$log"; exit 1; }
primary=$(awk '$1 == "pg1" { split($3, a, ":"); print a[2] }' "$log")
export PGPASSWORD=app-secret
pgbench -h 127.0.0.1 -p "$primary" -U app -i -s 10 -q app >/dev/null 2>&1

run() { # name port extra-args...
  local name=$1 p=$2; shift 2
  pgbench -h 127.0.0.1 -p "$p" -U app -T "$secs" "$@" app 2>/dev/null |
    awk -v n="$name" '/latency average/ {lat=$4} /^tps/ {tps=$3} END {printf "%s %s %s\n", n, tps, lat}'
}
results=()
workloads=("select-only prepared|-S -M prepared -c 8 -j 2" "select-only simple|-S -c 8 -j 2" "tpcb-like|-c 8 -j 2")
for w in "${workloads[@]}"; do
  label=${w%%|*}; args=${w#*|}
  for r in $(seq 1 "$rounds"); do
    # shellcheck disable=SC2086
    results+=("$label|$(run direct "$primary" $args)")
    # shellcheck disable=SC2086
    results+=("$label|$(run pgpilot "$port" $args)")
  done
done
printf '%-24s %-8s %12s %12s\n' workload target tps latency_ms
json="["
for line in "${results[@]}"; do
  label=${line%%|*}; read -r target tps lat <<<"${line#*|}"
  printf '%-24s %-8s %12.0f %12.3f\n' "$label" "$target" "$tps" "$lat"
  json+="{\"workload\":\"$label\",\"target\":\"$target\",\"tps\":$tps,\"latency_ms\":$lat},"
done
echo "${json%,}]" > benches/pgbench.json
echo "wrote benches/pgbench.json"
