//! The Prometheus endpoint on `[metrics] listen`: `/metrics` (text format 0.0.4), `/healthz`
//! (the process answers) and `/readyz` (an elected primary is known). A minimal HTTP/1.1
//! responder: one request per connection, bounded in size and time. A scrape walks pools,
//! nodes and databases, never clients, so it stays cheap with 10,000 of them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::app::Shared;
use crate::cluster::Role;
use crate::stats::{BUCKETS, Histogram};

const MAX_REQUEST: usize = 8192;

type TotalsField = fn(&crate::stats::Totals) -> f64;
type HistogramOf = fn(&crate::stats::DbStats) -> &Histogram;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, respond(tcp, &shared)).await {
                debug!(error = %e, "metrics request timed out");
            }
        });
    }
}

async fn respond(mut tcp: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return reply(
                &mut tcp,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return reply(
            &mut tcp,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    let text = "text/plain; charset=utf-8";
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = render(shared);
            reply(
                &mut tcp,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        "/healthz" => reply(&mut tcp, "200 OK", text, "ok\n").await,
        "/readyz" => match shared.cluster.view().primary() {
            Some(p) => {
                let body = format!("ready: primary {}\n", p.name);
                reply(&mut tcp, "200 OK", text, &body).await
            }
            None => {
                reply(
                    &mut tcp,
                    "503 Service Unavailable",
                    text,
                    "no elected primary\n",
                )
                .await
            }
        },
        _ => reply(&mut tcp, "404 Not Found", text, "not found\n").await,
    }
}

async fn reply(
    tcp: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let (cumulative, sum) = h.snapshot();
        for (i, count) in cumulative.iter().enumerate() {
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, count);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(
            &format!("{name}_count"),
            labels,
            cumulative.last().copied().unwrap_or(0),
        );
    }
}

pub fn render(shared: &Shared) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    o.family("pgpilot_up", "gauge", "1 while the process serves.");
    o.sample("pgpilot_up", &[], 1);
    o.family("pgpilot_client_connections", "gauge", "Connected clients.");
    o.sample(
        "pgpilot_client_connections",
        &[],
        shared.clients.load(Ordering::Relaxed),
    );

    let pools = shared.pools.all();
    o.family(
        "pgpilot_server_connections",
        "gauge",
        "Server connections per pool and state (active: lent to a client).",
    );
    for p in &pools {
        let base = [
            ("node", &*p.key.node),
            ("database", &*p.key.database),
            ("user", &*p.key.user),
        ];
        for (state, n) in [("active", p.active_count()), ("idle", p.idle_count())] {
            let mut l = base.to_vec();
            l.push(("state", state));
            o.sample("pgpilot_server_connections", &l, n);
        }
    }
    o.family(
        "pgpilot_pool_waiting_clients",
        "gauge",
        "Clients waiting for a server connection.",
    );
    for p in &pools {
        let l = [
            ("node", &*p.key.node),
            ("database", &*p.key.database),
            ("user", &*p.key.user),
        ];
        o.sample("pgpilot_pool_waiting_clients", &l, p.waiting_count());
    }

    let dbs = shared.stats.all();
    let counters: [(&str, &str, TotalsField); 5] = [
        ("pgpilot_transactions_total", "Transactions served.", |t| {
            t.xact_count as f64
        }),
        (
            "pgpilot_queries_total",
            "Requests (up to ReadyForQuery) served.",
            |t| t.query_count as f64,
        ),
        (
            "pgpilot_received_bytes_total",
            "Bytes received from clients.",
            |t| t.received as f64,
        ),
        ("pgpilot_sent_bytes_total", "Bytes sent to clients.", |t| {
            t.sent as f64
        }),
        (
            "pgpilot_wait_seconds_total",
            "Time clients waited for a server connection.",
            |t| t.wait_time as f64 / 1e6,
        ),
    ];
    for (name, help, get) in counters {
        o.family(name, "counter", help);
        for (db, st) in &dbs {
            o.sample(name, &[("database", db)], get(&st.totals()));
        }
    }
    let name = "pgpilot_pipelined_queries_total";
    o.family(
        name,
        "counter",
        "Requests served on a server connection shared with other clients (pipeline_depth).",
    );
    for (db, st) in &dbs {
        o.sample(name, &[("database", db)], st.pipelined_count() as f64);
    }
    let histograms: [(&str, &str, HistogramOf); 3] = [
        (
            "pgpilot_query_duration_seconds",
            "Request latency, sent to ReadyForQuery.",
            |s| &s.query_duration,
        ),
        (
            "pgpilot_transaction_duration_seconds",
            "Transaction duration.",
            |s| &s.xact_duration,
        ),
        (
            "pgpilot_wait_duration_seconds",
            "Wait for a server connection.",
            |s| &s.wait_duration,
        ),
    ];
    for (name, help, get) in histograms {
        o.family(name, "histogram", help);
        for (db, st) in &dbs {
            o.histogram(name, &[("database", db)], get(st));
        }
    }
    o.family(
        "pgpilot_errors_total",
        "counter",
        "Errors servers returned to clients, by SQLSTATE class.",
    );
    for (class, n) in shared.stats.errors() {
        o.sample("pgpilot_errors_total", &[("class", &class)], n);
    }

    let view = shared.cluster.view();
    o.family(
        "pgpilot_node_up",
        "gauge",
        "1 when the node's probes succeed (with hysteresis).",
    );
    for n in &view.nodes {
        o.sample("pgpilot_node_up", &[("node", &n.name)], u8::from(n.healthy));
    }
    o.family(
        "pgpilot_node_probe_auth_failing",
        "gauge",
        "1 while the node refuses the probes' login (monitor_user / monitor_password).",
    );
    for n in &view.nodes {
        let failing = u8::from(n.probe_auth_failing);
        o.sample(
            "pgpilot_node_probe_auth_failing",
            &[("node", &n.name)],
            failing,
        );
    }
    o.family(
        "pgpilot_node_role",
        "gauge",
        "1 for the role the node's probes report.",
    );
    for n in &view.nodes {
        for role in [Role::Primary, Role::Replica, Role::Down, Role::Unknown] {
            let r = role.to_string();
            o.sample(
                "pgpilot_node_role",
                &[("node", &n.name), ("role", &r)],
                u8::from(n.role == role),
            );
        }
    }
    o.family(
        "pgpilot_node_elected",
        "gauge",
        "1 for the elected primary.",
    );
    o.family("pgpilot_node_fenced", "gauge", "1 for a fenced node.");
    o.family(
        "pgpilot_node_lag_bytes",
        "gauge",
        "Replay lag behind the elected primary.",
    );
    o.family(
        "pgpilot_node_lag_seconds",
        "gauge",
        "Replay lag in time, while behind.",
    );
    o.family(
        "pgpilot_probe_duration_seconds",
        "gauge",
        "Duration of the latest successful probe.",
    );
    for (i, n) in view.nodes.iter().enumerate() {
        let l = [("node", n.name.as_str())];
        o.sample(
            "pgpilot_node_elected",
            &l,
            u8::from(view.elected == Some(i)),
        );
        o.sample("pgpilot_node_fenced", &l, u8::from(n.fenced.is_some()));
        if let Some(b) = n.lag_bytes {
            o.sample("pgpilot_node_lag_bytes", &l, b);
        }
        if let Some(s) = n.lag_seconds {
            o.sample("pgpilot_node_lag_seconds", &l, s);
        }
        if let Some(s) = &n.sample {
            o.sample(
                "pgpilot_probe_duration_seconds",
                &l,
                s.duration.as_secs_f64(),
            );
        }
    }
    o.family(
        "pgpilot_epoch",
        "gauge",
        "Epoch of the elected primary (grows with every change).",
    );
    o.sample("pgpilot_epoch", &[], view.epoch);
    let history = shared.failover.history();
    o.family(
        "pgpilot_failovers_total",
        "counter",
        "Promotions by kind (failover, switchover, promote).",
    );
    for kind in ["failover", "switchover", "promote"] {
        let n = history.iter().filter(|r| r.kind == kind).count();
        o.sample("pgpilot_failovers_total", &[("kind", kind)], n);
    }
    o.family(
        "pgpilot_last_failover_phase_seconds",
        "gauge",
        "Time spent in each phase of the latest promotion.",
    );
    if let Some(r) = history.last() {
        for (phase, d) in &r.phases {
            o.sample(
                "pgpilot_last_failover_phase_seconds",
                &[("kind", r.kind), ("phase", phase)],
                d.as_secs_f64(),
            );
        }
        o.sample(
            "pgpilot_last_failover_phase_seconds",
            &[("kind", r.kind), ("phase", "total")],
            r.total.as_secs_f64(),
        );
    }
    o.0
}
