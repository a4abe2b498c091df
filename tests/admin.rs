//! The admin console through real clients: every SHOW column by column against PgBouncer
//! 1.18's (Debian 12), pgpilot's own tables, access control, FENCE/UNFENCE steering reads.

mod common;

use std::time::Duration;

use common::{
    ADMIN_PASSWORD, admin_client, admin_query, cluster, config, eventually, psql_conn, start_proxy,
    with_admin_users,
};

/// Column lists as PgBouncer 1.18 prints them.
const PGBOUNCER: &[(&str, &str)] = &[
    (
        "POOLS",
        "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req sv_active \
         sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login maxwait maxwait_us pool_mode",
    ),
    (
        "DATABASES",
        "name host port database force_user pool_size min_pool_size reserve_pool pool_mode \
         max_connections current_connections paused disabled",
    ),
    ("USERS", "name pool_mode"),
    (
        "STATS",
        "database total_xact_count total_query_count total_received total_sent total_xact_time \
         total_query_time total_wait_time avg_xact_count avg_query_count avg_recv avg_sent \
         avg_xact_time avg_query_time avg_wait_time",
    ),
    (
        "STATS_TOTALS",
        "database xact_count query_count bytes_received bytes_sent xact_time query_time wait_time",
    ),
    (
        "STATS_AVERAGES",
        "database xact_count query_count bytes_received bytes_sent xact_time query_time wait_time",
    ),
    ("CONFIG", "key value default changeable"),
    ("LISTS", "list items"),
    ("VERSION", "version"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shows_match_pgbouncer_and_pgpilot_tables_are_filled() {
    let c = cluster();
    let proxy = start_proxy(config(c, with_admin_users)).await;
    // Some traffic so that a pool exists.
    let app = proxy.connect().await;
    app.simple_query("SELECT 1").await.unwrap();
    let admin = admin_client(&proxy, "admin").await;
    for (what, columns) in PGBOUNCER {
        let (cols, _) = admin_query(&admin, &format!("SHOW {what}")).await.unwrap();
        let expected: Vec<&str> = columns.split_whitespace().collect();
        assert_eq!(cols, expected, "SHOW {what}");
    }
    // The SELECT rode a pipelined lane, which gives its connection back once idle.
    let sv_idle = || async {
        let (_, pools) = admin_query(&admin, "SHOW POOLS").await.unwrap();
        let app_pool = pools
            .iter()
            .find(|r| r[0].as_deref() == Some("app") && r[1].as_deref() == Some("app"))
            .expect("a pool for app/app")
            .clone();
        app_pool[9].as_deref().unwrap().parse::<i64>().unwrap()
    };
    common::eventually(
        Duration::from_secs(5),
        "an idle server in SHOW POOLS",
        || async { sv_idle().await >= 1 },
    )
    .await;
    let (_, totals) = admin_query(&admin, "SHOW STATS_TOTALS").await.unwrap();
    let app_totals = totals
        .iter()
        .find(|r| r[0].as_deref() == Some("app"))
        .expect("stats for app");
    let n = |i: usize| app_totals[i].as_deref().unwrap().parse::<u64>().unwrap();
    assert!(
        n(1) >= 1 && n(2) >= 1 && n(3) > 0 && n(4) > 0,
        "{app_totals:?}"
    );
    let (_, lists) = admin_query(&admin, "SHOW LISTS").await.unwrap();
    assert!(lists.iter().any(|r| {
        r[0].as_deref() == Some("used_clients")
            && r[1]
                .as_deref()
                .is_some_and(|n| n.parse::<i64>().unwrap() >= 2)
    }));
    let (_, config_rows) = admin_query(&admin, "SHOW CONFIG").await.unwrap();
    assert!(
        config_rows
            .iter()
            .any(|r| r[0].as_deref() == Some("cluster.failover_timeout")
                && r[1].as_deref() == Some("3s"))
    );
    assert!(
        config_rows
            .iter()
            .all(|r| r[1].as_deref() != Some(common::ADMIN_PASSWORD))
    );

    let (cols, nodes) = admin_query(&admin, "show nodes;").await.unwrap();
    assert_eq!(
        &cols[..14],
        [
            "name",
            "host",
            "port",
            "role",
            "health",
            "priority",
            "elected",
            "fenced",
            "lag_bytes",
            "lag_seconds",
            "replay_lsn",
            "timeline",
            "last_probe_ms",
            "error"
        ]
    );
    let pg1 = &nodes[0];
    assert_eq!(
        (pg1[0].as_deref(), pg1[3].as_deref(), pg1[6].as_deref()),
        (Some("pg1"), Some("primary"), Some("yes"))
    );
    assert!(
        nodes[1..]
            .iter()
            .all(|r| r[3].as_deref() == Some("replica"))
    );
    let (cols, _) = admin_query(&admin, "SHOW FAILOVERS").await.unwrap();
    assert_eq!(
        cols[..5],
        ["epoch", "kind", "cause", "old_primary", "new_primary"]
    );

    // psql, as operators use it.
    let info = format!(
        "host=127.0.0.1 port={} user=admin dbname=pgbouncer",
        proxy.port()
    );
    let (ok, out, err) = psql_conn(&info, ADMIN_PASSWORD, &["-c", "SHOW VERSION"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("pgpilot"), "{out}");
    let (ok, _, err) = psql_conn(&info, ADMIN_PASSWORD, &["-c", "SHOW HELP"]).await;
    assert!(ok && err.contains("SWITCHOVER"), "{err}");
    let (ok, _, err) = psql_conn(&info, ADMIN_PASSWORD, &["-c", "SHOW NOTHING"]).await;
    assert!(!ok && err.contains("unknown SHOW"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_controlled_and_fencing_steers_reads() {
    let c = cluster();
    let proxy = start_proxy(config(c, with_admin_users)).await;
    let stats = admin_client(&proxy, "stats").await;
    admin_query(&stats, "SHOW NODES")
        .await
        .expect("stats users may SHOW");
    let err = admin_query(&stats, "FENCE pg3").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"));
    // A regular user is refused at connection time.
    let err = proxy
        .try_connect(
            pgpilot::demo::DEMO_USER,
            pgpilot::demo::DEMO_PASSWORD,
            "pgpilot",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err}");
    // The extended protocol is refused with 08P01.
    let admin = admin_client(&proxy, "admin").await;
    let err = admin.query("SHOW NODES", &[]).await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("08P01") || admin.is_closed(),
        "{err}"
    );

    let admin = admin_client(&proxy, "admin").await;
    let shared = proxy.shared.clone();
    eventually(Duration::from_secs(10), "both replicas healthy", || {
        let v = shared.cluster.view();
        async move { v.nodes.iter().filter(|n| n.healthy).count() == 3 }
    })
    .await;
    admin_query(&admin, "FENCE pg3").await.unwrap();
    let (_, nodes) = admin_query(&admin, "SHOW NODES").await.unwrap();
    assert_eq!(nodes[2][7].as_deref(), Some("operator"));
    let app = proxy.connect().await;
    for _ in 0..20 {
        let port: i32 = app
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(port as u16, c.port(2), "a read reached the fenced pg3");
    }
    admin_query(&admin, "UNFENCE pg3").await.unwrap();
    let (_, nodes) = admin_query(&admin, "SHOW NODES").await.unwrap();
    assert_eq!(nodes[2][7].as_deref(), Some("no"));
    let err = admin_query(&admin, "SUSPEND").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    let err = admin_query(&admin, "FENCE nosuch").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_disable_and_kill_a_client() {
    let c = cluster();
    let proxy = start_proxy(config(c, with_admin_users)).await;
    let admin = admin_client(&proxy, "admin").await;
    let (victim, conn) = tokio_postgres::connect(
        &format!(
            "{} application_name=victim",
            proxy.conninfo(
                pgpilot::demo::DEMO_USER,
                pgpilot::demo::DEMO_PASSWORD,
                pgpilot::demo::DEMO_DATABASE
            )
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    victim.simple_query("SELECT 1").await.unwrap();

    let (cols, clients) = admin_query(&admin, "SHOW CLIENTS").await.unwrap();
    assert_eq!(cols.len(), 18);
    assert_eq!(cols[13], "ptr");
    let row = clients
        .iter()
        .find(|r| r[17].as_deref() == Some("victim"))
        .expect("the victim in SHOW CLIENTS");
    assert_eq!(
        (row[0].as_deref(), row[2].as_deref()),
        (Some("C"), Some("app"))
    );
    let id = row[13].clone().unwrap();
    let (cols, servers) = admin_query(&admin, "SHOW SERVERS").await.unwrap();
    assert_eq!(cols.last().map(String::as_str), Some("node"));
    assert!(servers.iter().any(|r| {
        r[0].as_deref() == Some("S")
            && r[3].as_deref() == Some("idle")
            && r[15]
                .as_deref()
                .is_some_and(|pid| pid.parse::<i32>().unwrap() > 0)
    }));

    // PAUSE holds new transactions until RESUME.
    admin_query(&admin, "PAUSE app").await.unwrap();
    let other = proxy.connect().await;
    let held = tokio::spawn(async move { other.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran while paused");
    admin_query(&admin, "RESUME app").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("resumed")
        .unwrap()
        .expect("the held query succeeds");

    // DISABLE refuses new connections; ENABLE lets them in again.
    admin_query(&admin, "DISABLE app").await.unwrap();
    let err = proxy
        .try_connect(
            pgpilot::demo::DEMO_USER,
            pgpilot::demo::DEMO_PASSWORD,
            "app",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57P03"), "{err}");
    admin_query(&admin, "ENABLE app").await.unwrap();
    proxy.connect().await;

    // KILL_CLIENT ends that session with 57P01.
    admin_query(&admin, &format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the victim's connection ends")
        .unwrap();
    let err = ended.expect_err("terminated by the admin");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    admin_query(&admin, "RECONNECT app").await.unwrap();
    let err = admin_query(&admin, "KILL_CLIENT 999999").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_clients_lets_connected_clients_finish() {
    let c = cluster();
    let proxy = start_proxy(config(c, with_admin_users)).await;
    let app = proxy.connect().await;
    let admin = admin_client(&proxy, "admin").await;
    admin_query(&admin, "SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();
    drop(admin);
    let addr = proxy.addr;
    eventually(
        Duration::from_secs(10),
        "the listener to close",
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
    // The connected client keeps working until it leaves.
    let rows = app.simple_query("SELECT 1").await.expect("still served");
    assert!(!rows.is_empty());
    assert!(!proxy.task.is_finished());
    drop(app);
    tokio::time::timeout(Duration::from_secs(10), proxy.task)
        .await
        .expect("the proxy stops once the last client left")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_monitor_password_alarms_but_takes_nothing_down() {
    // The probe role's password changes (and its sessions end): the probes are refused, which
    // says nothing about the nodes. Routing goes on, nothing fails over, SHOW NODES and the
    // log name the authentication failure.
    let c = cluster();
    c.psql(0, "postgres", "DROP ROLE IF EXISTS pgpilot_mon")
        .unwrap();
    c.psql(
        0,
        "postgres",
        "CREATE ROLE pgpilot_mon LOGIN SUPERUSER PASSWORD 'mon-secret'",
    )
    .unwrap();
    let proxy = start_proxy(config(c, |cfg| {
        with_admin_users(cfg);
        cfg.cluster.monitor_user = "pgpilot_mon".into();
        cfg.cluster.monitor_password = Some("mon-secret".into());
    }))
    .await;
    let shared = proxy.shared.clone();
    eventually(Duration::from_secs(20), "every node probed", || {
        let v = shared.cluster.view();
        async move { v.primary.is_some() && v.nodes.iter().all(|n| n.healthy) }
    })
    .await;
    c.psql(0, "postgres", "ALTER ROLE pgpilot_mon PASSWORD 'changed'")
        .unwrap();
    c.wait_replayed(Duration::from_secs(20)).unwrap();
    for i in 0..3 {
        c.psql(
            i,
            "postgres",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE usename = 'pgpilot_mon'",
        )
        .unwrap();
    }
    eventually(Duration::from_secs(20), "the refusal to show", || {
        let v = shared.cluster.view();
        async move { v.nodes.iter().all(|n| n.probe_auth_failing) }
    })
    .await;
    // Two failover timeouts later: still healthy, still routed, nothing promoted.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v = shared.cluster.view();
    assert!(v.nodes.iter().all(|n| n.healthy), "{:?}", v.nodes);
    assert_eq!(v.primary, Some(0));
    assert!(shared.failover.history().is_empty());
    let client = proxy.connect().await;
    client
        .simple_query("SELECT count(*) FROM accounts")
        .await
        .expect("reads go on");
    client
        .simple_query("BEGIN; SELECT 1; COMMIT")
        .await
        .expect("the primary is still used");
    let admin = common::admin_client(&proxy, "admin").await;
    let (cols, nodes) = admin_query(&admin, "SHOW NODES").await.unwrap();
    let error = cols
        .iter()
        .position(|c| c == "error")
        .expect("error column");
    for n in &nodes {
        let e = n[error].clone().unwrap_or_default();
        assert!(e.contains("28P01"), "SHOW NODES error: {e:?}");
    }
    // The password fixed: the alarm clears.
    c.psql(
        0,
        "postgres",
        "ALTER ROLE pgpilot_mon PASSWORD 'mon-secret'",
    )
    .unwrap();
    eventually(Duration::from_secs(20), "the alarm to clear", || {
        let v = shared.cluster.view();
        async move { v.nodes.iter().all(|n| !n.probe_auth_failing) }
    })
    .await;
    proxy.shutdown().await;
}
