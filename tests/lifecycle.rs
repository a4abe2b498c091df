//! Through the proxy, on a devcluster with TLS enabled: client TLS with a test CA, TLS to the
//! servers, md5, connection limits, and graceful shutdown.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::tls::TestCerts;
use common::{config, connect_watched, psql_conn, start_cluster, start_proxy};
use pgpilot::config::{AuthType, ClientTlsMode, Dur, ServerTlsMode};
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

fn fixture() -> &'static (TestCerts, DevCluster) {
    static FIXTURE: OnceLock<(TestCerts, DevCluster)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let certs = common::tls::make();
        let opts = DevClusterOptions {
            tls: Some((certs.cert.clone(), certs.key.clone())),
            ..DevClusterOptions::default()
        };
        let cluster = start_cluster(opts);
        cluster
            .psql(
                0,
                DEMO_DATABASE,
                "CREATE TABLE shutdown_log (owner text); GRANT ALL ON shutdown_log TO app",
            )
            .expect("shutdown_log table");
        (certs, cluster)
    })
}

#[tokio::test]
async fn client_tls_with_a_test_ca() {
    let (certs, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| {
        c.proxy.client_tls_mode = ClientTlsMode::Require;
        c.proxy.client_tls_cert = Some(certs.cert.clone());
        c.proxy.client_tls_key = Some(certs.key.clone());
    }))
    .await;
    let verified = format!(
        "host=localhost port={} user={DEMO_USER} dbname={DEMO_DATABASE} sslmode=verify-full sslrootcert={}",
        proxy.port(),
        certs.ca.display()
    );
    let (ok, out, err) = psql_conn(
        &verified,
        DEMO_PASSWORD,
        &[
            "-c",
            "\\conninfo",
            "-At",
            "-c",
            "SELECT count(*) FROM accounts",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
    assert!(out.trim_end().ends_with("1000"), "{out}");

    let plain = format!(
        "host=127.0.0.1 port={} user={DEMO_USER} dbname={DEMO_DATABASE} sslmode=disable",
        proxy.port()
    );
    let (ok, _, err) = psql_conn(&plain, DEMO_PASSWORD, &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(err.contains("TLS is required"), "{err}");
}

#[tokio::test]
async fn tls_to_servers_verified_against_the_ca() {
    let (certs, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| {
        c.proxy.server_tls_mode = ServerTlsMode::VerifyFull;
        c.proxy.server_tls_ca = Some(certs.ca.clone());
    }))
    .await;
    let client = proxy.connect().await;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the proxy's server connection is encrypted"
    );
}

#[tokio::test]
async fn md5_client_authentication() {
    let (_, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| c.proxy.auth_type = AuthType::Md5)).await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.unwrap();
    let err = proxy
        .try_connect(DEMO_USER, "bad", DEMO_DATABASE)
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
}

#[tokio::test]
async fn query_wait_timeout_when_the_pool_is_exhausted() {
    let (_, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| {
        c.proxy.pool_size = 1;
        c.proxy.query_wait_timeout = Dur::ms(300);
        c.databases[0].routing = pgpilot::config::Routing::Primary;
    }))
    .await;
    let first = proxy.connect().await;
    // The only server connection is held by `first` for its open transaction. A login
    // needs none (it is told what `first` was told); its query waits and fails.
    first.batch_execute("BEGIN").await.unwrap();
    let second = proxy.connect().await;
    let err = second.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "08P01");
    assert!(
        db.message().contains("query_wait_timeout"),
        "{}",
        db.message()
    );
    first.simple_query("SELECT 1").await.unwrap();
    drop(first);
    common::eventually(
        Duration::from_secs(10),
        "the pool slot to free up",
        || async {
            proxy
                .try_connect(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test]
async fn max_client_conn_refuses_with_53300() {
    let (_, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| c.proxy.max_client_conn = 2)).await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let err = proxy
        .try_connect(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!(
        (db.code().code(), db.message()),
        ("53300", "sorry, too many clients already")
    );
    a.simple_query("SELECT 1").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_lets_transactions_finish() {
    let (_, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| {
        c.proxy.shutdown_timeout = Dur::secs(20)
    }))
    .await;
    let info = proxy.conninfo(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE);
    let (busy, _busy_conn) = connect_watched(&info).await;
    let (idle, idle_conn) = connect_watched(&info).await;
    busy.batch_execute("BEGIN; INSERT INTO shutdown_log VALUES ('graceful')")
        .await
        .unwrap();

    proxy.stop.cancel();
    // The idle client is told at once, with 57P01.
    let idle_end = tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .unwrap()
        .unwrap();
    let code = idle_end.unwrap_err().code().map(|c| c.code().to_owned());
    assert_eq!(code.as_deref(), Some("57P01"));
    assert!(idle.simple_query("SELECT 1").await.is_err());
    // New connections are refused.
    assert!(
        proxy
            .try_connect(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
            .await
            .is_err()
    );
    // The open transaction commits, then that client is closed too.
    busy.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.task)
        .await
        .unwrap()
        .unwrap();
    let n = cluster
        .psql(
            0,
            DEMO_DATABASE,
            "SELECT count(*) FROM shutdown_log WHERE owner = 'graceful'",
        )
        .unwrap();
    assert_eq!(n, "1");
}

#[tokio::test]
async fn shutdown_grace_period_ends_stuck_transactions() {
    let (_, cluster) = fixture();
    let proxy = start_proxy(config(cluster, |c| c.proxy.shutdown_timeout = Dur::ms(500))).await;
    let info = proxy.conninfo(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE);
    let (stuck, stuck_conn) = connect_watched(&info).await;
    stuck
        .batch_execute("BEGIN; INSERT INTO shutdown_log VALUES ('stuck')")
        .await
        .unwrap();
    proxy.stop.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), stuck_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        end.unwrap_err()
            .code()
            .map(|c| c.code().to_owned())
            .as_deref(),
        Some("57P01")
    );
    tokio::time::timeout(Duration::from_secs(10), proxy.task)
        .await
        .unwrap()
        .unwrap();
    let n = cluster
        .psql(
            0,
            DEMO_DATABASE,
            "SELECT count(*) FROM shutdown_log WHERE owner = 'stuck'",
        )
        .unwrap();
    assert_eq!(n, "0", "the unfinished transaction was rolled back");
}
