//! Memory of idle clients: starts a devcluster and the pgpilot binary as its own process,
//! opens N client connections through it (real startup + SCRAM), and reports the proxy's RSS
//! and how long one `/metrics` scrape takes with that many clients connected.
//!   cargo bench --bench idle_clients -- 1000 10000
//! Loopback only. Needs `ulimit -n` above the largest N plus a margin.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use pgpilot::devcluster::{DevCluster, DevClusterOptions, free_port};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1000, 10_000]
    } else {
        counts
    };
    let cluster = DevCluster::start(DevClusterOptions::default()).expect("devcluster");
    pgpilot::demo::load_sample_data(&cluster).expect("sample data");
    let port = free_port().expect("port");
    let mut config = pgpilot::demo::config_for(&cluster, port).expect("config");
    let metrics_port = free_port().expect("port");
    config.metrics.listen = Some(([127, 0, 0, 1], metrics_port).into());
    let dir = std::env::temp_dir().join(format!("pgpilot-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("pgpilot.toml");
    let mut text = config.to_masked_toml();
    // The masked file hides secrets: put the real ones back.
    text = text.replace("\"********\"", "\"__SECRET__\"");
    let text = text
        .replacen("__SECRET__", pgpilot::devcluster::SUPERUSER_PASSWORD, 1)
        .replacen("__SECRET__", DEMO_PASSWORD, 1);
    std::fs::write(&file, text).expect("config file");
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_pgpilot"))
        .args(["--config", file.to_str().unwrap_or_default()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start pgpilot");
    let pid = proxy.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let info = format!(
            "host=127.0.0.1 port={port} user={DEMO_USER} password={DEMO_PASSWORD} dbname={DEMO_DATABASE}"
        );
        // Wait until the proxy answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio_postgres::connect(&info, tokio_postgres::NoTls).await.is_err() {
            assert!(Instant::now() < deadline, "pgpilot did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = rss_kib(pid);
        println!("machine: {} cores; pgpilot RSS with 0 clients: {:.1} MiB", num_cpus(), base as f64 / 1024.0);
        println!(
            "{:>8} {:>12} {:>14} {:>10} {:>12}",
            "clients", "RSS MiB", "per client KiB", "connect s", "scrape ms"
        );
        let mut clients = Vec::new();
        for &n in &counts {
            let started = Instant::now();
            while clients.len() < n {
                let batch: Vec<_> = (clients.len()..n.min(clients.len() + 200))
                    .map(|_| {
                        let info = info.clone();
                        tokio::spawn(async move {
                            let (client, conn) =
                                tokio_postgres::connect(&info, tokio_postgres::NoTls).await.expect("connect");
                            tokio::spawn(conn);
                            client
                        })
                    })
                    .collect();
                for b in batch {
                    clients.push(b.await.expect("connect task"));
                }
            }
            let took = started.elapsed();
            // Every client ran one query and is idle now.
            for c in clients.iter().step_by((n / 50).max(1)) {
                c.simple_query("SELECT 1").await.expect("query");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = rss_kib(pid);
            let scrape = scrape_ms(metrics_port).await;
            println!(
                "{:>8} {:>12.1} {:>14.1} {:>10.1} {:>12.2}",
                n,
                rss as f64 / 1024.0,
                (rss.saturating_sub(base)) as f64 / n as f64,
                took.as_secs_f64(),
                scrape
            );
        }
        drop(clients);
    });
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// Mean of 20 `GET /metrics` round trips, in milliseconds.
async fn scrape_ms(port: u16) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("metrics endpoint");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await
            .expect("request");
        let mut body = Vec::new();
        tcp.read_to_end(&mut body).await.expect("response");
        assert!(body.starts_with(b"HTTP/1.1 200"), "scrape failed");
    }
    started.elapsed().as_secs_f64() * 1000.0 / 20.0
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
