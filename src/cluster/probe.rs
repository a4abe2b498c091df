//! One health probe per node over its own tokio-postgres connection, bounded as a whole by
//! `probe_timeout` (tokio-postgres' connect_timeout does not bound a server that accepts and
//! then hangs). Health flips only after `probe_failures` consecutive results the other way;
//! role and WAL positions come from every successful probe.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, SimpleQueryRow};
use tokio_util::sync::CancellationToken;

use super::{Cluster, Lsn, Report};
use crate::config::ClusterConfig;

/// One query that works on a primary and on a standby. Functions that fail during recovery
/// sit in CASE branches PostgreSQL does not evaluate there.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END, \
    pg_last_wal_receive_lsn(), \
    pg_last_wal_replay_lsn(), \
    extract(epoch FROM pg_last_xact_replay_timestamp()), \
    CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    (SELECT system_identifier FROM pg_control_system()), \
    (SELECT status FROM pg_stat_wal_receiver)";

/// What one successful probe saw.
#[derive(Debug, Clone)]
pub struct Sample {
    pub in_recovery: bool,
    /// `pg_current_wal_lsn()` on a primary.
    pub current_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// `pg_last_xact_replay_timestamp()` as Unix seconds.
    pub replay_timestamp: Option<f64>,
    pub timeline: Option<u32>,
    pub system_id: Option<String>,
    /// A standby whose WAL receiver is streaming.
    pub streaming: bool,
    /// When the probe query was sent: every write acknowledged before this is covered by
    /// `current_lsn`.
    pub started: Instant,
    pub duration: Duration,
}

impl Sample {
    fn from_row(row: &SimpleQueryRow, started: Instant) -> Result<Sample, String> {
        let col = |i: usize| row.get(i);
        let in_recovery = match col(0) {
            Some("t") => true,
            Some("f") => false,
            other => return Err(format!("unexpected pg_is_in_recovery() value {other:?}")),
        };
        Ok(Sample {
            in_recovery,
            current_lsn: col(1).and_then(Lsn::parse),
            receive_lsn: col(2).and_then(Lsn::parse),
            replay_lsn: col(3).and_then(Lsn::parse),
            replay_timestamp: col(4).and_then(|v| v.parse().ok()),
            timeline: col(5).and_then(|v| v.parse().ok()),
            system_id: col(6).map(str::to_owned),
            streaming: col(7) == Some("streaming"),
            started,
            duration: started.elapsed(),
        })
    }
}

pub(super) struct Prober {
    cluster: Arc<Cluster>,
    index: usize,
    config: ClusterConfig,
    client: Option<Client>,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl Prober {
    pub(super) fn new(cluster: Arc<Cluster>, index: usize, config: ClusterConfig) -> Self {
        Prober {
            cluster,
            index,
            config,
            client: None,
            healthy: false,
            streak: 0,
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.probe_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let result =
                match tokio::time::timeout(self.config.probe_timeout.0, self.probe_once()).await {
                    Ok(Ok(sample)) => Ok(sample),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("probe timed out".to_owned()),
                };
            if result.is_err() {
                self.client = None;
            }
            // The first result counts at once: no reason to wait at startup.
            let healthy = self.apply_hysteresis(result.is_ok(), std::mem::take(&mut first));
            self.cluster.report(self.index, Report { result, healthy });
        }
    }

    fn apply_hysteresis(&mut self, ok: bool, first: bool) -> bool {
        if first || ok == self.healthy {
            self.healthy = ok;
            self.streak = 0;
        } else {
            self.streak += 1;
            if self.streak >= self.config.probe_failures.max(1) {
                self.healthy = ok;
                self.streak = 0;
            }
        }
        self.healthy
    }

    async fn probe_once(&mut self) -> Result<Sample, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let node = self.cluster.view().nodes[self.index].clone();
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(&node.host)
                .port(node.port)
                .user(&self.config.monitor_user)
                .dbname(&self.config.monitor_database)
                .application_name("pgpilot-probe")
                .connect_timeout(self.config.probe_timeout.0);
            if let Some(pw) = &self.config.monitor_password {
                cfg.password(pw);
            }
            let (client, connection) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("no probe connection")?;
        let started = Instant::now();
        let rows = client
            .simple_query(PROBE_SQL)
            .await
            .map_err(|e| e.to_string())?;
        let row = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or("probe returned no row")?;
        Sample::from_row(row, started)
    }
}
