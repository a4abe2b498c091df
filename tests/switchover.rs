//! Planned switchover under a write load: new writes wait while in-flight ones drain, the
//! candidate catches up, pg1 is fenced and pg2 promoted; no client sees an error. The old
//! primary rejoins as a replica (devcluster rejoin script) and a switchover back works too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{LEDGER, WriteLoad, check_ledger};
use common::{config, eventually, start_cluster, start_proxy};
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_back_without_client_errors() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(0, "app", LEDGER).unwrap();
    let proxy = start_proxy(config(&c, common::with_admin_users)).await;
    let shared = proxy.shared.clone();
    common::wait_failover_ready(&shared).await;
    let load = WriteLoad::start(&proxy, 4, Duration::from_millis(10)).await;

    for (to, port, old) in [("pg2", c.port(1), 0), ("pg1", c.port(0), 1)] {
        let served = load.served_by(port);
        if to == "pg2" {
            let record = pgpilot::failover::switchover(&shared, Some(to))
                .await
                .unwrap_or_else(|e| panic!("switchover to {to}: {e}"));
            eprintln!("switchover to {to}: {record:?}");
        } else {
            // The way back goes through the admin console, as an operator would.
            let admin = common::admin_client(&proxy, "admin").await;
            common::admin_query(&admin, &format!("SWITCHOVER {to}"))
                .await
                .unwrap_or_else(|e| panic!("SWITCHOVER {to}: {e}"));
        }
        assert_eq!(
            shared.cluster.view().primary().map(|p| p.name.as_str()),
            Some(to)
        );
        eventually(Duration::from_secs(10), "writes on the new primary", || {
            let n = load.served_by(port);
            async move { n >= served + 20 }
        })
        .await;
        // The old primary is rewound into a replica of the new one and unfenced.
        common::wait_rejoined(&shared, old, Duration::from_secs(60)).await;
        common::wait_failover_ready(&shared).await;
    }
    let reports = load.stop().await;
    let (acked, errors) = check_ledger(&c, 0, &reports, 0);
    eprintln!("{acked} writes acknowledged, {errors} errors");
    let history = shared.failover.history();
    assert_eq!(history.len(), 2);
    let admin = common::admin_client(&proxy, "admin").await;
    let (_, rows) = common::admin_query(&admin, "SHOW FAILOVERS").await.unwrap();
    let pairs: Vec<(Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| (r[3].as_deref(), r[4].as_deref()))
        .collect();
    assert_eq!(
        pairs,
        [(Some("pg1"), Some("pg2")), (Some("pg2"), Some("pg1"))]
    );
    assert!(history.iter().all(|r| r.kind == "switchover"));
    assert!(history[1].epoch > history[0].epoch);
    proxy.shutdown().await;
}
