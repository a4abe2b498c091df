//! Failover and switchover: the driver that acts on the controller's verdicts (promote,
//! repoint, fence, rejoin), keeps replicas' `wal_receiver_timeout` short enough to serve as
//! evidence and, with `synchronous`, the primary's `synchronous_standby_names` current; plus
//! the planned switchover and forced promotion, and the history the admin console shows.

pub mod actions;
pub mod controller;
mod hook;
mod stragglers;
mod switchover;
pub mod sync_record;
mod synchronous;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use controller::{Cause, Policy, Verdict};
pub use switchover::{SwitchoverError, promote, switchover};

use crate::app::Shared;
use crate::cluster::{ClusterView, Fence, Role};
use crate::config::ClusterConfig;
use synchronous::{
    apply_synchronous_names, keep_synchronous_names, live_replica, live_replicas, named_nodes,
    wanted_names,
};

/// How often the driver looks at the view even when nothing was published.
const TICK: Duration = Duration::from_millis(50);
/// A hook or tuning step that failed is retried after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
pub(super) const HOOK_LIMIT: Duration = Duration::from_secs(300);
const EVENTS_KEPT: usize = 200;
/// How long standbys get to follow a new `synchronous_standby_names` before a list that
/// matches none of them is reported.
const SYNC_MATCH_GRACE: Duration = Duration::from_secs(3);

/// One promotion, as `SHOW FAILOVERS` lists it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The epoch of the new primary.
    pub epoch: u64,
    /// `failover`, `switchover` or `promote`.
    pub kind: &'static str,
    pub cause: String,
    pub old: Option<String>,
    pub new: String,
    pub at: SystemTime,
    /// Time spent in each phase, in order.
    pub phases: Vec<(&'static str, Duration)>,
    pub total: Duration,
}

/// Something the controller did or noticed, newest last.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub node: String,
    pub what: String,
}

#[derive(Default)]
pub struct Failover {
    history: Mutex<Vec<Record>>,
    events: Mutex<VecDeque<Event>>,
    /// Held while a promotion or switchover runs: one at a time.
    running: tokio::sync::Mutex<()>,
    /// (primary, value) wanted in `synchronous_standby_names`, claimed before it is written.
    sync_applied: Mutex<Option<(String, String)>>,
    /// Serialises those writes, in the order they were claimed.
    sync_writer: tokio::sync::Mutex<()>,
    /// Set when pgpilot left a primary with no synchronous standby (see `Unsynced`).
    unsynced: Mutex<Option<controller::Unsynced>>,
    /// Whom the primary's synchronous list named, and until where (see `SyncRecord`).
    sync_record: Mutex<sync_record::SyncRecord>,
    /// With a coordinator: whether this instance holds the leader lease, and who does.
    follower: std::sync::atomic::AtomicBool,
    leader: Mutex<Option<String>>,
}

impl Failover {
    /// Whether this instance decides failover: always without a coordinator, only while it
    /// holds the leader lease with one.
    pub fn may_decide(&self) -> bool {
        !self.follower.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Set by the coordinator: `leading`, and the current leader's identity.
    pub fn set_leader(&self, leading: bool, leader: Option<String>) {
        let was = self.may_decide();
        self.follower
            .store(!leading, std::sync::atomic::Ordering::Release);
        *self.leader.lock() = leader;
        if was != leading {
            let what = if leading {
                "this instance now leads failover (coordinator lease held)"
            } else {
                "this instance follows the coordinator's leader"
            };
            self.event("coordinator", what);
        }
    }

    /// The coordinator leader's identity, when known.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().clone()
    }

    pub fn history(&self) -> Vec<Record> {
        self.history.lock().clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().iter().cloned().collect()
    }

    pub(crate) fn event(&self, node: &str, what: impl Into<String>) {
        let what = what.into();
        info!(node, "{what}");
        let mut events = self.events.lock();
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at: SystemTime::now(),
            node: node.to_owned(),
            what,
        });
    }
}

pub fn policy(cfg: &ClusterConfig, failover: &Failover) -> Policy {
    Policy {
        mode: cfg.failover,
        failover_timeout: cfg.failover_timeout.0,
        max_failover_lag: cfg.max_failover_lag.0,
        synchronous: cfg.synchronous,
        unsynced: failover.unsynced.lock().clone(),
        sync_record: failover.sync_record.lock().clone(),
    }
}

/// The `wal_receiver_timeout` pgpilot wants on replicas: two thirds of `failover_timeout`
/// (at least one second), so a hung primary loses its receivers before it is declared dead
/// and a live one is heard from well within it.
pub fn wanted_receiver_timeout(cfg: &ClusterConfig) -> Duration {
    (cfg.failover_timeout.0 * 2 / 3).max(Duration::from_secs(1))
}

#[derive(Default)]
struct Driver {
    fenced: HashSet<usize>,
    /// When a hook or tuning step last started, per (what, node).
    attempts: HashMap<(&'static str, usize), Instant>,
    last_verdict: Option<Verdict>,
    last_nudge: Option<Instant>,
}

impl Driver {
    /// True (and remembered) when `what` on `node` was not attempted within `RETRY_AFTER`.
    fn due(&mut self, what: &'static str, node: usize) -> bool {
        let now = Instant::now();
        match self.attempts.get(&(what, node)) {
            Some(t) if now.duration_since(*t) < RETRY_AFTER => false,
            _ => {
                self.attempts.insert((what, node), now);
                true
            }
        }
    }
}

/// The background driver; returns when `stop` is cancelled.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut rx = shared.cluster.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut d = Driver::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = rx.changed() => {}
            _ = tick.tick() => {}
        }
        let view = shared.cluster.view();
        let cfg = shared.config().cluster.clone();
        let decides = shared.failover.may_decide();
        handle_fences(&shared, &view, &cfg, &mut d, decides);
        if !decides {
            // Another instance holds the coordinator lease: it acts, this one follows.
            continue;
        }
        tune_receivers(&shared, &view, &cfg, &mut d);
        stragglers::repoint_stragglers(&shared, &view, &cfg, &mut d);
        if cfg.synchronous {
            keep_synchronous_names(&shared, &view, &cfg);
        }
        let verdict = controller::assess(&view, &policy(&cfg, &shared.failover), Instant::now());
        if d.last_verdict.as_ref() != Some(&verdict) {
            log_verdict(&shared, &view, &verdict);
            d.last_verdict = Some(verdict.clone());
        }
        match verdict {
            Verdict::NeedEvidence { stale, .. } => {
                let now = Instant::now();
                if d.last_nudge
                    .is_none_or(|t| now.duration_since(t) >= TICK * 2)
                {
                    d.last_nudge = Some(now);
                    for i in stale {
                        shared.cluster.probe_now(i);
                    }
                }
            }
            Verdict::Promote {
                old,
                candidate,
                cause,
            } => {
                let Ok(_guard) = shared.failover.running.try_lock() else {
                    continue;
                };
                fail_over(&shared, &view, old, candidate, cause).await;
            }
            _ => {}
        }
    }
}

fn log_verdict(shared: &Shared, view: &ClusterView, verdict: &Verdict) {
    let name = |i: usize| view.nodes[i].name.as_str();
    match verdict {
        Verdict::PrimaryAlive { old, witness } => shared.failover.event(
            name(*old),
            format!(
                "unreachable from pgpilot, but {} still hears from it: no promotion",
                name(*witness)
            ),
        ),
        Verdict::NotAutomatic { old, cause } => shared.failover.event(
            name(*old),
            format!("primary lost ({cause}); failover is not automatic: waiting for an operator"),
        ),
        Verdict::NoCandidate { old, cause, why } => shared.failover.event(
            name(*old),
            format!("primary lost ({cause}); no replica may take over: {why}"),
        ),
        _ => {}
    }
}

/// Closes every server connection to newly fenced nodes, notes unfencing, and runs
/// `rejoin_command` on fenced nodes that are up and still claim the primary role.
fn handle_fences(
    shared: &Arc<Shared>,
    view: &ClusterView,
    cfg: &ClusterConfig,
    d: &mut Driver,
    decides: bool,
) {
    for (i, n) in view.nodes.iter().enumerate() {
        if n.fenced.is_none() {
            if d.fenced.remove(&i) {
                shared
                    .failover
                    .event(&n.name, "unfenced: streaming from the elected primary");
            }
            continue;
        }
        if d.fenced.insert(i) {
            let closed = shared.pools.abort_node(&n.name);
            let why = match view.superseded_by(i).filter(|_| n.claims_primary()) {
                Some(tl) => format!(
                    "claims the primary role on timeline {}, but another node knows timeline \
                     {tl}: a later primary superseded it, and it is never elected; ",
                    n.timeline()
                ),
                None => String::new(),
            };
            shared.failover.event(
                &n.name,
                format!("fenced: {why}no routing, {closed} server connections closed"),
            );
        }
        let Some(cmd) = cfg.rejoin_command.as_ref().filter(|_| decides) else {
            continue;
        };
        // Only once another node is the primary to follow (not mid-switchover).
        let Some(primary) = view.primary().filter(|p| p.name != n.name) else {
            continue;
        };
        if n.fenced == Some(Fence::Claim) && n.claims_primary() && d.due("rejoin", i) {
            let line = hook::expand(cmd, &hook::variables(n, Some(primary)));
            let (shared, name) = (shared.clone(), n.name.clone());
            shared
                .failover
                .event(&name, format!("running rejoin_command: {line}"));
            tokio::spawn(async move {
                match hook::run(&line, HOOK_LIMIT).await {
                    Ok(_) => shared.failover.event(&name, "rejoin_command succeeded"),
                    Err(e) => shared
                        .failover
                        .event(&name, format!("rejoin_command failed: {e}")),
                }
            });
        }
    }
}

fn tune_receivers(shared: &Arc<Shared>, view: &ClusterView, cfg: &ClusterConfig, d: &mut Driver) {
    if !cfg.tune_wal_receiver_timeout {
        return;
    }
    let wanted = wanted_receiver_timeout(cfg);
    for (i, n) in view.nodes.iter().enumerate() {
        let Some(ms) = n.sample.as_ref().and_then(|s| s.wal_receiver_timeout_ms) else {
            continue;
        };
        let too_long = ms == 0 || ms > wanted.as_millis() as u64;
        if !(n.healthy && n.role == Role::Replica && too_long && d.due("tune", i)) {
            continue;
        }
        let (shared, node, cfg) = (shared.clone(), n.clone(), cfg.clone());
        tokio::spawn(async move {
            match actions::set_wal_receiver_timeout(&cfg, &node, wanted).await {
                Ok(()) => shared.failover.event(
                    &node.name,
                    format!("wal_receiver_timeout lowered from {ms}ms to {wanted:?}"),
                ),
                Err(e) => {
                    shared
                        .failover
                        .event(&node.name, format!("cannot set wal_receiver_timeout: {e}"));
                }
            }
        });
    }
}

async fn fail_over(
    shared: &Arc<Shared>,
    view: &ClusterView,
    old: usize,
    candidate: usize,
    cause: Cause,
) {
    let confirmed = Instant::now();
    let since = view.nodes[old]
        .failure
        .as_ref()
        .map_or(confirmed, |f| f.since);
    let (old_name, new_name) = (&view.nodes[old].name, &view.nodes[candidate].name);
    // What the election saw: every replica's position (received high-water included).
    let positions: Vec<String> = view
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| *i != old && n.role == Role::Replica)
        .map(|(_, n)| {
            let s = n.sample.as_ref();
            format!(
                "{} at {} (receive {}, replay {}{})",
                n.name,
                n.wal_position().map_or("?".into(), |l| l.to_string()),
                s.and_then(|s| s.receive_lsn)
                    .map_or("-".into(), |l| l.to_string()),
                s.and_then(|s| s.replay_lsn)
                    .map_or("-".into(), |l| l.to_string()),
                if n.replay_settled { ", settled" } else { "" },
            )
        })
        .collect();
    shared.failover.event(
        old_name,
        format!(
            "primary lost ({cause}): promoting {new_name}; replicas: {}",
            positions.join(", ")
        ),
    );
    match promote_and_repoint(shared, Some(old), candidate).await {
        Ok((promote, repoint)) => {
            let record = Record {
                epoch: shared.cluster.view().epoch,
                kind: "failover",
                cause: cause.to_string(),
                old: Some(old_name.clone()),
                new: new_name.clone(),
                at: SystemTime::now(),
                phases: vec![
                    ("detect", confirmed.duration_since(since)),
                    ("promote", promote),
                    ("repoint", repoint),
                ],
                total: since.elapsed(),
            };
            finish(shared, record);
        }
        Err(e) => shared
            .failover
            .event(new_name, format!("promotion failed: {e}")),
    }
}

pub(super) fn finish(shared: &Shared, record: Record) {
    shared.failover.event(
        &record.new,
        format!(
            "{} complete: {} is primary ({:?} in all, {})",
            record.kind,
            record.new,
            record.total,
            record
                .phases
                .iter()
                .map(|(p, d)| format!("{p} {d:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    shared.failover.history.lock().push(record);
}

/// Promotes `candidate`, makes it the elected primary (with `synchronous`, after pointing its
/// `synchronous_standby_names` at the other live replicas), then repoints those replicas.
/// Returns the time spent promoting and repointing.
pub(super) async fn promote_and_repoint(
    shared: &Arc<Shared>,
    old: Option<usize>,
    candidate: usize,
) -> Result<(Duration, Duration), String> {
    let cfg = shared.config().cluster.clone();
    let started = Instant::now();
    let view = shared.cluster.view();
    let node = view.nodes[candidate].clone();
    let sample = actions::promote(&cfg, &node).await?;
    let except: Vec<usize> = old.into_iter().chain([candidate]).collect();
    let others = live_replicas(&view, &except);
    if cfg.synchronous {
        let value = wanted_names(&view, &cfg, candidate, others.clone());
        // The old primary's unsynchronised commits were weighed in the election; the new one
        // starts synchronous unless no replica is live.
        *shared.failover.unsynced.lock() = None;
        let named = named_nodes(&view, &value);
        if apply_synchronous_names(shared, &cfg, &node, &value, &named).await {
            *shared.failover.sync_applied.lock() = Some((node.name.clone(), value));
        }
    }
    shared.cluster.install_primary(candidate, &sample);
    let promoted = started.elapsed();

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, replica) in view.nodes.iter().enumerate() {
        if !live_replica(replica) || except.contains(&i) {
            continue;
        }
        let replica = replica.clone();
        let (cfg, primary) = (cfg.clone(), node.clone());
        tasks.spawn(async move {
            let r = actions::repoint(&cfg, &replica, &primary).await;
            (replica.name, r)
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((name, Ok(()))) => shared
                .failover
                .event(&name, format!("repointed to {}", node.name)),
            Ok((name, Err(e))) => shared
                .failover
                .event(&name, format!("repointing failed: {e}")),
            Err(e) => warn!(error = %e, "repoint task failed"),
        }
    }
    Ok((promoted, started.elapsed()))
}
