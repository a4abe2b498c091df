//! Topology: the immutable `ClusterView` snapshot (behind `ArcSwap`) that every routing decision
//! loads once, the probes that keep it current, and a `watch` channel for whoever must react.
//!
//! The elected primary is sticky: it changes when the failover controller installs a promoted
//! node, or when another node claims the primary role on a newer timeline (a promotion made
//! outside pgpilot). Any other node claiming to be primary is fenced (see `view.rs`).

mod lsn;
pub mod monitor;
mod probe;
mod view;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use lsn::Lsn;
pub use probe::{FailureKind, ProbeError, Sample};

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

/// Why a node is fenced (never routed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// It claims the primary role but is not the elected primary (or was replaced by a
    /// promotion). Lifted automatically once it streams from the elected primary.
    Claim,
    /// An operator fenced it; only an operator lifts it.
    Operator,
    /// Removed from the configuration by a reload: no longer probed or routed to.
    Removed,
}

/// Nodes a cluster can hold, including ones added by reloads.
pub const MAX_NODES: usize = 64;

/// The current run of failed probes of a node.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What the latest failed probe saw.
    pub kind: FailureKind,
    /// When the first failed probe of the run was sent.
    pub since: Instant,
    /// When the latest failed probe was sent.
    pub last: Instant,
    /// When the second failed probe of the run was sent: the first had already failed, so
    /// the node was down by then (the first may have been sent before it went down).
    pub second: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub priority: i32,
    pub no_failover: bool,
    pub data_dir: Option<String>,
    pub role: Role,
    /// Flips only after `probe_failures` consecutive results the other way.
    pub healthy: bool,
    pub fenced: Option<Fence>,
    /// The latest successful probe.
    pub sample: Option<Sample>,
    /// Set while probes fail, cleared by the next success.
    pub failure: Option<Failure>,
    /// When the latest successful probe finished.
    pub last_ok: Option<Instant>,
    /// Replay distance behind the elected primary's current WAL position.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Probes are refused for authentication (monitor_user / monitor_password).
    pub probe_auth_failing: bool,
    /// The furthest WAL this replica was seen to have received on its timeline. PostgreSQL's
    /// receive position goes back to a segment start whenever the WAL receiver restarts
    /// (as it keeps doing once its primary is gone), although the WAL stays on disk.
    pub received_high: Option<(u32, Lsn)>,
    /// The latest two samples reported the same replay position with no WAL receiver
    /// streaming: the replica has replayed all the WAL it has.
    pub replay_settled: bool,
}

impl NodeStatus {
    pub fn replay_lsn(&self) -> Option<Lsn> {
        self.sample.as_ref().and_then(|s| s.replay_lsn)
    }

    /// The furthest WAL position this node is known to hold: current on a primary, received
    /// or replayed on a replica.
    pub fn wal_position(&self) -> Option<Lsn> {
        let s = self.sample.as_ref()?;
        [
            s.current_lsn,
            s.receive_lsn,
            s.replay_lsn,
            self.received_high.map(|(_, l)| l),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    pub fn timeline(&self) -> u32 {
        self.sample.as_ref().and_then(|s| s.timeline).unwrap_or(0)
    }

    /// The newest timeline this node is known to have been on or to know of: a primary's
    /// own, a standby's newest known (see `Sample::known_timeline`).
    pub fn known_timeline(&self) -> u32 {
        let known = self.sample.as_ref().and_then(|s| s.known_timeline);
        known.unwrap_or(0).max(self.timeline())
    }

    /// At least one probe answered or failed since pgpilot started.
    pub fn probed(&self) -> bool {
        self.sample.is_some() || self.last_error.is_some()
    }

    /// Healthy, unfenced and reporting the primary role.
    pub fn claims_primary(&self) -> bool {
        self.healthy && self.role == Role::Primary
    }
}

#[derive(Debug, Clone)]
pub struct ClusterView {
    pub nodes: Vec<NodeStatus>,
    /// Index into `nodes` of the elected primary, kept while it is down.
    pub elected: Option<usize>,
    /// The elected primary when writes may go to it: healthy, unfenced, not paused.
    pub primary: Option<usize>,
    /// Increases every time the elected primary changes.
    pub epoch: u64,
    /// New writes wait (a switchover is draining the old primary).
    pub paused: bool,
}

impl ClusterView {
    pub fn primary(&self) -> Option<&NodeStatus> {
        self.primary.map(|i| &self.nodes[i])
    }

    pub fn elected(&self) -> Option<&NodeStatus> {
        self.elected.map(|i| &self.nodes[i])
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}

/// Shared topology state.
pub struct Cluster {
    view: ArcSwap<ClusterView>,
    changed: watch::Sender<u64>,
    /// Per node slot: wakes its prober for an immediate probe.
    wake: Vec<Notify>,
    /// What probes use; replaced by a reload.
    config: ArcSwap<ClusterConfig>,
    /// Where probes of nodes added later are spawned (set by `spawn_probes`).
    spawner: parking_lot::Mutex<Option<(TaskTracker, CancellationToken)>>,
}

/// One probe outcome as the prober reports it, hysteresis already applied to `healthy`.
pub struct Report {
    pub result: Result<Sample, ProbeError>,
    pub healthy: bool,
}

fn status_of(n: &NodeConfig) -> NodeStatus {
    NodeStatus {
        name: n.name.clone(),
        host: n.host.clone(),
        port: n.port,
        priority: n.priority,
        no_failover: n.no_failover,
        data_dir: n.data_dir.clone(),
        role: Role::Unknown,
        healthy: false,
        fenced: None,
        sample: None,
        failure: None,
        last_ok: None,
        lag_bytes: None,
        lag_seconds: None,
        last_error: None,
        probe_auth_failing: false,
        received_high: None,
        replay_settled: false,
    }
}

impl Cluster {
    pub fn new(nodes: &[NodeConfig]) -> Arc<Self> {
        Self::with_config(nodes, ClusterConfig::default())
    }

    pub fn with_config(nodes: &[NodeConfig], config: ClusterConfig) -> Arc<Self> {
        let view = ClusterView {
            nodes: nodes.iter().map(status_of).collect(),
            elected: None,
            primary: None,
            epoch: 0,
            paused: false,
        };
        Arc::new(Cluster {
            view: ArcSwap::from_pointee(view),
            changed: watch::channel(0).0,
            wake: (0..MAX_NODES).map(|_| Notify::new()).collect(),
            config: ArcSwap::from_pointee(config),
            spawner: parking_lot::Mutex::new(None),
        })
    }

    pub fn config(&self) -> Arc<ClusterConfig> {
        self.config.load_full()
    }

    pub fn set_config(&self, config: ClusterConfig) {
        self.config.store(Arc::new(config));
    }

    /// Adds a node from a reload (or brings back a removed one under the same name) and
    /// starts probing it. Returns its index, or `None` when the cluster is full.
    pub fn add_node(self: &Arc<Self>, node: &NodeConfig) -> Option<usize> {
        let view = self.view();
        let index = match view.index_of(&node.name) {
            Some(i) => i,
            None if view.nodes.len() < MAX_NODES => view.nodes.len(),
            None => return None,
        };
        self.update(|v| {
            let status = status_of(node);
            match v.nodes.get_mut(index) {
                Some(slot) => *slot = status,
                None => v.nodes.push(status),
            }
        });
        if let Some((tracker, token)) = self.spawner.lock().clone() {
            let prober = probe::Prober::new(self.clone(), index);
            tracker.spawn(async move { prober.run(token).await });
        }
        Some(index)
    }

    /// Takes a node out (a reload removed it): fenced for good, its prober stops.
    pub fn remove_node(&self, index: usize) {
        self.set_fence(index, Some(Fence::Removed));
        self.probe_now(index);
    }

    /// Applies a reload's new priority / no_failover / data_dir to a node.
    pub fn update_node(&self, index: usize, node: &NodeConfig) {
        self.update(|v| {
            if let Some(n) = v.nodes.get_mut(index) {
                n.priority = node.priority;
                n.no_failover = node.no_failover;
                n.data_dir = node.data_dir.clone();
            }
        });
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Asks node `index`'s prober to probe now (a client saw it fail, or the failover
    /// controller needs fresh evidence).
    pub fn probe_now(&self, index: usize) {
        if let Some(w) = self.wake.get(index) {
            w.notify_one();
        }
    }

    /// Applies `edit` to a copy of the view, reconciles and publishes it; watchers are told
    /// when anything routing depends on changed.
    fn update(&self, edit: impl Fn(&mut ClusterView)) {
        let mut changed = false;
        self.view.rcu(|old| {
            let mut next = ClusterView::clone(old);
            edit(&mut next);
            next.reconcile();
            changed = next.differs_for_routing(old);
            next
        });
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Records a probe report for node `index` and republishes the view.
    pub fn report(&self, index: usize, report: Report) {
        self.update(|v| v.apply_report(index, &report));
    }

    /// Makes `index` the elected primary after the failover controller promoted it; `sample`
    /// is its first probe as a primary. Every other node claiming the role is fenced.
    pub fn install_primary(&self, index: usize, sample: &Sample) {
        self.update(|v| v.install(index, Some(sample)));
    }

    /// Follows the coordinator's record: `index` is the elected primary (another instance
    /// promoted it); this instance's probes confirm its role before writes go there.
    pub fn follow_primary(&self, index: usize) {
        if self.view().elected != Some(index) {
            self.update(|v| v.install(index, None));
        }
    }

    /// Fences (`Some`) or unfences (`None`) a node.
    pub fn set_fence(&self, index: usize, fence: Option<Fence>) {
        self.update(|v| {
            if let Some(n) = v.nodes.get_mut(index) {
                n.fenced = fence;
            }
        });
    }

    /// While paused, writes wait for a primary as if none were elected.
    pub fn set_paused(&self, paused: bool) {
        self.update(|v| v.paused = paused);
    }

    /// Waits until an elected primary is known, up to `timeout`.
    pub async fn wait_for_primary(&self, timeout: Duration) -> Option<NodeStatus> {
        self.wait_until(Instant::now() + timeout, |v| v.primary().cloned())
            .await
    }

    /// Waits until a primary other than `previous` is elected, up to `deadline`.
    pub async fn wait_for_new_primary(
        &self,
        previous: &str,
        deadline: Instant,
    ) -> Option<NodeStatus> {
        self.wait_until(deadline, |v| {
            v.primary().filter(|p| p.name != previous).cloned()
        })
        .await
    }

    /// Waits until `check` finds something in the view, up to `deadline`.
    pub async fn wait_until<T>(
        &self,
        deadline: Instant,
        check: impl Fn(&ClusterView) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.subscribe();
        loop {
            if let Some(found) = check(&self.view()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return check(&self.view()),
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
        self.set_config(config.clone());
        *self.spawner.lock() = Some((tracker.clone(), shutdown.clone()));
        for index in 0..self.view().nodes.len() {
            let prober = probe::Prober::new(self.clone(), index);
            let token = shutdown.clone();
            tracker.spawn(async move { prober.run(token).await });
        }
    }
}

#[cfg(test)]
mod tests;
