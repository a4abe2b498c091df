//! Topology: the immutable `ClusterView` snapshot (behind `ArcSwap`) that every routing decision
//! loads once, the probes that keep it current, and a `watch` channel for whoever must react.
//!
//! Elected primary: a healthy node the probes report as not in recovery. When several claim to
//! be primary, the one already elected keeps the role; otherwise the highest priority wins.

mod lsn;
mod probe;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use lsn::Lsn;
pub use probe::Sample;

use crate::config::{ClusterConfig, NodeConfig};

/// What probes say a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Unknown,
    Primary,
    Replica,
    Down,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Down => "down",
        })
    }
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub priority: i32,
    pub no_failover: bool,
    pub role: Role,
    /// Flips only after `probe_failures` consecutive results the other way.
    pub healthy: bool,
    /// The latest successful probe.
    pub sample: Option<Sample>,
    /// Replay distance behind the elected primary's current WAL position.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub last_error: Option<String>,
}

impl NodeStatus {
    pub fn replay_lsn(&self) -> Option<Lsn> {
        self.sample.as_ref().and_then(|s| s.replay_lsn)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterView {
    pub nodes: Vec<NodeStatus>,
    /// Index into `nodes` of the elected primary.
    pub primary: Option<usize>,
    /// Increases every time the elected primary changes.
    pub epoch: u64,
}

impl ClusterView {
    pub fn primary(&self) -> Option<&NodeStatus> {
        self.primary.map(|i| &self.nodes[i])
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn elect(&mut self) {
        let claims = |n: &NodeStatus| n.healthy && n.role == Role::Primary;
        let current = self.primary.filter(|&i| claims(&self.nodes[i]));
        let best = current.or_else(|| {
            (0..self.nodes.len())
                .filter(|&i| claims(&self.nodes[i]))
                .max_by_key(|&i| self.nodes[i].priority)
        });
        if best != self.primary {
            self.primary = best;
            self.epoch += 1;
        }
    }

    fn compute_lag(&mut self) {
        let head = self
            .primary()
            .and_then(|p| p.sample.as_ref())
            .and_then(|s| s.current_lsn);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        for node in &mut self.nodes {
            let replay = node.replay_lsn();
            node.lag_bytes = match (node.role, head, replay) {
                (Role::Replica, Some(h), Some(r)) => Some(r.bytes_until(h)),
                _ => None,
            };
            node.lag_seconds = match (
                node.lag_bytes,
                node.sample.as_ref().and_then(|s| s.replay_timestamp),
            ) {
                (Some(0), _) => Some(0.0),
                (Some(_), Some(ts)) => Some((now - ts).max(0.0)),
                _ => None,
            };
        }
    }
}

/// Shared topology state.
pub struct Cluster {
    view: ArcSwap<ClusterView>,
    changed: watch::Sender<u64>,
}

/// One probe outcome as the prober reports it, hysteresis already applied to `healthy`.
pub struct Report {
    pub result: Result<Sample, String>,
    pub healthy: bool,
}

impl Cluster {
    pub fn new(nodes: &[NodeConfig]) -> Arc<Self> {
        let view = ClusterView {
            nodes: nodes
                .iter()
                .map(|n| NodeStatus {
                    name: n.name.clone(),
                    host: n.host.clone(),
                    port: n.port,
                    priority: n.priority,
                    no_failover: n.no_failover,
                    role: Role::Unknown,
                    healthy: false,
                    sample: None,
                    lag_bytes: None,
                    lag_seconds: None,
                    last_error: None,
                })
                .collect(),
            primary: None,
            epoch: 0,
        };
        Arc::new(Cluster {
            view: ArcSwap::from_pointee(view),
            changed: watch::channel(0).0,
        })
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records a probe report for node `index` and republishes the view.
    pub fn report(&self, index: usize, report: Report) {
        let mut changed = false;
        self.view.rcu(|old| {
            let mut next = ClusterView::clone(old);
            if let Some(node) = next.nodes.get_mut(index) {
                node.healthy = report.healthy;
                match &report.result {
                    Ok(sample) => {
                        node.role = if sample.in_recovery {
                            Role::Replica
                        } else {
                            Role::Primary
                        };
                        node.sample = Some(sample.clone());
                        node.last_error = None;
                    }
                    Err(e) => node.last_error = Some(e.clone()),
                }
                if !node.healthy {
                    node.role = Role::Down;
                }
            }
            next.elect();
            next.compute_lag();
            let role = |v: &ClusterView| v.nodes.get(index).map(|n| (n.role, n.healthy));
            changed = next.primary != old.primary || role(&next) != role(old);
            next
        });
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Waits until an elected primary is known, up to `timeout`.
    pub async fn wait_for_primary(&self, timeout: Duration) -> Option<NodeStatus> {
        let mut rx = self.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.view().primary() {
                return Some(p.clone());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.view().primary().cloned(),
            }
        }
    }

    /// Waits until a primary other than `previous` is elected, up to `deadline`.
    pub async fn wait_for_new_primary(
        &self,
        previous: &str,
        deadline: Instant,
    ) -> Option<NodeStatus> {
        let mut rx = self.subscribe();
        loop {
            if let Some(p) = self.view().primary().filter(|p| p.name != previous) {
                return Some(p.clone());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Starts one probe task per node; they stop when `shutdown` is cancelled.
    pub fn spawn_probes(
        self: &Arc<Self>,
        config: &ClusterConfig,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        for index in 0..self.view().nodes.len() {
            let prober = probe::Prober::new(self.clone(), index, config.clone());
            let token = shutdown.clone();
            tracker.spawn(async move { prober.run(token).await });
        }
    }
}

#[cfg(test)]
mod tests;
