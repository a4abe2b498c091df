//! A primary a later one superseded is never elected: pg1 (timeline 1) crashes, pg2 is
//! promoted (timeline 2) and pg3 follows it; then pg2 goes down and pg1 comes back as it was,
//! claiming the role. pgpilot, started now, sees that pg3 knows timeline 2: pg1 is fenced, no
//! primary is elected, and a write through the proxy fails instead of landing on pg1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{config, eventually, node_eventually, start_cluster, start_proxy};
use pgpilot::cluster::Fence;
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_on_a_timeline_a_replica_saw_superseded_is_never_elected() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(
        0,
        "app",
        "CREATE TABLE marks (at text); GRANT ALL ON marks TO app",
    )
    .unwrap();
    c.wait_replayed(Duration::from_secs(10)).unwrap();

    c.stop_node(0, "immediate").unwrap();
    c.psql(1, "postgres", "SELECT pg_promote()").unwrap();
    let slot = c.psql(2, "postgres", "SHOW primary_slot_name").unwrap();
    let create = format!(
        "SELECT pg_create_physical_replication_slot('{}', true)",
        slot.trim()
    );
    c.psql(1, "postgres", &create).unwrap();
    let conninfo = c.psql(2, "postgres", "SHOW primary_conninfo").unwrap();
    let (old, new) = (c.port(0), c.port(1));
    let next = conninfo
        .trim()
        .replace(&format!("port={old}"), &format!("port={new}"));
    assert_ne!(next, conninfo.trim(), "primary_conninfo names pg1's port");
    let alter = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        next.replace('\'', "''")
    );
    c.psql(2, "postgres", &alter).unwrap();
    c.psql(2, "postgres", "SELECT pg_reload_conf()").unwrap();
    node_eventually(
        &c,
        2,
        "SELECT status || ':' || received_tli FROM pg_stat_wal_receiver",
        Duration::from_secs(30),
        |v| v.trim() == "streaming:2",
    )
    .await;
    c.stop_node(1, "immediate").unwrap();
    c.start_node(0).unwrap();
    assert_eq!(
        c.psql(0, "postgres", "SELECT pg_is_in_recovery()")
            .unwrap()
            .trim(),
        "f"
    );

    let proxy = start_proxy(config(&c, |cfg| {
        cfg.cluster.failover_wait_timeout = pgpilot::config::Dur::secs(2);
        cfg.cluster.rejoin_command = None;
    }))
    .await;
    let shared = proxy.shared.clone();
    eventually(Duration::from_secs(15), "pg1 fenced", || {
        let v = shared.cluster.view();
        async move { v.nodes[0].fenced == Some(Fence::Claim) }
    })
    .await;
    let v = shared.cluster.view();
    assert_eq!((v.elected, v.primary), (None, None), "{:?}", v.nodes);
    assert_eq!(v.superseded_by(0), Some(2));
    let events = shared.failover.events();
    assert!(
        events
            .iter()
            .any(|e| e.node == "pg1" && e.what.contains("timeline 2")),
        "the fence says why: {events:?}"
    );

    // No primary: the login fails (57P03), or, described by a replica, the write does.
    match proxy
        .try_connect(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
        .await
    {
        Ok(client) => {
            let err = client
                .batch_execute("INSERT INTO marks VALUES ('through pgpilot')")
                .await
                .expect_err("no primary may take the write");
            eprintln!("the write failed: {err}");
        }
        Err(e) => assert_eq!(
            e.code().map(|c| c.code()),
            Some("57P03"),
            "the login fails for want of a primary: {e:?}"
        ),
    }
    let rows = c.psql(0, "app", "SELECT count(*) FROM marks").unwrap();
    assert_eq!(rows.trim(), "0", "pg1 took no write");
    assert_eq!(shared.cluster.view().elected, None);
    proxy.shutdown().await;
}
