//! What the primary's `synchronous_standby_names` promised over time, for the election. With
//! `ANY 1 (...)` a commit is acknowledged once any one named standby has it, so a standby the
//! list names may hold commits no other node has; once the list stops naming it, commits after
//! the primary's position at that moment were acknowledged without it. A candidate that does
//! not hold what an unreachable standby may hold alone must not be promoted automatically.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::cluster::{FailureKind, Lsn, NodeStatus, Role};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncRecord {
    /// The primary whose list this is.
    pub primary: String,
    /// Nodes its list names, each since when it has been named without a break.
    pub named: BTreeMap<String, Instant>,
    /// Nodes it named and no longer does, with its position once it stopped.
    pub dropped: BTreeMap<String, Lsn>,
}

impl SyncRecord {
    /// `primary`'s list now names `named` (node names); `position` is the primary's position
    /// read after the change (`None`: unknown, so a node just left out counts as named).
    pub fn update(&mut self, primary: &str, named: &[String], position: Option<Lsn>) {
        if self.primary != primary {
            *self = SyncRecord {
                primary: primary.to_owned(),
                ..SyncRecord::default()
            };
        }
        let now = Instant::now();
        let gone: Vec<String> = self
            .named
            .keys()
            .filter(|n| !named.contains(n))
            .cloned()
            .collect();
        if let Some(p) = position {
            for n in gone {
                self.named.remove(&n);
                self.dropped.insert(n, p);
            }
        }
        for n in named {
            self.dropped.remove(n);
            self.named.entry(n.clone()).or_insert(now);
        }
    }

    /// Why a candidate at `pos` may lack commits acknowledged by `other`, a node that cannot
    /// be asked where its WAL ends; `None` when it cannot.
    pub fn blocks(&self, other: &NodeStatus, pos: Option<Lsn>) -> Option<String> {
        if let Some(since) = self.named.get(&other.name) {
            // Refusing connections since before it was named: it acknowledged nothing.
            let down_all_along = other.role == Role::Down
                && other
                    .failure
                    .as_ref()
                    .is_some_and(|f| f.kind == FailureKind::Crash && f.since < *since);
            return (!down_all_along).then(|| {
                format!(
                    "{} is named synchronous and unreachable: it may hold commits only it \
                     acknowledged",
                    other.name
                )
            });
        }
        match self.dropped.get(&other.name) {
            Some(d) if pos.is_none_or(|p| p < *d) => Some(format!(
                "{} is unreachable and may hold commits only it acknowledged, up to {d}",
                other.name
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Failure;

    fn node(name: &str, down_since: Option<Instant>) -> NodeStatus {
        let config = crate::config::NodeConfig {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            priority: 0,
            no_failover: false,
            data_dir: None,
        };
        let mut n = crate::cluster::Cluster::new(&[config]).view().nodes[0].clone();
        if let Some(since) = down_since {
            n.role = Role::Down;
            n.failure = Some(Failure {
                kind: FailureKind::Crash,
                since,
                last: since,
                second: None,
            });
        }
        n
    }

    #[test]
    fn a_standby_blocks_while_named_and_up_to_where_it_was_dropped() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut r = SyncRecord::default();
        r.update("pg1", &names(&["pg2", "pg3"]), Some(Lsn(100)));
        let crashed_later = node(
            "pg3",
            Some(Instant::now() + std::time::Duration::from_secs(1)),
        );
        assert!(r.blocks(&crashed_later, Some(Lsn(1000))).is_some(), "named");
        // pg3 dropped at 200: a candidate at 200 or beyond holds all it acknowledged.
        r.update("pg1", &names(&["pg2"]), Some(Lsn(200)));
        assert!(r.blocks(&crashed_later, Some(Lsn(199))).is_some());
        assert!(r.blocks(&crashed_later, Some(Lsn(200))).is_none());
        // Left out with the position unknown: still counts as named.
        r.update("pg1", &names(&[]), None);
        assert!(r.blocks(&node("pg2", None), Some(Lsn(1000))).is_some());
        // Down since before it was named (strict mode names every node): acknowledged nothing.
        let before = Instant::now();
        let mut r = SyncRecord::default();
        r.update("pg2", &names(&["pg1", "pg3"]), Some(Lsn(300)));
        assert!(r.blocks(&node("pg1", Some(before)), None).is_none());
        // Another primary's list starts afresh: a node it never named blocks nothing.
        r.update("pg3", &names(&["pg2"]), Some(Lsn(400)));
        assert!(r.blocks(&node("pg1", None), None).is_none());
    }
}
