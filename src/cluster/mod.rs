//! Topology: the immutable `ClusterView` snapshot (behind `ArcSwap`) that every routing decision
//! loads once, the probes that keep it current, and a `watch` channel for whoever must react.
//!
//! Elected primary: the node the probes report as not in recovery. When several claim to be
//! primary, the one already elected keeps the role; otherwise the highest priority wins.

mod probe;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    pub role: Role,
    pub last_error: Option<String>,
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

    pub fn replicas(&self) -> impl Iterator<Item = &NodeStatus> {
        self.nodes.iter().filter(|n| n.role == Role::Replica)
    }

    fn elect(&mut self) {
        let current = self
            .primary
            .filter(|&i| self.nodes[i].role == Role::Primary);
        let best = current.or_else(|| {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].role == Role::Primary)
                .max_by_key(|&i| self.nodes[i].priority)
        });
        if best != self.primary {
            self.primary = best;
            self.epoch += 1;
        }
    }
}

/// Shared topology state.
pub struct Cluster {
    view: ArcSwap<ClusterView>,
    changed: watch::Sender<u64>,
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
                    role: Role::Unknown,
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

    /// Records a probe result for node `index` and republishes when anything changed.
    pub fn report(&self, index: usize, role: Role, error: Option<String>) {
        let mut changed = false;
        self.view.rcu(|old| {
            let mut next = ClusterView::clone(old);
            if let Some(node) = next.nodes.get_mut(index) {
                node.role = role;
                node.last_error = error.clone();
            }
            next.elect();
            changed = next.primary != old.primary
                || next.nodes.get(index).map(|n| n.role) != old.nodes.get(index).map(|n| n.role);
            next
        });
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Waits until an elected primary is known, up to `timeout`.
    pub async fn wait_for_primary(&self, timeout: Duration) -> Option<NodeStatus> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
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
mod tests {
    use super::*;

    fn nodes() -> Vec<NodeConfig> {
        (1..=3)
            .map(|i| NodeConfig {
                name: format!("pg{i}"),
                host: "127.0.0.1".into(),
                port: 5432,
                priority: 100 - i,
                no_failover: false,
            })
            .collect()
    }

    #[test]
    fn elects_the_reported_primary_and_bumps_the_epoch() {
        let c = Cluster::new(&nodes());
        c.report(1, Role::Primary, None);
        c.report(0, Role::Replica, None);
        let v = c.view();
        assert_eq!((v.primary, v.epoch), (Some(1), 1));
        // A second claimant does not displace the elected primary.
        c.report(0, Role::Primary, None);
        assert_eq!(c.view().primary, Some(1));
        c.report(1, Role::Down, Some("refused".into()));
        let v = c.view();
        assert_eq!((v.primary, v.epoch), (Some(0), 2));
    }
}
