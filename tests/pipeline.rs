//! Pipelined lanes: autocommit read-only simple queries from many clients share a few server
//! connections, each client gets exactly its own answers, settings pick their own lane, errors
//! and cancels touch only the request they belong to, unnamed extended requests ride too, and
//! anything else goes the ordinary way.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::raw::Raw;
use common::{cluster, config, start_proxy};
use pgpilot::config::Routing;
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use postgres_protocol::message::frontend;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, SimpleQueryMessage};

fn lanes(pool_size: usize, depth: usize) -> pgpilot::config::Config {
    config(cluster(), |c| {
        c.proxy.pool_size = pool_size;
        c.proxy.pipeline_depth = depth;
        c.databases[0].routing = Routing::Primary;
    })
}

fn pipelined(proxy: &common::TestProxy) -> u64 {
    proxy
        .shared
        .stats
        .all()
        .iter()
        .map(|(_, s)| s.pipelined_count())
        .sum()
}

async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_share_lanes_and_each_gets_its_own_answers() {
    let proxy = start_proxy(lanes(4, 8)).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let client = proxy.connect().await;
        tasks.push(tokio::spawn(async move {
            for round in 0..40 {
                let id = 1 + (i * 40 + round) % 1000;
                let got = rows(
                    &client,
                    &format!("SELECT {i}, {round}, owner FROM accounts WHERE id = {id}"),
                )
                .await;
                assert_eq!(
                    got,
                    vec![vec![i.to_string(), round.to_string(), format!("user{id}")]]
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened: usize = proxy.shared.pools.all().iter().map(|p| p.opened()).sum();
    // Requests that run nothing (the prepares) may also use the pool's small reserve.
    let most = 4 + pgpilot::pool::PREPARE_RESERVE;
    assert!(
        opened <= most,
        "{opened} server connections for a pool of 4"
    );
    let shared = pipelined(&proxy);
    assert!(shared > 0, "no request rode a lane");
    println!("{shared} of 1280 requests were pipelined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_pick_their_own_lane_and_never_leak() {
    let proxy = start_proxy(lanes(4, 8)).await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let default_path = rows(&b, "SHOW search_path").await[0][0].clone();
    a.batch_execute("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    let before = pipelined(&proxy);
    let (ra, rb) = tokio::join!(
        async {
            for _ in 0..50 {
                assert_eq!(
                    rows(&a, "SHOW search_path").await[0][0],
                    "pg_catalog, public"
                );
            }
        },
        async {
            for _ in 0..50 {
                assert_eq!(rows(&b, "SHOW search_path").await[0][0], default_path);
            }
        }
    );
    let ((), ()) = (ra, rb);
    // Under load some requests find every lane busy and go the ordinary way; both ways must
    // keep the settings apart.
    assert!(pipelined(&proxy) > before, "SHOW rides a lane");
}

#[tokio::test]
async fn an_error_on_a_lane_belongs_to_its_request_only() {
    let proxy = start_proxy(lanes(2, 8)).await;
    let client = proxy.connect().await;
    let other = proxy.connect().await;
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    assert_eq!(rows(&client, "SELECT 41 + 1").await, vec![vec!["42"]]);
    assert_eq!(rows(&other, "SELECT 'fine'").await, vec![vec!["fine"]]);
    assert!(pipelined(&proxy) >= 2);
}

#[tokio::test]
async fn a_cancel_stops_the_pipelined_query_and_nothing_else() {
    let proxy = start_proxy(lanes(2, 8)).await;
    let client = proxy.connect().await;
    let other = proxy.connect().await;
    let token = client.cancel_token();
    let running = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let err = client
            .simple_query("SELECT pg_sleep(30)")
            .await
            .unwrap_err();
        (err, started.elapsed(), client)
    });
    // Cancel once the statement is running on the server.
    common::eventually(Duration::from_secs(10), "pg_sleep running", || async {
        let n = rows(
            &other,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
        )
        .await;
        n[0][0] == "1"
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let (err, took, client) = running.await.unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(took < Duration::from_secs(20));
    assert_eq!(rows(&client, "SELECT 1").await, vec![vec!["1"]]);
    assert_eq!(rows(&other, "SELECT 2").await, vec![vec!["2"]]);
    assert!(
        pipelined(&proxy) >= 2,
        "the sleep and the checks rode lanes"
    );
}

#[tokio::test]
async fn transactions_writes_and_settings_go_the_ordinary_way() {
    let proxy = start_proxy(lanes(2, 8)).await;
    let client = proxy.connect().await;
    let before = pipelined(&proxy);
    client
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    client.batch_execute("SET work_mem = '8MB'").await.unwrap();
    client
        .batch_execute("CREATE TEMP TABLE IF NOT EXISTS lane_probe (x int)")
        .await
        .unwrap();
    // Pinned by the temp table: its reads stay on the pinned connection too.
    assert_eq!(
        rows(&client, "SELECT count(*) FROM lane_probe").await,
        vec![vec!["0"]]
    );
    let tx = client.simple_query("SELECT 1").await;
    assert!(tx.is_ok());
    assert_eq!(
        pipelined(&proxy),
        before,
        "none of these may share a connection"
    );
    assert_eq!(rows(&client, "SHOW work_mem").await, vec![vec!["8MB"]]);
}

#[tokio::test]
async fn pipeline_depth_zero_turns_lanes_off() {
    let proxy = start_proxy(lanes(2, 0)).await;
    let client = proxy.connect().await;
    for _ in 0..5 {
        assert_eq!(rows(&client, "SELECT 1").await, vec![vec!["1"]]);
    }
    assert_eq!(pipelined(&proxy), 0);
}

/// Bind of the unnamed statement to the unnamed portal (no parameters), Execute, Sync.
fn bind_execute_sync(out: &mut BytesMut) {
    out.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    frontend::sync(out);
}

/// Binds and executes the client's unnamed statement (no Parse); returns the one value.
async fn bind_unnamed(a: &mut Raw) -> String {
    let mut out = BytesMut::new();
    bind_execute_sync(&mut out);
    a.send(&out).await;
    let msgs = a.until_ready().await;
    let error = msgs.iter().find_map(|m| m.message());
    assert_eq!(tags(&msgs), [b'2', b'D', b'C'], "{error:?}");
    first_value(&msgs).unwrap_or_default()
}

fn tags(msgs: &[common::raw::Msg]) -> Vec<u8> {
    msgs.iter().map(|m| m.tag).collect()
}

fn first_value(msgs: &[common::raw::Msg]) -> Option<String> {
    msgs.iter()
        .find(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_extended_requests_ride_lanes() {
    let proxy = start_proxy(lanes(2, 8)).await;
    let mut tasks = Vec::new();
    for i in 0..8i32 {
        let client = proxy.connect().await;
        tasks.push(tokio::spawn(async move {
            for round in 0..20i32 {
                let row = client
                    .query_typed_one(
                        "SELECT $1::int + $2::int",
                        &[(&i, Type::INT4), (&round, Type::INT4)],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), i + round);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let shared = pipelined(&proxy);
    assert!(shared > 0, "no unnamed request rode a lane");
    println!("{shared} of 160 unnamed requests rode a lane");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_ride_lanes_under_their_own_names_through_evictions() {
    // Three statements per connection for 16 client statements: lanes keep evicting (Close)
    // and re-preparing (Parse) as they go.
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 2;
        c.proxy.pipeline_depth = 8;
        c.proxy.max_prepared_statements = 3;
        c.databases[0].routing = Routing::Primary;
    }))
    .await;
    let mut tasks = Vec::new();
    for i in 0..8i32 {
        let client = proxy.connect().await;
        tasks.push(tokio::spawn(async move {
            // Same client-side names in every client ("s0", "s1"): the server names differ.
            let (add, owner) = common::prepare_add_and_owner(&client, i).await;
            for round in 0..25i32 {
                let row = client.query_one(&add, &[&round]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), round + i);
                let id = 1 + (i * 25 + round) % 1000;
                let row = client.query_one(&owner, &[&id]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), format!("user{id}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let shared = pipelined(&proxy);
    assert!(shared > 0, "no named execution rode a lane");
    println!("{shared} of 400 named executions rode a lane");
    // A named statement that writes is never shared.
    let client = proxy.connect().await;
    let before = pipelined(&proxy);
    let bump = client
        .prepare("UPDATE accounts SET balance = balance WHERE id = $1")
        .await
        .unwrap();
    for id in 1..4i32 {
        client.execute(&bump, &[&id]).await.unwrap();
    }
    assert_eq!(pipelined(&proxy), before);
}

#[tokio::test]
async fn the_unnamed_statement_stays_right_around_lanes() {
    let proxy = start_proxy(lanes(1, 8)).await;
    let mut a = Raw::login(proxy.port(), DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE).await;
    let mut out = BytesMut::new();
    // A prepares the unnamed statement on the only connection, the ordinary way.
    frontend::parse("", "SELECT 7", Vec::<u32>::new(), &mut out).unwrap();
    frontend::sync(&mut out);
    a.send(&out).await;
    assert_eq!(tags(&a.until_ready().await), [b'1']);
    // B's read rides a lane on that connection: its Query destroys the unnamed statement.
    let before = pipelined(&proxy);
    let b = proxy.connect().await;
    assert_eq!(rows(&b, "SELECT 1").await, vec![vec!["1"]]);
    assert_eq!(pipelined(&proxy), before + 1);
    // A binds its unnamed statement: pgpilot must know it is gone and send the Parse again.
    assert_eq!(bind_unnamed(&mut a).await, "7");

    // A self-contained unnamed request rides a lane; a later Bind of the same unnamed
    // statement still works the ordinary way.
    out.clear();
    frontend::parse("", "SELECT 8", Vec::<u32>::new(), &mut out).unwrap();
    bind_execute_sync(&mut out);
    a.send(&out).await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), [b'1', b'2', b'D', b'C']);
    assert_eq!(pipelined(&proxy), before + 2);
    assert_eq!(bind_unnamed(&mut a).await, "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_a_pipelined_query_at_once() {
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 2;
        c.proxy.pipeline_depth = 8;
        c.databases[0].routing = Routing::Primary;
        common::with_admin_users(c);
    }))
    .await;
    let admin = common::admin_client(&proxy, "admin").await;
    let info = format!(
        "{} application_name=lane_victim",
        proxy.conninfo(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
    );
    let (victim, conn) = tokio_postgres::connect(&info, NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let before = pipelined(&proxy);
    let sleeping = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    let other = proxy.connect().await;
    let active_sleeps = || async {
        rows(
            &other,
            // In a transaction block: these checks never ride a lane themselves.
            "BEGIN; SELECT count(*) FROM pg_stat_activity \
             WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'; COMMIT",
        )
        .await[0][0]
            .clone()
    };
    common::eventually(Duration::from_secs(10), "pg_sleep running", || async {
        active_sleeps().await == "1"
    })
    .await;
    assert_eq!(pipelined(&proxy), before + 1, "the sleep rides a lane");
    let (_, clients) = common::admin_query(&admin, "SHOW CLIENTS").await.unwrap();
    let id = clients
        .iter()
        .find(|r| r[17].as_deref() == Some("lane_victim"))
        .and_then(|r| r[13].clone())
        .expect("the victim in SHOW CLIENTS");
    common::admin_query(&admin, &format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the victim's connection ends while its query would still run")
        .unwrap()
        .expect_err("terminated by the admin");
    // The FATAL answers the pending query.
    let err = sleeping
        .await
        .unwrap()
        .expect_err("terminated by the admin");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    // Its statement was cancelled on the server, so the lane is free for the others.
    common::eventually(Duration::from_secs(5), "the sleep cancelled", || async {
        active_sleeps().await == "0"
    })
    .await;
    assert_eq!(rows(&other, "SELECT 3").await, vec![vec!["3"]]);
}
