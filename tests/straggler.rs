//! A replica that was down during a failover comes back following the old primary, which is
//! gone: pgpilot points it at the new primary, and it streams again.

mod common;

use std::time::Duration;

use common::load::writes;
use common::{crash_node, node_eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_during_a_failover_follows_the_new_primary_when_back() {
    let (c, proxy, load) = writes(1, false).await;
    let shared = proxy.shared.clone();
    crash_node(&c, 2).await;
    crash_node(&c, 0).await;
    let new = common::promoted(&shared, Duration::from_secs(20)).await;
    assert_eq!(new, 1, "pg2 is the only replica left");
    let k = c.clone();
    tokio::task::spawn_blocking(move || k.start_node(2))
        .await
        .expect("start task")
        .expect("restart pg3");
    node_eventually(
        &c,
        1,
        "SELECT application_name || ':' || state FROM pg_stat_replication",
        Duration::from_secs(40),
        |v| v.lines().any(|l| l == "pg3:streaming"),
    )
    .await;
    let events = shared.failover.events();
    assert!(
        events
            .iter()
            .any(|e| e.node == "pg3" && e.what.contains("repointed to it")),
        "{events:?}"
    );
    load.stop().await;
    proxy.shutdown().await;
}
