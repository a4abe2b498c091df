//! Lagging replicas and read-your-writes, on a cluster of this binary's own (the tests pause
//! WAL replay on the replicas, so they run one at a time).

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{config, start_cluster, start_proxy};
use pgpilot::config::{ByteSize, ReadYourWrites};
use pgpilot::devcluster::{DevCluster, DevClusterOptions};
use tokio_postgres::Client;

fn cluster() -> &'static DevCluster {
    static CLUSTER: OnceLock<DevCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| start_cluster(DevClusterOptions::default()))
}

/// These tests pause replay on shared replicas: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn read_port(client: &Client) -> u16 {
    let row = client
        .query_one("SELECT inet_server_port()::int", &[])
        .await
        .unwrap();
    row.get::<_, i32>(0) as u16
}

/// Inserts each id and reads it straight back; returns how many reads saw their row.
async fn write_then_read(client: &Client, ids: std::ops::Range<i32>) -> i64 {
    let mut seen = 0;
    for i in ids {
        client
            .execute("INSERT INTO ryw VALUES ($1)", &[&i])
            .await
            .unwrap();
        let row = client
            .query_one("SELECT count(*) FROM ryw WHERE id = $1", &[&i])
            .await
            .unwrap();
        seen += row.get::<_, i64>(0);
    }
    seen
}

fn replay(i: usize, resume: bool) {
    let f = if resume {
        "pg_wal_replay_resume()"
    } else {
        "pg_wal_replay_pause()"
    };
    cluster()
        .psql(i, "postgres", &format!("SELECT {f}"))
        .unwrap();
}

#[tokio::test]
async fn a_replica_behind_max_replica_lag_gets_no_reads_until_it_catches_up() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.psql(
        0,
        "app",
        "CREATE TABLE IF NOT EXISTS filler (id int, pad text); GRANT ALL ON filler TO app",
    )
    .unwrap();
    let proxy = start_proxy(config(c, |cfg| {
        cfg.cluster.max_replica_lag = ByteSize(64 << 10)
    }))
    .await;
    let client = proxy.connect().await;
    let (pg2, pg3) = (c.port(1), c.port(2));

    replay(1, false);
    c.psql(
        0,
        "app",
        "INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g",
    )
    .unwrap();
    let shared = proxy.shared.clone();
    common::eventually(Duration::from_secs(10), "pg2's lag over the limit", || {
        let v = shared.cluster.view();
        async move {
            v.nodes[1].lag_bytes.is_some_and(|l| l > 64 << 10) && v.nodes[2].lag_bytes == Some(0)
        }
    })
    .await;
    for _ in 0..30 {
        let port = read_port(&client).await;
        assert_ne!(port, pg2, "a lagging replica got a read");
        assert_eq!(port, pg3);
    }

    replay(1, true);
    common::eventually(Duration::from_secs(15), "reads on pg2 again", || async {
        read_port(&client).await == pg2
    })
    .await;
}

#[tokio::test]
async fn read_your_writes_with_replay_paused_on_every_replica() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.psql(
        0,
        "app",
        "CREATE TABLE IF NOT EXISTS ryw (id int); GRANT ALL ON ryw TO app",
    )
    .unwrap();
    c.wait_replayed(Duration::from_secs(10)).unwrap();
    replay(1, false);
    replay(2, false);

    let proxy = start_proxy(config(c, |_| {})).await;
    let seen = write_then_read(&proxy.connect().await, 0..100).await;
    assert_eq!(
        seen, 100,
        "every write was visible to the read that followed it"
    );

    // Control: without read-your-writes the same reads go to the paused replicas and miss.
    let off = start_proxy(config(c, |cfg| {
        cfg.cluster.read_your_writes = ReadYourWrites::Off
    }))
    .await;
    let missed = 20 - write_then_read(&off.connect().await, 1000..1020).await;
    replay(1, true);
    replay(2, true);
    assert!(missed > 0, "the control run should read stale replicas");
}

/// Points replica `i` at `conninfo` (its WAL receiver restarts with it).
fn repoint(i: usize, conninfo: &str) {
    let sql = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    cluster().psql(i, "postgres", &sql).unwrap();
    cluster()
        .psql(i, "postgres", "SELECT pg_reload_conf()")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_follow_the_primary_gets_no_reads() {
    // A replica that stopped streaming from the elected primary (it replayed past a fork
    // point and cannot follow, or follows nobody) must not answer reads.
    let _serial = SERIAL.lock().await;
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let client = proxy.connect().await;
    let port = cluster().port(1);
    common::eventually(Duration::from_secs(20), "reads on pg2", || async {
        read_port(&client).await == port
    })
    .await;
    let conninfo = cluster()
        .psql(1, "postgres", "SHOW primary_conninfo")
        .unwrap();
    let dead = pgpilot::devcluster::free_port().unwrap();
    repoint(1, &format!("host=127.0.0.1 port={dead} user=postgres"));
    common::eventually(Duration::from_secs(20), "pg2 to stop streaming", || async {
        cluster()
            .psql(
                1,
                "postgres",
                "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .is_ok_and(|n| n == "0")
    })
    .await;
    // Once the proxy has seen it, not one read in 200 goes there.
    let shared = proxy.shared.clone();
    common::eventually(Duration::from_secs(10), "the probe to see it", || {
        let v = shared.cluster.view();
        async move { v.nodes[1].sample.as_ref().is_some_and(|s| !s.streaming) }
    })
    .await;
    for _ in 0..200 {
        assert_ne!(
            read_port(&client).await,
            port,
            "a read went to a replica that follows nobody"
        );
    }
    repoint(1, &conninfo);
    common::eventually(Duration::from_secs(20), "reads on pg2 again", || async {
        read_port(&client).await == port
    })
    .await;
}
