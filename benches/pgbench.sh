#!/usr/bin/env bash
# End-to-end throughput, side by side and alternating in one run (A B C D A B C D ...):
#   direct      pgbench straight at the primary
#   pgbouncer   PgBouncer (Debian package, 1.18 on bookworm), transaction pooling,
#               default_pool_size = POOL
#   pgbouncer-1.25  PgBouncer 1.25.2 built from ../shared/peers (or $PGBOUNCER125), the same
#               settings plus max_prepared_statements = 200 (prepared statements in
#               transaction mode)
#   pgpilot     pgpilot, transaction pooling, pool_size = POOL, routing = "primary"
#               (defaults otherwise: pipeline_depth = 8)
#   pgpilot-nopipe  the same with pipeline_depth = 0 (no request shares a connection)
#   pgpilot-rw  pgpilot as above with routing = "auto" (reads spread over the replicas)
# on the demo cluster (loopback only). Prints a table with ratios and each proxy's own CPU
# per transaction (user + system time of its process from /proc/PID/stat over the run,
# divided by the transactions pgbench counted), and writes benches/pgbench.json.
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

# PgBouncer in transaction mode with the same pool size: Debian's, and 1.25 from source.
bouncer=$((base + 2))
bouncer125=$((base + 4))
declare -A pid_of=([pgpilot]=0 [pgpilot-nopipe]=0 [pgpilot-rw]=$demo)
start_bouncer() { # name binary port [extra ini lines]
  local name=$1 bin=$2 port=$3 extra=${4:-}
  printf '"app" "app-secret"\n' >"$work/userlist.txt"
  cat >"$work/$name.ini" <<CONF
[databases]
app = host=127.0.0.1 port=$primary dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $pool
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
logfile = $work/$name.log
pidfile = $work/$name.pid
$extra
CONF
  chown -R postgres: "$work" 2>/dev/null || true
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bin" -q "$work/$name.ini" >/dev/null 2>&1 &
  else "$bin" -q "$work/$name.ini" >/dev/null 2>&1 & fi
  pids+=($!)
}
have_bouncer=0
if command -v pgbouncer >/dev/null 2>&1; then
  have_bouncer=1
  start_bouncer pgbouncer "$(command -v pgbouncer)" "$bouncer"
fi
bin125=${PGBOUNCER125:-}
peers=../shared/peers/build-pgbouncer.sh
if [ -z "$bin125" ] && [ -f "$peers" ]; then
  bin125=$(bash "$peers" "$PWD/target/peers" 2>/dev/null | tail -1) || bin125=
fi
have_bouncer125=0
if [ -n "$bin125" ] && [ -x "$bin125" ]; then
  have_bouncer125=1
  start_bouncer pgbouncer-1.25 "$bin125" "$bouncer125" "max_prepared_statements = 200"
fi
for p in $pilot $nopipe $bouncer $bouncer125; do
  for _ in $(seq 1 100); do psql -h 127.0.0.1 -p "$p" -U app -Atc 'select 1' app >/dev/null 2>&1 && break; sleep 0.1; done
done
pgbench -h 127.0.0.1 -p "$primary" -U app -i -s 10 -q app >/dev/null 2>&1

pid_of[pgpilot]=${pids[0]}
pid_of[pgpilot-nopipe]=${pids[1]}
[ $have_bouncer = 1 ] && pid_of[pgbouncer]=$(cat "$work/pgbouncer.pid" 2>/dev/null || echo 0)
[ $have_bouncer125 = 1 ] && pid_of[pgbouncer-1.25]=$(cat "$work/pgbouncer-1.25.pid" 2>/dev/null || echo 0)
ticks() { # utime + stime of a process, in clock ticks (0 without one)
  [ "${1:-0}" != 0 ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
hz=$(getconf CLK_TCK)
run() { # label port pgbench-args...
  local label=$1 p=$2; shift 2
  local pid=${pid_of[$label]:-0} before after
  before=$(ticks "$pid")
  # A target that cannot run a workload (pgbench exits non-zero) is reported, not fatal.
  out=$(pgbench -h 127.0.0.1 -p "$p" -U app -T "$secs" "$@" app 2>&1 || true)
  after=$(ticks "$pid")
  printf '%s\n' "$out" |
    awk -v n="$label" -v cpu=$((after - before)) -v hz="$hz" -v pid="$pid" \
      '/latency average/ {lat=$4} /^tps/ {tps=$3} /failed transactions/ {f=$5} /aborted/ {a=1}
       /number of transactions actually processed/ {split($0, x, ": "); split(x[2], y, "/"); txns=y[1]}
       END {us = (pid != 0 && txns > 0) ? sprintf("%.1f", cpu / hz * 1e6 / txns) : "-";
            printf "%s %s %s %s %s\n", n, (tps==""?0:tps), (lat==""?0:lat), (a?"aborted":(f==""?"?":f)), us}'
}
targets=("direct $primary")
[ $have_bouncer = 1 ] && targets+=("pgbouncer $bouncer")
[ $have_bouncer125 = 1 ] && targets+=("pgbouncer-1.25 $bouncer125")
targets+=("pgpilot $pilot" "pgpilot-nopipe $nopipe" "pgpilot-rw $base")
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
printf '%-24s %-15s %10s %12s %8s %10s %10s %10s %12s\n' workload target "tps(mean)" "latency ms" failed "vs direct" "vs 1.18" "vs 1.25" "CPU us/txn"
json="["
for w in "${workloads[@]}"; do
  label=${w%%|*}
  mean_of() { # mean TPS, latency and CPU per transaction of target $1 over the rounds
    printf '%s\n' "${results[@]}" | awk -F'|' -v l="$label" '$1 == l {print $2}' |
      awk -v n="$1" '$1 == n {t += $2; l += $3; f = $4; if ($5 != "-") {u += $5; k++}; c++}
                     END {if (c) printf "%.0f %.3f %s %s\n", t/c, l/c, f, (k ? sprintf("%.1f", u/k) : "-"); else print "0 0 - -"}'
  }
  read -r direct_tps _ _ _ < <(mean_of direct)
  read -r bouncer_tps _ _ _ < <(mean_of pgbouncer)
  read -r bouncer125_tps _ _ _ < <(mean_of pgbouncer-1.25)
  for t in "${targets[@]}"; do
    name=${t%% *}
    read -r tps lat failed us < <(mean_of "$name")
    ratio() { awk -v a="$tps" -v b="$1" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "-"}'; }
    printf '%-24s %-15s %10s %12s %8s %10s %10s %10s %12s\n' "$label" "$name" "$tps" "$lat" "$failed" \
      "$(ratio "$direct_tps")" "$(ratio "$bouncer_tps")" "$(ratio "$bouncer125_tps")" "$us"
    cpu=$us; [ "$cpu" = - ] && cpu=null
    json+="{\"workload\":\"$label\",\"target\":\"$name\",\"tps\":$tps,\"latency_ms\":$lat,\"failed\":\"$failed\",\"cpu_us_per_txn\":$cpu},"
  done
done
echo "${json%,}]" >benches/pgbench.json
echo "wrote benches/pgbench.json"
