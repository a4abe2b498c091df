//! RELOAD and SIGHUP: a replica added to the file starts getting reads, a broken file is
//! refused with the old configuration still running, a removed replica stops getting reads;
//! clients stay connected throughout.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{admin_client, admin_query, config, eventually, start_cluster, start_proxy_from};
use pgpilot::config::Config;
use pgpilot::devcluster::DevClusterOptions;

fn write(path: &std::path::Path, config: &Config) {
    std::fs::write(path, toml::to_string(config).expect("serialize config")).expect("write");
}

async fn read_ports(client: &tokio_postgres::Client, n: usize) -> HashSet<u16> {
    let mut ports = HashSet::new();
    for _ in 0..n {
        let port: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .expect("read")
            .get(0);
        ports.insert(port as u16);
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_replicas_and_refuses_a_broken_file() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    let full = config(&c, common::with_admin_users);
    let first = with_nodes(full.clone(), 2);
    let dir = std::env::temp_dir().join(format!("pgpilot-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgpilot.toml");
    write(&path, &first);
    let proxy = start_proxy_from(first, Some(path.clone())).await;
    let shared = proxy.shared.clone();
    let (pg2, pg3) = (c.port(1), c.port(2));
    let app = proxy.connect().await;
    eventually(Duration::from_secs(10), "pg2 probed", || {
        let v = shared.cluster.view();
        async move { v.nodes.iter().filter(|n| n.healthy).count() == 2 }
    })
    .await;
    assert_eq!(read_ports(&app, 10).await, HashSet::from([pg2]));

    // pg3 added, and a bigger pool.
    let mut second = full.clone();
    second.proxy.pool_size = 7;
    write(&path, &second);
    let admin = admin_client(&proxy, "admin").await;
    admin_query(&admin, "RELOAD").await.expect("RELOAD");
    eventually(Duration::from_secs(15), "reads on pg3", || {
        let app = &app;
        async move { read_ports(app, 6).await.contains(&pg3) }
    })
    .await;
    let (_, rows) = admin_query(&admin, "SHOW CONFIG").await.unwrap();
    let pool_size = |rows: &[Vec<Option<String>>]| {
        rows.iter()
            .find(|r| r[0].as_deref() == Some("proxy.pool_size"))
            .and_then(|r| r[1].clone())
    };
    assert_eq!(pool_size(&rows).as_deref(), Some("7"));

    // A broken file is refused; nothing changes.
    std::fs::write(&path, "[proxy]\npool_size = \"many\"\n").unwrap();
    let err = admin_query(&admin, "RELOAD").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("F0000"), "{err}");
    let (_, rows) = admin_query(&admin, "SHOW CONFIG").await.unwrap();
    assert_eq!(pool_size(&rows).as_deref(), Some("7"));
    assert!(!read_ports(&app, 4).await.is_empty());

    // SIGHUP with pg3 gone from the file: it is removed and gets no more reads.
    write(&path, &with_nodes(full.clone(), 2));
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    eventually(Duration::from_secs(10), "pg3 removed", || {
        let v = shared.cluster.view();
        async move { v.nodes[2].fenced == Some(pgpilot::cluster::Fence::Removed) }
    })
    .await;
    assert_eq!(read_ports(&app, 10).await, HashSet::from([pg2]));
    assert!(!app.is_closed());
    let _ = std::fs::remove_dir_all(&dir);
    proxy.shutdown().await;
}

fn with_nodes(mut config: Config, n: usize) -> Config {
    config.nodes.truncate(n);
    config
}
