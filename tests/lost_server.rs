//! A server lost while the client owes nothing: inside a transaction the client's next request
//! fails (nothing of the transaction may commit), a session holding server state is closed
//! as a direct connection would be, and a primary that refuses connections while it shuts
//! down is waited out by writes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cluster, config, eventually, start_proxy};
use pgpilot::config::Routing;
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

fn primary_only() -> pgpilot::config::Config {
    config(cluster(), |c| {
        c.proxy.pool_size = 2;
        c.databases[0].routing = Routing::Primary;
    })
}

/// The server process serving `client`'s open transaction.
async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

/// Ends server process `pid` on the primary and waits until it is gone.
async fn terminate(pid: i32) {
    let c = cluster();
    let sql = format!("SELECT pg_terminate_backend({pid})");
    tokio::task::spawn_blocking(move || c.psql(0, "postgres", &sql))
        .await
        .expect("psql task")
        .expect("terminate");
    wait_gone(pid).await;
}

async fn wait_gone(pid: i32) {
    let c = cluster();
    eventually(
        Duration::from_secs(10),
        "the backend to exit",
        || async move {
            let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
            tokio::task::spawn_blocking(move || c.psql(0, "postgres", &sql))
                .await
                .expect("psql task")
                .is_ok_and(|n| n == "0")
        },
    )
    .await;
}

async fn rows(table: &str) -> String {
    let c = cluster();
    let sql = format!("SELECT count(*) FROM {table}");
    tokio::task::spawn_blocking(move || c.psql(0, "app", &sql))
        .await
        .expect("psql task")
        .expect("count")
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_server_died_while_idle_never_half_commits() {
    let proxy = start_proxy(primary_only()).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE lost_idle (v text)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO lost_idle VALUES ('first')")
        .await
        .unwrap();
    terminate(backend_pid(&client).await).await;

    // The next statement must not run in autocommit somewhere else.
    let err = client
        .batch_execute("INSERT INTO lost_idle VALUES ('second')")
        .await
        .expect_err("the transaction is gone");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    let err = client
        .batch_execute("INSERT INTO lost_idle VALUES ('third')")
        .await
        .expect_err("still inside the failed transaction");
    assert_eq!(sqlstate(&err), Some("25P02"), "{err}");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows("lost_idle").await, "0", "nothing of it committed");

    // The client goes on normally afterwards.
    client
        .batch_execute("INSERT INTO lost_idle VALUES ('after')")
        .await
        .unwrap();
    assert_eq!(rows("lost_idle").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_after_the_server_died_is_an_error() {
    let proxy = start_proxy(primary_only()).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE lost_commit (v text)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO lost_commit VALUES ('first')")
        .await
        .unwrap();
    terminate(backend_pid(&client).await).await;
    let err = client
        .batch_execute("COMMIT")
        .await
        .expect_err("COMMIT of a lost transaction must fail");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    // A failed COMMIT leaves the client outside a transaction, as PostgreSQL's does.
    client
        .batch_execute("INSERT INTO lost_commit VALUES ('after')")
        .await
        .unwrap();
    assert_eq!(rows("lost_commit").await, "1");
}

/// The bank drill's lost commits: a driver sends a Close for a dropped statement (and
/// ignores its answer) before COMMIT. The Close takes the error; the COMMIT must still fail,
/// never answer the ROLLBACK tag a client takes for success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_after_an_ignored_error_in_a_lost_transaction_still_fails() {
    let proxy = start_proxy(primary_only()).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE lost_ignored (v text)")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let insert = client
        .prepare("INSERT INTO lost_ignored VALUES ('first')")
        .await
        .unwrap();
    client.execute(&insert, &[]).await.unwrap();
    terminate(backend_pid(&client).await).await;
    // Close + Sync, answered (with the lost transaction's error) and ignored by the driver.
    drop(insert);
    let err = client
        .batch_execute("COMMIT")
        .await
        .expect_err("COMMIT of a lost transaction must fail");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    assert_eq!(rows("lost_ignored").await, "0");
    client
        .batch_execute("INSERT INTO lost_ignored VALUES ('after')")
        .await
        .unwrap();
    assert_eq!(rows("lost_ignored").await, "1");
}

/// `ROLLBACK TO SAVEPOINT` (what pgJDBC's autosave sends after an error) cannot bring back a
/// transaction whose server died: the rest of it must not run in autocommit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_a_savepoint_of_a_lost_transaction_is_not_its_end() {
    let proxy = start_proxy(primary_only()).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE lost_savepoint (v text)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; SAVEPOINT a; INSERT INTO lost_savepoint VALUES ('first')")
        .await
        .unwrap();
    terminate(backend_pid(&client).await).await;
    let err = client
        .batch_execute("INSERT INTO lost_savepoint VALUES ('second')")
        .await
        .expect_err("the transaction is gone");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    let err = client
        .batch_execute("ROLLBACK TO SAVEPOINT a")
        .await
        .expect_err("the savepoint went with the server");
    assert_eq!(sqlstate(&err), Some("25P02"), "{err}");
    let err = client
        .batch_execute("INSERT INTO lost_savepoint VALUES ('third')")
        .await
        .expect_err("still inside the lost transaction");
    assert_eq!(sqlstate(&err), Some("25P02"), "{err}");
    let err = client
        .batch_execute("COMMIT")
        .await
        .expect_err("not committed");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    assert_eq!(rows("lost_savepoint").await, "0", "nothing of it committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_is_not_hidden() {
    let proxy = start_proxy(primary_only()).await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE lost_timeout (v text)")
        .await
        .unwrap();
    client
        .batch_execute("SET idle_in_transaction_session_timeout = '200ms'")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO lost_timeout VALUES ('first')")
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    wait_gone(pid).await;
    let err = client
        .batch_execute("INSERT INTO lost_timeout VALUES ('second'); COMMIT")
        .await
        .expect_err("the server ended the transaction");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows("lost_timeout").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holding_an_advisory_lock_is_closed_when_its_server_dies() {
    let proxy = start_proxy(primary_only()).await;
    let a = proxy.connect().await;
    a.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let pid = backend_pid(&a).await;
    terminate(pid).await;
    // A must not carry on as if it still held the lock.
    let err = a
        .batch_execute("SELECT 1")
        .await
        .expect_err("the session's state is gone");
    assert!(
        err.is_closed() || sqlstate(&err) == Some("08006"),
        "expected the connection to be closed: {err}"
    );
    eventually(Duration::from_secs(5), "the client to be closed", || {
        let closed = a.is_closed();
        async move { closed }
    })
    .await;

    // Temporary tables and SET ROLE too: the session is closed rather than carried on without.
    for pin in [
        "CREATE TEMP TABLE lost_tmp (x int)",
        "SET ROLE app",
        "LISTEN lost_channel",
    ] {
        let b = proxy.connect().await;
        b.batch_execute(pin).await.unwrap();
        terminate(backend_pid(&b).await).await;
        let err = b
            .batch_execute("SELECT 1")
            .await
            .expect_err("the session's state is gone");
        assert!(
            err.is_closed() || sqlstate(&err) == Some("08006"),
            "{pin}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_out_a_primary_that_is_shutting_down() {
    // During a shutdown PostgreSQL refuses new connections with 57P03 while old sessions
    // finish: a write then waits for a primary instead of failing.
    let c = Arc::new(common::start_cluster(DevClusterOptions {
        replicas: 0,
        ..DevClusterOptions::default()
    }));
    let proxy = start_proxy(config(&c, |cfg| {
        cfg.databases[0].routing = Routing::Primary;
    }))
    .await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TABLE waited (v int)")
        .await
        .unwrap();

    // A session that keeps the server in its shutdown, and the proxy's pooled connections gone.
    let superuser = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=app",
        c.port(0),
        pgpilot::devcluster::SUPERUSER_PASSWORD
    );
    let (holder, conn) = tokio_postgres::connect(&superuser, tokio_postgres::NoTls)
        .await
        .unwrap();
    let holder_task = tokio::spawn(conn);
    holder
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'app' AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    // SIGTERM to the postmaster: a smart shutdown, which waits for sessions to end.
    let pid_file = std::fs::read_to_string(c.nodes()[0].data_dir.join("postmaster.pid")).unwrap();
    let postmaster = pid_file.lines().next().unwrap().trim().to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &postmaster])
        .status()
        .unwrap();
    assert!(killed.success());
    let refused = superuser.clone();
    eventually(Duration::from_secs(10), "new connections refused", || {
        let info = refused.clone();
        async move {
            match tokio_postgres::connect(&info, tokio_postgres::NoTls).await {
                Err(e) => e.code().map(|c| c.code()) == Some("57P03"),
                Ok(_) => false,
            }
        }
    })
    .await;

    let write = tokio::spawn(async move {
        let r = client.batch_execute("INSERT INTO waited VALUES (1)").await;
        (client, r)
    });
    // The write must be waiting, not failed, while the server refuses connections.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !write.is_finished(),
        "the write gave up on a shutting-down primary"
    );
    drop(holder);
    let _ = holder_task.await;
    // The proxy's own probe session keeps a smart shutdown waiting: end it fast.
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.stop_node(0, "fast"))
        .await
        .unwrap()
        .expect("stop");
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.start_node(0))
        .await
        .unwrap()
        .expect("restart");
    let (_client, result) = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the write finishes once the primary is back")
        .unwrap();
    result.expect("the write succeeds on the restarted primary");
    assert_eq!(
        c.psql(0, "app", "SELECT count(*) FROM waited").unwrap(),
        "1"
    );
    proxy.shutdown().await;
    drop(c as Arc<DevCluster>);
}
