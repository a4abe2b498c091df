//! pgbench through the proxy: initialisation (DDL, COPY, VACUUM) and 50 clients over a pool of
//! 10 in each query mode for 30 s each (`PGPILOT_PGBENCH_SECS` shortens it for a quick local
//! run), with zero failed transactions.

mod common;

use common::{cluster, config, start_proxy};
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};

/// The tests share one database and each runs `pgbench -i`: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn pgbench(port: u16, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", DEMO_USER])
        .args(args)
        .arg(DEMO_DATABASE)
        .env("PGPASSWORD", DEMO_PASSWORD);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run pgbench"))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn number_after(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pgbench_clients_over_ten_connections_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let secs = std::env::var("PGPILOT_PGBENCH_SECS").unwrap_or_else(|_| "30".to_owned());
    let proxy = start_proxy(config(cluster(), |c| c.proxy.pool_size = 10)).await;
    pgbench(proxy.port(), &["-i", "-s", "2", "-q"]).await;
    for mode in ["prepared", "extended", "simple"] {
        let out = pgbench(
            proxy.port(),
            &["-M", mode, "-c", "50", "-j", "2", "-T", &secs],
        )
        .await;
        let done = number_after(&out, "number of transactions actually processed: ");
        let failed = number_after(&out, "number of failed transactions: ");
        assert!(done > 0, "{mode}: no transactions:\n{out}");
        assert_eq!(failed, 0, "{mode}: failed transactions:\n{out}");
        eprintln!(
            "pgbench -M {mode} -c 50 -j 2 -T {secs} (pool_size 10): {done} transactions, 0 failed"
        );
    }
    let opened: usize = proxy.shared.pools.all().iter().map(|p| p.opened()).sum();
    assert!(
        // Requests that run nothing (the prepares) may also use each pool's small reserve.
        opened <= 3 * (10 + pgpilot::pool::PREPARE_RESERVE),
        "{opened} server connections for three pools of 10"
    );
}

/// `pgbench -i -s 5` and then `-M prepared -c 50 -j 2` over a pool of 10, on a fresh proxy
/// each round: once in three runs this stalled for 30 s. `PGPILOT_STALL_ROUNDS` (default 2)
/// and `PGPILOT_STALL_SECS` (default 10) set the loop; a short `query_wait_timeout` turns a
/// stall into failed transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_prepared_rounds_never_stall() {
    let _serial = SERIAL.lock().await;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, secs) = (
        env("PGPILOT_STALL_ROUNDS", 2),
        env("PGPILOT_STALL_SECS", 10),
    );
    for round in 0..rounds {
        let proxy = start_proxy(config(cluster(), |c| {
            c.proxy.pool_size = 10;
            c.proxy.query_wait_timeout = pgpilot::config::Dur::secs(5);
        }))
        .await;
        pgbench(proxy.port(), &["-i", "-s", "5", "-q"]).await;
        let started = std::time::Instant::now();
        let out = pgbench(
            proxy.port(),
            &[
                "-M",
                "prepared",
                "-c",
                "50",
                "-j",
                "2",
                "-T",
                &secs.to_string(),
            ],
        )
        .await;
        let done = number_after(&out, "number of transactions actually processed: ");
        let failed = number_after(&out, "number of failed transactions: ");
        assert_eq!(failed, 0, "round {round}: failed transactions:\n{out}");
        eprintln!(
            "round {round}: {done} transactions in {:?}, 0 failed",
            started.elapsed()
        );
        proxy.shutdown().await;
    }
}

/// With every replica too far behind to take reads (replay paused under pgbench's writes),
/// pgbench's synchronous prepares must not wait for primary connections held by clients of
/// the same blocked pgbench thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepares_with_every_replica_lagging_never_stall() {
    let _serial = SERIAL.lock().await;
    let secs = std::env::var("PGPILOT_STALL_SECS").unwrap_or_else(|_| "10".to_owned());
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 10;
        c.proxy.query_wait_timeout = pgpilot::config::Dur::secs(5);
        c.cluster.max_replica_lag = pgpilot::config::ByteSize(64 << 10);
    }))
    .await;
    pgbench(proxy.port(), &["-i", "-s", "2", "-q"]).await;
    let c = cluster();
    for i in 1..3 {
        c.psql(i, "postgres", "SELECT pg_wal_replay_pause()")
            .unwrap();
    }
    // Enough WAL that no replica is within max_replica_lag.
    c.psql(
        0,
        "app",
        "UPDATE pgbench_accounts SET filler = filler WHERE aid <= 20000",
    )
    .unwrap();
    let shared = proxy.shared.clone();
    common::eventually(
        std::time::Duration::from_secs(10),
        "replicas over the lag limit",
        || {
            let v = shared.cluster.view();
            async move {
                v.nodes[1..]
                    .iter()
                    .all(|n| n.lag_bytes.is_some_and(|l| l > 64 << 10))
            }
        },
    )
    .await;
    let out = pgbench(
        proxy.port(),
        &["-M", "prepared", "-c", "50", "-j", "2", "-T", &secs],
    )
    .await;
    for i in 1..3 {
        c.psql(i, "postgres", "SELECT pg_wal_replay_resume()")
            .unwrap();
    }
    let failed = number_after(&out, "number of failed transactions: ");
    assert_eq!(failed, 0, "failed transactions:\n{out}");
}
