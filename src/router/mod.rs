//! Where work goes. A request (a simple Query, or extended-protocol messages up to Sync) that
//! the classifier proves read-only goes to a replica outside a transaction block; everything
//! else goes to the elected primary. Hints, `SET pgpilot.route`, per-database `routing` and
//! read-your-writes adjust that; replicas are chosen by least outstanding requests, then round
//! robin, among healthy ones within the lag limits.

pub mod classify;
pub mod lexer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{ClusterView, NodeStatus, Role};
use crate::config::{ClusterConfig, ReadYourWrites, Routing};
use classify::Route;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

/// What a request is, as far as routing cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Intent {
    pub read_only: bool,
    /// The request opens a transaction block (`Some(true)` when READ ONLY).
    pub begin: Option<bool>,
    pub hint: Option<Route>,
    /// Requests that cannot be re-routed later (Flush mid-request, FunctionCall, pins).
    pub sticky: bool,
}

/// The client-level inputs to routing.
#[derive(Debug, Clone, Copy)]
pub struct ClientRoute {
    pub database: Routing,
    pub setting: Route,
    pub session_read_only: bool,
}

fn forced(route: Route) -> Option<Target> {
    match route {
        Route::Primary => Some(Target::Primary),
        Route::Replica => Some(Target::Replica),
        Route::Auto => None,
    }
}

/// The target for a request that starts outside a transaction.
pub fn decide(intent: &Intent, client: &ClientRoute) -> Target {
    if let Some(t) = intent
        .hint
        .and_then(forced)
        .or_else(|| forced(client.setting))
    {
        return t;
    }
    match client.database {
        Routing::Primary => return Target::Primary,
        Routing::Replica => return Target::Replica,
        Routing::Auto => {}
    }
    if intent.sticky {
        return Target::Primary;
    }
    let read_only = match intent.begin {
        Some(ro) => ro || client.session_read_only,
        None => intent.read_only || client.session_read_only,
    };
    if read_only {
        Target::Replica
    } else {
        Target::Primary
    }
}

/// Per-node count of requests in flight, for least-outstanding replica choice.
#[derive(Debug, Default)]
pub struct Load {
    counts: Vec<AtomicUsize>,
    next: AtomicUsize,
}

impl Load {
    pub fn new(nodes: usize) -> Self {
        Load {
            counts: (0..nodes).map(|_| AtomicUsize::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn get(&self, node: usize) -> usize {
        self.counts
            .get(node)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one request on `node` until the guard drops.
    pub fn track(&self, node: usize) -> LoadGuard<'_> {
        if let Some(c) = self.counts.get(node) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        LoadGuard { load: self, node }
    }
}

pub struct LoadGuard<'a> {
    load: &'a Load,
    node: usize,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.load.counts.get(self.node) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Picks a replica for a read: healthy, within `max_replica_lag` (bytes, and time while
/// behind), not excluded, and, after the client's own write at `last_write`, one that has
/// replayed a primary position sampled after that write.
/// Whether a replica holds the elected primary's history: while that primary is up, the
/// replica must be streaming from it on its timeline (one that replayed past a fork point,
/// or follows nobody, would answer with writes the surviving history never had). While the
/// elected primary is down no replica can stream, and those on its timeline keep serving.
fn follows_primary(n: &NodeStatus, view: &ClusterView) -> bool {
    let Some(p) = view.elected() else {
        return true;
    };
    let streaming = n.sample.as_ref().is_some_and(|s| s.streaming);
    if view.primary.is_some() {
        streaming && n.timeline() == p.timeline()
    } else {
        !streaming || n.timeline() == p.timeline()
    }
}

pub fn pick_replica(
    view: &ClusterView,
    cfg: &ClusterConfig,
    load: &Load,
    last_write: Option<Instant>,
    exclude: &[usize],
) -> Option<usize> {
    let max_lag = cfg.max_replica_lag.0;
    let max_lag_time = cfg.max_replica_lag_time.0.as_secs_f64();
    let required = match (cfg.read_your_writes, last_write) {
        (ReadYourWrites::Lsn, Some(written)) => {
            let sample = view.primary().and_then(|p| p.sample.as_ref())?;
            if sample.started <= written {
                // No primary position known to cover the write yet: read from the primary.
                return None;
            }
            sample.current_lsn
        }
        _ => None,
    };
    let eligible = |i: &usize| {
        let n = &view.nodes[*i];
        n.role == Role::Replica
            && n.healthy
            && n.fenced.is_none()
            && follows_primary(n, view)
            && !exclude.contains(i)
            && n.lag_bytes.is_some_and(|l| l <= max_lag)
            && n.lag_seconds.is_none_or(|s| s <= max_lag_time)
            && required.is_none_or(|lsn| n.replay_lsn().is_some_and(|r| r >= lsn))
    };
    // One snapshot of the counters: other tasks change them concurrently.
    let candidates: Vec<(usize, usize)> = (0..view.nodes.len())
        .filter(eligible)
        .map(|i| (i, load.get(i)))
        .collect();
    let least = candidates.iter().map(|&(_, l)| l).min()?;
    let tied: Vec<usize> = candidates
        .iter()
        .filter(|&&(_, l)| l == least)
        .map(|&(i, _)| i)
        .collect();
    let turn = load.next.fetch_add(1, Ordering::Relaxed);
    tied.get(turn % tied.len().max(1)).copied()
}

/// How long a request waits for an elected primary before failing.
pub fn primary_wait(cfg: &ClusterConfig) -> Duration {
    cfg.failover_wait_timeout.0
}

#[cfg(test)]
mod tests;
