//! One health probe per node over its own tokio-postgres connection, bounded as a whole by
//! `probe_timeout` (tokio-postgres' connect_timeout does not bound a server that accepts and
//! then hangs). Health flips only after `probe_failures` consecutive results the other way;
//! role and WAL positions come from every successful probe. A failed probe says how it failed:
//! a refused or reset connection is a crash, a timeout may be a hang. While a node fails it is
//! probed more often, and anyone can ask for a probe at once (`Cluster::probe_now`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};
use tokio_util::sync::CancellationToken;

use super::{Cluster, Fence, Lsn, Report, monitor};
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
    (SELECT status FROM pg_stat_wal_receiver), \
    (SELECT extract(epoch FROM clock_timestamp() - last_msg_receipt_time) FROM pg_stat_wal_receiver), \
    (SELECT setting FROM pg_settings WHERE name = 'wal_receiver_timeout'), \
    (SELECT conninfo FROM pg_stat_wal_receiver), \
    current_setting('cluster_name'), \
    CASE WHEN pg_is_in_recovery() THEN greatest( \
        (SELECT received_tli FROM pg_stat_wal_receiver), \
        CASE WHEN has_function_privilege('pg_control_checkpoint()', 'EXECUTE') \
            THEN (SELECT timeline_id FROM pg_control_checkpoint()) END, \
        CASE WHEN has_function_privilege('pg_control_recovery()', 'EXECUTE') \
            THEN (SELECT min_recovery_end_timeline FROM pg_control_recovery()) END, \
        CASE WHEN has_function_privilege('pg_ls_waldir()', 'EXECUTE') \
            THEN (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir() \
                  WHERE name ~ '^[0-9A-F]{8}\\.history$') END) END";

/// How a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connection refused or reset, or the server said it is shutting down, starting up or
    /// recovering from a crash: the postmaster or the backend is gone.
    Crash,
    /// No answer within `probe_timeout`: a hang, an overload or a network cut.
    Timeout,
    /// The server refused the monitor role's login (SQLSTATE class 28): it is alive and
    /// answering, so this says nothing about its health, only that probes cannot see it.
    Auth,
    /// Anything else (authentication, an unexpected answer).
    Other,
}

#[derive(Debug, Clone)]
pub struct ProbeError {
    pub kind: FailureKind,
    pub message: String,
    /// When the failed probe was sent.
    pub started: Instant,
}

impl ProbeError {
    fn new(kind: FailureKind, message: impl Into<String>, started: Instant) -> Self {
        ProbeError {
            kind,
            message: message.into(),
            started,
        }
    }

    fn from_pg(e: &tokio_postgres::Error, started: Instant) -> Self {
        // The server's own words (SQLSTATE and message), not just "db error".
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
            None => e.to_string(),
        };
        ProbeError::new(failure_kind(e), message, started)
    }
}

/// Classifies a tokio-postgres error: transport failures and shutdown/startup refusals are
/// crash evidence.
pub fn failure_kind(e: &tokio_postgres::Error) -> FailureKind {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
        {
            FailureKind::Crash
        } else if code.code().starts_with("28") {
            FailureKind::Auth
        } else {
            FailureKind::Other
        };
    }
    if e.is_closed() {
        return FailureKind::Crash;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe
                | UnexpectedEof | NotConnected => FailureKind::Crash,
                TimedOut => FailureKind::Timeout,
                // The node's name no longer resolves: its container or host is gone (the
                // split-brain guard still asks the replicas before anything is promoted).
                _ if io.to_string().contains("failed to lookup address") => FailureKind::Crash,
                _ => FailureKind::Other,
            };
        }
        source = s.source();
    }
    // tokio-postgres reports an EOF in the middle of a message without an io::Error.
    if e.to_string().contains("closed") {
        FailureKind::Crash
    } else {
        FailureKind::Other
    }
}

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
    /// Seconds since the WAL receiver last heard from its primary.
    pub receipt_age: Option<f64>,
    /// The node's `wal_receiver_timeout` in milliseconds (0 = disabled).
    pub wal_receiver_timeout_ms: Option<u64>,
    /// The `application_name` this standby's WAL receiver gives its primary (what
    /// `synchronous_standby_names` must name); `None` when it is not known.
    pub standby_name: Option<String>,
    /// On a standby, the newest timeline it knows to exist: the one it receives, its last
    /// restartpoint's and minimum recovery point's, and the timeline history files in its
    /// `pg_wal` (fetched from the primary it followed). A primary claiming an older timeline
    /// was superseded.
    pub known_timeline: Option<u32>,
    /// When the probe query was sent: every write acknowledged before this is covered by
    /// `current_lsn`.
    pub started: Instant,
    pub duration: Duration,
}

impl Sample {
    /// Runs the probe query on `client`.
    pub async fn take(client: &Client) -> Result<Sample, ProbeError> {
        let started = Instant::now();
        let rows = client
            .simple_query(PROBE_SQL)
            .await
            .map_err(|e| ProbeError::from_pg(&e, started))?;
        let row = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| ProbeError::new(FailureKind::Other, "probe returned no row", started))?;
        Sample::from_row(row, started).map_err(|m| ProbeError::new(FailureKind::Other, m, started))
    }

    /// Whether this standby's WAL receiver heard from its primary recently enough to prove
    /// the primary alive: streaming, and a message within `wal_receiver_timeout` (the receiver
    /// pings an idle primary every half of it). With the timeout disabled, streaming is taken
    /// as proof.
    pub fn hears_primary(&self) -> bool {
        if !self.in_recovery || !self.streaming {
            return false;
        }
        match (self.wal_receiver_timeout_ms, self.receipt_age) {
            (Some(0) | None, _) | (_, None) => true,
            (Some(ms), Some(age)) => age * 1000.0 < ms as f64,
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(in_recovery: bool, lsn: u64) -> Sample {
        Sample {
            in_recovery,
            current_lsn: (!in_recovery).then_some(Lsn(lsn)),
            receive_lsn: in_recovery.then_some(Lsn(lsn)),
            replay_lsn: in_recovery.then_some(Lsn(lsn)),
            replay_timestamp: None,
            timeline: Some(1),
            system_id: Some("7".into()),
            streaming: in_recovery,
            receipt_age: in_recovery.then_some(0.1),
            wal_receiver_timeout_ms: Some(2000),
            standby_name: None,
            known_timeline: None,
            started: Instant::now(),
            duration: Duration::from_millis(1),
        }
    }

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
            receipt_age: col(8).and_then(|v| v.parse().ok()),
            wal_receiver_timeout_ms: col(9).and_then(|v| v.parse().ok()),
            standby_name: col(10).map(|conninfo| reported_name(conninfo, col(11))),
            known_timeline: col(12).and_then(|v| v.parse().ok()),
            started,
            duration: started.elapsed(),
        })
    }
}

/// The `application_name` a WAL receiver connected with, from its `conninfo` as
/// `pg_stat_wal_receiver` shows it (libpq `key=value` pairs, values possibly quoted):
/// `application_name`, else the fallback the receiver set (`cluster_name`, else
/// `walreceiver`).
fn reported_name(conninfo: &str, cluster_name: Option<&str>) -> String {
    let pairs = crate::conninfo::parse(conninfo).unwrap_or_default();
    let value = |key: &str| {
        pairs
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    value("application_name")
        .or_else(|| value("fallback_application_name"))
        .or(cluster_name.filter(|c| !c.is_empty()))
        .unwrap_or("walreceiver")
        .to_owned()
}

pub(super) struct Prober {
    cluster: Arc<Cluster>,
    index: usize,
    client: Option<Client>,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    /// The last probe was refused for authentication (logged once per change).
    auth_failing: bool,
}

impl Prober {
    pub(super) fn new(cluster: Arc<Cluster>, index: usize) -> Self {
        Prober {
            cluster,
            index,
            client: None,
            healthy: false,
            streak: 0,
            auth_failing: false,
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut first = true;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.cluster.wake[self.index].notified() => {}
            }
            let index = self.index;
            let removed = |c: &Cluster| {
                c.view()
                    .nodes
                    .get(index)
                    .is_none_or(|n| n.fenced == Some(Fence::Removed))
            };
            if removed(&self.cluster) {
                return;
            }
            let config = self.cluster.config();
            let started = Instant::now();
            let result = match tokio::time::timeout(
                config.probe_timeout.0,
                self.probe_once(&config),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ProbeError::new(
                    FailureKind::Timeout,
                    "probe timed out",
                    started,
                )),
            };
            // A failing node is probed five times as often: its next state matters most.
            let interval = config.probe_interval.0;
            next = started
                + if result.is_ok() {
                    interval
                } else {
                    interval / 5
                };
            if result.is_err() {
                self.client = None;
            }
            let auth = matches!(&result, Err(e) if e.kind == FailureKind::Auth);
            if auth != self.auth_failing {
                self.auth_failing = auth;
                let name = &self.cluster.view().nodes[self.index].name;
                match &result {
                    Err(e) if auth => tracing::error!(
                        node = %name,
                        error = %e.message,
                        "probes cannot log in as the monitor role (monitor_user / monitor_password): \
                         the node is kept as it was last seen and no failover is based on it"
                    ),
                    _ => tracing::info!(node = %name, "probes log in again"),
                }
            }
            // The first result counts at once: no reason to wait at startup. A refused login
            // proves the server answered: it keeps the node's health as it was.
            let healthy = if auth && !first {
                self.healthy
            } else {
                self.apply_hysteresis(
                    result.is_ok() || auth,
                    std::mem::take(&mut first),
                    config.probe_failures,
                )
            };
            first = false;
            if removed(&self.cluster) {
                return;
            }
            self.cluster.report(self.index, Report { result, healthy });
        }
    }

    fn apply_hysteresis(&mut self, ok: bool, first: bool, failures: u32) -> bool {
        if first || ok == self.healthy {
            self.healthy = ok;
            self.streak = 0;
        } else {
            self.streak += 1;
            if self.streak >= failures.max(1) {
                self.healthy = ok;
                self.streak = 0;
            }
        }
        self.healthy
    }

    async fn probe_once(&mut self, config: &ClusterConfig) -> Result<Sample, ProbeError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let started = Instant::now();
            let node = self.cluster.view().nodes[self.index].clone();
            let client = monitor::connect(
                config,
                &node.host,
                node.port,
                "pgpilot-probe",
                config.probe_timeout.0,
            )
            .await
            .map_err(|e| ProbeError::from_pg(&e, started))?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or_else(|| {
            ProbeError::new(FailureKind::Other, "no probe connection", Instant::now())
        })?;
        Sample::take(client).await
    }
}

#[cfg(test)]
mod tests {
    use super::reported_name;

    #[test]
    fn a_standby_is_known_by_the_name_its_receiver_reports() {
        let shown = "user=rep password=******** dbname=replication host=127.0.0.1 port=5432 \
                     application_name=standby_a fallback_application_name=pg2 sslmode=prefer";
        assert_eq!(reported_name(shown, Some("pg2")), "standby_a");
        let fallback = "user=rep host=127.0.0.1 port=5432 fallback_application_name=pg3";
        assert_eq!(reported_name(fallback, Some("pg3")), "pg3");
        assert_eq!(reported_name("host=a port=1", Some("east")), "east");
        assert_eq!(reported_name("host=a port=1", Some("")), "walreceiver");
        assert_eq!(
            reported_name("host=a application_name='' port=1", None),
            "walreceiver"
        );
    }
}
