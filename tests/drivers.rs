//! Real drivers as the judges: each script in `tests/drivers/` does what applications do
//! (transactions with prepared statements freed inside them, prepare → DDL → execute,
//! pipelines, COPY, cancel) and prints what it sees. It runs directly against PostgreSQL and
//! through pgpilot (transaction pooling, a pool of two, clients churning beside it), and the
//! two outputs must be identical. The drivers are Debian's packages (`.ci/run` installs them);
//! a missing one fails its test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{TestProxy, cluster, config, start_proxy};
use pgpilot::config::Routing;
use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/drivers")
        .join(name)
}

/// Runs `program args` against `port`; its standard output, or a panic with what it printed.
async fn run(program: &str, args: Vec<String>, port: u16, table: &str) -> String {
    let (program, table) = (program.to_owned(), table.to_owned());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&program)
            .args(&args)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", DEMO_USER)
            .env("PGPASSWORD", DEMO_PASSWORD)
            .env("PGDATABASE", DEMO_DATABASE)
            .env("DRIVER_TABLE", &table)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} (is its driver installed?): {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{program} {args:?} on port {port} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .expect("driver task")
}

/// Clients that keep taking server connections, so the driver's requests change hands.
async fn churn(proxy: &TestProxy, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let client = proxy.connect().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if client
                    .batch_execute("BEGIN; SELECT count(*) FROM accounts; COMMIT")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    tasks
}

/// The driver's output directly and through pgpilot must be the same.
async fn judge(program: &str, args: Vec<String>, table: &str) {
    let direct = run(program, args.clone(), cluster().port(0), table).await;
    assert!(!direct.is_empty(), "{program} printed nothing");
    let proxy = start_proxy(config(cluster(), |c| {
        c.proxy.pool_size = 2;
        c.databases[0].routing = Routing::Primary;
    }))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = churn(&proxy, stop.clone()).await;
    let proxied = run(program, args, proxy.port(), table).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    for (i, (d, p)) in direct.lines().zip(proxied.lines()).enumerate() {
        assert_eq!(
            d, p,
            "line {i} differs; direct:\n{direct}\nthrough pgpilot:\n{proxied}"
        );
    }
    assert_eq!(
        direct.lines().count(),
        proxied.lines().count(),
        "{direct}\n---\n{proxied}"
    );
    println!("{program}:\n{proxied}");
}

fn python(name: &str) -> Vec<String> {
    vec![script(name).display().to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3() {
    judge("/usr/bin/python3", python("psycopg3.py"), "drv_psycopg3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2() {
    judge(
        "/usr/bin/python3",
        python("psycopg2_driver.py"),
        "drv_psycopg2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    judge(
        "/usr/bin/python3",
        python("asyncpg_driver.py"),
        "drv_asyncpg",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_pdo() {
    judge(
        "php",
        vec![script("pdo.php").display().to_string()],
        "drv_pdo",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruby_pg() {
    judge(
        "ruby",
        vec![script("ruby_pg.rb").display().to_string()],
        "drv_ruby",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let classes = tempdir();
    let jar = "/usr/share/java/postgresql.jar";
    let built = std::process::Command::new("javac")
        .args(["-d", &classes, "-cp", jar])
        .arg(script("Jdbc.java"))
        .status()
        .expect("javac (a JDK) is needed for the pgJDBC test");
    assert!(built.success(), "javac failed");
    let cp = format!("{classes}:{jar}");
    judge("java", vec!["-cp".into(), cp, "Jdbc".into()], "drv_jdbc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx() {
    // Built against Debian's packaged pgx v4, without modules (nothing is downloaded).
    let dir = std::env::temp_dir().join(format!("pgpilot-pgx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let binary = dir.join("pgx-driver");
    let built = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(script("pgx.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("cache"))
        .status()
        .expect("go (golang-go) and golang-github-jackc-pgx-v4-dev are needed for the pgx test");
    assert!(built.success(), "go build failed");
    judge(&binary.display().to_string(), Vec::new(), "drv_pgx").await;
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("pgpilot-jdbc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.display().to_string()
}
