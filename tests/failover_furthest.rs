//! The replica holding the most WAL is promoted even when another has a higher priority, with
//! and without `synchronous`: pg2 (priority 90) is down while pg3 (80) keeps receiving
//! commits; pg2 comes back just as the primary hangs, behind pg3. pgpilot promotes pg3, loses
//! no acknowledged write that pg3 holds (with `synchronous`, none at all), and pg2 follows
//! pg3.

mod common;

use std::time::Duration;

use common::load::{check_ledger, synchronous_writes, writes};
use common::{eventually, node_eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_with_every_acknowledged_commit_wins_over_priority() {
    let (c, proxy, load) = synchronous_writes(3).await;
    furthest_wins(c, proxy, load, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_synchronous_the_furthest_replica_still_wins_over_priority() {
    let (c, proxy, load) = writes(3, false).await;
    furthest_wins(c, proxy, load, false).await;
}

async fn furthest_wins(
    c: std::sync::Arc<pgpilot::devcluster::DevCluster>,
    proxy: common::TestProxy,
    load: common::load::WriteLoad,
    synchronous: bool,
) {
    let shared = proxy.shared.clone();
    let pg1 = c.port(0);
    let (pg2, pg3) = (1, 2);
    let view = shared.cluster.view();
    assert!(view.nodes[pg2].priority > view.nodes[pg3].priority);

    // pg2 goes down; commits go on, acknowledged by pg3 alone (ANY 1).
    common::crash_node(&c, pg2).await;
    let before = load.served_by(pg1);
    eventually(
        Duration::from_secs(10),
        "writes acknowledged by pg3 alone",
        || {
            let n = load.served_by(pg1);
            async move { n >= before + 10 }
        },
    )
    .await;
    // The primary hangs, and pg2 comes back with less WAL than pg3 (it cannot catch up from a
    // frozen primary).
    c.signal_node(0, "STOP").unwrap();
    let k = c.clone();
    tokio::task::spawn_blocking(move || k.start_node(pg2))
        .await
        .expect("start task")
        .expect("restart pg2");

    let new = common::promoted(&shared, Duration::from_secs(20)).await;
    assert_eq!(
        new,
        pg3,
        "the replica with the most WAL is promoted: {:?}",
        shared.failover.history()
    );
    eventually(Duration::from_secs(20), "writes on pg3", || {
        let n = load.served_by(c.port(pg3));
        async move { n > 0 }
    })
    .await;
    let reports = load.stop().await;
    if synchronous {
        let (acked, errors) = check_ledger(&c, pg3, &reports, 1);
        eprintln!("{acked} writes acknowledged, {errors} errors");
    }
    // pg2 was behind, so it can follow pg3 on the new timeline.
    node_eventually(
        &c,
        pg3,
        "SELECT application_name || ':' || state FROM pg_stat_replication",
        Duration::from_secs(30),
        |v| v.lines().any(|l| l == "pg2:streaming"),
    )
    .await;
    proxy.shutdown().await;
}
