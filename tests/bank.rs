//! Bank transfers in explicit transactions through pgpilot while the primary is killed again
//! and again (`synchronous = true`): the total balance never changes, every account agrees
//! with its transfer rows (no transfer half applied), and every acknowledged COMMIT is there.
//! `PGPILOT_BANK_KILLS` sets how many primaries die (default 10).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{config, eventually, start_cluster, start_proxy};
use parking_lot::Mutex;
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

const ACCOUNTS: i32 = 10;
const CLIENTS: i32 = 8;
const OPENING: i64 = 1_000;

const SCHEMA: &str = "CREATE TABLE bank (id int PRIMARY KEY, balance bigint NOT NULL); \
    INSERT INTO bank SELECT g, 1000 FROM generate_series(1, 10) g; \
    CREATE TABLE transfers (client int, seq int, src int, dst int, amount int, \
                            PRIMARY KEY (client, seq)); \
    GRANT ALL ON bank, transfers TO app";

fn kills() -> usize {
    std::env::var("PGPILOT_BANK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[derive(Default)]
struct Tally {
    acked: Mutex<BTreeSet<(i32, i32)>>,
    /// Which kill window each acknowledged transfer committed in (for a failure's report).
    window: Mutex<std::collections::HashMap<(i32, i32), (usize, String)>>,
    kills: AtomicUsize,
    commits: AtomicUsize,
    errors: AtomicUsize,
    /// Notices "there is no transaction in progress" (25P01): a COMMIT that reached a server
    /// outside the client's transaction.
    no_transaction: AtomicUsize,
}

/// One client: transfers between two accounts (updated in id order, so clients never
/// deadlock), one transaction each; a lost connection is opened again.
async fn transfers(info: String, client_id: i32, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut client, mut conn)) =
            tokio_postgres::connect(&info, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let watch = tally.clone();
        tokio::spawn(async move {
            use tokio_postgres::AsyncMessage;
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let AsyncMessage::Notice(n) = m
                    && n.code().code() == "25P01"
                {
                    watch.no_transaction.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while !stop.load(Ordering::Relaxed) && !client.is_closed() {
            seq += 1;
            let a = 1 + (client_id * 7 + seq * 3) % ACCOUNTS;
            let b = 1 + (a + seq % (ACCOUNTS - 1)) % ACCOUNTS;
            let (src, dst) = if seq % 2 == 0 { (a, b) } else { (b, a) };
            let amount = 1 + seq % 50;
            let result = async {
                let tx = client.transaction().await?;
                let (lo, hi) = (src.min(dst), src.max(dst));
                for id in [lo, hi] {
                    let delta = if id == src { -amount } else { amount };
                    tx.execute(
                        "UPDATE bank SET balance = balance + $1::int WHERE id = $2",
                        &[&delta, &id],
                    )
                    .await?;
                }
                tx.execute(
                    "INSERT INTO transfers VALUES ($1, $2, $3, $4, $5)",
                    &[&client_id, &seq, &src, &dst, &amount],
                )
                .await?;
                tx.commit().await
            }
            .await;
            match result {
                Ok(()) => {
                    tally.acked.lock().insert((client_id, seq));
                    let w = tally.kills.load(Ordering::Relaxed);
                    let at = format!("{:?}", std::time::SystemTime::now());
                    tally.window.lock().insert((client_id, seq), (w, at));
                    tally.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The elected primary's index.
fn primary(proxy: &common::TestProxy) -> Option<usize> {
    proxy.shared.cluster.view().primary
}

fn psql(c: &DevCluster, i: usize, sql: &str) -> String {
    c.psql(i, "app", sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A transfer whose server died while its client was idle in it used to be acknowledged:
/// tokio-postgres sends a Close for the dropped INSERT statement before COMMIT and ignores its
/// answer, so the Close took the lost transaction's error and the COMMIT was answered with
/// the ROLLBACK tag, which the driver takes for success. A COMMIT of a lost transaction now
/// fails with `08006`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_primary_kills_without_losing_or_splitting_any() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    psql(&c, 0, SCHEMA);
    let proxy = start_proxy(config(&c, |cfg| {
        cfg.cluster.synchronous = true;
        cfg.databases[0].routing = pgpilot::config::Routing::Primary;
    }))
    .await;
    let shared = proxy.shared.clone();
    common::wait_failover_ready(&shared).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let info = proxy.conninfo(
            pgpilot::demo::DEMO_USER,
            pgpilot::demo::DEMO_PASSWORD,
            pgpilot::demo::DEMO_DATABASE,
        );
        tasks.push(tokio::spawn(transfers(
            info,
            id,
            stop.clone(),
            tally.clone(),
        )));
    }
    let started = Instant::now();
    for kill in 0..kills() {
        // Some commits on this primary first.
        let before = tally.commits.load(Ordering::Relaxed);
        eventually(Duration::from_secs(30), "transfers committing", || {
            let n = tally.commits.load(Ordering::Relaxed);
            async move { n >= before + 40 }
        })
        .await;
        let old = primary(&proxy).expect("a primary");
        let failovers = shared.failover.history().len();
        tally.kills.fetch_add(1, Ordering::Relaxed);
        common::crash_node(&c, old).await;
        eventually(Duration::from_secs(30), "a new primary", || {
            let n = shared.failover.history().len();
            let p = primary(&proxy);
            async move { n > failovers && p.is_some_and(|p| p != old) }
        })
        .await;
        // The old primary comes back, is rewound and follows the new one.
        let k = c.clone();
        tokio::task::spawn_blocking(move || k.start_node(old))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("restart after kill {kill}: {e}"));
        common::wait_rejoined(&shared, old, Duration::from_secs(60)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let p = primary(&proxy).expect("a primary at the end");
    let total: i64 = psql(&c, p, "SELECT sum(balance) FROM bank")
        .parse()
        .unwrap();
    assert_eq!(
        total,
        ACCOUNTS as i64 * OPENING,
        "money appeared or vanished"
    );
    // Every account agrees with its transfer rows: no transfer is half applied.
    let disagree = psql(
        &c,
        p,
        "SELECT count(*) FROM bank b WHERE b.balance <> 1000 \
           - coalesce((SELECT sum(amount) FROM transfers WHERE src = b.id), 0) \
           + coalesce((SELECT sum(amount) FROM transfers WHERE dst = b.id), 0)",
    );
    assert_eq!(disagree, "0", "accounts disagree with their transfers");
    let stored: BTreeSet<(i32, i32)> = psql(&c, p, "SELECT client || ' ' || seq FROM transfers")
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let acked = tally.acked.lock().clone();
    assert_eq!(
        tally.no_transaction.load(Ordering::Relaxed),
        0,
        "COMMITs answered outside their transaction"
    );
    let missing: Vec<_> = acked.difference(&stored).collect();
    let windows: Vec<(usize, String)> = missing
        .iter()
        .filter_map(|k| tally.window.lock().get(k).cloned())
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged transfers lost: {missing:?}, committed before kill {windows:?}; \
         failovers: {:#?}",
        shared.failover.history()
    );
    assert!(
        missing.is_empty(),
        "acknowledged transfers lost: {missing:?}"
    );
    println!(
        "{} kills in {:?}: {} transfers acknowledged, {} stored, {} failed with an error",
        kills(),
        started.elapsed(),
        acked.len(),
        stored.len(),
        tally.errors.load(Ordering::Relaxed),
    );
    proxy.shutdown().await;
}
