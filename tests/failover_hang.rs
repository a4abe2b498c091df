//! The primary hangs (every process SIGSTOPped: no connection is reset). pgpilot declares it
//! dead after `failover_timeout` (the replicas lost it too: their `wal_receiver_timeout` was
//! lowered by pgpilot), promotes the replica holding the most WAL, and aborts the statements
//! stuck on pg1. Thawed, pg1 still claims to be primary: it is fenced and gets no write.

mod common;

use std::time::{Duration, Instant};

use common::load::{check_ledger, synchronous_writes};
use common::{eventually, node_eventually};
use pgpilot::cluster::{Fence, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_is_replaced_and_fenced_when_it_wakes_up() {
    let (c, proxy, load) = synchronous_writes(3).await;
    let shared = proxy.shared.clone();

    c.signal_node(0, "STOP").unwrap();
    let frozen = Instant::now();
    let new = common::promoted(&shared, Duration::from_secs(20)).await;
    let (new_port, other) = (c.port(new), 3 - new);
    eventually(Duration::from_secs(20), "writes on the new primary", || {
        let n = load.served_by(new_port);
        async move { n > 0 }
    })
    .await;
    let resumed = frozen.elapsed();
    let history = shared.failover.history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].cause, "unresponsive");
    eprintln!(
        "writes resumed {resumed:?} after SIGSTOP (failover_timeout {:?}); {:?}",
        shared.config().cluster.failover_timeout.0,
        history[0]
    );

    c.signal_node(0, "CONT").unwrap();
    eventually(Duration::from_secs(20), "pg1 seen again, fenced", || {
        let v = shared.cluster.view();
        async move {
            let n = &v.nodes[0];
            n.healthy && n.role == Role::Primary && n.fenced == Some(Fence::Claim)
        }
    })
    .await;
    let rows_on_pg1 = c.psql(0, "app", "SELECT count(*) FROM ledger").unwrap();
    let before = load.served_by(new_port);
    eventually(
        Duration::from_secs(20),
        "more writes on the new primary",
        || {
            let n = load.served_by(new_port);
            async move { n >= before + 40 }
        },
    )
    .await;
    let reports = load.stop().await;
    let (acked, errors) = check_ledger(&c, new, &reports, 1);
    eprintln!("{acked} writes acknowledged, {errors} errors");
    assert_eq!(
        c.psql(0, "app", "SELECT count(*) FROM ledger").unwrap(),
        rows_on_pg1,
        "the fenced old primary got writes"
    );
    let view = shared.cluster.view();
    assert_eq!(view.primary, Some(new));
    assert_eq!(view.nodes[0].fenced, Some(Fence::Claim));
    // The other replica follows the new primary: it held no WAL the new primary lacks.
    let name = c.nodes()[other].name.clone();
    node_eventually(
        &c,
        new,
        "SELECT application_name || ':' || state FROM pg_stat_replication",
        Duration::from_secs(20),
        |v| v.lines().any(|l| l == format!("{name}:streaming")),
    )
    .await;
    proxy.shutdown().await;
}
