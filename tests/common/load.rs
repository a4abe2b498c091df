//! A write load for failover tests: writers on their own connections through the proxy, each
//! inserting `(writer, seq)` into `ledger` every `period` and keeping what was acknowledged,
//! what failed, and which server port answered.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

use super::TestProxy;

pub const LEDGER: &str = "CREATE TABLE ledger (writer int, seq int, PRIMARY KEY (writer, seq)); \
                          GRANT ALL ON ledger TO app";

#[derive(Debug, Default)]
pub struct WriterReport {
    pub acked: Vec<i32>,
    pub errors: Vec<String>,
    /// The connection was closed under the client.
    pub disconnected: bool,
}

pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<HashMap<u16, usize>>>,
    tasks: Vec<tokio::task::JoinHandle<WriterReport>>,
}

impl WriteLoad {
    pub async fn start(proxy: &TestProxy, writers: i32, period: Duration) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let served: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = proxy.connect().await;
            let (stop, served) = (stop.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let mut report = WriterReport::default();
                let mut seq = 0;
                // Bounded: a test stops it long before this.
                while !stop.load(Ordering::Relaxed) && seq < 100_000 {
                    seq += 1;
                    let insert = "INSERT INTO ledger VALUES ($1, $2) RETURNING inet_server_port()";
                    match client.query_one(insert, &[&w, &seq]).await {
                        Ok(row) => {
                            report.acked.push(seq);
                            let port: i32 = row.get(0);
                            *served.lock().entry(port as u16).or_default() += 1;
                        }
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
                            report.errors.push(format!("{code} {e}"));
                            if client.is_closed() {
                                report.disconnected = true;
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(period).await;
                }
                report
            }));
        }
        WriteLoad {
            stop,
            served,
            tasks,
        }
    }

    /// Acknowledged writes answered by the server on `port`.
    pub fn served_by(&self, port: u16) -> usize {
        self.served.lock().get(&port).copied().unwrap_or(0)
    }

    /// Stops the writers; each must finish its statement within 30 s (none may hang).
    pub async fn stop(self) -> Vec<WriterReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reports = Vec::new();
        for (w, t) in self.tasks.into_iter().enumerate() {
            let report = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .unwrap_or_else(|_| panic!("writer {w} hangs in a statement"));
            reports.push(report.expect("writer task"));
        }
        reports
    }
}

/// A cluster of the test's own with `ledger`, a proxy with `synchronous = true` and no
/// `rejoin_command`, the primary waiting for both replicas, and `writers` writing through the
/// proxy every 20 ms, with 20 writes acknowledged by pg1 already.
pub async fn synchronous_writes(writers: i32) -> (Arc<DevCluster>, TestProxy, WriteLoad) {
    writes(writers, true).await
}

/// Like `synchronous_writes`, with `synchronous` as given.
pub async fn writes(writers: i32, synchronous: bool) -> (Arc<DevCluster>, TestProxy, WriteLoad) {
    writes_configured(writers, |cfg| cfg.cluster.synchronous = synchronous).await
}

/// Like `writes`, with the proxy's config adjusted by `tweak` (after `rejoin_command` is
/// cleared).
pub async fn writes_configured(
    writers: i32,
    tweak: impl FnOnce(&mut pgpilot::config::Config),
) -> (Arc<DevCluster>, TestProxy, WriteLoad) {
    let c = Arc::new(super::start_cluster(DevClusterOptions::default()));
    c.psql(0, "app", LEDGER).expect("create the ledger");
    let proxy = super::start_proxy(super::config(&c, |cfg| {
        cfg.cluster.rejoin_command = None;
        tweak(cfg);
    }))
    .await;
    let synchronous = proxy.shared.config().cluster.synchronous;
    super::wait_failover_ready(&proxy.shared).await;
    if synchronous {
        super::node_eventually(
            &c,
            0,
            "SHOW synchronous_standby_names",
            Duration::from_secs(10),
            |v| v.contains("pg2") && v.contains("pg3"),
        )
        .await;
    }
    let load = WriteLoad::start(&proxy, writers, Duration::from_millis(20)).await;
    let pg1 = c.port(0);
    super::eventually(Duration::from_secs(10), "writes on pg1", || {
        let n = load.served_by(pg1);
        async move { n >= 20 }
    })
    .await;
    (c, proxy, load)
}

/// Asserts that every acknowledged write is on node `i`, that no writer was disconnected and
/// that each saw at most `max_errors` errors; returns (acknowledged, errors).
pub fn check_ledger(
    cluster: &DevCluster,
    i: usize,
    reports: &[WriterReport],
    max_errors: usize,
) -> (usize, usize) {
    let rows = cluster
        .psql(i, "app", "SELECT writer || ':' || seq FROM ledger")
        .expect("read the ledger");
    let stored: BTreeSet<&str> = rows.lines().collect();
    let mut acked = 0;
    for (w, r) in reports.iter().enumerate() {
        assert!(
            !r.disconnected,
            "writer {w} was disconnected: {:?}",
            r.errors
        );
        assert!(
            r.errors.len() <= max_errors,
            "writer {w} saw {} errors: {:?}",
            r.errors.len(),
            r.errors
        );
        for seq in &r.acked {
            assert!(
                stored.contains(format!("{w}:{seq}").as_str()),
                "acknowledged write {w}:{seq} is missing on {}",
                cluster.nodes()[i].name
            );
        }
        acked += r.acked.len();
    }
    (acked, reports.iter().map(|r| r.errors.len()).sum())
}
