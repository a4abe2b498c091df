//! The Prometheus endpoint during a pgbench run: counters grow between scrapes, histograms are
//! cumulative with `_count` equal to the `+Inf` bucket; `/healthz` and `/readyz` answer.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{cluster, config, eventually, start_proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: pgpilot\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// `name{labels}` → value, for every sample line.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_grow_during_pgbench_and_probes_answer() {
    let c = cluster();
    let proxy = start_proxy(config(c, |cfg| {
        cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    }))
    .await;
    let addr = proxy.metrics.expect("metrics enabled");
    let shared = proxy.shared.clone();
    eventually(Duration::from_secs(10), "a primary", || {
        let ready = shared.cluster.view().primary.is_some();
        async move { ready }
    })
    .await;
    let (status, body) = get(addr, "/readyz").await;
    assert!(status.contains("200"), "{status} {body}");
    let (status, _) = get(addr, "/healthz").await;
    assert!(status.contains("200"));
    let (status, _) = get(addr, "/nothing").await;
    assert!(status.contains("404"));

    let dir = std::env::temp_dir().join(format!("pgpilot-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let port = proxy.port();
    let bench = tokio::task::spawn_blocking(move || {
        std::process::Command::new("pgbench")
            .args(["-n", "-c", "4", "-j", "2", "-T", "4", "-f"])
            .arg(&script)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "app",
                "app",
            ])
            .env("PGPASSWORD", pgpilot::demo::DEMO_PASSWORD)
            .output()
            .expect("run pgbench")
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = samples(&get(addr, "/metrics").await.1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains("200"));
    let second = samples(&body);
    let out = bench.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for name in [
        "pgpilot_queries_total{database=\"app\"}",
        "pgpilot_transactions_total{database=\"app\"}",
        "pgpilot_received_bytes_total{database=\"app\"}",
        "pgpilot_sent_bytes_total{database=\"app\"}",
    ] {
        let (a, b) = (first.get(name), second.get(name));
        assert!(
            matches!((a, b), (Some(a), Some(b)) if b > a),
            "{name}: {a:?} -> {b:?}"
        );
    }
    // Histogram: buckets cumulative, +Inf = _count, and most SELECT 1s well under a second.
    let h = "pgpilot_query_duration_seconds";
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{h}_bucket{{database=\"app\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert!(buckets.len() > 10, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let count = second[&format!("{h}_count{{database=\"app\"}}")];
    assert_eq!(buckets.last().copied(), Some(count));
    let under_1s = second[&format!("{h}_bucket{{database=\"app\",le=\"1\"}}")];
    assert!(under_1s >= count * 0.99, "{under_1s} of {count}");
    assert_eq!(second["pgpilot_node_elected{node=\"pg1\"}"], 1.0);
    assert_eq!(second["pgpilot_node_up{node=\"pg2\"}"], 1.0);
    assert!(body.contains("# TYPE pgpilot_query_duration_seconds histogram"));
    // Every metric the Grafana dashboard queries is exported.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/compose/grafana/pgpilot-dashboard.json"
    ))
    .expect("dashboard");
    let mut used: Vec<&str> = dashboard
        .match_indices("pgpilot_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .map(|m| m.trim_end_matches("_bucket"))
        .filter(|m| *m != "pgpilot_") // the dashboard's own uid/title
        .collect();
    used.sort();
    used.dedup();
    assert!(used.len() > 10, "{used:?}");
    for m in used {
        assert!(
            body.contains(&format!("# TYPE {m} ")),
            "the dashboard uses {m}, not exported"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    proxy.shutdown().await;
}
