//! How a `ClusterView` absorbs probe reports and promotions: who is the elected primary, who is
//! fenced, which primary writes may use, and how far each replica lags.
//!
//! Rules, applied after every change:
//! - With no elected primary yet (startup), once every node was probed, the healthy claimant
//!   on the newest timeline wins, then the highest priority; a claimant on a timeline older
//!   than one another node of its system knows (a standby that followed a later primary) was
//!   superseded and is never elected, only fenced.
//! - A claimant on a newer timeline than the elected primary's replaces it: a promotion made
//!   outside pgpilot. The old one is fenced.
//! - Any other claimant is fenced: an old primary restarted as-is stays out of routing.
//! - A node fenced for claiming the role is unfenced once it streams, as a replica, on the
//!   elected primary's timeline or a newer one.

use tokio::time::Instant;

use super::{ClusterView, Failure, FailureKind, Fence, NodeStatus, Report, Role, Sample};

impl ClusterView {
    pub(super) fn apply_report(&mut self, index: usize, report: &Report) {
        let Some(node) = self.nodes.get_mut(index) else {
            return;
        };
        node.healthy = report.healthy;
        match &report.result {
            Ok(sample) => {
                let previous = node.sample.as_ref();
                node.replay_settled = sample.in_recovery
                    && !sample.streaming
                    && previous.is_some_and(|p| {
                        p.in_recovery && !p.streaming && p.replay_lsn == sample.replay_lsn
                    });
                node.received_high = if sample.in_recovery && node.role != Role::Primary {
                    received_high(node.received_high, sample)
                } else {
                    // A primary, or a node that just stopped being one (rewound): nothing
                    // it received before counts.
                    None
                };
                node.role = if sample.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                node.sample = Some(sample.clone());
                node.last_error = None;
                node.probe_auth_failing = false;
                node.failure = None;
                node.last_ok = Some(Instant::now());
            }
            Err(e) if e.kind == FailureKind::Auth => {
                // Alive, but unseen: no failure for the failover controller to count.
                node.last_error = Some(e.message.clone());
                node.probe_auth_failing = true;
                node.last_ok = Some(Instant::now());
            }
            Err(e) => {
                node.probe_auth_failing = false;
                node.last_error = Some(e.message.clone());
                let (since, second) = match &node.failure {
                    Some(f) => (
                        f.since,
                        f.second.or((e.started > f.since).then_some(e.started)),
                    ),
                    None => (e.started, None),
                };
                node.failure = Some(Failure {
                    kind: e.kind,
                    since,
                    last: e.started,
                    second,
                });
            }
        }
        if !node.healthy {
            node.role = Role::Down;
        }
    }

    /// Makes `index` the elected primary; with `sample` (a promotion this instance made), its
    /// first probe as primary, without (a record another instance published), probes confirm.
    pub(super) fn install(&mut self, index: usize, sample: Option<&Sample>) {
        if index >= self.nodes.len() {
            return;
        }
        let previous = self.elected.replace(index);
        if previous != Some(index) {
            self.epoch += 1;
        }
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if i == index {
                if let Some(sample) = sample {
                    n.role = Role::Primary;
                    n.healthy = true;
                    n.sample = Some(sample.clone());
                    n.failure = None;
                    n.last_ok = Some(Instant::now());
                }
                n.fenced = None;
            } else if (Some(i) == previous || n.role == Role::Primary) && n.fenced.is_none() {
                n.fenced = Some(Fence::Claim);
            }
        }
    }

    pub(super) fn reconcile(&mut self) {
        self.adopt();
        let elected = self.elected;
        let elected_tl = self.elected().map_or(0, NodeStatus::timeline);
        let superseded: Vec<bool> = (0..self.nodes.len())
            .map(|i| self.superseded_by(i).is_some())
            .collect();
        let decided = elected.is_some() || self.all_probed();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if Some(i) == elected {
                continue;
            }
            // Before the first election only a superseded claimant is fenced: the others
            // are candidates.
            let fence = elected.is_some() || superseded[i];
            if n.claims_primary() && n.fenced.is_none() && decided && fence {
                n.fenced = Some(Fence::Claim);
            }
            let rejoined = n.healthy
                && n.role == Role::Replica
                && n.sample.as_ref().is_some_and(|s| s.streaming)
                && n.timeline() >= elected_tl;
            if n.fenced == Some(Fence::Claim) && rejoined && elected.is_some() {
                n.fenced = None;
            }
        }
        self.primary = self
            .elected
            .filter(|&i| !self.paused && self.nodes[i].claims_primary())
            .filter(|&i| self.nodes[i].fenced.is_none());
        self.compute_lag();
    }

    /// Elects a primary at startup, or follows a promotion made elsewhere.
    fn adopt(&mut self) {
        let best = (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                n.claims_primary() && !matches!(n.fenced, Some(Fence::Operator | Fence::Removed))
            })
            .max_by_key(|&i| {
                let n = &self.nodes[i];
                (n.timeline(), Some(i) == self.elected, n.priority)
            });
        let Some(best) = best else {
            return;
        };
        match self.elected {
            None if self.nodes[best].fenced.is_none()
                && self.all_probed()
                && self.superseded_by(best).is_none() =>
            {
                self.elected = Some(best);
                self.epoch += 1;
            }
            Some(e) if e != best && self.nodes[best].timeline() > self.nodes[e].timeline() => {
                self.elected = Some(best);
                self.epoch += 1;
                self.nodes[best].fenced = None;
                if self.nodes[e].fenced.is_none() {
                    self.nodes[e].fenced = Some(Fence::Claim);
                }
            }
            _ => {}
        }
    }

    /// Whether every node (but those removed) was probed at least once: before that, a
    /// claimant may be one another node's history has left behind.
    fn all_probed(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.probed() || n.fenced == Some(Fence::Removed))
    }

    /// The newest timeline a node of `i`'s system knows, when it is newer than `i`'s own.
    pub fn superseded_by(&self, i: usize) -> Option<u32> {
        let node = &self.nodes[i];
        let system = node.sample.as_ref().and_then(|s| s.system_id.as_deref());
        let newest = self
            .nodes
            .iter()
            .filter(|n| n.sample.as_ref().and_then(|s| s.system_id.as_deref()) == system)
            .map(NodeStatus::known_timeline)
            .max()?;
        (newest > node.timeline()).then_some(newest)
    }

    fn compute_lag(&mut self) {
        let head = self
            .elected()
            .and_then(|p| p.sample.as_ref())
            .and_then(|s| s.current_lsn);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
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

    /// Whether anything routing or the failover controller watches differs from `old`.
    pub(super) fn differs_for_routing(&self, old: &ClusterView) -> bool {
        let key = |n: &NodeStatus| (n.role, n.healthy, n.fenced, n.failure.is_some());
        self.primary != old.primary
            || self.elected != old.elected
            || self.epoch != old.epoch
            || self.paused != old.paused
            || self
                .nodes
                .iter()
                .zip(&old.nodes)
                .any(|(a, b)| key(a) != key(b))
    }
}

/// The receive high-water mark after `sample`: kept while the replica stays on its timeline
/// (or streams from nobody), restarted on a new one.
fn received_high(
    high: Option<(u32, crate::cluster::Lsn)>,
    sample: &Sample,
) -> Option<(u32, crate::cluster::Lsn)> {
    let now = sample.receive_lsn;
    match (high, sample.timeline, now) {
        (Some((tl, h)), Some(t), Some(r)) if t == tl => Some((tl, h.max(r))),
        (Some(kept), None, _) => Some(kept),
        (_, Some(t), Some(r)) => Some((t, r)),
        (kept, _, None) => kept,
        (None, None, Some(_)) => None,
    }
}
