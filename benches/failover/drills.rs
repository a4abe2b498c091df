//! The failover bench's fault drills, each on a cluster of its own with one writer every 20 ms:
//! - **priority vs position**: pg2 (the highest-priority replica) is down while pg3 receives
//!   commits; the primary hangs and pg2 comes back behind pg3. Which replica is promoted, and
//!   how many acknowledged writes that a survivor holds are missing on it (must be 0).
//! - **replicas first (strict)**: with `synchronous_strict`, both replicas die, then the
//!   primary; the replicas come back. Writes acknowledged while no replica was live (must be
//!   0), and acknowledged writes missing after the promotion (must be 0).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pgpilot::demo::DEMO_DATABASE;
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

use super::{PERIOD, connect, wait_ready, write};

pub struct Drill {
    pub name: &'static str,
    pub promoted: String,
    /// From the fault that left no primary to the first write acknowledged after it.
    pub resume: Duration,
    pub errors: usize,
    pub acknowledged: usize,
    /// Acknowledged while no replica was live (the strict drill).
    pub acked_alone: Option<usize>,
    /// Acknowledged writes missing on the new primary.
    pub lost: usize,
    /// Of those, the ones another survivor holds.
    pub lost_held: usize,
}

/// Writes `seq` = 1, 2, ... every `PERIOD` until stopped, keeping (seq, when, acknowledged).
struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(i32, Instant, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    async fn start(port: u16) -> Writer {
        let client = connect(port).await;
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<(i32, Instant, bool)>>> = Arc::default();
        let (s, l) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut seq = 0;
            while !s.load(Ordering::Relaxed) {
                seq += 1;
                let ok = write(&client, seq).await.is_ok();
                l.lock().push((seq, Instant::now(), ok));
                tokio::time::sleep(PERIOD).await;
            }
        });
        Writer { stop, log, task }
    }

    fn acked_since(&self, t: Instant) -> usize {
        self.log.lock().iter().filter(|e| e.2 && e.1 >= t).count()
    }

    async fn stop(self) -> Vec<(i32, Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(60), self.task).await;
        std::mem::take(&mut *self.log.lock())
    }
}

async fn until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ledger(c: &DevCluster, i: usize) -> HashSet<i32> {
    c.psql(i, DEMO_DATABASE, "SELECT seq FROM ledger")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A fresh cluster with the ledger, a proxy configured by `tweak`, every node ready.
async fn setup(
    tweak: impl FnOnce(&mut pgpilot::config::Config),
) -> (Arc<DevCluster>, Arc<pgpilot::app::Shared>, u16) {
    let cluster = blocking(|| {
        let c = DevCluster::start(DevClusterOptions::default()).expect("devcluster");
        pgpilot::demo::load_sample_data(&c).expect("sample data");
        c.psql(
            0,
            DEMO_DATABASE,
            "CREATE TABLE ledger (seq int PRIMARY KEY); GRANT ALL ON ledger TO app",
        )
        .expect("ledger");
        Arc::new(c)
    })
    .await;
    let mut config = pgpilot::demo::config_for(&cluster, 0).expect("config");
    config.cluster.rejoin_command = None;
    tweak(&mut config);
    let proxy = pgpilot::app::Proxy::bind(config).await.expect("bind");
    let port = proxy.local_addr().port();
    let shared = proxy.shared().clone();
    tokio::spawn(proxy.serve(std::future::pending()));
    wait_ready(&shared).await;
    (cluster, shared, port)
}

/// Waits for the promotion and for writes to resume, stops the writer, and counts.
async fn finish(
    name: &'static str,
    c: &Arc<DevCluster>,
    shared: &pgpilot::app::Shared,
    writer: Writer,
    fault: Instant,
    acked_alone: Option<usize>,
) -> Drill {
    until("a promotion", Duration::from_secs(60), || {
        !shared.failover.history().is_empty()
    })
    .await;
    let new_name = shared.failover.history()[0].new.clone();
    let new = shared
        .cluster
        .view()
        .index_of(&new_name)
        .expect("promoted node");
    until(
        "writes after the promotion",
        Duration::from_secs(60),
        || writer.acked_since(fault) > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = writer.stop().await;
    let resume = log
        .iter()
        .find(|e| e.2 && e.1 >= fault)
        .map_or(Duration::MAX, |e| e.1 - fault);
    let k = c.clone();
    // The old primary (pg1, crashed or frozen) is not asked.
    let stores: Vec<HashSet<i32>> = blocking(move || {
        (0..3)
            .map(|i| {
                if i == 0 {
                    HashSet::new()
                } else {
                    ledger(&k, i)
                }
            })
            .collect()
    })
    .await;
    let acked: Vec<i32> = log.iter().filter(|e| e.2).map(|e| e.0).collect();
    let missing: Vec<i32> = acked
        .iter()
        .copied()
        .filter(|s| !stores[new].contains(s))
        .collect();
    let lost_held = missing
        .iter()
        .filter(|s| (1..3).any(|i| i != new && stores[i].contains(s)))
        .count();
    Drill {
        name,
        promoted: new_name,
        resume,
        errors: log.iter().filter(|e| !e.2).count(),
        acknowledged: acked.len(),
        acked_alone,
        lost: missing.len(),
        lost_held,
    }
}

pub async fn priority_vs_position() -> Drill {
    let (c, shared, port) = setup(|_| {}).await;
    let writer = Writer::start(port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let k = c.clone();
    blocking(move || k.stop_node(1, "immediate"))
        .await
        .expect("crash pg2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.signal_node(0, "STOP").expect("SIGSTOP pg1");
    let fault = Instant::now();
    let k = c.clone();
    blocking(move || k.start_node(1))
        .await
        .expect("restart pg2");
    let drill = finish("priority vs position", &c, &shared, writer, fault, None).await;
    let _ = c.signal_node(0, "CONT");
    drill
}

pub async fn replicas_first_strict() -> Drill {
    let (c, shared, port) = setup(|cfg| {
        cfg.cluster.synchronous = true;
        cfg.cluster.synchronous_strict = true;
    })
    .await;
    let writer = Writer::start(port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [1, 2] {
        let k = c.clone();
        blocking(move || k.stop_node(i, "immediate"))
            .await
            .expect("crash a replica");
    }
    until("both replicas seen down", Duration::from_secs(30), || {
        let v = shared.cluster.view();
        !v.nodes[1].healthy && !v.nodes[2].healthy
    })
    .await;
    let alone_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_alone = writer.acked_since(alone_since);
    let k = c.clone();
    blocking(move || k.stop_node(0, "immediate"))
        .await
        .expect("crash pg1");
    let fault = Instant::now();
    for i in [1, 2] {
        let k = c.clone();
        blocking(move || k.start_node(i))
            .await
            .expect("restart a replica");
    }
    finish(
        "replicas first (strict)",
        &c,
        &shared,
        writer,
        fault,
        Some(acked_alone),
    )
    .await
}

pub fn print(d: &Drill) {
    println!(
        "{}: {} promoted, writes resumed {:.0} ms after the fault, {} errors, {} acknowledged, {}{} lost ({} of them held by a survivor)",
        d.name,
        d.promoted,
        d.resume.as_secs_f64() * 1000.0,
        d.errors,
        d.acknowledged,
        d.acked_alone
            .map(|n| format!("{n} acknowledged while no replica was live, "))
            .unwrap_or_default(),
        d.lost,
        d.lost_held
    );
}
