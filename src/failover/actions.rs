//! What the failover controller does to nodes, each over its own short-lived monitor
//! connection: promote, repoint a replica (and create its slot on the new primary), keep
//! `synchronous_standby_names`, tune `wal_receiver_timeout`, read and await WAL positions.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::cluster::monitor::{self, literal, query_value};
use crate::cluster::{Lsn, NodeStatus, Sample};
use crate::config::ClusterConfig;
use crate::conninfo;

const APP: &str = "pgpilot-failover";

async fn connect(cfg: &ClusterConfig, node: &NodeStatus) -> Result<Client, String> {
    monitor::connect(cfg, &node.host, node.port, APP, cfg.probe_timeout.0)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", node.name))
}

async fn exec(client: &Client, sql: &str) -> Result<(), String> {
    client
        .simple_query(sql)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `ALTER SYSTEM SET name = value` and a configuration reload (two statements: ALTER SYSTEM
/// cannot share a query string).
async fn alter_system(client: &Client, name: &str, value: &str) -> Result<(), String> {
    exec(
        client,
        &format!("ALTER SYSTEM SET {name} = {}", literal(value)),
    )
    .await?;
    exec(client, "SELECT pg_reload_conf()").await
}

/// Promotes `node` and returns its first probe as a primary.
pub async fn promote(cfg: &ClusterConfig, node: &NodeStatus) -> Result<Sample, String> {
    let client = connect(cfg, node).await?;
    let wait = cfg.promote_timeout.0.as_secs().max(1);
    let promoted = query_value(&client, &format!("SELECT pg_promote(true, {wait})")).await?;
    if promoted.as_deref() != Some("t") {
        return Err(format!(
            "pg_promote on {} did not finish within {wait}s",
            node.name
        ));
    }
    let sample = Sample::take(&client).await.map_err(|e| e.message)?;
    if sample.in_recovery {
        return Err(format!(
            "{} is still in recovery after pg_promote",
            node.name
        ));
    }
    Ok(sample)
}

/// Points `replica` at `primary`: its `primary_conninfo` keeps everything but the target; a
/// slot it uses is created on the new primary first (reserving WAL at once).
pub async fn repoint(
    cfg: &ClusterConfig,
    replica: &NodeStatus,
    primary: &NodeStatus,
) -> Result<(), String> {
    let client = connect(cfg, replica).await?;
    let current = query_value(&client, "SHOW primary_conninfo")
        .await?
        .unwrap_or_default();
    let slot = query_value(&client, "SHOW primary_slot_name")
        .await?
        .filter(|s| !s.is_empty());
    if let Some(slot) = &slot {
        let p = connect(cfg, primary).await?;
        let name = literal(slot);
        exec(
            &p,
            &format!(
                "SELECT pg_create_physical_replication_slot({name}, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {name})"
            ),
        )
        .await
        .map_err(|e| format!("creating slot {slot} on {}: {e}", primary.name))?;
    }
    let next = conninfo::repoint(&current, &primary.host, primary.port, &replica.name)?;
    alter_system(&client, "primary_conninfo", &next).await
}

/// `synchronous_standby_names` for a primary whose live replicas are `names` (empty: none).
pub fn synchronous_names(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "")))
        .collect();
    format!("ANY 1 ({})", quoted.join(", "))
}

pub async fn set_synchronous_names(
    cfg: &ClusterConfig,
    primary: &NodeStatus,
    value: &str,
) -> Result<(), String> {
    let client = connect(cfg, primary).await?;
    alter_system(&client, "synchronous_standby_names", value).await
}

/// The names of the standbys streaming from `primary` when none of them is synchronous
/// (`None`: one is, or none streams).
pub async fn unmatched_standbys(
    cfg: &ClusterConfig,
    primary: &NodeStatus,
) -> Result<Option<String>, String> {
    let client = connect(cfg, primary).await?;
    let sql = "SELECT string_agg(application_name, ', ' ORDER BY application_name) \
               FROM pg_stat_replication WHERE state = 'streaming' \
               HAVING count(*) > 0 AND count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')) = 0";
    query_value(&client, sql).await
}

pub async fn set_wal_receiver_timeout(
    cfg: &ClusterConfig,
    node: &NodeStatus,
    timeout: Duration,
) -> Result<(), String> {
    let client = connect(cfg, node).await?;
    let value = format!("{}ms", timeout.as_millis());
    alter_system(&client, "wal_receiver_timeout", &value).await
}

/// The primary's current WAL position.
pub async fn current_lsn(cfg: &ClusterConfig, node: &NodeStatus) -> Result<Lsn, String> {
    let client = connect(cfg, node).await?;
    query_value(&client, "SELECT pg_current_wal_lsn()")
        .await?
        .as_deref()
        .and_then(Lsn::parse)
        .ok_or_else(|| format!("no WAL position from {}", node.name))
}

/// Waits until `node` has replayed `lsn`, up to `deadline`.
pub async fn wait_replayed(
    cfg: &ClusterConfig,
    node: &NodeStatus,
    lsn: Lsn,
    deadline: Instant,
) -> Result<(), String> {
    let client = connect(cfg, node).await?;
    let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
    loop {
        if query_value(&client, &sql).await?.as_deref() == Some("t") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{} did not replay {lsn} in time", node.name));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
