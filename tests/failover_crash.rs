//! The primary crashes under a write load: pgpilot promotes the replica holding the most WAL
//! (pg2 on a tie, by priority), repoints the other, and the writers keep their connections;
//! with `synchronous = true` no acknowledged write is lost. The old primary, started again as it was, is fenced and then rejoined as a
//! replica by the devcluster's rejoin script.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::{LEDGER, WriteLoad, check_ledger};
use common::{config, eventually, start_cluster, start_proxy};
use pgpilot::cluster::Fence;
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_replaced_without_losing_writes_or_clients() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(0, "app", LEDGER).unwrap();
    let proxy = start_proxy(config(&c, |cfg| cfg.cluster.synchronous = true)).await;
    let shared = proxy.shared.clone();
    common::node_eventually(
        &c,
        0,
        "SHOW synchronous_standby_names",
        Duration::from_secs(20),
        |v| v == "ANY 1 (\"pg2\", \"pg3\")",
    )
    .await;
    let idle = proxy.connect().await;
    let load = WriteLoad::start(&proxy, 4, Duration::from_millis(20)).await;
    let pg1 = c.port(0);
    eventually(Duration::from_secs(10), "writes on pg1", || {
        let n = load.served_by(pg1);
        async move { n >= 20 }
    })
    .await;

    common::crash_node(&c, 0).await;
    let killed = Instant::now();
    let new = common::promoted(&shared, Duration::from_secs(15)).await;
    let (new_port, other) = (c.port(new), 3 - new);
    let (new_name, other_name) = (c.nodes()[new].name.clone(), c.nodes()[other].name.clone());
    eventually(Duration::from_secs(15), "writes on the new primary", || {
        let n = load.served_by(new_port);
        async move { n > 0 }
    })
    .await;
    let resumed = killed.elapsed();
    eventually(
        Duration::from_secs(10),
        "more writes on the new primary",
        || {
            let n = load.served_by(new_port);
            async move { n >= 40 }
        },
    )
    .await;
    let reports = load.stop().await;
    let (acked, errors) = check_ledger(&c, new, &reports, 1);
    eprintln!("writes resumed {resumed:?} after the kill; {acked} acknowledged, {errors} errors");

    let view = shared.cluster.view();
    assert_eq!(view.primary, Some(new));
    assert_eq!(view.nodes[0].fenced, Some(Fence::Claim));
    let history = shared.failover.history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        (
            history[0].old.as_deref(),
            history[0].new.as_str(),
            history[0].cause.as_str()
        ),
        (Some("pg1"), new_name.as_str(), "crash")
    );
    eprintln!("failover record: {:?}", history[0]);
    // The idle client's connection survived and writes on the new primary.
    let port: i32 = idle
        .query_one(
            "INSERT INTO ledger VALUES (99, 1) RETURNING inet_server_port()",
            &[],
        )
        .await
        .expect("the idle client still works")
        .get(0);
    assert_eq!(port as u16, new_port);
    // The other replica follows the new primary (it held no WAL the new primary lacks), and
    // the new primary waits for it to acknowledge commits.
    let quorum = format!("{other_name}:quorum");
    common::node_eventually(
        &c,
        new,
        "SELECT application_name || ':' || sync_state FROM pg_stat_replication",
        Duration::from_secs(20),
        |v| v.lines().any(|l| l == quorum),
    )
    .await;

    // The old primary comes back as it was: fenced, then rejoined as the new primary's replica.
    let k = c.clone();
    tokio::task::spawn_blocking(move || k.start_node(0))
        .await
        .unwrap()
        .unwrap();
    common::wait_rejoined(&shared, 0, Duration::from_secs(60)).await;
    let events = || -> Vec<String> {
        shared
            .failover
            .events()
            .into_iter()
            .filter(|e| e.node == "pg1")
            .map(|e| e.what)
            .collect()
    };
    let events = events();
    assert!(
        events.iter().any(|e| e == "rejoin_command succeeded"),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("unfenced")),
        "{events:#?}"
    );
    // Rewound: it holds the writes acknowledged by the new primary, including the idle client's.
    common::node_eventually(
        &c,
        0,
        "SELECT count(*) FROM ledger WHERE writer = 99",
        Duration::from_secs(20),
        |v| v == "1",
    )
    .await;
    proxy.shutdown().await;
}
