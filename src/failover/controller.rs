//! The failover decision as a pure function of the cluster view and the clock: is the elected
//! primary dead, do the replicas agree, and who takes over. The driver (`mod.rs`) acts on the
//! verdict; tests feed views directly.
//!
//! - **Detect.** A crash (probes refused or reset, or the server shutting down) counts after
//!   two failed probes in a row, a fifth of `probe_interval` apart. A silent primary (probes
//!   time out) counts once nothing succeeded for `failover_timeout`.
//! - **Confirm.** Every reachable replica must have been probed after the primary was down
//!   (for a crash, after the second failed probe was sent), and
//!   none may still hear from the primary (`Sample::hears_primary`): a replica that does proves
//!   that only pgpilot is cut off.
//! - **Elect.** Healthy, unfenced replicas without `no_failover`, from the same system, at
//!   most `max_failover_lag` behind the furthest known WAL position; the furthest position
//!   wins (only it is sure to hold every commit a survivor holds), priority breaks ties. After
//!   pgpilot left the primary without a synchronous standby, only a replica known to hold
//!   the commits acknowledged meanwhile may replace it automatically.

use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{ClusterView, FailureKind, Fence, Role};
use crate::config::FailoverMode;

#[derive(Debug, Clone)]
pub struct Policy {
    pub mode: FailoverMode,
    pub failover_timeout: Duration,
    pub max_failover_lag: u64,
    pub synchronous: bool,
    /// A primary that acknowledged commits with no synchronous standby (pgpilot emptied its
    /// list): a replica replacing it must hold at least this position (`None`: the list is
    /// still empty, so no replica is known to hold them).
    pub unsynced: Option<Unsynced>,
    /// Whom the primary's synchronous list named (used with `synchronous`).
    pub sync_record: super::sync_record::SyncRecord,
}

/// Commits were acknowledged on `primary` while no standby was synchronous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsynced {
    pub primary: String,
    /// The primary's position once a standby was synchronous again: every such commit is
    /// at or before it. `None` while the list is still empty.
    pub covered_by: Option<crate::cluster::Lsn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Connections refused or reset.
    Crash,
    /// No answer for `failover_timeout`.
    Unresponsive,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::Crash => "crash",
            Cause::Unresponsive => "unresponsive",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The elected primary answers, or none was ever known.
    Healthy,
    /// Probes fail, not yet enough to call it dead.
    Suspect,
    /// Dead by what the proxy sees; these replicas were not probed since: probe them.
    NeedEvidence { old: usize, stale: Vec<usize> },
    /// A replica still hears from the primary: only the proxy is cut off. No promotion.
    PrimaryAlive { old: usize, witness: usize },
    /// Dead, but promotion is left to an operator (`failover = "manual" | "off"`).
    NotAutomatic { old: usize, cause: Cause },
    /// Dead, and no replica may take over.
    NoCandidate {
        old: usize,
        cause: Cause,
        why: String,
    },
    Promote {
        old: usize,
        candidate: usize,
        cause: Cause,
    },
}

fn hears(n: &crate::cluster::NodeStatus) -> bool {
    n.sample.as_ref().is_some_and(|s| s.hears_primary())
}

/// What the view says about the elected primary at `now`.
pub fn assess(view: &ClusterView, policy: &Policy, now: Instant) -> Verdict {
    let Some(old) = view.elected else {
        return Verdict::Healthy;
    };
    let primary = &view.nodes[old];
    let Some(failure) = &primary.failure else {
        return Verdict::Healthy;
    };
    let silent_since = primary.last_ok.unwrap_or(failure.since).min(failure.since);
    let cause = if failure.kind == FailureKind::Crash && failure.last > failure.since {
        Cause::Crash
    } else if now.saturating_duration_since(silent_since) >= policy.failover_timeout {
        Cause::Unresponsive
    } else {
        return Verdict::Suspect;
    };
    let replicas = || {
        view.nodes.iter().enumerate().filter(move |(i, n)| {
            *i != old && n.healthy && n.role == Role::Replica && n.fenced.is_none()
        })
    };
    // Evidence from after the primary was down: for a crash, samples sent after the second
    // failed probe (the first may have been sent before the crash, and a replica probed then
    // could still receive WAL). Positions compared in the election are then final.
    let down_by = match cause {
        Cause::Crash => failure.second.unwrap_or(failure.last),
        Cause::Unresponsive => failure.since,
    };
    // After a crash, also wait until each replica has replayed all the WAL it has (its
    // replay position stops moving): its position is then what it holds, whatever its WAL
    // receiver reports while it keeps reconnecting.
    let fresh = |i: &usize| {
        let n = &view.nodes[*i];
        n.sample.as_ref().is_some_and(|s| s.started >= down_by)
            && (cause != Cause::Crash || n.replay_settled || hears(n))
    };
    if let Some((witness, _)) = replicas().find(|(i, n)| fresh(i) && hears(n)) {
        return Verdict::PrimaryAlive { old, witness };
    }
    let stale: Vec<usize> = replicas().map(|(i, _)| i).filter(|i| !fresh(i)).collect();
    if !stale.is_empty() {
        return Verdict::NeedEvidence { old, stale };
    }
    if policy.mode != FailoverMode::Auto {
        return Verdict::NotAutomatic { old, cause };
    }
    match elect(view, Some(old), policy, false) {
        Ok(candidate) => Verdict::Promote {
            old,
            candidate,
            cause,
        },
        Err(why) => Verdict::NoCandidate { old, cause, why },
    }
}

/// The replica that should become primary in place of `old`. `force` ignores
/// `max_failover_lag` and `no_failover`.
pub fn elect(
    view: &ClusterView,
    old: Option<usize>,
    policy: &Policy,
    force: bool,
) -> Result<usize, String> {
    let best = view.nodes.iter().filter_map(|n| n.wal_position()).max();
    let system = old.and_then(|o| view.nodes[o].sample.as_ref()?.system_id.clone());
    let unsynced = policy
        .unsynced
        .as_ref()
        .filter(|u| old.is_some_and(|o| view.nodes[o].name == u.primary));
    let mut eligible = Vec::new();
    let mut refused = Vec::new();
    for (i, n) in view.nodes.iter().enumerate() {
        if Some(i) == old || !n.healthy || n.role != Role::Replica || n.fenced.is_some() {
            continue;
        }
        if n.no_failover && !force {
            refused.push(format!("{} has no_failover", n.name));
            continue;
        }
        let theirs = n.sample.as_ref().and_then(|s| s.system_id.clone());
        if system.is_some() && theirs.is_some() && theirs != system {
            refused.push(format!("{} belongs to another system", n.name));
            continue;
        }
        let pos = n.wal_position();
        let behind = match (best, pos) {
            (Some(b), Some(p)) => p.bytes_until(b),
            (Some(_), None) => u64::MAX,
            (None, _) => 0,
        };
        if behind > policy.max_failover_lag && !force {
            refused.push(format!(
                "{} is {behind} bytes behind (max_failover_lag {})",
                n.name, policy.max_failover_lag
            ));
            continue;
        }
        // Commits acknowledged while no standby was synchronous are only on the old primary
        // unless a replica is known to have received them.
        match unsynced.map(|u| u.covered_by) {
            Some(None) if !force => {
                refused.push(format!(
                    "{} may lack commits acknowledged while no standby was synchronous",
                    n.name
                ));
                continue;
            }
            Some(Some(need)) if !force && pos.is_none_or(|p| p < need) => {
                refused.push(format!(
                    "{} lacks commits acknowledged while no standby was synchronous (up to {need})",
                    n.name
                ));
                continue;
            }
            _ => {}
        }
        // A standby that cannot be asked may hold commits only it acknowledged.
        let holder = (policy.synchronous && !force)
            .then(|| unreachable_holder(view, old, policy, pos))
            .flatten();
        if let Some(why) = holder {
            refused.push(format!("{}: {why}", n.name));
            continue;
        }
        eligible.push((i, n.priority, pos));
    }
    // The furthest position first, in every mode: priority must never cost writes another
    // candidate holds. Priority decides between candidates that hold the same WAL.
    let pick = eligible.iter().max_by_key(|(_, prio, pos)| (*pos, *prio));
    match pick {
        Some((i, _, _)) => Ok(*i),
        None if refused.is_empty() => Err("no healthy replica".into()),
        None => Err(refused.join("; ")),
    }
}

/// Why a candidate at `pos` may lack a commit that only an unreachable node the old
/// primary's synchronous list named may hold; `None` when no such node blocks it.
fn unreachable_holder(
    view: &ClusterView,
    old: Option<usize>,
    policy: &Policy,
    pos: Option<crate::cluster::Lsn>,
) -> Option<String> {
    let old = view.nodes.get(old?)?;
    if policy.sync_record.primary != old.name {
        return None;
    }
    view.nodes
        .iter()
        .filter(|n| n.name != old.name && !n.healthy && n.fenced != Some(Fence::Removed))
        .find_map(|n| policy.sync_record.blocks(n, pos))
}

#[cfg(test)]
mod tests;
