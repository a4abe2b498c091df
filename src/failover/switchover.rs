//! Planned switchover and forced promotion, the operator-driven paths (admin console
//! `SWITCHOVER` / `PROMOTE`, and the library calls tests use).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{HOOK_LIMIT, Record, actions, controller, finish, hook, policy, promote_and_repoint};
use crate::app::Shared;
use crate::cluster::{Fence, NodeStatus, Role};

#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("no elected primary is up")]
    NoPrimary,
    #[error("no node named \"{0}\"")]
    UnknownNode(String),
    #[error("{0} is not a healthy, unfenced replica")]
    NotReplica(String),
    #[error("no candidate: {0}")]
    NoCandidate(String),
    #[error("{0}")]
    Failed(String),
    #[error("this instance does not hold the coordinator lease; the leader is {0}")]
    NotLeader(String),
}

fn check_leader(shared: &Shared) -> Result<(), SwitchoverError> {
    if shared.failover.may_decide() {
        Ok(())
    } else {
        Err(SwitchoverError::NotLeader(
            shared.failover.leader().unwrap_or_else(|| "unknown".into()),
        ))
    }
}

/// Planned switchover to `target` (or the best replica): new writes wait, in-flight ones
/// drain (bounded by half of `switchover_timeout`), the old primary is fenced, the candidate
/// replays the old primary's last WAL position, `demote_command` runs if configured, then the
/// candidate is promoted and the others repointed. Writes resume on the new primary.
pub async fn switchover(
    shared: &Arc<Shared>,
    target: Option<&str>,
) -> Result<Record, SwitchoverError> {
    check_leader(shared)?;
    let _guard = shared.failover.running.lock().await;
    let cfg = shared.config().cluster.clone();
    let started = Instant::now();
    let view = shared.cluster.view();
    let old = view.primary.ok_or(SwitchoverError::NoPrimary)?;
    let candidate = match target {
        Some(name) => {
            let i = view
                .index_of(name)
                .ok_or_else(|| SwitchoverError::UnknownNode(name.to_owned()))?;
            let n = &view.nodes[i];
            if i == old || !n.healthy || n.role != Role::Replica || n.fenced.is_some() {
                return Err(SwitchoverError::NotReplica(name.to_owned()));
            }
            i
        }
        None => controller::elect(&view, Some(old), &policy(&cfg, &shared.failover), false)
            .map_err(SwitchoverError::NoCandidate)?,
    };
    let old_node = view.nodes[old].clone();
    let cand_node = view.nodes[candidate].clone();
    shared.failover.event(
        &old_node.name,
        format!("switchover to {} started: new writes wait", cand_node.name),
    );
    shared.cluster.set_paused(true);
    let deadline = started + cfg.switchover_timeout.0;
    let steps = async {
        let drain_until = started + cfg.switchover_timeout.0 / 2;
        while shared.pools.active_on(&old_node.name) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drained = started.elapsed();
        shared.cluster.set_fence(old, Some(Fence::Claim));
        shared.pools.abort_node(&old_node.name);
        let t = Instant::now();
        let lsn = actions::current_lsn(&cfg, &old_node).await?;
        actions::wait_replayed(&cfg, &cand_node, lsn, deadline).await?;
        let caught_up = t.elapsed();
        let t = Instant::now();
        if let Some(cmd) = &cfg.demote_command {
            let line = hook::expand(cmd, &hook::variables(&old_node, Some(&cand_node)));
            hook::run(&line, HOOK_LIMIT)
                .await
                .map_err(|e| format!("demote_command failed: {e}"))?;
        }
        let demoted = t.elapsed();
        let (promote, repoint) = promote_and_repoint(shared, Some(old), candidate).await?;
        Ok::<_, String>(vec![
            ("drain", drained),
            ("catch-up", caught_up),
            ("demote", demoted),
            ("promote", promote),
            ("repoint", repoint),
        ])
    }
    .await;
    shared.cluster.set_paused(false);
    match steps {
        Ok(phases) => {
            let record = Record {
                epoch: shared.cluster.view().epoch,
                kind: "switchover",
                cause: "planned".into(),
                old: Some(old_node.name.clone()),
                new: cand_node.name.clone(),
                at: SystemTime::now(),
                phases,
                total: started.elapsed(),
            };
            finish(shared, record.clone());
            Ok(record)
        }
        Err(e) => {
            // Still the old primary: writes go back to it.
            if shared.cluster.view().elected == Some(old) {
                shared.cluster.set_fence(old, None);
            }
            shared
                .failover
                .event(&old_node.name, format!("switchover failed: {e}"));
            Err(SwitchoverError::Failed(e))
        }
    }
}

/// Promotes `name` on an operator's word, skipping the health verdict and lag limits.
pub async fn promote(shared: &Arc<Shared>, name: &str) -> Result<Record, SwitchoverError> {
    check_leader(shared)?;
    let _guard = shared.failover.running.lock().await;
    let started = Instant::now();
    let view = shared.cluster.view();
    let i = view
        .index_of(name)
        .ok_or_else(|| SwitchoverError::UnknownNode(name.to_owned()))?;
    let n: &NodeStatus = &view.nodes[i];
    if !n.healthy || n.role != Role::Replica {
        return Err(SwitchoverError::NotReplica(name.to_owned()));
    }
    let old = view.elected;
    let (promote, repoint) = promote_and_repoint(shared, old, i)
        .await
        .map_err(SwitchoverError::Failed)?;
    let record = Record {
        epoch: shared.cluster.view().epoch,
        kind: "promote",
        cause: "operator".into(),
        old: old.map(|o| view.nodes[o].name.clone()),
        new: name.to_owned(),
        at: SystemTime::now(),
        phases: vec![("promote", promote), ("repoint", repoint)],
        total: started.elapsed(),
    };
    finish(shared, record.clone());
    Ok(record)
}
