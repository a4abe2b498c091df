//! Shared integration-test harness: one devcluster per test binary for tests that do not disturb
//! it, the proxy started in-process on port 0, and small client helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use pgpilot::config::Config;
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use pgpilot::devcluster::{DevCluster, DevClusterOptions};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

/// The shared cluster: started on first use, stopped by its watchdog when the test binary exits.
pub fn cluster() -> &'static DevCluster {
    static CLUSTER: OnceLock<DevCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| start_cluster(DevClusterOptions::default()))
}

/// A new cluster with the sample dataset loaded.
pub fn start_cluster(opts: DevClusterOptions) -> DevCluster {
    let c =
        DevCluster::start(opts).unwrap_or_else(|e| panic!("cannot start the test cluster: {e}"));
    pgpilot::demo::load_sample_data(&c).unwrap_or_else(|e| panic!("sample data: {e}"));
    c
}

/// Connects with tokio-postgres and keeps the connection task's result for inspection.
pub async fn connect_watched(
    conninfo: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    (client, tokio::spawn(conn))
}

/// A proxy running in the current test's runtime until dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The Prometheus endpoint, when the config enables it.
    pub metrics: Option<SocketAddr>,
    pub shared: std::sync::Arc<pgpilot::app::Shared>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn conninfo(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.port()
        )
    }

    pub async fn connect(&self) -> Client {
        self.try_connect(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy: {e}"))
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo(user, password, db), NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Graceful shutdown; returns when the proxy has stopped.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("proxy stops within 60s")
            .expect("proxy task");
    }
}

/// The proxy config for `cluster` on an ephemeral port, adjusted by `tweak`.
pub fn config(cluster: &DevCluster, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = pgpilot::demo::config_for(cluster, 0).expect("demo config");
    tweak(&mut config);
    config.validate().expect("test config is valid");
    config
}

pub async fn start_proxy(config: Config) -> TestProxy {
    start_proxy_from(config, None).await
}

/// A proxy whose RELOAD / SIGHUP re-read `path`.
pub async fn start_proxy_from(config: Config, path: Option<std::path::PathBuf>) -> TestProxy {
    capture_logs();
    let proxy = pgpilot::app::Proxy::bind(config).await.expect("bind proxy");
    if let Some(p) = path {
        proxy.set_config_path(p);
    }
    let addr = proxy.local_addr();
    let metrics = proxy.metrics_addr();
    let shared = proxy.shared().clone();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { proxy.serve(token.cancelled_owned()).await });
    TestProxy {
        addr,
        metrics,
        shared,
        stop,
        task,
    }
}

/// The statements the prepared-statement tests run in client `i`: `SELECT $1::int + i` and an
/// owner lookup in the sample data.
pub async fn prepare_add_and_owner(
    client: &Client,
    i: i32,
) -> (tokio_postgres::Statement, tokio_postgres::Statement) {
    let add = client
        .prepare(&format!("SELECT $1::int + {i}"))
        .await
        .expect("prepare the sum");
    let owner = client
        .prepare("SELECT owner FROM accounts WHERE id = $1")
        .await
        .expect("prepare the lookup");
    (add, owner)
}

/// Sends the proxy's log (`RUST_LOG`, default `pgpilot=debug`) to the test's captured output,
/// which the harness prints only for a failing test.
fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pgpilot=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Runs `psql` against the proxy; returns (success, stdout, stderr).
pub async fn psql(proxy_port: u16, password: &str, args: &[&str]) -> (bool, String, String) {
    let password = password.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || psql_blocking(proxy_port, &password, &args))
        .await
        .expect("psql task")
}

/// Runs `psql` with a full connection string; returns (success, stdout, stderr).
pub async fn psql_conn(conninfo: &str, password: &str, args: &[&str]) -> (bool, String, String) {
    let (conninfo, password) = (conninfo.to_owned(), password.to_owned());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || run_psql(&conninfo, &password, &args))
        .await
        .expect("psql task")
}

fn psql_blocking(proxy_port: u16, password: &str, args: &[String]) -> (bool, String, String) {
    let conninfo =
        format!("host=127.0.0.1 port={proxy_port} user={DEMO_USER} dbname={DEMO_DATABASE}");
    run_psql(&conninfo, password, args)
}

fn run_psql(conninfo: &str, password: &str, args: &[String]) -> (bool, String, String) {
    let out = std::process::Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls an async condition until it holds or the deadline passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
pub mod diff;
pub mod load;
pub mod raw;
pub mod relay;
pub mod talk;
pub mod tls;

/// Polls `sql` on node `i` (psql as the superuser) until its output satisfies `ok`.
pub async fn node_eventually(
    c: &std::sync::Arc<DevCluster>,
    i: usize,
    sql: &str,
    timeout: Duration,
    ok: impl Fn(&str) -> bool,
) {
    let what = format!("`{sql}` on {}", c.nodes()[i].name);
    let ok = &ok;
    eventually(timeout, &what, || {
        let (c, sql) = (c.clone(), sql.to_owned());
        async move {
            tokio::task::spawn_blocking(move || c.psql(i, "app", &sql))
                .await
                .expect("psql task")
                .is_ok_and(|v| ok(&v))
        }
    })
    .await;
}

/// Waits until the proxy has probed every node and lowered the replicas'
/// `wal_receiver_timeout` to what failover detection needs.
pub async fn wait_failover_ready(shared: &pgpilot::app::Shared) {
    let wanted = pgpilot::failover::wanted_receiver_timeout(&shared.config().cluster);
    let ms = wanted.as_millis() as u64;
    eventually(Duration::from_secs(20), "receivers tuned", || {
        let v = shared.cluster.view();
        async move {
            v.primary.is_some()
                && v.nodes.iter().filter(|n| n.healthy).count() == v.nodes.len()
                && v.nodes
                    .iter()
                    .filter_map(|n| n.sample.as_ref())
                    .filter(|s| s.in_recovery)
                    .all(|s| s.wal_receiver_timeout_ms.is_some_and(|t| t > 0 && t <= ms))
        }
    })
    .await;
}

/// Waits until node `i` is an unfenced replica again; on timeout, fails with the failover
/// events about it.
pub async fn wait_rejoined(shared: &pgpilot::app::Shared, i: usize, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let v = shared.cluster.view();
        let n = &v.nodes[i];
        if n.role == pgpilot::cluster::Role::Replica && n.fenced.is_none() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let events: Vec<String> = shared
                .failover
                .events()
                .into_iter()
                .filter(|e| e.node == n.name)
                .map(|e| e.what)
                .collect();
            panic!("{} did not rejoin: {events:#?}", n.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const ADMIN_PASSWORD: &str = "admin-secret";
pub const STATS_PASSWORD: &str = "stats-secret";

/// Adds the admin console users `admin` (admin_users) and `stats` (stats_users).
pub fn with_admin_users(cfg: &mut Config) {
    for (name, pw) in [("admin", ADMIN_PASSWORD), ("stats", STATS_PASSWORD)] {
        cfg.users.retain(|u| u.name != name);
        cfg.users.push(pgpilot::config::UserConfig {
            name: name.into(),
            password: Some(pw.into()),
            server_password: None,
        });
    }
    cfg.proxy.admin_users = vec!["admin".into()];
    cfg.proxy.stats_users = vec!["stats".into()];
}

/// A simple-query client on the admin console as `user`.
pub async fn admin_client(proxy: &TestProxy, user: &str) -> Client {
    let pw = if user == "admin" {
        ADMIN_PASSWORD
    } else {
        STATS_PASSWORD
    };
    proxy
        .try_connect(user, pw, "pgpilot")
        .await
        .unwrap_or_else(|e| panic!("admin console as {user}: {e}"))
}

/// Runs an admin command; returns the column names and the rows as text.
pub async fn admin_query(
    client: &Client,
    sql: &str,
) -> Result<(Vec<String>, Vec<Vec<Option<String>>>), tokio_postgres::Error> {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    Ok((columns, rows))
}

/// Crashes node `i` (`pg_ctl stop -m immediate`) without blocking the runtime.
/// Waits for the first failover record and returns the index of the node it promoted. With
/// `synchronous`, the replica holding the most WAL is promoted (the highest priority on a
/// tie): which one depends on where the old primary stopped, so tests ask instead of assuming.
pub async fn promoted(shared: &pgpilot::app::Shared, timeout: Duration) -> usize {
    eventually(timeout, "a failover record", || {
        let done = !shared.failover.history().is_empty();
        async move { done }
    })
    .await;
    let new = shared.failover.history()[0].new.clone();
    shared
        .cluster
        .view()
        .index_of(&new)
        .unwrap_or_else(|| panic!("the promoted node {new} is not in the view"))
}

pub async fn crash_node(c: &std::sync::Arc<DevCluster>, i: usize) {
    let c = c.clone();
    tokio::task::spawn_blocking(move || c.stop_node(i, "immediate"))
        .await
        .expect("stop task")
        .unwrap_or_else(|e| panic!("crash node {i}: {e}"));
}
