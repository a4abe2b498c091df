#!/bin/bash
# Entry point of a PostgreSQL container in the compose stack (works on the official
# postgres:15 image and on compose/postgres/Dockerfile's image).
#
# First boot: the initial primary runs initdb and creates the application's role and
# database; the others wait for the primary (the one pgpilot reports elected, else the
# initial primary) and clone it with pg_basebackup (own slot, `cluster_name` = node name).
# Restart: a node that was a primary asks pgpilot's admin console (`SHOW NODES`) who is the
# elected primary now; if it is another node, this one is rewound (pg_rewind) and rejoins as
# its replica instead of coming back as a second primary.
set -euo pipefail

: "${NODE_NAME:?set NODE_NAME}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
INITIAL_PRIMARY=${INITIAL_PRIMARY:-pg1}
PGPILOT_HOST=${PGPILOT_HOST:-pgpilot}
PGPILOT_PORT=${PGPILOT_PORT:-6432}
PGPILOT_ADMIN_USER=${PGPILOT_ADMIN_USER:-admin}
PGPILOT_ADMIN_PASSWORD=${PGPILOT_ADMIN_PASSWORD:-}
APP_USER=${APP_USER:-app} APP_PASSWORD=${APP_PASSWORD:-app-secret} APP_DB=${APP_DB:-app}
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGPASSWORD=$POSTGRES_PASSWORD PGCONNECT_TIMEOUT=3
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
export PATH=$BIN:$PATH

log() { echo "node.sh[$NODE_NAME]: $*" >&2; }
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}

# "name host port" of the primary pgpilot has elected, or nothing.
elected() {
    [ -n "$PGPILOT_ADMIN_PASSWORD" ] || return 0
    PGPASSWORD=$PGPILOT_ADMIN_PASSWORD psql -h "$PGPILOT_HOST" -p "$PGPILOT_PORT" \
        -U "$PGPILOT_ADMIN_USER" -d pgpilot -XAtF ' ' -c 'SHOW NODES' 2>/dev/null \
        | awk '$7 == "yes" { print $1, $2, $3 }' || true
}

sql() { # host port sql
    psql -h "$1" -p "$2" -U postgres -d postgres -XAtqc "$3"
}

ensure_slot() { # host port
    sql "$1" "$2" "SELECT pg_create_physical_replication_slot('$NODE_NAME', true)
        WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$NODE_NAME')" >/dev/null
}

follow() { # host port: primary_conninfo and slot for a standby of host:port
    cat >> "$PGDATA/postgresql.auto.conf" <<CONF
primary_conninfo = 'host=$1 port=$2 user=postgres password=$POSTGRES_PASSWORD application_name=$NODE_NAME'
primary_slot_name = '$NODE_NAME'
CONF
    touch "$PGDATA/standby.signal"
}

init_primary() {
    log "initdb (first boot of the initial primary)"
    local pw; pw=$(mktemp); echo "$POSTGRES_PASSWORD" > "$pw"; chown postgres "$pw"
    as_pg initdb -D "$PGDATA" -U postgres --auth=scram-sha-256 --pwfile="$pw" -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pw"
    cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
wal_keep_size = '256MB'
cluster_name = '$NODE_NAME'
CONF
    cat >> "$PGDATA/pg_hba.conf" <<HBA
host all all 0.0.0.0/0 scram-sha-256
host replication all 0.0.0.0/0 scram-sha-256
HBA
    as_pg pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    as_pg psql -h /var/run/postgresql -U postgres -d postgres -XAtq \
        -c "CREATE ROLE \"$APP_USER\" LOGIN PASSWORD '$APP_PASSWORD'" \
        -c "CREATE DATABASE \"$APP_DB\" OWNER \"$APP_USER\""
    as_pg pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
}

clone() {
    local target host port
    for _ in $(seq 1 120); do
        target=$(elected)
        [ -n "$target" ] || target="$INITIAL_PRIMARY $INITIAL_PRIMARY 5432"
        read -r _ host port <<<"$target"
        pg_isready -q -h "$host" -p "$port" && break
        sleep 1
    done
    log "pg_basebackup from $host:$port"
    ensure_slot "$host" "$port"
    as_pg pg_basebackup -h "$host" -p "$port" -U postgres -D "$PGDATA" -X stream -S "$NODE_NAME" >/dev/null
    echo "cluster_name = '$NODE_NAME'" >> "$PGDATA/postgresql.conf"
    follow "$host" "$port"
}

rejoin() { # name host port
    log "pgpilot elected $1: rewinding and rejoining as its replica"
    sql "$2" "$3" CHECKPOINT >/dev/null
    local saved; saved=$(mktemp)
    cp "$PGDATA/postgresql.conf" "$saved"
    as_pg pg_rewind -D "$PGDATA" --source-server="host=$2 port=$3 user=postgres dbname=postgres"
    cat "$saved" > "$PGDATA/postgresql.conf"
    rm -f "$saved"
    ensure_slot "$2" "$3"
    follow "$2" "$3"
}

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    target=$(elected)
    if [ -z "$target" ] && [ "$NODE_NAME" = "$INITIAL_PRIMARY" ]; then
        init_primary
    else
        clone
    fi
elif [ ! -f "$PGDATA/standby.signal" ]; then
    target=$(elected)
    if [ -n "$target" ]; then
        read -r name host port <<<"$target"
        if [ "$name" != "$NODE_NAME" ]; then
            rejoin "$name" "$host" "$port"
        fi
    fi
fi
log "starting PostgreSQL"
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA"
