#!/usr/bin/env bash
# End-to-end throughput, side by side and alternating in one run (A B C D A B C D ...):
#   direct      pgbench straight at the primary
#   pgbouncer   PgBouncer (Debian package), transaction pooling, default_pool_size = POOL
#   pgpilot     pgpilot, transaction pooling, pool_size = POOL, routing = "primary"
#               (defaults otherwise: pipeline_depth = 8)
#   pgpilot-nopipe  the same with pipeline_depth = 0 (no request shares a connection)
#   pgpilot-rw  pgpilot as above with routing = "auto" (reads spread over the replicas)
# on the demo cluster (loopback only). Prints a table with ratios and writes
# benches/pgbench.json.
#   benches/pgbench.sh [seconds-per-run] [rounds]
# PGBENCH_ONLY=<workload label prefix> runs only the matching workloads (e.g. select-only).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
pool=20
clients=32
base=${PGPILOT_BENCH_PORT:-16432}
cargo build --release --quiet
work=$(mktemp -d)
chmod 755 "$work"
log=$work/demo.log
./target/release/pgpilot demo --port "$base" >"$log" 2>&1 &
demo=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill -INT "$demo" 2>/dev/null || true
  wait "$demo" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 600); do grep -q "Press Ctrl-C" "$log" && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$log" || { cat "$log"; exit 1; }
port_of() { awk -v n="$1" '$1 == n { split($3, a, ":"); print a[2] }' "$log"; }
primary=$(port_of pg1)
export PGPASSWORD=app-secret

# pgpilot, routing to the primary only (the like-for-like comparison with PgBouncer).
pilot=$((base + 1))
cat >"$work/pgpilot.toml" <<CONF
[proxy]
listen = "127.0.0.1:$pilot"
pool_size = $pool
[cluster]
monitor_password = "pgpilot-dev"
[[users]]
name = "app"
password = "app-secret"
[[databases]]
name = "app"
routing = "primary"
CONF
for n in pg1 pg2 pg3; do
  printf '[[nodes]]\nname = "%s"\nhost = "127.0.0.1"\nport = %s\n' "$n" "$(port_of $n)" >>"$work/pgpilot.toml"
done
RUST_LOG=warn ./target/release/pgpilot --config "$work/pgpilot.toml" >"$work/pgpilot.log" 2>&1 &
pids+=($!)
nopipe=$((base + 3))
sed -e "s/^listen = .*/listen = \"127.0.0.1:$nopipe\"/" -e "s/^pool_size = .*/&\npipeline_depth = 0/" \
  "$work/pgpilot.toml" >"$work/nopipe.toml"
RUST_LOG=warn ./target/release/pgpilot --config "$work/nopipe.toml" >"$work/nopipe.log" 2>&1 &
pids+=($!)

# PgBouncer in transaction mode with the same pool size.
bouncer=$((base + 2))
have_bouncer=0
if command -v pgbouncer >/dev/null 2>&1; then
  have_bouncer=1
  printf '"app" "app-secret"\n' >"$work/userlist.txt"
  cat >"$work/pgbouncer.ini" <<CONF
[databases]
app = host=127.0.0.1 port=$primary dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $pool
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
CONF
  chown -R postgres: "$work" 2>/dev/null || true
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- pgbouncer -q "$work/pgbouncer.ini" >/dev/null 2>&1 &
  else pgbouncer -q "$work/pgbouncer.ini" >/dev/null 2>&1 & fi
  pids+=($!)
fi
for p in $pilot $nopipe $bouncer; do
  for _ in $(seq 1 100); do psql -h 127.0.0.1 -p "$p" -U app -Atc 'select 1' app >/dev/null 2>&1 && break; sleep 0.1; done
done
pgbench -h 127.0.0.1 -p "$primary" -U app -i -s 10 -q app >/dev/null 2>&1

run() { # label port pgbench-args...
  local label=$1 p=$2; shift 2
  # A target that cannot run a workload (pgbench exits non-zero) is reported, not fatal.
  { pgbench -h 127.0.0.1 -p "$p" -U app -T "$secs" "$@" app 2>&1 || true; } |
    awk -v n="$label" '/latency average/ {lat=$4} /^tps/ {tps=$3} /failed transactions/ {f=$5} /aborted/ {a=1}
                       END {printf "%s %s %s %s\n", n, (tps==""?0:tps), (lat==""?0:lat), (a?"aborted":(f==""?"?":f))}'
}
targets=("direct $primary" "pgpilot $pilot" "pgpilot-nopipe $nopipe" "pgpilot-rw $base")
[ $have_bouncer = 1 ] && targets=("direct $primary" "pgbouncer $bouncer" "pgpilot $pilot" "pgpilot-nopipe $nopipe" "pgpilot-rw $base")
workloads=(
  "select-only|-S -c $clients -j 2"
  "select-only extended|-S -M extended -c $clients -j 2"
  "select-only prepared|-S -M prepared -c $clients -j 2"
  "tpcb-like|-c $clients -j 2"
  "connect storm -C -S|-C -S -c 8 -j 2"
)
if [ -n "${PGBENCH_ONLY:-}" ]; then
  kept=()
  for w in "${workloads[@]}"; do [[ $w == "$PGBENCH_ONLY"* ]] && kept+=("$w"); done
  workloads=("${kept[@]}")
fi
results=()
for w in "${workloads[@]}"; do
  label=${w%%|*}; args=${w#*|}
  for _ in $(seq 1 "$rounds"); do
    for t in "${targets[@]}"; do
      # shellcheck disable=SC2086
      results+=("$label|$(run ${t%% *} ${t##* } $args)")
    done
  done
done

printf '\nmachine: %s cores, %s; PostgreSQL %s; %ss per run, %s rounds, %s clients, pool %s\n' \
  "$(nproc)" "$(uname -m)" "$(pgbench --version | awk '{print $3}')" "$secs" "$rounds" "$clients" "$pool"
printf '%-24s %-15s %10s %12s %8s %10s %10s\n' workload target "tps(mean)" "latency ms" failed "vs direct" "vs bouncer"
json="["
for w in "${workloads[@]}"; do
  label=${w%%|*}
  mean_of() {
    printf '%s\n' "${results[@]}" | awk -F'|' -v l="$label" '$1 == l {print $2}' |
      awk -v n="$1" '$1 == n {t += $2; l += $3; f = $4; c++} END {if (c) printf "%.0f %.3f %s\n", t/c, l/c, f; else print "0 0 -"}'
  }
  read -r direct_tps _ _ < <(mean_of direct)
  read -r bouncer_tps _ _ < <(mean_of pgbouncer)
  for t in "${targets[@]}"; do
    name=${t%% *}
    read -r tps lat failed < <(mean_of "$name")
    ratio() { awk -v a="$tps" -v b="$1" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "-"}'; }
    printf '%-24s %-15s %10s %12s %8s %10s %10s\n' "$label" "$name" "$tps" "$lat" "$failed" "$(ratio "$direct_tps")" "$(ratio "$bouncer_tps")"
    json+="{\"workload\":\"$label\",\"target\":\"$name\",\"tps\":$tps,\"latency_ms\":$lat,\"failed\":\"$failed\"},"
  done
done
echo "${json%,}]" >benches/pgbench.json
echo "wrote benches/pgbench.json"
