//! Read/write routing through the proxy on a shared devcluster: where each kind of statement
//! lands is observed with `inet_server_port()` (and by writes succeeding, which they cannot on
//! a standby).

mod common;

use std::collections::HashSet;

use common::{cluster, config, start_proxy};
use tokio_postgres::{Client, SimpleQueryMessage};

async fn port_of(client: &Client, sql: &str) -> u16 {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no port in the result"))
}

fn ports() -> (u16, HashSet<u16>) {
    let c = cluster();
    (c.port(0), (1..c.nodes().len()).map(|i| c.port(i)).collect())
}

async fn proxy_ready() -> (common::TestProxy, Client) {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let shared = proxy.shared.clone();
    common::eventually(
        std::time::Duration::from_secs(10),
        "replicas probed",
        || {
            let v = shared.cluster.view();
            async move {
                v.nodes
                    .iter()
                    .filter(|n| n.healthy && n.lag_bytes.is_some())
                    .count()
                    == 2
            }
        },
    )
    .await;
    let client = proxy.connect().await;
    (proxy, client)
}

#[tokio::test]
async fn plain_reads_use_both_replicas() {
    let (primary, replicas) = ports();
    let (_proxy, client) = proxy_ready().await;
    let mut seen = HashSet::new();
    for _ in 0..40 {
        seen.insert(port_of(&client, "SELECT inet_server_port()").await);
    }
    assert!(
        !seen.contains(&primary),
        "a plain read went to the primary: {seen:?}"
    );
    assert_eq!(seen, replicas, "reads use both replicas");
    // Extended protocol reads too.
    let stmt = client
        .prepare("SELECT inet_server_port()::int")
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let port: i32 = client.query_one(&stmt, &[]).await.unwrap().get(0);
        seen.insert(port as u16);
    }
    assert_eq!(seen, replicas);
}

#[tokio::test]
async fn writes_and_their_disguises_reach_the_primary() {
    let (primary, _) = ports();
    let (_proxy, client) = proxy_ready().await;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS routed (id serial PRIMARY KEY, v int); \
             CREATE SEQUENCE IF NOT EXISTS routed_seq",
        )
        .await
        .unwrap();
    for sql in [
        "SELECT inet_server_port(), nextval('routed_seq')",
        "WITH x AS (INSERT INTO routed (v) VALUES (1) RETURNING id) SELECT inet_server_port(), count(*) FROM x",
        "WITH x AS (UPDATE routed SET v = v + 1 WHERE id = 1 RETURNING id) SELECT inet_server_port() FROM x UNION ALL SELECT inet_server_port()",
        "SELECT inet_server_port() FROM routed FOR NO KEY UPDATE",
        "SELECT inet_server_port() FROM routed LIMIT 1 FOR UPDATE SKIP LOCKED",
        "/* pgpilot:primary */ SELECT inet_server_port()",
        "SELECT inet_server_port(), pg_advisory_xact_lock(7)",
    ] {
        assert_eq!(port_of(&client, sql).await, primary, "{sql}");
    }
    // Statements that would fail on a standby succeed.
    for sql in [
        "SELECT 1 AS one INTO TEMP routed_copy",
        "INSERT INTO routed (v) VALUES (2)",
        "DO $$ BEGIN INSERT INTO routed (v) VALUES (3); END $$",
    ] {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let sink = client
        .copy_in::<_, bytes::Bytes>("COPY routed (v) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from_static(b"5\n6\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
}

#[tokio::test]
async fn transactions_stay_on_one_node() {
    let (primary, replicas) = ports();
    let (_proxy, client) = proxy_ready().await;
    client.batch_execute("BEGIN").await.unwrap();
    let a = port_of(&client, "SELECT inet_server_port()").await;
    let b = port_of(&client, "SELECT inet_server_port()").await;
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        (a, b),
        (primary, primary),
        "a read-write transaction runs on the primary"
    );

    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let a = port_of(&client, "SELECT inet_server_port()").await;
    let b = port_of(&client, "SELECT inet_server_port()").await;
    client.batch_execute("COMMIT").await.unwrap();
    assert!(
        replicas.contains(&a) && a == b,
        "BEGIN READ ONLY stays on one replica: {a} {b}"
    );

    let a = port_of(
        &client,
        "START TRANSACTION READ ONLY; SELECT inet_server_port()",
    )
    .await;
    client.batch_execute("ROLLBACK").await.unwrap();
    assert!(replicas.contains(&a));

    // tokio-postgres transactions (extended protocol inside).
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    let p: i32 = tx
        .query_one("SELECT inet_server_port()::int", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(p as u16, primary);
}

#[tokio::test]
async fn listen_pins_the_client_to_the_primary() {
    let (primary, _) = ports();
    let (_proxy, client) = proxy_ready().await;
    client.batch_execute("LISTEN pgpilot_test").await.unwrap();
    for _ in 0..5 {
        assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
    }
}

#[tokio::test]
async fn route_setting_and_hints() {
    let (primary, replicas) = ports();
    let (_proxy, client) = proxy_ready().await;
    assert!(replicas.contains(&port_of(&client, "SELECT inet_server_port()").await));
    client
        .batch_execute("SET pgpilot.route = 'primary'")
        .await
        .unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
    client
        .batch_execute("SET pgpilot.route = auto")
        .await
        .unwrap();
    assert!(replicas.contains(&port_of(&client, "SELECT inet_server_port()").await));
    let err = client
        .batch_execute("SET pgpilot.route = 'nowhere'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    assert!(
        replicas
            .contains(&port_of(&client, "/* pgpilot:replica */ SELECT inet_server_port()").await)
    );
}

#[tokio::test]
async fn primary_only_database_routing() {
    let (primary, _) = ports();
    let proxy = start_proxy(config(cluster(), |c| {
        c.databases[0].routing = pgpilot::config::Routing::Primary;
    }))
    .await;
    let client = proxy.connect().await;
    for _ in 0..5 {
        assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
    }
}
