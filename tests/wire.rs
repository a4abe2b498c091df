//! Through the proxy, on a shared devcluster: simple and extended queries, prepared statements,
//! COPY both ways, errors, cancel, auth failures, unknown databases, malformed packets.

mod common;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use bytes::Bytes;
use common::raw::Raw;
use common::{cluster, config, psql, start_proxy};
use futures_util::{SinkExt, StreamExt};
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[tokio::test]
async fn simple_extended_and_prepared_queries() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let client = proxy.connect().await;

    let rows = client
        .simple_query("SELECT 1 AS one; SELECT 'two'")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    let row = client
        .query_one("SELECT $1::int + $2::int", &[&40i32, &2i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let stmt = client
        .prepare("SELECT owner FROM accounts WHERE id = $1")
        .await
        .unwrap();
    for id in [1i32, 7, 1000] {
        let row = client.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("user{id}"));
    }

    // A pipeline: several extended-protocol queries in flight at once.
    let (a, b, c) = tokio::join!(
        client.query_one(&stmt, &[&2i32]),
        client.query_one("SELECT count(*) FROM accounts", &[]),
        client.query_one(&stmt, &[&3i32]),
    );
    assert_eq!(a.unwrap().get::<_, String>(0), "user2");
    assert_eq!(b.unwrap().get::<_, i64>(0), 1000);
    assert_eq!(c.unwrap().get::<_, String>(0), "user3");
}

#[tokio::test]
async fn an_error_leaves_the_connection_usable() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let client = proxy.connect().await;
    let err = client
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
    let err = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    // Inside a failed transaction, then rolled back.
    client.batch_execute("BEGIN").await.unwrap();
    assert!(client.batch_execute("SELECT nope").await.is_err());
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    client.batch_execute("ROLLBACK").await.unwrap();
    let row = client.query_one("SELECT 'still here'", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "still here");
}

#[tokio::test]
async fn copy_ten_megabytes_in_and_out() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TEMP TABLE blob_copy (id int, payload text)")
        .await
        .unwrap();
    let line_payload = "x".repeat(1000);
    let rows = 10_240; // ~10 MB
    let sink = client.copy_in("COPY blob_copy FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..rows {
        chunk.push_str(&format!("{i}\t{line_payload}\n"));
        if chunk.len() > 256 * 1024 {
            sink.send(Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(Bytes::from(chunk)).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, rows as u64);

    let stream = client.copy_out("COPY blob_copy TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = 0usize;
    let mut lines = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(lines, rows);
    assert!(bytes > 10_000_000, "copied out {bytes} bytes");
    let sum: i64 = client
        .query_one("SELECT sum(length(payload)) FROM blob_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (rows * 1000) as i64);
}

#[tokio::test]
async fn cancel_request_reaches_the_right_backend() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let client = proxy.connect().await;
    let other = proxy.connect().await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    canceller.await.unwrap().unwrap();
    // Both connections still work; the other one was not cancelled.
    client.simple_query("SELECT 1").await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn wrong_password_and_unknown_database() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let err = proxy
        .try_connect(DEMO_USER, "wrong", DEMO_DATABASE)
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01");
    assert_eq!(
        db.message(),
        "password authentication failed for user \"app\""
    );

    let err = proxy
        .try_connect("nobody", "x", DEMO_DATABASE)
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));

    let err = proxy
        .try_connect(DEMO_USER, DEMO_PASSWORD, "nodb")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        (db.code().code(), db.message()),
        ("3D000", "database \"nodb\" does not exist")
    );

    let (ok, _, stderr) = psql(proxy.port(), "wrong", &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("password authentication failed for user \"app\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn psql_runs_scripts_through_the_proxy() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let (ok, out, err) = psql(
        proxy.port(),
        DEMO_PASSWORD,
        &[
            "-At",
            "-c",
            "SELECT count(*) FROM accounts",
            "-c",
            "SHOW application_name",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1000", "psql"]);
}

#[tokio::test]
async fn malformed_packets_close_only_that_client() {
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.max_message_size = pgpilot::config::ByteSize(1 << 20)
    }))
    .await;
    let bystander = proxy.connect().await;

    // A length below 4 inside a session.
    let mut raw = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    raw.send(&[b'Q', 0, 0, 0, 2]).await;
    let err = raw.recv().await.expect("an ErrorResponse");
    assert_eq!((err.tag, err.sqlstate().as_deref()), (b'E', Some("08P01")));
    assert!(raw.recv().await.is_none(), "the connection is closed");

    // A message larger than max_message_size.
    let mut raw = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    raw.send(&[b'Q', 0x10, 0, 0, 0]).await;
    let err = raw.recv().await.expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"));
    assert!(
        err.message().unwrap_or_default().contains("too large"),
        "{err:?}"
    );
    assert!(raw.recv().await.is_none());

    // An unknown message type.
    let mut raw = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    raw.send(&[b'!', 0, 0, 0, 4]).await;
    assert_eq!(
        raw.recv().await.and_then(|m| m.sqlstate()).as_deref(),
        Some("08P01")
    );

    // Garbage instead of a startup packet.
    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 3, 1, 2, 3, 4]).await;
    assert_eq!(
        raw.recv().await.and_then(|m| m.sqlstate()).as_deref(),
        Some("08P01")
    );

    // Protocol 2.0 gets a clear error.
    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await;
    let err = raw.recv().await.expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("0A000"));
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("unsupported frontend protocol 2.0")
    );

    // The bystander never noticed.
    let row = bystander
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1000);
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_answered() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let mut raw = Raw::connect(proxy.port()).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await; // GSSENCRequest
    assert_eq!(raw.read_byte().await, b'N');
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await; // SSLRequest, TLS disabled
    assert_eq!(raw.read_byte().await, b'N');
    // And a normal startup still works on the same connection.
    raw.startup(DEMO_USER, DEMO_DATABASE).await;
    let m = raw.recv().await.unwrap();
    assert_eq!(
        (m.tag, &m.body[..4]),
        (b'R', &10i32.to_be_bytes()[..]),
        "SASL requested"
    );
}

#[tokio::test]
async fn probes_report_roles_wal_positions_and_lag() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let cluster_state = proxy.shared.cluster.clone();
    common::eventually(Duration::from_secs(10), "all nodes probed", || {
        let v = cluster_state.view();
        async move { v.nodes.iter().all(|n| n.sample.is_some() && n.healthy) }
    })
    .await;
    let v = cluster_state.view();
    assert_eq!(v.primary().map(|p| p.name.as_str()), Some("pg1"));
    let primary = v.nodes[0].sample.clone().unwrap();
    assert!(!primary.in_recovery && primary.current_lsn.is_some());
    assert_eq!(primary.timeline, Some(1));
    for replica in &v.nodes[1..] {
        assert_eq!(replica.role, pgpilot::cluster::Role::Replica);
        let s = replica.sample.clone().unwrap();
        assert!(s.in_recovery && s.streaming, "{}: {s:?}", replica.name);
        assert!(s.replay_lsn.is_some() && s.receive_lsn.is_some());
        assert_eq!(s.timeline, Some(1));
        assert_eq!(s.system_id, primary.system_id, "same cluster");
        assert!(replica.lag_bytes.is_some());
    }
}

/// Opens a connection that sends a startup packet and then nothing (stuck in SCRAM).
async fn stalled_login(port: u16) -> Raw {
    let mut raw = Raw::connect(port).await;
    raw.startup(DEMO_USER, DEMO_DATABASE).await;
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_logins_time_out_and_never_take_authenticated_slots() {
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.max_client_conn = 4;
        c.proxy.client_login_timeout = pgpilot::config::Dur::secs(1);
    }))
    .await;
    let first = proxy.connect().await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_login(proxy.port()).await);
    }
    // Logged-in clients are not affected, and slots for them remain.
    first.simple_query("SELECT 1").await.unwrap();
    // Each stalled login is closed once client_login_timeout has passed.
    for raw in &mut stalled {
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match raw.recv().await {
                    None => return None,
                    Some(m) if m.tag == b'E' => return m.sqlstate(),
                    Some(_) => {}
                }
            }
        })
        .await
        .expect("a stalled login is closed");
        assert_eq!(closed.as_deref(), Some("08P01"));
    }
    for _ in 0..3 {
        proxy
            .connect()
            .await
            .simple_query("SELECT 1")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_message_before_authentication_is_refused() {
    let proxy = start_proxy(config(cluster(), |_| {})).await;
    let mut raw = stalled_login(proxy.port()).await;
    // The SCRAM exchange expects a SASLInitialResponse: send a 1 MB one instead.
    let mut huge = vec![b'p'];
    huge.extend_from_slice(&(1_000_004i32).to_be_bytes());
    huge.resize(1 + 1_000_004, b'x');
    let _ = raw.stream.write_all(&huge).await;
    let mut code = None;
    while let Some(m) = raw.recv().await {
        if m.tag == b'E' {
            code = m.sqlstate();
            break;
        }
    }
    assert_eq!(code.as_deref(), Some("08P01"), "refused before reading it");
    proxy
        .connect()
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}
