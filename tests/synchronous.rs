//! `synchronous = true` with replicas that stream under names of their own (their
//! `primary_conninfo` sets an `application_name` that is not their node name): the list pgpilot
//! writes names what the standbys report, so commits are acknowledged by a standby instead of
//! waiting for ever.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{config, eventually, start_cluster, start_proxy};
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

fn psql(c: &DevCluster, i: usize, sql: &str) -> String {
    c.psql(i, "postgres", sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn psql_async(c: &Arc<DevCluster>, i: usize, sql: &str) -> String {
    let (c, sql) = (c.clone(), sql.to_owned());
    tokio::task::spawn_blocking(move || psql(&c, i, &sql))
        .await
        .expect("psql task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_names_are_the_ones_the_standbys_report() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    for (i, name) in [(1, "standby_a"), (2, "standby_b")] {
        let conninfo = psql(&c, i, "SHOW primary_conninfo");
        let next = format!("{conninfo} application_name='{name}'");
        psql(
            &c,
            i,
            &format!(
                "ALTER SYSTEM SET primary_conninfo = '{}'",
                next.replace('\'', "''")
            ),
        );
        psql(&c, i, "SELECT pg_reload_conf()");
    }
    let reported = "SELECT count(*) FROM pg_stat_replication \
                    WHERE state = 'streaming' AND application_name IN ('standby_a', 'standby_b')";
    eventually(
        Duration::from_secs(30),
        "both standbys streaming under their own names",
        || {
            let c = c.clone();
            async move { psql_async(&c, 0, reported).await == "2" }
        },
    )
    .await;

    let proxy = start_proxy(config(&c, |cfg| cfg.cluster.synchronous = true)).await;
    eventually(
        Duration::from_secs(30),
        "the reported names in synchronous_standby_names",
        || {
            let c = c.clone();
            async move {
                psql_async(&c, 0, "SHOW synchronous_standby_names").await
                    == r#"ANY 1 ("standby_a", "standby_b")"#
            }
        },
    )
    .await;
    let synchronous = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'";
    eventually(
        Duration::from_secs(30),
        "both standbys in the quorum",
        || {
            let c = c.clone();
            async move { psql_async(&c, 0, synchronous).await == "2" }
        },
    )
    .await;

    // A commit a standby acknowledges; one that matched no standby would wait for ever.
    let client = proxy.connect().await;
    let write =
        client.batch_execute("CREATE TABLE sync_names (v int); INSERT INTO sync_names VALUES (1)");
    tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("the commit waited for a standby the list does not name")
        .expect("write");
    proxy.shutdown().await;
}
