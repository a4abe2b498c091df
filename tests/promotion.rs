//! A promotion done outside pgpilot (the primary crashes, an operator promotes a replica) is
//! followed: writes that arrive meanwhile wait and then run on the new primary, on the same
//! client connections.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, start_cluster, start_proxy};
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_an_external_promotion_on_the_same_connections() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(0, "app", "CREATE TABLE events (id serial PRIMARY KEY, at int); GRANT ALL ON events, events_id_seq TO app")
        .unwrap();
    // pgpilot's own failover is off: this is about following someone else's promotion.
    let proxy = start_proxy(config(&c, |cfg| {
        cfg.cluster.failover = pgpilot::config::FailoverMode::Off;
    }))
    .await;
    let writer = proxy.connect().await;
    let idle = proxy.connect().await;
    let insert = "INSERT INTO events (at) VALUES (inet_server_port()) RETURNING at";
    let port: i32 = writer.query_one(insert, &[]).await.unwrap().get(0);
    assert_eq!(port as u16, c.port(0));
    // Replication is asynchronous here: make sure pg2 has the row before the crash.
    c.wait_replayed(Duration::from_secs(10)).unwrap();

    common::crash_node(&c, 0).await;
    let killed = Instant::now();
    let p = c.clone();
    let promote = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        p.psql(1, "postgres", "SELECT pg_promote()")
    });

    // Issued while there is no primary: it waits, then runs on pg2.
    let port: i32 = writer
        .query_one(insert, &[])
        .await
        .expect("the write waits for the new primary")
        .get(0);
    let waited = killed.elapsed();
    assert_eq!(port as u16, c.port(1), "the write ran on the promoted node");
    promote.await.unwrap().unwrap();
    eprintln!("first write after the crash completed {waited:?} after the kill");

    // The idle connection works too, and writes keep going to pg2.
    let port: i32 = idle.query_one(insert, &[]).await.unwrap().get(0);
    assert_eq!(port as u16, c.port(1));
    let n: i64 = writer
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}
