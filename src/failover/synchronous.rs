//! The primary's `synchronous_standby_names` (with `synchronous`): which live replicas it
//! names, by the names they stream under; what an emptied or shrunk list means for a later
//! election (`Unsynced`, `SyncRecord`); and a check that the list matches the standbys.

use std::sync::Arc;

use tracing::{error, info, warn};

use super::{SYNC_MATCH_GRACE, actions, controller};
use crate::app::Shared;
use crate::cluster::{ClusterView, Fence, NodeStatus, Role};
use crate::config::ClusterConfig;

/// A healthy, unfenced replica.
pub(super) fn live_replica(n: &NodeStatus) -> bool {
    n.healthy && n.role == Role::Replica && n.fenced.is_none()
}

/// Healthy, unfenced replicas other than `except`, by the names they stream under.
pub(super) fn live_replicas(view: &ClusterView, except: &[usize]) -> Vec<String> {
    let mut names: Vec<String> = view
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !except.contains(i) && live_replica(n))
        .map(|(_, n)| standby_name(n))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The name `synchronous_standby_names` must use for `node`: the `application_name` its WAL
/// receiver reports, or the node's name when that is not known (pgpilot's repoint sets it).
fn standby_name(node: &NodeStatus) -> String {
    node.sample
        .as_ref()
        .and_then(|s| s.standby_name.clone())
        .unwrap_or_else(|| node.name.clone())
}

/// The `synchronous_standby_names` for the primary at `primary` whose live replicas are
/// `live`. With `synchronous_strict` it is never empty (every other node is named), so writes
/// wait for a standby rather than commit on the primary alone.
pub(super) fn wanted_names(
    view: &ClusterView,
    cfg: &ClusterConfig,
    primary: usize,
    live: Vec<String>,
) -> String {
    if live.is_empty() && cfg.synchronous_strict {
        let mut others: Vec<String> = view
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != primary && n.fenced != Some(Fence::Removed))
            .map(|(_, n)| standby_name(n))
            .collect();
        others.sort();
        others.dedup();
        return actions::synchronous_names(&others);
    }
    actions::synchronous_names(&live)
}

/// Records what a list just written on `primary` means for a later election: an empty one
/// opens a window of commits only the primary holds; the first list naming a standby again
/// closes it at the primary's position then.
async fn note_synchronous(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    primary: &NodeStatus,
    value: &str,
) {
    if value.is_empty() {
        warn!(
            node = %primary.name,
            "no replica is live: synchronous_standby_names is empty, commits are acknowledged by \
             the primary alone, and no replica may replace it automatically until it holds them \
             (synchronous_strict = true makes writes wait instead)"
        );
        *shared.failover.unsynced.lock() = Some(controller::Unsynced {
            primary: primary.name.clone(),
            covered_by: None,
        });
        return;
    }
    let open = shared
        .failover
        .unsynced
        .lock()
        .as_ref()
        .is_some_and(|u| u.primary == primary.name && u.covered_by.is_none());
    if !open {
        return;
    }
    match actions::current_lsn(cfg, primary).await {
        Ok(lsn) => {
            info!(node = %primary.name, %lsn, "a standby is synchronous again");
            *shared.failover.unsynced.lock() = Some(controller::Unsynced {
                primary: primary.name.clone(),
                covered_by: Some(lsn),
            });
        }
        // The window stays open: no replica is chosen on a guess.
        Err(e) => warn!(node = %primary.name, error = %e, "cannot read the primary's position"),
    }
}

pub(super) fn keep_synchronous_names(
    shared: &Arc<Shared>,
    view: &ClusterView,
    cfg: &ClusterConfig,
) {
    let (Some(p), Some(pi)) = (view.primary(), view.primary) else {
        return;
    };
    // Not before every node was probed once: a replica not yet seen is not a dead one.
    if view
        .nodes
        .iter()
        .any(|n| n.sample.is_none() && n.failure.is_none())
    {
        return;
    }
    let value = wanted_names(view, cfg, pi, live_replicas(view, &[pi]));
    let named = named_nodes(view, &value);
    let key = (p.name.clone(), value.clone());
    {
        let mut applied = shared.failover.sync_applied.lock();
        if applied.as_ref() == Some(&key) {
            return;
        }
        // Claimed before the write so one change is applied once; undone on failure.
        *applied = Some(key.clone());
    }
    let (shared, node, cfg) = (shared.clone(), p.clone(), cfg.clone());
    tokio::spawn(async move {
        let _turn = shared.failover.sync_writer.lock().await;
        if shared.failover.sync_applied.lock().as_ref() != Some(&key) {
            return; // superseded by a newer value, written after this one
        }
        if !apply_synchronous_names(&shared, &cfg, &node, &value, &named).await {
            {
                let mut applied = shared.failover.sync_applied.lock();
                if applied.as_ref() == Some(&key) {
                    *applied = None;
                }
            }
        }
    });
}

/// Writes `value` as `primary`'s `synchronous_standby_names`, logs it, and records what it
/// means for a later election (see `note_synchronous`). False when it could not be written.
pub(super) async fn apply_synchronous_names(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    primary: &NodeStatus,
    value: &str,
    named: &[String],
) -> bool {
    match actions::set_synchronous_names(cfg, primary, value).await {
        Ok(()) => {
            shared.failover.event(
                &primary.name,
                format!("synchronous_standby_names = '{value}'"),
            );
            note_synchronous(shared, cfg, primary, value).await;
            record_named(shared, cfg, primary, named).await;
            if !value.is_empty() {
                let (cfg, primary, value) = (cfg.clone(), primary.clone(), value.to_owned());
                tokio::spawn(async move { check_synchronous_match(&cfg, &primary, &value).await });
            }
            true
        }
        Err(e) => {
            warn!(node = %primary.name, error = %e, "cannot set synchronous_standby_names");
            false
        }
    }
}

/// Once the standbys had time to reconnect under a new list: when standbys stream but none
/// is synchronous, the list names none of them and every commit waits. Said at ERROR, with
/// the names they do report.
async fn check_synchronous_match(cfg: &ClusterConfig, primary: &NodeStatus, value: &str) {
    tokio::time::sleep(SYNC_MATCH_GRACE).await;
    match actions::unmatched_standbys(cfg, primary).await {
        Ok(Some(reported)) => error!(
            node = %primary.name,
            "synchronous_standby_names = '{value}' matches none of the standbys streaming from \
             it ({reported}): every commit waits for a standby that is not there; give the \
             replicas' primary_conninfo an application_name equal to their node name"
        ),
        Ok(None) => {}
        Err(e) => warn!(node = %primary.name, error = %e, "cannot check the synchronous standbys"),
    }
}

/// The nodes `value` (a `synchronous_standby_names`) names, by the names they stream under.
pub(super) fn named_nodes(view: &ClusterView, value: &str) -> Vec<String> {
    view.nodes
        .iter()
        .filter(|n| value.contains(&format!("\"{}\"", standby_name(n).replace('"', ""))))
        .map(|n| n.name.clone())
        .collect()
}

/// Records whom `primary`'s list now names; when it stops naming a node, the primary's
/// position then (read after the change took effect) bounds what that node acknowledged.
async fn record_named(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    primary: &NodeStatus,
    named: &[String],
) {
    let dropping = {
        let r = shared.failover.sync_record.lock();
        // A new primary's list drops nobody: no round trip on the promotion's path.
        r.primary == primary.name && r.named.keys().any(|n| !named.contains(n))
    };
    let position = if dropping {
        actions::current_lsn(cfg, primary).await.ok()
    } else {
        None
    };
    shared
        .failover
        .sync_record
        .lock()
        .update(&primary.name, named, position);
}
