//! Replicas that missed a failover: one that was down while another node was promoted comes
//! back following the old primary and never streams again (and, with `synchronous_strict`,
//! holds up every commit that waits for it). A healthy replica that has replayed all it has
//! and receives nothing while the elected primary is up is pointed at that primary.

use std::sync::Arc;

use tracing::warn;

use super::{Driver, actions};
use crate::app::Shared;
use crate::cluster::{ClusterView, Role};
use crate::config::ClusterConfig;

/// Repoints each straggler at the elected primary (at most once per `RETRY_AFTER` each).
pub(super) fn repoint_stragglers(
    shared: &Arc<Shared>,
    view: &ClusterView,
    cfg: &ClusterConfig,
    d: &mut Driver,
) {
    let Some(p) = view.primary else {
        return;
    };
    let primary = &view.nodes[p];
    let system = primary.sample.as_ref().and_then(|s| s.system_id.clone());
    for (i, n) in view.nodes.iter().enumerate() {
        let Some(sample) = n.sample.as_ref() else {
            continue;
        };
        let straggler = i != p
            && n.healthy
            && n.role == Role::Replica
            && n.fenced.is_none()
            && !sample.streaming
            && n.replay_settled
            && sample.system_id == system;
        if !straggler {
            continue;
        }
        // A failover just repointed the replicas itself; they need a moment to connect.
        // (Read only for a straggler: the history is copied, and this runs every tick.)
        let settled = shared.failover.history().iter().all(|r| {
            r.at.elapsed()
                .is_ok_and(|age| age >= super::RETRY_AFTER / 3)
        });
        if !settled {
            return;
        }
        if !d.due("repoint", i) {
            continue;
        }
        // Not while a failover or switchover is repointing replicas itself.
        let Ok(guard) = shared.failover.running.try_lock() else {
            continue;
        };
        drop(guard);
        let (shared, cfg) = (shared.clone(), cfg.clone());
        let (replica, primary) = (n.clone(), primary.clone());
        tokio::spawn(async move {
            let what = match actions::repoint(&cfg, &replica, &primary).await {
                Ok(()) => format!(
                    "receiving nothing while {} is primary: repointed to it",
                    primary.name
                ),
                Err(e) => {
                    warn!(node = %replica.name, error = %e, "cannot repoint a replica that receives nothing");
                    format!(
                        "receiving nothing; repointing to {} failed: {e}",
                        primary.name
                    )
                }
            };
            shared.failover.event(&replica.name, what);
        });
    }
}
