//! `coordinator = "etcd"`: several pgpilot instances in front of one cluster agree on who
//! decides and on the primary. Every instance holds an etcd lease and campaigns for
//! `<prefix>/leader` (a transaction that creates the key only if absent, attached to its lease);
//! the holder runs failover, switchover and the other actions, and publishes the elected
//! primary at `<prefix>/primary` as `node epoch` (compare-and-swap on the key's revision, the
//! epoch growing with every change). The others follow that record. A leader that cannot renew
//! its lease stops deciding at once and its key disappears when the lease expires, so another
//! instance takes over. etcd is polled every 100 ms.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::app::Shared;

const TICK: Duration = Duration::from_millis(100);

/// Runs until `stop`; reconnects (as a follower meanwhile) when etcd is unreachable.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let me = format!(
        "{}:{}:{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "pgpilot".into()),
        std::process::id(),
        rand::random::<u32>()
    );
    loop {
        let result = session(&shared, &stop, &me).await;
        shared.failover.set_leader(false, None);
        match result {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "etcd coordinator: session lost, retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The record at `<prefix>/primary`: node name, epoch, and the key's revision.
struct PrimaryRecord {
    node: String,
    epoch: u64,
    revision: i64,
}

async fn session(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    me: &str,
) -> Result<(), etcd_client::Error> {
    let cfg = shared.config().cluster.clone();
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2));
    let mut client = Client::connect(&cfg.etcd_endpoints, Some(options)).await?;
    let ttl = cfg.etcd_lease_ttl.0;
    let lease = client.lease_grant(ttl.as_secs() as i64, None).await?.id();
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
    let prefix = cfg.etcd_prefix.trim_end_matches('/');
    let (leader_key, record_key) = (format!("{prefix}/leader"), format!("{prefix}/primary"));
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Hand the role over at once rather than after the TTL.
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        if renewed.elapsed() >= ttl / 3 {
            keeper.keep_alive().await?;
            match renewals.message().await? {
                Some(r) if r.ttl() > 0 => renewed = Instant::now(),
                _ => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "lease expired".into(),
                    ));
                }
            }
        }
        let campaign = Txn::new()
            .when([Compare::create_revision(
                leader_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                leader_key.as_str(),
                me,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(leader_key.as_str(), None)]);
        let resp = client.txn(campaign).await?;
        let holder = if resp.succeeded() {
            Some(me.to_owned())
        } else {
            resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
                _ => None,
            })
        };
        let leading = holder.as_deref() == Some(me);
        shared.failover.set_leader(leading, holder);

        let record = client
            .get(record_key.as_str(), None)
            .await?
            .kvs()
            .first()
            .and_then(|kv| {
                let (node, epoch) = kv.value_str().ok()?.split_once(' ')?;
                Some(PrimaryRecord {
                    node: node.to_owned(),
                    epoch: epoch.parse().ok()?,
                    revision: kv.mod_revision(),
                })
            });
        let view = shared.cluster.view();
        if leading {
            // Publish this instance's elected primary when the record differs.
            let Some(elected) = view.elected() else {
                continue;
            };
            if record.as_ref().is_some_and(|r| r.node == elected.name) {
                continue;
            }
            let epoch = record.as_ref().map_or(1, |r| r.epoch + 1);
            let guard = match &record {
                Some(r) => Compare::mod_revision(record_key.as_str(), CompareOp::Equal, r.revision),
                None => Compare::create_revision(record_key.as_str(), CompareOp::Equal, 0),
            };
            let publish = Txn::new().when([guard]).and_then([TxnOp::put(
                record_key.as_str(),
                format!("{} {epoch}", elected.name),
                None,
            )]);
            if client.txn(publish).await?.succeeded() {
                shared.failover.event(
                    &elected.name,
                    format!("published as primary in etcd (epoch {epoch})"),
                );
            }
        } else if let Some(r) = record
            && let Some(i) = view.index_of(&r.node)
            && view.elected != Some(i)
        {
            shared.failover.event(
                &r.node,
                format!("following the coordinator's record (epoch {})", r.epoch),
            );
            shared.cluster.follow_primary(i);
        }
    }
}
