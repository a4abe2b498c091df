//! Where a client's work goes. Today a session goes to the elected primary, or to a replica for a
//! database with `routing = "replica"`; per-statement read routing plugs in here.

pub mod classify;
pub mod lexer;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cluster::{ClusterView, NodeStatus, Role};
use crate::config::Routing;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

/// The target for a whole session on a database with the given routing.
pub fn session_target(routing: Routing) -> Target {
    match routing {
        Routing::Replica => Target::Replica,
        Routing::Primary | Routing::Auto => Target::Primary,
    }
}

/// Round-robin choice among replicas the probes report as streaming replicas.
#[derive(Default)]
pub struct ReplicaPicker {
    next: AtomicUsize,
}

impl ReplicaPicker {
    pub fn pick<'a>(&self, view: &'a ClusterView) -> Option<&'a NodeStatus> {
        let replicas: Vec<&NodeStatus> = view
            .nodes
            .iter()
            .filter(|n| n.role == Role::Replica)
            .collect();
        if replicas.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % replicas.len();
        Some(replicas[i])
    }
}
