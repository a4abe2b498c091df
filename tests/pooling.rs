//! Transaction pooling that real drivers survive: many clients over few server connections,
//! prepared statements that move between connections, session settings that follow their
//! client and never leak, DEALLOCATE, and session mode's real backend identity.

mod common;

use common::raw::Raw;
use common::{cluster, config, start_proxy};
use pgpilot::config::{PoolMode, Routing};
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use tokio_postgres::SimpleQueryMessage;

fn primary_only(pool_size: usize) -> pgpilot::config::Config {
    config(cluster(), |c| {
        c.proxy.pool_size = pool_size;
        c.databases[0].routing = Routing::Primary;
    })
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    let rows = client.simple_query(&format!("SHOW {name}")).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_with_prepared_statements_over_two_server_connections() {
    let proxy = start_proxy(primary_only(2)).await;
    let mut tasks = Vec::new();
    for i in 0..50i32 {
        let info = proxy.conninfo(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE);
        tasks.push(tokio::spawn(async move {
            let (mut client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let (add, owner) = common::prepare_add_and_owner(&client, i).await;
            for round in 0..10i32 {
                let tx = client.transaction().await.unwrap();
                let sum: i32 = tx.query_one(&add, &[&round]).await.unwrap().get(0);
                assert_eq!(sum, round + i);
                let id = 1 + (i * 10 + round) % 1000;
                let name: String = tx.query_one(&owner, &[&id]).await.unwrap().get(0);
                assert_eq!(name, format!("user{id}"));
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened: usize = proxy.shared.pools.all().iter().map(|p| p.opened()).sum();
    // Requests that run nothing (the prepares) may also use the pool's small reserve.
    let most = 2 + pgpilot::pool::PREPARE_RESERVE;
    assert!(
        opened <= most,
        "{opened} server connections for a pool of 2"
    );
}

#[tokio::test]
async fn describe_of_a_statement_prepared_on_another_connection() {
    let proxy = start_proxy(primary_only(2)).await;
    let mut a = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    let mut out = bytes::BytesMut::new();
    use postgres_protocol::message::frontend;
    frontend::parse(
        "s1",
        "SELECT id, owner FROM accounts WHERE id = $1",
        [23],
        &mut out,
    )
    .unwrap();
    frontend::sync(&mut out);
    a.send(&out).await;
    let msgs = a.until_ready().await;
    assert_eq!(msgs.iter().map(|m| m.tag).collect::<Vec<_>>(), [b'1']);

    // Another client holds that connection in a transaction.
    let b = proxy.connect().await;
    b.batch_execute("BEGIN").await.unwrap();
    let held_pid: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    out.clear();
    frontend::describe(b'S', "s1", &mut out).unwrap();
    frontend::sync(&mut out);
    a.send(&out).await;
    let tags: Vec<u8> = a.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(
        tags,
        [b't', b'T'],
        "ParameterDescription and RowDescription, nothing else"
    );
    let now = a.query("SELECT pg_backend_pid()").await;
    let pid = |msgs: &[common::raw::Msg]| {
        msgs.iter()
            .find(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
    };
    assert_ne!(
        pid(&now),
        Some(held_pid.to_string()),
        "the describe ran on the other connection"
    );
    b.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn session_settings_follow_their_client_and_never_leak() {
    let proxy = start_proxy(primary_only(1)).await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let default_path = show(&b, "search_path").await;
    a.batch_execute("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    a.batch_execute("SET application_name = 'client_a'")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
        assert_eq!(show(&b, "search_path").await, default_path);
        assert_eq!(show(&a, "application_name").await, "client_a");
        assert_ne!(show(&b, "application_name").await, "client_a");
    }
    // Both clients share the single server connection the whole time.
    let opened: usize = proxy.shared.pools.all().iter().map(|p| p.opened()).sum();
    assert_eq!(opened, 1);
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(show(&a, "search_path").await, default_path);
    a.batch_execute("BEGIN; SET search_path = nowhere; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        show(&a, "search_path").await,
        default_path,
        "a rolled-back SET is forgotten"
    );
    a.batch_execute("SET LOCAL work_mem = '1MB'")
        .await
        .unwrap_or(());
    a.batch_execute("RESET ALL").await.unwrap();
    assert_ne!(show(&a, "application_name").await, "client_a");
}

#[tokio::test]
async fn deallocate_all_then_prepare_again() {
    let proxy = start_proxy(primary_only(2)).await;
    let client = proxy.connect().await;
    let stmt = client.prepare("SELECT 40 + $1::int").await.unwrap();
    assert_eq!(
        client
            .query_one(&stmt, &[&2i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    client.batch_execute("DEALLOCATE ALL").await.unwrap();
    let err = client.query_one(&stmt, &[&2i32]).await.unwrap_err();
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("26000"),
        "as PostgreSQL: the statement is gone"
    );
    let again = client.prepare("SELECT 40 + $1::int").await.unwrap();
    assert_eq!(
        client
            .query_one(&again, &[&3i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        43
    );
    client.batch_execute("DISCARD ALL").await.unwrap();
    let fresh = client.prepare("SELECT 1::int").await.unwrap();
    assert_eq!(
        client
            .query_one(&fresh, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn session_mode_shows_the_real_backend() {
    let proxy = start_proxy(config(cluster(), |c| c.proxy.pool_mode = PoolMode::Session)).await;
    let mut raw = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    let key_pid = raw.key_pid.expect("BackendKeyData");
    assert_eq!(raw.param("client_encoding").as_deref(), Some("UTF8"));
    let rows = raw.query("SELECT pg_backend_pid()").await;
    let row = rows.iter().find(|m| m.tag == b'D').expect("a row");
    let pid: i32 = String::from_utf8_lossy(&row.body[6..]).parse().unwrap();
    assert_eq!(pid, key_pid, "the client sees its server's own process id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_stays_warm_and_idle_connections_expire() {
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 5;
        c.proxy.min_pool_size = 2;
        c.proxy.server_idle_timeout = pgpilot::config::Dur::secs(1);
        c.databases[0].routing = Routing::Primary;
    }))
    .await;
    let first = proxy.connect().await;
    let shared = proxy.shared.clone();
    let open = move || shared.pools.all().iter().map(|p| p.open()).sum::<usize>();
    let o = open.clone();
    common::eventually(
        std::time::Duration::from_secs(10),
        "two warm connections",
        move || {
            let n = o();
            async move { n == 2 }
        },
    )
    .await;
    // A burst opens more; once idle past server_idle_timeout they close, down to the minimum.
    let mut busy = vec![first];
    for _ in 0..4 {
        busy.push(proxy.connect().await);
    }
    for c in &busy {
        c.batch_execute("BEGIN").await.unwrap();
    }
    assert_eq!(open(), 5);
    for c in &busy {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let o = open.clone();
    common::eventually(
        std::time::Duration::from_secs(10),
        "back to the minimum",
        move || {
            let n = o();
            async move { n == 2 }
        },
    )
    .await;
}

#[tokio::test]
async fn a_set_prepared_once_and_executed_by_name_is_tracked() {
    let proxy = start_proxy(primary_only(1)).await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let default_path = show(&b, "search_path").await;
    let set = a
        .prepare("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    let other = a.prepare("SELECT 1").await.unwrap();
    a.query(&other, &[]).await.unwrap();
    a.execute(&set, &[]).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            show(&b, "search_path").await,
            default_path,
            "nothing leaks to b"
        );
        assert_eq!(
            show(&a, "search_path").await,
            "pg_catalog, public",
            "a keeps its setting"
        );
    }
}

#[tokio::test]
async fn a_statement_name_reused_after_close_never_runs_the_old_text() {
    // The ordinary path, steered over two connections with a second client holding one.
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 2;
        c.proxy.pipeline_depth = 0;
        c.databases[0].routing = Routing::Primary;
    }))
    .await;
    use postgres_protocol::message::frontend;
    let mut a = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    let b = proxy.connect().await;
    let mut out = bytes::BytesMut::new();
    let mut request = |build: &dyn Fn(&mut bytes::BytesMut)| {
        out.clear();
        build(&mut out);
        frontend::sync(&mut out);
        out.clone()
    };
    let parse = |sql: &'static str| {
        move |o: &mut bytes::BytesMut| frontend::parse("s1", sql, Vec::<u32>::new(), o).unwrap()
    };
    let run = |o: &mut bytes::BytesMut| {
        o.extend_from_slice(&[b'B', 0, 0, 0, 14, 0, b's', b'1', 0, 0, 0, 0, 0, 0, 0]);
        o.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    };
    let value = |msgs: &[common::raw::Msg]| {
        msgs.iter()
            .find(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
    };
    // First every connection A uses gets s1 = SELECT 1; then, closed and prepared again as
    // SELECT 2, s1 is the new text wherever it runs.
    for (sql, expected) in [("SELECT 1", "1"), ("SELECT 2", "2")] {
        if expected == "2" {
            a.send(&request(&|o| frontend::close(b'S', "s1", o).unwrap()))
                .await;
            a.until_ready().await;
        }
        a.send(&request(&parse(sql))).await;
        a.until_ready().await;
        for _ in 0..2 {
            b.batch_execute("BEGIN").await.unwrap();
            a.send(&request(&run)).await;
            assert_eq!(value(&a.until_ready().await).as_deref(), Some(expected));
            b.batch_execute("COMMIT").await.unwrap();
            a.send(&request(&run)).await;
            assert_eq!(value(&a.until_ready().await).as_deref(), Some(expected));
        }
    }
}

/// A login in transaction mode needs no free server connection: with the primary's only
/// connection held by an open transaction, a new client logs in at once, is told what the
/// first was told, and reads from a replica.
#[tokio::test]
async fn a_login_needs_no_free_primary_connection() {
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 1;
        c.proxy.query_wait_timeout = pgpilot::config::Dur::secs(3);
        c.databases[0].routing = Routing::Auto;
    }))
    .await;
    let port = proxy.port();
    let first = Raw::login(port, DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    let holder = proxy.connect().await;
    holder
        .batch_execute("BEGIN; /* pgpilot:primary */ SELECT 1")
        .await
        .unwrap();
    let waiting = || {
        let p: usize = proxy
            .shared
            .pools
            .all()
            .iter()
            .map(|p| p.waiting_count())
            .sum();
        p
    };
    let mut second = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Raw::login(port, DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE),
    )
    .await
    .expect("the login finishes");
    assert_eq!(
        second.params, first.params,
        "the same ParameterStatus values"
    );
    assert_eq!(waiting(), 0, "the login waited for no connection");
    let answer = second.query("SELECT pg_is_in_recovery()::text").await;
    let row = answer.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(
        String::from_utf8_lossy(&row.body).ends_with("true"),
        "the read ran on a replica"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}
