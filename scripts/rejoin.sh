#!/bin/sh
# Turns a fenced old primary into a streaming replica of the new primary: pgpilot's
# `rejoin_command` for the local devcluster (and a starting point for real deployments).
#
#   rejoin.sh NODE HOST PORT DATA_DIR PRIMARY_HOST PRIMARY_PORT
#
# pgpilot config:
#   rejoin_command = "/path/to/rejoin.sh {node} {host} {port} {data_dir} {primary_host} {primary_port}"
#
# Environment: PGUSER (default postgres, a superuser on the new primary), PGPASSWORD,
# PGBIN (PostgreSQL server binaries; found with pg_config or /usr/lib/postgresql otherwise),
# REJOIN_LOG (server log file; default: NODE.log beside the data directory).
# Run as root, the PostgreSQL commands run as the data directory's owner.
set -eu

[ $# -eq 6 ] || { echo "usage: $0 NODE HOST PORT DATA_DIR PRIMARY_HOST PRIMARY_PORT" >&2; exit 2; }
node=$1 host=$2 port=$3 data=$4 primary_host=$5 primary_port=$6
user=${PGUSER:-postgres}
[ -d "$data" ] || { echo "rejoin: no data directory at '$data'" >&2; exit 1; }

bin=${PGBIN:-}
if [ -z "$bin" ]; then
    bin=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$bin/pg_rewind" ] || bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
[ -x "$bin/pg_rewind" ] || { echo "rejoin: pg_rewind not found; set PGBIN" >&2; exit 1; }
log=${REJOIN_LOG:-$(dirname "$data")/$node.log}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$(stat -c %U "$data")" -- "$@"
    else
        "$@"
    fi
}

source="host=$primary_host port=$primary_port user=$user dbname=postgres"

# Right after a promotion pg_control on the new primary still shows the old timeline, and
# pg_rewind would conclude that no rewind is needed: a checkpoint fixes that.
psql "$source" -XAtqc CHECKPOINT

if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop
fi

# pg_rewind copies the source's configuration files (and removes files the source lacks):
# keep this node's own postgresql.conf outside the data directory meanwhile.
saved=$(mktemp)
trap 'rm -f "$saved"' EXIT
cp "$data/postgresql.conf" "$saved"
as_owner "$bin/pg_rewind" -D "$data" --source-server="$source" --no-sync
cat "$saved" > "$data/postgresql.conf"

slot=$node
psql "$source" -XAtqc "SELECT pg_create_physical_replication_slot('$slot', true)
    WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$slot')" >/dev/null

conninfo="host=$primary_host port=$primary_port user=$user application_name=$node"
[ -n "${PGPASSWORD:-}" ] && conninfo="$conninfo password=$PGPASSWORD"
as_owner sh -c "cat >> '$data/postgresql.auto.conf'" <<CONF
primary_conninfo = '$conninfo'
primary_slot_name = '$slot'
CONF
as_owner touch "$data/standby.signal"
as_owner "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start
echo "rejoin: $node ($host:$port) follows $primary_host:$primary_port"
