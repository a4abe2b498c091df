//! The pgpilot binary answers PgBouncer's signals: SIGUSR1 pauses every database (as
//! `PAUSE`; SHOW DATABASES says so and requests wait), SIGUSR2 resumes them (as `RESUME`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ADMIN_PASSWORD, admin_query, cluster, config, eventually, with_admin_users};
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{name}");
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Option<tokio_postgres::Client> {
    let info = format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}");
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

async fn paused(admin: &tokio_postgres::Client) -> Option<String> {
    let (cols, rows) = admin_query(admin, "SHOW DATABASES").await.ok()?;
    let at = cols.iter().position(|c| c == "paused")?;
    rows.iter()
        .find(|r| r[0].as_deref() == Some(DEMO_DATABASE))
        .and_then(|r| r[at].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_pauses_and_sigusr2_resumes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cfg = config(cluster(), |c| {
        with_admin_users(c);
        c.proxy.listen = format!("127.0.0.1:{port}").parse().unwrap();
    });
    cfg.metrics.listen = None;
    let dir = tempfile_dir();
    let path = dir.join("pgpilot.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("render config")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pgpilot"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgpilot");
    let child = Running(child);
    eventually(
        Duration::from_secs(20),
        "pgpilot accepting logins",
        || async {
            connect(port, "admin", ADMIN_PASSWORD, "pgpilot")
                .await
                .is_some()
        },
    )
    .await;
    let admin = connect(port, "admin", ADMIN_PASSWORD, "pgpilot")
        .await
        .expect("admin console");
    let app = connect(port, DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)
        .await
        .expect("app login");
    app.simple_query("SELECT 1").await.unwrap();
    assert_eq!(paused(&admin).await.as_deref(), Some("0"));

    signal(&child.0, "USR1");
    eventually(
        Duration::from_secs(10),
        "SHOW DATABASES paused = 1",
        || async { paused(&admin).await.as_deref() == Some("1") },
    )
    .await;
    // A request issued while paused waits; it runs once resumed.
    let waiting = tokio::spawn(async move { app.simple_query("SELECT 2").await.map(|_| ()) });
    signal(&child.0, "USR2");
    eventually(
        Duration::from_secs(10),
        "SHOW DATABASES paused = 0",
        || async { paused(&admin).await.as_deref() == Some("0") },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the paused request ran after SIGUSR2")
        .expect("task")
        .expect("query");
    drop(child);
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgpilot-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
