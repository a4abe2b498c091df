#!/usr/bin/env bash
# Runs the compose stack for real on this machine, with images built locally (no registry):
# a Debian bookworm base from debootstrap (docker import), PostgreSQL 15 from Debian's
# packages on it, and pgpilot's binary built by cargo. Brings up pg1, pg2, pg3, pgpilot and
# the example app, writes through pgpilot, `docker kill`s the primary container, checks that
# writes continue through the same endpoint and that no acknowledged write is lost, restarts
# the old primary and checks that it rejoins as a replica, then tears everything down.
# Prometheus and Grafana are started too when their images are already present locally.
# Prints a one-line summary last. Bounded: each wait has a deadline.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
CACHE=${PGPILOT_IMAGE_CACHE:-/var/tmp/pgpilot-img}
BASE=pgpilot-base:bookworm
PROJECT=pgpilot-test-$$
export PG_IMAGE=pgpilot-postgres:local PGPILOT_IMAGE=pgpilot:local
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export PGPILOT_PORT=$(free_port) PGPILOT_METRICS_PORT=$(free_port)
compose() {
    if docker compose version >/dev/null 2>&1; then docker compose -p "$PROJECT" "$@"; else docker-compose -p "$PROJECT" "$@"; fi
}
say() { printf '\n==> %s\n' "$*"; }
fail() { echo "compose test FAILED: $*" >&2; compose logs --tail=40 >&2 || true; exit 1; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

wait_for() { # seconds description command...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "timed out after ${limit}s waiting for $what"
        sleep 1
    done
}

say "base image $BASE (debootstrap + docker import)"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt-get install -y --no-install-recommends debootstrap >/dev/null
    if [ ! -x "$CACHE/rootfs/bin/bash" ]; then
        rm -rf "$CACHE/rootfs"; mkdir -p "$CACHE"
        debootstrap --variant=minbase --include=ca-certificates bookworm "$CACHE/rootfs" http://deb.debian.org/debian >/dev/null
    fi
    tar -C "$CACHE/rootfs" -c . | docker import - "$BASE" >/dev/null
fi

say "PostgreSQL image $PG_IMAGE"
docker build -q -t "$PG_IMAGE" --build-arg BASE="$BASE" postgres >/dev/null 2>&1 \
    || docker build -t "$PG_IMAGE" --build-arg BASE="$BASE" postgres

say "pgpilot image $PGPILOT_IMAGE (binary from cargo build --release)"
(cd "$ROOT" && cargo build --release --quiet)
mkdir -p bin && cp "$ROOT/target/release/pgpilot" bin/pgpilot
docker build -q -f Dockerfile --target prebuilt -t "$PGPILOT_IMAGE" \
    --build-arg BASE="$BASE" "$ROOT" >/dev/null

services=(pg1 pg2 pg3 pgpilot app)
for extra in prometheus grafana; do
    image=$(sed -n "/^  $extra:/,/image:/s/.*image: *//p" docker-compose.yml)
    docker image inspect "$image" >/dev/null 2>&1 && services+=("$extra")
done
say "docker compose up: ${services[*]}"
compose up -d --no-build "${services[@]}" >/dev/null

export PGPASSWORD=app-secret PGCONNECT_TIMEOUT=5
app() { psql -h 127.0.0.1 -p "$PGPILOT_PORT" -U app app -XAtq "$@"; }
admin() { PGPASSWORD=admin-secret psql -h 127.0.0.1 -p "$PGPILOT_PORT" -U admin pgpilot -XAtF ' ' -c "$1"; }
nodes_up() { [ "$(admin 'SHOW NODES' | awk '$5 == "up" && $8 == "no"' | wc -l)" = 3 ]; }
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q pgpilot)")" = healthy ]; }
wait_for 180 "pgpilot healthy (HEALTHCHECK on /readyz)" healthy
wait_for 120 "three nodes up in SHOW NODES" nodes_up
primary() { admin 'SHOW NODES' | awk '$7 == "yes" { print $1 }'; }
[ "$(primary)" = pg1 ] || fail "pg1 is not the elected primary"
wait_for 60 "the example app writing through pgpilot" app -c 'SELECT 1 FROM visits LIMIT 1'

say "writes through pgpilot, then docker kill pg1"
app -c 'CREATE TABLE ledger (id int PRIMARY KEY, port int)'
acked=$(mktemp)
writer() { # one write every 50 ms on fresh connections, acknowledged ids to $acked
    local i=0
    while [ ! -f "$acked.stop" ] && [ $i -lt 20000 ]; do
        i=$((i + 1))
        if app -c "INSERT INTO ledger VALUES ($i, inet_server_port())" 2>/dev/null; then echo "$i" >> "$acked"; fi
        sleep 0.05
    done
}
writer & writer_pid=$!
wait_for 30 "writes acknowledged" test -s "$acked"
ms() { date +%s%3N; }
docker kill "$(compose ps -q pg1)" >/dev/null
killed=$(ms)
at_kill=$(wc -l < "$acked")
new_primary() { p=$(primary); [ -n "$p" ] && [ "$p" != pg1 ]; }
wait_for 30 "pgpilot to elect a new primary" new_primary
# The first write acknowledged after the kill (polled every 50 ms, 30 s at most).
for _ in $(seq 1 600); do
    [ "$(wc -l < "$acked")" -gt "$at_kill" ] && break
    sleep 0.05
done
[ "$(wc -l < "$acked")" -gt "$at_kill" ] || fail "no write acknowledged within 30s of the kill"
resumed_ms=$(($(ms) - killed))
before=$(wc -l < "$acked")
more_writes() { [ "$(wc -l < "$acked")" -ge $((before + 20)) ]; }
wait_for 30 "writes to keep going through the same endpoint" more_writes
touch "$acked.stop"; wait "$writer_pid" || true
count=$(wc -l < "$acked")
missing=$(comm -23 <(sort "$acked") <(app -c 'SELECT id FROM ledger' | sort) | wc -l)
[ "$missing" = 0 ] || fail "$missing acknowledged writes are missing"

say "restart pg1: it must rejoin as a replica"
compose start pg1 >/dev/null
pg1_replica() { admin 'SHOW NODES' | awk '$1 == "pg1" && $4 == "replica" && $5 == "up" && $8 == "no"' | grep -q pg1; }
wait_for 120 "pg1 to rejoin as a replica" pg1_replica
lag_ok() {
    local n
    n=$(compose exec -T -e PGPASSWORD=postgres-secret pg1 psql -h 127.0.0.1 -U postgres app -XAtc 'SELECT count(*) FROM ledger')
    [ "${n:-0}" -ge "$count" ]
}
wait_for 60 "pg1 to replay the writes made while it was down" lag_ok
app -c 'SELECT count(*) FROM visits' >/dev/null

admin 'SHOW FAILOVERS' | sed 's/^/failover record: /'
echo "compose test passed: $(primary) took over, writes resumed ${resumed_ms} ms after docker kill pg1; $count writes acknowledged, 0 lost; pg1 rejoined as a replica"
