//! Only the proxy loses its route to the primary (a relay in front of pg1 for the proxy's
//! connections is cut) while the replicas keep streaming from it: the replicas still hear
//! from pg1, so nothing is promoted. Writes wait and fail after `failover_wait_timeout` on the
//! same connection, and resume on pg1 once the route is back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::relay::Relay;
use common::{config, eventually, start_cluster, start_proxy};
use pgpilot::config::Dur;
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_only_partition_promotes_nothing() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(
        0,
        "app",
        "CREATE TABLE marks (n int); GRANT ALL ON marks TO app",
    )
    .unwrap();
    let relay = Relay::start(c.port(0)).await;
    let proxy = start_proxy(config(&c, |cfg| {
        cfg.nodes[0].port = relay.port;
        cfg.cluster.failover_timeout = Dur::secs(2);
        cfg.cluster.failover_wait_timeout = Dur::secs(1);
    }))
    .await;
    let shared = proxy.shared.clone();
    common::wait_failover_ready(&shared).await;
    let client = proxy.connect().await;
    client
        .execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();

    relay.cut();
    eventually(Duration::from_secs(10), "the guard to speak", || {
        let events = shared.failover.events();
        async move {
            events
                .iter()
                .any(|e| e.what.contains("still hears from it"))
        }
    })
    .await;
    let err = client
        .execute("INSERT INTO marks VALUES (2)", &[])
        .await
        .expect_err("no primary is reachable");
    assert_eq!(err.code().map(|c| c.code()), Some("57P03"), "{err:?}");
    assert!(!client.is_closed(), "the client stays connected");
    // Past failover_timeout, twice over: still no promotion.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(shared.failover.history().is_empty());
    assert_eq!(shared.cluster.view().epoch, 1);
    for i in 1..3 {
        assert_eq!(
            c.psql(i, "postgres", "SELECT pg_is_in_recovery()").unwrap(),
            "t"
        );
    }

    relay.restore().await;
    eventually(Duration::from_secs(10), "pg1 reachable again", || {
        let v = shared.cluster.view();
        async move { v.primary.is_some() }
    })
    .await;
    client
        .execute("INSERT INTO marks VALUES (3)", &[])
        .await
        .expect("the same connection writes again");
    assert_eq!(
        c.psql(
            0,
            "app",
            "SELECT string_agg(n::text, ',' ORDER BY n) FROM marks"
        )
        .unwrap(),
        "1,3"
    );
    proxy.shutdown().await;
}
