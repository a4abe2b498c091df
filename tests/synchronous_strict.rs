//! Replicas die first, then the primary (the sequence that lost 368 acknowledged writes): with
//! `synchronous_strict` writes wait while no replica is live, so when the replicas come back
//! one is promoted and no acknowledged write is missing; without it the primary commits alone
//! meanwhile, so no replica is promoted automatically and the writes resume on the primary
//! once it is back, none missing either.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{check_ledger, writes_configured};
use common::{crash_node, eventually, node_eventually};
use pgpilot::devcluster::DevCluster;

/// Crashes both replicas and waits until pgpilot sees them down.
async fn replicas_die(c: &Arc<DevCluster>, shared: &pgpilot::app::Shared) {
    crash_node(c, 1).await;
    crash_node(c, 2).await;
    eventually(Duration::from_secs(20), "both replicas seen down", || {
        let v = shared.cluster.view();
        async move { !v.nodes[1].healthy && !v.nodes[2].healthy }
    })
    .await;
}

/// Waits until pg1's `synchronous_standby_names` satisfies `ok`.
async fn standby_names_eventually(c: &Arc<DevCluster>, ok: impl Fn(&str) -> bool) {
    let sql = "SHOW synchronous_standby_names";
    node_eventually(c, 0, sql, Duration::from_secs(20), ok).await;
}

async fn restart(c: &Arc<DevCluster>, nodes: &[usize]) {
    for &i in nodes {
        let k = c.clone();
        tokio::task::spawn_blocking(move || k.start_node(i))
            .await
            .expect("start task")
            .unwrap_or_else(|e| panic!("restart node {i}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_writes_wait_for_a_replica_and_a_promotion_loses_none() {
    let (c, proxy, load) = writes_configured(2, |cfg| {
        cfg.cluster.synchronous = true;
        cfg.cluster.synchronous_strict = true;
    })
    .await;
    let shared = proxy.shared.clone();
    replicas_die(&c, &shared).await;
    // The list still names them: commits wait instead of being acknowledged by pg1 alone.
    standby_names_eventually(&c, |v| v.contains("pg2") && v.contains("pg3")).await;
    crash_node(&c, 0).await;
    restart(&c, &[1, 2]).await;
    let new = common::promoted(&shared, Duration::from_secs(30)).await;
    assert_ne!(new, 0);
    eventually(Duration::from_secs(30), "writes on the new primary", || {
        let n = load.served_by(c.port(new));
        async move { n >= 10 }
    })
    .await;
    let reports = load.stop().await;
    let (acked, errors) = check_ledger(&c, new, &reports, 3);
    eprintln!("{acked} writes acknowledged, {errors} errors, none lost");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_strict_no_replica_lacking_commits_is_promoted() {
    let (c, proxy, load) = writes_configured(2, |cfg| cfg.cluster.synchronous = true).await;
    let shared = proxy.shared.clone();
    replicas_die(&c, &shared).await;
    standby_names_eventually(&c, |v| v.trim().is_empty()).await;
    // Commits acknowledged by pg1 alone, which no replica holds.
    let alone = load.served_by(c.port(0));
    eventually(Duration::from_secs(10), "writes on pg1 alone", || {
        let n = load.served_by(c.port(0));
        async move { n >= alone + 10 }
    })
    .await;
    crash_node(&c, 0).await;
    restart(&c, &[1, 2]).await;
    eventually(
        Duration::from_secs(30),
        "pgpilot refusing to promote a replica lacking commits",
        || {
            let refused = shared
                .failover
                .events()
                .iter()
                .any(|e| e.node == "pg1" && e.what.contains("no replica may take over"));
            async move { refused }
        },
    )
    .await;
    assert!(
        shared.failover.history().is_empty(),
        "no promotion: {:?}",
        shared.failover.history()
    );
    // pg1 comes back: the writes resume there with nothing missing.
    restart(&c, &[0]).await;
    let before = load.served_by(c.port(0));
    eventually(Duration::from_secs(30), "writes on pg1 again", || {
        let n = load.served_by(c.port(0));
        async move { n >= before + 10 }
    })
    .await;
    let reports = load.stop().await;
    let (acked, errors) = check_ledger(&c, 0, &reports, 3);
    eprintln!("{acked} writes acknowledged, {errors} errors, none lost");
    assert!(shared.failover.history().is_empty());
    proxy.shutdown().await;
}
