//! Failover time and client damage, the way the reference systems were measured: a three-node
//! devcluster (PostgreSQL on loopback), one client writing every 20 ms through pgpilot on one
//! connection, the primary killed with `pg_ctl stop -m immediate` (crash) or frozen with
//! SIGSTOP (hang). Each round measures the time from the kill to the next acknowledged write,
//! the errors the writer saw, whether its connection survived, and acknowledged writes missing
//! on the new primary. Between rounds the old primary is restarted and rejoins (rejoin script).
//!   cargo bench --bench failover -- [crash rounds] [hang rounds] [drills: 1 or 0]
//! Prints a table and writes `target/failover.svg`, the writer's latency around one crash;
//! then runs the fault drills (`failover/drills.rs`), each on a cluster of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpilot::demo::{DEMO_DATABASE, DEMO_PASSWORD, DEMO_USER};
use pgpilot::devcluster::{DevCluster, DevClusterOptions};

#[path = "failover/drills.rs"]
mod drills;

const PERIOD: Duration = Duration::from_millis(20);

struct Round {
    kind: &'static str,
    resume: Duration,
    errors: usize,
    disconnected: bool,
    lost: usize,
    /// (ms since the kill, latency ms, ok) for every write of the round.
    samples: Vec<(f64, f64, bool)>,
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let crashes = args.next().unwrap_or(5);
    let hangs = args.next().unwrap_or(3);
    let run_drills = args.next().unwrap_or(1) != 0;
    let cluster = Arc::new(DevCluster::start(DevClusterOptions::default()).expect("devcluster"));
    pgpilot::demo::load_sample_data(&cluster).expect("sample data");
    cluster
        .psql(
            0,
            DEMO_DATABASE,
            "CREATE TABLE ledger (seq int PRIMARY KEY); GRANT ALL ON ledger TO app",
        )
        .expect("ledger");
    let mut config = pgpilot::demo::config_for(&cluster, 0).expect("config");
    config.cluster.synchronous = true;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rounds = runtime.block_on(async {
        let proxy = pgpilot::app::Proxy::bind(config).await.expect("bind");
        let port = proxy.local_addr().port();
        let shared = proxy.shared().clone();
        tokio::spawn(proxy.serve(std::future::pending()));
        let client = connect(port).await;
        let mut seq = 0;
        let mut rounds = Vec::new();
        for r in 0..crashes + hangs {
            let kind = if r < crashes { "crash" } else { "hang" };
            wait_ready(&shared).await;
            let primary = shared.cluster.view().primary.expect("a primary");
            // Steady writes first, then the kill, then writes until 2 s after resuming.
            let mut acked = Vec::new();
            let mut samples = Vec::new();
            for _ in 0..25 {
                seq += 1;
                if write(&client, seq).await.is_ok() {
                    acked.push(seq);
                }
                tokio::time::sleep(PERIOD).await;
            }
            let c = cluster.clone();
            let killed = Instant::now();
            if kind == "crash" {
                tokio::task::spawn_blocking(move || c.stop_node(primary, "immediate"))
                    .await
                    .expect("join")
                    .expect("kill");
            } else {
                c.signal_node(primary, "STOP").expect("SIGSTOP");
            }
            let mut resume = None;
            let mut errors = 0;
            while resume.is_none_or(|t: Duration| killed.elapsed() < t + Duration::from_secs(2))
                && killed.elapsed() < Duration::from_secs(60)
            {
                seq += 1;
                let sent = Instant::now();
                let ok = write(&client, seq).await.is_ok();
                let at = sent.duration_since(killed).as_secs_f64() * 1000.0;
                samples.push((at, sent.elapsed().as_secs_f64() * 1000.0, ok));
                if ok {
                    acked.push(seq);
                    resume.get_or_insert(killed.elapsed());
                } else {
                    errors += 1;
                }
                tokio::time::sleep(PERIOD).await;
            }
            let new_primary = shared.cluster.view().primary.expect("a new primary");
            let stored = cluster
                .psql(new_primary, DEMO_DATABASE, "SELECT seq FROM ledger")
                .expect("read ledger");
            let stored: std::collections::HashSet<i32> =
                stored.lines().filter_map(|l| l.parse().ok()).collect();
            let lost = acked.iter().filter(|s| !stored.contains(s)).count();
            let round = Round {
                kind,
                resume: resume.unwrap_or(Duration::MAX),
                errors,
                disconnected: client.is_closed(),
                lost,
                samples,
            };
            let longest = round.samples.iter().map(|s| s.1).fold(0.0, f64::max);
            println!(
                "{kind:5} round {}: writes resumed after {:>5.0} ms (longest write {longest:>5.0} ms), {} errors, connection {}, {} acknowledged writes lost",
                r + 1,
                round.resume.as_secs_f64() * 1000.0,
                round.errors,
                if round.disconnected { "LOST" } else { "kept" },
                round.lost
            );
            rounds.push(round);
            // Bring the old primary back; the rejoin script makes it a replica again.
            let c = cluster.clone();
            if kind == "crash" {
                tokio::task::spawn_blocking(move || c.start_node(primary))
                    .await
                    .expect("join")
                    .expect("restart");
            } else {
                c.signal_node(primary, "CONT").expect("SIGCONT");
            }
        }
        rounds
    });
    summarize(&rounds, "crash");
    summarize(&rounds, "hang");
    if let Some(r) = rounds.iter().find(|r| r.kind == "crash") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/failover.svg");
        std::fs::write(&path, svg(r)).expect("write svg");
        println!("\nlatency around the first crash: {}", path.display());
    }
    if run_drills {
        println!();
        for drill in [
            runtime.block_on(drills::priority_vs_position()),
            runtime.block_on(drills::replicas_first_strict()),
        ] {
            drills::print(&drill);
        }
    }
    drop(runtime);
}

/// A client of the proxy on `port`, as the demo user.
async fn connect(port: u16) -> tokio_postgres::Client {
    let info = format!(
        "host=127.0.0.1 port={port} user={DEMO_USER} password={DEMO_PASSWORD} dbname={DEMO_DATABASE}"
    );
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn write(client: &tokio_postgres::Client, seq: i32) -> Result<(), tokio_postgres::Error> {
    client
        .execute("INSERT INTO ledger VALUES ($1)", &[&seq])
        .await
        .map(|_| ())
}

/// Every node up, unfenced, probed, with receivers tuned: the state a round starts from.
async fn wait_ready(shared: &pgpilot::app::Shared) {
    let wanted = pgpilot::failover::wanted_receiver_timeout(&shared.config().cluster);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = shared.cluster.view();
        let ready = v.primary.is_some()
            && v.nodes.iter().all(|n| n.healthy && n.fenced.is_none())
            && v.nodes.iter().filter_map(|n| n.sample.as_ref()).all(|s| {
                !s.in_recovery
                    || (s.streaming
                        && s.wal_receiver_timeout_ms
                            .is_some_and(|t| t > 0 && t <= wanted.as_millis() as u64))
            });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "cluster not ready: {v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn summarize(rounds: &[Round], kind: &str) {
    let mut ms: Vec<f64> = rounds
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.resume.as_secs_f64() * 1000.0)
        .collect();
    if ms.is_empty() {
        return;
    }
    ms.sort_by(f64::total_cmp);
    let of =
        |f: fn(&Round) -> usize| -> usize { rounds.iter().filter(|r| r.kind == kind).map(f).sum() };
    println!(
        "\n{kind}: {} rounds, resume median {:.0} ms (min {:.0}, max {:.0}); errors {}, disconnects {}, lost writes {}",
        ms.len(),
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        of(|r| r.errors),
        of(|r| usize::from(r.disconnected)),
        of(|r| r.lost)
    );
}

/// A small scatter plot: write latency (log scale) against time since the kill.
fn svg(r: &Round) -> String {
    let (w, h, left, bottom) = (720.0, 300.0, 60.0, 40.0);
    let t_max = r.samples.iter().map(|s| s.0).fold(1000.0, f64::max);
    let l_max = r.samples.iter().map(|s| s.1).fold(10.0, f64::max);
    let x = |t: f64| left + (t / t_max) * (w - left - 20.0);
    let y = |l: f64| {
        (h - bottom) - (l.max(0.1).log10() + 1.0) / (l_max.log10() + 1.0) * (h - bottom - 20.0)
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"14\">pgpilot: write latency around a primary crash (one write every 20 ms, kill at 0)</text>\n\
         <line x1=\"{left}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"20\" x2=\"{left}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{k}\" y1=\"20\" x2=\"{k}\" y2=\"{b}\" stroke=\"red\" stroke-dasharray=\"4\"/>\n\
         <text x=\"{k}\" y=\"30\" fill=\"red\"> kill</text>\n",
        b = h - bottom,
        r = w - 20.0,
        k = x(0.0),
    );
    let resume = r.resume.as_secs_f64() * 1000.0;
    out.push_str(&format!(
        "<line x1=\"{rx}\" y1=\"20\" x2=\"{rx}\" y2=\"{b}\" stroke=\"green\" stroke-dasharray=\"4\"/>\n\
         <text x=\"{rx}\" y=\"44\" fill=\"green\"> resumed {resume:.0} ms</text>\n",
        rx = x(resume),
        b = h - bottom
    ));
    for ms in [1.0, 10.0, 100.0, 1000.0] {
        if ms <= l_max * 1.5 {
            out.push_str(&format!(
                "<text x=\"5\" y=\"{}\">{ms} ms</text>\n",
                y(ms) + 4.0
            ));
        }
    }
    for t in (0..=(t_max as usize)).step_by(500) {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{t}</text>\n",
            x(t as f64) - 8.0,
            h - bottom + 15.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\">ms since the kill</text>\n",
        w / 2.0 - 40.0,
        h - 8.0
    ));
    for (t, l, ok) in &r.samples {
        let color = if *ok { "steelblue" } else { "red" };
        out.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>\n",
            x(*t),
            y(*l)
        ));
    }
    out.push_str("</svg>\n");
    out
}
