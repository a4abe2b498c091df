//! `coordinator = "etcd"` with three pgpilot instances in front of one cluster and a local
//! etcd (Debian package `etcd-server`): exactly one instance leads; when the primary crashes,
//! exactly one promotion happens and every instance routes writes to the new primary; when
//! the leader stops, another takes over. Built only with `--features etcd`.
#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{config, eventually, start_cluster, start_proxy};
use pgpilot::config::{Coordinator, Dur};
use pgpilot::devcluster::{DevClusterOptions, free_port};

struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_etcd() -> Etcd {
    let (client, peer) = (free_port().unwrap(), free_port().unwrap());
    let dir = std::env::temp_dir().join(format!("pgpilot-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--name", "test"])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (apt-get install etcd-server)");
    Etcd { child, dir, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_agree_and_promote_once() {
    let etcd = start_etcd();
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    c.psql(
        0,
        "app",
        "CREATE TABLE marks (port int); GRANT ALL ON marks TO app",
    )
    .unwrap();
    let prefix = format!("/pgpilot/test-{}", std::process::id());
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let cfg = config(&c, |cfg| {
            cfg.cluster.coordinator = Coordinator::Etcd;
            cfg.cluster.etcd_endpoints = vec![etcd.url.clone()];
            cfg.cluster.etcd_prefix = prefix.clone();
            cfg.cluster.etcd_lease_ttl = Dur::secs(2);
        });
        proxies.push(start_proxy(cfg).await);
    }
    let shareds: Vec<_> = proxies.iter().map(|p| p.shared.clone()).collect();
    let leaders =
        |s: &[Arc<pgpilot::app::Shared>]| s.iter().filter(|x| x.failover.may_decide()).count();
    eventually(
        Duration::from_secs(30),
        "one leader, pg1 elected everywhere",
        || {
            let ok = leaders(&shareds) == 1
                && shareds
                    .iter()
                    .all(|s| s.cluster.view().primary().is_some_and(|p| p.name == "pg1"));
            async move { ok }
        },
    )
    .await;
    common::wait_failover_ready(&shareds[0]).await;

    common::crash_node(&c, 0).await;
    eventually(
        Duration::from_secs(30),
        "pg2 primary for every instance, and the failover recorded",
        || {
            // The record is written once the replicas are repointed, after pg2 is published.
            let recorded = shareds.iter().any(|s| !s.failover.history().is_empty());
            let ok = recorded
                && shareds
                    .iter()
                    .all(|s| s.cluster.view().primary().is_some_and(|p| p.name == "pg2"));
            async move { ok }
        },
    )
    .await;
    let promotions: usize = shareds.iter().map(|s| s.failover.history().len()).sum();
    assert_eq!(promotions, 1, "exactly one instance promoted");
    // Every instance writes to pg2, the followers included.
    for p in &proxies {
        let client = p.connect().await;
        let port: i32 = client
            .query_one(
                "INSERT INTO marks VALUES (inet_server_port()) RETURNING port",
                &[],
            )
            .await
            .expect("write through every instance")
            .get(0);
        assert_eq!(port as u16, c.port(1));
    }

    // The leader stops: another instance takes the lease.
    let leader = shareds
        .iter()
        .position(|s| s.failover.may_decide())
        .expect("a leader");
    let stopped = proxies.remove(leader);
    stopped.shutdown().await;
    let rest: Vec<_> = proxies.iter().map(|p| p.shared.clone()).collect();
    eventually(Duration::from_secs(15), "a new leader", || {
        let n = leaders(&rest);
        async move { n == 1 }
    })
    .await;
    for p in proxies {
        p.shutdown().await;
    }
}
