//! Losing a replica under read load costs no errors: reads in flight on it are retried
//! elsewhere, new reads avoid it, and it gets reads again once it is back.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{config, start_cluster, start_proxy};
use parking_lot::Mutex;
use pgpilot::devcluster::DevClusterOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_twenty_readers_costs_no_errors() {
    let c = Arc::new(start_cluster(DevClusterOptions::default()));
    let proxy = start_proxy(config(&c, |_| {})).await;
    let shared = proxy.shared.clone();
    common::eventually(Duration::from_secs(10), "replicas probed", || {
        let v = shared.cluster.view();
        async move { v.nodes.iter().filter(|n| n.healthy).count() == 3 }
    })
    .await;
    let (pg2, pg3) = (c.port(1), c.port(2));

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let served: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let mut readers = Vec::new();
    for _ in 0..20 {
        let info = proxy.conninfo(
            pgpilot::demo::DEMO_USER,
            pgpilot::demo::DEMO_PASSWORD,
            pgpilot::demo::DEMO_DATABASE,
        );
        let (client, conn) = common::connect_watched(&info).await;
        tokio::spawn(async move {
            if let Ok(Err(e)) = conn.await {
                eprintln!("connection task ended: {e:?}");
            }
        });
        let (stop, errors, served) = (stop.clone(), errors.clone(), served.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u32;
            // Bounded: at most 100k reads per client, and it stops when told.
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                n += 1;
                match client
                    .query_one("SELECT inet_server_port()::int", &[])
                    .await
                {
                    Ok(row) => {
                        *served
                            .lock()
                            .entry(row.get::<_, i32>(0) as u16)
                            .or_default() += 1
                    }
                    Err(e) => {
                        eprintln!(
                            "read failed: {e} {:?}",
                            e.as_db_error()
                                .map(|d| (d.code().code().to_owned(), d.message().to_owned()))
                        );
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let count = |port: u16| served.lock().get(&port).copied().unwrap_or(0);
    common::eventually(
        Duration::from_secs(10),
        "reads on both replicas",
        || async { count(pg2) > 50 && count(pg3) > 50 },
    )
    .await;

    let killer = c.clone();
    tokio::task::spawn_blocking(move || killer.stop_node(1, "immediate"))
        .await
        .unwrap()
        .unwrap();
    let pg3_at_kill = count(pg3);
    let pg2_at_kill = count(pg2);
    common::eventually(
        Duration::from_secs(10),
        "reads continuing on pg3",
        || async { count(pg3) > pg3_at_kill + 500 },
    )
    .await;
    assert!(
        count(pg2) <= pg2_at_kill + 40,
        "reads kept landing on the dead replica"
    );

    let starter = c.clone();
    tokio::task::spawn_blocking(move || starter.start_node(1))
        .await
        .unwrap()
        .unwrap();
    let pg2_before = count(pg2);
    common::eventually(
        Duration::from_secs(30),
        "reads on the restarted replica",
        || async { count(pg2) > pg2_before + 50 },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no client saw an error");
}
